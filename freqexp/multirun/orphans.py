"""Runs left RUNNING by a process that died hard (SIGKILL, out of memory, a lost node) are marked
KILLED, with a tag saying why. Each run records where it lives (tags `freqexp.host`,
`freqexp.pid`); a run whose process is gone from that host is an orphan. The next sweep and the
next report on a store do this, and so does

    python -m freqexp.orphans [tracking.uri=URI | --uri URI] [--experiment NAME]

Runs of other hosts are left alone (this machine cannot see their processes): run the command
there. The Optuna side is the study's heartbeat (freqexp.multirun.optuna_sweeper)."""
from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import List, Optional, Sequence

from freqexp.errors import ReportError
from freqexp.timing import started_after_boot
from freqexp.tracking import existing_store, first_sentence

HOST_TAG, PID_TAG = "freqexp.host", "freqexp.pid"


def where_tags() -> dict:
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def process_start(pid: int) -> Optional[float]:
    """When process `pid` started (seconds since the epoch; 0.0 where the system cannot say), or
    None when there is no such process."""
    if os.path.isdir("/proc/self"):
        try:
            after_boot = started_after_boot(pid)
            with open("/proc/stat") as f:
                boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
            return boot + after_boot
        except FileNotFoundError:
            return None
        except (OSError, StopIteration, IndexError, ValueError):
            pass
    try:  # no /proc (macOS): whether it exists, not since when
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return 0.0


def is_alive(pid: int, run_start_ms: int) -> bool:
    """The run's process still runs: a process with its pid exists and started before the run
    (a newer process that reuses the pid is not it)."""
    if pid == os.getpid():
        return True
    started = process_start(pid)
    return started is not None and started <= run_start_ms / 1000 + 5


def reap(client, experiment_ids: Sequence[str]) -> List[str]:
    """Mark this host's RUNNING runs whose process is gone as KILLED; returns their run names."""
    host = socket.gethostname()
    runs = client.search_runs(list(experiment_ids), filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
                              max_results=10000)
    reaped = []
    for run in runs:
        try:
            pid = int(run.data.tags.get(PID_TAG, ""))
        except ValueError:
            continue
        if is_alive(pid, run.info.start_time or 0):
            continue
        reason = f"its process (pid {pid} on {host}) is gone: killed hard (SIGKILL, out of memory) or its machine went down"
        client.set_tag(run.info.run_id, "status", "killed")
        client.set_tag(run.info.run_id, "killed_reason", reason)
        client.set_terminated(run.info.run_id, status="KILLED")
        reaped.append(run.info.run_name or run.info.run_id)
    return reaped


def say(reaped: List[str], where: str) -> None:
    if reaped:
        shown = "; ".join(reaped[:3]) + (f"; +{len(reaped) - 3} more" if len(reaped) > 3 else "")
        print(f"freqexp: {len(reaped)} run(s) in {where} were left RUNNING by a process that is gone; now KILLED "
              f"(tag killed_reason): {shown}", file=sys.stderr)


def reap_store(uri: str, experiment: Optional[str] = None) -> List[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        ids = [exp.experiment_id] if exp else []
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    reaped = reap(client, ids) if ids else []
    say(reaped, uri)
    return reaped


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m freqexp.orphans", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", default="sqlite:///outputs/mlflow.db", help="MLflow tracking URI, or tracking.uri=URI (default: %(default)s)")
    ap.add_argument("--experiment", default=None, help="only this experiment (default: all)")
    ap.add_argument("keys", nargs="*", metavar="tracking.uri=URI")
    args = ap.parse_intermixed_args(argv)
    for item in args.keys:
        key, sep, value = item.partition("=")
        if key == "tracking.uri" and sep:
            args.uri = value
        elif key == "tracking.experiment" and sep:
            args.experiment = value
        else:
            print(f"freqexp.orphans: error: {item!r}: give tracking.uri=URI or tracking.experiment=NAME", file=sys.stderr)
            return 2
    try:
        uri = existing_store(args.uri)
    except ReportError as e:
        print(f"freqexp.orphans: error: {e}", file=sys.stderr)
        return 2
    try:
        reaped = reap_store(uri, args.experiment)
    except Exception as e:  # noqa: BLE001 - not a store, a database that refuses us: one line
        print(f"freqexp.orphans: error: tracking.uri: {uri}: the store cannot be read ({first_sentence(e)})", file=sys.stderr)
        return 2
    print(f"freqexp.orphans: {len(reaped)} orphaned run(s) marked KILLED in {args.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
