"""2D DCT-II (orthonormal) by matrix products, and a filter that keeps the lowest or highest
`fraction` of the coefficients. Coefficients are ranked by normalized frequency
sqrt((u/H)^2 + (v/W)^2) (ties in row-major order), so `low` at fraction f and `high` at 1 - f
are complementary and sum to the identity."""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
from torch import nn

from freqexp.errors import ConfigError


def dct_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """C[k, i] = s_k cos(pi (2i + 1) k / (2n)), s_0 = sqrt(1/n), s_k = sqrt(2/n): C @ x is DCT-II."""
    k = torch.arange(n, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1)
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(device=device, dtype=dtype)


def dct2(x: torch.Tensor) -> torch.Tensor:
    ch, cw = dct_matrix(x.shape[-2], x.device, x.dtype), dct_matrix(x.shape[-1], x.device, x.dtype)
    return separable(x, ch, cw.T)


def idct2(X: torch.Tensor) -> torch.Tensor:
    ch, cw = dct_matrix(X.shape[-2], X.device, X.dtype), dct_matrix(X.shape[-1], X.device, X.dtype)
    return separable(X, ch.T, cw)


def separable(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ x @ right for a batch [..., H, W] as two large matrix products (one GEMM per
    axis over the whole batch, not thousands of tiny ones)."""
    h, w = x.shape[-2:]
    y = (x.reshape(-1, w) @ right).reshape(*x.shape[:-1], right.shape[1])
    yt = y.transpose(-1, -2).reshape(-1, h) @ left.T
    return yt.reshape(*y.shape[:-2], y.shape[-1], left.shape[0]).transpose(-1, -2)


def low_frequency_mask(height: int, width: int, fraction: float, device=None) -> torch.Tensor:
    u = torch.arange(height, dtype=torch.float64).view(-1, 1) / height
    v = torch.arange(width, dtype=torch.float64).view(1, -1) / width
    r = torch.sqrt(u**2 + v**2).flatten()
    order = torch.argsort(r, stable=True)
    keep = math.floor(fraction * height * width + 0.5 + 1e-9)  # half up, robust to 1 - (1 - f) != f
    mask = torch.zeros(height * width, dtype=torch.bool)
    mask[order[:keep]] = True
    return mask.view(height, width).to(device)


class DCTFilter(nn.Module):
    def __init__(self, keep: str = "high", fraction: float = 0.9):
        super().__init__()
        if keep not in ("low", "high"):
            raise ConfigError("filter.keep", f"must be low or high; got {keep!r}")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ConfigError("filter.fraction", f"must be in (0, 1]; got {fraction!r}")
        self.keep, self.fraction = keep, float(fraction)
        self._cache: Dict[Tuple[int, int, str], tuple] = {}

    def _operators(self, height: int, width: int, device):
        key = (height, width, str(device))
        if key not in self._cache:
            if self.keep == "low":
                mask = low_frequency_mask(height, width, self.fraction, device)
            else:
                mask = ~low_frequency_mask(height, width, 1.0 - self.fraction, device)
            self._cache[key] = (dct_matrix(height, device), dct_matrix(width, device), mask.float())
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ch, cw, mask = self._operators(h, w, x.device)
        with torch.autocast(x.device.type, enabled=False):  # fp32 matmuls under mixed precision
            coeffs = separable(x.float(), ch, cw.T)
            return separable(coeffs * mask, ch.T, cw).to(x.dtype)

    def extra_repr(self) -> str:
        return f"keep {self.keep} {self.fraction:.0%} of DCT coefficients"
