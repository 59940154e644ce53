"""Texture sources for DRAEM-style pseudo-anomalies: a folder of texture images (DTD in the
paper) read once into a uint8 bank, and the random photometric/geometric changes DRAEM's data
loader applies to each texture before it is blended into an image.

DRAEM (VitjanZ/DRAEM, data_loader.py) draws 3 distinct operations out of 10 imgaug augmenters
per texture and applies them in the drawn order. The 10, batched here in torch on float images
in [0, 1] (every image draws its own parameters; values are quantised to 8 bit where the
operation is defined on 8-bit levels):
    gamma       GammaContrast((0.5, 2.0), per_channel=True): x ** g, one g per channel
    brightness  MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30)): the brightness
                channel scaled and shifted; here the luma Y (imgaug picks one of YCrCb, HSV,
                HLS, Lab, Luv per image), the change added to every channel
    sharpness   pillike.EnhanceSharpness(factor (0, 2)): PIL's blend of the image with its
                3x3 SMOOTH filter (border pixels unfiltered)
    hue_sat     AddToHueAndSaturation((-50, 50), per_channel=True): hue turned by v/255 of the
                circle and saturation shifted by v/255, two independent v (colour images only;
                a grey image has no hue and is left as it is)
    solarize    Solarize(0.5, threshold=(32, 128)): half of the images get every level >= t
                inverted
    posterize   Posterize(): keep the top b in {1..8} bits of every level
    invert      Invert(): 255 - v
    autocontrast  pillike.Autocontrast(cutoff 0..20 %): PIL's autocontrast per channel
    equalize    pillike.Equalize(): PIL's histogram equalisation per channel
    rotate      Affine(rotate=(-45, 45)): bilinear, zero fill
No per-image Python: each operation is one batched call over the images that drew it (on an
accelerator over the whole batch, kept where drawn, so nothing waits for the device).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from freqexp.augment.geometric import rotate
from freqexp.errors import ConfigError

log = logging.getLogger("freqexp")

LUMA = (0.299, 0.587, 0.114)


def _uniform(b: int, low: float, high: float, device, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(b, *shape, device=device)


def _levels(x: torch.Tensor) -> torch.Tensor:
    """8-bit levels 0..255 (long) of an image in [0, 1]."""
    return (x.clamp(0, 1) * 255).round().long()


def _luma(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    w = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _histograms(levels: torch.Tensor) -> torch.Tensor:
    """Per image and channel, the count of each of the 256 levels: [B, C, 256]."""
    b, c = levels.shape[:2]
    flat = levels.reshape(b, c, -1)
    return torch.zeros(b, c, 256, device=levels.device, dtype=torch.long).scatter_add_(2, flat, torch.ones_like(flat))


def _apply_lut(levels: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    b, c = levels.shape[:2]
    return lut.gather(2, levels.reshape(b, c, -1)).view_as(levels)


# -- the ten operations: (x [B,C,H,W] in [0,1]) -> same shape, each image with its own parameters
def gamma_contrast(x: torch.Tensor, gamma: Optional[torch.Tensor] = None) -> torch.Tensor:
    g = _uniform(x.shape[0], 0.5, 2.0, x.device, x.shape[1], 1, 1) if gamma is None else gamma
    return x.clamp(0, 1) ** g


def brightness(x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    mul, add = _uniform(b, 0.8, 1.2, x.device, 1, 1, 1), _uniform(b, -30 / 255, 30 / 255, x.device, 1, 1, 1)
    y = _luma(x)
    return (x + y * (mul - 1) + add).clamp(0, 1)


def sharpness(x: torch.Tensor, factor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PIL ImageEnhance.Sharpness: blend(SMOOTH(x), x, factor); SMOOTH = [[1,1,1],[1,5,1],[1,1,1]] / 13,
    the outermost rows and columns copied unfiltered. `factor` [B,1,1,1], drawn from [0, 2) when None."""
    factor = _uniform(x.shape[0], 0.0, 2.0, x.device, 1, 1, 1) if factor is None else factor
    smooth = x.clone()
    h, w = x.shape[-2:]
    if min(h, w) >= 3:  # nine shifted views (a depthwise conv is slow on CPUs)
        total = 4 * x[..., 1:-1, 1:-1]
        for dy in range(3):
            for dx in range(3):
                total = total + x[..., dy:h - 2 + dy, dx:w - 2 + dx]
        smooth[..., 1:-1, 1:-1] = total / 13
    return (smooth + factor * (x - smooth)).clamp(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] RGB in [0,1] -> HSV, hue as a fraction of the circle."""
    r, g, b = x.unbind(1)
    value, which = x.max(1)
    delta = value - x.amin(1)
    safe = delta.clamp_min(1e-12)
    sectors = torch.stack([((g - b) / safe) % 6, (b - r) / safe + 2, (r - g) / safe + 4], 1)
    hue = torch.where(delta > 0, sectors.gather(1, which.unsqueeze(1)).squeeze(1) / 6, torch.zeros_like(delta))
    saturation = torch.where(value > 0, delta / value.clamp_min(1e-12), torch.zeros_like(delta))
    return torch.stack([hue, saturation, value], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = (t.unsqueeze(1) for t in hsv.unbind(1))
    k = (torch.tensor([5.0, 3.0, 1.0], device=hsv.device, dtype=hsv.dtype).view(1, 3, 1, 1) + h * 6) % 6
    return v - v * s * torch.minimum(k, 4 - k).clamp(0, 1)


def hue_saturation(x: torch.Tensor, hue: Optional[torch.Tensor] = None, saturation: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Hue turned by `hue` (a fraction of the circle, [B,1,1]) and saturation shifted by `saturation`,
    both drawn from +-50/255 when None; grey images unchanged."""
    if x.shape[1] != 3:
        return x
    b = x.shape[0]
    hue = _uniform(b, -50 / 255, 50 / 255, x.device, 1, 1) if hue is None else hue
    sat = _uniform(b, -50 / 255, 50 / 255, x.device, 1, 1) if saturation is None else saturation
    hsv = rgb_to_hsv(x.clamp(0, 1))
    hsv = torch.stack([(hsv[:, 0] + hue) % 1.0, (hsv[:, 1] + sat).clamp(0, 1), hsv[:, 2]], 1)
    return hsv_to_rgb(hsv)


