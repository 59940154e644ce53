"""flip_rot: the 8 symmetries of the square (flips and 90-degree rotations). With
`multiplicity: N` the training set is enlarged xN once before training (the 5-10x augmentation
of the original Fashion-MNIST study): the originals plus N-1 distinct transforms of each image.
Non-square images use only the transforms that keep their shape."""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch
from torch import nn

from freqexp.augment.base import AUGMENTS
from freqexp.errors import ConfigError

Transform = Callable[[torch.Tensor], torch.Tensor]
SQUARE: List[Tuple[str, Transform]] = [
    ("identity", lambda x: x),
    ("flip_h", lambda x: x.flip(-1)),
    ("flip_v", lambda x: x.flip(-2)),
    ("rot180", lambda x: x.rot90(2, (-2, -1))),
    ("rot90", lambda x: x.rot90(1, (-2, -1))),
    ("rot270", lambda x: x.rot90(3, (-2, -1))),
    ("transpose", lambda x: x.transpose(-1, -2)),
    ("anti_transpose", lambda x: x.rot90(2, (-2, -1)).transpose(-1, -2)),
]


@AUGMENTS.register("flip_rot")
class FlipRot(nn.Module):
    def __init__(self, multiplicity: int = 5):
        super().__init__()
        if isinstance(multiplicity, bool) or not isinstance(multiplicity, int) or not 1 <= multiplicity <= 8:
            raise ConfigError("augment.multiplicity", f"must be an integer in 1..8 (the square has 8 symmetries); got {multiplicity!r}")
        self.multiplicity = multiplicity

    def transforms(self, height: int, width: int) -> List[Tuple[str, Transform]]:
        usable = SQUARE if height == width else SQUARE[:4]
        if self.multiplicity > len(usable):
            raise ConfigError("augment.multiplicity", f"{height}x{width} images have {len(usable)} shape-keeping flips/rotations; got {self.multiplicity}")
        return usable[: self.multiplicity]

    def expand(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N * multiplicity, C, H, W]: originals first."""
        return torch.cat([t(images) for _, t in self.transforms(images.shape[-2], images.shape[-1])])

    def forward(self, x):
        return x, x


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Each image [B,C,H,W] rotated by its own angle (degrees [B]) about the image centre,
    bilinear, the uncovered corners filled with 0: imgaug's Affine(rotate=...) with its defaults
    (order 1, constant mode, cval 0), as DRAEM's data loader uses it. The rotation is done in
    pixel space, so non-square images are rotated, not sheared."""
    import torch.nn.functional as F

    b, _, h, w = x.shape
    rad = degrees.to(device=x.device, dtype=torch.float32) * (torch.pi / 180)
    cos, sin = torch.cos(rad), torch.sin(rad)
    # output pixel -> input pixel, in grid_sample's normalised coordinates (x spans W, y spans H)
    theta = torch.stack([torch.stack([cos, -sin * h / w, torch.zeros_like(cos)], -1),
                         torch.stack([sin * w / h, cos, torch.zeros_like(cos)], -1)], 1)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False).to(x.dtype)


def random_rotation(x: torch.Tensor, p: float, max_degrees: float) -> torch.Tensor:
    """A fraction p of the batch (each image with probability p) rotated by an angle drawn
    uniformly from [-max_degrees, max_degrees]; the rest unchanged. DRAEM rotates 30 % of its
    training images by up to 90 degrees (train target included)."""
    if p <= 0:
        return x
    b = x.shape[0]
    degrees = (2 * torch.rand(b, device=x.device) - 1) * max_degrees
    chosen = (torch.rand(b, 1, 1, 1, device=x.device) < p)
    return torch.where(chosen, rotate(x, degrees), x)
