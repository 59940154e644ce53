"""How reconstruction models are trained: one LightningModule shared by every model whose
training is "reconstruct the target under the configured loss", plus the callbacks the run
protocol needs (per-epoch MLflow logging, throughput, best-weights restore)."""
from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from freqexp.augment.base import NoAugment
from freqexp.errors import TrainingError
from freqexp.lightning_import import import_lightning
from freqexp.metrics import average_precision, reduce_map, roc_auc
from freqexp.data.base import IndexBatches, StepGroup, StepGroups
from freqexp.progress import Progress
from freqexp.timing import wait_for_device

L = import_lightning()  # Lightning without torchmetrics' transformers-based metrics (lightning_import.py)

NAN_CHECK_EVERY = 50  # training steps between two NaN-guard checks (each one host-device sync); also at every epoch end

# Scoring on a CPU goes through a batch in chunks whose largest intermediate (one layer's output)
# takes at most this many bytes, so each layer's output is still in the caches when the next one
# reads it: at 28 px the conv models score 1.1-1.7x faster on 2 cores in chunks of 125-250 images
# than in one batch of 1,024 (benchmarks/score_chunks.py; docs/speed.md). A GPU scores whole batches.
CPU_SCORE_CHUNK_BYTES = 12 * 2**20


def largest_output_bytes(modules, run: Callable[[], Any]) -> int:
    """The bytes of the largest tensor any leaf module among `modules` returns while run() runs."""
    largest = 0

    def hook(_module, _inputs, output):
        nonlocal largest
        outputs = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else (output,)
        for t in outputs:
            if isinstance(t, torch.Tensor):
                largest = max(largest, t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in modules if next(m.children(), None) is None]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return largest


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    # a float batch may be a view of the dataset: copy, so an in-place augment cannot change the data
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)


# Attributes set on every training step (Lightning sets _current_fx_name about 44 times a step):
# plain values, never parameters, buffers or submodules, so they skip nn.Module.__setattr__'s
# registry checks (about 80 us a step on 2 CPU cores).
PLAIN_ATTRIBUTES = frozenset({"_current_fx_name", "_steps_unchecked", "_loss_images", "images_seen", "_progress"})


