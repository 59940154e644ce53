"""What a training curve costs the fit: each epoch's train/* and val_epoch/* values written to the
store as they come (two writes an epoch, as before) against freqexp's buffered curve
(Tracker.log_epoch_metrics: written together at most every EPOCH_FLUSH_SECONDS, and with the run's
final metrics), into one store, the same values, alternating.

    .venv/bin/python benchmarks/epoch_logging.py [--epochs 20] [--repeats 3] [--uri sqlite:///PATH.db]

Prints milliseconds per epoch of each and their difference: what a run of short epochs (a GPU
fit) spends waiting for its store. Default store: a fresh sqlite file in a temporary folder.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from freqexp.tracking import Tracker

TRAIN = ("train/loss", "train/loss_mse", "train/loss_ssim", "train/lr")
VAL = ("val_epoch/auroc", "val_epoch/ap")


def one_run(tracker: Tracker, epochs: int, buffered: bool) -> float:
    """Seconds per epoch of logging a run's curves, its final metrics' write included."""
    tracker.start("buffered" if buffered else "each-epoch", {})
    log = tracker.log_epoch_metrics if buffered else tracker.log_metrics
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        log({k: 1.0 / epoch for k in TRAIN}, epoch)
        log({k: 0.5 + epoch / (4 * epochs) for k in VAL}, epoch)
    tracker.log_metrics({"test/auroc": 0.9}, step=epochs)  # the run's end: carries what is pending
    seconds = time.perf_counter() - t0
    tracker.end("FINISHED")
    points = {k: len(tracker.client.get_metric_history(tracker.run_id, k)) for k in (*TRAIN, *VAL)}
    assert set(points.values()) == {epochs}, points  # every point reached the store either way
    return seconds / epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--uri", default=None)
    args = ap.parse_args()
    uri = args.uri or f"sqlite:///{tempfile.mkdtemp(prefix='freqexp-epoch-logging-')}/mlflow.db"
    tracker = Tracker(uri, "epoch-logging")
    runs: dict = {"each": [], "buffered": []}
    for _ in range(args.repeats):
        runs["each"].append(one_run(tracker, args.epochs, buffered=False))
        runs["buffered"].append(one_run(tracker, args.epochs, buffered=True))
    ms = {k: statistics.median(v) * 1000 for k, v in runs.items()}
    print(f"store {tracker.uri}, {args.epochs} epochs x {args.repeats} runs each, {len(TRAIN)} train and {len(VAL)} val values an epoch")
    for key, label in (("each", "written each epoch (2 writes)"), ("buffered", "buffered (log_epoch_metrics)")):
        print(f"{label:30}: {ms[key]:7.2f} ms/epoch   (runs: {', '.join(f'{v * 1000:.2f}' for v in runs[key])})")
    print(f"saved per epoch: {ms['each'] - ms['buffered']:.2f} ms; per run of {args.epochs} epochs: "
          f"{(ms['each'] - ms['buffered']) * args.epochs / 1000:.3f} s")


if __name__ == "__main__":
    main()
