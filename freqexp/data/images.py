"""Users' image folders (dataset=mvtec, dataset=folder) read into uint8 tensors, with the option
checks both datasets share.

Files: the files of one folder (not its subfolders) whose extension is one of
dataset.extensions, compared case-insensitively; hidden files (.name, e.g. macOS ._x.png) are
skipped. Sorted by name, so every run and every machine sees the same order and split.

Pixels: Pillow decodes PNG, JPEG, BMP and TIFF. Each image becomes L (1 channel) or RGB (3):
palette, gray+alpha, RGBA, CMYK and YCbCr images are converted by Pillow (alpha is dropped,
colour to gray is Pillow's ITU-R 601 luma). 16-bit samples (I;16 PNG/TIFF, or PNG opened as
32-bit I by older Pillow) are scaled to 8 bit as round(v * 255 / 65535), so the full 16-bit
range maps onto the full 8-bit range; 16-bit RGB PNGs arrive from Pillow already as 8-bit RGB.
Float and wider integer images are refused with a pointer to dataset=tiff_domains, which keeps
their exact values.

channels=auto is 3 when any image of the dataset is in colour, else 1. It is decided from
file headers alone (stopping at the first colour image), so shape() stays cheap. A palette
image whose palette is all gray counts as gray.

Geometry, done the same way to an image and its mask:
1. resize to dataset.image_size, when set. Images: Pillow's bilinear filter, whose support
   widens with the reduction factor, so shrinking averages over the covered pixels (area-like)
   instead of aliasing. Masks: nearest neighbour, so they stay binary. Both sample at pixel
   centres, so a mask stays on its defect. The trade-off of nearest: a defect thinner than the
   reduction factor can fall between samples and vanish from the mask (the image then shows it
   only faintly too). keep_aspect=true scales each image by one factor so that it covers
   image_size and crops the overflow centrally, instead of stretching it (stretching changes
   the horizontal and vertical frequencies of an image by different factors).
2. center_crop, when set: the central crop (offsets rounded down), the same for both.
Without image_size every image must have the size of the first one; a DataError names two files
that differ and suggests dataset.image_size.

Decoding runs in a small thread pool: Pillow releases the GIL while it decodes and resizes.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from freqexp.checks import is_int, is_number
from freqexp.errors import ConfigError, DataError, one_line

DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
MASK_THRESHOLD = 127  # mask pixels above it are defect: 0/255 masks, and anti-aliased or JPEG edges
DECODE_THREADS = max(1, min(8, os.cpu_count() or 1))


# -- options ----------------------------------------------------------------------------------

def size_option(cfg, key: str, minimum: int = 4) -> Optional[tuple[int, int]]:
    """null, an integer (square) or [H, W] -> None or (H, W)."""
    from omegaconf import ListConfig

    v = cfg.get(key)
    if v is None:
        return None
    pair = list(v) if isinstance(v, (list, tuple, ListConfig)) else [v, v]
    if len(pair) != 2 or not all(is_int(d) and d >= minimum for d in pair):
        raise ConfigError(f"dataset.{key}", f"must be null, an integer >= {minimum} or [H, W] of them; got {v}")
    return (pair[0], pair[1])


def channels_option(cfg):
    v = cfg.get("channels", "auto")
    if v not in ("auto", 1, 3) or isinstance(v, bool):
        raise ConfigError("dataset.channels", f"must be auto (3 if any image is in colour, else 1), 1 or 3; got {v!r}")
    return v


def extensions_option(cfg) -> tuple[str, ...]:
    from omegaconf import ListConfig

    v = cfg.get("extensions")
    if v is None:
        return DEFAULT_EXTENSIONS
    items = list(v) if isinstance(v, (list, tuple, ListConfig)) else None
    if not items or not all(isinstance(e, str) and e.strip(". ") for e in items):
        raise ConfigError("dataset.extensions", f"must be a non-empty list of file extensions such as [png, jpg]; got {v}")
    return tuple(dict.fromkeys("." + e.strip().lstrip(".").lower() for e in items))


def fraction_option(cfg, key: str, low_open: bool = True) -> float:
    """A share in (0, 1) (or [0, 1) with low_open=False)."""
    v = cfg.get(key)
    ok = is_number(v) and (0 < v if low_open else 0 <= v) and v < 1
    if not ok:
        raise ConfigError(f"dataset.{key}", f"must be a number in {'(' if low_open else '['}0, 1); got {v!r}")
    return float(v)


def bool_option(cfg, key: str) -> bool:
    v = cfg.get(key, False)
    if not isinstance(v, bool):
        raise ConfigError(f"dataset.{key}", f"must be true or false; got {v!r}")
    return v


def choice_option(cfg, key: str, allowed: Sequence[str], what: str = "") -> str:
    v = cfg.get(key)
    if v not in allowed:
        raise ConfigError(f"dataset.{key}", f"must be {' | '.join(allowed)}{what}; got {v!r}")
    return v


def limit_option(cfg) -> Optional[int]:
    v = cfg.get("limit_train")
    if v is not None and not (is_int(v) and v >= 1):
        raise ConfigError("dataset.limit_train", f"must be null or an integer >= 1; got {v!r}")
    return v


def seed_option(cfg) -> int:
    v = cfg.get("split_seed")
    if not is_int(v):
        raise ConfigError("dataset.split_seed", f"must be an integer; got {v!r}")
    return v


def folder_option(cfg, key: str, what: str, required: bool = True) -> Optional[Path]:
    """A folder config key: required ones may not be ??? or null; given ones must exist."""
    from omegaconf import OmegaConf

    missing = OmegaConf.is_missing(cfg, key)
    v = None if missing else cfg.get(key)
    if v in (None, ""):
        if not required:
            return None
        raise ConfigError(f"dataset.{key}", f"must be {what} (dataset.{key}=DIR); {'it is not set' if missing else f'got {v!r}'}")
    path = Path(os.path.expanduser(str(v)))
    if not path.is_dir():
        raise ConfigError(f"dataset.{key}", f"{path} is not a folder; it must be {what}")
    return path


@dataclass(frozen=True)
class Geometry:
    """How a native image becomes the dataset's size: resize (image_size, keep_aspect), then
    center_crop. size/crop None: that step is skipped."""

    size: Optional[tuple[int, int]]
    crop: Optional[tuple[int, int]]
    keep_aspect: bool = False

    @classmethod
    def from_cfg(cls, cfg) -> "Geometry":
        geometry = cls(size_option(cfg, "image_size"), size_option(cfg, "center_crop", minimum=1),
                       bool_option(cfg, "keep_aspect"))
        if geometry.size is not None:
            geometry.output_size(geometry.size)  # a crop larger than image_size fails now
        return geometry

    def output_size(self, native: tuple[int, int]) -> tuple[int, int]:
        resized = self.size or native
        if self.crop is None:
            return resized
        if self.crop[0] > resized[0] or self.crop[1] > resized[1]:
            where = "dataset.image_size" if self.size else f"the images' own size (dataset.image_size=null)"
            raise ConfigError("dataset.center_crop", f"{self.crop[0]}x{self.crop[1]} is larger than the "
                              f"{resized[0]}x{resized[1]} of {where}")
        return self.crop

    def apply(self, image, resample):
        """A PIL image in the dataset's geometry; `resample` is Pillow's filter for the resize."""
        if self.size is not None:
            h, w = self.size
            if self.keep_aspect:
                scale = max(h / image.height, w / image.width)
                covering = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
                if covering != image.size:
                    image = image.resize(covering, resample)
                image = central(image, (h, w))
            elif (image.height, image.width) != (h, w):
                image = image.resize((w, h), resample)
        if self.crop is not None:
            image = central(image, self.crop)
        return image


def central(image, size: tuple[int, int]):
    h, w = size
    top, left = (image.height - h) // 2, (image.width - w) // 2
    return image.crop((left, top, left + w, top + h))


def size_hint(h: int, w: int) -> str:
    return f"dataset.image_size={h}" if h == w else f"'dataset.image_size=[{h},{w}]'"


# -- files ------------------------------------------------------------------------------------

def list_images(folder: Path, extensions: Sequence[str], role: str = "") -> list[Path]:
    """The image files directly in `folder`, sorted by name. DataError when the folder is
    missing or holds none (naming the extensions looked for, and subfolders if there are any)."""
    role = f" ({role})" if role else ""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found{role}")
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    files = [p for p in entries if p.suffix.lower() in extensions and not p.name.startswith(".") and p.is_file()]
    if not files:
        subfolders = [p.name for p in entries if p.is_dir() and not p.name.startswith(".")]
        hint = f"; it has subfolders ({', '.join(subfolders[:5])}): images are read from the folder itself, not below it" if subfolders else ""
        raise DataError(f"{folder}: no images with extensions {', '.join(extensions)} (dataset.extensions){role}{hint}")
    return files


def open_image(path: Path):
    from PIL import Image

    try:
        return Image.open(path)
    except Exception as e:
        raise DataError(f"{path}: cannot be read as an image ({one_line(e)})") from None


def native_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file's header."""
    with open_image(path) as im:
        return (im.height, im.width)


