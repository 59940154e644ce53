"""Sweep bookkeeping: a Hydra callback that, when a multirun ends, lists finished and failed
jobs (from each job's status file) and writes sweep_summary.json in the sweep directory."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

STATUS_FILE = "job_status.json"  # written by freqexp.run.task
log = logging.getLogger("freqexp")


def collect(sweep_dir: Path) -> list[dict]:
    jobs = []
    for status in sorted(sweep_dir.glob(f"*/{STATUS_FILE}"), key=lambda p: (len(p.parent.name), p.parent.name)):
        entry = json.loads(status.read_text())
        entry["job_dir"] = str(status.parent)
        jobs.append(entry)
    return jobs


def render(jobs: list[dict], sweep_dir: Path) -> str:
    finished = [j for j in jobs if j["status"] == "finished"]
    failed = [j for j in jobs if j["status"] != "finished"]
    lines = [f"freqexp sweep: {len(finished)} finished, {len(failed)} failed ({sweep_dir})"]
    for j in sorted(finished, key=lambda j: -float(j.get("objective") or 0)):
        lines.append(f"  ok      val/auroc {float(j['objective']):.4f}  {j['overrides']}")
    for j in failed:
        lines.append(f"  FAILED  {j['overrides']}: {j.get('error', '?')}")
    return "\n".join(lines)


def ensure_sqlite_parent(uri) -> None:
    """sqlite cannot create the folder of its database file; do it (Optuna's study storage)."""
    if isinstance(uri, str) and uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        path.parent.mkdir(parents=True, exist_ok=True)


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        ensure_sqlite_parent(config.hydra.sweeper.get("storage"))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = collect(sweep_dir)
        if not jobs:
            return
        (sweep_dir / "sweep_summary.json").write_text(json.dumps(jobs, indent=2))
        print(render(jobs, sweep_dir), flush=True)
        if all(j["status"] != "finished" for j in jobs):
            sys.exit(1)
