"""`python -m freqexp.analyze analysis=<name> ...`: one frequency analysis, printed as tables and
logged to MLflow (CSV + PNG) as a run tagged kind=analysis. Shares the dataset, augment,
filter, hardware and tracking groups with `python -m freqexp`."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import freqexp  # noqa: F401


def run_analysis(cfg: DictConfig, out_dir: Path) -> dict:
    import pandas as pd

    from freqexp.analysis import ANALYSES
    from freqexp.data import DATASETS, build_dataset
    from freqexp.lightning_import import import_lightning
    from freqexp.tracking import Tracker, flatten
    from freqexp.validate import resolve_hardware

    L = import_lightning()

    analysis = ANALYSES.get(cfg.analysis.name)
    hardware = resolve_hardware(cfg.hardware)
    L.seed_everything(cfg.seed, verbose=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    needs_data = "data" in analysis.__code__.co_varnames[: analysis.__code__.co_argcount]
    data = None
    if needs_data:
        DATASETS.get(cfg.dataset.name).check(cfg.dataset)
        data = build_dataset(cfg.dataset)
    # compute first, then open the MLflow run: a bad run id or option leaves no run behind
    result = analysis(cfg=cfg, data=data, out_dir=out_dir, device=hardware.device)
    files = []
    pd.set_option("display.width", 200)
    for name, table in result.tables.items():
        path = out_dir / f"{name}.csv"
        table.to_csv(path)
        files.append(path)
        print(f"\n== {name} ==\n{table.to_string()}")
    (out_dir / "summary.txt").write_text(result.summary + "\n")
    files += result.figures + [out_dir / "summary.txt"]
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    tracker.start(f"analysis:{cfg.analysis.name}", {"kind": "analysis", "analysis": cfg.analysis.name,
                                                    "dataset": cfg.dataset.name, "summary": result.summary[:5000]})
    try:
        tracker.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
        tracker.log_artifacts(files)
        if result.metrics:
            tracker.log_metrics(result.metrics)
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("FAILED")
        raise
    print(f"\n{result.summary}\n  results  {out_dir}\n  MLflow   {tracker.uri}   run {tracker.run_id}")
    return {"summary": result.summary, "run_id": tracker.run_id, "tables": result.tables}


@hydra.main(version_base="1.3", config_path="pkg://freqexp.conf", config_name="analyze")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from freqexp.errors import FreqexpError

    try:
        run_analysis(cfg, Path(HydraConfig.get().runtime.output_dir))
    except FreqexpError as e:
        print(f"freqexp.analyze: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
