"""MLflow bookkeeping for one run: the experiment, params (the flattened composed config),
metrics per epoch and final, artifacts, tags, and an honest end status. Uses MlflowClient
rather than mlflow's global active run, so nothing leaks between runs in one process."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional

from freqexp.errors import ConfigError, ReportError

# mlflow imports are deferred: they cost seconds, and a bad config should fail before them.


def quiet_store_migrations() -> None:
    """MLflow logs its database set-up and alembic migrations at INFO on every new store; they
    say nothing a user acts on, so they are kept to warnings."""
    import logging

    for name in ("mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


quiet_store_migrations()


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a sqlite:/// URI as an absolute path (a relative one is relative to
    the current directory, ~ expanded); None for an in-memory database or another kind of URI."""
    if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
        return None
    path = Path(uri[len("sqlite:///"):]).expanduser()
    return path if path.is_absolute() else Path.cwd() / path


# What MLflow 3 takes as a tracking store, as the one line a refused URI ends with. MLflow's
# own error for an unknown scheme is a 430-character registry message that never names the key;
# a file store (a path, file://) raises in mlflow 3 (its file backend is in maintenance mode).
URI_FORMS = "sqlite:///PATH.db, http(s)://HOST[:PORT], postgresql://, mysql://, mssql:// or databricks[://PROFILE]"
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")  # also with a driver: postgresql+psycopg2://


def _plugin_schemes() -> set:
    """Schemes that installed MLflow plugins register as tracking stores (entry points)."""
    from importlib.metadata import entry_points

    try:
        return {ep.name for ep in entry_points(group="mlflow.tracking_store")}
    except Exception:  # noqa: BLE001 - broken metadata: no plugins
        return set()


def check_uri(uri: Any, key: str = "tracking.uri") -> str:
    """The URI's kind (sqlite, http, https, postgresql, mysql, mssql, databricks or a plugin's
    scheme) when MLflow 3 takes it as a tracking store; else ConfigError naming `key`, the value
    and the accepted forms. Only the text is read: nothing is opened or created."""
    from urllib.parse import urlsplit

    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(key, f"must be a URI; got {uri!r}; use {URI_FORMS}")
    if uri == "databricks" or uri.startswith("databricks://"):
        return "databricks"
    if "://" not in uri or uri.startswith("file:"):
        raise ConfigError(key, f"{uri!r} is a file path, MLflow's file store, which mlflow 3 refuses; use {URI_FORMS}")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower().split("+")[0]
    if scheme == "sqlite":
        if uri == "sqlite:///:memory:":
            return scheme
        if not uri.startswith("sqlite:///") or not uri[len("sqlite:///"):].strip("/"):
            raise ConfigError(key, f"{uri!r}: a sqlite store is sqlite:/// and a file path (sqlite:///outputs/mlflow.db, "
                                   "sqlite:////abs/mlflow.db)")
        return scheme
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise ConfigError(key, f"{uri!r} names no host; an MLflow server is {scheme}://HOST[:PORT]")
        return scheme
    if scheme in DATABASE_SCHEMES:
        return scheme
    if parts.scheme and parts.scheme in _plugin_schemes():
        return parts.scheme
    raise ConfigError(key, f"{uri!r}: unknown scheme {parts.scheme!r}; use {URI_FORMS}")


def resolve_uri(uri: str) -> str:
    """Check the URI's form (check_uri), make a relative sqlite path absolute (relative to the
    current directory) and create its folder; a server that does not answer fails now
    (check_reachable); other URIs pass through."""
    kind = check_uri(uri, "tracking.uri")
    if kind == "sqlite":
        p = sqlite_path(uri)
        if p is None:  # in memory
            return uri
        if p.is_dir():
            raise ConfigError("tracking.uri", f"{uri!r} is a folder; give the database file, e.g. sqlite:///{p / 'mlflow.db'}")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError("tracking.uri", f"cannot create {p.parent} for the store ({e.strerror or e})") from None
        return "sqlite:///" + str(p)
    check_reachable(uri, "tracking.uri")
    return uri


DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433, "http": 80, "https": 443}


