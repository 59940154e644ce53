"""Spatial loss terms of the FFT multi-memory AE recipe (`mse+center_crop+ms_ssim+center_weighted`).

ms_ssim          1 - multi-scale SSIM (Wang et al. 2003). Scale s >= 2 sees the image after s-1
                 2x2 average poolings (zero-padded by one pixel on odd sides, as pytorch_msssim
                 does), so scale s has side ceil(n / 2^(s-1)). A scale fits when that side is at
                 least the window size. `scales: auto` uses as many of the standard five scales as
                 fit the image it is given (one at least), with the first (finest) weights of
                 (0.0448, 0.2856, 0.3001, 0.2363, 0.1333) renormalized to sum to 1; with win_size 11
                 28 px gives 2 scales, 161 px or more gives all 5. An explicit `scales: N` needs
                 images of at least (win_size - 1) * 2^(N-1) + 1 px (min_size), so a size it cannot
                 handle fails before training. Like pytorch_msssim, the contrast-structure terms of
                 the finer scales and the SSIM of the last one are clipped at 0 (relu) before the
                 weighted product, which is taken per image and channel and then averaged.
center_crop      a pixel loss (mse or l1) on the central `fraction` of height and width only.
center_weighted  mean(w * (pred - target)^2) with a Gaussian centre weight, mean 1 over the image.

Both centre terms put the emphasis where Fashion-MNIST garments are (the middle), trading some
sensitivity to defects near the border for a sharper centre."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from freqexp.errors import ConfigError
from freqexp.losses.terms import LOSS_TERMS, LossTerm, gaussian_window, positive_number, ssim_and_cs_maps

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim_min_size(scales: int, win_size: int) -> int:
    """Smallest side for which `scales` scales fit: ceil(n / 2^(scales-1)) >= win_size."""
    return (win_size - 1) * 2 ** (scales - 1) + 1


def ms_ssim_scales_that_fit(size: int, win_size: int) -> int:
    """How many of the standard scales fit an image whose smaller side is `size` (0 if none)."""
    return sum(1 for s in range(1, len(MS_SSIM_WEIGHTS) + 1) if size >= ms_ssim_min_size(s, win_size))


def ssim_and_cs_per_channel(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, data_range: float = 1.0):
    """(SSIM, contrast-structure) per image and channel, [B, C] each: the means of their maps."""
    ssim_map, cs_map = ssim_and_cs_maps(x, y, window, data_range)
    return ssim_map.flatten(2).mean(-1), cs_map.flatten(2).mean(-1)


def ms_ssim(x: torch.Tensor, y: torch.Tensor, scales: int, win_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean MS-SSIM over images and channels with the first `scales` standard weights
    (renormalized), computed in fp32 with autocast off."""
    with torch.autocast(x.device.type, enabled=False):
        x, y = x.float(), y.float()
        weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], device=x.device)
        weights = weights / weights.sum()
        window = gaussian_window(win_size, sigma, x.device)
        factors = []
        for s in range(scales):
            ssim_bc, cs_bc = ssim_and_cs_per_channel(x, y, window)
            if s < scales - 1:
                factors.append(torch.relu(cs_bc))
                pad = [side % 2 for side in x.shape[-2:]]  # odd sides: one zero pixel each side
                x, y = F.avg_pool2d(x, 2, padding=pad), F.avg_pool2d(y, 2, padding=pad)
        factors.append(torch.relu(ssim_bc))
        per_image = torch.prod(torch.stack(factors) ** weights.view(-1, 1, 1), dim=0)
        return per_image.mean()


def _odd_window_problem(w) -> str | None:
    if isinstance(w, bool) or not isinstance(w, int) or w < 3 or w % 2 == 0:
        return f"must be an odd integer >= 3, got {w!r}"
    return None


