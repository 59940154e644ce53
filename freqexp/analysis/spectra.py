"""Spectra of images and of CutPaste: band_energy, cutpaste_spectrum, filter_effect."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pandas as pd
import torch
from omegaconf import OmegaConf

from freqexp.analysis import ANALYSES, AnalysisResult
from freqexp.errors import ConfigError
from freqexp.freq.bands import BAND_NAMES, band_shares, check_edges


def shares_row(images: torch.Tensor, edges, batch: int = 2048) -> Dict[str, float]:
    """Mean per-image band shares (%) of float images [N,C,H,W]."""
    parts = [band_shares(images[i : i + batch], edges) for i in range(0, len(images), batch)]
    mean = torch.cat(parts).mean(0)
    return {name: float(v) for name, v in zip(BAND_NAMES, mean)}


def as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def cap(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if n is None or len(images) <= n:
        return images
    g = torch.Generator().manual_seed(seed)
    return images[torch.randperm(len(images), generator=g)[:n]]


def band_bar_plot(df: pd.DataFrame, path: Path, title: str, ylabel: str = "share of spectral energy (%)", log: bool = False) -> Path:
    from freqexp.plots import plt, save_figure

    cols = [c for c in BAND_NAMES if c in df.columns]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cols), 3.6))
    n = len(df)
    width = 0.8 / max(n, 1)
    for i, (label, row) in enumerate(df[cols].iterrows()):
        ax.bar([j + i * width for j in range(len(cols))], row.values, width, label=str(label))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], cols)
    ax.set(ylabel=ylabel, title=title)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


@ANALYSES.register("band_energy")
def band_energy(cfg, data, out_dir: Path, **_) -> AnalysisResult:
    """Share of spectral energy per band for normal vs anomalous images of a split (and per
    class where the dataset has classes), and anomalous - normal in percentage points."""
    a = cfg.analysis
    edges = check_edges(a.band_edges, "analysis.band_edges")
    split = getattr(data, a.split)
    images, labels = as_float(split.images), split.labels
    rows = {
        "normal": shares_row(cap(images[labels == 0], a.max_images, cfg.seed), edges),
        "anomalous": shares_row(cap(images[labels == 1], a.max_images, cfg.seed), edges),
    }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.loc["anomalous - normal (pp)"] = table.loc["anomalous"] - table.loc["normal"]
    tables = {"band_energy": table.round(3)}
    classes = data.info.get("test_classes") if a.split == "test" else None
    if a.per_class and classes is not None:
        from freqexp.data.fashion_mnist import CLASSES

        per = {}
        for c in classes.unique().tolist():
            sel = classes == c
            per[f"{c} {CLASSES[c]}"] = {**shares_row(cap(images[sel], a.max_images, cfg.seed), edges), "normal": bool((labels[sel] == 0).all())}
        tables["band_energy_per_class"] = pd.DataFrame.from_dict(per, orient="index").round(3)
    fig = band_bar_plot(table.loc[["normal", "anomalous"]], out_dir / "band_energy.png", f"Band energy ({a.split} split)", log=True)
    diff = table.loc["anomalous - normal (pp)"]
    most = diff.abs().idxmax()
    summary = (f"anomalous - normal: " + ", ".join(f"{b} {diff[b]:+.2f} pp" for b in BAND_NAMES)
               + f"; the largest difference is in {most}.")
    return AnalysisResult(tables, [fig], summary, {f"band_energy/diff_{b}": float(diff[b]) for b in BAND_NAMES})


def build_augments(specs) -> Dict[str, torch.nn.Module]:
    from freqexp.augment import build_augment

    out = {}
    for label, spec in specs.items():
        if not OmegaConf.is_dict(spec) or "name" not in spec:
            raise ConfigError(f"analysis.augments.{label}", "must be an augment spec such as {name: cutpaste}")
        module = build_augment(spec)
        if not hasattr(module, "synthesize"):
            raise ConfigError(f"analysis.augments.{label}", f"augment {spec.name!r} makes no pseudo-anomalies; use a CutPaste-family augment")
        out[label] = module
    return out


def normal_images(data, n: int, seed: int) -> torch.Tensor:
    return cap(as_float(data.val.images[data.val.labels == 0]), n, seed)


@ANALYSES.register("cutpaste_spectrum")
def cutpaste_spectrum(cfg, data, out_dir: Path, **_) -> AnalysisResult:
    """For each augment: band shares of original vs augmented images (change in pp) and of the
    difference image (what the augment introduced)."""
    a = cfg.analysis
    edges = check_edges(a.band_edges, "analysis.band_edges")
    x = normal_images(data, a.n_images, cfg.seed)
    original = shares_row(x, edges)
    change, diff_rows = {}, {}
    for label, aug in build_augments(a.augments).items():
        torch.manual_seed(cfg.seed)  # same boxes for every augment: only the patch treatment differs
        augmented, _ = aug.synthesize(x)
        after = shares_row(augmented, edges)
        change[label] = {b: after[b] - original[b] for b in BAND_NAMES}
        diff_rows[label] = shares_row(augmented - x, edges)
    change_t = pd.DataFrame.from_dict(change, orient="index").round(3)
    diff_t = pd.DataFrame.from_dict(diff_rows, orient="index").round(3)
    figs = [band_bar_plot(diff_t, out_dir / "cutpaste_difference_spectrum.png", "Spectrum of the difference image (augmented - original)")]
    first = next(iter(diff_rows))
    summary = (f"original normals: very_low {original['very_low']:.2f} %, very_high {original['very_high']:.2f} %; "
               + "; ".join(f"{k}: very_low {v['very_low']:+.2f} pp, very_high {v['very_high']:+.2f} pp" for k, v in change.items())
               + f". The difference image of {first} spreads over bands: "
               + ", ".join(f"{b} {diff_rows[first][b]:.1f} %" for b in BAND_NAMES) + ".")
    return AnalysisResult({"cutpaste_change_pp": change_t, "cutpaste_difference": diff_t,
                           "original": pd.DataFrame([original], index=["original"]).round(3)}, figs, summary)


@ANALYSES.register("filter_effect")
def filter_effect(cfg, data, out_dir: Path, **_) -> AnalysisResult:
    """The very_high share of the CutPaste difference image when the patch is filtered with each
    filter option (frequency CutPaste, strategy patch_filter), with identical boxes throughout."""
    from freqexp.augment.cutpaste import FrequencyCutPaste

    a = cfg.analysis
    edges = check_edges(a.band_edges, "analysis.band_edges")
    x = normal_images(data, a.n_images, cfg.seed)
    rows = {}
    for label, spec in a.filters.items():
        aug = FrequencyCutPaste(p=1.0, scale=tuple(a.scale), strategy="patch_filter", patch_filter=OmegaConf.to_container(spec))
        torch.manual_seed(cfg.seed)
        augmented, _ = aug.synthesize(x)
        rows[label] = shares_row(augmented - x, edges)
    table = pd.DataFrame.from_dict(rows, orient="index").round(3)
    fig = band_bar_plot(table[["very_high"]].T, out_dir / "filter_effect.png", "very_high share of the CutPaste difference image", ylabel="very_high share (%)")
    summary = "very_high share of the difference image: " + ", ".join(f"{k} {v:.1f} %" for k, v in table["very_high"].items()) + "."
    return AnalysisResult({"filter_effect": table}, [fig], summary, {f"filter_effect/very_high/{k}": float(v) for k, v in table["very_high"].items()})
