"""Batched 2D discrete wavelet transform in torch, built from pywavelets' filter banks and
matching `pywt.dwt2` / `pywt.idwt2` with mode='periodization' (odd sizes: the last row/column
is repeated, as pywt does; the inverse crops back).

Sub-band names: LL = approximation (pywt cA), LH = pywt cH (low-pass along x, high-pass along
y: horizontal edges), HL = pywt cV (vertical edges), HH = pywt cD (diagonal)."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from freqexp.errors import ConfigError

BANDS = ("LL", "LH", "HL", "HH")


def wavelet_filters(name: str) -> Dict[str, torch.Tensor]:
    import pywt

    if not isinstance(name, str) or name not in pywt.wavelist(kind="discrete"):
        families = ", ".join(f for f in pywt.families() if pywt.wavelist(f, kind="discrete"))
        raise ConfigError("filter.wavelet", f"unknown wavelet {name!r}; use a pywavelets discrete wavelet name (haar, db2, bior2.2, sym4, ...; families: {families})")
    w = pywt.Wavelet(name)
    return {k: torch.tensor(getattr(w, k), dtype=torch.float32) for k in ("dec_lo", "dec_hi", "rec_lo", "rec_hi")}


def _kernels(f_lo: torch.Tensor, f_hi: torch.Tensor) -> torch.Tensor:
    """[4, 1, L, L] separable kernels in band order LL, LH, HL, HH (first factor along y)."""
    pairs = [(f_lo, f_lo), (f_hi, f_lo), (f_lo, f_hi), (f_hi, f_hi)]  # (along y, along x)
    return torch.stack([torch.outer(a, b) for a, b in pairs]).unsqueeze(1)


def dwt2(x: torch.Tensor, filters: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One level on [..., H, W]: (LL, (LH, HL, HH)), each [..., ceil(H/2), ceil(W/2)]. One
    strided conv2d over the circularly padded image computes all four bands."""
    lo, hi = filters["dec_lo"].to(x.device, x.dtype), filters["dec_hi"].to(x.device, x.dtype)
    if x.shape[-2] % 2:
        x = torch.cat([x, x[..., -1:, :]], dim=-2)
    if x.shape[-1] % 2:
        x = torch.cat([x, x[..., -1:]], dim=-1)
    lead, (m, n) = x.shape[:-2], x.shape[-2:]
    length = lo.numel()
    p = length // 2 - 1
    flat = x.reshape(-1, 1, m, n)
    rows = torch.arange(-p, m + length - 1 - p, device=x.device) % m  # circular padding of any width
    cols = torch.arange(-p, n + length - 1 - p, device=x.device) % n
    padded = flat[:, :, rows][:, :, :, cols]
    out = F.conv2d(padded, _kernels(lo.flip(0), hi.flip(0)), stride=2)  # [N, 4, m/2, n/2]
    out = out.reshape(*lead, 4, m // 2, n // 2)
    return out[..., 0, :, :], (out[..., 1, :, :], out[..., 2, :, :], out[..., 3, :, :])


def idwt2(ll: torch.Tensor, details: Sequence[torch.Tensor], filters: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of dwt2: y[(2k + j + 1 - L/2) mod M] += c[k] g[j] along each axis, as one
    transposed conv2d whose overhang is folded back (periodization)."""
    lo, hi = filters["rec_lo"].to(ll.device, ll.dtype), filters["rec_hi"].to(ll.device, ll.dtype)
    lead, (k1, k2) = ll.shape[:-2], ll.shape[-2:]
    m, n, length = 2 * k1, 2 * k2, lo.numel()
    bands = torch.stack([ll, *details], dim=-3).reshape(-1, 4, k1, k2)
    full = F.conv_transpose2d(bands, _kernels(lo, hi), stride=2)  # [N, 1, 2K1-2+L, 2K2-2+L]
    shift = 1 - length // 2
    rows = (torch.arange(full.shape[-2], device=ll.device) + shift) % m
    cols = (torch.arange(full.shape[-1], device=ll.device) + shift) % n
    folded = torch.zeros(full.shape[0], 1, m, full.shape[-1], device=ll.device, dtype=ll.dtype).index_add_(2, rows, full)
    out = torch.zeros(full.shape[0], 1, m, n, device=ll.device, dtype=ll.dtype).index_add_(3, cols, folded)
    return out.reshape(*lead, m, n)


def wavedec2(x: torch.Tensor, filters, level: int) -> Tuple[torch.Tensor, List[Tuple[torch.Tensor, ...]], List[Tuple[int, int]]]:
    """Multi-level: (LL_level, [details level 1 (finest) ... level n], sizes before each level)."""
    details, sizes = [], []
    for _ in range(level):
        sizes.append((x.shape[-2], x.shape[-1]))
        x, d = dwt2(x, filters)
        details.append(d)
    return x, details, sizes


def waverec2(ll: torch.Tensor, details, sizes, filters) -> torch.Tensor:
    x = ll
    for d, (h, w) in zip(reversed(details), reversed(sizes)):
        x = idwt2(x, d, filters)[..., :h, :w]
    return x


class DWTFilter(nn.Module):
    """Decompose `level` levels, zero the sub-bands not in `keep`, reconstruct. `keep` names
    band types: LL is the coarsest approximation; LH / HL / HH apply to every level."""

    def __init__(self, wavelet: str = "haar", level: int = 1, keep: Sequence[str] = ("LH", "HL", "HH")):
        super().__init__()
        if isinstance(level, bool) or not isinstance(level, int) or level < 1:
            raise ConfigError("filter.level", f"must be an integer >= 1; got {level!r}")
        keep = [keep] if isinstance(keep, str) else list(keep)
        bad = [k for k in keep if k not in BANDS]
        if bad or not keep:
            raise ConfigError("filter.keep", f"must be a non-empty list of {', '.join(BANDS)}; got {keep!r}")
        self.wavelet, self.level, self.keep = wavelet, level, set(keep)
        for name, t in wavelet_filters(wavelet).items():
            self.register_buffer(name, t, persistent=False)

    @property
    def filters(self) -> Dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("dec_lo", "dec_hi", "rec_lo", "rec_hi")}

    def min_size(self) -> int:
        return 2**self.level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # fp32 convolutions under mixed precision
            return self._filter(x.float()).to(x.dtype)

    def _filter(self, x: torch.Tensor) -> torch.Tensor:
        ll, details, sizes = wavedec2(x, self.filters, self.level)
        if "LL" not in self.keep:
            ll = torch.zeros_like(ll)
        details = [tuple(band if name in self.keep else torch.zeros_like(band) for name, band in zip(BANDS[1:], d)) for d in details]
        return waverec2(ll, details, sizes, self.filters)

    def extra_repr(self) -> str:
        return f"wavelet={self.wavelet}, level={self.level}, keep={sorted(self.keep)}"
