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
from freqexp.training import ReconstructionModule, to_unit_float

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
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with Progress(f"scoring {name}", len(images), "images") as progress:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            with progress.chunk(len(batch)):  # models scoring in micro-batches report each one
                m, batch_scores = module.score(to_unit_float(batch.to(device)))
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
    m["test/f1_best"] = best_f1_threshold(test.scores, test.labels)[1]  # oracle threshold (anomalib's F1-max)
    if test.maps is not None and has_both_pixel_classes(data.test.masks):  # undefined without defect pixels
        maps, masks = test.maps, data.test.masks.cpu()
        model = getattr(module, "model", None)
        region = model.evaluated_region(masks.shape[-2:]) if hasattr(model, "evaluated_region") else None
        if region is not None:
            top, left, h, w = region
            maps, masks = maps[..., top : top + h, left : left + w], masks[..., top : top + h, left : left + w]
        if has_both_pixel_classes(masks):
            m["test/pixel_auroc"] = roc_auc(maps.flatten(), masks.flatten())
            m["test/pro"] = pro_auc(maps, masks, max_fpr=PRO_MAX_FPR)
    m["sys/peak_memory_mb"] = peak_memory_mb(module.device)
    return m, ({"val": val, "test": test} if validated else {"test": test})
