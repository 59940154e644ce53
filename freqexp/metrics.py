"""Image and pixel metrics in torch (on the device, fast on millions of pixels), matching
scikit-learn's definitions: tied scores form one threshold; AP is the step-wise sum
sum_n (R_n - R_{n-1}) P_n; a sample is predicted anomalous when score >= threshold.

PRO (per-region overlap, Bergmann et al., MVTec AD) weighs every connected ground-truth region
equally, so a small defect counts as much as a large one (pixel AUROC is dominated by the large
ones). For a threshold t, PRO(t) = mean over regions of the share of the region's pixels with
map >= t, and FPR(t) = share of all normal pixels (over all images) with map >= t. The metric
is the area under PRO over FPR in [0, max_fpr] (0.3 by default), divided by max_fpr, so 1 is
perfect. Like the MVTec reference code it uses every distinct map value as a threshold (exact
breakpoints, ties form one threshold), the trapezoidal rule between them, a linearly interpolated
end point at max_fpr, and 8-connected regions (scipy.ndimage.label with a 3x3 block of ones; pass
connectivity=4 for edge-connected regions)."""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch


def _as_1d(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = scores.detach().flatten().double()
    labels = labels.detach().flatten().to(scores.device).bool()
    if scores.numel() != labels.numel():
        raise ValueError(f"{scores.numel()} scores but {labels.numel()} labels")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    return scores, labels


def _counts(scores: torch.Tensor, labels: torch.Tensor):
    """True/false positive counts at each distinct threshold, highest threshold first."""
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order], labels[order].double()
    last_of_tie = torch.nonzero(s[1:] != s[:-1]).flatten()
    ends = torch.cat([last_of_tie, torch.tensor([len(s) - 1], device=s.device)])
    tps = torch.cumsum(y, 0)[ends]
    fps = (ends + 1).double() - tps
    return tps, fps, s[ends]


def _need_both_classes(labels: torch.Tensor, what: str) -> None:
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.numel():
        raise ValueError(f"{what} needs both normal and anomalous samples")


def roc_curve(scores, labels):
    """(fpr, tpr, thresholds), starting at (0, 0)."""
    scores, labels = _as_1d(scores, labels)
    _need_both_classes(labels, "ROC")
    tps, fps, thr = _counts(scores, labels)
    zero = torch.zeros(1, dtype=tps.dtype, device=tps.device)
    tps, fps = torch.cat([zero, tps]), torch.cat([zero, fps])
    thr = torch.cat([torch.tensor([float("inf")], dtype=thr.dtype, device=thr.device), thr])
    return fps / fps[-1], tps / tps[-1], thr


def roc_auc(scores, labels) -> float:
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(torch.trapezoid(tpr, fpr))


def precision_recall_curve(scores, labels):
    """(precision, recall, thresholds) for decreasing thresholds."""
    scores, labels = _as_1d(scores, labels)
    _need_both_classes(labels, "precision-recall")
    tps, fps, thr = _counts(scores, labels)
    return tps / (tps + fps), tps / tps[-1], thr


def average_precision(scores, labels) -> float:
    precision, recall, _ = precision_recall_curve(scores, labels)
    prev = torch.cat([torch.zeros(1, dtype=recall.dtype, device=recall.device), recall[:-1]])
    return float(torch.sum((recall - prev) * precision))


def best_f1_threshold(scores, labels) -> tuple[float, float]:
    """(threshold, F1) maximizing F1 over all distinct thresholds."""
    precision, recall, thr = precision_recall_curve(scores, labels)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    i = int(torch.argmax(f1))
    return float(thr[i]), float(f1[i])


