"""Step 7: score val and test, pick the threshold on val, report test. Where the test split has
pixel masks, the test maps are kept and scored per pixel: test/pixel_auroc (every pixel of every
image one sample) and test/pro (per-region overlap up to 30 % FPR, see freqexp.metrics)."""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from freqexp.data import OneClassData, Split
from freqexp.progress import Progress
from freqexp.metrics import average_precision, best_f1_threshold, binary_metrics, has_both_pixel_classes, pro_auc, roc_auc
from freqexp.timing import wait_for_device
from freqexp.training import ReconstructionModule

PRO_MAX_FPR = 0.3  # test/pro integrates PRO over FPR in [0, 0.3], as in the MVTec AD benchmark


@dataclass
class Scored:
    scores: torch.Tensor  # [N] on CPU
    labels: torch.Tensor  # [N] on CPU
    maps: Optional[torch.Tensor]  # [N,1,H,W] on CPU when kept
    seconds: float


@torch.no_grad()
def score_split(module: ReconstructionModule, split: Split, batch_size: int, keep_maps: bool = False, name: str = "split") -> Scored:
    """Anomaly maps and image scores for a split, in fp32, batched on the module's device; the
    progress is reported per batch, or per micro-batch where the model works in them
    (freqexp.progress), as "scoring <name>"."""
    module.eval()
    device = module.device
    images = split.images  # batches move to the device one at a time (a memory-mapped split stays on disk)
    scores, maps = [], []
    wait_for_device(device)
    t0 = time.perf_counter()
    with Progress(f"scoring {name}", len(images), "images") as progress:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            with progress.chunk(len(batch)):  # models scoring in micro-batches report each one
                m, batch_scores = module.score(module.as_input(batch.to(device)))
            scores.append(batch_scores)
            if keep_maps:
                maps.append(m.cpu())
    s = torch.cat(scores).cpu()
    seconds = time.perf_counter() - t0  # .cpu() above waited for the device
    return Scored(s, split.labels.cpu(), torch.cat(maps) if keep_maps else None, seconds)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's counter, or on Linux the process's peak RSS (VmHWM), so jobs of a
    sweep that share a process each report their own peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def ranking_metrics(scores: torch.Tensor, labels: torch.Tensor, maps: Optional[torch.Tensor], masks: Optional[torch.Tensor],
                    region, with_ranking: bool = True) -> Dict[str, float]:
    """Threshold-free metrics of one set of test images: AUROC and AP (with_ranking), F1-max
    (test/f1_best, the oracle threshold, anomalib's F1-max) and, where masks have both pixel
    classes, pixel AUROC and PRO on `region` (top, left, height, width; None: the whole image)."""
    out: Dict[str, float] = {}
    if with_ranking:
        out["test/auroc"], out["test/ap"] = roc_auc(scores, labels), average_precision(scores, labels)
    out["test/f1_best"] = best_f1_threshold(scores, labels)[1]
    if maps is not None and masks is not None and has_both_pixel_classes(masks):  # undefined without defect pixels
        if region is not None:
            top, left, h, w = region
            maps, masks = maps[..., top : top + h, left : left + w], masks[..., top : top + h, left : left + w]
        if has_both_pixel_classes(masks):
            out["test/pixel_auroc"] = roc_auc(maps.flatten(), masks.flatten())
            out["test/pro"] = pro_auc(maps, masks, max_fpr=PRO_MAX_FPR)
    return out


MEAN_OVER_CATEGORIES = ("auroc", "ap", "f1_best", "pixel_auroc", "pro")


def category_metrics(test: Scored, masks: Optional[torch.Tensor], region, categories: list[str]) -> Dict[str, float]:
    """A test of several categories (the zero-shot protocol's whole target dataset): each
    category's metrics as test/category/<name>/<metric>, and test/<metric> replaced by their mean
    over categories, the figure papers report (the pooled values stay as test/pooled_<metric>)."""
    out: Dict[str, float] = {}
    per: Dict[str, list[float]] = {k: [] for k in MEAN_OVER_CATEGORIES}
    for name in sorted(set(categories)):
        rows = torch.tensor([c == name for c in categories])
        labels = test.labels[rows]
        if labels.min() == labels.max():  # a category with only normal (or only anomalous) test images has no AUROC
            continue
        maps = test.maps[rows] if test.maps is not None else None
        one = ranking_metrics(test.scores[rows], labels, maps, None if masks is None else masks[rows], region)
        for k, v in one.items():
            short = k[len("test/"):]
            out[f"test/category/{name}/{short}"] = v
            per[short].append(v)
    result: Dict[str, float] = {}
    for short, values in per.items():
        if values:
            result[f"test/{short}"] = sum(values) / len(values)
    return {**out, **result, "test/categories": float(len({c for c in categories}))}


def evaluate(module: ReconstructionModule, data: OneClassData, batch_size: int) -> tuple[Dict[str, float], Dict[str, Scored]]:
    """Val (when the run has a validation split: a one-pass model fitted on every normal training
    image has none) picks the threshold; the test is reported. Pixel metrics cover the region the
    model looks at (`model.evaluated_region`: PatchCore's centre crop), the whole image otherwise."""
    validated = len(data.val) > 0
    if validated:
        module.calibrate(data.val.images, batch_size)  # e.g. GANomaly's score scale, fixed on val
        val = score_split(module, data.val, batch_size, name="val")
    test = score_split(module, data.test, batch_size, keep_maps=data.test.masks is not None, name="test")
    for name, s in (("val", val), ("test", test)) if validated else (("test", test),):
        if not torch.isfinite(s.scores).all():
            raise FloatingPointError(f"{name} anomaly scores contain NaN/inf: the model diverged")
    m: Dict[str, float] = {
        "test/auroc": roc_auc(test.scores, test.labels),
        "test/ap": average_precision(test.scores, test.labels),
        "test/throughput": len(test.scores) / max(test.seconds, 1e-9),
    }
    if validated:
        threshold, val_f1 = best_f1_threshold(val.scores, val.labels)
        m.update({"val/auroc": roc_auc(val.scores, val.labels), "val/ap": average_precision(val.scores, val.labels),
                  "val/f1": val_f1, "val/threshold": threshold, "val/throughput": len(val.scores) / max(val.seconds, 1e-9)})
        m.update({f"test/{k}": v for k, v in binary_metrics(test.scores, test.labels, threshold).items()})
    model = getattr(module, "model", None)
    region = model.evaluated_region(data.test.images.shape[-2:]) if hasattr(model, "evaluated_region") else None
    masks = data.test.masks.cpu() if test.maps is not None and data.test.masks is not None else None
    m.update(ranking_metrics(test.scores, test.labels, test.maps, masks, region, with_ranking=False))
    categories = data.info.get("test_categories")
    if categories is not None and len(set(categories)) > 1:
        m.update({f"test/pooled_{k}": m[f"test/{k}"] for k in MEAN_OVER_CATEGORIES if f"test/{k}" in m})
        m.update(category_metrics(test, masks, region, list(categories)))
    m["sys/peak_memory_mb"] = peak_memory_mb(module.device)
    return m, ({"val": val, "test": test} if validated else {"test": test})