class ReconstructionModule(L.LightningModule):
    def __init__(
        self,
        model: "ReconstructionModel",
        loss: nn.Module,
        augment: nn.Module,
        filter_module: nn.Module,
        filter_placement: str,
        optim: Dict[str, Any],
        score: Dict[str, Any],
        max_epochs: int,
        nan_guard: bool = True,
        channels_last: bool = False,
    ):
        super().__init__()
        self.model, self.loss, self.augment = model, loss, augment
        self.filter, self.placement = filter_module, filter_placement
        self.optim_cfg, self.score_cfg = dict(optim), dict(score)
        # "none" augment and filter are identities: model_io skips their module calls on the hot path
        self.augments = not isinstance(augment, NoAugment)
        self.filters = not isinstance(filter_module, nn.Identity)
        self.max_epochs, self.nan_guard = max_epochs, nan_guard
        # hardware.channels_last: the model's 4-D weights and every image batch in NHWC (as_input)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.images_seen = 0
        # The shared step (training_step below) optimizes by hand: Lightning's automatic optimization
        # wraps each step in a closure and several hooks, about 90 us of host time a step on 2 CPU
        # cores, which a GPU step of a small model waits for. A procedure with its own training_step
        # (DRAEM) keeps automatic optimization unless it says otherwise (GANomaly).
        self.automatic_optimization = type(self).training_step is not ReconstructionModule.training_step
        # the epoch's summed training losses, on the device: [total, term, ...] x images (see check_and_log)
        self._loss_sum: Optional[torch.Tensor] = None
        self._loss_names: list[str] = []
        self._loss_images = 0
        self._steps_unchecked = 0
        self._val_scores: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []
        self._chunk_images: Dict[tuple, int] = {}  # CPU scoring chunk per input shape (score_chunk)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in PLAIN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @classmethod
    def from_plan(cls, plan, cfg, max_epochs: Optional[int] = None) -> "ReconstructionModule":
        """The module for a validated plan (freqexp.validate.make_plan) and its config."""
        from omegaconf import OmegaConf

        if plan.model.gradient_free:
            max_epochs = 1
        return cls(plan.model, plan.loss, plan.augment, plan.filter, plan.placement,
                   optim=OmegaConf.to_container(cfg.optim), score=OmegaConf.to_container(cfg.score),
                   max_epochs=cfg.trainer.max_epochs if max_epochs is None else max_epochs,
                   nan_guard=cfg.trainer.nan_guard, channels_last=plan.hardware.channels_last)

    def on_train_start(self):
        loader = self.trainer.train_dataloader
        if isinstance(loader, StepGroups):
            loader = loader.loader
        if not isinstance(loader, IndexBatches):
            return
        # the training inputs in a fixed order (the loader's own shuffle stream is left untouched),
        # produced lazily: a model without a prepare() of its own never draws a batch
        plain = IndexBatches(loader.tensors[0], batch_size=loader.batch_size)
        with torch.no_grad():
            self.model.prepare(self.model_io(self.as_input(b.to(self.device)), train=False)[0] for b in plain)

    def calibrate(self, val_images: torch.Tensor, batch_size: int) -> None:
        """Called after fitting, before val and test are scored, with the val images (uint8, or float in [0,1]).
        Models whose raw scores need a scale fixed on validation (GANomaly) override it."""

    def as_input(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch (uint8, or float in [0, 1]) as the model takes it: float in [0, 1], a copy
        (never a view of the dataset), in the module's memory format (NHWC with channels_last)."""
        x = to_unit_float(x)
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    # -- data arrives as uint8 on the device; convert there, batched
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, StepGroup):  # converted one batch at a time, in training_step
            return batch
        if isinstance(batch, (tuple, list)):
            return (self.as_input(batch[0]), *batch[1:])
        return self.as_input(batch)

    def model_io(self, x: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(model input, target) for a clean batch, per augment and filter placement."""
        x_in, target = self.augment(x) if train and self.augments else (x, x)
        if self.filters and self.placement in ("input", "both"):
            x_in = self.filter(x_in)
        if self.filters and self.placement == "both":
            target = self.filter(target)
        return x_in, target

    def compare(self, pred: torch.Tensor, target: torch.Tensor):
        """The configured loss between a model output and the target model_io gave. With
        filter.apply_to=both the target is filtered (a high pass leaves [0, 1], which no
        sigmoid output reaches), so the output is filtered too: both are compared after the
        filter, and the loss is 0 for a perfect reconstruction."""
        if self.placement == "both":
            pred = self.filter(pred)
        return self.loss(pred, target)

    def training_step(self, x: torch.Tensor | StepGroup, batch_idx: int):
        if isinstance(x, StepGroup):  # trainer.steps_per_call > 1: one optimizer step per batch of the group
            if self.automatic_optimization:
                raise TypeError("a StepGroup needs the shared training step with manual optimization")
            for batch in x:
                self.train_one(self.as_input(batch))
            return None
        return self.train_one(x)

    def train_one(self, x: torch.Tensor):
        """One training step on a batch as the model takes it (as_input): the loss, added to the
        epoch's sums, and (optimizing by hand) the backward pass and the optimizer's step."""
        x_in, target = self.model_io(x, train=True)
        total, parts = self.model.training_loss(x_in, target, self.compare)
        self.check_and_log(total, parts, x.shape[0])
        if self.automatic_optimization or self._trainer is None:  # Lightning's loop steps, or no Trainer: the loss
            return total
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(total)  # scaled under 16-mixed; the step unscales, skips on inf, updates the scale
        opt.step()
        return None

    def on_train_epoch_end(self) -> None:
        """Optimizing by hand, the epoch schedulers are stepped here (after the epoch's validation,
        where Lightning's own loop steps them)."""
        if self.automatic_optimization:
            return
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers is not None else []:
            scheduler.step()

    def check_and_log(self, total: torch.Tensor, parts: Dict[str, torch.Tensor], bs: int) -> None:
        """Adds the step's loss and each term to the epoch's sums on the device; nothing here waits
        for the device. The sums become train/loss and train/loss_<term> (epoch means, logged once
        at the epoch's last batch), and the NaN guard reads them every NAN_CHECK_EVERY steps and at
        each epoch's end: a NaN or inf in any step makes the sum non-finite, so one check covers
        all the steps since the last one, for one host-device synchronisation."""
        values = torch.stack([total.detach().float(), *(v.detach().float() for v in parts.values())])
        if self._loss_sum is None or self._loss_sum.shape != values.shape:
            self._loss_names = ["loss", *(f"loss_{name}" for name in parts)]
            self._loss_sum, self._loss_images = values * bs, 0
        else:
            self._loss_sum.add_(values, alpha=bs)
        self._loss_images += bs
        self.images_seen += bs
        self._steps_unchecked += 1
        if self.nan_guard and self._steps_unchecked >= NAN_CHECK_EVERY:
            self.check_finite()

    def check_finite(self) -> None:
        """The NaN guard: raise TrainingError when a step since the epoch began had a NaN/inf loss."""
        self._steps_unchecked = 0
        if self._loss_sum is None or bool(torch.isfinite(self._loss_sum).all()):
            return
        means = (self._loss_sum / max(self._loss_images, 1)).tolist()
        terms = ", ".join(f"{name[len('loss_'):]}={v:.4g}" for name, v in zip(self._loss_names[1:], means[1:]))
        # the loss, or where only a term outside it went bad (GANomaly's discriminator), that term
        bad = next((i for i, v in enumerate(means) if not math.isfinite(v)), 0)
        what = "loss" if bad == 0 else f"{self._loss_names[bad][len('loss_'):]} loss"
        raise TrainingError(
            f"{what} became {means[bad]} in epoch {self.current_epoch + 1} (by step {self.global_step}; epoch means of the "
            f"terms: {terms}); lower optim.lr or change loss/model, or set trainer.nan_guard=false"
        )

    def on_train_epoch_start(self) -> None:
        self._loss_sum, self._loss_images, self._steps_unchecked = None, 0, 0

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if batch_idx + 1 == self.trainer.num_training_batches:  # the epoch's last batch: before validation
            self.log_epoch_losses()

    def log_epoch_losses(self) -> None:
        """train/loss and train/loss_<term>: the epoch's means, logged once (one sync per epoch)."""
        if self._loss_sum is None:
            return
        if self.nan_guard:
            self.check_finite()
        means = self._loss_sum / max(self._loss_images, 1)
        for i, name in enumerate(self._loss_names):
            self.log(f"train/{name}", means[i], on_step=False, on_epoch=True, prog_bar=name == "loss", batch_size=1)

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(anomaly maps [B,1,H,W], image scores [B]) of clean images x in [0, 1].
        Scores are fp32 during fit too, so the val/auroc that selects epochs is the reported one;
        and in eval mode (BatchNorm running statistics), so a score never depends on its batch.
        score.reduction=auto gives the method's published image score (the model decides);
        mean | max | topk reduce the map instead."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.autocast(x.device.type, enabled=False):
                x = x.float()
                chunk = self.score_chunk(x)
                if chunk >= x.shape[0]:
                    maps, scores = self._score(x)
                else:
                    parts = [self._score(part) for part in x.split(chunk)]
                    maps, scores = torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts])
        finally:
            self.model.train(was_training)
        reduction = self.score_cfg.get("reduction", "auto")
        if reduction != "auto":
            scores = reduce_map(maps, reduction, self.score_cfg.get("topk", 0.05))
        return maps, scores

    def score_chunk(self, x: torch.Tensor) -> int:
        """Images per scoring chunk for inputs like x: the whole batch on a GPU and for a model
        that cuts batches into micro-batches itself; on a CPU as many as keep the largest layer
        output within CPU_SCORE_CHUNK_BYTES, measured once per input shape from one image.
        An image's score never depends on its chunk (eval mode)."""
        if x.device.type != "cpu" or x.shape[0] <= 1 or self.model.scores_in_micro_batches:
            return x.shape[0]
        key = tuple(x.shape[1:])
        if key not in self._chunk_images:
            per_image = largest_output_bytes(self.modules(), lambda: self._score(x[:1]))
            self._chunk_images[key] = max(1, CPU_SCORE_CHUNK_BYTES // max(per_image, 1))
        return min(x.shape[0], self._chunk_images[key])

    def _score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_in, target = self.model_io(x, train=False)
        if self.placement == "score":  # one reconstruction only: diffusion/ViT scoring is several passes
            recon = self.model.reconstruct(x_in).float()
            maps = self.filter(recon - target.float()).pow(2).mean(1, keepdim=True)
            return maps, self.model.image_scores(maps)
        if self.placement == "both" and self.model.residual_score and not self.model.gradient_free:
            # the comparison of training (see compare): the filtered reconstruction vs the filtered image
            recon = self.filter(self.model.reconstruct(x_in).float())
            maps = (recon - target.float()).pow(2).mean(1, keepdim=True)
            return maps, self.model.image_scores(maps)
        return self.model.score(x_in, target)

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x)[0]

    def image_scores(self, maps: torch.Tensor) -> torch.Tensor:
        """Image scores from maps alone: the configured reduction, or with `auto` the model's
        reduction of the map (for a model whose published score needs more than its map, use score())."""
        reduction = self.score_cfg.get("reduction", "auto")
        if reduction == "auto":
            return self.model.image_scores(maps)
        return reduce_map(maps, reduction, self.score_cfg.get("topk", 0.05))

    def validation_step(self, batch, batch_idx: int):
        x, y = batch
        self._val_scores.append(self.score(x)[1])
        self._val_labels.append(y)

    def on_validation_epoch_end(self):
        scores, labels = torch.cat(self._val_scores), torch.cat(self._val_labels)
        self._val_scores.clear()
        self._val_labels.clear()
        if not torch.isfinite(scores).all():
            auroc = ap = float("nan")
        else:
            auroc, ap = roc_auc(scores, labels), average_precision(scores, labels)
        self.log("val/auroc", auroc, prog_bar=True)
        self.log("val/ap", ap)

    def configure_optimizers(self):
        opt = self.make_optimizer(self.model.parameter_groups(self.optim_cfg["lr"]))
        sched = self.make_scheduler(opt)
        if sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


    def make_optimizer(self, params):
        """The configured optimizer (optim.*) over `params`; procedures with several optimizers
        (GANs) call it once per network. Fused where torch has a fused kernel for the parameters'
        device (one kernel per step instead of several per tensor; with 16-mixed the gradient
        scaler then hands it the inf check instead of reading it back to the host every step)."""
        return make_optimizer(self.optim_cfg, params)

    def make_scheduler(self, opt):
        o = self.optim_cfg
        kind = o.get("scheduler", "cosine")
        if kind == "none":
            return None
        if kind == "multistep":  # milestones are fractions of the run, e.g. DRAEM's 0.8 and 0.9 of its epochs
            epochs = sorted({max(1, int(round(f * self.max_epochs))) for f in o.get("milestones", (0.8, 0.9))})
            return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=epochs, gamma=o.get("gamma", 0.2))
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.max_epochs), eta_min=o["lr"] * o.get("min_lr_ratio", 0.0))


