"""Generated textures with injected defects and pixel masks, so tests and quick sweeps need
no files. Normal images: two oriented sinusoidal gratings with random phase and a little
noise. Anomalies: one of a blob (bright or dark), a scratch, or a patch of grating at a
perpendicular orientation; the mask marks the pixels the defect changed.

The split is fixed by dataset.split_seed alone: each split draws from its own generator
(split_generator(split_seed, "train" | "val" | "test")), so n_train and limit_train never change
the val and test images. The train split is drawn in chunks of TRAIN_CHUNK images, each from its
own generator, so limit_train=k (or n_train=k) gives the first k images of any larger train split."""
from __future__ import annotations

import hashlib
import math

import torch

from freqexp.data.base import DATASETS, OneClassData, Split
from freqexp.errors import ConfigError

ORIENTATION = math.pi / 4
TRAIN_CHUNK = 64  # train images drawn per generator; a prefix of the train split is a prefix of its chunks


def split_generator(split_seed: int, name: str) -> torch.Generator:
    """The generator of one split (or train chunk) `name`, derived from split_seed alone."""
    seed = int.from_bytes(hashlib.sha256(f"synthetic:{int(split_seed)}:{name}".encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(seed)


def gratings(n: int, size: int, g: torch.Generator, orientation: float = ORIENTATION) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    out = torch.zeros(n, size, size)
    for offset in (0.0, math.pi / 2):
        theta = orientation + offset + 0.1 * (torch.rand(n, 1, 1, generator=g) - 0.5)
        freq = 0.12 + 0.06 * torch.rand(n, 1, 1, generator=g)  # cycles per pixel
        phase = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
        out += torch.sin(2 * math.pi * freq * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase)
    out = 0.5 + 0.2 * out + 0.03 * torch.randn(n, size, size, generator=g)
    return out.clamp(0, 1)


def inject_defect(img: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (defective image, bool mask) for one [H, W] image."""
    size = img.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    cy, cx = (size * (0.2 + 0.6 * torch.rand(2, generator=g))).tolist()
    kind = int(torch.randint(3, (1,), generator=g))
    out = img.clone()
    if kind == 0:  # blob
        r = max(1.0, size * (0.08 + 0.08 * float(torch.rand(1, generator=g))))  # >= 1 px: never empty
        d2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / r**2
        mask = d2 <= 1.0
        value = 1.0 if float(torch.rand(1, generator=g)) < 0.5 else 0.0
        out[mask] = value
    elif kind == 1:  # scratch: a thick line segment through (cy, cx)
        theta = math.pi * float(torch.rand(1, generator=g))
        dist = ((xx - cx) * math.sin(theta) - (yy - cy) * math.cos(theta)).abs()
        along = ((xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)).abs()
        mask = (dist <= max(1.0, size / 32)) & (along <= size * 0.3)
        out[mask] = 0.95
    else:  # patch of texture at the wrong orientation
        half = max(2, int(size * 0.15))
        y0, x0 = int(cy) - half, int(cx) - half
        mask = torch.zeros(size, size, dtype=torch.bool)
        mask[max(0, y0) : y0 + 2 * half, max(0, x0) : x0 + 2 * half] = True
        other = gratings(1, size, g, orientation=ORIENTATION + math.pi / 4)[0]
        out[mask] = other[mask]
    return out, mask


def make_split(n_normal: int, n_anomalous: int, size: int, channels: int, g: torch.Generator) -> Split:
    imgs = gratings(n_normal + n_anomalous, size, g)
    masks = torch.zeros(len(imgs), size, size, dtype=torch.bool)
    for i in range(n_normal, len(imgs)):
        imgs[i], masks[i] = inject_defect(imgs[i], g)
    images = (imgs * 255).round().to(torch.uint8).unsqueeze(1).repeat(1, channels, 1, 1)
    labels = torch.cat([torch.zeros(n_normal), torch.ones(n_anomalous)]).long()
    return Split(images, labels, masks.unsqueeze(1))


@DATASETS.register("synthetic")
class Synthetic:
    @staticmethod
    def check(cfg) -> None:
        if not isinstance(cfg.image_size, int) or cfg.image_size < 4:
            raise ConfigError("dataset.image_size", f"must be an integer >= 4; got {cfg.image_size}")
        if cfg.channels not in (1, 3):
            raise ConfigError("dataset.channels", f"must be 1 or 3; got {cfg.channels}")
        for key, low in (("n_train", 1), ("n_val", 2), ("n_test", 2)):
            v = cfg[key]
            if not isinstance(v, int) or v < low:
                raise ConfigError(f"dataset.{key}", f"must be an integer >= {low}; got {v}")
        if cfg.get("val_anomalies", "defects") not in ("defects", "pseudo"):
            raise ConfigError("dataset.val_anomalies", f"must be defects (the generated ones) or pseudo (CutPaste-family images of held-out normals); got {cfg.val_anomalies!r}")
        v = cfg.get("limit_train")
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ConfigError("dataset.limit_train", f"must be null or an integer >= 1; got {v}")

    @staticmethod
    def shape(cfg) -> tuple[int, int, int]:
        return (cfg.channels, cfg.image_size, cfg.image_size)

    @staticmethod
    def load(cfg) -> OneClassData:
        n_train = cfg.n_train if cfg.get("limit_train") is None else min(cfg.n_train, cfg.limit_train)
        size, ch, seed = cfg.image_size, cfg.channels, cfg.split_seed
        train = train_images(n_train, size, ch, seed)
        val = make_split(cfg.n_val - cfg.n_val // 2, cfg.n_val // 2, size, ch, split_generator(seed, "val"))
        test = make_split(cfg.n_test - cfg.n_test // 2, cfg.n_test // 2, size, ch, split_generator(seed, "test"))
        return OneClassData(train=Split(train, torch.zeros(n_train, dtype=torch.long)), val=val, test=test, info={"generator": "gratings+defects"})


def train_images(n: int, size: int, channels: int, split_seed: int) -> torch.Tensor:
    """The first n normal training images: whole chunks of TRAIN_CHUNK, each from its own generator,
    cut to n (so any n gives a prefix of the same sequence)."""
    chunks = []
    for i in range(math.ceil(n / TRAIN_CHUNK)):
        k = min(TRAIN_CHUNK, n - i * TRAIN_CHUNK)
        # each chunk is drawn whole and then cut, so the last chunk's images do not depend on n
        chunk = make_split(TRAIN_CHUNK, 0, size, channels, split_generator(split_seed, f"train:{i}")).images
        chunks.append(chunk[:k])
    return torch.cat(chunks)
