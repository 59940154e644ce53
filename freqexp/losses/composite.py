"""The weighted sum of loss terms named by a spec such as `mse+ssim`."""
from __future__ import annotations

from typing import Any, Dict, Mapping

import torch
from torch import nn

from freqexp.errors import ConfigError
from freqexp.losses.terms import LOSS_TERMS


def parse_spec(spec: str) -> list[str]:
    """`mse+ssim` -> ['mse', 'ssim'], checking every term is known and none repeats."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("loss", f"expected terms joined by '+', e.g. mse+ssim; got {spec!r}")
    names = [t.strip() for t in spec.split("+")]
    unknown = [n for n in names if n not in LOSS_TERMS]
    if unknown:
        raise ConfigError(
            "loss",
            f"unknown loss term {', '.join(map(repr, unknown))} in {spec!r}; "
            f"known terms: {', '.join(LOSS_TERMS.names())} (join with '+')",
        )
    seen = set()
    for n in names:
        if n in seen:
            raise ConfigError("loss", f"term {n!r} appears twice in {spec!r}; use loss.weights.{n} to weight it")
        seen.add(n)
    return names


def term_params(name: str, overrides: Mapping[str, Any] | None) -> Dict[str, Any]:
    params = dict(LOSS_TERMS.get(name).defaults)
    for key, value in (overrides or {}).items():
        if key not in params:
            allowed = ", ".join(params) or "none"
            raise ConfigError(f"loss.params.{name}.{key}", f"not an option of term {name!r}; its options: {allowed}")
        params[key] = value
    return params


class CompositeLoss(nn.Module):
    """total = sum_i w_i * term_i(pred, target); also returns each unweighted term for logging."""

    def __init__(self, terms: Dict[str, nn.Module], weights: Dict[str, float]):
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        self.weights = dict(weights)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        # Terms run in fp32 with autocast off: SSIM's variances and the wavelet convolutions lose
        # most of their digits in fp16/bf16 (x.float() alone does not escape autocast).
        with torch.autocast(pred.device.type, enabled=False):
            pred, target = pred.float(), target.float()
            parts = {name: term(pred, target) for name, term in self.terms.items()}
        total = sum(self.weights[name] * value for name, value in parts.items())
        return total, parts


def build_loss(loss_cfg: Mapping[str, Any], image_size: tuple[int, int] | None = None) -> CompositeLoss:
    """Build the composite from the `loss` config node, failing with a ConfigError on unknown
    terms, bad weights or options, and terms that cannot work at `image_size` (H, W)."""
    names = parse_spec(loss_cfg.get("spec"))
    weights_cfg = dict(loss_cfg.get("weights") or {})
    params_cfg = dict(loss_cfg.get("params") or {})
    for key in weights_cfg:
        if key not in names:
            raise ConfigError(f"loss.weights.{key}", f"{key!r} is not a term of loss={loss_cfg.get('spec')}; terms: {', '.join(names)}")
    terms, weights = {}, {}
    for name in names:
        w = weights_cfg.get(name, 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise ConfigError(f"loss.weights.{name}", f"must be a number >= 0, got {w!r}")
        weights[name] = float(w)
        cls = LOSS_TERMS.get(name)
        params = term_params(name, params_cfg.get(name))
        for key, problem in cls.check(params).items():
            raise ConfigError(f"loss.params.{name}.{key}", problem)
        if image_size is not None:
            need = cls.min_size(params)
            h, w_ = image_size
            if min(h, w_) < need:
                hint = "".join(f" (loss.params.{name}.{k}={v})" for k, v in params.items() if k in ("win_size", "scales"))
                raise ConfigError(
                    "loss",
                    f"term {name!r} needs images of at least {need}x{need}{hint}, but the dataset gives {h}x{w_}; "
                    f"drop the term or use larger images",
                )
        terms[name] = cls(**params)
    if sum(weights.values()) <= 0:
        raise ConfigError("loss.weights", "all weights are 0; at least one term must count")
    return CompositeLoss(terms, weights)
