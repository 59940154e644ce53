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

from freqexp.objective import STATUS_FILE, first_objective, objectives

log = logging.getLogger("freqexp")


def collect(sweep_dir: Path) -> list[dict]:
    jobs = []
    for status in sorted(sweep_dir.glob(f"*/{STATUS_FILE}"), key=lambda p: (len(p.parent.name), p.parent.name)):
        entry = json.loads(status.read_text())
        entry["job_dir"] = str(status.parent)
        jobs.append(entry)
    return jobs


def render(jobs: list[dict], sweep_dir: Path, label: str = "val/auroc") -> str:
    finished = [j for j in jobs if j["status"] == "finished"]
    skipped = [j for j in jobs if j["status"] == "skipped"]
    failed = [j for j in jobs if j["status"] == "failed"]
    pruned = [j for j in jobs if j["status"] == "pruned"]
    lines = [f"freqexp sweep: {len(finished)} finished, {len(failed)} failed, {len(skipped)} skipped (already finished)"
             + (f", {len(pruned)} pruned" if pruned else "") + f" ({sweep_dir})"]
    def first(j):
        value = first_objective(j)
        return value if value is not None else float("-inf")

    for j in sorted(finished + skipped, key=lambda j: -first(j)):
        tag = "ok     " if j["status"] == "finished" else "skipped"
        objective = f"{first(j):.4f}" if first(j) != float("-inf") else "   ?  "
        test = j.get("test_auroc")  # reported beside it (a zero-shot or one-pass run has no validation objective)
        reported = f"  test/auroc {test:.4f}" if isinstance(test, (int, float)) else ""
        lines.append(f"  {tag} {label} {objective}{reported}  {j['overrides']}")
    for j in pruned:
        lines.append(f"  pruned  after epoch {j.get('epoch', '?')}  {j['overrides']}")
    for j in failed:
        lines.append(f"  FAILED  {j['overrides']}: {j.get('error', '?')}")
    return "\n".join(lines)


def ensure_sqlite_parent(uri) -> None:
    """sqlite cannot create the folder of its database file; do it (Optuna's study storage)."""
    from freqexp.tracking import sqlite_path

    path = sqlite_path(uri) if isinstance(uri, str) else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def write_sweep_report(config: DictConfig, jobs: list[dict], sweep_dir: Path) -> None:
    """The leaderboard of the sweep's runs (finished now, or skipped because they finished
    before) in <sweep dir>/report/; with sweep.summary_run=true also one MLflow run per sweep
    (tag kind=sweep_summary) holding it and the job table."""
    import mlflow

    from freqexp.report import write_report
    from freqexp.tracking import Tracker

    run_ids = [j["run_id"] for j in jobs if j.get("run_id") and j["status"] in ("finished", "skipped")]
    tracker = Tracker(config.tracking.uri, config.tracking.experiment)
    files = [sweep_dir / "sweep_summary.json"]
    text = ""
    if run_ids:
        mlflow.set_tracking_uri(tracker.uri)
        ids = ", ".join(f"'{r}'" for r in run_ids)
        df = mlflow.search_runs(experiment_ids=[tracker.experiment_id], filter_string=f"attributes.run_id IN ({ids})")
        report_files, text, _, _ = write_report(df, sweep_dir / "report")
        files += report_files
        print(f"leaderboard: {sweep_dir / 'report' / 'leaderboard.md'}")
    if not config.get("sweep", {}).get("summary_run", False):
        return
    sweep_id = f"{sweep_dir.parent.name}/{sweep_dir.name}"
    counts = {s: sum(j["status"] == s for j in jobs) for s in ("finished", "failed", "skipped", "pruned")}
    tracker.start(f"sweep:{sweep_id}", {"kind": "sweep_summary", "sweep_id": sweep_id, "sweep_dir": str(sweep_dir.resolve()),
                                         "summary": text[:5000]})
    try:
        tracker.log_metrics({f"sweep/{k}": v for k, v in counts.items()})
        tracker.log_artifacts(files)
    finally:
        tracker.end("FINISHED")


def is_freqexp_optuna(config: DictConfig) -> bool:
    target = str(config.hydra.sweeper.get("_target_", ""))
    return target.endswith("freqexp_launch.FreqexpOptunaSweeper")


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from freqexp.errors import ConfigError

        from freqexp.multirun import pruning
        from freqexp.multirun.parallel import plan_workers

        try:  # a bad objective, pruner or worker count would fail every job: say it once, before any starts
            objectives(config)
            plan_workers(config)
            pruning.check(config, optuna_sweep=is_freqexp_optuna(config))
        except ConfigError as e:
            print(f"freqexp: error: {e}", file=sys.stderr)
            sys.exit(2)
        storage = config.hydra.sweeper.get("storage")
        ensure_sqlite_parent(storage)
        try:  # an unreachable study database or tracking server: one line, before any job
            from freqexp.tracking import check_reachable, resolve_uri

            if isinstance(storage, str):
                check_reachable(storage, "hydra.sweeper.storage")
            resolve_uri(config.tracking.uri)
        except ConfigError as e:
            print(f"freqexp: error: {e}", file=sys.stderr)
            sys.exit(2)
        try:  # create the store and experiment once, before parallel jobs race to
            from freqexp.multirun.orphans import reap, say
            from freqexp.tracking import Tracker

            tracker = Tracker(config.tracking.uri, config.tracking.experiment)
            say(reap(tracker.client, [tracker.experiment_id]), tracker.uri)  # runs an earlier sweep left RUNNING when killed
        except Exception as e:  # a bad URI is each job's one-line error; do not fail here
            log.debug("store not prepared: %s", e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = collect(sweep_dir)
        if not jobs:
            return
        (sweep_dir / "sweep_summary.json").write_text(json.dumps(jobs, indent=2))
        objective = config.get("sweep", {}).get("objective", "val/auroc")
        label = objective if isinstance(objective, str) else str(list(objective)[0])
        print(render(jobs, sweep_dir, label), flush=True)
        try:
            write_sweep_report(config, jobs, sweep_dir)
        except Exception as e:  # the jobs' own runs are already safe; say so and go on
            log.warning("could not write the sweep's leaderboard: %s", e)
        try:  # tracking.figures=best (a sweep's default): the best runs' figures, drawn now from their figures.npz
            from freqexp.multirun import figures

            drawn = figures.draw_best(config, jobs)
            saved = sum(j["status"] == "finished" and (Path(j["job_dir"]) / figures.NPZ).exists() for j in jobs)
            if drawn:
                print(f"figures: drawn for the best {len(drawn)} of {saved} run(s); any other: "
                      f"python -m freqexp.figures {Path(jobs[0]['job_dir']).parent}/<job>", flush=True)
        except Exception as e:
            log.warning("could not draw the best runs' figures: %s", e)
        if all(j["status"] == "failed" for j in jobs):  # (pruned jobs are the search working, not failures)
            sys.exit(1)
