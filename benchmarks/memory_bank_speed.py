"""Memory-bank detectors at 224 px: the fast path against today's fp32 path, in one process, on
the same data and the same banks.

    python benchmarks/memory_bank_speed.py hardware=gpu --quick          # ~90 s on an H200
    python benchmarks/memory_bank_speed.py --limit-train 20 --limit-test 40 ++model.input_size=64   # a CPU rehearsal
    OMP_NUM_THREADS=2 python benchmarks/memory_bank_speed.py --cpu-defaults      # the CPU goal, several minutes

Model mode (the default): for patchcore and wedge (Fashion-MNIST class 0, 300 train / 500 test
images, the models' own defaults: resize 256 + crop 224, random backbones unless
model.backbone.weights is given), the training features are extracted once; for every bank
(10 %, 1 %, 100 % of the training patches) the bank is selected by the model's coreset (timed:
"coreset s"; today's step-by-step loop is timed on the same features where --legacy-coreset
says, and whether both chose the same rows), then the test split is scored by
  fast   the model as it is now, for each --precisions value (auto: fp32 features, bf16
         shortlisted search re-ranked in fp32; bf16: also the backbone under bf16 autocast),
  today  the code path before this change, kept in this file: the whole batch at once, the
         unfolded PatchCore pipeline, NCHW fp32 convolutions, chunked torch.cdist search,
in batches of --batch-size images (warmed up first). Per row: images/s, the speed-up, AUROC of
each path and the difference, the largest image-score difference relative to the score range
and the largest map difference relative to the map range. A stage breakdown of one fast batch
(backbone / feature pipeline / search / map and score) follows each model.

Search widths (--search-widths 128 256 512 1024 --search-rows 1000 4000 8000 15680 --limit-train 200
--limit-test 10): PatchCore's features of the training and test images, banks of each size drawn at
random from the training patches (default: 10 %), projected at random to each width; the pruned
exact search against the fp32 product on them, best of 3, with the queries it handed back to the
product and whether both found the same rows.

CPU mode (--cpu-defaults): `python -m freqexp model=patchcore` with every default (trainer
batch 256, eval batch 1024, random WideResNet-50-2 at 224 px) on --cpu-train / --cpu-test images
with 2 threads, once per --cpu-precisions value, each in its own process: its peak RSS, fit
seconds, test images/s and AUROC; anomalib's Patchcore on the same setting peaked at 2.7 GB and
scored 3.1 img/s.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import freqexp  # noqa: F401
from freqexp.data import build_dataset
from freqexp.metrics import roc_auc
from freqexp.models.bank_search import nearest_k
from freqexp.models.wedge import guidance_map, minmax_per_image
from freqexp.overrides import compose_config
from freqexp.timing import wait_for_device
from freqexp.training import to_unit_float
from freqexp.validate import make_plan

REPO = Path(__file__).resolve().parents[1]
ANOMALIB = {"peak_rss_gb": 2.7, "img_s": 3.1}  # anomalib Patchcore, 200 train / 500 test, 224 px, 2 threads


# ----------------------------------------------------------------------------- today's path (before this change)
def legacy_nearest_k(queries, bank, k=1, query_chunk=2048, bank_chunk=8192):
    with torch.autocast(queries.device.type, enabled=False):
        queries, bank = queries.float(), bank.float()
        k = min(k, bank.shape[0])
        dists, idxs = [], []
        for q in queries.split(query_chunk):
            best_d = torch.full((q.shape[0], 0), float("inf"), device=q.device)
            best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
            for offset in range(0, bank.shape[0], bank_chunk):
                b = bank[offset : offset + bank_chunk]
                d, i = torch.cdist(q, b).topk(min(k, b.shape[0]), dim=1, largest=False)
                keep = min(k, best_d.shape[1] + d.shape[1])
                best_d, order = torch.cat([best_d, d], 1).topk(keep, dim=1, largest=False)
                best_i = torch.cat([best_i, i + offset], 1).gather(1, order)
            dists.append(best_d)
            idxs.append(best_i)
        return torch.cat(dists), torch.cat(idxs)


def legacy_reweighted_max(dist, index, features, bank, b):
    s_star, worst = dist.max(1)
    if b <= 1 or bank.shape[0] < 2:
        return s_star
    rows = torch.arange(dist.shape[0], device=dist.device)
    m_test = features[rows, worst].float()
    m_star = bank[index[rows, worst]].float()
    _, support = legacy_nearest_k(m_star, bank, b)
    d_support = (m_test[:, None, :] - bank[support].float()).norm(dim=-1)
    d_star = (m_test - m_star).norm(dim=-1)
    return (1 - torch.exp(d_star - torch.logsumexp(d_support, dim=1))) * s_star


def legacy_patchcore_features(model, maps, grid):
    k, pad = model.patch_size, model.patch_size // 2
    per_layer = []
    for name in model.layers:
        f = maps[name]
        b, c, h, w = f.shape
        u = F.unfold(f, k, padding=pad).view(b, c * k * k, h, w)
        if (h, w) != tuple(grid):
            u = F.interpolate(u, size=tuple(grid), mode="bilinear", align_corners=False)
        per_layer.append(F.adaptive_avg_pool1d(u.permute(0, 2, 3, 1).reshape(-1, 1, c * k * k), model.pretrain_dim))
    out = F.adaptive_avg_pool1d(torch.cat(per_layer, dim=2), model.feature_dim).squeeze(1)
    return out.view(maps[model.layers[0]].shape[0], grid[0], grid[1], model.feature_dim).permute(0, 3, 1, 2)


class Legacy:
    """Today's scoring of a fitted model: its bank and weights, the code before this change."""

    def __init__(self, model):
        self.model = model
        self.net = copy.deepcopy(model.extractor.net).to(memory_format=torch.contiguous_format)  # NCHW, as before

    @torch.no_grad()
    def features(self, x):
        m = self.model
        with torch.autocast(x.device.type, enabled=False):
            normalised = m.extractor.prepare_input(x.float())
            if m.__class__.__name__ == "WedgeNet":
                maps = self.net.features(normalised, ["layer2", "layer3"])
                f2, f3 = maps["layer2"], maps["layer3"]
                grid = tuple(f2.shape[-2:])
                f3 = F.interpolate(f3, size=grid, mode="bilinear", align_corners=False)
                guide = F.interpolate(guidance_map(normalised, m.dwt_kernels, m.wavelet), size=grid, mode="bilinear", align_corners=False)
                freq = m.freq_encoder(guide)
                parts = [F.normalize(f2 * (1 + torch.sigmoid(freq)), dim=1), F.normalize(f3 * (1 + torch.sigmoid(m.proj_to_f3(freq))), dim=1)]
                if m.use_semantic:
                    parts.append(F.normalize(f2, dim=1) * minmax_per_image(f2.abs().mean(1, keepdim=True)) * 2.0)
                feats = F.avg_pool2d(torch.cat(parts, 1), 3, stride=1, padding=1)
            else:
                maps = self.net.features(normalised, m.layers)
                feats = legacy_patchcore_features(m, maps, maps[m.layers[0]].shape[-2:])
            return feats.float().permute(0, 2, 3, 1)

    @torch.no_grad()
    def score(self, x):
        m = self.model
        with torch.autocast(x.device.type, enabled=False):
            features = self.features(x)
            b, h, w, d = features.shape
            dist, index = legacy_nearest_k(features.reshape(-1, d), m.memory_bank, 1)
            if m.__class__.__name__ == "WedgeNet":
                patch = dist.view(b, 1, h, w)
                size = m.extractor.backbone_size(x.shape[-2:])
                smoothed = m_gauss(F.interpolate(patch, size=size, mode="bilinear", align_corners=False), m.smooth_sigma)
                return m.extractor.to_image_frame(smoothed, x.shape[-2:]), smoothed.flatten(1).amax(1)
            dist, index = dist.view(b, h * w), index.view(b, h * w)
            maps = m.patch_map(dist.view(b, 1, h, w), x.shape[-2:])
            return maps, legacy_reweighted_max(dist, index, features.reshape(b, h * w, d), m.memory_bank, m.reweight_neighbours)


