"""A run's figures: the data they are drawn from (`figure_data`, saved as figures.npz beside the
run's outputs) and the drawing (`draw`). `tracking.figures` says when they are drawn:

    all    every run draws them when it ends (a single run's default)
    best   every run saves figures.npz (a few KB at 28 px); when a sweep ends, its best
           `tracking.figures_best` runs by the sweep objective get their figures drawn and
           logged; any other run's on demand (below). A sweep's default: drawing is most of a
           small job's fixed cost.
    none   no figures and no figures.npz
    auto   all in a single run, best in a --multirun (the default)

    python -m freqexp.figures RUN_DIR|RUN_ID ... [--uri sqlite:///outputs/mlflow.db]

draws the figures of runs that saved figures.npz, into the run directory (or, given a run id,
from the run's logged figures.npz into outputs/figures/RUN_ID/) and logs them to the runs'
MLflow artifacts."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from freqexp.errors import ConfigError
from freqexp.objective import STATUS_FILE, best_count, first_objective, mode, objectives

NPZ = "figures.npz"
GRID_PER_CLASS = 8  # reconstruction grid: the first 8 normal and the first 8 anomalous test images


def _unit_uint8(x) -> np.ndarray:
    """Images as shown ([0,1], clipped) in 8 bits: what a figure can show of them, at a quarter of the size."""
    import torch

    x = torch.as_tensor(x).detach().cpu()
    if x.dtype == torch.uint8:
        return x.numpy()
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _maps(x) -> np.ndarray:
    """Maps in float16 when that keeps them to within 1/1024 of their range (half the size),
    else float32 (values beyond float16's range, or a large offset: 1000 + small detail)."""
    import torch

    arr = torch.as_tensor(x).detach().float().cpu().numpy()
    if arr.size == 0 or not np.isfinite(arr).all() or float(np.abs(arr).max()) >= 6e4:
        return arr
    half = arr.astype(np.float16)
    span = float(arr.max() - arr.min())
    error = float(np.abs(half.astype(np.float32) - arr).max())
    return half if error <= span / 1024 else arr


def figure_data(module, data, scored, metrics) -> Dict[str, np.ndarray]:
    """Everything the run's figures show, as numpy arrays: the test scores and labels (curves,
    histogram), the reconstruction grid's images, reconstructions and error maps, and, where the
    test split has pixel masks, the overlay figure's picked images, maps and masks with the
    colour range of all test maps."""
    import torch

    from freqexp import plots

    test = scored["test"]
    labels = data.test.labels.cpu()
    pick = torch.cat([torch.nonzero(labels == 0).flatten()[:GRID_PER_CLASS], torch.nonzero(labels == 1).flatten()[:GRID_PER_CLASS]])
    x = module.as_input(data.test.images[pick.to(data.test.images.device)].to(module.device))
    with torch.no_grad():
        x_in, _ = module.model_io(x, train=False)
        recon = module.model.reconstruct(x_in)
        maps = module.anomaly_map(x)
    out = {"scores": test.scores.detach().float().cpu().numpy(), "labels": test.labels.detach().cpu().numpy().astype(np.int8),
           # the curves are pooled over every test image: a multi-category test's test/auroc is the categories' mean
           "metrics": np.array([metrics.get("test/pooled_auroc", metrics["test/auroc"]), metrics.get("test/pooled_ap", metrics["test/ap"]),
                                metrics.get("val/threshold", float("nan"))], dtype=np.float64),
           "grid_inputs": _unit_uint8(x), "grid_recons": _unit_uint8(recon), "grid_maps": _maps(maps),
           "grid_labels": labels[pick].numpy().astype(np.int8), "grid_scores": test.scores[pick].detach().float().cpu().numpy()}
    names = sorted({k.split("/")[2] for k in metrics if k.startswith("test/category/")})
    if names:  # a test of several categories (the zero-shot protocol): each one's AUROCs
        out["category_names"] = np.array(names)
        for key in ("auroc", "pixel_auroc"):
            out[f"category_{key}"] = np.array([metrics.get(f"test/category/{n}/{key}", np.nan) for n in names], dtype=np.float64)
    if data.test.masks is not None and test.maps is not None:  # evaluate keeps the test maps where masks exist
        idx = plots.overlay_indices(labels)
        vmin, vmax = plots.map_colour_range(test.maps)
        out.update({"overlay_indices": idx.numpy(), "overlay_range": np.array([vmin, vmax], dtype=np.float64),
                    "overlay_images": _unit_uint8(data.test.images[idx.to(data.test.images.device)]),
                    "overlay_maps": _maps(test.maps[idx.to(test.maps.device)]),
                    "overlay_masks": data.test.masks[idx.to(data.test.masks.device)].detach().cpu().bool().numpy(),
                    "overlay_labels": labels[idx].numpy().astype(np.int8),
                    "overlay_scores": test.scores[idx].detach().float().cpu().numpy()})
    return out


def save(fd: Dict[str, np.ndarray], path: Path) -> Path:
    np.savez_compressed(path, **fd)
    return path


def load(path: Path) -> Dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def draw(fd: Dict[str, np.ndarray], output_dir: Path) -> List[Path]:
    """The figures of one run from its figure data, written into output_dir: reconstructions.png,
    roc.png, pr.png, score_hist.png, (with masks) anomaly_overlays.png and (a test of several
    categories) categories.png."""
    import torch

    from freqexp import plots

    t = {k: torch.from_numpy(np.asarray(v)) for k, v in fd.items() if np.asarray(v).dtype.kind != "U"}  # names stay numpy
    scores, labels = t["scores"], t["labels"].long()
    auroc, ap, threshold = (float(v) for v in fd["metrics"])
    paths = [
        plots.reconstruction_grid(t["grid_inputs"], t["grid_recons"], t["grid_maps"].float(), t["grid_labels"].long(),
                                  t["grid_scores"], output_dir / "reconstructions.png"),
        plots.roc_plot(scores, labels, auroc, output_dir / "roc.png"),
        plots.pr_plot(scores, labels, ap, output_dir / "pr.png"),
        plots.score_histogram(scores, labels, threshold, output_dir / "score_hist.png"),
    ]
    if "overlay_indices" in fd:
        n = len(fd["overlay_indices"])
        vmin, vmax = (float(v) for v in fd["overlay_range"])
        fig = plots.overlay_figure(t["overlay_images"], t["overlay_maps"].float(), t["overlay_masks"], t["overlay_labels"].long(),
                                   t["overlay_scores"], torch.arange(n), vmin, vmax, numbers=fd["overlay_indices"].tolist(),
                                   range_note=plots.RANGE_NOTE)
        paths.append(plots.save_figure(fig, output_dir / "anomaly_overlays.png"))
    if "category_names" in fd:
        paths.append(plots.category_bars([str(n) for n in fd["category_names"]], fd["category_auroc"], fd["category_pixel_auroc"],
                                         output_dir / "categories.png"))
    return paths


def _descending(config) -> bool:
    """Best first: the Optuna sweeper's direction (an enum or a name) when there is one, else by
    the objective's name (a loss or time: lower is better)."""
    from freqexp.stats import lower_is_better

    from omegaconf import ListConfig

    direction = (config.get("hydra", {}).get("sweeper", {}) or {}).get("direction")
    if isinstance(direction, (list, tuple, ListConfig)):  # several objectives: the first one's
        direction = direction[0] if len(direction) else None
    if direction is not None:
        return str(getattr(direction, "name", direction)).lower() != "minimize"
    return not lower_is_better(objectives(config)[0])


def draw_best(config, jobs: Sequence[dict]) -> List[str]:
    """At the end of a sweep whose runs saved figures.npz: draw and log the figures of the best
    `tracking.figures_best` runs by the sweep objective, among the runs it finished and those it
    skipped because they had finished before (their figures.npz from MLflow; a run that already
    has its figures is left as it is). A run that cannot be drawn is said in the log and skipped.
    Returns the job dirs drawn."""
    import logging
    import math

    if mode(config, multirun=True) != "best":
        return []
    k = best_count(config)
    ranked = [j for j in jobs if j["status"] in ("finished", "skipped") and j.get("run_id")
              and first_objective(j) is not None and math.isfinite(first_objective(j))]
    ranked.sort(key=first_objective, reverse=_descending(config))
    if not ranked or k == 0:
        return []
    from freqexp.tracking import Tracker

    client = Tracker(config.tracking.uri, config.tracking.experiment).client
    drawn = []
    for j in ranked[:k]:
        job_dir = Path(j["job_dir"])
        try:
            logged = {a.path for a in client.list_artifacts(j["run_id"])}
            if "reconstructions.png" in logged:
                continue  # drawn before (an earlier sweep's best, or tracking.figures=all)
            if not (job_dir / NPZ).exists():
                if NPZ not in logged:
                    continue  # saved nothing to draw (tracking.figures=none)
                with tempfile.TemporaryDirectory() as tmp:
                    fd = load(Path(client.download_artifacts(j["run_id"], NPZ, tmp)))
            else:
                fd = load(job_dir / NPZ)
            for p in draw(fd, job_dir):
                client.log_artifact(j["run_id"], str(p))
            drawn.append(j["job_dir"])
        except Exception as e:  # one run's figures never stop the others'
            logging.getLogger("freqexp").warning("figures of run %s not drawn: %s", j["run_id"], e)
    return drawn


def _status_run_id(run_dir: Path) -> Optional[str]:
    status = run_dir / STATUS_FILE
    if status.exists():
        return json.loads(status.read_text()).get("run_id")
    return None


DEFAULT_URI = "sqlite:///outputs/mlflow.db"


def _run_dir_uri(run_dir: Path) -> str:
    """The tracking.uri a run directory's config.yaml names, else the default store. A relative
    sqlite path was relative to where the sweep ran: looked for here, then in the run
    directory's parents (a job dir lies under that directory's outputs/)."""
    from omegaconf import OmegaConf

    config = run_dir / "config.yaml"
    uri = OmegaConf.load(config).get("tracking", {}).get("uri") if config.exists() else None
    uri = uri if isinstance(uri, str) else DEFAULT_URI
    relative = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:" else None
    if relative and not Path(relative).expanduser().is_absolute():
        for base in (Path.cwd(), *run_dir.resolve().parents):
            if (base / relative).is_file():
                return "sqlite:///" + str(base / relative)
    return uri


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m freqexp.figures", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR|RUN_ID", help="a run's directory (holding figures.npz) or its MLflow run id")
    ap.add_argument("--uri", help="the MLflow store the runs are logged in (default: a run directory's own tracking.uri, "
                                  "else sqlite:///outputs/mlflow.db)")
    args = ap.parse_args(argv)
    from mlflow.tracking import MlflowClient

    from freqexp.errors import ReportError
    from freqexp.tracking import existing_store

    clients: Dict[str, MlflowClient] = {}

    def client_for(uri: str) -> MlflowClient:
        uri = existing_store(uri)  # never creates an empty store (a typo in the path)
        if uri not in clients:
            clients[uri] = MlflowClient(tracking_uri=uri)
        return clients[uri]

    failed = 0
    for target in args.runs:
        run_dir = Path(target)
        try:
            if run_dir.is_dir():
                if not (run_dir / NPZ).exists():
                    raise ReportError(f"{run_dir} holds no {NPZ} (a run with tracking.figures=all has its figures already; "
                                      "with none it saved nothing to draw)")
                run_id, paths = _status_run_id(run_dir), draw(load(run_dir / NPZ), run_dir)
                uri = args.uri or _run_dir_uri(run_dir)
            else:
                uri = args.uri or DEFAULT_URI
                client = client_for(uri)
                run_id = target
                run_dir = Path("outputs") / "figures" / run_id
                with tempfile.TemporaryDirectory() as tmp:
                    try:
                        local = client.download_artifacts(run_id, NPZ, tmp)
                    except Exception as e:
                        raise ReportError(f"{target} is neither a run directory nor a run with {NPZ} in {uri} ({type(e).__name__})")
                    fd = load(Path(local))
                run_dir.mkdir(parents=True, exist_ok=True)
                paths = draw(fd, run_dir)
            if run_id:
                client = client_for(uri)
                for p in paths:
                    client.log_artifact(run_id, str(p))
            print(f"{target}: {', '.join(p.name for p in paths)} in {run_dir}" + (f", logged to run {run_id}" if run_id else ""))
        except Exception as e:  # one line per run that cannot be drawn; the others still are
            text = str(e) if isinstance(e, (ConfigError, ReportError)) else f"{target}: {type(e).__name__}: {' '.join(str(e).split())}"
            print(f"freqexp.figures: error: {text}", file=sys.stderr)
            failed += 1
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
