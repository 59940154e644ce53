"""Image and pixel metrics in torch (on the device, fast on millions of pixels), matching
scikit-learn's definitions: tied scores form one threshold; AP is the step-wise sum
sum_n (R_n - R_{n-1}) P_n; a sample is predicted anomalous when score >= threshold."""
from __future__ import annotations

from typing import Dict

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
