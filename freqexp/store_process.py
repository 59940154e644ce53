"""A single run's MLflow store in a process of its own, opened while the run imports torch.

Importing MLflow and opening its store cost a run 1.4-3 s on 2 CPU cores (4 s on a GPU host),
after the 3.5-6 s of importing torch and Lightning, one after the other in one interpreter (the
imports hold Python's lock: a thread does not overlap them). A single run
(`python -m freqexp` without --multirun) therefore starts this process as soon as its command
line is checked. It imports MLflow while the run imports torch and Lightning, opens the store
when the run asks, and then makes the run's store calls (freqexp.tracking.Tracker) as the run
sends them through a pipe:

- the calls that answer (open the store, start the run, find a finished run, end the run) wait
  for the answer; a store that cannot be opened is the same one-line ConfigError as in the run's
  own process, before any training;
- the others (params, metrics, the per-epoch curves, tags, artifacts, dataset inputs) are sent
  and the run goes on; an error in one of them is raised by the run's end, which then ends the
  run FAILED with that error, so a run that lost a write never ends FINISHED;
- when the run's process dies without ending its run (SIGKILL, out of memory), the pipe closes
  and this process ends the run KILLED, with the tag killed_reason as `freqexp.orphans` writes it;
- it runs in a session of its own and ignores SIGINT, SIGTERM and SIGHUP, so Ctrl-C, or a
  scheduler's SIGTERM to every process of the job, is the run's to handle: the run ends its run
  KILLED here, and this process ends when the run's pipe closes;
- it opens the store with the run's environment as it is then (Hydra's hydra.job.env_set is
  applied after this process started);
- a process that no run claimed (the run failed before opening the store) is killed when the run's
  process exits (freqexp.__main__.exit_now).

A sweep's workers keep the store in their own process: they import MLflow once for all their
jobs. FREQEXP_STORE_PROCESS=0 keeps a single run's store in its own process too.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from types import SimpleNamespace
from typing import Any, Dict, Iterable, Mapping, Optional

from freqexp.errors import ConfigError

ENV = "FREQEXP_STORE_PROCESS"
KILLED_REASON = "its process (pid {pid}) is gone: it ended without closing its run (killed, out of memory?)"

_process: Optional["StoreProcess"] = None


class StoreError(RuntimeError):
    """The store process refused or lost a write, or ended."""


def wanted(argv: Iterable[str]) -> bool:
    """Whether a command line is a single run that should get a store process: not a --multirun
    (nor hydra.mode=MULTIRUN in any override form), not a flag that prints instead of running
    (--help, --cfg, --info, ...; read with Hydra's own parser, which takes abbreviations)."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    from hydra._internal.utils import get_args_parser

    try:
        args, _ = get_args_parser().parse_known_args(list(argv))
    except SystemExit:  # Hydra will say what is wrong with it
        return False
    if args.multirun or args.help or args.hydra_help or args.cfg or args.info or args.shell_completion or args.resolve:
        return False
    for item in args.overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if key.strip() == "hydra.mode" and value.strip().strip("'\"").upper() == "MULTIRUN":
            return False
    return True


def start() -> None:
    """Starts this process's store process (it begins importing MLflow now); best effort: where it
    cannot start, the run keeps its store in its own process."""
    global _process
    if _process is None:
        try:
            _process = StoreProcess()
        except OSError:
            _process = None


def claim(uri: str, experiment: str) -> Optional["RemoteTracker"]:
    """The started store process, opened on `uri` and `experiment`, as a Tracker; None where none
    was started here (or it was claimed already, or this is a child of the process that started
    it), or where it ended before it could answer (a warning): the caller opens the store itself.
    A store that cannot be opened raises ConfigError, as the store opened here does."""
    global _process
    process, _process = _process, None
    if process is None or process.owner != os.getpid():
        return None
    try:
        return process.open(uri, experiment)
    except StoreError as e:
        import logging

        logging.getLogger("freqexp").warning("%s; the run opens the store itself", e)
        process.kill()
        return None


def discard() -> None:
    """Ends a store process that no run claimed (the run failed before opening the store): it
    must not outlive the run's process, holding its stderr."""
    global _process
    process, _process = _process, None
    if process is not None and process.owner == os.getpid():
        process.kill()


def open_tracker(uri: str, experiment: str):
    """A run's Tracker: the store process its entry point started (a single run), else the store
    opened in this process (freqexp.tracking.Tracker)."""
    from freqexp.tracking import Tracker

    return claim(uri, experiment) or Tracker(uri, experiment)


def _unpickle_error(kind: str, args: tuple) -> BaseException:
    if kind == "ConfigError":
        return ConfigError(*args)
    return StoreError(*args)


class StoreProcess:
    """The process, and the pipe's two ends on this side."""

    def __init__(self):
        code = "import sys; sys.path[:0] = {!r}; from freqexp.store_process import serve; serve()".format(
            [p for p in sys.path if p])
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     start_new_session=True, close_fds=True)
        self._send_to, self._replies = self.proc.stdin, self.proc.stdout
        self.owner = os.getpid()  # a forked child must not write into this pipe too
        self._owed = 0  # replies not yet read: a wait that Ctrl-C cut short leaves one behind

    def send(self, name: str, *args, reply: bool = False) -> Any:
        """Sends one call; with `reply`, waits for its answer (reading first any answer an
        interrupted wait left unread, so that answers never go to the wrong call)."""
        try:
            pickle.dump((name, args, reply), self._send_to, protocol=pickle.HIGHEST_PROTOCOL)
            self._send_to.flush()
            if not reply:
                return None
            self._owed += 1
            while True:
                status, value = pickle.load(self._replies)
                self._owed -= 1
                if self._owed == 0:
                    break
        except (OSError, EOFError, pickle.UnpicklingError):
            raise StoreError(f"the MLflow store process ended (exit code {self.proc.poll()}); the run's records stop here") from None
        if status == "error":
            raise _unpickle_error(*value)
        return value

    def open(self, uri: str, experiment: str) -> "RemoteTracker":
        from freqexp.tracking import resolve_uri

        uri = resolve_uri(uri)  # here: relative paths are the run's, and a bad URI fails before the round trip
        # the run's environment as it is now: Hydra's hydra.job.env_set (MLflow credentials, ...) came after the start
        experiment_id = self.send("open", uri, experiment, dict(os.environ), reply=True)
        return RemoteTracker(self, uri, experiment_id)

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass


