"""What a sweep optimizes and what its jobs leave behind, read by validation, by each run and by
the multirun side (pruning, the sweep summary, the best runs' figures): the sweep objective
(`sweep.objective`), a job's status file, and the figure settings (`tracking.figures`,
`tracking.figures_best`). Kept below everything that reads them: it imports nothing from freqexp
but the generic checks."""
from __future__ import annotations

from typing import Optional

from freqexp.checks import did_you_mean
from freqexp.errors import ConfigError

STATUS_FILE = "job_status.json"  # one per job dir, written by freqexp.run.task

# What a sweep may optimize: validation and speed metrics. Test metrics are reported, never optimized.
OBJECTIVE_METRICS = ("val/auroc", "val/ap", "val/f1", "val/throughput", "train/throughput", "sys/peak_memory_mb")


def objectives(cfg) -> list[str]:
    value = cfg.get("sweep", {}).get("objective", "val/auroc")
    keys = [value] if isinstance(value, str) else list(value or [])
    for key in keys:
        if isinstance(key, str) and key.startswith("test/"):
            raise ConfigError("sweep.objective", f"{key} is a test metric: the test split is only reported; optimize one of {', '.join(OBJECTIVE_METRICS)}")
        if key not in OBJECTIVE_METRICS:
            raise ConfigError("sweep.objective", f"no run logs {key!r}; use one of {', '.join(OBJECTIVE_METRICS)} (or a list of them)")
    if not keys:
        raise ConfigError("sweep.objective", f"give at least one of {', '.join(OBJECTIVE_METRICS)}")
    return keys


def first_objective(job: dict) -> Optional[float]:
    """A job's sweep objective from its status (the first of several), or None when it has none."""
    value = job.get("objective")
    value = value[0] if isinstance(value, list) else value
    return float(value) if value is not None else None


# -- figure settings (see freqexp.multirun.figures) -------------------------------------------------
MODES = ("auto", "all", "best", "none")


def mode(cfg, multirun: Optional[bool] = None) -> str:
    """The resolved `tracking.figures` (all, best or none); auto by where the run is: a job of a
    --multirun (told, or read from Hydra) or a single run."""
    value = cfg.tracking.get("figures", "auto")
    if value not in MODES:
        raise ConfigError("tracking.figures", f"no option {value!r}{did_you_mean(str(value), MODES)}; options: {', '.join(MODES)}")
    if value != "auto":
        return value
    return "best" if (in_multirun() if multirun is None else multirun) else "all"


def in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def best_count(cfg) -> int:
    k = cfg.tracking.get("figures_best", 3)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError("tracking.figures_best", f"must be an integer >= 0 (runs of a sweep that get figures); got {k!r}")
    return k
