"""Folders of single-channel TIFF images, one folder per domain, as in the HDMAP gearbox study
(4 domains of min-max normalized 32-bit float TIFFs, 31x95 images):

    root/<domain>/train/good/*.tif(f)     normal training images
    root/<domain>/train/fault/*.tif(f)    optional: labelled faults for validation
    root/<domain>/test/good/*.tif(f)      test normals
    root/<domain>/test/fault/*.tif(f)     test faults

Reading keeps each file's own values: float32/float64/float16, uint8/uint16/uint32 and
int8/int16/int32 samples are read exactly (tifffile; compressed files that it has no codec
for, such as LZW without imagecodecs, are decoded by Pillow's libtiff), never clipped to a
display range. Normalization then maps them to [0, 1] in float64, the image is resized if asked
(bilinear, antialiased: weights are non-negative, so values stay in [0, 1]) and stored as
float32, so 16-bit and float sensor maps keep their precision (an 8-bit copy would not).

Normalization (dataset.normalize):
- minmax, minmax_scope=image: each image by its own min and max (what the study did; a constant
  image becomes all zeros). Idempotent, so already-normalized files come through unchanged.
- minmax, minmax_scope=dataset: one min and max per domain, taken from its train/good images
  only (no test statistics leak into training); other images are clipped to that range. This
  keeps absolute levels comparable across images, which per-image scaling erases.
- fixed: dataset.range=[lo, hi] maps to [0, 1]; values outside are clipped (a warning counts them).
- none: the files must already hold values in [0, 1]; any other file is a DataError naming it.

The split, per domain (domain=all runs it in every domain and concatenates, so a domain's split
is the same whether it is run alone or in `all`):
- train: train/good minus a held-out val_fraction (dataset.limit_train caps it, per domain);
- val: the held-out normals + round(n_val_normal * val_anomaly_ratio) faults, taken from
  train/fault when the domain has it, else moved out of test/fault (at most half of it, so the
  test keeps faults): an image is never scored in both val and test. val_anomalies=pseudo uses
  CutPaste-family images of the held-out normals instead (made by the run, as for other sets);
- test: test/good + the test/fault images not moved to val.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from freqexp.checks import choice
from freqexp.data.base import DATASETS, OneClassData, Split
from freqexp.data.cache import cache_dir_of, cached_array, check_cache_options, digest, resolve_mode, source_fingerprint
from freqexp.errors import ConfigError, DataError, one_line

log = logging.getLogger("freqexp")

EXTENSIONS = (".tif", ".tiff")
NORMALIZE = ("minmax", "none", "fixed")
MINMAX_SCOPES = ("image", "dataset")
VAL_ANOMALIES = ("faults", "pseudo")
SAMPLE_KINDS = "uif"  # numpy dtype kinds read: unsigned, signed integer, float
CACHE_FORMAT = 1  # bump when what a cache file holds changes


# -- reading one file -------------------------------------------------------------------------

def inspect_tiff(path: Path) -> tuple[tuple[int, int], np.dtype]:
    """(H, W) and sample dtype of a single-page, single-channel TIFF, from its header."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            n_pages = len(tif.pages)
            page = tif.pages[0]
            shape, dtype, samples = tuple(page.shape), np.dtype(page.dtype), page.samplesperpixel
    except Exception as e:
        raise DataError(f"{path}: cannot be read as a TIFF ({one_line(e)})") from None
    return check_layout(path, n_pages, shape, dtype, samples), dtype


def check_layout(path: Path, n_pages: int, shape: tuple, dtype: np.dtype, samples: int) -> tuple[int, int]:
    if n_pages != 1:
        raise DataError(f"{path}: has {n_pages} pages; tiff_domains reads single-page images (one image per file)")
    if samples != 1:
        raise DataError(f"{path}: has {samples} samples per pixel ({dtype}); tiff_domains reads single-channel images")
    if dtype.kind not in SAMPLE_KINDS:
        raise DataError(f"{path}: has {dtype} samples; tiff_domains reads real-valued integer or float images")
    plane = tuple(d for d in shape if d != 1) if len(shape) > 2 else shape
    if len(plane) != 2:
        raise DataError(f"{path}: holds an array of shape {shape}; tiff_domains reads 2-D images")
    return plane  # type: ignore[return-value]


