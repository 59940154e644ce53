"""Fixed cost per sweep job, on tiny synthetic jobs (so the fixed cost dominates): 12 separate
single runs, then one 12-job and one 24-job `--multirun` grid (3 models x 4 losses, x 2 seeds).

    .venv/bin/python benchmarks/sweep_overhead.py [--profile] [ARGS...]

Prints wall times and the time spent training (from each job's metrics.json), and from them:
the fixed cost of a single run (wall - training, per run), the fixed cost per job inside a sweep
(the slope: what 12 more jobs add beyond their training, / 12) and the sweep's one-time cost
(start-up, imports, store, leaderboard, the best runs' figures). Goal: <= 0.5 s per job inside
a sweep on 2 CPU cores. Extra ARGS go to every run (e.g. tracking.figures=all to draw every
job's figures). --profile also runs the 12-job grid under cProfile and prints where it goes."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMON = ["dataset=synthetic", "dataset.n_train=64", "dataset.n_val=32", "dataset.n_test=32", "trainer.max_epochs=1",
          "trainer.progress_bar=false"]
MODELS, LOSSES = ["ae", "cae", "cvae"], ["mse", "l1", "mse+ssim", "charbonnier"]


def freqexp(args, cwd) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "freqexp", *args], cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t0


def compute_seconds(root: Path) -> float:
    """Training seconds of the runs under root (each job's own metrics.json, not the MLflow artifact copies)."""
    total = 0.0
    for f in root.glob("outputs/**/metrics.json"):
        if "artifacts" not in f.parts:
            total += json.loads(f.read_text())["train/seconds"]
    return total


PHASES = [  # (file, functions, label): where a grid job's time goes
    ("freqexp/run.py", ("execute",), "a job (freqexp.run.execute)"),
    ("lightning/pytorch/trainer/trainer.py", ("fit",), "  training (Lightning fit)"),
    ("freqexp/evaluate.py", ("evaluate",), "  evaluation"),
    ("freqexp/multirun/figures.py", ("figure_data", "save"), "  figure data (figures.npz)"),
    ("freqexp/multirun/figures.py", ("draw",), "  drawing figures"),
    ("freqexp/tracking.py", ("__init__", "find_finished", "start", "log_params", "log_metrics", "set_tags", "log_artifacts", "end"),
     "  MLflow calls"),
    ("hydra/_internal/config_loader_impl.py", ("load_sweep_config",), "composing job configs"),
    ("freqexp/overrides.py", ("check",), "checking the command line"),
    ("freqexp/multirun/sweep.py", ("on_multirun_end",), "sweep end (leaderboard, best runs' figures)"),
]


def profile(extra) -> None:
    """The grid under cProfile: cumulative seconds of the calls a job's fixed cost is made of."""
    import pstats

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "grid.prof"
        subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), "-m", "freqexp", "--multirun", *COMMON, *extra,
                        f"model={','.join(MODELS)}", f"loss={','.join(LOSSES)}"], cwd=d, check=True, capture_output=True)
        stats = pstats.Stats(str(out))
    totals = {label: 0.0 for _, _, label in PHASES}
    for (file, _, func), row in stats.stats.items():
        for suffix, names, label in PHASES:
            if file.endswith(suffix) and func in names:
                totals[label] += row[3]  # cumulative seconds
    n = len(MODELS) * len(LOSSES)
    print(f"cProfile of the {n}-job grid (seconds under the profiler, which slows Python code; per job):")
    for label, seconds in totals.items():
        print(f"  {label:<46} {seconds / n:6.2f}")


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", action="store_true", help="also profile the grid and print where a job's time goes")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    extra = args.overrides
    grid = [f"model={','.join(MODELS)}", f"loss={','.join(LOSSES)}"]
    n = len(MODELS) * len(LOSSES)
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2, tempfile.TemporaryDirectory() as d3:
        singles = 0.0
        for model in MODELS:
            for loss in LOSSES:
                singles += freqexp([*COMMON, *extra, f"model={model}", f"loss={loss}"], d1)
        wall_n = freqexp(["--multirun", *COMMON, *extra, *grid], d2)
        wall_2n = freqexp(["--multirun", *COMMON, *extra, *grid, "seed=0,1"], d3)
        c1, c_n, c_2n = compute_seconds(Path(d1)), compute_seconds(Path(d2)), compute_seconds(Path(d3))
    per_job = ((wall_2n - c_2n) - (wall_n - c_n)) / n
    print(f"tiny synthetic jobs, 2 CPU cores{', ' + ' '.join(extra) if extra else ''}")
    print(f"{n} single runs  : wall {singles:6.1f} s, training {c1:5.1f} s -> fixed cost {(singles - c1) / n:5.2f} s per run")
    print(f"{n}-job grid     : wall {wall_n:6.1f} s, training {c_n:5.1f} s")
    print(f"{2 * n}-job grid     : wall {wall_2n:6.1f} s, training {c_2n:5.1f} s")
    print(f"fixed cost per job inside a sweep: {per_job:5.2f} s (goal <= 0.5 s); one-time cost of a sweep: "
          f"{(wall_n - c_n) - n * per_job:5.1f} s; a {n}-job grid takes {wall_n / singles:.3f} of the time of {n} single runs")
    if args.profile:
        profile(extra)


if __name__ == "__main__":
    main()