def m_gauss(maps, sigma):
    from freqexp.models.memory_bank import gaussian_filter

    return gaussian_filter(maps, sigma)


def legacy_coreset(model, features):
    """Today's selection loop (step by step, fp32) for the model's sampling, on the same features."""
    import math

    n, k = features.shape[0], model.bank_size(features.shape[0])
    features = features.float()
    gen = torch.Generator().manual_seed(model.sampling_seed)

    def cover(feats, sq, idx, min_dist):
        center = feats.index_select(0, idx).squeeze(0)
        dist = torch.addmv(sq, feats, center, alpha=-2.0).add_(sq.index_select(0, idx)).clamp_min_(0)
        torch.minimum(min_dist, dist, out=min_dist)
        min_dist.index_fill_(0, idx, 0.0)

    chosen = torch.empty(k, dtype=torch.long, device=features.device)
    if model.sampling == "greedy":
        sq = features.pow(2).sum(1)
        min_dist = torch.full((n,), float("inf"), device=features.device)
        idx = torch.tensor([0], device=features.device)
        for i in range(k):
            chosen[i : i + 1] = idx
            cover(features, sq, idx, min_dist)
            idx = torch.argmax(min_dist).view(1)
        return chosen
    dim = features.shape[1]
    if model.projection_dim is not None and model.projection_dim < dim:
        bound = 1 / math.sqrt(dim)
        projection = (torch.rand(dim, model.projection_dim, generator=gen) * 2 - 1).mul_(bound).to(features.device)
        features = features @ projection
    starts = torch.randperm(n, generator=gen)[: min(10, n)].to(features.device)
    min_dist = torch.cdist(features, features.index_select(0, starts)).mean(1).pow(2)
    sq = features.pow(2).sum(1)
    for i in range(k):
        idx = torch.argmax(min_dist).view(1)
        chosen[i : i + 1] = idx
        cover(features, sq, idx, min_dist)
    return chosen


