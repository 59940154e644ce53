"""Step 1 of a run: check every value and build every cheap object, so a bad config fails
with one line naming the key before data is read, a model trained or an MLflow run opened."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from freqexp.augment import build_augment
from freqexp.checks import boolean, choice, integer, is_int, number
from freqexp.data import DATASETS, dataset_shape
from freqexp.errors import ConfigError
from freqexp.freq import build_filter
from freqexp.losses import CompositeLoss, build_loss
from freqexp.metrics import SCORE_REDUCTIONS
from freqexp.models import ReconstructionModel, build_model
from freqexp.objective import best_count, mode as figure_mode, objectives
from freqexp.training import OPTIMIZERS, SCHEDULERS

# Mixed precision keeps fp32 weights and fp32 inputs; "*-true" modes would need every input cast.
PRECISIONS = {
    "cpu": ("32-true", "bf16-mixed"),
    "gpu": ("16-mixed", "bf16-mixed", "32-true"),
}


@dataclass
class Hardware:
    accelerator: str  # cpu | gpu
    precision: str
    device: torch.device
    channels_last: bool = False  # the model's 4-D weights and its input batches in NHWC (hardware.channels_last)


@dataclass
class Plan:
    shape: tuple[int, int, int]
    model: ReconstructionModel
    loss: CompositeLoss
    augment: nn.Module
    filter: nn.Module
    placement: str
    hardware: Hardware
    fit_all: bool = False  # a one-pass model fitted on every normal training image (trainer.fit_on); no validation
    zero_shot: bool = False  # dataset.train_from: trained on another dataset's labelled images; no validation

    @property
    def validated(self) -> bool:
        """Whether the run has a validation split (epoch selection, threshold, sweep objective)."""
        return not (self.fit_all or self.zero_shot)


def resolve_hardware(hw) -> Hardware:
    accelerator = choice("hardware.accelerator", hw.accelerator, ("auto", "cpu", "gpu", "cuda"))
    has_cuda = torch.cuda.is_available()
    if accelerator == "auto":
        accelerator = "gpu" if has_cuda else "cpu"
    if accelerator == "cuda":
        accelerator = "gpu"
    if accelerator == "gpu" and not has_cuda:
        raise ConfigError("hardware.accelerator", "gpu was asked for but no CUDA device is visible; use hardware=auto or hardware=cpu")
    precision = str(hw.precision)
    if precision == "auto":
        precision = "16-mixed" if accelerator == "gpu" else "32-true"
    if accelerator == "cpu" and precision == "16-mixed":
        raise ConfigError("hardware.precision", "16-mixed needs a GPU; on CPU use 32-true or bf16-mixed")
    choice("hardware.precision", precision, PRECISIONS[accelerator])
    if integer("hardware.devices", hw.get("devices", 1), 1) != 1:
        raise ConfigError("hardware.devices", "one device per run; run several jobs to use several GPUs")
    index = hw.get("device_index")
    if index is not None:
        if accelerator != "gpu":
            index = None  # a sweep's device slot means nothing on the CPU
        elif isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < torch.cuda.device_count():
            raise ConfigError("hardware.device_index", f"must be a visible GPU, 0 to {torch.cuda.device_count() - 1}, or null; got {index!r}")
    return Hardware(accelerator, precision, torch.device("cuda", index) if accelerator == "gpu" else torch.device("cpu"))


def resolve_channels_last(hw, hardware: Hardware, model: ReconstructionModel) -> bool:
    """hardware.channels_last: true | false | auto. auto: NHWC for a trained convolutional model on
    a CPU, where oneDNN's NHWC kernels run our conv autoencoders about 1.7x faster in inference and
    ~8 % faster in training (benchmarks/channels_last.py); off on a GPU until measured there, and off
    for one-pass models (the memory banks' backbone has its own NHWC inference copy)."""
    value = hw.get("channels_last", "auto")
    if not isinstance(value, bool) and value != "auto":
        raise ConfigError("hardware.channels_last", f"must be auto, true or false; got {value!r}")
    if isinstance(value, bool):
        return value
    has_conv = any(p.dim() == 4 for p in model.parameters())
    return hardware.accelerator == "cpu" and has_conv and not model.gradient_free


def check_loss_for_model(cfg, model: ReconstructionModel) -> None:
    """A model that trains on its own objective accepts only the terms it lists."""
    from freqexp.losses import parse_spec

    allowed = model.loss_terms
    if allowed is None:
        return
    bad = [t for t in parse_spec(cfg.loss.spec) if t not in allowed]
    if bad:
        why = f" ({model.loss_note})" if model.loss_note else ""
        raise ConfigError("loss", f"model={cfg.model.name} cannot train with {', '.join(bad)}{why}; use loss= one of {', '.join(allowed)} or a '+' of them")


def make_plan(cfg) -> Plan:
    from freqexp.lightning_import import import_lightning

    L = import_lightning()

    # Seed before anything random is built (model weights), so a run repeats exactly.
    L.seed_everything(integer("seed", cfg.seed, 0), workers=True, verbose=False)
    t = cfg.trainer
    integer("trainer.max_epochs", t.max_epochs, 1)
    integer("trainer.batch_size", t.batch_size, 1)
    integer("trainer.eval_batch_size", t.eval_batch_size, 1)
    integer("trainer.val_every_n_epochs", t.val_every_n_epochs, 1)
    steps = t.get("steps_per_call", "auto")
    if steps != "auto" and (not is_int(steps) or steps < 1):
        raise ConfigError("trainer.steps_per_call", f"must be auto or an integer >= 1; got {steps!r}")
    for key in ("progress_bar", "restore_best", "nan_guard"):
        boolean(f"trainer.{key}", t[key])
    boolean("trainer.early_stopping.enabled", t.early_stopping.enabled)
    if t.restore_best and t.max_epochs % t.val_every_n_epochs:
        raise ConfigError("trainer.val_every_n_epochs", f"must divide trainer.max_epochs ({t.max_epochs}) so the last epoch is validated "
                          f"before the best one is restored; got {t.val_every_n_epochs} (or set trainer.restore_best=false)")
    integer("trainer.early_stopping.patience", t.early_stopping.patience, 0)
    number("trainer.early_stopping.min_delta", t.early_stopping.min_delta, 0.0)
    o = cfg.optim
    choice("optim.name", o.name, OPTIMIZERS)
    number("optim.lr", o.lr, 0.0, low_open=True)
    number("optim.weight_decay", o.weight_decay, 0.0)
    choice("optim.scheduler", o.scheduler, SCHEDULERS)
    number("optim.min_lr_ratio", o.min_lr_ratio, 0.0, 1.0)
    betas = o.get("betas", [0.9, 0.999])
    if isinstance(betas, str) or len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
        raise ConfigError("optim.betas", f"must be two numbers in [0, 1), e.g. [0.5, 0.999]; got {betas!r}")
    milestones = o.get("milestones", [0.8, 0.9])
    if isinstance(milestones, str) or not all(isinstance(m, (int, float)) and not isinstance(m, bool) and 0 < m < 1 for m in milestones):
        raise ConfigError("optim.milestones", f"must be fractions of trainer.max_epochs in (0, 1), e.g. [0.8, 0.9]; got {milestones!r}")
    number("optim.gamma", o.get("gamma", 0.2), 0.0, 1.0, low_open=True)
    choice("score.reduction", cfg.score.reduction, SCORE_REDUCTIONS)
    number("score.topk", cfg.score.topk, 0.0, 1.0, low_open=True)

    from freqexp.tracking import resolve_uri

    resolve_uri(cfg.tracking.uri)
    if not isinstance(cfg.tracking.experiment, str) or not cfg.tracking.experiment.strip():
        raise ConfigError("tracking.experiment", f"must be a non-empty name; got {cfg.tracking.experiment!r}")
    figure_mode(cfg)  # the name only: auto is resolved when the run knows whether it is a sweep's job
    best_count(cfg)
    objectives(cfg)
    DATASETS.get(cfg.dataset.name).check(cfg.dataset)
    from freqexp.data.cache import check_cache_options

    check_cache_options(cfg.dataset)
    shape = dataset_shape(cfg.dataset)
    hardware = resolve_hardware(cfg.hardware)
    loss = build_loss(cfg.loss, image_size=shape[1:])
    model = build_model(cfg.model, shape)
    check_loss_for_model(cfg, model)
    zero_shot = check_zero_shot(cfg, model)
    fit_all = not zero_shot and check_fit_on(cfg, model)
    augment = build_augment(cfg.augment)
    if model.needs_pseudo_anomalies and not zero_shot and not hasattr(augment, "synthesize"):
        from freqexp.augment import AUGMENTS

        makers = [n for n in AUGMENTS.names() if hasattr(AUGMENTS.get(n), "synthesize")]
        raise ConfigError("augment", f"model={cfg.model.name} learns from pseudo-anomalies with masks; use augment={' | '.join(makers)} (got {cfg.augment.name})")
    from freqexp.data.pseudo import check_mask_generator, check_pseudo_validation, trains_on_augment

    if model.needs_pseudo_anomalies and not zero_shot:  # a segmentation target must cover what the paste changed
        check_mask_generator(augment, use=f"model={cfg.model.name}'s segmentation target")
    if not zero_shot:  # zero-shot runs have no validation split
        check_pseudo_validation(cfg.dataset, cfg.augment, trains_on_augment(model, augment))
    filter_module, placement = build_filter(cfg.filter)
    hardware.channels_last = resolve_channels_last(cfg.hardware, hardware, model)
    if placement == "both" and not model.filtered_target:
        raise ConfigError("filter.apply_to", f"model={cfg.model.name} cannot train towards a filtered target (its objective uses the "
                          "target itself, which a high pass takes out of [0, 1]); use apply_to=input or score")
    if placement == "score" and not model.residual_score:
        raise ConfigError("filter.apply_to", f"model={cfg.model.name} does not score by a reconstruction residual, so a filter at "
                          "apply_to=score would have no effect; use input or both")
    return Plan(shape, model, loss, augment, filter_module, placement, hardware, fit_all, zero_shot)


def check_zero_shot(cfg, model: ReconstructionModel) -> bool:
    """dataset.train_from (the zero-shot protocol) is for models that learn from another dataset's
    labelled anomalies or need no training; a model of the target's normal images cannot run it.
    Returns whether the run is zero-shot."""
    if not cfg.dataset.get("train_from"):
        return False
    if model.zero_shot is None:
        from freqexp.models import MODELS, model_class

        able = [n for n in MODELS.names() if getattr(model_class(n), "zero_shot", None)]
        raise ConfigError("dataset.train_from", f"the zero-shot protocol trains on another dataset's labelled images; "
                                                f"model={cfg.model.name} learns the target's normal images. Zero-shot models: {', '.join(able)}")
    return True


def check_fit_on(cfg, model: ReconstructionModel) -> bool:
    """trainer.fit_on for this model: True when it is fitted on every normal training image."""
    from freqexp.data.base import FIT_ON, VAL_FROM_TEST, fits_all_normals

    fit_on = choice("trainer.fit_on", cfg.trainer.get("fit_on", "auto"), FIT_ON)
    val_anomalies = cfg.dataset.get("val_anomalies")
    if fit_on == "all" and not model.gradient_free:
        raise ConfigError("trainer.fit_on", f"all is for one-pass models (memory banks, knn, pca); model={cfg.model.name} "
                                            "is trained and selects on the validation split: use auto or train")
    if fit_on == "all" and val_anomalies in VAL_FROM_TEST:
        raise ConfigError("trainer.fit_on", f"all leaves no validation, yet dataset.val_anomalies={val_anomalies} takes validation "
                                            "anomalies out of the test split; use dataset.val_anomalies=pseudo (the whole test "
                                            "split stays the test) or trainer.fit_on=train")
    return fits_all_normals(fit_on, model.gradient_free, val_anomalies)


def check_searchable(cfg) -> None:
    """An Optuna search optimizes a validation metric: refuse, before any trial, a one-pass model
    that trainer.fit_on fits on every normal training image (it has no validation)."""
    from freqexp.data.base import fits_all_normals
    from freqexp.models import model_class

    keys = [k for k in objectives(cfg) if k.startswith("val/")]
    if keys and cfg.dataset.get("train_from"):
        raise ConfigError("dataset.train_from", f"a zero-shot run has no validation split (it trains a fixed number of epochs "
                                                f"and never sees the target before testing), so no run logs {keys[0]} to search on; "
                                                "use a grid (--multirun) and compare on the test")
    try:
        gradient_free = bool(getattr(model_class(cfg.model.name), "gradient_free", False))
    except ConfigError:
        return  # the run's own check names the model
    if keys and fits_all_normals(cfg.trainer.get("fit_on", "auto"), gradient_free, cfg.dataset.get("val_anomalies")):
        raise ConfigError("trainer.fit_on", f"model={cfg.model.name} is fitted on every normal training image, so no run logs "
                                            f"{keys[0]} to search on; set trainer.fit_on=train (validation on held-out normals)")