def check_reachable(uri: str, key: str, timeout: float = 3.0) -> None:
    """A server URI whose host does not answer fails now, in one line, instead of after the
    minutes of retries MLflow and SQLAlchemy would spend."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0]
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return
    port = parts.port or DEFAULT_PORTS[scheme]
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(key, f"cannot reach {scheme} server at {parts.hostname}:{port} ({e.strerror or e}); start it or fix the URI") from None


def existing_store(uri: str) -> str:
    """The store to read, which must exist: a report never creates an empty store (a typo in the
    path would otherwise read nothing and leave a new database behind)."""
    try:
        kind = check_uri(uri, "tracking.uri")  # the form first: MLflow's own error never names the key
        path = sqlite_path(uri)
        if kind == "sqlite" and path is None:
            raise ConfigError("tracking.uri", f"{uri!r} is an empty in-memory store; give the sqlite:///PATH.db the runs wrote to")
        if path is not None:
            if not path.is_file():
                raise ConfigError("tracking.uri", f"no MLflow store at {path}; runs write to the tracking.uri they were given "
                                  "(default sqlite:///outputs/mlflow.db, relative to where they ran)")
            return "sqlite:///" + str(path)
        check_reachable(uri, "tracking.uri")
    except ConfigError as e:
        raise ReportError(str(e)) from None
    return uri


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> Dict[str, str]:
    out: Dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)
    return out


# --- what defines an experiment -------------------------------------------------------------
# A run's params are its flattened composed config plus what it resolved on the machine. Every
# key defines the experiment (what is computed) except the replicate, `seed`, and these run-control
# keys (each a key or a prefix of keys): how, where and with what bookkeeping a run ran. Two runs
# that differ only in them are the same experiment: resume's config hash (freqexp.run.config_hash)
# leaves them out and the report (freqexp.report) never splits a configuration on them.
# Precision is here on purpose: docs/sweeps.md#what-defines-a-configuration says why, and how to compare it.
RUN_CONTROL = (
    "tracking",                             # the store, the experiment name, which figures are drawn
    "sweep",                                # resume, workers, heartbeat, objective, pruner: how jobs are scheduled
    "hardware", "choice.hardware",          # accelerator, precision, device_index (a sweep's GPU slot)
    "trainer.progress_bar",                 # what the terminal shows
    "trainer.steps_per_call", "resolved.steps_per_call",  # batches per pass of Lightning's loop: the same steps
    "dataset.cache", "dataset.cache_dir",   # where decoded images are kept
    "resolved.accelerator", "resolved.precision", "resolved.cpu_threads", "resolved.channels_last",  # what the machine gave
    "data",                                 # what was read: data.root (where the files were found) and the
                                            # split counts, which follow the dataset.* keys
)
REPLICATE = "seed"  # a leaderboard row averages over it


def is_run_control(key: str) -> bool:
    """True for a dotted param key that is, or lies under, a RUN_CONTROL key."""
    return any(key == k or key.startswith(k + ".") for k in RUN_CONTROL)


def defines_experiment(key: str) -> bool:
    """True for a param that tells two experiments apart: neither run control nor the seed."""
    return key != REPLICATE and not is_run_control(key)


def without_run_control(container: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A composed config (plain nested dicts) less its run-control keys, seed kept: what a
    rerun must match (resume's config hash). A new dict; the input is left as it is."""
    out: Dict[str, Any] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if is_run_control(name):
            continue
        out[key] = without_run_control(value, name + ".") if isinstance(value, Mapping) else value
    return out


# --- the MLflow UI -------------------------------------------------------------------------
# MLflow 3.x opens an experiment on its GenAI "Overview" tab (traces, token usage). In 3.17 the
# experiment page takes its kind from the sidebar's "GenAI | Model training" switch: the URL
# parameter `workflowType` (genai | machine_learning), else the browser's localStorage
# `mlflow.workflowType`, default genai; the experiment tag `mlflow.experimentKind` is read only
# where that switch is turned off (3.x releases before it). So the link carries
# workflowType=machine_learning and lands on the runs tab, and the tag is set as well.
# The runs table shows no metric columns until chosen; a shared view (an experiment tag
# `mlflow.sharedViewState.<key>` holding the table state, opened with ?viewStateShareKey=<key>,
# what the UI's own "Share" writes) pre-selects them.
UI_HOST = "127.0.0.1"
UI_PORT = 5000
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # "Machine learning"; the other is genai_development
SHARED_VIEW_KEY = "freqexp"
SHARED_VIEW_TAG = "mlflow.sharedViewState." + SHARED_VIEW_KEY
RUNS_TABLE_METRICS = ("val/auroc", "val/ap", "test/auroc", "test/ap")


