"""Frequency-domain loss terms. All compute in fp32 (the FFT of fp16 inputs loses precision
and cuFFT needs power-of-two sizes in half precision), so they stay finite under mixed precision."""
from __future__ import annotations

import torch

from freqexp.errors import ConfigError
from freqexp.freq.dwt import wavedec2, wavelet_filters
from freqexp.losses.terms import LOSS_TERMS, LossTerm, positive_number


@LOSS_TERMS.register("fft")
class FFTMagnitudeL1(LossTerm):
    """Mean |abs(F(pred)) - abs(F(target))| with the orthonormal 2D FFT."""

    def forward(self, pred, target):
        fp = torch.fft.fft2(pred.float(), norm="ortho").abs()
        ft = torch.fft.fft2(target.float(), norm="ortho").abs()
        return (fp - ft).abs().mean()


@LOSS_TERMS.register("focal_freq")
class FocalFrequencyLoss(LossTerm):
    """Focal frequency loss (Jiang et al., ICCV 2021): squared spectral distance, weighted per
    frequency by the (detached) distance^alpha normalized to [0, 1] per image, so the frequencies
    that are hardest to synthesize count most."""

    defaults = {"alpha": 1.0, "log_weight": False}

    def __init__(self, alpha: float = 1.0, log_weight: bool = False):
        super().__init__()
        self.alpha, self.log_weight = float(alpha), bool(log_weight)

    @staticmethod
    def check(params):
        return {} if positive_number(params["alpha"]) else {"alpha": f"must be > 0, got {params['alpha']!r}"}

    def forward(self, pred, target):
        diff = torch.fft.fft2(pred.float(), norm="ortho") - torch.fft.fft2(target.float(), norm="ortho")
        dist = diff.real**2 + diff.imag**2
        with torch.no_grad():
            w = dist.sqrt() ** self.alpha
            if self.log_weight:
                w = torch.log1p(w)
            w = w / w.flatten(-2).amax(-1).clamp_min(1e-12)[..., None, None]
        return (w * dist).mean()


@LOSS_TERMS.register("wavelet")
class WaveletL1(LossTerm):
    """L1 between the DWT sub-bands of pred and target (every detail band of every level, and the
    coarsest approximation), averaged over bands; `wavelet` is any pywavelets name."""

    defaults = {"wavelet": "haar", "level": 1}

    def __init__(self, wavelet: str = "haar", level: int = 1):
        super().__init__()
        try:
            filters = wavelet_filters(wavelet)
        except ConfigError as e:
            raise ConfigError("loss.params.wavelet.wavelet", e.message) from None
        for name, t in filters.items():
            self.register_buffer(name, t, persistent=False)
        self.level = int(level)

    @staticmethod
    def min_size(params):
        return 2 ** int(params["level"])

    @staticmethod
    def check(params):
        lv = params["level"]
        return {} if isinstance(lv, int) and not isinstance(lv, bool) and lv >= 1 else {"level": f"must be an integer >= 1, got {lv!r}"}

    def forward(self, pred, target):  # CompositeLoss calls every term with autocast off, in fp32
        filters = {k: getattr(self, k) for k in ("dec_lo", "dec_hi", "rec_lo", "rec_hi")}
        ll_p, det_p, _ = wavedec2(pred.float(), filters, self.level)
        ll_t, det_t, _ = wavedec2(target.float(), filters, self.level)
        terms = [(ll_p - ll_t).abs().mean()]
        for dp, dt in zip(det_p, det_t):
            terms += [(a - b).abs().mean() for a, b in zip(dp, dt)]
        return torch.stack(terms).mean()
