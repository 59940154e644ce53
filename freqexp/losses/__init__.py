"""Loss terms and the composite built from a spec such as `mse+ssim`."""
from freqexp.losses.composite import CompositeLoss, build_loss, parse_spec
from freqexp.losses.terms import LOSS_TERMS
from freqexp.losses import frequency  # noqa: F401  (registers fft, focal_freq, wavelet)
from freqexp.losses import spatial  # noqa: F401  (registers ms_ssim, center_crop, center_weighted)

__all__ = ["CompositeLoss", "LOSS_TERMS", "build_loss", "parse_spec"]
