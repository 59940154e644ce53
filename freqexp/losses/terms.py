"""Pixel-space loss terms. Each takes (pred, target) images in [0, 1], shape [B, C, H, W],
and returns a scalar. `defaults` are the term's options (loss.params.<term>.*);
`min_size` is the smallest image side the term can handle with given options."""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn

from freqexp.registry import Registry

LOSS_TERMS: Registry[type["LossTerm"]] = Registry("loss term", "loss")


def positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


class LossTerm(nn.Module):
    defaults: Dict[str, Any] = {}

    @staticmethod
    def min_size(params: Dict[str, Any]) -> int:
        return 1

    @staticmethod
    def check(params: Dict[str, Any]) -> Dict[str, str]:
        """Return {param: problem} for invalid options."""
        return {}


@LOSS_TERMS.register("mse")
class MSE(LossTerm):
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred, target)


@LOSS_TERMS.register("l1")
class L1(LossTerm):
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(pred, target)


@LOSS_TERMS.register("charbonnier")
class Charbonnier(LossTerm):
    """sqrt(d^2 + eps^2): L1-like for large errors, smooth (L2-like) near zero."""

    defaults = {"eps": 1.0e-3}

    def __init__(self, eps: float = 1.0e-3):
        super().__init__()
        self.eps = float(eps)

    @staticmethod
    def check(params):
        return {} if positive_number(params["eps"]) else {"eps": f"must be a number > 0, got {params['eps']!r}"}

    def forward(self, pred, target):
        diff = pred.float() - target.float()
        return torch.sqrt(diff * diff + self.eps**2).mean()


def gaussian_window(win_size: int, sigma: float, device=None) -> torch.Tensor:
    coords = torch.arange(win_size, dtype=torch.float32, device=device) - (win_size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, win_size: int = 7, sigma: float = 1.5, data_range: float = 1.0,
         padding: str = "valid") -> torch.Tensor:
    """Mean structural similarity with a Gaussian window (per channel), computed in fp32 with
    autocast off so it stays accurate under mixed precision. padding: `valid` (the window only
    where it fits) or `zero` (the image zero-padded by win_size // 2, a map the image's size:
    DRAEM's loss.py)."""
    with torch.autocast(x.device.type, enabled=False):
        return _ssim_fp32(x.float(), y.float(), win_size, sigma, data_range, padding)


def _ssim_fp32(x: torch.Tensor, y: torch.Tensor, win_size: int, sigma: float, data_range: float, padding: str = "valid") -> torch.Tensor:
    pad = win_size // 2 if padding == "zero" else 0
    ssim_map, _ = ssim_and_cs_maps(x, y, gaussian_window(win_size, sigma, x.device), data_range, pad)
    return ssim_map.mean()


def ssim_and_cs_maps(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, data_range: float = 1.0, pad: int = 0):
    """(SSIM map, contrast-structure map), [B, C, H-w+1+2pad, W-w+1+2pad] each: a separable
    Gaussian window applied per channel, with `pad` zero pixels around the image (0: valid
    convolution). Shared by ssim and ms_ssim."""
    channels, win = x.shape[1], window.numel()
    kh = window.view(1, 1, win, 1).repeat(channels, 1, 1, 1)
    kw = window.view(1, 1, 1, win).repeat(channels, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kh, padding=(pad, 0), groups=channels), kw, padding=(0, pad), groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    cs_map = (2 * sxy + c2) / (sxx + syy + c2)
    return (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs_map, cs_map


SSIM_PADDINGS = ("valid", "zero")


@LOSS_TERMS.register("ssim")
class SSIMLoss(LossTerm):
    """1 - SSIM. The default 7-px window without padding fits 28 px images (Fashion-MNIST);
    `padding: zero` averages a map the image's size over the zero-padded image (DRAEM's SSIM,
    with win_size 11), which works at any size."""

    defaults = {"win_size": 7, "sigma": 1.5, "padding": "valid"}

    def __init__(self, win_size: int = 7, sigma: float = 1.5, padding: str = "valid"):
        super().__init__()
        self.win_size, self.sigma, self.padding = int(win_size), float(sigma), padding

    @staticmethod
    def min_size(params):
        return 1 if params.get("padding") == "zero" else int(params["win_size"])

    @staticmethod
    def check(params):
        problems = {}
        w = params["win_size"]
        if not isinstance(w, int) or w < 3 or w % 2 == 0:
            problems["win_size"] = f"must be an odd integer >= 3, got {w}"
        if not positive_number(params["sigma"]):
            problems["sigma"] = f"must be > 0, got {params['sigma']}"
        if params.get("padding") not in SSIM_PADDINGS:
            problems["padding"] = f"must be one of {', '.join(SSIM_PADDINGS)}, got {params.get('padding')!r}"
        return problems

    def forward(self, pred, target):
        return 1.0 - ssim(pred, target, self.win_size, self.sigma, padding=self.padding)


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


@LOSS_TERMS.register("gradient")
class GradientLoss(LossTerm):
    """L1 distance between horizontal and vertical finite differences: keeps edges sharp."""

    @staticmethod
    def min_size(params):
        return 2

    def forward(self, pred, target):
        pdx, pdy = image_gradients(pred)
        tdx, tdy = image_gradients(target)
        return 0.5 * (F.l1_loss(pdx, tdx) + F.l1_loss(pdy, tdy))


@LOSS_TERMS.register("tv")
class TotalVariation(LossTerm):
    """Anisotropic total variation of the reconstruction (a smoothness prior; ignores target)."""

    @staticmethod
    def min_size(params):
        return 2

    def forward(self, pred, target):
        dx, dy = image_gradients(pred)
        return dx.abs().mean() + dy.abs().mean()
