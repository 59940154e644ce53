"""Where the wall time of one `python -m freqexp` run goes, beyond its training.

    .venv/bin/python benchmarks/run_breakdown.py [--runs 2] [ARGS...]

Runs the default experiment (plus ARGS, e.g. hardware=gpu or trainer.max_epochs=5) as a user
does, `python -m freqexp`, each time in a fresh process, from one temporary folder with its own
MLflow store (run 1 creates the store, later runs open it, as a user's second run does), and
prints: the process's start-up (interpreter and the entry
point's imports), the command-line check and Hydra composition (with the run's own imports),
every phase of the run that freqexp.timing records (freqexp/run.py: plan, store, data,
run_start, setup, fit, evaluate, artifacts, figures, run_end), and the process's exit.
"besides" is everything but the fit (training with its per-epoch validation). Goal: wall <=
fit + 5 s. Run 1 also pays what happens once (the store's creation and schema migrations, a
dataset's first decoding): it is printed beside the medians, which are over the later runs.

--baseline-env KEY=VALUE also runs the same command with that environment variable set (e.g.
FREQEXP_STORE_PROCESS=0: the store opened in the run's own process, as before freqexp.store_process),
alternating with the runs as they are, in the same folder and store, and prints both columns and
the ratio of their walls and of what each spends besides the fit.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = ["start-up (interpreter, entry imports)", "check + compose (+ run imports)", "plan", "store", "data", "run_start", "setup",
         "fit", "evaluate", "artifacts", "figures", "run_end", "exit"]


def one_run(args, work: Path, env=None) -> dict:
    store = f"sqlite:///{work / 'mlflow.db'}"
    for old in work.glob("outputs/runs/**/timing.json"):
        old.unlink()
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "freqexp", "trainer.progress_bar=false", f"tracking.uri={store}", *args],
                          cwd=work, capture_output=True, text=True, env={**os.environ, **(env or {})})
    t_end = time.time()
    if proc.returncode != 0:
        sys.exit(f"run_breakdown: the run failed:\n{proc.stderr[-2000:]}")
    timing = json.loads(next(p for p in work.glob("outputs/runs/**/timing.json")).read_text())
    marks, phases = timing["marks"], timing["phases"]
    row = {"start-up (interpreter, entry imports)": marks["main"] - t0, "check + compose (+ run imports)": marks["run_start"] - marks["main"]}
    row.update({k: phases.get(k, 0.0) for k in STEPS[2:-1]})
    row["exit"] = t_end - marks["run_end"]
    row["wall"] = t_end - t0
    return row


def medians(rows: list) -> dict:
    later = rows[1:] or rows
    return {k: statistics.median(r[k] for r in later) for k in rows[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--baseline-env", metavar="KEY=VALUE", help="also run with this environment variable, alternating")
    args, extra = p.parse_known_args()
    baseline = dict([args.baseline_env.split("=", 1)]) if args.baseline_env else None
    rows, base_rows = [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.runs):
            for env, out in ((None, rows), (baseline, base_rows)) if baseline else ((None, rows),):
                out.append(one_run(extra, Path(d), env))
                label = f" ({args.baseline_env})" if env else ""
                print(f"run {i + 1}{label}: wall {out[-1]['wall']:.1f} s, fit {out[-1]['fit']:.1f} s", file=sys.stderr, flush=True)
    med = medians(rows)
    which = "1" if len(rows) == 1 else "2" if len(rows) == 2 else f"2-{len(rows)}"
    print(f"python -m freqexp {' '.join(extra)}: {args.runs} runs, each a new process, one store; seconds (median of run(s) {which};"
          f" run 1, which created the store, beside it)")
    base = medians(base_rows) if baseline else None
    if base:
        print(f"baseline: the same with {args.baseline_env}, alternating (its run 1 opened the store run 1 created)")
    print(f"{'step':42} {'median':>8} {'run 1':>8}" + (f" {'baseline':>9}" if base else ""))
    for k in STEPS + ["wall"]:
        print(f"{k:42} {med[k]:8.2f} {rows[0][k]:8.2f}" + (f" {base[k]:9.2f}" if base else ""))
    besides = med["wall"] - med["fit"]
    print(f"besides the fit: {besides:.2f} s (goal <= 5 s; {'met' if besides <= 5 else 'not met'}); the fit is {med['fit'] / med['wall']:.0%} of the wall")
    if base:
        base_besides = base["wall"] - base["fit"]
        print(f"baseline ({args.baseline_env}): besides the fit {base_besides:.2f} s; ratio as is / baseline: wall "
              f"{med['wall'] / base['wall']:.3f}, besides the fit {besides / base_besides:.3f} ({besides - base_besides:+.2f} s)")


if __name__ == "__main__":
    main()