class GradientFreeModule(ReconstructionModule):
    """Fits a GradientFreeModel in one pass: every training batch goes to model.observe(), and
    the model is finalized (bank built, PCA solved) before validation and after fitting. The
    pass and the validation scoring report their progress (freqexp.progress: Lightning's own
    bar is off for these fits) in images, as the model works through each batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self._progress: Optional[Progress] = None

    def _start_progress(self, desc: str, loader) -> None:
        self._end_progress()
        self._progress = Progress(desc, loader.stop if isinstance(loader, IndexBatches) else 0, "images")

    def _chunk(self, images: int):
        """The batch's images as a chunk of the progress: the model reports its micro-batches."""
        return self._progress.chunk(images) if self._progress is not None else contextlib.nullcontext()

    def _end_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._start_progress("feature extraction", self.trainer.train_dataloader)

    def training_step(self, x: torch.Tensor, batch_idx: int):
        x_in, _ = self.model_io(x, train=False)  # augments create training variety for gradient training only
        with torch.no_grad(), self._chunk(x.shape[0]):
            self.model.observe(x_in)
        self.images_seen += x.shape[0]
        return None

    def on_validation_start(self):
        self._end_progress()  # the pass is over: the bank is built next
        self.model.finalize()

    def on_validation_epoch_start(self) -> None:
        loaders = self.trainer.val_dataloaders
        self._start_progress("validation", loaders[0] if isinstance(loaders, (list, tuple)) else loaders)

    def validation_step(self, batch, batch_idx: int):
        with self._chunk(batch[0].shape[0]):
            super().validation_step(batch, batch_idx)

    def on_validation_epoch_end(self):
        self._end_progress()
        super().on_validation_epoch_end()

    def on_train_epoch_end(self) -> None:
        self._end_progress()
        super().on_train_epoch_end()

    def on_fit_end(self):
        self._end_progress()
        self.model.finalize()

    def configure_optimizers(self):
        return None