@LOSS_TERMS.register("ms_ssim")
class MSSSIMLoss(LossTerm):
    """1 - MS-SSIM; `scales: auto` adapts the number of scales to the image (see module doc)."""

    defaults = {"win_size": 11, "sigma": 1.5, "scales": "auto"}

    def __init__(self, win_size: int = 11, sigma: float = 1.5, scales="auto"):
        super().__init__()
        self.win_size, self.sigma = int(win_size), float(sigma)
        self.scales = scales if scales == "auto" else int(scales)

    @staticmethod
    def min_size(params):
        scales = 1 if params["scales"] == "auto" else int(params["scales"])
        return ms_ssim_min_size(scales, int(params["win_size"]))

    @staticmethod
    def check(params):
        problems = {}
        window = _odd_window_problem(params["win_size"])
        if window:
            problems["win_size"] = window
        if not positive_number(params["sigma"]):
            problems["sigma"] = f"must be > 0, got {params['sigma']!r}"
        s = params["scales"]
        if s != "auto" and (isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= len(MS_SSIM_WEIGHTS)):
            problems["scales"] = f"must be auto or an integer from 1 to {len(MS_SSIM_WEIGHTS)}, got {s!r}"
        return problems

    def scales_for(self, height: int, width: int) -> int:
        side = min(height, width)
        fit = ms_ssim_scales_that_fit(side, self.win_size)
        n = fit if self.scales == "auto" else self.scales
        if n < 1 or n > fit:
            # only reachable when the loss was built without the dataset's image size
            raise ConfigError(
                "loss.params.ms_ssim.scales",
                f"{max(n, 1)} scale(s) with win_size {self.win_size} need images of at least "
                f"{ms_ssim_min_size(max(n, 1), self.win_size)} px; got {height}x{width}",
            )
        return n

    def forward(self, pred, target):
        return 1.0 - ms_ssim(pred, target, self.scales_for(*pred.shape[-2:]), self.win_size, self.sigma)


def _pixel_error(base: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    diff = pred.float() - target.float()
    return diff.abs() if base == "l1" else diff * diff


def centre_slice(size: int, fraction: float) -> slice:
    """The central round(fraction * size) pixels (at least 1), split evenly, extra pixel after."""
    keep = min(size, max(1, round(fraction * size)))
    start = (size - keep) // 2
    return slice(start, start + keep)


@LOSS_TERMS.register("center_crop")
class CenterCropLoss(LossTerm):
    """Pixel loss (`base`: mse or l1) on the central `fraction` of height and width."""

    defaults = {"fraction": 0.5, "base": "mse"}

    def __init__(self, fraction: float = 0.5, base: str = "mse"):
        super().__init__()
        self.fraction, self.base = float(fraction), base

    @staticmethod
    def check(params):
        problems = {}
        f = params["fraction"]
        if not positive_number(f) or f > 1:
            problems["fraction"] = f"must be a number in (0, 1], got {f!r}"
        if params["base"] not in ("mse", "l1"):
            problems["base"] = f"must be mse or l1, got {params['base']!r}"
        return problems

    def forward(self, pred, target):
        rows, cols = centre_slice(pred.shape[-2], self.fraction), centre_slice(pred.shape[-1], self.fraction)
        return _pixel_error(self.base, pred[..., rows, cols], target[..., rows, cols]).mean()


def centre_weights(height: int, width: int, sigma: float, device=None) -> torch.Tensor:
    """exp(-d^2 / 2) with d the distance from the image centre in units of sigma * side (per axis,
    so non-square images get an elliptical weight), normalized to mean 1; shape [H, W]."""
    ys = (torch.arange(height, dtype=torch.float32, device=device) - (height - 1) / 2) / (sigma * height)
    xs = (torch.arange(width, dtype=torch.float32, device=device) - (width - 1) / 2) / (sigma * width)
    w = torch.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))
    return w / w.mean()


@LOSS_TERMS.register("center_weighted")
class CenterWeightedLoss(LossTerm):
    """mean(w * (pred - target)^2), w a Gaussian centred on the image with std `sigma` x side,
    normalized to mean 1 (so the value is on the scale of the plain MSE)."""

    defaults = {"sigma": 0.25}

    def __init__(self, sigma: float = 0.25):
        super().__init__()
        self.sigma = float(sigma)
        self._cache: dict = {}

    @staticmethod
    def check(params):
        return {} if positive_number(params["sigma"]) else {"sigma": f"must be a number > 0, got {params['sigma']!r}"}

    def weights(self, height: int, width: int, device) -> torch.Tensor:
        key = (height, width, str(device))
        if key not in self._cache:
            self._cache[key] = centre_weights(height, width, self.sigma, device)
        return self._cache[key]

    def forward(self, pred, target):
        w = self.weights(pred.shape[-2], pred.shape[-1], pred.device)
        return (w * _pixel_error("mse", pred, target)).mean()