def read_tiff(path: Path) -> np.ndarray:
    """The image's samples exactly as stored ([H, W], the file's own dtype)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            plane = check_layout(path, len(tif.pages), tuple(page.shape), np.dtype(page.dtype), page.samplesperpixel)
            try:
                array = page.asarray()
            except ValueError as e:
                if "imagecodecs" not in str(e):
                    raise
                array = read_with_pillow(path).astype(page.dtype)  # exact: Pillow widened, never rounded
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot be read as a TIFF ({one_line(e)})") from None
    return array.reshape(plane)


def read_with_pillow(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


# -- the folders ------------------------------------------------------------------------------

def list_domains(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and ((d / "train").is_dir() or (d / "test").is_dir()))


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (tiff_domains needs <domain>/train/good, test/good and test/fault)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"{folder}: holds no .tif/.tiff files")
    return files


@dataclass
class DomainFiles:
    name: str
    train_good: list[Path]
    train_fault: Optional[list[Path]]  # None: the domain has no train/fault folder
    test_good: list[Path]
    test_fault: list[Path]


def scan_domain(root: Path, name: str) -> DomainFiles:
    d = root / name
    train_fault = image_files(d / "train" / "fault") if (d / "train" / "fault").exists() else None
    return DomainFiles(name, image_files(d / "train" / "good"), train_fault,
                       image_files(d / "test" / "good"), image_files(d / "test" / "fault"))


def permuted(items: list, g: torch.Generator) -> list:
    return [items[i] for i in torch.randperm(len(items), generator=g).tolist()]


@dataclass
class DomainSplit:
    train: list[Path]
    val: list[tuple[Path, int]]
    test: list[tuple[Path, int]]


def split_domain(files: DomainFiles, cfg) -> DomainSplit:
    g = torch.Generator().manual_seed(int(cfg.split_seed))  # same seed per domain: `all` = each domain alone
    normals = permuted(files.train_good, g)
    n_val = int(round(len(normals) * cfg.val_fraction))
    val_normal, train = sorted(normals[:n_val]), sorted(normals[n_val:])
    if cfg.get("limit_train") is not None:
        train = train[: int(cfg.limit_train)]
    test_fault = files.test_fault
    val_fault: list[Path] = []
    if cfg.val_anomalies == "faults":
        wanted = int(round(n_val * cfg.val_anomaly_ratio))
        if files.train_fault is not None:
            val_fault = sorted(permuted(files.train_fault, g)[:wanted])
        else:  # moved out of the test split, never scored twice; the test keeps at least half
            moved = set(permuted(test_fault, g)[: min(wanted, len(test_fault) // 2)])
            val_fault = sorted(moved)
            test_fault = [p for p in test_fault if p not in moved]
    return DomainSplit(train, [(p, 0) for p in val_normal] + [(p, 1) for p in val_fault],
                       [(p, 0) for p in files.test_good] + [(p, 1) for p in test_fault])


# -- values -----------------------------------------------------------------------------------

class Normalizer:
    """Maps one image's samples (float64) to [0, 1] per dataset.normalize."""

    def __init__(self, cfg, train_good: dict[str, list[Path]]):
        self.method, self.scope = cfg.normalize, cfg.get("minmax_scope", "image")
        self.fixed = tuple(float(v) for v in cfg.range) if self.method == "fixed" else None
        self.train_good = train_good
        self._ranges: dict[str, tuple[float, float]] = {}
        self.clipped = 0

    def domain_range(self, domain: str) -> tuple[float, float]:
        """min and max over a domain's train/good images (read once, on first use)."""
        if domain not in self._ranges:
            low, high = np.inf, -np.inf
            for path in self.train_good[domain]:
                x = finite(read_tiff(path), path)
                low, high = min(low, float(x.min())), max(high, float(x.max()))
            self._ranges[domain] = (low, high)
        return self._ranges[domain]

    def __call__(self, x: np.ndarray, path: Path, domain: str) -> np.ndarray:
        x = finite(x, path).astype(np.float64)
        if self.method == "none":
            low, high = float(x.min()), float(x.max())
            if low < 0 or high > 1:
                raise DataError(f"{path}: values in [{low:g}, {high:g}] are outside [0, 1] (dataset.normalize=none); "
                                f"use dataset.normalize=minmax or fixed")
            return x
        if self.method == "minmax" and self.scope == "image":
            low, high = float(x.min()), float(x.max())
        else:
            low, high = self.fixed if self.method == "fixed" else self.domain_range(domain)
        if high <= low:  # a constant image (or range) carries no contrast
            return np.zeros_like(x)
        y = (x - low) / (high - low)
        outside = int(np.count_nonzero((y < 0) | (y > 1)))
        if outside:
            self.clipped += outside
            np.clip(y, 0.0, 1.0, out=y)
        return y