def is_colour(image) -> bool:
    if image.mode in GRAY_MODES:
        return False
    if image.mode in ("P", "PA"):
        palette = image.getpalette() or []
        return any(not (r == g == b) for r, g, b in zip(palette[0::3], palette[1::3], palette[2::3]))
    return True


def resolve_channels(channels, files: Sequence[Path]) -> int:
    """1 or 3; auto reads headers until it meets a colour image."""
    if channels != "auto":
        return int(channels)
    for path in files:
        with open_image(path) as im:
            if is_colour(im):
                return 3
    return 1


def eight_bit(image, path: Path):
    """The decoded image as 8-bit L or RGB-convertible PIL image."""
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES:
        x = np.asarray(image).astype(np.int64)
        if x.size and (x.min() < 0 or x.max() > 65535):
            raise DataError(f"{path}: has {image.mode} samples outside 0-65535; read wider integer images with dataset=tiff_domains")
        return Image.fromarray(((x * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    if image.mode == "F":
        raise DataError(f"{path}: holds float samples; read float images with dataset=tiff_domains (exact values)")
    return image


def read_image(path: Path, channels: int):
    """The file as an 8-bit PIL image in mode L (channels=1) or RGB (3)."""
    with open_image(path) as im:
        try:
            im.load()  # truncated or corrupt data fails here, not at open()
        except Exception as e:
            raise DataError(f"{path}: cannot be decoded, the file is truncated or corrupt ({one_line(e)})") from None
        image = eight_bit(im, path)
        mode = "L" if channels == 1 else "RGB"
        return image if image.mode == mode else image.convert(mode)


def read_mask(path: Path, threshold: int = MASK_THRESHOLD):
    """The mask as a PIL image in mode L with values 0 or 255 (255: defect).

    threshold > 0 (MVTec AD, MPDD, BTAD: 0/255 masks): the mask is read like a gray image (8 bit)
    and a pixel above `threshold` is defect, so anti-aliased or JPEG edges split at mid-gray.
    threshold 0 (VisA: masks of small class ids 1, 2, ... on 0): any nonzero value is defect,
    read from the stored samples themselves: 16-bit ids are not scaled to 8 bit (id 1 would
    round to 0), a palette image counts by its colours, an alpha channel is left out."""
    if threshold > 0:
        image = read_image(path, 1)
        return image.point(lambda v: 255 if v > threshold else 0)
    from PIL import Image

    with open_image(path) as im:
        try:
            im.load()
        except Exception as e:
            raise DataError(f"{path}: cannot be decoded, the file is truncated or corrupt ({one_line(e)})") from None
        if im.mode in ("P", "PA", "RGBA", "RGBa"):
            im = im.convert("RGB")
        elif im.mode in ("LA", "La", "1"):
            im = im.convert("L")
        x = np.asarray(im)
    defect = (x != 0).any(axis=-1) if x.ndim == 3 else x != 0
    return Image.fromarray(defect.astype(np.uint8) * 255, mode="L")


# -- decoding many files ----------------------------------------------------------------------

def decode(paths: Sequence[Path], channels: int, geometry: Geometry,
           masks: Optional[Sequence[Optional[Path]]] = None,
           reference: Optional[Path] = None,
           mask_threshold: int = MASK_THRESHOLD) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """uint8 images [N, C, H, W] and, when `masks` is given (one entry per image, None for an
    all-zero mask), bool masks [N, 1, H, W]. `reference` is the file whose native size every
    image must share when image_size is null (default: the first of `paths`). `mask_threshold`:
    how mask files are read (read_mask: above it is defect; 0: any nonzero value)."""
    from PIL import Image

    reference = reference or (paths[0] if paths else None)
    native = native_size(reference) if reference is not None else (1, 1)
    h, w = geometry.output_size(native)
    images = np.zeros((len(paths), channels, h, w), dtype=np.uint8)
    mask_array = np.zeros((len(paths), 1, h, w), dtype=bool) if masks is not None else None

    def one(i: int) -> None:
        path = paths[i]
        image = read_image(path, channels)
        size = (image.height, image.width)
        if geometry.size is None and size != native:
            raise DataError(f"images differ in size: {reference} is {native[0]}x{native[1]}, {path} is {size[0]}x{size[1]}; "
                            f"set dataset.image_size to resize them to one size (e.g. {size_hint(*native)})")
        pixels = np.asarray(geometry.apply(image, Image.Resampling.BILINEAR))
        images[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
        if mask_array is not None and masks[i] is not None:
            mask = read_mask(masks[i], mask_threshold)
            if (mask.height, mask.width) != size:
                raise DataError(f"{masks[i]}: the mask is {mask.height}x{mask.width} but its image {path} is {size[0]}x{size[1]}")
            mask_array[i, 0] = np.asarray(geometry.apply(mask, Image.Resampling.NEAREST)) > MASK_THRESHOLD

    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        for _ in pool.map(one, range(len(paths))):  # re-raises the first failing file, in file order
            pass
    return torch.from_numpy(images), None if mask_array is None else torch.from_numpy(mask_array)


def permuted(items: list, g: torch.Generator) -> list:
    return [items[i] for i in torch.randperm(len(items), generator=g).tolist()]


def held_out(n: int, fraction: float) -> int:
    """How many of n items a share takes: round(n * fraction), at least 1 when fraction > 0."""
    return max(1, int(round(n * fraction))) if fraction > 0 else 0