def make_optimizer(o: Dict[str, Any], params):
    """optim.* -> a torch optimizer over params (tensors, or param groups: dicts with their own lr): fused when every parameter is a float tensor on a
    device torch's fused kernels cover (CUDA, CPU), else torch's default implementation."""
    params = list(params)
    betas = tuple(o.get("betas", (0.9, 0.999)))
    if o["name"] == "adamw":
        cls, kwargs = torch.optim.AdamW, dict(lr=o["lr"], betas=betas, weight_decay=o["weight_decay"])
    elif o["name"] == "adam":
        cls, kwargs = torch.optim.Adam, dict(lr=o["lr"], betas=betas, weight_decay=o["weight_decay"])
    else:
        cls, kwargs = torch.optim.SGD, dict(lr=o["lr"], weight_decay=o["weight_decay"], momentum=0.9)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]  # parameters or param groups
    if tensors and all(p.is_floating_point() and p.device.type in ("cuda", "cpu") for p in tensors):
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # no fused kernel for this torch, device or dtype
            pass
    return cls(params, **kwargs)


def module_class(model: "ReconstructionModel") -> type[ReconstructionModule]:
    """The LightningModule class a model names in `lightning_module` ("module:Class")."""
    import importlib

    module_name, _, attr = model.lightning_module.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, ReconstructionModule)):
        raise TypeError(f"{type(model).__name__}.lightning_module={model.lightning_module!r} is not a ReconstructionModule subclass")
    return cls


