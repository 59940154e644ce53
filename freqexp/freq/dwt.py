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

    try:
        w = pywt.Wavelet(name)
    except ValueError:
        families = ", ".join(f for f in pywt.families() if pywt.wavelist(f, kind="discrete"))
        raise ConfigError("filter.wavelet", f"unknown wavelet {name!r}; use a pywavelets discrete wavelet name (haar, db2, bior2.2, sym4, ...; families: {families})") from None
    return {k: torch.tensor(getattr(w, k), dtype=torch.float32) for k in ("dec_lo", "dec_hi", "rec_lo", "rec_hi")}


def _analysis_1d(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Along the last axis: c[k] = sum_j f[j] x[(2k + L/2 - j) mod M] (pywt periodization)."""
    if x.shape[-1] % 2:
        x = torch.cat([x, x[..., -1:]], dim=-1)
    shape, m = x.shape, x.shape[-1]
    length = lo.numel()
    p = length // 2 - 1
    flat = x.reshape(-1, 1, m)
    idx = (torch.arange(-p, m + length - 1 - p, device=x.device)) % m  # circular padding, any size
    padded = flat[..., idx]
    w = torch.stack([lo.flip(0), hi.flip(0)]).unsqueeze(1).to(x.device, x.dtype)
    out = F.conv1d(padded, w, stride=2)
    return out[:, 0].reshape(*shape[:-1], m // 2), out[:, 1].reshape(*shape[:-1], m // 2)


def _synthesis_1d(a: torch.Tensor, d: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Inverse of _analysis_1d: y[(2k + j + 1 - L/2) mod M] += a[k] lo[j] + d[k] hi[j]."""
    shape, k = a.shape, a.shape[-1]
    m, length = 2 * k, lo.numel()
    w = torch.stack([lo, hi]).unsqueeze(1).to(a.device, a.dtype)  # [2, 1, L]
    both = torch.stack([a.reshape(-1, k), d.reshape(-1, k)], dim=1)  # [N, 2, K]
    full = F.conv_transpose1d(both, w, stride=2)  # [N, 1, 2K - 2 + L]
    idx = (torch.arange(full.shape[-1], device=a.device) + 1 - length // 2) % m
    out = torch.zeros(full.shape[0], m, device=a.device, dtype=a.dtype)
    out.index_add_(1, idx, full[:, 0])
    return out.reshape(*shape[:-1], m)


def dwt2(x: torch.Tensor, filters: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One level on [..., H, W]: (LL, (LH, HL, HH)), each [..., ceil(H/2), ceil(W/2)]."""
    lo, hi = filters["dec_lo"], filters["dec_hi"]
    row_lo, row_hi = _analysis_1d(x, lo, hi)  # along W (x)
    ll, lh = _analysis_1d(row_lo.transpose(-1, -2), lo, hi)  # along H (y)
    hl, hh = _analysis_1d(row_hi.transpose(-1, -2), lo, hi)
    return ll.transpose(-1, -2), (lh.transpose(-1, -2), hl.transpose(-1, -2), hh.transpose(-1, -2))


def idwt2(ll: torch.Tensor, details: Sequence[torch.Tensor], filters: Dict[str, torch.Tensor]) -> torch.Tensor:
    lo, hi = filters["rec_lo"], filters["rec_hi"]
    lh, hl, hh = details
    row_lo = _synthesis_1d(ll.transpose(-1, -2), lh.transpose(-1, -2), lo, hi).transpose(-1, -2)
    row_hi = _synthesis_1d(hl.transpose(-1, -2), hh.transpose(-1, -2), lo, hi).transpose(-1, -2)
    return _synthesis_1d(row_lo, row_hi, lo, hi)


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
        dtype = x.dtype
        ll, details, sizes = wavedec2(x.float(), self.filters, self.level)
        if "LL" not in self.keep:
            ll = torch.zeros_like(ll)
        details = [tuple(band if name in self.keep else torch.zeros_like(band) for name, band in zip(BANDS[1:], d)) for d in details]
        return waverec2(ll, details, sizes, self.filters).to(dtype)

    def extra_repr(self) -> str:
        return f"wavelet={self.wavelet}, level={self.level}, keep={sorted(self.keep)}"