def binary_metrics(scores, labels, threshold: float) -> Dict[str, float]:
    """F1, accuracy, balanced accuracy, precision, recall at `score >= threshold`."""
    scores, labels = _as_1d(scores, labels)
    pred = scores >= threshold
    tp = float((pred & labels).sum())
    fp = float((pred & ~labels).sum())
    fn = float((~pred & labels).sum())
    tn = float((~pred & ~labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    specificity = tn / (tn + fp) if tn + fp else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "f1": f1,
        "acc": (tp + tn) / len(labels),
        "balanced_acc": 0.5 * (recall + specificity),
        "precision": precision,
        "recall": recall,
    }


def reduce_map(maps: torch.Tensor, reduction: str = "mean", topk: float = 0.05) -> torch.Tensor:
    """Image scores [B] from anomaly maps [B,1,H,W]: mean, max, or mean of the top-k fraction."""
    flat = maps.flatten(1).float()
    if reduction == "mean":
        return flat.mean(1)
    if reduction == "max":
        return flat.amax(1)
    if reduction == "topk":
        k = max(1, int(round(topk * flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(1)
    raise ValueError(f"unknown reduction {reduction!r}")


REDUCTIONS = ("mean", "max", "topk")
SCORE_REDUCTIONS = ("auto",) + REDUCTIONS  # auto: the method's published image score


# --------------------------------------------------------------------------- PRO


def _maps_and_masks(maps, masks) -> tuple[torch.Tensor, np.ndarray]:
    """Scores float32 [N,H,W] on the CPU and masks numpy bool [N,H,W], from [N,1,H,W], [N,H,W] or [H,W]."""
    masks = torch.as_tensor(masks).detach().cpu()
    if masks.ndim < 2:
        raise ValueError(f"masks must be [..., H, W]; got shape {tuple(masks.shape)}")
    h, w = masks.shape[-2:]
    maps = torch.as_tensor(maps).detach().cpu().float()
    if maps.numel() != masks.numel() or maps.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"anomaly maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ in size")
    if not torch.isfinite(maps).all():
        raise ValueError("anomaly maps contain NaN or inf")
    return maps.reshape(-1, h, w), masks.reshape(-1, h, w).bool().numpy()


def region_labels(masks, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """(labels int32 [N,H,W], number of regions): the connected ground-truth regions of every
    image, numbered 1..R across the whole set, 0 on normal pixels. One scipy call labels all
    images: the 3D structuring element connects pixels only within an image plane."""
    from scipy import ndimage

    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8; got {connectivity}")
    m = torch.as_tensor(masks).detach().cpu().bool()
    m = m.reshape(-1, *m.shape[-2:]).numpy()
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    labels, n = ndimage.label(m, structure=structure)
    return labels, int(n)


def pro_curve(maps, masks, max_fpr: float = 1.0, connectivity: int = 8):
    """(fpr, pro, thresholds), float64, highest threshold first, starting at (0, 0, inf), with a
    point at every distinct map value. With max_fpr < 1 the curve stops at the first point whose
    FPR exceeds max_fpr, which is all that the integral needs: only pixels at or above that
    threshold are sorted (about max_fpr of the normal pixels plus the anomalous ones above it)."""
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1]; got {max_fpr}")
    scores, mask = _maps_and_masks(maps, masks)
    labels, n_regions = region_labels(mask, connectivity)
    labels = torch.from_numpy(labels.reshape(-1))
    scores = scores.reshape(-1)
    normal = labels == 0
    n_normal = int(normal.sum())
    if n_regions == 0 or n_normal == 0:
        raise ValueError("PRO needs at least one anomalous region and one normal pixel")

    # each region pixel adds 1 / (its region's size) to its region's overlap (the mean over
    # regions divides by n_regions at the end); normal pixels add 1 / n_normal to the FPR
    sizes = torch.bincount(labels[~normal].long(), minlength=n_regions + 1)
    overlap_per_pixel = 1.0 / sizes.double().clamp_min(1)
    overlap_per_pixel[0] = 0.0

    if max_fpr < 1:
        # c = the k-th highest normal score with k > max_fpr * n_normal, so FPR(c) > max_fpr and
        # every threshold above c has FPR <= max_fpr (one normal pixel of margin against rounding
        # in max_fpr * n_normal; trimmed below).
        k = min(n_normal, int(max_fpr * n_normal) + 2)
        cut = torch.kthvalue(scores[normal], n_normal - k + 1).values
        keep = scores >= cut
        scores, labels, normal = scores[keep], labels[keep], normal[keep]

    # the order within a tie does not matter: only the cumulative sums at a tie's end are kept
    order = torch.argsort(scores, descending=True)
    s = scores[order]
    overlap_gain = overlap_per_pixel[labels[order].long()]
    fp_gain = normal[order].double()
    last_of_tie = torch.nonzero(s[1:] != s[:-1]).flatten()
    ends = torch.cat([last_of_tie, torch.tensor([len(s) - 1])])
    fpr = torch.cumsum(fp_gain, 0)[ends] / n_normal
    pro = (torch.cumsum(overlap_gain, 0)[ends] / n_regions).clamp_max(1.0)
    thr = s[ends].double()
    if max_fpr < 1:  # drop the margin: keep up to the first point past max_fpr
        stop = int(torch.searchsorted(fpr, torch.tensor([max_fpr], dtype=fpr.dtype), right=True)) + 1
        fpr, pro, thr = fpr[:stop], pro[:stop], thr[:stop]
    zero = torch.zeros(1, dtype=torch.float64)
    inf = torch.tensor([float("inf")], dtype=torch.float64)
    return torch.cat([zero, fpr]), torch.cat([zero, pro]), torch.cat([inf, thr])


def _area_up_to(x: torch.Tensor, y: torch.Tensor, x_max: float) -> float:
    """Trapezoidal area under y(x) for x in [x[0], x_max]; x is non-decreasing. When x_max falls
    between two points, y at x_max is interpolated linearly between them."""
    j = int(torch.searchsorted(x, torch.tensor([x_max], dtype=x.dtype), right=True)) - 1  # last x <= x_max
    area = float(torch.trapezoid(y[: j + 1], x[: j + 1]))
    if j + 1 < len(x) and x[j] < x_max:
        y_end = y[j] + (y[j + 1] - y[j]) * (x_max - x[j]) / (x[j + 1] - x[j])
        area += float(0.5 * (y[j] + y_end) * (x_max - x[j]))
    return area


def pro_auc(maps, masks, max_fpr: float = 0.3, connectivity: int = 8) -> float:
    """Area under the PRO curve for FPR in [0, max_fpr], divided by max_fpr (1 = perfect; a map
    that ranks every normal pixel above every anomalous one scores 0; a constant map max_fpr / 2).
    Raises ValueError when the masks have no anomalous region or no normal pixel."""
    fpr, pro, _ = pro_curve(maps, masks, max_fpr, connectivity)
    return _area_up_to(fpr, pro, max_fpr) / max_fpr


def has_both_pixel_classes(masks) -> bool:
    """Whether pixel metrics are defined: at least one anomalous and one normal pixel."""
    m = torch.as_tensor(masks).bool()
    return bool(m.any()) and not bool(m.all())