def build_module(plan, cfg, max_epochs: Optional[int] = None) -> ReconstructionModule:
    """The LightningModule that trains plan.model, by the model's own choice of procedure."""
    return module_class(plan.model).from_plan(plan, cfg, max_epochs=max_epochs)


STEPS_PER_CALL_GPU = 8  # trainer.steps_per_call=auto on a GPU (benchmarks/throughput.py --proxy --steps-per-call)


def steps_per_call(setting, module: ReconstructionModule, device: torch.device, train_tensors: tuple) -> int:
    """trainer.steps_per_call resolved: how many batches one call of the training step trains on
    (freqexp.data.base.StepGroups). Only the shared step (manual optimization, one image tensor per
    batch) takes groups; any other procedure, and a supervised loader, get 1. auto: 8 on a GPU with
    the training images on it (a short GPU step waits for the host's Python, and there a group
    costs no copies), else 1: on a CPU a step's arithmetic dwarfs the loop's ~0.4 ms."""
    shared = type(module).training_step is ReconstructionModule.training_step and not module.automatic_optimization
    if not shared or len(train_tensors) != 1:
        return 1
    if setting == "auto":
        return STEPS_PER_CALL_GPU if device.type == "cuda" and train_tensors[0].device == device else 1
    return int(setting)


OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "multistep", "none")


