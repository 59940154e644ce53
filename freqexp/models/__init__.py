"""Model registry. `model.name` is a registered name (ae, cae, cvae, ...) or an import path
`package.module:ClassName` to a ReconstructionModel subclass of your own."""
from __future__ import annotations

import importlib

from freqexp.errors import ConfigError
from freqexp.models.base import MODELS, ReconstructionModel
# registration: one module per family
from freqexp.models import autoencoders, variants, ganomaly, draem, diffusion, vit, memae, memory_bank, wedge, baselines, fe_clip, winclip  # noqa: F401,E401

__all__ = ["MODELS", "ReconstructionModel", "build_model", "model_class"]


def model_class(name: str) -> type[ReconstructionModel]:
    if isinstance(name, str) and ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError("model.name", f"cannot import {name!r} ({e}); use module.path:ClassName or one of: {', '.join(MODELS.names())}") from None
        if not (isinstance(cls, type) and issubclass(cls, ReconstructionModel)):
            raise ConfigError("model.name", f"{name!r} is not a freqexp.models.ReconstructionModel subclass")
        return cls
    return MODELS.get(name)


def build_model(cfg, in_shape: tuple[int, int, int]) -> ReconstructionModel:
    """Build from the `model` config node: every key but `name` is a constructor argument."""
    cls = model_class(cfg.name)
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    return cls.from_config(in_shape, kwargs)