# ----------------------------------------------------------------------------- measuring
def batches(images, size, device):
    for i in range(0, len(images), size):
        yield to_unit_float(images[i : i + size].to(device))


def score_split(score_fn, images, labels, batch_size, device):
    """(images/s, AUROC, scores [N], maps [N,1,H,W]) after one warm-up batch."""
    with torch.no_grad():
        score_fn(to_unit_float(images[: min(8, len(images))].to(device)))
    wait_for_device(device)
    t0 = time.perf_counter()
    maps, scores = [], []
    for x in batches(images, batch_size, device):
        m, s = score_fn(x)
        maps.append(m)
        scores.append(s)
    maps, scores = torch.cat(maps), torch.cat(scores)
    wait_for_device(device)
    seconds = time.perf_counter() - t0
    scores, maps = scores.float().cpu(), maps.float().cpu()
    return len(images) / seconds, roc_auc(scores, labels.cpu()), scores, maps


def timed(fn, device):
    wait_for_device(device)
    t0 = time.perf_counter()
    out = fn()
    wait_for_device(device)
    return out, time.perf_counter() - t0


def stage_breakdown(model, images, batch_size, device):
    """Seconds per image of each stage of the fast path, on one batch, each stage synchronised."""
    from freqexp.models.backbone import autocast_to

    x = to_unit_float(images[:batch_size].to(device))
    n = x.shape[0]
    with torch.no_grad():
        model.score(x[:4])  # warm
        dtype = model.compute_dtype(device)

        def backbone():
            with autocast_to(device.type, dtype):
                return model.extractor.backbone(model.extractor.prepare_input(x), model.extractor.layers, fast=True)

        _, t_backbone = timed(backbone, device)
        feats, t_features = timed(lambda: model.patch_features(x), device)
        index = model.bank_index()
        _, t_search = timed(lambda: nearest_k(feats.reshape(-1, feats.shape[-1]), model.memory_bank, 1, index), device)
        _, t_total = timed(lambda: model.score(x), device)
    return {"backbone": t_backbone / n, "features": max(0.0, t_features - t_backbone) / n, "search": t_search / n,
            "map+score": max(0.0, t_total - t_features - t_search) / n, "total": t_total / n}


def relative_max(a, b):
    scale = float(b.max() - b.min()) or 1.0
    return float((a - b).abs().max()) / scale


