"""Figures logged with every run: reconstruction grid, ROC and PR curves, score histogram; and,
where the test split has pixel masks, anomaly-map overlays (input, map, map over input, ground
truth) with one colour scale for the whole figure."""
from __future__ import annotations

import math

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

from freqexp.metrics import precision_recall_curve, roc_curve  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (PNG, 110 dpi) and close a figure; every freqexp plot ends here."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rgb(img) -> np.ndarray:
    """An image tensor [C,H,W] (uint8, or float in [0,1]; C 1 or 3) as an HxWx3 float array in
    [0,1], as imshow draws it (grey: the gray colormap over [0,1])."""
    img = torch.as_tensor(img).detach().cpu()
    img = (img.float() / 255 if img.dtype == torch.uint8 else img.float()).clamp(0, 1)
    arr = img.permute(1, 2, 0).numpy() if img.shape[0] == 3 else np.repeat(img[0].numpy()[..., None], 3, axis=2)
    return arr.astype(np.float64)


def _coloured(values: np.ndarray, norm: Normalize, cmap: str = "inferno") -> np.ndarray:
    """A 2-d array through a colormap and a norm, as imshow(values, cmap, norm) shows it (RGB)."""
    return plt.get_cmap(cmap)(norm(values))[..., :3]


def cell_gap(w: int) -> int:
    """White pixels between the cells of a mosaic row."""
    return max(1, round(0.06 * w))


def mosaic(cells: list, gap: int, fill: float = 1.0) -> np.ndarray:
    """Equal-sized HxWxK cells side by side, `gap` pixels of `fill` (white) between them: a
    figure row is one image (one axes), which draws many times faster than an axes per cell."""
    h, w, k = cells[0].shape
    out = np.full((h, len(cells) * (w + gap) - gap, k), fill)
    for i, cell in enumerate(cells):
        out[:, i * (w + gap): i * (w + gap) + w] = cell
    return out


def _mosaic_axes(ax, row: np.ndarray, name: str, titles=None, w: int = 1, gap: int = 0):
    ax.imshow(row, interpolation="nearest")
    ax.set_yticks([])
    ax.set_ylabel(name, fontsize=8)
    if titles:  # column titles as top tick labels, centred on each cell
        ax.xaxis.tick_top()
        ax.set_xticks([i * (w + gap) + (w - 1) / 2 for i in range(len(titles))], titles, fontsize=7)
        ax.tick_params(axis="x", length=0, pad=2)
    else:
        ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


RECONSTRUCTION_ROWS = ("input", "recon", "error")


def reconstruction_panels(inputs, recons, maps) -> dict:
    """The rows of the reconstruction grid as RGB mosaics (one cell per image, white gaps):
    inputs and reconstructions as shown (grey or colour, clipped to [0,1]), error maps through
    inferno over [0, largest value of all maps]."""
    vmax = float(maps.max()) or 1.0
    norm = Normalize(vmin=0, vmax=vmax)
    gap = cell_gap(inputs.shape[-1])
    error = [_coloured(m.detach().float().cpu().reshape(m.shape[-2:]).numpy(), norm) for m in maps]
    return {"input": mosaic([_rgb(x) for x in inputs], gap), "recon": mosaic([_rgb(r) for r in recons], gap),
            "error": mosaic(error, gap)}


def reconstruction_grid(inputs, recons, maps, labels, scores, path: Path) -> Path:
    """Rows: input, reconstruction, error map; columns: normal then anomalous test images."""
    n = len(inputs)
    h, w = inputs.shape[-2:]
    rows = reconstruction_panels(inputs, recons, maps)
    fig, axes = plt.subplots(3, 1, figsize=(max(1.3 * n * min(3.0, max(0.5, w / h)), 2.5), 4.2), squeeze=False)
    titles = [("anom" if int(labels[i]) else "norm") + f"\n{float(scores[i]):.3g}" for i in range(n)]
    for ax, name in zip(axes[:, 0], RECONSTRUCTION_ROWS):
        _mosaic_axes(ax, rows[name], name, titles if name == "input" else None, w, cell_gap(w))
    return save_figure(fig, path)


def roc_plot(scores, labels, auroc: float, path: Path) -> Path:
    fpr, tpr, _ = roc_curve(scores, labels)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr.cpu(), tpr.cpu(), label=f"AUROC {auroc:.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test)")
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def category_bars(names: list, auroc, pixel_auroc, path: Path) -> Path:
    """Image (and pixel) AUROC of each test category, with their means as dashed lines: a test of
    several categories reports the mean (the zero-shot protocol)."""
    auroc, pixel_auroc = np.asarray(auroc, float), np.asarray(pixel_auroc, float)
    pixel = np.isfinite(pixel_auroc).any()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(names) + 1.5), 3.4))
    x = np.arange(len(names))
    width = 0.4 if pixel else 0.7
    ax.bar(x - (width / 2 if pixel else 0), auroc, width, label=f"image AUROC (mean {np.nanmean(auroc):.3f})")
    ax.axhline(np.nanmean(auroc), color="C0", ls="--", lw=0.8)
    if pixel:
        ax.bar(x + width / 2, pixel_auroc, width, label=f"pixel AUROC (mean {np.nanmean(pixel_auroc):.3f})")
        ax.axhline(np.nanmean(pixel_auroc), color="C1", ls="--", lw=0.8)
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set(ylim=(0, 1.05), ylabel="AUROC", title="Test, per category")
    ax.legend(loc="best", fontsize=8)
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
    # stepfilled: one polygon per class instead of a patch per bar (the same picture, drawn faster)
    ax.hist(scores[~labels].numpy(), bins=bins, alpha=0.6, density=True, histtype="stepfilled", label="normal")
    ax.hist(scores[labels].numpy(), bins=bins, alpha=0.6, density=True, histtype="stepfilled", label="anomalous")
    if math.isfinite(threshold):  # NaN: no validation split chose one
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
RANGE_NOTE = ": 1st to 99.5th percentile of all test pixels"  # how map_colour_range chose the colours


