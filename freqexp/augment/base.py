"""The augment registry and the two simplest augments."""
from __future__ import annotations

import torch
from torch import nn

from freqexp.errors import ConfigError
from freqexp.registry import Registry

AUGMENTS: Registry[type[nn.Module]] = Registry("augment", "augment")


@AUGMENTS.register("none")
class NoAugment(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


@AUGMENTS.register("noise")
class GaussianNoise(nn.Module):
    """Adds N(0, std^2) noise to a fraction p of the batch; the target stays clean (denoising)."""

    def __init__(self, std: float = 0.1, p: float = 1.0):
        super().__init__()
        if not isinstance(std, (int, float)) or not std > 0:
            raise ConfigError("augment.std", f"must be > 0; got {std!r}")
        self.std, self.p = float(std), check_probability(p)

    def forward(self, x):
        noise = torch.randn_like(x) * self.std
        if self.p < 1:
            keep = (torch.rand(x.shape[0], 1, 1, 1, device=x.device) < self.p).to(x.dtype)
            noise = noise * keep
        return (x + noise).clamp(0, 1), x


def build_augment(cfg) -> nn.Module:
    from omegaconf import OmegaConf

    cls = AUGMENTS.get(cfg.name)
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    kwargs = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in kwargs.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError("augment", f"bad options for augment={cfg.name}: {e}") from None


def check_probability(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ConfigError("augment.p", f"must be in (0, 1]; got {p!r}")
    return float(p)


def synthesize_share(augment: nn.Module, x: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-anomalies (augment.synthesize) on a random share of the batch, the rest left clean:
    (images, masks [B,1,H,W] bool, empty for the clean ones). The models trained on pseudo-anomaly
    masks (DRAEM, FE-CLIP outside the zero-shot protocol) draw their batches so."""
    synthesized, mask = augment.synthesize(x)
    chosen = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < share
    return torch.where(chosen, synthesized, x), mask & chosen
