"""Figures logged with every run: reconstruction grid, ROC and PR curves, score histogram."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from freqexp.metrics import precision_recall_curve, roc_curve  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (PNG, 110 dpi) and close a figure; every freqexp plot ends here."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _show(ax, img: torch.Tensor, cmap="gray", vmax=None):
    img = img.detach().float().cpu()
    if img.shape[0] == 3:
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
    else:
        ax.imshow(img[0].numpy(), cmap=cmap, vmin=0, vmax=vmax if vmax is not None else 1)
    ax.set_xticks([])
    ax.set_yticks([])


def reconstruction_grid(inputs, recons, maps, labels, scores, path: Path) -> Path:
    """Rows: input, reconstruction, error map; columns: normal then anomalous test images."""
    n = len(inputs)
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n, 4.2), squeeze=False)
    vmax = float(maps.max()) or 1.0
    for i in range(n):
        _show(axes[0, i], inputs[i])
        _show(axes[1, i], recons[i])
        _show(axes[2, i], maps[i], cmap="inferno", vmax=vmax)
        axes[0, i].set_title(("anom" if int(labels[i]) else "norm") + f"\n{float(scores[i]):.3g}", fontsize=7)
    for ax, name in zip(axes[:, 0], ("input", "recon", "error")):
        ax.set_ylabel(name, fontsize=8)
    return save_figure(fig, path)


def roc_plot(scores, labels, auroc: float, path: Path) -> Path:
    fpr, tpr, _ = roc_curve(scores, labels)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr.cpu(), tpr.cpu(), label=f"AUROC {auroc:.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test)")
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def pr_plot(scores, labels, ap: float, path: Path) -> Path:
    precision, recall, _ = precision_recall_curve(scores, labels)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.step(recall.cpu(), precision.cpu(), where="post", label=f"AP {ap:.3f}")
    base = float(labels.float().mean())
    ax.axhline(base, color="k", ls="--", lw=0.8, label=f"chance {base:.2f}")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (test)", ylim=(0, 1.02))
    ax.legend(loc="lower left")
    return save_figure(fig, path)


def score_histogram(scores, labels, threshold: float, path: Path) -> Path:
    scores, labels = scores.detach().float().cpu(), labels.detach().cpu().bool()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = torch.linspace(float(scores.min()), float(scores.max()), 50).numpy()
    ax.hist(scores[~labels].numpy(), bins=bins, alpha=0.6, density=True, label="normal")
    ax.hist(scores[labels].numpy(), bins=bins, alpha=0.6, density=True, label="anomalous")
    ax.axvline(threshold, color="k", ls="--", lw=0.8, label="threshold (val)")
    ax.set(xlabel="anomaly score", ylabel="density", title="Test scores")
    ax.legend()
    return save_figure(fig, path)