def shared_view_state() -> str:
    """The runs-table state behind ui_link: the metric columns freqexp reports, then Duration."""
    import json

    metrics = [f"metrics.`{key}`" for key in RUNS_TABLE_METRICS]
    columns = metrics + ["attributes.`Duration`"]
    return json.dumps({"selectedColumns": columns, "columnOrder": columns}, separators=(",", ":"))


def experiment_ui_tags() -> Dict[str, str]:
    """Experiment tags that make the MLflow UI treat it as model training with metric columns."""
    return {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, SHARED_VIEW_TAG: shared_view_state()}


def mlflow_executable() -> str:
    """The `mlflow` beside this interpreter (the venv's), as an absolute path, so a printed
    command works from any directory without the venv activated."""
    import shutil
    import sys

    beside = Path(sys.executable).absolute().parent / "mlflow"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("mlflow")
    return str(Path(found).absolute()) if found else f"{sys.executable} -m mlflow"


def _absolute_sqlite(uri: str) -> str:
    path = sqlite_path(uri)
    return uri if path is None else "sqlite:///" + str(path)


def ui_command(uri: str, port: int = UI_PORT) -> str:
    """The shell command that serves the MLflow UI over `uri` (what `make ui` runs), with the
    venv's mlflow by absolute path. An http(s) tracking URI is a server already: the URI."""
    import shlex

    if uri.startswith(("http://", "https://")):
        return uri
    exe = mlflow_executable()
    exe = exe if " -m " in exe else shlex.quote(exe)
    return (f"{exe} server --backend-store-uri {shlex.quote(_absolute_sqlite(uri))} "
            f"--host {UI_HOST} --port {int(port)} --workers 1")


def ui_base(uri_or_port) -> str:
    """Where the UI answers: an http(s) tracking server itself, else ui_command's host:port."""
    if isinstance(uri_or_port, int):
        return f"http://{UI_HOST}:{uri_or_port}"
    if isinstance(uri_or_port, str) and uri_or_port.startswith(("http://", "https://")):
        return uri_or_port.rstrip("/")
    return f"http://{UI_HOST}:{UI_PORT}"


def ui_link(uri_or_port, experiment_id, columns: bool = True) -> str:
    """The page that opens the experiment on its runs table (not the GenAI overview), with
    freqexp's metric columns shown when `columns` (the experiment has the shared-view tag once
    a Tracker opened it)."""
    query = "workflowType=machine_learning" + (f"&viewStateShareKey={SHARED_VIEW_KEY}" if columns else "")
    return f"{ui_base(uri_or_port)}/#/experiments/{experiment_id}/runs?{query}"


def run_link(uri_or_port, experiment_id, run_id, tab: str = "") -> str:
    """A run's page in the UI; tab: "" (overview), "artifacts", "model-metrics"."""
    tail = f"/{tab}" if tab else ""
    return f"{ui_base(uri_or_port)}/#/experiments/{experiment_id}/runs/{run_id}{tail}?workflowType=machine_learning"


def ui_links(uri: str, port: int = UI_PORT) -> Dict[str, str]:
    """{experiment name: runs-table link} for the active experiments of a sqlite store, read
    with sqlite3 directly (no mlflow import, nothing created when the store is missing)."""
    import sqlite3

    uri = _absolute_sqlite(uri)
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return {}
    path = Path(uri[len("sqlite:///"):])
    if not path.is_file():
        return {}
    try:
        with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5) as db:
            rows = db.execute("SELECT experiment_id, name FROM experiments WHERE lifecycle_stage = 'active' "
                              "ORDER BY experiment_id").fetchall()
            viewed = {exp_id for (exp_id,) in db.execute("SELECT experiment_id FROM experiment_tags WHERE key = ?", (SHARED_VIEW_TAG,))}
    except sqlite3.Error:
        return {}
    return {name: ui_link(int(port), exp_id, columns=exp_id in viewed) for exp_id, name in rows if str(exp_id) != "0" or name != "Default"}


@contextmanager
def store_lock(uri: str):
    """Serialize opening a sqlite store across processes: MLflow creates and migrates the schema
    on first use, and parallel sweep jobs doing that at once corrupt it."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        yield
        return
    import fcntl

    with open(uri[len("sqlite:///"):] + ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def first_sentence(e: BaseException, limit: int = 200) -> str:
    """The opening of an error message, on one line: MLflow's run to a screenful."""
    import re

    text = " ".join(str(e).split()) or type(e).__name__
    text = re.split(r"\. | \[SQL: | \(Background on ", text)[0]  # SQLAlchemy appends the statement and a link
    return text if len(text) <= limit else text[: limit - 1] + "…"