def solarize(x: torch.Tensor, threshold: Optional[torch.Tensor] = None, applied: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Levels >= threshold (8-bit, [B,1,1,1], drawn from 32..128) inverted, in the images where
    `applied` ([B,1,1,1] bool, drawn with probability 0.5)."""
    b = x.shape[0]
    levels = _levels(x)
    threshold = torch.randint(32, 129, (b, 1, 1, 1), device=x.device) if threshold is None else threshold
    applied = torch.rand(b, 1, 1, 1, device=x.device) < 0.5 if applied is None else applied
    out = torch.where(applied & (levels >= threshold), 255 - levels, levels)
    return out.to(x.dtype) / 255


def posterize(x: torch.Tensor, bits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The top `bits` ([B,1,1,1], drawn from 1..8) bits of every 8-bit level kept."""
    bits = torch.randint(1, 9, (x.shape[0], 1, 1, 1), device=x.device) if bits is None else bits
    step = 2 ** (8 - bits)
    return (_levels(x) // step * step).to(x.dtype) / 255


def invert(x: torch.Tensor) -> torch.Tensor:
    return 1 - x.clamp(0, 1)


def autocontrast(x: torch.Tensor, cutoff: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PIL ImageOps.autocontrast per channel: drop `cutoff` % of the pixels at each end of the
    histogram, stretch the remaining range [lo, hi] to [0, 255]; channels with hi <= lo unchanged.
    `cutoff` [B] in percent (drawn from 0..20 when None)."""
    b = x.shape[0]
    levels = _levels(x)
    hist = _histograms(levels)
    n = hist[..., :1].new_full((b, 1, 1), levels[0, 0].numel())
    if cutoff is None:
        cutoff = torch.randint(0, 21, (b,), device=x.device)
    cut = n * cutoff.view(b, 1, 1) // 100
    lo = (hist.cumsum(-1) > cut).long().argmax(-1, keepdim=True)  # first level with pixels left after the cut
    hi = 255 - (hist.flip(-1).cumsum(-1) > cut).long().argmax(-1, keepdim=True)
    ramp = torch.arange(256, device=x.device, dtype=torch.float64).view(1, 1, 256)
    scale = 255.0 / (hi - lo).clamp_min(1).double()
    stretched = (ramp * scale - lo.double() * scale).clamp(0, 255).floor().long()
    lut = torch.where(hi > lo, stretched, ramp.long().expand_as(stretched))
    return _apply_lut(levels, lut).to(x.dtype) / 255


def equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageOps.equalize per channel: step = (pixels - pixels at the highest level) // 255,
    lut[i] = (step // 2 + pixels below level i) // step; unchanged when step is 0."""
    lv = _levels(x)
    hist = _histograms(lv)
    top = 255 - (hist.flip(-1) > 0).long().argmax(-1, keepdim=True)
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, top)) // 255
    below = hist.cumsum(-1) - hist
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp(max=255)
    ramp = torch.arange(256, device=x.device).view(1, 1, 256).expand_as(lut)
    lut = torch.where(step > 0, lut, ramp)
    return _apply_lut(lv, lut).to(x.dtype) / 255


def rotate_45(x: torch.Tensor) -> torch.Tensor:
    return rotate(x, _uniform(x.shape[0], -45.0, 45.0, x.device))


TEXTURE_OPS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gamma": gamma_contrast, "brightness": brightness, "sharpness": sharpness, "hue_saturation": hue_saturation,
    "solarize": solarize, "posterize": posterize, "invert": invert, "autocontrast": autocontrast,
    "equalize": equalize, "rotate": rotate_45,
}


