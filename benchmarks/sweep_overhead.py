"""Fixed cost per sweep job: a 12-job grid run as one `--multirun` vs 12 separate single runs,
each on tiny synthetic data so the fixed cost (imports, config composition, MLflow store,
run bookkeeping, figures) dominates.

    .venv/bin/python benchmarks/sweep_overhead.py

Prints wall times, the time spent training + evaluating (from each run's metrics.json), the
fixed cost per job (wall - compute) and the grid/singles ratio. Goal: fixed cost <= 3 s on CPU."""
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
    total = 0.0
    for f in root.glob("outputs/**/metrics.json"):
        m = json.loads(f.read_text())
        total += m["train/seconds"]
    return total


def main():
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        singles = 0.0
        for model in MODELS:
            for loss in LOSSES:
                singles += freqexp([*COMMON, f"model={model}", f"loss={loss}"], d1)
        grid = freqexp(["--multirun", *COMMON, f"model={','.join(MODELS)}", f"loss={','.join(LOSSES)}"], d2)
        n = len(MODELS) * len(LOSSES)
        c1, c2 = compute_seconds(Path(d1)), compute_seconds(Path(d2))
    print(f"{n} jobs on tiny synthetic data (2 CPU cores)")
    print(f"12 single runs : wall {singles:6.1f} s, training {c1:5.1f} s -> fixed cost {(singles - c1) / n:5.2f} s/job")
    print(f"one 12-job grid: wall {grid:6.1f} s, training {c2:5.1f} s -> fixed cost {(grid - c2) / n:5.2f} s/job")
    print(f"grid / singles wall-time ratio: {grid / singles:.3f}   (goal: fixed cost <= 3 s per job)")


if __name__ == "__main__":
    main()
