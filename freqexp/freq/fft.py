"""2D FFT filters: ideal, gaussian and butterworth transfer functions, low / high / band pass.

Radius. A frequency (f_y, f_x) in cycles/pixel (fftfreq of each axis) has two radii:
    r     = sqrt((f_y / 0.5)^2 + (f_x / 0.5)^2)   fraction of the Nyquist radius (1 at Nyquist
            along an axis); `cutoff` in this unit (`unit: nyquist`, the default) is the same
            relative cutoff at any image size, and non-square images are scaled per axis;
    r_px  = sqrt((f_y H)^2 + (f_x W)^2)           the distance from the centre of the shifted
            spectrum in frequency samples (cycles per image), the "D" of the image-processing
            textbooks and of FAIR's filter code; `cutoff` in this unit is `unit: px`.
On an N x N image r_px = r * N / 2, so FAIR's D0 = 30 px on 256 px images is r = 30 / 128.
The grid comes from fftfreq, so no fftshift is needed and the row/column centre swap of some
public code cannot happen on non-square images.

Transfer functions at cutoff c, radius r in the cutoff's unit (low pass; high pass = complement
for ideal and gaussian):
    ideal            H = 1[r <= c]
    gaussian         H = exp(-r^2 / (2 c^2))                   (H(c) = 0.607)
    butterworth      H = 1 / (1 + (r / c)^(2n))                (H(c) = 1/2; Gonzalez & Woods, and
                     high pass H = 1 / (1 + (c / r)^(2n))       FAIR's BHPF; H(0) = 0)
    butterworth_3db  H = 1 / sqrt(1 + (r / c)^(2n))            (|H(c)|^2 = 1/2: the analog-design
                     high pass H = 1 / sqrt(1 + (c / r)^(2n))   -3 dB convention; the square root
                                                                of `butterworth`, a gentler filter)
Band pass keeps c_low <= r <= c_high: the product of a high pass at c_low and a low pass at c_high.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import nn

from freqexp.checks import choice, is_number
from freqexp.errors import ConfigError

KINDS = ("ideal", "gaussian", "butterworth", "butterworth_3db")
PASSES = ("low", "high", "band")
UNITS = ("nyquist", "px")


def radius_grid(height: int, width: int, device=None, unit: str = "nyquist") -> torch.Tensor:
    """Radius of every bin of the unshifted [height, width] FFT grid, in `unit`."""
    fy = torch.fft.fftfreq(height, device=device).view(-1, 1)
    fx = torch.fft.fftfreq(width, device=device).view(1, -1)
    if unit == "px":
        return torch.sqrt((fy * height) ** 2 + (fx * width) ** 2)
    return torch.sqrt((fy / 0.5) ** 2 + (fx / 0.5) ** 2)


def _butterworth(ratio: torch.Tensor, kind: str, order: int) -> torch.Tensor:
    """1 / (1 + ratio^2n), or its square root for the -3 dB convention."""
    h = 1.0 / (1.0 + ratio ** (2 * order))
    return torch.sqrt(h) if kind == "butterworth_3db" else h


def lowpass(r: torch.Tensor, kind: str, cutoff: float, order: int = 2) -> torch.Tensor:
    if kind == "ideal":
        return (r <= cutoff).to(r.dtype)
    if kind == "gaussian":
        return torch.exp(-(r**2) / (2 * cutoff**2))
    return _butterworth(r / cutoff, kind, order)


def highpass(r: torch.Tensor, kind: str, cutoff: float, order: int = 2) -> torch.Tensor:
    if kind.startswith("butterworth"):
        ratio = torch.where(r > 0, cutoff / r.clamp_min(1e-12), torch.full_like(r, float("inf")))
        return _butterworth(ratio, kind, order)
    return 1.0 - lowpass(r, kind, cutoff, order)


def transfer_function(height: int, width: int, kind: str, passband: str, cutoff, order: int = 2, device=None,
                      unit: str = "nyquist") -> torch.Tensor:
    """H(u, v) on the unshifted FFT grid, shape [height, width], real."""
    r = radius_grid(height, width, device, unit)
    if passband == "low":
        return lowpass(r, kind, float(cutoff), order)
    if passband == "high":
        return highpass(r, kind, float(cutoff), order)
    low_c, high_c = (float(c) for c in cutoff)
    return highpass(r, kind, low_c, order) * lowpass(r, kind, high_c, order)


def check_fft_options(kind, passband, cutoff, order, prefix: str = "filter", unit: str = "nyquist") -> None:
    choice(f"{prefix}.kind", kind, KINDS)
    choice(f"{prefix}.pass", passband, PASSES)
    if unit not in UNITS:
        raise ConfigError(f"{prefix}.unit", f"must be nyquist (cutoff as a fraction of the Nyquist radius) or px "
                                            f"(cutoff in frequency samples, FAIR's D0); got {unit!r}")
    in_range = (lambda c: 0 < c <= 1) if unit == "nyquist" else (lambda c: c > 0)
    allowed = "in (0, 1] (fractions of the Nyquist radius)" if unit == "nyquist" else "> 0 (frequency samples from the centre)"
    if passband == "band":
        ok = isinstance(cutoff, Sequence) and not isinstance(cutoff, str) and len(cutoff) == 2
        if not ok or not all(is_number(c) and in_range(c) for c in cutoff) or not cutoff[0] < cutoff[1]:
            raise ConfigError(f"{prefix}.cutoff", f"band pass needs two cutoffs [low, high] with low < high, each {allowed}; got {cutoff!r}")
    elif not is_number(cutoff) or not in_range(cutoff):
        raise ConfigError(f"{prefix}.cutoff", f"must be {allowed} with {prefix}.unit={unit}; got {cutoff!r}")
    if kind.startswith("butterworth") and (isinstance(order, bool) or not isinstance(order, int) or order < 1):
        raise ConfigError(f"{prefix}.order", f"Butterworth order must be an integer >= 1; got {order!r}")


class FFTFilter(nn.Module):
    """Multiplies the 2D spectrum of every channel by H; masks are cached per (H, W, device)."""

    def __init__(self, kind: str = "butterworth", passband: str = "high", cutoff=0.2, order: int = 2, unit: str = "nyquist"):
        super().__init__()
        check_fft_options(kind, passband, cutoff, order, unit=unit)
        self.kind, self.passband, self.order, self.unit = kind, passband, int(order), unit
        self.cutoff = tuple(float(c) for c in cutoff) if passband == "band" else float(cutoff)
        self._masks: Dict[Tuple[int, int, str], torch.Tensor] = {}

    def mask(self, height: int, width: int, device) -> torch.Tensor:
        key = (height, width, str(device))
        if key not in self._masks:
            self._masks[key] = transfer_function(height, width, self.kind, self.passband, self.cutoff, self.order, device, self.unit)
        return self._masks[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # H is real and even (H(-f) = H(f)), so the half spectrum of rfft2 is enough: half the work.
        height, width = x.shape[-2:]
        h = self.mask(height, width, x.device)[:, : width // 2 + 1]
        return torch.fft.irfft2(torch.fft.rfft2(x.float()) * h, s=(height, width)).to(x.dtype)

    def removes_mean(self) -> bool:
        """True when H(0) = 0 (high and band pass): the output has zero mean, so it leaves [0, 1]."""
        return self.passband != "low"

    def extra_repr(self) -> str:
        unit = " px" if self.unit == "px" else " of Nyquist"
        return f"{self.kind} {self.passband}-pass, cutoff={self.cutoff}{unit}, order={self.order}"
