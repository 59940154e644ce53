"""MVTec AD and any set in its layout (one folder per category):

    root/<category>/train/good/*.png                  normal training images
    root/<category>/test/good/*.png                   test normals
    root/<category>/test/<defect>/*.png               test anomalies, one folder per defect type
    root/<category>/ground_truth/<defect>/<name>_mask.png   pixel mask of test/<defect>/<name>.png

One run is one category (dataset.category); `all` is refused with the sweep command that runs
each category as its own job, so every category keeps its own model, threshold and metrics.
Good images get all-zero masks. Every defect image needs its mask and every mask its image
(a DataError names the file otherwise); masks may use any of dataset.extensions and are read as
"pixel > 127 is defect". ground_truth/good, if a set has it, is ignored (good means no defect).

The split (fixed by dataset.split_seed):
- train: train/good minus a held-out dataset.val_fraction (at least one image);
- val: the held-out normals, plus, with val_anomalies=test, round(val_anomaly_fraction * n) of
  each test folder's n images (each defect type, and test/good too, so the test keeps its
  normal:anomalous ratio; at least one per folder and never its last one). These images are
  moved out of the test split: no image is scored in both val and test. With
  val_anomalies=pseudo val holds only the held-out normals here and the run adds CutPaste-family
  pseudo-anomalies of them (freqexp.data.pseudo); the test then stays complete, which is the
  split to use when comparing with published MVTec numbers;
- test: test/good and test/<defect> images not moved to val, with masks.

info["files"] lists each split's source files (row i of a split is file i), info["test_defects"]
the defect type of each test row.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from freqexp.data.base import DATASETS, OneClassData, Split
from freqexp.data.cache import check_cache_options
from freqexp.data.images import (
    Geometry, channels_option, choice_option, decode, extensions_option, folder_option, fraction_option, held_out,
    limit_option, list_images, native_size, permuted, resolve_channels, seed_option,
)
from freqexp.errors import ConfigError, DataError

GOOD = "good"
MASK_SUFFIX = "_mask"
VAL_ANOMALIES = ("test", "pseudo")
ROOT_WHAT = "the MVTec AD folder holding one folder per category (bottle/, cable/, ...)"


# -- the folders ------------------------------------------------------------------------------

def root_of(cfg) -> Path:
    return folder_option(cfg, "root", ROOT_WHAT)


def list_categories(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and (d / "train").is_dir())


def category_of(cfg) -> str:
    """The configured category, checked against the folders under root."""
    from omegaconf import OmegaConf

    root = root_of(cfg)
    found = list_categories(root)
    if not found:
        hint = "; it looks like one category itself: set dataset.root to its parent folder" if (root / "train").is_dir() else ""
        raise ConfigError("dataset.root", f"{root} has no category folders (<category>/train/good, <category>/test/...){hint}")
    missing = OmegaConf.is_missing(cfg, "category")
    category = None if missing else cfg.get("category")
    if category == "all":
        command = ["python", "-m", "freqexp", "--multirun", "dataset=mvtec", f"dataset.root={root}", f"dataset.category={','.join(found)}"]
        raise ConfigError("dataset.category", f"one run reads one category; run each as its own job with "
                          f"`{shlex.join(command)}` (plus your other overrides)")
    if category not in found:
        raise ConfigError("dataset.category", f"must be one of the categories in {root}: {', '.join(found)} "
                          f"(or all, for the sweep over them); {'it is not set' if missing else f'got {category!r}'}")
    return category


@dataclass
class CategoryFiles:
    train_good: list[Path]
    test: dict[str, list[Path]]  # folder under test/ (good and each defect type) -> its images
    masks: dict[Path, Path]  # each defect image -> its mask


def mask_files(folder: Path, extensions) -> dict[str, Path]:
    """ground_truth/<defect>: image name -> mask file (name = mask stem without _mask)."""
    out: dict[str, Path] = {}
    for mask in list_images(folder, extensions, "masks"):
        stem = mask.stem[: -len(MASK_SUFFIX)] if mask.stem.endswith(MASK_SUFFIX) else mask.stem
        if stem in out:
            raise DataError(f"{mask}: a second mask for image {stem!r} (the other is {out[stem].name})")
        out[stem] = mask
    return out


def scan_category(root: Path, category: str, extensions) -> CategoryFiles:
    base = root / category
    train_good = list_images(base / "train" / GOOD, extensions, "normal training images")
    test_dir = base / "test"
    if not test_dir.is_dir():
        raise DataError(f"{test_dir}: folder not found (mvtec needs <category>/test/good and test/<defect>/)")
    kinds = sorted(d.name for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if GOOD not in kinds:
        raise DataError(f"{test_dir / GOOD}: folder not found (the test normals)")
    if kinds == [GOOD]:
        raise DataError(f"{test_dir}: has only good/; it needs at least one defect folder (test/<defect>/)")
    test = {kind: list_images(test_dir / kind, extensions, "test images") for kind in kinds}
    masks: dict[Path, Path] = {}
    truth = base / "ground_truth"
    for kind in kinds:
        if kind == GOOD:
            continue
        found = mask_files(truth / kind, extensions) if (truth / kind).is_dir() else {}
        for image in test[kind]:
            if image.stem not in found:
                raise DataError(f"{image}: defect image with no mask (expected {truth / kind / (image.stem + MASK_SUFFIX)}.png)")
            masks[image] = found.pop(image.stem)
        if found:
            name, mask = next(iter(sorted(found.items())))
            raise DataError(f"{mask}: mask with no image (expected {test_dir / kind / name}.png)")
    if truth.is_dir():
        for folder in sorted(d for d in truth.iterdir() if d.is_dir() and d.name not in test and d.name != GOOD):
            orphans = [m for m in sorted(folder.iterdir()) if m.suffix.lower() in extensions]
            if orphans:
                raise DataError(f"{orphans[0]}: mask with no image (there is no {test_dir / folder.name} folder)")
    return CategoryFiles(train_good, test, masks)


# -- the split --------------------------------------------------------------------------------

TRAIN_GOOD = "train/good"
Entry = tuple[Path, int, str]  # (file, label, its folder: train/good, or good / a defect type under test/)


@dataclass
class CategorySplit:
    train: list[Entry]
    val: list[Entry]
    test: list[Entry]


def split_category(files: CategoryFiles, cfg) -> CategorySplit:
    g = torch.Generator().manual_seed(seed_option(cfg))
    normals = permuted(files.train_good, g)
    n_val = held_out(len(normals), cfg.val_fraction)
    if len(normals) - n_val < 1:
        raise DataError(f"{normals[0].parent}: {len(normals)} image(s) leave none for training after holding out "
                        f"dataset.val_fraction={cfg.val_fraction}; add images or lower it")
    val_normal, train = sorted(normals[:n_val]), sorted(normals[n_val:])
    if cfg.get("limit_train") is not None:
        train = train[: int(cfg.limit_train)]
    val: list[Entry] = [(p, 0, TRAIN_GOOD) for p in val_normal]
    test: list[Entry] = []
    for kind, images in files.test.items():  # sorted by folder name: the same draws every time
        label = 0 if kind == GOOD else 1
        moved: set[Path] = set()
        if cfg.val_anomalies == "test" and len(images) >= 2:  # a folder of one stays in the test
            moved = set(permuted(images, g)[: min(len(images) - 1, held_out(len(images), cfg.val_anomaly_fraction))])
        val += [(p, label, kind) for p in images if p in moved]
        test += [(p, label, kind) for p in images if p not in moved]
    return CategorySplit([(p, 0, TRAIN_GOOD) for p in train], val, test)


def counts(entries: list[Entry]) -> dict[str, int]:
    """Images per source folder: train/good, and good or a defect type for test folders."""
    out: dict[str, int] = {}
    for _, _, kind in entries:
        out[kind] = out.get(kind, 0) + 1
    return out


# -- the dataset ------------------------------------------------------------------------------

def check_options(cfg) -> None:
    root_of(cfg)
    extensions_option(cfg)
    Geometry.from_cfg(cfg)
    channels_option(cfg)
    fraction_option(cfg, "val_fraction")
    choice_option(cfg, "val_anomalies", VAL_ANOMALIES,
                  " (test: a share of each test folder moves to val; pseudo: CutPaste-family images of held-out normals)")
    fraction_option(cfg, "val_anomaly_fraction")
    limit_option(cfg)
    seed_option(cfg)
    check_cache_options(cfg)


def all_files(files: CategoryFiles) -> list[Path]:
    return files.train_good + [p for images in files.test.values() for p in images]


@DATASETS.register("mvtec")
class MVTec:
    @staticmethod
    def check(cfg) -> None:
        check_options(cfg)
        category_of(cfg)

    @staticmethod
    def shape(cfg) -> tuple[int, int, int]:
        root, category = root_of(cfg), category_of(cfg)
        files = scan_category(root, category, extensions_option(cfg))
        channels = resolve_channels(channels_option(cfg), all_files(files))
        return (channels, *Geometry.from_cfg(cfg).output_size(native_size(files.train_good[0])))

    @staticmethod
    def load(cfg) -> OneClassData:
        check_options(cfg)
        root, category = root_of(cfg), category_of(cfg)
        files = scan_category(root, category, extensions_option(cfg))
        split = split_category(files, cfg)
        channels = resolve_channels(channels_option(cfg), all_files(files))
        geometry = Geometry.from_cfg(cfg)
        reference = files.train_good[0]  # without image_size, every image must have its size

        def build(entries: list[Entry], with_masks: bool) -> Split:
            paths = [p for p, _, _ in entries]
            masks: Optional[list] = [files.masks.get(p) for p in paths] if with_masks else None
            images, mask_tensor = decode(paths, channels, geometry, masks, reference=reference)
            return Split(images, torch.tensor([y for _, y, _ in entries], dtype=torch.long), mask_tensor)

        with_val_masks = cfg.val_anomalies == "test"  # pseudo: the run makes val anomalies and their masks
        out = {"train": build(split.train, False), "val": build(split.val, with_val_masks), "test": build(split.test, True)}
        info = {
            "root": str(root), "category": category, "normal_classes": [f"{category} ({GOOD})"],
            "channels": channels, "val_anomalies": cfg.val_anomalies,
            "counts": {name: counts(getattr(split, name)) for name in ("train", "val", "test")},
            "files": {name: [str(p) for p, _, _ in getattr(split, name)] for name in ("train", "val", "test")},
            "test_defects": [kind for _, _, kind in split.test],
        }
        return OneClassData(out["train"], out["val"], out["test"], info)
