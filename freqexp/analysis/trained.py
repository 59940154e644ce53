"""Analyses of a trained run (by MLflow run id): residual_spectrum (the FAIR hypothesis) and
robustness (AUROC under noise, brightness and contrast shifts)."""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict

import pandas as pd
import torch
from omegaconf import OmegaConf

from freqexp.analysis import ANALYSES, AnalysisResult
from freqexp.analysis.spectra import as_float, band_bar_plot, cap
from freqexp.errors import ConfigError
from freqexp.freq.bands import BAND_NAMES, band_shares, check_edges
from freqexp.metrics import average_precision, roc_auc


def load_run(uri: str, run_id, hardware_cfg):
    """(the run's config, its LightningModule with its weights, its data), on this machine's
    hardware (a run trained on a GPU can be analysed on a CPU)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from freqexp.data import build_dataset
    from freqexp.data.pseudo import pseudo_generator_for, trains_on_augment, with_pseudo_val
    from freqexp.tracking import resolve_uri
    from freqexp.training import build_module
    from freqexp.validate import make_plan

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if run_id in (None, "", "???"):
        raise ConfigError("analysis.run_id", "give the MLflow run id of a trained run (printed in its summary, shown in the MLflow UI)")
    uri = resolve_uri(uri)
    client = MlflowClient(uri)
    try:
        client.get_run(str(run_id))
    except MlflowException:
        raise ConfigError("analysis.run_id", f"no run {run_id} in {uri}; check tracking.uri and the id") from None
    tmp = Path(tempfile.mkdtemp(prefix="freqexp-run-"))
    try:
        cfg_path = client.download_artifacts(str(run_id), "config.yaml", str(tmp))
        weights_path = client.download_artifacts(str(run_id), "model.pt", str(tmp))
    except Exception:
        raise ConfigError("analysis.run_id", f"run {run_id} has no config.yaml and model.pt artifacts (only finished freqexp runs do)") from None
    run_cfg = OmegaConf.load(cfg_path)
    run_cfg.hardware = hardware_cfg
    plan = make_plan(run_cfg)
    plan.model.load_state_dict(torch.load(weights_path, map_location="cpu"))
    module = build_module(plan, run_cfg).to(plan.hardware.device).eval()
    data = build_dataset(run_cfg.dataset)
    if run_cfg.dataset.get("val_anomalies") == "pseudo":
        generator = pseudo_generator_for(run_cfg.dataset, plan.augment, trains_on_augment(plan.model, plan.augment))
        data = with_pseudo_val(data, plan.augment, run_cfg.dataset.split_seed, generator=generator)
    return run_cfg, module, data


def run_id(analysis_cfg):
    return None if OmegaConf.is_missing(analysis_cfg, "run_id") else analysis_cfg.run_id


def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device, batch: int = 1024) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i : i + batch].to(device)).cpu() for i in range(0, len(x), batch)])


def residuals(module, x: torch.Tensor) -> torch.Tensor:
    """recon - target as the model scores it (with the run's filter placement)."""
    x_in, target = module.model_io(x, train=False)
    r = module.model.reconstruct(x_in).float() - target.float()
    return module.filter(r) if module.placement == "score" else r


def normalized_entropy(shares: Dict[str, float]) -> float:
    p = torch.tensor([shares[b] for b in BAND_NAMES]) / 100.0
    p = p[p > 0]
    return float(-(p * p.log()).sum() / math.log(len(BAND_NAMES)))


@ANALYSES.register("residual_spectrum")
def residual_spectrum(cfg, out_dir: Path, device, **_) -> AnalysisResult:
    """Band shares of the reconstruction error of normal vs anomalous test images. FAIR's
    observation: normal errors are biased to high frequencies, anomalous ones spread over all bands."""
    a = cfg.analysis
    edges = check_edges(a.band_edges, "analysis.band_edges")
    _, module, data = load_run(cfg.tracking.uri, run_id(a), cfg.hardware)
    x, y = as_float(data.test.images), data.test.labels
    rows = {}
    for name, sel in (("normal", y == 0), ("anomalous", y == 1)):
        xs = cap(x[sel], a.max_images, cfg.seed)
        shares = batched(lambda b: band_shares(residuals(module, b), edges), xs, device)
        rows[name] = {bn: float(v) for bn, v in zip(BAND_NAMES, shares.mean(0))}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.loc["anomalous - normal (pp)"] = table.loc["anomalous"] - table.loc["normal"]
    hf = {k: rows[k]["high"] + rows[k]["very_high"] for k in rows}
    ent = {k: normalized_entropy(rows[k]) for k in rows}
    biased = hf["normal"] > hf["anomalous"]
    spread = ent["anomalous"] > ent["normal"]
    verdict = "supported" if biased and spread else ("partly supported" if biased or spread else "not supported")
    summary = (f"FAIR hypothesis {verdict} for run {run_id(a)}: high+very_high share of the residual is "
               f"{hf['normal']:.1f} % for normal vs {hf['anomalous']:.1f} % for anomalous images "
               f"({'normal errors are' if biased else 'normal errors are not'} biased to high frequencies); "
               f"band entropy (0 = one band, 1 = uniform) {ent['normal']:.3f} normal vs {ent['anomalous']:.3f} anomalous "
               f"({'anomalous errors spread wider' if spread else 'anomalous errors do not spread wider'}).")
    fig = band_bar_plot(table.loc[["normal", "anomalous"]], out_dir / "residual_spectrum.png", "Spectrum of the reconstruction error (test)", log=True)
    metrics = {"residual/hf_normal": hf["normal"], "residual/hf_anomalous": hf["anomalous"],
               "residual/entropy_normal": ent["normal"], "residual/entropy_anomalous": ent["anomalous"]}
    return AnalysisResult({"residual_spectrum": table.round(3)}, [fig], summary, metrics)


PERTURBATIONS: Dict[str, Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]] = {
    "noise_std": lambda x, v, g: (x + v * torch.randn(x.shape, generator=g)).clamp(0, 1),
    "brightness": lambda x, v, g: (x + v).clamp(0, 1),
    "contrast": lambda x, v, g: ((x - x.mean(dim=(-2, -1), keepdim=True)) * v + x.mean(dim=(-2, -1), keepdim=True)).clamp(0, 1),
}