def bench_model(name, args, overrides):
    cfg = compose_config([f"model={name}", *overrides])
    plan = make_plan(cfg)
    device = plan.hardware.device
    model = plan.model.to(device).eval()
    data = build_dataset(cfg.dataset)
    test_images, labels = data.test.images, data.test.labels
    precisions = list(dict.fromkeys(args.precisions))
    model.precision = precisions[0]

    _, extract_s = timed(lambda: [model.observe(x) for x in batches(data.train.images, args.batch_size, device)], device)
    features = list(model._observed)
    n_patches = sum(f.shape[0] for f in features)
    rows, breakdown = [], None
    for ratio in args.ratios:
        model.sampling_ratio = ratio
        model.precision = precisions[0]
        model._observed = list(features)
        _, select_s = timed(model.finalize, device)
        legacy_select = same = "-"
        if ratio < 1.0 and model.sampling != "random" and args.legacy_coreset in ("all", name):
            flat = torch.cat(features)
            chosen, legacy_select = timed(lambda: legacy_coreset(model, flat), device)
            same = "yes" if torch.equal(model.memory_bank, flat[chosen]) else "no"
            del flat, chosen
        row = dict(model=name, ratio=ratio, bank=model.memory_bank.shape[0], patches=n_patches, extract=extract_s,
                   select=select_s, legacy_select=legacy_select, same=same, fast={})
        if not args.no_legacy:
            legacy = Legacy(model)
            ips, auc, scores, maps = score_split(legacy.score, test_images, labels, args.batch_size, device)
            row["today"] = dict(ips=ips, auc=auc)
            ref_scores, ref_maps = scores, maps
            del legacy
        for precision in precisions:
            model.precision = precision
            ips, auc, scores, maps = score_split(model.score, test_images, labels, args.batch_size, device)
            entry = dict(ips=ips, auc=auc)
            if not args.no_legacy:
                entry.update(dscore=relative_max(scores, ref_scores), dmap=relative_max(maps, ref_maps))
            row["fast"][precision] = entry
        if precisions and args.coreset_precision and ratio < 1.0 and model.sampling != "random":
            model.precision = args.coreset_precision  # the reduced-precision coreset (CUDA only; fp32 elsewhere)
            model._observed = list(features)
            _, row["select_low"] = timed(model.finalize, device)
            model.precision = precisions[0]
        if breakdown is None and ratio == args.ratios[0]:
            model.precision = precisions[0]
            breakdown = stage_breakdown(model, test_images, min(args.batch_size, len(test_images)), device)
        rows.append(row)
        print_rows([row], precisions, args, file=sys.stderr)
    return rows, breakdown, data, device


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def print_rows(rows, precisions, args, file=None):
    for r in rows:
        today = r.get("today")
        head = (f"{r['model']:9} {r['ratio']:5.2f} {r['bank']:7d} | coreset {fmt(r['select'], '6.2f')} s"
                + (f" (today {fmt(r['legacy_select'], '.2f')} s, same rows: {r['same']})" if r["legacy_select"] != "-" else "")
                + (f" ({args.coreset_precision} {r['select_low']:.2f} s)" if "select_low" in r else ""))
        print(head, file=file)
        if today:
            print(f"    today fp32        {today['ips']:9.1f} img/s   AUROC {today['auc']:.4f}", file=file)
        for p in precisions:
            f = r["fast"][p]
            extra = (f"   x{f['ips'] / today['ips']:5.2f}   dAUROC {f['auc'] - today['auc']:+.5f}   max dscore {f['dscore']:.1e}"
                     f"   max dmap {f['dmap']:.1e}") if today else ""
            print(f"    fast {p:6}       {f['ips']:9.1f} img/s   AUROC {f['auc']:.4f}{extra}", file=file, flush=True)


def model_mode(args, extra):
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = ["dataset=fashion_mnist", f"dataset.normal_class={args.normal_class}", f"dataset.limit_train={args.limit_train}",
                 f"dataset.limit_test={args.limit_test}", *extra]
    print(f"memory banks: {args.limit_train} train / {args.limit_test} test Fashion-MNIST images (class {args.normal_class}), "
          f"batches of {args.batch_size}, torch threads {torch.get_num_threads()}, overrides {' '.join(extra) or '-'}", flush=True)
    for name in args.models:
        t0 = time.perf_counter()
        rows, breakdown, data, device = bench_model(name, args, overrides)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"\n== {name} on {gpu}: {rows[0]['patches']} training patches, features extracted in {rows[0]['extract']:.2f} s "
              f"({len(data.train.images) / rows[0]['extract']:.0f} img/s); {len(data.test.images)} test images")
        print_rows(rows, list(dict.fromkeys(args.precisions)), args)
        if breakdown:
            print("    stage breakdown of one fast batch (ms per image): "
                  + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in breakdown.items()))
        print(f"    ({time.perf_counter() - t0:.0f} s for {name})", flush=True)


