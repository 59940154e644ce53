"""Frequency filters. A filter is an nn.Module mapping [B,C,H,W] -> [B,C,H,W]; where it acts
is `filter.apply_to`: input (FAIR: filtered input, original target), both, or score
(the residual is filtered before it becomes the anomaly map)."""
from __future__ import annotations

from torch import nn

from freqexp.errors import ConfigError
from freqexp.registry import Registry

FILTERS: Registry[type[nn.Module]] = Registry("filter", "filter")
PLACEMENTS = ("input", "both", "score")


@FILTERS.register("none")
class NoFilter(nn.Identity):
    pass


def build_filter(cfg) -> tuple[nn.Module, str]:
    placement = cfg.get("apply_to", "input")
    if placement not in PLACEMENTS:
        raise ConfigError("filter.apply_to", f"must be one of {', '.join(PLACEMENTS)}; got {placement!r}")
    cls = FILTERS.get(cfg.name)
    kwargs = {k: v for k, v in cfg.items() if k not in ("name", "apply_to")}
    try:
        return cls(**kwargs), placement
    except TypeError as e:
        raise ConfigError("filter", f"bad options for filter={cfg.name}: {e}") from None
