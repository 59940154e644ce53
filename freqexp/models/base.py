"""What every model provides: the math as a plain nn.Module, apart from how it is trained."""
from __future__ import annotations

import inspect
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from freqexp.errors import ConfigError
from freqexp.registry import Registry

MODELS: Registry[type["ReconstructionModel"]] = Registry("model", "model")


class ReconstructionModel(nn.Module):
    """forward(x) -> dict with at least `recon` ([B,C,H,W] in [0,1]);
    extra_losses(out) -> model-specific weighted terms (KL, ...) added to the configured loss;
    anomaly_map(x, target) -> [B,1,H,W], the per-pixel squared reconstruction error.

    What a model may declare about how it is trained (class attributes; defaults fit a plain
    autoencoder):
      lightning_module   "module:Class" of the LightningModule that trains it (a subclass of
                         freqexp.training.ReconstructionModule): GANs, DRAEM and gradient-free
                         memory banks bring their own procedure.
      loss_terms         the configured loss terms it can train with (None: any); checked
                         before training, with `loss_note` saying why.
      gradient_free      fit = one pass over the training images, no optimizer (memory banks,
                         PCA, kNN): trained for exactly one epoch whatever trainer.max_epochs says.
      needs_pseudo_anomalies  trains on augment.synthesize() images + masks (DRAEM).
      residual_score     its map is a reconstruction residual, so filter.apply_to=score can
                         filter it (False for latent-distance, segmentation and memory-bank maps).
      filtered_target    with filter.apply_to=both it can be compared with the filtered target
                         after filtering its own output (the training loss and residual map
                         use filter(output) vs filter(image)); False where its objective uses
                         the target otherwise (noise prediction, discriminators, masked patches).
      zero_shot          None, or how the model runs the zero-shot protocol (dataset.train_from):
                         "trained" (on the auxiliary dataset's labelled images and masks, each
                         training batch a tuple (images, labels, masks): FE-CLIP) or
                         "training-free" (WinCLIP).
      published_score    how the method's paper turns the map into an image score: a reduction
                         of the map (mean | max | topk); `score.reduction: auto` (the default)
                         uses it, or the model's own `image_scores` where the paper's score is
                         more than a reduction (DRAEM's pooled max, PatchCore's re-weighting).
      scores_in_micro_batches  its score() cuts a batch into micro-batches sized to the device
                         itself (memory banks, CLIP): the CPU scoring chunks of
                         freqexp.training.ReconstructionModule.score_chunk leave its batches whole.
    """

    lightning_module: str = "freqexp.training:ReconstructionModule"
    loss_terms: Optional[Tuple[str, ...]] = None
    loss_note: str = ""
    gradient_free: bool = False
    needs_pseudo_anomalies: bool = False
    residual_score: bool = True
    filtered_target: bool = True
    published_score: str = "mean"
    zero_shot: Optional[str] = None
    scores_in_micro_batches: bool = False

    @classmethod
    def from_config(cls, in_shape: tuple[int, int, int], kwargs: Dict[str, Any]) -> "ReconstructionModel":
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "in_shape"}
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise ConfigError(f"model.{unknown[0]}", f"not an option of {cls.__name__}; its options: {', '.join(sorted(accepted))}")
        return cls(in_shape, **kwargs)

    def parameter_groups(self, lr: float) -> list:
        """What the optimizer updates: the trainable parameters (or param-group dicts with their own lr)."""
        return [p for p in self.parameters() if p.requires_grad]

    def extra_losses(self, out: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {}

    def training_loss(self, x_in: torch.Tensor, target: torch.Tensor, loss_fn) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(total, {term: value}) for one training batch. `loss_fn(pred, target)` is the configured
        composite loss returning (total, parts). Override for a different objective (noise
        prediction, adversarial inputs, ...); model-specific terms belong in the parts dict."""
        out = self(x_in)
        total, parts = loss_fn(out["recon"], target)
        extra = self.extra_losses(out)
        if extra:
            total = total + sum(extra.values())
            parts = {**parts, **extra}
        return total, parts

    def prepare(self, batches: Iterable[torch.Tensor]) -> None:
        """Called once before the first training step with the (filtered, un-augmented) training
        inputs in batches, e.g. to initialize memory slots by k-means. Default: nothing (the batches
        are produced lazily, so they cost nothing unless read)."""

    def check_fit(self, n_images: int, device: torch.device) -> None:
        """Called with the training set's size before the run opens: raise ConfigError when
        fitting cannot work (a memory bank too large for the device). Default: nothing."""

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic reconstruction used for scoring."""
        return self(x)["recon"]

    def anomaly_map(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        target = x if target is None else target
        return (self.reconstruct(x).float() - target.float()).pow(2).mean(dim=1, keepdim=True)

    def image_scores(self, maps: torch.Tensor) -> torch.Tensor:
        """The method's published image score [B] from its maps [B,1,H,W]."""
        from freqexp.metrics import reduce_map

        return reduce_map(maps, self.published_score)

    def score(self, x: torch.Tensor, target: torch.Tensor | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(anomaly maps [B,1,H,W], published image scores [B]) in one pass. Override when the
        image score needs more than the map (PatchCore's re-weighting uses the patch features)."""
        maps = self.anomaly_map(x, target)
        return maps, self.image_scores(maps)

    def score_description(self) -> str:
        """What `score.reduction: auto` computes for this model, in words (logged as a param)."""
        return f"{self.published_score} of the anomaly map"

    def evaluated_region(self, image_size) -> Optional[Tuple[int, int, int, int]]:
        """(top, left, height, width) of the image the model actually looks at, where that is less
        than the image (PatchCore's centre crop): pixel metrics are computed there, as the
        official code computes them on the crop. None: the whole image."""
        return None


class GradientFreeModel(ReconstructionModel):
    """A detector fitted without gradients (memory bank, PCA, kNN): `observe(x)` is called with
    every training batch, `finalize()` once after the pass (and must be idempotent); then
    `anomaly_map(x)` scores. There is no reconstruction loss, so any configured loss is
    ignored; `reconstruct` may return the nearest normal evidence it has (for the figures)."""

    gradient_free = True
    residual_score = False
    lightning_module = "freqexp.training:GradientFreeModule"
    loss_note = "it is fitted without gradients, so the configured loss is not used"

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def finalize(self) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"recon": self.reconstruct(x)}

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return x  # nothing better by default: figures then show the input itself