def finite(x: np.ndarray, path: Path) -> np.ndarray:
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{path}: contains NaN or infinite values")
    return x


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if x.shape == size:
        return x
    t = torch.from_numpy(np.ascontiguousarray(x))[None, None]
    t = torch.nn.functional.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
    return t[0, 0].clamp_(0.0, 1.0).numpy()


# -- config -----------------------------------------------------------------------------------

def root_of(cfg) -> Path:
    from omegaconf import OmegaConf

    root = None if OmegaConf.is_missing(cfg, "root") else cfg.root
    if root in (None, "") or not os.path.isdir(os.path.expanduser(str(root))):
        raise ConfigError("dataset.root", f"must be the folder holding one folder per domain (<domain>/train/good, ...); got {root!r}")
    return Path(os.path.expanduser(str(root)))


def selected_domains(cfg) -> list[str]:
    from omegaconf import OmegaConf

    root = root_of(cfg)
    found = list_domains(root)
    if not found:
        hint = "; it looks like one domain itself: set dataset.root to its parent folder" if (root / "train").is_dir() else ""
        raise ConfigError("dataset.root", f"{root} has no domain folders (<domain>/train/good, <domain>/test/...){hint}")
    domain = None if OmegaConf.is_missing(cfg, "domain") else cfg.domain
    if domain == "all":
        return found
    if domain not in found:
        raise ConfigError("dataset.domain", f"must be one of the domains in {root}: {', '.join(found)}, or all; got {domain!r}")
    return [domain]


def image_size(cfg) -> Optional[tuple[int, int]]:
    from omegaconf import ListConfig

    v = cfg.image_size
    if v is None:
        return None
    pair = list(v) if isinstance(v, (list, tuple, ListConfig)) else [v, v]
    if len(pair) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 4 for d in pair):
        raise ConfigError("dataset.image_size", f"must be null (native size), an integer >= 4 or [H, W] of them; got {v}")
    return (pair[0], pair[1])


def check_options(cfg) -> None:
    image_size(cfg)
    choice("dataset.normalize", cfg.normalize, NORMALIZE, sep=" | ")
    choice("dataset.minmax_scope", cfg.get("minmax_scope", "image"), MINMAX_SCOPES, sep=" | ")
    if cfg.normalize == "fixed":
        r = cfg.get("range")
        ok = r is not None and len(r) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r)
        if not ok or not float(r[0]) < float(r[1]):
            raise ConfigError("dataset.range", f"must be [lo, hi] with lo < hi for normalize=fixed; got {r}")
    vf = cfg.val_fraction
    if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 < vf < 1:
        raise ConfigError("dataset.val_fraction", f"must be a number in (0, 1); got {vf!r}")
    ar = cfg.val_anomaly_ratio
    if isinstance(ar, bool) or not isinstance(ar, (int, float)) or not ar > 0:
        raise ConfigError("dataset.val_anomaly_ratio", f"must be a number > 0; got {ar!r}")
    choice("dataset.val_anomalies", cfg.val_anomalies, VAL_ANOMALIES, sep=" | ")
    v = cfg.get("limit_train")
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        raise ConfigError("dataset.limit_train", f"must be null or an integer >= 1; got {v}")
    if isinstance(cfg.split_seed, bool) or not isinstance(cfg.split_seed, int):
        raise ConfigError("dataset.split_seed", f"must be an integer; got {cfg.split_seed!r}")
    check_cache_options(cfg)


# -- the dataset ------------------------------------------------------------------------------

Entry = tuple[Path, int, str]  # (file, label, domain)


