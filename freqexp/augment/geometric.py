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
