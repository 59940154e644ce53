"""What every model provides: the math as a plain nn.Module, apart from how it is trained."""
from __future__ import annotations

import inspect
from typing import Any, Dict

import torch
from torch import nn

from freqexp.errors import ConfigError
from freqexp.registry import Registry

MODELS: Registry[type["ReconstructionModel"]] = Registry("model", "model")


def positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, f"must be a positive integer; got {value!r}")
    return value


def positive_int_list(key: str, value: Any) -> list[int]:
    values = list(value) if not isinstance(value, (str, int)) else None
    if not values:
        raise ConfigError(key, f"must be a non-empty list of positive integers, e.g. [32,64]; got {value!r}")
    return [positive_int(key, v) for v in values]


class ReconstructionModel(nn.Module):
    """forward(x) -> dict with at least `recon` ([B,C,H,W] in [0,1]);
    extra_losses(out) -> model-specific weighted terms (KL, ...) added to the configured loss;
    anomaly_map(x, target) -> [B,1,H,W], the per-pixel squared reconstruction error."""

    @classmethod
    def from_config(cls, in_shape: tuple[int, int, int], kwargs: Dict[str, Any]) -> "ReconstructionModel":
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "in_shape"}
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise ConfigError(f"model.{unknown[0]}", f"not an option of {cls.__name__}; its options: {', '.join(sorted(accepted))}")
        return cls(in_shape, **kwargs)

    def extra_losses(self, out: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {}

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic reconstruction used for scoring."""
        return self(x)["recon"]

    def anomaly_map(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        target = x if target is None else target
        return (self.reconstruct(x).float() - target.float()).pow(2).mean(dim=1, keepdim=True)