class Decoder:
    """Writes normalized, resized float32 images into an array (in RAM or a cache memmap)."""

    def __init__(self, cfg, domains: list[DomainFiles]):
        self.reference = domains[0].train_good[0]
        self.native = image_size(cfg) is None
        self.size = image_size(cfg) or inspect_tiff(self.reference)[0]
        self.normalizer = Normalizer(cfg, {d.name: d.train_good for d in domains})

    def fill(self, entries: list[Entry]) -> Callable[[np.ndarray], None]:
        def fill(out: np.ndarray) -> None:
            for i, (path, _, domain) in enumerate(entries):
                x = read_tiff(path)
                if self.native and x.shape != self.size:
                    h, w = self.size
                    raise DataError(f"images differ in size: {self.reference} is {h}x{w}, {path} is {x.shape[0]}x{x.shape[1]}; "
                                    f"set dataset.image_size to resize them to one size")
                out[i, 0] = resize(self.normalizer(x, path, domain), self.size)
                if (i + 1) % 5000 == 0:
                    log.info("tiff_domains: decoded %d of %d images", i + 1, len(entries))
        return fill

    def cache_identity(self, cfg, domains: list[DomainFiles]) -> tuple[dict, Optional[list]]:
        """(how images are made, the files a dataset-wide range comes from)."""
        made = {"format": CACHE_FORMAT, "size": self.size, "normalize": cfg.normalize,
                "scope": cfg.get("minmax_scope", "image"), "range": list(self.normalizer.fixed or ())}
        range_from = None
        if cfg.normalize == "minmax" and made["scope"] == "dataset":
            range_from = source_fingerprint([p for d in domains for p in d.train_good])
        return made, range_from


@DATASETS.register("tiff_domains")
class TiffDomains:
    @staticmethod
    def check(cfg) -> None:
        check_options(cfg)
        selected_domains(cfg)

    @staticmethod
    def shape(cfg) -> tuple[int, int, int]:
        size = image_size(cfg)
        if size is None:  # the native size, from the first training image's header
            first = image_files(root_of(cfg) / selected_domains(cfg)[0] / "train" / "good")[0]
            size = inspect_tiff(first)[0]
        return (1, *size)

    @staticmethod
    def load(cfg) -> OneClassData:
        root = root_of(cfg)
        domains = [scan_domain(root, d) for d in selected_domains(cfg)]
        per_domain = {d.name: split_domain(d, cfg) for d in domains}
        items: dict[str, list[Entry]] = {
            "train": [(p, 0, d) for d, s in per_domain.items() for p in s.train],
            "val": [(p, y, d) for d, s in per_domain.items() for p, y in s.val],
            "test": [(p, y, d) for d, s in per_domain.items() for p, y in s.test],
        }
        decoder = Decoder(cfg, domains)
        n_bytes = sum(len(v) for v in items.values()) * decoder.size[0] * decoder.size[1] * 4
        mode = resolve_mode(cfg.get("cache", "auto"), n_bytes, "cpu")  # can RAM hold the decoded set?
        made, range_from = decoder.cache_identity(cfg, domains)
        out = {}
        for name, entries in items.items():
            labels = torch.tensor([y for _, y, _ in entries], dtype=torch.long)
            shape = (len(entries), 1, *decoder.size)
            clipped_before = decoder.normalizer.clipped
            if mode == "memmap":
                # file name: which images, made how; key: the state of their sources (a new state replaces the file)
                paths = [p for p, _, _ in entries]
                stem = f"tiff-{digest([made, [str(p.resolve()) for p in paths]])[:12]}-{name}"
                key = digest([source_fingerprint(paths), range_from])
                images, path = cached_array(cache_dir_of(cfg), stem, key, shape, np.float32, decoder.fill(entries))
                out[name] = Split(images, labels, cache_file=str(path))
            else:
                array = np.empty(shape, dtype=np.float32)
                decoder.fill(entries)(array)
                out[name] = Split(torch.from_numpy(array), labels)
            if decoder.normalizer.clipped > clipped_before:
                log.warning("tiff_domains: %d pixels of the %s split were outside the normalization range and were clipped to [0, 1]",
                            decoder.normalizer.clipped - clipped_before, name)
        info = {"root": str(root), "domains": [d.name for d in domains], "normalize": cfg.normalize, "cache": mode,
                "files": {name: [str(p) for p, _, _ in entries] for name, entries in items.items()}}  # row i's source
        return OneClassData(out["train"], out["val"], out["test"], info)
