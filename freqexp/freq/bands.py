"""Radial frequency bands and the share of spectral energy in each (the 5-band table of the
frequency-CutPaste study). Edges are on the normalized radius of freqexp.freq.fft (1 = Nyquist
along an axis; corners reach sqrt(2))."""
from __future__ import annotations

from typing import Sequence

import torch

from freqexp.errors import ConfigError
from freqexp.freq.fft import radius_grid

BAND_NAMES = ("very_low", "low", "mid", "high", "very_high")
DEFAULT_EDGES = (0.05, 0.15, 0.3, 0.5)


def check_edges(edges: Sequence[float], key: str) -> list[float]:
    edges = list(edges) if not isinstance(edges, (str, int, float)) else []
    ok = len(edges) == len(BAND_NAMES) - 1 and all(isinstance(e, (int, float)) and e > 0 for e in edges)
    if not ok or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(key, f"must be {len(BAND_NAMES) - 1} increasing radii > 0 separating {', '.join(BAND_NAMES)}; got {edges!r}")
    return [float(e) for e in edges]


def band_index(height: int, width: int, edges: Sequence[float] = DEFAULT_EDGES, device=None) -> torch.Tensor:
    """[H, W] long tensor: which band each FFT coefficient falls in."""
    r = radius_grid(height, width, device)
    return torch.bucketize(r, torch.tensor(list(edges), device=device, dtype=r.dtype), right=False)


def band_shares(x: torch.Tensor, edges: Sequence[float] = DEFAULT_EDGES) -> torch.Tensor:
    """[B, n_bands]: percentage of each image's spectral energy |F|^2 (summed over channels) per band."""
    power = torch.fft.fft2(x.float()).abs().pow(2).sum(dim=1)  # [B, H, W]
    idx = band_index(x.shape[-2], x.shape[-1], edges, x.device).flatten()
    per_band = torch.zeros(x.shape[0], len(edges) + 1, device=x.device, dtype=power.dtype)
    per_band.index_add_(1, idx, power.flatten(1))
    return 100.0 * per_band / per_band.sum(1, keepdim=True).clamp_min(1e-30)


def band_weight_map(height: int, width: int, weights: Sequence[float], edges: Sequence[float] = DEFAULT_EDGES, device=None) -> torch.Tensor:
    """[H, W] multiplier that scales each band's FFT coefficients by its weight."""
    w = torch.tensor([float(v) for v in weights], device=device)
    return w[band_index(height, width, edges, device)]