def random_texture_ops(x: torch.Tensor, k: int = 3, subsets: Optional[bool] = None) -> torch.Tensor:
    """Each image gets k distinct operations of TEXTURE_OPS in a random order (DRAEM: 3 of 10).
    On an accelerator every operation runs on the whole batch and is kept where it was drawn (no
    host-device synchronisation); on the CPU each runs on the images that drew it only (a tenth
    of the work; the parameters are then drawn for those images, so the two paths give different
    draws for the same seed, from the same distribution)."""
    if k <= 0:
        return x
    b = x.shape[0]
    subsets = x.device.type == "cpu" if subsets is None else subsets
    ops = list(TEXTURE_OPS.values())
    order = torch.rand(b, len(ops), device=x.device).argsort(1)[:, :k]  # distinct, in drawn order
    for step in range(k):
        drawn = order[:, step]
        if subsets:
            out = x.clone()
            for j, op in enumerate(ops):
                index = torch.nonzero(drawn == j).flatten()
                if len(index):
                    out[index] = op(x[index])
        else:
            out = x
            for j, op in enumerate(ops):
                out = torch.where((drawn == j).view(b, 1, 1, 1), op(x), out)
        x = out
    return x


# -- texture folders ------------------------------------------------------------------------------
_BANK: Dict[Tuple, torch.Tensor] = {}  # the last bank read, kept across runs of one process


def texture_files(folder, key: str = "augment.texture_dir") -> list[Path]:
    """The image files in `folder` and every subfolder below it (DTD keeps its images in one
    subfolder per class), sorted by path; hidden files skipped. ConfigError when there are none."""
    from freqexp.data.images import DEFAULT_EXTENSIONS  # data's, on this floor: textures are image files

    root = Path(str(folder)).expanduser()
    if not root.is_dir():
        raise ConfigError(key, f"{root}: folder not found (a folder of texture images, e.g. DTD's dtd/images)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in DEFAULT_EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise ConfigError(key, f"{root}: no images ({', '.join(DEFAULT_EXTENSIONS)}) in it or its subfolders")
    return files


def spread(files: list, limit: Optional[int]) -> list:
    """At most `limit` files, evenly spaced in sorted order (so every DTD class keeps its share)."""
    if limit is None or limit >= len(files):
        return files
    return [files[math.floor(i * len(files) / limit)] for i in range(limit)]


def texture_bank(folder, channels: int, height: int, width: int, limit: Optional[int] = None) -> torch.Tensor:
    """uint8 textures [N, C, H, W] on the CPU, each resized (stretched, bilinear) to the image size
    as DRAEM's loader does; read once per process for the same folder, size and limit."""
    from freqexp.data.images import Geometry, decode  # data's, on this floor: decoded as datasets' images are

    files = spread(texture_files(folder), limit)
    key = (str(Path(str(folder)).expanduser().resolve()), channels, height, width, len(files))
    if key not in _BANK:
        log.info("augment: reading %d textures from %s at %dx%d", len(files), folder, height, width)
        images, _ = decode(files, channels, Geometry((height, width), None))
        _BANK.clear()
        _BANK[key] = images
    return _BANK[key]