# ----------------------------------------------------------------------------- search widths
def widths_mode(args, extra):
    """The pruned search against the fp32 product on PatchCore's own features, randomly projected
    to each --search-widths width (the full width as it is): where the bound pays."""
    from freqexp.models import bank_search

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose_config(["model=patchcore", "dataset=fashion_mnist", f"dataset.normal_class={args.normal_class}",
                   f"dataset.limit_train={args.limit_train}", f"dataset.limit_test={args.limit_test}", *extra])
    model = make_plan(cfg).model.eval()
    data = build_dataset(cfg.dataset)
    with torch.no_grad():
        for x in batches(data.train.images, 16, torch.device("cpu")):
            model.observe(x)
        train = torch.cat(model._observed)
        model._observed = []
        for x in batches(data.test.images, 16, torch.device("cpu")):
            model.observe(x)
        queries = torch.cat(model._observed)
        model._observed = []
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train), generator=gen)
    sizes = [min(n, len(train)) for n in (args.search_rows or [max(1, int(len(train) * 0.1))])]
    print(f"search widths: banks of {', '.join(map(str, sizes))} rows drawn at random from {len(train)} training patches, "
          f"{len(queries)} test patches, torch threads {torch.get_num_threads()}; best of 3")
    print(f"{'rows':>6} {'width':>6} {'fp32 s':>8} {'pruned s':>9} {'pruned / fp32 speed':>20} {'redone':>7} {'same answers':>13}")
    original, redone = bank_search.nearest_k, []

    def spy(qq, *a, **k):  # the pruned search hands its unsettled queries back to nearest_k
        redone.append(qq.shape[0])
        return original(qq, *a, **k)

    for rows, width in [(n, w) for n in sizes for w in args.search_widths]:
        bank_full = train[order[:rows]]
        if width >= train.shape[1]:
            bank, q = bank_full, queries
        else:
            projection = torch.randn(train.shape[1], width, generator=gen) / width**0.5
            bank, q = (bank_full @ projection).contiguous(), (queries @ projection).contiguous()
        seconds, answers = {}, {}
        for search in ("fp32", "pruned"):
            index = bank_search.BankIndex(bank, search)
            if search == "pruned" and index.embedded is None:  # below the PRUNE_MIN_* limits: measure the bound anyway
                index._build_embedding(bank.float())
            best = float("inf")
            for _ in range(3):
                redone.clear()
                bank_search.nearest_k = spy
                try:
                    t0 = time.perf_counter()
                    answers[search] = original(q, bank, 1, index)
                    best = min(best, time.perf_counter() - t0)
                finally:
                    bank_search.nearest_k = original
            seconds[search] = best
        # the same rows, or rows as near (background patches repeat: exact ties pick either copy)
        (d32, i32), (dp, ip) = answers["fp32"], answers["pruned"]
        tied = (torch.linalg.vector_norm(q - bank[ip[:, 0]], dim=1) - torch.linalg.vector_norm(q - bank[i32[:, 0]], dim=1)).abs()
        same = bool((tied <= 1e-5 * d32[:, 0].clamp_min(1e-6)).all()) and torch.allclose(dp, d32, rtol=1e-5, atol=1e-6)
        print(f"{rows:6d} {width:6d} {seconds['fp32']:8.4f} {seconds['pruned']:9.4f} {seconds['fp32'] / seconds['pruned']:19.2f}x "
              f"{sum(redone):7d} {'yes' if same else 'no':>13}", flush=True)
    print(f"model.precision=auto prunes banks of {bank_search.PRUNE_MIN_DIM}+ dims, {bank_search.PRUNE_MIN_ROWS}+ rows and {bank_search.PRUNE_MIN_WORK:,}+ rows x dims "
          "(PRUNE_MIN_DIM, PRUNE_MIN_ROWS, PRUNE_MIN_WORK); others use the fp32 product")


