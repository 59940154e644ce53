"""What pruning saves: the same Optuna search (the `optuna` preset's space: learning rate, loss,
SSIM weight; same sampler seed, same number of trials) on Fashion-MNIST class 0 with a small
training cap, once without pruning and once with the `optuna_pruned` preset's pruner
(successive halving), in one script run. Prints total epochs trained, wall time, the best
val/auroc found and that trial's test/auroc, and the ratios.

    .venv/bin/python benchmarks/pruning.py [--trials 32] [--epochs 27] [--limit-train 1000] [--keep DIR] [ARGS...]

Extra ARGS are overrides for both searches (e.g. sweep.pruner.name=hyperband, model=ae).
Goal: at least 3x fewer epochs for a best val/auroc within 0.005 of the unpruned search."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def search(work: Path, name: str, preset: str, args, extra) -> dict:
    import warnings

    import mlflow
    import optuna

    warnings.filterwarnings("ignore", category=FutureWarning)  # the sweeper's stored (Log)UniformDistribution

    store = f"sqlite:///{work / (name + '.db')}"
    storage = f"sqlite:///{work / 'optuna.db'}"
    cmd = [sys.executable, "-m", "freqexp", "-m", f"+sweep={preset}", "dataset=fashion_mnist", "dataset.normal_class=0",
           f"dataset.limit_train={args.limit_train}", f"trainer.max_epochs={args.epochs}", "trainer.progress_bar=false",
           "tracking.figures=none", f"hydra.sweeper.n_trials={args.trials}", f"hydra.sweeper.study_name={name}",
           f"hydra.sweeper.storage={storage}", f"hydra.sweeper.sampler.seed={args.seed}", f"tracking.uri={store}",
           f"hydra.sweep.dir={work / name}", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{name} search failed:\n{r.stderr[-3000:]}")
    study = optuna.load_study(study_name=name, storage=storage)
    epochs = 0
    for t in study.trials:  # a trial reports after each epoch it trained (steps 0, 1, ...)
        epochs += len(t.intermediate_values)
    best = study.best_trial
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'FINISHED'")
    match = runs[(runs["metrics.val/auroc"] - best.value).abs() < 1e-9]
    states = [t.state.name for t in study.trials]
    return {"name": name, "epochs": epochs, "wall": wall, "best_val": best.value,
            "test": float(match["metrics.test/auroc"].iloc[0]) if len(match) else float("nan"),
            "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"), "failed": states.count("FAIL")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=27)
    ap.add_argument("--limit-train", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="the TPE sampler's seed (the same for both searches)")
    ap.add_argument("--keep", type=Path, help="keep the searches' stores (MLflow, Optuna) in this folder")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="freqexp-pruning-") as tmp:
        work = Path(tmp) if args.keep is None else args.keep.resolve()
        work.mkdir(parents=True, exist_ok=True)
        plain = search(work, "unpruned", "optuna", args, args.overrides)
        pruned = search(work, "pruned", "optuna_pruned", args, args.overrides)
    print(f"Optuna TPE (seed {args.seed}), {args.trials} trials x up to {args.epochs} epochs, Fashion-MNIST class 0, "
          f"{args.limit_train} training images{', ' + ' '.join(args.overrides) if args.overrides else ''}")
    print(f"| search | trials complete / pruned / failed | epochs trained | wall time | best val/auroc | its test/auroc |")
    print("|---|---|---|---|---|---|")
    for r in (plain, pruned):
        print(f"| {r['name']} | {r['complete']} / {r['pruned']} / {r['failed']} | {r['epochs']} | {r['wall']:.0f} s | "
              f"{r['best_val']:.4f} | {r['test']:.4f} |")
    print(f"epochs: {plain['epochs'] / max(pruned['epochs'], 1):.2f}x fewer with pruning (goal >= 3x); "
          f"wall time: {plain['wall'] / pruned['wall']:.2f}x; best val/auroc difference {pruned['best_val'] - plain['best_val']:+.4f} "
          f"(goal within 0.005)")


if __name__ == "__main__":
    main()
