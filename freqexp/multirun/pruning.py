"""Pruning for Optuna searches: Optuna's own pruners, fed each validated epoch's objective.

The freqexp Optuna sweeper (freqexp/multirun/optuna_sweeper.py) asks the study for a trial and runs its
job; the job finds that trial here (`current()`), reports the sweep objective (`val/auroc`; with
trainer.restore_best its value at the best epoch so far, the weights the run would be evaluated
with) after every validation epoch through optuna-integration's Lightning pruning callback, at
step = epochs trained, and stops when the pruner says so. The job then ends its MLflow run KILLED with tags `pruned=true` and
`pruned_epoch`, and returns a `Pruned` result, which the sweeper tells the study as PRUNED.

    sweep.pruner.name: none | median | successive_halving | hyperband | threshold   (and their settings)
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Optional

from freqexp.errors import ConfigError
from freqexp.objective import objectives

PRUNERS = ("none", "median", "successive_halving", "hyperband", "threshold")
# metrics a job reports every validation epoch: what a pruner can watch
PER_EPOCH_OBJECTIVES = ("val/auroc", "val/ap")

_current: Any = None  # the optuna Trial of the job running in this process, if any


@dataclass
class Pruned:
    """What a pruned job returns to the sweeper (instead of an objective value)."""
    epoch: int            # epochs trained when it was stopped (1-based)
    value: Optional[float]  # the last reported objective


def attach(trial: Any) -> None:
    """Set (or clear, with None) the trial of the job about to run in this process. A tuple
    (storage, study_name, trial_id, pruner_cfg) is loaded from the study's storage: how a worker
    process of an asynchronous search finds the trial its parent asked for."""
    global _current
    if isinstance(trial, tuple):
        import optuna

        storage, study_name, trial_id, pruner_cfg, max_epochs = trial
        study = optuna.load_study(study_name=study_name, storage=storage, pruner=build(pruner_cfg, max_epochs))
        trial = optuna.trial.Trial(study, trial_id)
    _current = trial


def current() -> Any:
    return _current


def name_of(pruner_cfg: Any) -> str:
    if pruner_cfg is None:
        return "none"
    name = pruner_cfg if isinstance(pruner_cfg, str) else pruner_cfg.get("name", "none")
    name = "none" if name is None else str(name)
    if name not in PRUNERS:
        close = difflib.get_close_matches(name, PRUNERS, n=2, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ConfigError("sweep.pruner.name", f"no pruner {name!r}; {hint}options: {', '.join(PRUNERS)}")
    return name


def _setting(cfg: Any, key: str, default: Any, low: int) -> int:
    value = cfg.get(key, default) if hasattr(cfg, "get") else default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"sweep.pruner.{key}", f"must be an integer >= {low}; got {value!r}")
    return value


def build(pruner_cfg: Any, max_epochs: int):
    """The Optuna pruner named by `sweep.pruner` (none: Optuna's NopPruner, as Optuna would
    otherwise put a MedianPruner on a study created without one). Steps are epochs trained
    (1-based; see `callback`): min_resource=1 puts the first rung after epoch 1."""
    import optuna

    name = name_of(pruner_cfg)
    cfg = pruner_cfg if hasattr(pruner_cfg, "get") else {}
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=_setting(cfg, "n_startup_trials", 5, 0),
                                           n_warmup_steps=_setting(cfg, "n_warmup_steps", 1, 0))
    if name == "threshold":  # a floor: a trial whose objective is below `lower` after the warm-up stops
        lower = cfg.get("lower", 0.5)
        if isinstance(lower, bool) or not isinstance(lower, (int, float)):
            raise ConfigError("sweep.pruner.lower", f"must be a number (the objective below which a trial stops); got {lower!r}")
        return optuna.pruners.ThresholdPruner(lower=float(lower), n_warmup_steps=_setting(cfg, "n_warmup_steps", 1, 0))
    min_resource = _setting(cfg, "min_resource", 1, 1)
    reduction = _setting(cfg, "reduction_factor", 3, 2)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=reduction)
    max_resource = cfg.get("max_resource", "auto")
    max_resource = int(max_epochs) if max_resource in (None, "auto") else _setting(cfg, "max_resource", max_epochs, min_resource)
    return optuna.pruners.HyperbandPruner(min_resource=min_resource, max_resource=max_resource, reduction_factor=reduction)


def check(config: Any, optuna_sweep: bool) -> None:
    """Raise a ConfigError on `sweep.pruner` for an unknown name or setting, a pruner without an
    Optuna search, with several objectives, or watching a metric that is not reported every
    epoch."""
    pruner_cfg = (config.get("sweep") or {}).get("pruner")
    build(pruner_cfg, int(config.trainer.max_epochs))  # names and settings
    name = name_of(pruner_cfg)
    if name == "none":
        return
    if not optuna_sweep:
        raise ConfigError("sweep.pruner.name", f"{name} prunes the trials of an Optuna search; use it with +sweep=optuna or "
                                               "+sweep=optuna_pruned (or set sweep.pruner.name=none)")
    keys = objectives(config)
    if len(keys) > 1:
        raise ConfigError("sweep.pruner.name", f"Optuna cannot prune a multi-objective search ({', '.join(keys)}); set sweep.pruner.name=none")
    if keys[0] not in PER_EPOCH_OBJECTIVES:
        raise ConfigError("sweep.pruner.name", f"the objective {keys[0]} is measured once at the end; a pruner watches "
                                               f"{' or '.join(PER_EPOCH_OBJECTIVES)}")


def reports_every_epoch(config: Any) -> bool:
    """A trial reports its objective each epoch when there is one objective, measured each epoch."""
    keys = objectives(config)
    return len(keys) == 1 and keys[0] in PER_EPOCH_OBJECTIVES


OBJECTIVE_SO_FAR = "sweep/objective_so_far"  # what a trial reports: see ObjectiveSoFar


def objective_so_far(monitor: str, best: Any = None):
    """A Lightning callback putting OBJECTIVE_SO_FAR in the trainer's callback metrics after each
    validation: the objective the trial would end with if training stopped now. With
    trainer.restore_best (`best`, the BestWeights callback, which must run first) the run is
    evaluated with the weights of its best val/auroc epoch, so that is the objective at that
    epoch, not at the last one: a trial that peaked at epoch 1 is judged by its peak."""
    import torch

    from freqexp.lightning_import import import_lightning

    L = import_lightning()

    class ObjectiveSoFar(L.Callback):
        def __init__(self):
            self.value = None

        def on_validation_end(self, trainer, pl_module):
            current = trainer.callback_metrics.get(monitor)
            if trainer.sanity_checking or current is None:
                return
            if best is None or best.best_epoch == trainer.current_epoch or self.value is None:
                self.value = float(current)
            trainer.callback_metrics[OBJECTIVE_SO_FAR] = torch.tensor(self.value)

    return ObjectiveSoFar()


class _EpochsTrained:
    """A LightningModule seen with current_epoch = epochs trained (1-based)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    @property
    def current_epoch(self) -> int:
        return self._module.current_epoch + 1


