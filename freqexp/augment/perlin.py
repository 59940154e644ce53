"""perlin: DRAEM's pseudo-anomalies (Zavrtanik et al., ICCV 2021; VitjanZ/DRAEM, perlin.py and
data_loader.py), batched on the device.

Per image:
1. Perlin gradient noise on a lattice of 2^a x 2^b cells across the image, a and b drawn
   independently from [min, max) = perlin_scale ([0, 6), the default: 1 to 32 cells, the
   official code's choice; see `auto` below): unit gradients at random angles on the lattice
   corners, the quintic fade 6t^5 - 15t^4 + 10t^3, bilinear blending of the four corner ramps,
   times sqrt(2) (values in [-1, 1]);
2. the noise rotated by an angle uniform in [-noise_rotation, noise_rotation] degrees (90),
   bilinear, zero fill (imgaug's Affine, as the official code);
3. the anomaly mask: noise > threshold (0.5);
4. a texture: a random image of augment.texture_dir (DTD in the paper; any folder, images in
   subfolders included), resized to the image, changed by `texture_ops` (3) distinct random
   operations of DRAEM's 10 (freqexp.augment.texture). Without a folder each image is its own
   texture source (changed by the same operations), and a warning says so once per run;
5. blending inside the mask with beta uniform in `beta` ([0, 0.8)):
       out = x * (1 - m) + (1 - beta) * texture * m + beta * x * m.
The mask returned is the thresholded noise, as DRAEM's target (it may be empty: DRAEM then
calls the image normal; the noise may stay below the threshold everywhere).

The lattice counts cells across the image, so the masks keep their proportions at any size, but
on small images the finest lattices are finer than the pixel grid (32 cells on 28 px) and alias
into thin streaks and speckles. perlin_scale: auto is the official [0, 6) on images of 256 px and
more and leaves out, on smaller ones, the lattices whose cells would be under 8 px (the official
finest: 32 cells on 256 px): 1-2 cells at 28 px, 1-4 at 32 px, 1-8 at 64 px. Measured on
Fashion-MNIST (class 0, 5 epochs, seed 0, each image its own texture, no rotation), test AUROC:
0.705 with [0, 6), 0.710 with auto, 0.761 with [0, 3); one seed each, so the default stays the
official choice."""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from freqexp.augment.base import AUGMENTS, check_probability
from freqexp.augment.geometric import rotate
from freqexp.augment.texture import random_texture_ops, texture_bank, texture_files, TEXTURE_OPS
from freqexp.errors import ConfigError

log = logging.getLogger("freqexp")


def fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(height: int, width: int, res: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Perlin gradient noise [B, H, W] for lattices of res[i] = (rows, cols) cells across the image
    ([B, 2] integers) with corner gradients (cos, sin) of `angles` [B, >= rows + 1, >= cols + 1].
    Pixel (y, x) lies at lattice position (y * rows / H, x * cols / W): the official code's grid
    (np.mgrid[0:rows:rows/H, 0:cols:cols/W]) where H and W are multiples of the lattice, and the
    same formula at any other size."""
    b, device = res.shape[0], angles.device
    rows, cols = res[:, 0].view(b, 1, 1).long(), res[:, 1].view(b, 1, 1).long()
    ys = torch.arange(height, device=device).view(1, height, 1) * rows  # exact integer positions x H
    xs = torch.arange(width, device=device).view(1, 1, width) * cols
    cell_y, cell_x = ys // height, xs // width
    fy, fx = (ys % height).float() / height, (xs % width).float() / width
    stride = angles.shape[2]
    flat = angles.reshape(b, -1)

    def corner(dy: int, dx: int, oy, ox) -> torch.Tensor:
        index = ((cell_y + dy) * stride + cell_x + dx).expand(b, height, width).reshape(b, -1)
        a = flat.gather(1, index).view(b, height, width)
        return torch.cos(a) * oy + torch.sin(a) * ox  # gradient . (offset from that corner)

    n00 = corner(0, 0, fy, fx)
    n10 = corner(1, 0, fy - 1, fx)
    n01 = corner(0, 1, fy, fx - 1)
    n11 = corner(1, 1, fy - 1, fx - 1)
    ty, tx = fade(fy), fade(fx)
    return math.sqrt(2) * torch.lerp(torch.lerp(n00, n10, ty), torch.lerp(n01, n11, ty), tx)


def random_perlin_noise(b: int, height: int, width: int, device, scale: Tuple[int, int] = (0, 6)) -> torch.Tensor:
    """Noise [B, H, W], each image on its own lattice of 2^a x 2^b cells, a, b uniform in [scale[0], scale[1])."""
    exponents = torch.randint(scale[0], scale[1], (b, 2), device=device)
    side = 2 ** (scale[1] - 1) + 1
    angles = 2 * math.pi * torch.rand(b, side, side, device=device)
    return perlin_noise(height, width, 2 ** exponents, angles)


def perlin_masks(b: int, height: int, width: int, device, scale=(0, 6), threshold: float = 0.5,
                 rotation: float = 90.0) -> torch.Tensor:
    """DRAEM's anomaly masks [B, 1, H, W] (bool): rotated Perlin noise above the threshold."""
    noise = random_perlin_noise(b, height, width, device, scale).unsqueeze(1)
    if rotation > 0:
        noise = rotate(noise, (2 * torch.rand(b, device=device) - 1) * rotation)
    return noise > threshold


def blend(x: torch.Tensor, texture: torch.Tensor, mask: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """DRAEM's blend: x outside the mask, (1 - beta) * texture + beta * x inside it."""
    m = mask.to(x.dtype)
    return x * (1 - m) + (1 - beta) * texture * m + beta * x * m


MIN_CELL_PX = 8  # the official finest lattice: 32 cells across 256 px


def auto_perlin_scale(height: int, width: int) -> Tuple[int, int]:
    """The official exponent range [0, 6) without the lattices whose cells would be under 8 px."""
    side = min(height, width)
    top = int(math.floor(math.log2(side / MIN_CELL_PX))) + 1 if side >= MIN_CELL_PX else 1
    return 0, max(1, min(6, top))


def _pair(key: str, value, kind, low, high) -> tuple:
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
    ok = ok and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
    if not ok or not (low <= value[0] < value[1] <= high if kind is int else low <= value[0] <= value[1] <= high):
        raise ConfigError(key, f"must be [min, max] with {low} <= min {'<' if kind is int else '<='} max <= {high}; got {value!r}")
    return tuple(value)


@AUGMENTS.register("perlin")
class PerlinAnomaly(nn.Module):
    """DRAEM's Perlin-noise masks filled with (augmented) textures: see the module doc."""

    mask_covers_change = True  # only pixels inside the mask change

    def __init__(self, p: float = 0.5, texture_dir: Optional[str] = None, max_textures: Optional[int] = None,
                 perlin_scale=(0, 6), threshold: float = 0.5, noise_rotation: float = 90.0, beta=(0.0, 0.8),
                 texture_ops: int = 3):
        super().__init__()
        self.p = check_probability(p)
        self.texture_dir = None if texture_dir in (None, "") else str(texture_dir)
        if self.texture_dir is not None:
            texture_files(self.texture_dir)  # a missing or empty folder fails before training
        if max_textures is not None and (isinstance(max_textures, bool) or not isinstance(max_textures, int) or max_textures < 1):
            raise ConfigError("augment.max_textures", f"must be null (all) or a positive integer; got {max_textures!r}")
        self.max_textures = max_textures
        self.perlin_scale = "auto" if perlin_scale == "auto" else _pair("augment.perlin_scale", perlin_scale, int, 0, 10)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1 <= threshold < 1:
            raise ConfigError("augment.threshold", f"must be a number in [-1, 1) (the noise lies in [-1, 1]); got {threshold!r}")
        self.threshold = float(threshold)
        if isinstance(noise_rotation, bool) or not isinstance(noise_rotation, (int, float)) or not 0 <= noise_rotation <= 180:
            raise ConfigError("augment.noise_rotation", f"must be a number of degrees in [0, 180]; got {noise_rotation!r}")
        self.noise_rotation = float(noise_rotation)
        self.beta = tuple(float(v) for v in _pair("augment.beta", beta, (int, float), 0.0, 1.0))
        if isinstance(texture_ops, bool) or not isinstance(texture_ops, int) or not 0 <= texture_ops <= len(TEXTURE_OPS):
            raise ConfigError("augment.texture_ops", f"must be an integer in 0..{len(TEXTURE_OPS)}; got {texture_ops!r}")
        self.texture_ops = texture_ops
        self._warned = False

    def textures(self, x: torch.Tensor) -> torch.Tensor:
        """One texture per image [B, C, H, W] in [0, 1]: random images of the folder, or the images themselves."""
        b, c, h, w = x.shape
        if self.texture_dir is None:
            if not self._warned:
                log.warning("augment=perlin: augment.texture_dir is not set, so each image is its own texture source "
                            "(changed by %d random operations); DRAEM fills its masks with DTD textures: "
                            "augment.texture_dir=/path/to/dtd/images", self.texture_ops)
                self._warned = True
            return x
        if c not in (1, 3):
            raise ConfigError("augment.texture_dir", f"textures are read as grey (1 channel) or RGB (3); these images have {c} channels")
        bank = texture_bank(self.texture_dir, c, h, w, self.max_textures)
        pick = torch.randint(len(bank), (b,))  # CPU: the bank stays in host memory, only B textures travel
        return bank[pick].to(x.device, non_blocking=True).to(x.dtype) / 255

    def synthesize(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-anomalies for every image: (augmented [B,C,H,W] in [0,1], mask [B,1,H,W] bool)."""
        b, _, h, w = x.shape
        texture = random_texture_ops(self.textures(x), self.texture_ops)
        scale = auto_perlin_scale(h, w) if self.perlin_scale == "auto" else self.perlin_scale
        mask = perlin_masks(b, h, w, x.device, scale, self.threshold, self.noise_rotation)
        beta = self.beta[0] + (self.beta[1] - self.beta[0]) * torch.rand(b, 1, 1, 1, device=x.device)
        return blend(x, texture, mask, beta).clamp(0, 1), mask

    def synthesis_key(self) -> tuple:
        return ("perlin", self.texture_dir, self.max_textures, self.perlin_scale, self.threshold, self.noise_rotation,
                self.beta, self.texture_ops)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Training of a plain reconstruction model: a fraction p of the batch gets an anomaly; target stays clean."""
        out, _ = self.synthesize(x)
        if self.p < 1:
            keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < self.p
            out = torch.where(keep, out, x)
        return out, x