GT_FILL = (1.0, 0.1, 0.1, 0.55)  # RGBA of the ground-truth fill


def overlay_panels(images, maps, masks, indices, vmin: float, vmax: float) -> dict:
    """The rows of the overlay figure (OVERLAY_ROWS) as RGB mosaics, one cell per picked image,
    plus "mask": the picked masks side by side (for the outlines). "anomaly map": inferno over
    [vmin, vmax] (one scale for all cells); "overlay": that colour over the input with opacity
    0.15 + 0.7 * (map scaled to the range, clipped to [0,1]); "ground truth": the input with the
    mask filled in GT_FILL (alpha-blended)."""
    indices = torch.as_tensor(indices).long().cpu()
    h, w = images.shape[-2:]
    gap = cell_gap(w)
    norm = Normalize(vmin=vmin, vmax=vmax)
    fill, fill_alpha = np.array(GT_FILL[:3]), GT_FILL[3]
    cells = {name: [] for name in (*OVERLAY_ROWS, "mask")}
    for i in indices.tolist():
        img = _rgb(images[i])
        amap = maps[i].detach().float().cpu().reshape(h, w).numpy()
        mask = masks[i].detach().cpu().bool().reshape(h, w).numpy()
        colour = _coloured(amap, norm)
        alpha = (0.15 + 0.7 * np.clip(norm(amap), 0, 1))[..., None]
        cells["input"].append(img)
        cells["anomaly map"].append(colour)
        cells["overlay"].append(alpha * colour + (1 - alpha) * img)
        cells["ground truth"].append(np.where(mask[..., None], fill_alpha * fill + (1 - fill_alpha) * img, img))
        cells["mask"].append(mask[..., None].astype(np.float64))
    if not len(indices):
        return {}
    rows = {name: mosaic(c, gap) for name, c in cells.items() if name != "mask"}
    rows["mask"] = mosaic(cells["mask"], gap, fill=0.0)[..., 0]  # the gaps are no defect
    return rows


def overlay_figure(images, maps, masks, labels, scores, indices, vmin: float, vmax: float, range_note: str = "",
                   numbers: Optional[Sequence[int]] = None):
    """Rows OVERLAY_ROWS, one column per picked image (indices into the split): the input, the
    anomaly map (inferno, colour range [vmin, vmax] for all columns, one colour bar), the map over
    the input (opacity rising with the map value, ground-truth outline in cyan), and the input
    with the ground-truth region filled. images: [N,C,H,W], uint8 or float in [0,1] (C 1 or 3,
    any H, W); maps [N,1,H,W]; masks bool [N,1,H,W]; only the picked images are converted. Each
    row is one mosaic image (overlay_panels) in one axes; the colour bar sits in a narrow column.
    Titles number the images by `numbers` (default: the indices)."""
    indices = torch.as_tensor(indices).long().cpu()
    n = len(indices)
    h, w = images.shape[-2:]
    cell_w = 1.5 * min(3.0, max(0.5, w / h))  # wide or tall images keep their aspect in a readable cell
    cols = max(n, 1)
    fig, grid = plt.subplots(len(OVERLAY_ROWS), 2, figsize=(cell_w * cols + 0.9, 1.5 * len(OVERLAY_ROWS) + 0.4),
                             squeeze=False, gridspec_kw={"width_ratios": [cols, 0.06 * max(1.0, 1.5 / cell_w)]})
    axes, side = grid[:, 0], grid[:, 1]
    rows = overlay_panels(images, maps, masks, indices, vmin, vmax)
    gap = cell_gap(w)
    numbers = indices.tolist() if numbers is None else list(numbers)
    titles = [f"#{k} " + ("anom" if int(labels[i]) else "norm") + f"\n{float(scores[i]):.3g}" for i, k in zip(indices.tolist(), numbers)]
    for ax, name in zip(axes, OVERLAY_ROWS):
        if not rows:
            ax.axis("off")
            continue
        _mosaic_axes(ax, rows[name], name, titles if name == "input" else None, w, gap)
        if name in ("overlay", "ground truth") and rows["mask"].any():
            ax.contour(rows["mask"], levels=[0.5], colors="cyan", linewidths=0.8)
    for ax in (side[0], side[2], side[3]):
        ax.axis("off")
    if rows:
        bar = fig.colorbar(ScalarMappable(norm=Normalize(vmin=vmin, vmax=vmax), cmap="inferno"), cax=side[1])
        bar.ax.tick_params(labelsize=7)
    else:
        side[1].axis("off")
    fig.suptitle(f"Test anomaly maps (colour range {vmin:.3g} to {vmax:.3g}{range_note})", fontsize=8)
    return fig

