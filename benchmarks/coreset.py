"""Memory-bank size against cost and accuracy: patchcore, wedge and patchcore_dwt on Fashion-MNIST
(normal class 0 by default) with banks of 100 %, 10 % and 1 % of the training patches, chosen by
each model's own coreset (PatchCore's approximate greedy, WEDGE-Net's exact greedy) and at
random, plus the knn and pca pixel baselines for scale.

    .venv/bin/python benchmarks/coreset.py [--limit-train 1000] [--limit-test 1000]
        [--ratios 1.0 0.1 0.01] [--threads N] [ARGS...]

Extra ARGS are config overrides applied to every memory-bank model (e.g. hardware=gpu
model.backbone.weights=/path/resnet18.pth model.input_size=64). Each model's training
features are extracted once; every bank is built from them, so fit time = that extraction
(shared) + the bank's own selection. Inference images/s covers the whole anomaly_map (backbone
+ nearest-neighbour search + upsampling) over the test images. AUROC is on the (limited) test
split with each model's published image score (score.reduction=auto) and with the mean of the
map. Ratios are
against the 100 % bank of the same model, measured in this process. The models run as
configured (model.precision: auto by default); benchmarks/memory_bank_speed.py compares that
fast path with the code before it, at 224 px.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import freqexp  # noqa: F401
from freqexp.data import build_dataset
from freqexp.metrics import reduce_map, roc_auc
from freqexp.overrides import compose_config
from freqexp.timing import wait_for_device
from freqexp.training import to_unit_float
from freqexp.validate import make_plan


def batches(images, size, device):
    for i in range(0, len(images), size):
        yield to_unit_float(images[i : i + size].to(device))


def score(model, test, batch_size, device):
    """(images/s, AUROC with the published score, AUROC with the map's mean) over the test split."""
    wait_for_device(device)
    t0 = time.perf_counter()
    maps, scores = [], []
    for x in batches(test.images, batch_size, device):
        m, s = model.score(x)
        maps.append(m.cpu())
        scores.append(s.cpu())
    wait_for_device(device)
    seconds = time.perf_counter() - t0
    labels = test.labels.cpu()
    return len(test.images) / seconds, roc_auc(torch.cat(scores), labels), roc_auc(reduce_map(torch.cat(maps), "mean"), labels)


def observe_all(model, train, batch_size, device) -> float:
    wait_for_device(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in batches(train.images, batch_size, device):
            model.observe(x)
    wait_for_device(device)
    return time.perf_counter() - t0


def bench_memory_bank(name, args, common):
    cfg = compose_config([f"model={name}", *common])
    plan = make_plan(cfg)
    device = plan.hardware.device
    model = plan.model.to(device).eval()
    data = build_dataset(cfg.dataset)
    extract_s = observe_all(model, data.train, args.batch_size, device)
    features = list(model._observed)  # reused for every bank
    rows = []
    own = model.sampling  # the model's coreset (PatchCore: approximate_greedy, WEDGE-Net: greedy)
    settings = [(1.0, "all")] + [(r, s) for r in args.ratios if r < 1.0 for s in (own, "random")]
    for ratio, sampling in settings:
        model.sampling_ratio, model.sampling = ratio, (own if sampling == "all" else sampling)
        model._observed = list(features)
        wait_for_device(device)
        t0 = time.perf_counter()
        model.finalize()
        wait_for_device(device)
        select_s = time.perf_counter() - t0
        ips, auc_max, auc_mean = score(model, data.test, args.batch_size, device)
        rows.append(dict(model=name, ratio=ratio, sampling=sampling, bank=model.memory_bank.shape[0], fit=extract_s + select_s,
                         ips=ips, auc_max=auc_max, auc_mean=auc_mean))
    return rows, data


def bench_baseline(name, args, common, data):
    cfg = compose_config([f"model={name}", *common])
    plan = make_plan(cfg)
    device = plan.hardware.device
    model = plan.model.to(device).eval()
    fit_s = observe_all(model, data.train, args.batch_size, device)
    wait_for_device(device)
    t0 = time.perf_counter()
    model.finalize()
    wait_for_device(device)
    fit_s += time.perf_counter() - t0
    ips, auc_max, auc_mean = score(model, data.test, args.batch_size, device)
    bank = model.bank.shape[0] if hasattr(model, "bank") else model.components.shape[0]
    return dict(model=name, ratio=float("nan"), sampling="-", bank=bank, fit=fit_s, ips=ips, auc_max=auc_max, auc_mean=auc_mean)


def print_table(rows, file=None):
    head = f"{'model':13} {'ratio':>6} {'sampling':18} {'bank':>7} {'fit s':>7} {'img/s':>8} {'AUROC auto':>10} {'AUROC mean':>10} | {'fit x':>6} {'bank x':>7} {'speed x':>7} {'dAUROC auto':>11}"
    print(head, file=file)
    print("-" * len(head), file=file)
    full = {r["model"]: r for r in rows if r["ratio"] == 1.0}
    for r in rows:
        ref = full.get(r["model"])
        rel = (f"{r['fit'] / ref['fit']:6.2f} {r['bank'] / ref['bank']:7.3f} {r['ips'] / ref['ips']:7.2f} {r['auc_max'] - ref['auc_max']:+11.4f}"
               if ref else f"{'':6} {'':7} {'':7} {'':11}")
        ratio = "-" if r["ratio"] != r["ratio"] else f"{r['ratio']:.2f}"
        print(f"{r['model']:13} {ratio:>6} {r['sampling']:18} {r['bank']:7d} {r['fit']:7.1f} {r['ips']:8.0f} {r['auc_max']:10.4f} {r['auc_mean']:10.4f} | {rel}", file=file, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit-train", type=int, default=1000, help="training images (dataset.limit_train)")
    p.add_argument("--limit-test", type=int, default=1000, help="test images, stratified (dataset.limit_test)")
    p.add_argument("--normal-class", type=int, default=0)
    p.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.1, 0.01])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--models", nargs="+", default=["patchcore", "wedge", "patchcore_dwt"])
    p.add_argument("--no-baselines", action="store_true", help="skip the knn and pca rows")
    args, extra = p.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    common = ["dataset=fashion_mnist", f"dataset.normal_class={args.normal_class}", f"dataset.limit_train={args.limit_train}",
              f"dataset.limit_test={args.limit_test}"]
    rows, data = [], None
    for name in args.models:
        model_rows, data = bench_memory_bank(name, args, common + extra)
        rows += model_rows
        print_table(model_rows, file=sys.stderr)  # progress, as each model ends
    if not args.no_baselines:
        data = data or build_dataset(compose_config(common).dataset)
        rows += [bench_baseline(name, args, common, data) for name in ("knn", "pca")]
    print(f"Fashion-MNIST normal class {args.normal_class}: {len(data.train)} train / {len(data.test)} test images "
          f"({data.test.n_anomalous} anomalous), torch threads {torch.get_num_threads()}, overrides {' '.join(extra) or '-'}")
    print_table(rows)


if __name__ == "__main__":
    main()
