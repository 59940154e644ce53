"""Figures logged with every run: reconstruction grid, ROC and PR curves, score histogram; and,
where the test split has pixel masks, anomaly-map overlays (input, map, map over input, ground
truth) with one colour scale for the whole figure."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

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


def overlay_indices(labels, n_normal: int = 4, n_anomalous: int = 8) -> torch.Tensor:
    """Which test images the overlay figure shows: the first n_normal normal images, then
    n_anomalous anomalous ones spread evenly over the anomalous images in split order (first and
    last included), so that different kinds of defect show up. Deterministic; fewer when the
    split has fewer."""
    labels = torch.as_tensor(labels).detach().cpu()
    normal = torch.nonzero(labels == 0).flatten()[:n_normal]
    anomalous = torch.nonzero(labels != 0).flatten()
    if len(anomalous) > n_anomalous:
        spread = torch.linspace(0, len(anomalous) - 1, n_anomalous).round().long()
        anomalous = anomalous[spread]
    return torch.cat([normal, anomalous])


def map_colour_range(maps, low: float = 0.01, high: float = 0.995) -> tuple[float, float]:
    """(vmin, vmax): the 1st and 99.5th percentiles of all pixels of all test maps. The same range
    holds for every panel of the figure, so brighter means more anomalous across images; the
    percentiles (not min/max) keep a few extreme pixels from washing the rest out."""
    flat = torch.as_tensor(maps).detach().flatten().float().cpu()
    n = flat.numel()
    # kthvalue: torch.quantile refuses tensors of more than 2**24 elements
    vmin = float(flat.kthvalue(max(1, int(round(low * n)))).values)
    vmax = float(flat.kthvalue(max(1, int(round(high * n)))).values)
    if vmax <= vmin:  # a (nearly) constant map
        vmax = vmin + 1e-12 + 1e-6 * abs(vmin)
    return vmin, vmax


OVERLAY_ROWS = ("input", "anomaly map", "overlay", "ground truth")


def overlay_figure(images, maps, masks, labels, scores, indices, vmin: float, vmax: float, range_note: str = ""):
    """One column per picked image (indices into the split), rows OVERLAY_ROWS: the input, the
    anomaly map (inferno, colour range [vmin, vmax] for all columns, one colour bar), the map over
    the input (opacity rising with the map value, ground-truth outline in cyan), and the input
    with the ground-truth region filled. images: [N,C,H,W], uint8 or float in [0,1] (C 1 or 3,
    any H, W); maps [N,1,H,W]; masks bool [N,1,H,W]; only the picked images are converted."""
    indices = torch.as_tensor(indices).long().cpu()
    n = len(indices)
    h, w = images.shape[-2:]
    cell_w = 1.5 * min(3.0, max(0.5, w / h))  # wide or tall images keep their aspect in a readable cell
    cols = max(n, 1)
    # a narrow last column holds the colour bar (a gridspec column keeps tight_layout working)
    fig, grid = plt.subplots(len(OVERLAY_ROWS), cols + 1, figsize=(cell_w * cols + 0.9, 1.5 * len(OVERLAY_ROWS) + 0.4),
                             squeeze=False, gridspec_kw={"width_ratios": [1.0] * cols + [0.06 * max(1.0, 1.5 / cell_w)]})
    axes, side = grid[:, :cols], grid[:, cols]
    norm = Normalize(vmin=vmin, vmax=vmax)
    mapped = None
    for col, i in enumerate(indices.tolist()):
        img = images[i].detach().cpu()
        img = img.float() / 255 if img.dtype == torch.uint8 else img.float()
        amap = maps[i].detach().float().cpu().reshape(h, w).numpy()
        mask = masks[i].detach().cpu().bool().reshape(h, w).numpy()
        ax_in, ax_map, ax_over, ax_gt = axes[:, col]
        _show(ax_in, img)
        mapped = ax_map.imshow(amap, cmap="inferno", norm=norm)
        _show(ax_over, img)
        ax_over.imshow(amap, cmap="inferno", norm=norm, alpha=0.15 + 0.7 * np.clip(norm(amap), 0, 1))
        _show(ax_gt, img)
        if mask.any():
            fill = np.zeros((h, w, 4))
            fill[mask] = (1.0, 0.1, 0.1, 0.55)
            ax_gt.imshow(fill)
            for ax in (ax_over, ax_gt):
                ax.contour(mask.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        ax_in.set_title(f"#{i} " + ("anom" if int(labels[i]) else "norm") + f"\n{float(scores[i]):.3g}", fontsize=7)
        for ax in (ax_map, ax_over, ax_gt):
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, name in zip(axes[:, 0], OVERLAY_ROWS):
        ax.set_ylabel(name, fontsize=8)
    for ax in list(axes[:, n:].flat) + [side[0], side[3]]:  # unused cells (all of them when nothing was picked)
        ax.axis("off")
    if mapped is not None:
        side[2].axis("off")
        fig.colorbar(mapped, cax=side[1]).ax.tick_params(labelsize=7)
    else:
        side[1].axis("off")
        side[2].axis("off")
    fig.suptitle(f"Test anomaly maps (colour range {vmin:.3g} to {vmax:.3g}{range_note})", fontsize=8)
    return fig


def anomaly_overlays(images, maps, masks, labels, scores, path: Path, n_normal: int = 4, n_anomalous: int = 8) -> Path:
    """The overlay figure for the images overlay_indices picks, colours from map_colour_range over
    all given maps."""
    indices = overlay_indices(labels, n_normal, n_anomalous)
    vmin, vmax = map_colour_range(maps)
    fig = overlay_figure(images, maps, masks, labels, scores, indices, vmin, vmax,
                         range_note=": 1st to 99.5th percentile of all test pixels")
    return save_figure(fig, path)