# ----------------------------------------------------------------------------- CPU defaults
def cpu_mode(args, extra):
    threads = str(args.threads or 2)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    print(f"model=patchcore with every default on the CPU: {args.cpu_train} train / {args.cpu_test} test images, {threads} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    print(f"{'precision':10} {'peak RSS GB':>11} {'fit s':>7} {'test img/s':>10} {'test AUROC':>10} {'wall s':>7}")
    results = {}
    for precision in args.cpu_precisions:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            cmd = [sys.executable, "-m", "freqexp", "model=patchcore", "hardware=cpu", "dataset=fashion_mnist",
                   f"dataset.limit_train={args.cpu_train}", f"dataset.limit_test={args.cpu_test}", f"model.precision={precision}",
                   f"tracking.uri=sqlite:///{tmp}/mlflow.db", "tracking.figures=none", "trainer.progress_bar=false",
                   f"hydra.run.dir={run_dir}", *extra]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            output = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            metrics_file = run_dir / "metrics.json"
            if status != 0 or not metrics_file.exists():
                print(f"{precision:10} failed (status {status}):\n{output[-3000:]}")
                continue
            metrics = json.loads(metrics_file.read_text())
            timing = json.loads((run_dir / "timing.json").read_text()) if (run_dir / "timing.json").exists() else {}
            fit = timing.get("phases", {}).get("fit", float("nan"))  # includes Lightning's validation pass
            rss = usage.ru_maxrss / 2**20  # Linux: KiB
            results[precision] = dict(rss=rss, ips=metrics["test/throughput"], auc=metrics["test/auroc"])
            print(f"{precision:10} {rss:11.2f} {fmt(fit, '7.1f')} {metrics['test/throughput']:10.2f} {metrics['test/auroc']:10.4f} {wall:7.0f}", flush=True)
    print(f"{'anomalib':10} {ANOMALIB['peak_rss_gb']:11.2f} {'':>7} {ANOMALIB['img_s']:10.2f}   (its Patchcore, same setting, measured before)")
    if "auto" in results and "fp32" in results:
        print(f"auto vs fp32: x{results['auto']['ips'] / results['fp32']['ips']:.2f} img/s, dAUROC {results['auto']['auc'] - results['fp32']['auc']:+.5f}")
    print(f"goals: peak RSS <= 4 GB, test img/s >= {2 * ANOMALIB['img_s']:.1f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the ~90 s GPU setting: 300 train / 500 test, banks 10 %% 1 %% 100 %%, "
                   "precisions auto and bf16, today's coreset loop timed for patchcore only")
    p.add_argument("--limit-train", type=int, default=300)
    p.add_argument("--limit-test", type=int, default=500)
    p.add_argument("--normal-class", type=int, default=0)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.01, 1.0])
    p.add_argument("--models", nargs="+", default=["patchcore", "wedge"])
    p.add_argument("--precisions", nargs="+", default=["auto", "bf16"], help="model.precision values of the fast path")
    p.add_argument("--coreset-precision", default="bf16", help="also time the coreset in this precision (CUDA: reduced; '' = skip)")
    p.add_argument("--legacy-coreset", default="all", help="time today's coreset loop for: all | none | a model name")
    p.add_argument("--no-legacy", action="store_true", help="skip today's path")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default; --cpu-defaults: 2)")
    p.add_argument("--cpu-defaults", action="store_true", help="the CPU goal: python -m freqexp model=patchcore with the defaults")
    p.add_argument("--cpu-train", type=int, default=200)
    p.add_argument("--cpu-test", type=int, default=500)
    p.add_argument("--cpu-precisions", nargs="+", default=["auto"], help="model.precision per CPU run (e.g. auto fp32 bf16)")
    p.add_argument("--search-rows", type=int, nargs="+", default=None, help="--search-widths: bank sizes (default: 10 %% of the training patches)")
    p.add_argument("--search-widths", type=int, nargs="+", default=None,
                   help="the pruned search against the fp32 product on PatchCore features projected to these widths (e.g. 128 192 256 512 1024)")
    args, extra = p.parse_known_args()
    for name in ("precisions", "cpu_precisions", "models"):  # config overrides written after a list option
        values = getattr(args, name)
        extra += [v for v in values if "=" in v]
        setattr(args, name, [v for v in values if "=" not in v])
    if args.quick:
        args.legacy_coreset = "patchcore"
    if args.search_widths:
        widths_mode(args, extra)
    elif args.cpu_defaults:
        cpu_mode(args, extra)
    else:
        model_mode(args, extra)
    print(f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