class RemoteTracker:
    """freqexp.tracking.Tracker's interface, carried out by the store process."""

    def __init__(self, process: StoreProcess, uri: str, experiment_id: str):
        self.process, self.uri, self.experiment_id = process, uri, experiment_id
        self.run_id: Optional[str] = None

    def find_finished(self, config_hash: str):
        found = self.process.send("find_finished", config_hash, reply=True)
        if found is None:
            return None
        run_id, metrics = found
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id), data=SimpleNamespace(metrics=metrics))

    def start(self, run_name: str, tags: Mapping[str, Any]) -> str:
        self.run_id = self.process.send("start", run_name, {k: str(v) for k, v in tags.items()}, reply=True)
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.process.send("log_params", {k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        self.process.send("log_metrics", {k: float(v) for k, v in metrics.items()}, step)

    def log_epoch_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.process.send("log_epoch_metrics", {k: float(v) for k, v in metrics.items()}, step)

    def flush(self) -> None:
        self.process.send("flush")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.process.send("set_tags", {k: str(v) for k, v in tags.items()})

    def log_artifacts(self, paths: Iterable[os.PathLike | str], subdir: Optional[str] = None) -> None:
        self.process.send("log_artifacts", [os.path.abspath(p) for p in paths], subdir)

    def log_datasets(self, datasets: list) -> None:
        self.process.send("log_datasets", datasets)

    def end(self, status: str = "FINISHED") -> None:
        """Waits until every call before it is in the store; raises the first write the store
        refused since the run started (the run is then FAILED, with that error as its tag)."""
        if self.run_id is not None:
            self.process.send("end", status, reply=True)


class _Server:
    """The store process's side: a Tracker, and the first error of a call that did not wait."""

    def __init__(self, run_pid: int):
        self.run_pid = run_pid  # the run's process
        self.tracker = None
        self.ended = True
        self.error: Optional[str] = None

    def open(self, uri: str, experiment: str, environ: Dict[str, str]) -> str:
        from freqexp.tracking import Tracker

        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)
        self.tracker = Tracker(uri, experiment)
        return self.tracker.experiment_id

    def find_finished(self, config_hash: str):
        run = self.tracker.find_finished(config_hash)
        return None if run is None else (run.info.run_id, {k: float(v) for k, v in run.data.metrics.items()})

    def start(self, run_name: str, tags: Dict[str, str]) -> str:
        run_id = self.tracker.start(run_name, tags)
        self.ended, self.error = False, None
        return run_id

    def end(self, status: str) -> None:
        error, self.error = self.error, None
        if error is not None and status == "FINISHED":
            try:
                self.tracker.flush()
                self.tracker.set_tags({"status": "failed", "error": error, "error_type": "StoreError"})
            finally:
                self.tracker.end("FAILED")
                self.ended = True
            raise StoreError(error)
        self.tracker.end(status)
        self.ended = True

    def close_abandoned(self) -> None:
        """The run's process is gone and its run is still open: it ends KILLED, saying why."""
        if self.tracker is None or self.ended:
            return
        try:
            self.tracker.flush()
            self.tracker.set_tags({"status": "killed", "killed_reason": KILLED_REASON.format(pid=self.run_pid)})
        finally:
            self.tracker.end("KILLED")

    def call(self, name: str, args: tuple):
        if name in ("open", "find_finished", "start", "end"):
            return getattr(self, name)(*args)
        if name in ("log_params", "log_metrics", "log_epoch_metrics", "flush", "set_tags", "log_artifacts", "log_datasets"):
            return getattr(self.tracker, name)(*args)
        raise StoreError(f"unknown store call {name!r}")


def serve() -> None:
    """The store process's loop: one call per message until the run's process closes the pipe
    (or the pipe breaks); a run still open then is ended KILLED. Signals that end a job (SIGTERM
    from a scheduler to every process of the job, SIGINT, SIGHUP) are ignored here: the run's
    process handles them and ends its run through this process, whose pipe then closes."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    from freqexp.tracking import first_sentence

    run_pid = os.getppid()
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)  # anything printed goes to the run's stderr, never into the replies
    server = _Server(run_pid)
    try:
        import mlflow.tracking  # noqa: F401 - now, while the run imports torch (the point of this process)
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

        while True:
            try:
                name, args, reply = pickle.load(requests)
            except Exception:  # noqa: BLE001 - the pipe closed, broke or carried half a message: the run is gone
                break
            try:
                answer = ("ok", server.call(name, args))
            except ConfigError as e:
                answer = ("error", ("ConfigError", (e.key, e.message)))
            except Exception as e:  # noqa: BLE001 - the run gets it as one line
                text = e.args[0] if isinstance(e, StoreError) and e.args else f"{type(e).__name__}: {first_sentence(e)}"
                if not reply:
                    server.error = server.error or f"the MLflow store refused {name}: {text}"
                    continue
                answer = ("error", ("StoreError", (text,)))
            if reply:
                try:
                    pickle.dump(answer, replies, protocol=pickle.HIGHEST_PROTOCOL)
                    replies.flush()
                except OSError:  # the run is gone before its answer
                    break
    finally:
        try:
            server.close_abandoned()
        finally:  # no interpreter teardown (a second of finalizing MLflow's modules, for nothing)
            sys.stderr.flush()
            os._exit(0)