def callback(trial: Any):
    """optuna-integration's Lightning pruning callback, reporting OBJECTIVE_SO_FAR after each
    validation epoch at step = epochs trained (1, 2, ...: a pruner's min_resource=1 or
    n_warmup_steps=1 then means "after the first epoch"), and raising optuna.TrialPruned when
    the pruner says so, except after the last epoch."""
    from optuna_integration.pytorch_lightning import PyTorchLightningPruningCallback

    class EpochPruning(PyTorchLightningPruningCallback):
        def on_validation_end(self, trainer, pl_module):
            last = trainer.max_epochs is not None and 0 < trainer.max_epochs <= pl_module.current_epoch + 1
            if last and not trainer.sanity_checking:
                # reported, never pruned: the trial has done all its training, and a rung at the
                # last epoch (successive halving's 9 of 9) would throw a finished result away
                score = trainer.callback_metrics.get(self.monitor)
                if score is not None:
                    self._trial.report(float(score), step=pl_module.current_epoch + 1)
                return
            super().on_validation_end(trainer, _EpochsTrained(pl_module))

    return EpochPruning(trial, monitor=OBJECTIVE_SO_FAR)


def is_pruned(e: BaseException) -> bool:
    try:
        import optuna
    except ImportError:
        return False
    return isinstance(e, optuna.TrialPruned)
