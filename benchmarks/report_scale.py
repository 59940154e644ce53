"""How long `python -m freqexp.report` takes on a large store.

    .venv/bin/python benchmarks/report_scale.py [--runs 3000]

Fills a fresh sqlite store with N finished runs shaped like a sweep's (about 60 params and 12
metrics each: model x loss x filter x seed), then times the report end to end (search, group,
leaderboard files, heatmaps) in this process and prints runs/s."""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from freqexp.report import main as report


def fill(uri: str, n: int) -> float:
    client = MlflowClient(uri)
    exp = client.create_experiment("scale")
    grid = itertools.cycle(itertools.product(["ae", "cae", "cvae", "vae"], ["mse", "mse+ssim", "charbonnier", "l1+tv"],
                                             ["none", "bhpf", "ghpf"], range(5)))
    t0 = time.perf_counter()
    for i, (model, loss, filt, seed) in zip(range(n), grid):
        run = client.create_run(exp, tags={"sweep_id": "scale"})
        params = {"model.name": model, "loss.spec": loss, "filter.name": filt, "seed": str(seed)}
        params.update({f"trainer.p{j}": str(j) for j in range(56)})
        metrics = {"val/auroc": 0.5 + (hash((model, loss, filt)) % 100) / 250 + seed / 1000, "test/auroc": 0.7, "val/ap": 0.6,
                   "test/ap": 0.9, "test/f1": 0.9, "test/balanced_acc": 0.8, "train/throughput": 2000.0, "test/throughput": 4000.0}
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                         metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
        client.set_terminated(run.info.run_id, "FINISHED")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        uri = f"sqlite:///{Path(d) / 'scale.db'}"
        fill_s = fill(uri, args.runs)
        t0 = time.perf_counter()
        report(["--uri", uri, "--out", str(Path(d) / "report"), "--top", "3"])
        seconds = time.perf_counter() - t0
    print(f"\n{args.runs} runs written in {fill_s:.1f} s; report in {seconds:.2f} s ({args.runs / seconds:,.0f} runs/s)")


if __name__ == "__main__":
    main()
