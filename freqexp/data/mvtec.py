"""MVTec AD and any set in its layout (one folder per category):

    root/<category>/train/good/*.png                  normal training images
    root/<category>/test/good/*.png                   test normals
    root/<category>/test/<defect>/*.png               test anomalies, one folder per defect type
    root/<category>/ground_truth/<defect>/<name>_mask.png   pixel mask of test/<defect>/<name>.png

One run is one category (dataset.category); `all` is refused with the sweep command that runs
each category as its own job, so every category keeps its own model, threshold and metrics.
(Under the zero-shot protocol, dataset.train_from, every category is pooled into one test:
freqexp.data.categories.)
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

This module holds the folder layout's scanning and the one-category split, shared by MPDD (the
same layout, freqexp.data.mpdd) and BTAD (ok/ko instead of good/<defect>, masks without the
_mask suffix, freqexp.data.btad). The datasets themselves (mvtec, mpdd, btad, visa: one-category
runs and the zero-shot protocol) are registered in freqexp.data.categories.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from freqexp.data.cache import check_cache_options
from freqexp.data.images import (
    MASK_THRESHOLD as GRAY_MASK_THRESHOLD, Geometry, channels_option, choice_option, extensions_option, fraction_option,
    held_out, limit_option, list_images, permuted, seed_option,
)
from freqexp.errors import DataError

GOOD = "good"
MASK_SUFFIX = "_mask"
MASK_THRESHOLD = GRAY_MASK_THRESHOLD  # 0/255 masks: a pixel above 127 is defect
VAL_ANOMALIES = ("test", "pseudo")
ROOT_WHAT = "the MVTec AD folder holding one folder per category (bottle/, cable/, ...)"
STRUCTURE = "<category>/train/good, <category>/test/good, test/<defect>/, ground_truth/<defect>/<name>_mask.png"


# -- the folders ------------------------------------------------------------------------------

def list_categories(root: Path) -> list[str]:
    """The category folders under root: those with a train/ folder, sorted by name."""
    return sorted(d.name for d in root.iterdir() if d.is_dir() and (d / "train").is_dir())


@dataclass
class CategoryFiles:
    train_good: list[Path]
    test: dict[str, list[Path]]  # folder under test/ (good and each defect type) -> its images
    masks: dict[Path, Path]  # each defect image -> its mask
    good: str = GOOD  # the key of `test` that holds the normals (BTAD: ok, VisA: normal)


def mask_files(folder: Path, extensions, suffix: str = MASK_SUFFIX) -> dict[str, Path]:
    """ground_truth/<defect>: image name -> mask file (name = mask stem without `suffix`)."""
    out: dict[str, Path] = {}
    for mask in list_images(folder, extensions, "masks"):
        stem = mask.stem[: -len(suffix)] if suffix and mask.stem.endswith(suffix) else mask.stem
        if stem in out:
            raise DataError(f"{mask}: a second mask for image {stem!r} (the other is {out[stem].name})")
        out[stem] = mask
    return out


def scan(root: Path, category: str, extensions, with_train: bool = True) -> CategoryFiles:
    """MVTec AD's files of one category (scan_category with its folder names)."""
    return scan_category(root, category, extensions, with_train=with_train)


def scan_category(root: Path, category: str, extensions, good: str = GOOD, mask_suffix: str = MASK_SUFFIX,
                  layout: str = "mvtec", with_train: bool = True) -> CategoryFiles:
    """The files of root/<category> in the folder layout: <good> is the normals' folder name
    (train/<good>, test/<good>), every other test/ folder a defect type whose images have masks
    ground_truth/<defect>/<image stem><mask_suffix>.<ext>. with_train=False leaves train/
    unread (train_good empty): the test images alone."""
    base = root / category
    train_good = list_images(base / "train" / good, extensions, "normal training images") if with_train else []
    test_dir = base / "test"
    if not test_dir.is_dir():
        raise DataError(f"{test_dir}: folder not found ({layout} needs <category>/test/{good} and test/<defect>/)")
    kinds = sorted(d.name for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if good not in kinds:
        raise DataError(f"{test_dir / good}: folder not found (the test normals)")
    if kinds == [good]:
        raise DataError(f"{test_dir}: has only {good}/; it needs at least one defect folder (test/<defect>/)")
    test = {kind: list_images(test_dir / kind, extensions, "test images") for kind in kinds}
    masks: dict[Path, Path] = {}
    truth = base / "ground_truth"
    for kind in kinds:
        if kind == good:
            continue
        found = mask_files(truth / kind, extensions, mask_suffix) if (truth / kind).is_dir() else {}
        for image in test[kind]:
            if image.stem not in found:
                raise DataError(f"{image}: defect image with no mask (expected {truth / kind / (image.stem + mask_suffix)}.png)")
            masks[image] = found.pop(image.stem)
        if found:
            name, mask = next(iter(sorted(found.items())))
            raise DataError(f"{mask}: mask with no image (expected {test_dir / kind / name}.png)")
    if truth.is_dir():
        for folder in sorted(d for d in truth.iterdir() if d.is_dir() and d.name not in test and d.name != good):
            orphans = [m for m in sorted(folder.iterdir()) if m.suffix.lower() in extensions]
            if orphans:
                raise DataError(f"{orphans[0]}: mask with no image (there is no {test_dir / folder.name} folder)")
    return CategoryFiles(train_good, test, masks, good)


# -- the split --------------------------------------------------------------------------------

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
    train_kind = f"train/{files.good}"
    val: list[Entry] = [(p, 0, train_kind) for p in val_normal]
    test: list[Entry] = []
    for kind, images in files.test.items():  # sorted by folder name: the same draws every time
        label = 0 if kind == files.good else 1
        moved: set[Path] = set()
        if cfg.val_anomalies == "test" and len(images) >= 2:  # a folder of one stays in the test
            moved = set(permuted(images, g)[: min(len(images) - 1, held_out(len(images), cfg.val_anomaly_fraction))])
        val += [(p, label, kind) for p in images if p in moved]
        test += [(p, label, kind) for p in images if p not in moved]
    return CategorySplit([(p, 0, train_kind) for p in train], val, test)


def counts(entries: list[Entry]) -> dict[str, int]:
    """Images per source folder: train/good, and good or a defect type for test folders."""
    out: dict[str, int] = {}
    for _, _, kind in entries:
        out[kind] = out.get(kind, 0) + 1
    return out


# -- the dataset ------------------------------------------------------------------------------

def check_options(cfg) -> None:
    """The options every category dataset shares (not root, category or the zero-shot keys)."""
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