@ANALYSES.register("robustness")
def robustness(cfg, out_dir: Path, device, **_) -> AnalysisResult:
    """Test AUROC / AP of a trained run under gaussian noise, brightness and contrast shifts, and
    the score margin (mean anomalous - mean normal score, in units of the normal scores' std)."""
    a = cfg.analysis
    _, module, data = load_run(cfg.tracking.uri, run_id(a), cfg.hardware)
    g_pick = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(len(data.test.images), generator=g_pick)[: a.max_images]
    x, y = as_float(data.test.images[idx]), data.test.labels[idx]
    if int(y.sum()) in (0, len(y)):
        raise ConfigError("analysis.max_images", "the sampled test images hold only one class; raise max_images")
    rows = []
    for kind in PERTURBATIONS:
        for value in a[kind]:
            g = torch.Generator().manual_seed(cfg.seed)
            xp = PERTURBATIONS[kind](x, float(value), g)
            scores = batched(lambda b: module.score(b)[1], xp, device)
            normal, anomalous = scores[y == 0], scores[y == 1]
            margin = float((anomalous.mean() - normal.mean()) / normal.std().clamp_min(1e-12))
            rows.append({"perturbation": kind, "value": float(value), "test_auroc": roc_auc(scores, y),
                         "test_ap": average_precision(scores, y), "score_margin": margin})
    table = pd.DataFrame(rows)
    fig = robustness_plot(table, out_dir / "robustness.png")
    worst = table.loc[table["test_auroc"].idxmin()]
    summary = (f"test AUROC ranges {table['test_auroc'].min():.4f}-{table['test_auroc'].max():.4f}; "
               f"worst under {worst['perturbation']}={worst['value']:g} ({worst['test_auroc']:.4f}, margin {worst['score_margin']:.2f} std).")
    return AnalysisResult({"robustness": table.round(5)}, [fig], summary, {"robustness/min_auroc": float(table["test_auroc"].min())})


def robustness_plot(table: pd.DataFrame, path: Path) -> Path:
    from freqexp.plots import plt, save_figure

    kinds = list(PERTURBATIONS)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        t = table[table["perturbation"] == kind].sort_values("value")
        ax.plot(t["value"], t["test_auroc"], marker="o")
        ax.set(xlabel=kind, ylabel="test AUROC", title=f"AUROC vs {kind}")
        ax.grid(alpha=0.3)
    return save_figure(fig, path)
