"""Frequency filters. A filter is an nn.Module mapping [B,C,H,W] -> [B,C,H,W]; where it acts
is `filter.apply_to`: input (FAIR: filtered input, original target), both (filtered input;
the reconstruction is filtered too and compared with the filtered image, a target any model can
reach), or score (the residual is filtered before it becomes the anomaly map).

Config `filter.name` picks the family (none, fft, dwt, dct); the other keys are its options.
In yaml the FFT pass band is `pass` (low | high | band), a Python keyword, hence `passband`
in code."""
from __future__ import annotations

from typing import Any, Callable, Dict

from torch import nn

from freqexp.checks import choice
from freqexp.errors import ConfigError
from freqexp.freq.dct import DCTFilter
from freqexp.freq.dwt import DWTFilter
from freqexp.freq.fft import FFTFilter
from freqexp.registry import Registry

FILTERS: Registry[Callable[..., nn.Module]] = Registry("filter", "filter.name")
PLACEMENTS = ("input", "both", "score")


@FILTERS.register("none")
class NoFilter(nn.Identity):
    def __init__(self):
        super().__init__()


FILTERS.register("dwt")(DWTFilter)
FILTERS.register("dct")(DCTFilter)


@FILTERS.register("fft")
def fft_filter(kind: str = "butterworth", cutoff=0.2, order: int = 2, unit: str = "nyquist", **rest) -> FFTFilter:
    passband = rest.pop("pass", rest.pop("passband", "high"))
    if rest:
        raise TypeError(f"unexpected option(s) {', '.join(rest)}")
    return FFTFilter(kind=kind, passband=passband, cutoff=cutoff, order=order, unit=unit)


def filter_options(cfg) -> Dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in ("name", "apply_to")}


def build_filter_module(cfg, prefix: str = "filter") -> nn.Module:
    """A filter from any config node with `name` + options (also used by augments and losses)."""
    factory = FILTERS.get(cfg.get("name"))
    try:
        return factory(**filter_options(cfg))
    except TypeError as e:
        raise ConfigError(prefix, f"bad options for {prefix}.name={cfg.get('name')}: {e}") from None
    except ConfigError as e:
        if prefix != "filter" and e.key.startswith("filter."):
            raise ConfigError(prefix + e.key[len("filter"):], e.message) from None
        raise


def build_filter(cfg) -> tuple[nn.Module, str]:
    placement = cfg.get("apply_to", "input")
    choice("filter.apply_to", placement, PLACEMENTS)
    return build_filter_module(cfg), placement
