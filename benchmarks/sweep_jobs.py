"""Jobs per hour of a grid, and what each job costs beyond its training, at several packings.

    .venv/bin/python benchmarks/sweep_jobs.py [--packings 1 4 8] [--classes 0,1,2,3] [--epochs 10] [ARGS...]

Runs the same grid (ae, cae, vae x the given Fashion-MNIST normal classes) once per packing: on a
GPU machine (ARGS hardware=gpu) with `sweep.jobs_per_device=K`, else with `sweep.workers=K`
processes. Each job writes timing.json (freqexp.timing); from them, per packing: the wall time,
jobs per hour, the mean fit (training with per-epoch validation) per job, and the steady-state
cost of a job beyond its fit: for every job after the first in its worker process, the time from
the end of the previous job to its own end, minus its fit (the launcher's work between jobs, the
store, data, evaluation, figures and artifacts). A worker's first job also pays the process's
start (imports, CUDA context): reported apart, as the one-time cost. Goal on a GPU: <= 1 s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def run_grid(packing: int, args, extra, gpu: bool) -> dict:
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        cmd = [sys.executable, "-m", "freqexp", "--multirun", "model=ae,cae,vae", f"dataset.normal_class={args.classes}",
               f"trainer.max_epochs={args.epochs}", "trainer.progress_bar=false", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
               f"sweep.jobs_per_device={packing}" if gpu else f"sweep.workers={packing}", *extra]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        wall = time.time() - t0
        if proc.returncode != 0:
            sys.exit(f"sweep_jobs: the grid failed:\n{proc.stderr[-3000:]}")
        jobs = [json.loads(p.read_text()) for p in work.glob("outputs/multiruns/**/timing.json")]
    by_pid = defaultdict(list)
    for j in jobs:
        by_pid[j["pid"]].append(j)
    steady, first, parts = [], [], defaultdict(list)
    for runs in by_pid.values():
        runs.sort(key=lambda j: j["marks"]["run_start"])
        first.append(runs[0]["marks"]["run_end"] - t0 - runs[0]["phases"]["fit"])
        for prev, job in zip(runs, runs[1:]):
            steady.append(job["marks"]["run_end"] - prev["marks"]["run_end"] - job["phases"]["fit"])
            parts["between jobs"].append(job["marks"]["run_start"] - prev["marks"]["run_end"])
            for name, seconds in job["phases"].items():
                if name != "fit":
                    parts[name].append(seconds)
    fits = [j["phases"]["fit"] for j in jobs]
    return {"packing": packing, "jobs": len(jobs), "workers": len(by_pid), "wall": wall, "per_hour": len(jobs) / wall * 3600,
            "fit": statistics.mean(fits), "steady": statistics.median(steady) if steady else float("nan"),
            "steady_max": max(steady) if steady else float("nan"), "first": statistics.median(first),
            "parts": {k: statistics.median(v) for k, v in parts.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--packings", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--classes", default="0,1,2,3", help="dataset.normal_class values of the grid")
    p.add_argument("--epochs", type=int, default=10)
    args, extra = p.parse_known_args()
    gpu = any(a in ("hardware=gpu", "hardware.accelerator=gpu") for a in extra)
    rows = []
    for k in args.packings:
        rows.append(run_grid(k, args, extra, gpu))
        r = rows[-1]
        print(f"packing {k}: {r['jobs']} jobs in {r['wall']:.1f} s", file=sys.stderr, flush=True)
    what = "jobs_per_device" if gpu else "workers"
    print(f"grid: model=ae,cae,vae x dataset.normal_class={args.classes}, {args.epochs} epochs, {' '.join(extra) or 'CPU'}")
    print(f"{what:>15} {'jobs':>5} {'procs':>5} {'wall s':>8} {'jobs/h':>8} {'fit s/job':>9} {'beyond fit, steady s/job':>25} "
          f"{'first job beyond fit s':>22}")
    for r in rows:
        print(f"{r['packing']:>15} {r['jobs']:>5} {r['workers']:>5} {r['wall']:8.1f} {r['per_hour']:8.0f} {r['fit']:9.2f} "
              f"{r['steady']:17.2f} (max {r['steady_max']:.2f}) {r['first']:22.2f}")
    for r in rows:
        if r["parts"]:
            print(f"{what}={r['packing']}, a steady-state job beyond its fit (medians, s): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["parts"].items(), key=lambda kv: -kv[1])))
    base = rows[0]
    for r in rows[1:]:
        print(f"{what}={r['packing']}: {r['per_hour'] / base['per_hour']:.2f}x the jobs per hour of {what}={base['packing']}")


if __name__ == "__main__":
    main()
