"""2D FFT filters: ideal, gaussian and butterworth transfer functions, low / high / band pass.

Frequencies are normalized so that r = 1 at the Nyquist frequency along an axis:
r(u, v) = sqrt((f_y / 0.5)^2 + (f_x / 0.5)^2) with f_y, f_x in cycles/pixel from fftfreq. The
grid comes from fftfreq of each axis separately, so non-square images need no centring (the
row/column centre swap of some public code cannot happen) and no fftshift. `cutoff` is a
fraction of the Nyquist radius, in (0, 1].

Transfer functions at cutoff c (low pass; high pass is the complement for ideal and gaussian):
    ideal        H = 1[r <= c]
    gaussian     H = exp(-r^2 / (2 c^2))                    (H(c) = 0.607)
    butterworth  H = 1 / sqrt(1 + (r / c)^(2n))             (|H(c)|^2 = 1/2: -3 dB at the cutoff)
    butterworth high pass: H = 1 / sqrt(1 + (c / r)^(2n)), H(0) = 0
Band pass keeps c_low <= r <= c_high: the product of a high pass at c_low and a low pass at c_high.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import nn

from freqexp.errors import ConfigError

KINDS = ("ideal", "gaussian", "butterworth")
PASSES = ("low", "high", "band")


def radius_grid(height: int, width: int, device=None) -> torch.Tensor:
    fy = torch.fft.fftfreq(height, device=device).view(-1, 1) / 0.5
    fx = torch.fft.fftfreq(width, device=device).view(1, -1) / 0.5
    return torch.sqrt(fy**2 + fx**2)


def lowpass(r: torch.Tensor, kind: str, cutoff: float, order: int = 2) -> torch.Tensor:
    if kind == "ideal":
        return (r <= cutoff).to(r.dtype)
    if kind == "gaussian":
        return torch.exp(-(r**2) / (2 * cutoff**2))
    return 1.0 / torch.sqrt(1.0 + (r / cutoff) ** (2 * order))


def highpass(r: torch.Tensor, kind: str, cutoff: float, order: int = 2) -> torch.Tensor:
    if kind == "butterworth":
        ratio = torch.where(r > 0, cutoff / r.clamp_min(1e-12), torch.full_like(r, float("inf")))
        return 1.0 / torch.sqrt(1.0 + ratio ** (2 * order))
    return 1.0 - lowpass(r, kind, cutoff, order)


def transfer_function(height: int, width: int, kind: str, passband: str, cutoff, order: int = 2, device=None) -> torch.Tensor:
    """H(u, v) on the unshifted FFT grid, shape [height, width], real."""
    r = radius_grid(height, width, device)
    if passband == "low":
        return lowpass(r, kind, float(cutoff), order)
    if passband == "high":
        return highpass(r, kind, float(cutoff), order)
    low_c, high_c = (float(c) for c in cutoff)
    return highpass(r, kind, low_c, order) * lowpass(r, kind, high_c, order)


def check_fft_options(kind, passband, cutoff, order, prefix: str = "filter") -> None:
    if kind not in KINDS:
        raise ConfigError(f"{prefix}.kind", f"must be one of {', '.join(KINDS)}; got {kind!r}")
    if passband not in PASSES:
        raise ConfigError(f"{prefix}.pass", f"must be one of {', '.join(PASSES)}; got {passband!r}")
    if passband == "band":
        ok = isinstance(cutoff, Sequence) and not isinstance(cutoff, str) and len(cutoff) == 2
        if not ok or not all(isinstance(c, (int, float)) and 0 < c <= 1 for c in cutoff) or not cutoff[0] < cutoff[1]:
            raise ConfigError(f"{prefix}.cutoff", f"band pass needs two cutoffs [low, high] with 0 < low < high <= 1 (fractions of Nyquist); got {cutoff!r}")
    elif isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not 0 < cutoff <= 1:
        raise ConfigError(f"{prefix}.cutoff", f"must be in (0, 1] (a fraction of the Nyquist radius); got {cutoff!r}")
    if kind == "butterworth" and (isinstance(order, bool) or not isinstance(order, int) or order < 1):
        raise ConfigError(f"{prefix}.order", f"Butterworth order must be an integer >= 1; got {order!r}")


class FFTFilter(nn.Module):
    """Multiplies the 2D spectrum of every channel by H; masks are cached per (H, W, device)."""

    def __init__(self, kind: str = "butterworth", passband: str = "high", cutoff=0.2, order: int = 2):
        super().__init__()
        check_fft_options(kind, passband, cutoff, order)
        self.kind, self.passband, self.order = kind, passband, int(order)
        self.cutoff = tuple(float(c) for c in cutoff) if passband == "band" else float(cutoff)
        self._masks: Dict[Tuple[int, int, str], torch.Tensor] = {}

    def mask(self, height: int, width: int, device) -> torch.Tensor:
        key = (height, width, str(device))
        if key not in self._masks:
            self._masks[key] = transfer_function(height, width, self.kind, self.passband, self.cutoff, self.order, device)
        return self._masks[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # H is real and even (H(-f) = H(f)), so the half spectrum of rfft2 is enough: half the work.
        height, width = x.shape[-2:]
        h = self.mask(height, width, x.device)[:, : width // 2 + 1]
        return torch.fft.irfft2(torch.fft.rfft2(x.float()) * h, s=(height, width)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.kind} {self.passband}-pass, cutoff={self.cutoff}, order={self.order}"