EPOCH_PREFIX = "val_epoch/"  # MLflow name of the per-epoch validation curve


class EpochMetricsLogger(L.Callback):
    """Sends each epoch's train/* values (and the learning rate) and its validation values to
    `log_fn(metrics, step)`, step = the epoch number (1, 2, ...): one point per validated epoch.
    The per-epoch validation curve is logged as val_epoch/* (val_epoch/auroc, ...): val/* holds
    one value per run, that of the weights evaluated on test (the best epoch with
    trainer.restore_best), so the runs table, reports and sweeps all read the selected model."""

    def __init__(self, log_fn: Callable[[Dict[str, float], int], None]):
        self.log_fn = log_fn
        self.epoch_lr: Optional[float] = None

    def on_train_epoch_start(self, trainer, pl_module):
        # the lr this epoch trains with (epoch schedulers step before on_train_epoch_end)
        # (a gradient-free fit has no optimizer: Lightning then holds a mock one without param groups)
        opts = trainer.optimizers
        self.epoch_lr = opts[0].param_groups[0]["lr"] if opts and opts[0].param_groups else None

    def _send(self, trainer, prefix: str):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
        if prefix == "train/" and self.epoch_lr is not None:
            metrics["train/lr"] = self.epoch_lr
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        if prefix == "val/":
            metrics = {EPOCH_PREFIX + k[len(prefix):]: v for k, v in metrics.items()}
        if metrics:
            self.log_fn(metrics, trainer.current_epoch + 1)

    def on_train_epoch_end(self, trainer, pl_module):
        self._send(trainer, "train/")

    # on_validation_end, not on_validation_epoch_end: callbacks' epoch-end hooks run before
    # the module's, so val/* of this epoch is only in callback_metrics by now.
    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._send(trainer, "val/")


class EpochLines(L.Callback):
    """One plain line per training epoch (train loss, and val/auroc when the epoch was
    validated): the progress report when output is not a terminal (nohup, SLURM logs)."""

    def on_train_epoch_end(self, trainer, pl_module):
        m = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        parts += [f"{key} {float(m[key]):.4f}" for key in ("train/loss", "val/auroc") if key in m]
        print("  ".join(parts), flush=True)


class TrainTimer(L.Callback):
    """Wall time spent in training batches only (validation excluded), for train/throughput."""

    def __init__(self):
        self.seconds = 0.0
        self._t0: Optional[float] = None

    def _start(self, pl_module):
        wait_for_device(pl_module.device)
        self._t0 = time.perf_counter()

    def _stop(self, pl_module):
        if self._t0 is not None:
            wait_for_device(pl_module.device)
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._start(pl_module)

    def on_validation_start(self, trainer, pl_module):
        self._stop(pl_module)

    def on_validation_end(self, trainer, pl_module):
        if trainer.training:
            self._start(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._stop(pl_module)


class BestWeights(L.Callback):
    """Keeps an in-memory copy of the weights at the best val/auroc and restores them when
    fitting ends, so evaluation uses the model selected on validation (never on test)."""

    def __init__(self, monitor: str = "val/auroc"):
        self.monitor = monitor
        self.best = -math.inf
        self.best_epoch: Optional[int] = None
        self.state: Optional[Dict[str, torch.Tensor]] = None

    def on_validation_end(self, trainer, pl_module):  # see EpochMetricsLogger
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None or not math.isfinite(float(value)):
            return
        if float(value) >= self.best:  # ties go to the later, better-trained epoch
            self.best, self.best_epoch = float(value), trainer.current_epoch
            self.state = copy.deepcopy(pl_module.model.state_dict())

    def on_fit_end(self, trainer, pl_module):
        if self.state is not None:
            pl_module.model.load_state_dict(self.state)