EPOCH_FLUSH_SECONDS = 5.0  # per-epoch curves reach the store at most this long after their epoch


class Tracker:
    def __init__(self, uri: str, experiment: str):
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(uri)
        if self.uri.startswith("sqlite:///"):
            # the store's code is imported before the lock is taken (seconds on a slow host): the lock
            # serializes only the store's creation and migration, not every sweep worker's imports
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        with store_lock(self.uri):  # the client creates (and migrates) the store
            try:
                self.client = MlflowClient(tracking_uri=self.uri)
            except Exception as e:  # noqa: BLE001 - not a database, a schema newer than this MLflow, ...
                raise ConfigError("tracking.uri", f"{self.uri}: the store cannot be opened ({first_sentence(e)})") from None
            self.experiment_id = self._experiment(experiment)
        self.run_id: Optional[str] = None
        self._pending: list = []  # per-epoch metrics not yet written (log_epoch_metrics)
        self._flushed_at = time.monotonic()

    def _artifact_root(self, experiment: str) -> Optional[str]:
        """Beside a local sqlite store, so outputs/ holds the whole record."""
        if self.uri.startswith("sqlite:///") and not self.uri.endswith(":memory:"):
            db = Path(self.uri[len("sqlite:///") :])
            return (db.parent / "artifacts" / experiment).as_uri()
        return None

    def _experiment(self, name: str) -> str:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError("tracking.experiment", f"must be a non-empty name; got {name!r}")
        try:  # the store's first request: a server or database that refuses us is one line naming the key
            exp = self.client.get_experiment_by_name(name)
        except Exception as e:  # noqa: BLE001 - MlflowException, SQLAlchemy and HTTP errors alike
            raise ConfigError("tracking.uri", f"{self.uri}: the store cannot be read ({first_sentence(e)})") from None
        if exp is None:
            try:
                return self.client.create_experiment(name, artifact_location=self._artifact_root(name), tags=experiment_ui_tags())
            except Exception:  # another job of the sweep created it first
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        self._tag_for_ui(exp)
        return exp.experiment_id

    def _tag_for_ui(self, exp) -> None:
        """An experiment made before (or by something else) gets the UI tags too; best effort:
        a store that refuses tags still takes runs."""
        try:
            for key, value in experiment_ui_tags().items():
                if (exp.tags or {}).get(key) != value:
                    self.client.set_experiment_tag(exp.experiment_id, key, value)
        except Exception:
            pass

    def find_finished(self, config_hash: str):
        """The newest FINISHED run of this experiment with this config hash, or None."""
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.config_hash = '{config_hash}' and attributes.status = 'FINISHED'",
                                       max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    def start(self, run_name: str, tags: Mapping[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        """Written now, with any per-epoch metrics still pending, in as few requests as MLflow allows."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items, self._pending = [*self._pending, *(Metric(k, float(v), now, step or 0) for k, v in metrics.items())], []
        self._flushed_at = time.monotonic()
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_epoch_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """A training curve's points (train/*, val_epoch/*): kept and written together at most every
        EPOCH_FLUSH_SECONDS, and by the next log_metrics or flush (a run's end, its failure), so a
        short epoch does not wait for a store write (about 5 ms each on a local sqlite store, a
        round trip to a server) and a long one still shows in the UI within seconds."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if time.monotonic() - self._flushed_at >= EPOCH_FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Writes the per-epoch metrics still pending."""
        if self._pending:
            self.log_metrics({})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_artifacts(self, paths: Iterable[os.PathLike | str], subdir: Optional[str] = None) -> None:
        for p in paths:
            self.client.log_artifact(self.run_id, str(p), artifact_path=subdir)

    def log_datasets(self, datasets: Iterable[Mapping[str, str]]) -> None:
        """MLflow dataset inputs, one per mapping (name, digest, source, profile, context: the
        mlflow.data.context tag), so the runs table's Dataset column says what the run read. Best
        effort: a store without dataset support never fails a run."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(name=d["name"], digest=d["digest"], source_type="local", source=d["source"], profile=d["profile"]),
                               tags=[InputTag("mlflow.data.context", d["context"])]) for d in datasets]
        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except Exception as e:  # noqa: BLE001 - bookkeeping, not the experiment
            import logging

            logging.getLogger("freqexp").warning("could not log the dataset as an MLflow input: %s", first_sentence(e))

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
