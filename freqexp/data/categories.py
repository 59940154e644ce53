"""Datasets of categories (mvtec, mpdd, btad, visa): their layouts behind one interface, the
one-category run, pooled labelled test images, and the zero-shot protocol.

Layouts (LAYOUTS[name]; each module's docstring draws its folders):
    mvtec   freqexp.data.mvtec   <category>/train/good, test/good, test/<defect>, ground_truth/<defect>/<name>_mask.png
    mpdd    freqexp.data.mpdd    the same layout
    btad    freqexp.data.btad    <category>/train/ok, test/ok, test/ko, ground_truth/ko/<stem>.<png|bmp>
    visa    freqexp.data.visa    split_csv/1cls.csv (object,split,label,image,mask) naming every file
A Layout lists the categories under a root, scans one category into CategoryFiles (train
normals, test images by folder, defect masks) and says how its masks are read (mask_threshold:
a pixel above it is defect; 127 for the 0/255 masks of MVTec AD, MPDD and BTAD, 0 = any nonzero
value for VisA's class-id masks).

Protocols (dataset.train_from):
- null (default): one run is one category of dataset.root, split as freqexp.data.mvtec describes
  (train normals minus held-out val normals; val anomalies pseudo or from test; test with masks).
- mvtec | visa | btad | mpdd: zero-shot. The model is trained on another dataset (train_from, read
  from dataset.train_root) and tested on dataset.root, whose training images are never read:
    train = every test image of every train_from category, normal and anomalous, with labels and
            masks (auxiliary supervision, as zero-shot methods train on e.g. VisA's test set to
            evaluate on MVTec AD);
    val   = empty;
    test  = every test image of the target categories: dataset.category=all (or unset) pools every
            category under root, a category name keeps one.
  Both sets are decoded with the target's geometry; image_size must be set (the sets differ in
  native size) and the channels are shared (auto: 3 if any image of either set is in colour).
  val_fraction, val_anomalies, val_anomaly_fraction, limit_train and split_seed do not apply.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from freqexp.data import btad, mpdd, mvtec, visa
from freqexp.data.base import DATASETS, ZERO_SHOT, OneClassData, Split
from freqexp.data.images import (
    Geometry, channels_option, decode, extensions_option, folder_option, native_size, resolve_channels,
)
from freqexp.data.mvtec import CategoryFiles, Entry, all_files, check_options, counts, split_category
from freqexp.errors import ConfigError, DataError

ALL = "all"


@dataclass(frozen=True)
class Layout:
    """How one dataset stores its categories."""

    name: str
    list_categories: Callable[[Path], list[str]]  # root -> its categories, sorted
    scan: Callable[..., CategoryFiles]  # (root, category, extensions, with_train=True) -> its files
    mask_threshold: int  # a mask pixel above it is defect (0: any nonzero value)
    root_what: str  # what the dataset's root folder is, for messages
    structure: str  # what a category looks like, for messages
    good: str  # the normals' folder / label name


def _layout(name: str, module) -> Layout:
    """The Layout a dataset module describes: its list_categories, scan and folder constants."""
    return Layout(name, module.list_categories, module.scan, module.MASK_THRESHOLD, module.ROOT_WHAT, module.STRUCTURE, module.GOOD)


LAYOUTS: dict[str, Layout] = {name: _layout(name, module) for name, module in
                              (("mvtec", mvtec), ("visa", visa), ("btad", btad), ("mpdd", mpdd))}


def layout_named(name: str, key: str = "dataset.train_from") -> Layout:
    if name not in LAYOUTS:
        from freqexp.checks import did_you_mean

        raise ConfigError(key, f"must be one of {' | '.join(LAYOUTS)}; got {name!r}{did_you_mean(str(name), LAYOUTS)}")
    return LAYOUTS[name]


# -- roots and categories ---------------------------------------------------------------------

def root_of(layout: Layout, cfg) -> Path:
    return folder_option(cfg, "root", layout.root_what)


def categories_under(layout: Layout, root: Path, key: str) -> list[str]:
    """The categories of `layout` under `root`; a ConfigError on `key` when there are none."""
    try:
        found = layout.list_categories(root)
    except DataError as e:
        if key == "dataset.root":
            raise
        raise ConfigError(key, f"{root} is not a {layout.name} folder: {e}") from None
    if not found:
        looks_like_one = (root / "train").is_dir() or (root / "test").is_dir()
        hint = "; it looks like one category itself: set it to its parent folder" if looks_like_one else ""
        raise ConfigError(key, f"{root} has no {layout.name} categories ({layout.structure}){hint}")
    return found


def _named(category: Any, found: Sequence[str]) -> Optional[str]:
    """The category folder `category` names: its name, or a number for a zero-padded name (1 -> 01)."""
    if isinstance(category, bool):
        return None
    if str(category) in found:
        return str(category)
    if isinstance(category, int):
        hits = [c for c in found if c.isdigit() and int(c) == category]
        return hits[0] if len(hits) == 1 else None
    return None


def pooled(cfg) -> bool:
    """Whether dataset.category asks for every category (all, null or unset)."""
    from omegaconf import OmegaConf

    return OmegaConf.is_missing(cfg, "category") or cfg.get("category") in (None, ALL)


def categories_of(layout: Layout, cfg, zero_shot: bool) -> list[str]:
    """The configured categories of dataset.root: one, or (zero-shot only) every one for `all`."""
    from omegaconf import OmegaConf

    root = root_of(layout, cfg)
    found = categories_under(layout, root, "dataset.root")
    if zero_shot and pooled(cfg):
        return found
    missing = OmegaConf.is_missing(cfg, "category")
    category = None if missing else cfg.get("category")
    if category == ALL:
        command = ["python", "-m", "freqexp", "--multirun", f"dataset={layout.name}", f"dataset.root={root}",
                   f"dataset.category={','.join(found)}"]
        raise ConfigError("dataset.category", f"one run reads one category; run each as its own job with "
                          f"`{shlex.join(command)}` (plus your other overrides)")
    name = _named(category, found)
    if name is None:
        allowed = f"all (every category, the default under dataset.train_from) or one of the categories in {root}" if zero_shot \
            else f"one of the categories in {root}"
        tail = "" if zero_shot else " (or all, for the sweep over them)"
        raise ConfigError("dataset.category", f"must be {allowed}: {', '.join(found)}{tail}; "
                          f"{'it is not set' if missing or category is None else f'got {category!r}'}")
    return [name]


# -- pooled labelled test images --------------------------------------------------------------

@dataclass
class PoolRow:
    file: Path
    label: int
    category: str
    defect: str  # the test folder (good, ok, a defect type) or VisA's label
    mask: Optional[Path]


def pool_rows(layout: Layout, root: Path, categories: Sequence[str], extensions) -> list[PoolRow]:
    """Every test image of the categories, in category order, then test folder, then file name.
    Training folders are not read."""
    rows: list[PoolRow] = []
    for category in categories:
        files = layout.scan(root, category, extensions, with_train=False)
        for kind, images in files.test.items():
            label = 0 if kind == files.good else 1
            rows += [PoolRow(p, label, category, kind, files.masks.get(p)) for p in images]
    return rows


def _decode_rows(layout: Layout, rows: Sequence[PoolRow], channels: int, geometry: Geometry) -> Split:
    images, masks = decode([r.file for r in rows], channels, geometry, [r.mask for r in rows],
                           mask_threshold=layout.mask_threshold)
    return Split(images, torch.tensor([r.label for r in rows], dtype=torch.long), masks)


def labelled_pool(name: str, root: Union[str, Path], categories: Sequence[str], cfg,
                  channels: Optional[int] = None) -> tuple[Split, dict]:
    """Every test image (normal and defective) of `categories` of dataset `name` under `root`,
    decoded with cfg's geometry (image_size, keep_aspect, center_crop) and channels (auto: 3 if
    any of these images is in colour; `channels` overrides cfg's), labels 0/1 and masks (zeros
    for normals, the layout's mask threshold). The dict holds one entry per row: "categories",
    "defects" (test folder or label) and "files"."""
    layout = layout_named(name, "dataset.name")
    rows = pool_rows(layout, Path(root), categories, extensions_option(cfg))
    if channels is None:
        channels = resolve_channels(channels_option(cfg), [r.file for r in rows])
    split = _decode_rows(layout, rows, channels, Geometry.from_cfg(cfg))
    return split, {"categories": [r.category for r in rows], "defects": [r.defect for r in rows],
                   "files": [str(r.file) for r in rows]}


def pool_counts(rows: Sequence[PoolRow]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        key = f"{r.category}/{r.defect}"
        out[key] = out.get(key, 0) + 1
    return out


# -- the zero-shot protocol -------------------------------------------------------------------

@dataclass(frozen=True)
class ZeroShot:
    train_from: Layout
    train_root: Path
    train_categories: list[str]


def zero_shot_of(layout: Layout, cfg) -> Optional[ZeroShot]:
    """dataset.train_from / train_root checked: None for the one-class protocol."""
    train_from = cfg.get("train_from")
    train_root = cfg.get("train_root")
    if train_from is None:
        if train_root not in (None, ""):
            raise ConfigError("dataset.train_root", f"is read only with dataset.train_from set (the zero-shot protocol: "
                              f"{' | '.join(LAYOUTS)}); set dataset.train_from or leave train_root null; got {train_root!r}")
        return None
    if not isinstance(train_from, str) or train_from not in LAYOUTS:
        from freqexp.checks import did_you_mean

        raise ConfigError("dataset.train_from", f"must be null (the one-class protocol) or the dataset the model is trained on "
                          f"under the zero-shot protocol: {' | '.join(LAYOUTS)}; got {train_from!r}"
                          f"{did_you_mean(str(train_from), LAYOUTS)}")
    source = LAYOUTS[train_from]
    what = f"the {train_from} folder trained on under dataset.train_from={train_from}: {source.root_what}"
    if train_root in (None, ""):
        raise ConfigError("dataset.train_root", f"must be set (dataset.train_root=DIR): {what}; it is not set")
    folder = folder_option(cfg, "train_root", what)
    root = root_of(layout, cfg)
    if folder.resolve() == root.resolve():
        raise ConfigError("dataset.train_root", f"{folder} is dataset.root itself: zero-shot trains on another dataset and tests on "
                          f"dataset.root, so training on its own test images would leak them; set train_root to the {train_from} folder")
    found = categories_under(source, folder, "dataset.train_root")
    if Geometry.from_cfg(cfg).size is None:
        raise ConfigError("dataset.image_size", "must be set under dataset.train_from (an integer, or [H, W]): images of the two "
                          "datasets differ in native size, so both are resized to one; got null")
    return ZeroShot(source, folder, found)


def _zero_shot_rows(layout: Layout, cfg, zs: ZeroShot) -> tuple[list[str], list[PoolRow], list[PoolRow]]:
    extensions = extensions_option(cfg)
    targets = categories_of(layout, cfg, zero_shot=True)
    train = pool_rows(zs.train_from, zs.train_root, zs.train_categories, extensions)
    test = pool_rows(layout, root_of(layout, cfg), targets, extensions)
    return targets, train, test


def zero_shot_shape(layout: Layout, cfg, zs: ZeroShot) -> tuple[int, int, int]:
    _, train, test = _zero_shot_rows(layout, cfg, zs)
    channels = resolve_channels(channels_option(cfg), [r.file for r in train + test])
    geometry = Geometry.from_cfg(cfg)
    return (channels, *geometry.output_size(geometry.size))


def load_zero_shot(layout: Layout, cfg, zs: ZeroShot) -> OneClassData:
    targets, train_rows, test_rows = _zero_shot_rows(layout, cfg, zs)
    channels = resolve_channels(channels_option(cfg), [r.file for r in train_rows + test_rows])
    geometry = Geometry.from_cfg(cfg)
    train = _decode_rows(zs.train_from, train_rows, channels, geometry)
    test = _decode_rows(layout, test_rows, channels, geometry)
    h, w = geometry.output_size(geometry.size)
    val = Split(torch.zeros((0, channels, h, w), dtype=torch.uint8), torch.zeros(0, dtype=torch.long),
                torch.zeros((0, 1, h, w), dtype=torch.bool))
    root = root_of(layout, cfg)
    n = len(zs.train_categories)
    info = {
        "protocol": ZERO_SHOT,
        "train_from": zs.train_from.name, "train_root": str(zs.train_root),
        "root": str(root), "category": ALL if pooled(cfg) else targets[0],
        "categories": list(targets),
        "test_categories": [r.category for r in test_rows], "test_defects": [r.defect for r in test_rows],
        "train_categories": [r.category for r in train_rows], "train_defects": [r.defect for r in train_rows],
        "train_category_names": list(zs.train_categories),
        "files": {"train": [str(r.file) for r in train_rows], "val": [], "test": [str(r.file) for r in test_rows]},
        "counts": {"train": pool_counts(train_rows), "val": {}, "test": pool_counts(test_rows)},
        "normal_classes": [f"{zs.train_from.name}: all {n} categor{'y' if n == 1 else 'ies'}"],
        "channels": channels,
    }
    return OneClassData(train, val, test, info)


# -- one category (the one-class protocol) ----------------------------------------------------

def one_class_shape(layout: Layout, cfg) -> tuple[int, int, int]:
    root, (category,) = root_of(layout, cfg), categories_of(layout, cfg, zero_shot=False)
    files = layout.scan(root, category, extensions_option(cfg))
    channels = resolve_channels(channels_option(cfg), all_files(files))
    return (channels, *Geometry.from_cfg(cfg).output_size(native_size(files.train_good[0])))


def load_one_class(layout: Layout, cfg) -> OneClassData:
    root, (category,) = root_of(layout, cfg), categories_of(layout, cfg, zero_shot=False)
    files = layout.scan(root, category, extensions_option(cfg))
    split = split_category(files, cfg)
    channels = resolve_channels(channels_option(cfg), all_files(files))
    geometry = Geometry.from_cfg(cfg)
    reference = files.train_good[0]  # without image_size, every image must have its size

    def build(entries: list[Entry], with_masks: bool) -> Split:
        paths = [p for p, _, _ in entries]
        masks: Optional[list] = [files.masks.get(p) for p in paths] if with_masks else None
        images, mask_tensor = decode(paths, channels, geometry, masks, reference=reference, mask_threshold=layout.mask_threshold)
        return Split(images, torch.tensor([y for _, y, _ in entries], dtype=torch.long), mask_tensor)

    with_val_masks = cfg.val_anomalies == "test"  # pseudo: the run makes val anomalies and their masks
    out = {"train": build(split.train, False), "val": build(split.val, with_val_masks), "test": build(split.test, True)}
    info = {
        "root": str(root), "category": category, "normal_classes": [f"{category} ({files.good})"],
        "channels": channels, "val_anomalies": cfg.val_anomalies,
        "counts": {name: counts(getattr(split, name)) for name in ("train", "val", "test")},
        "files": {name: [str(p) for p, _, _ in getattr(split, name)] for name in ("train", "val", "test")},
        "test_defects": [kind for _, _, kind in split.test],
    }
    return OneClassData(out["train"], out["val"], out["test"], info)


# -- the registered datasets ------------------------------------------------------------------

class CategoryDataset:
    """dataset=<layout name>: one category per run, or the zero-shot protocol (dataset.train_from)."""

    layout: Layout

    @classmethod
    def check(cls, cfg) -> None:
        check_options(cfg)
        zs = zero_shot_of(cls.layout, cfg)
        categories_of(cls.layout, cfg, zero_shot=zs is not None)

    @classmethod
    def shape(cls, cfg) -> tuple[int, int, int]:
        zs = zero_shot_of(cls.layout, cfg)
        return one_class_shape(cls.layout, cfg) if zs is None else zero_shot_shape(cls.layout, cfg, zs)

    @classmethod
    def load(cls, cfg) -> OneClassData:
        check_options(cfg)
        zs = zero_shot_of(cls.layout, cfg)
        return load_one_class(cls.layout, cfg) if zs is None else load_zero_shot(cls.layout, cfg, zs)


@DATASETS.register("mvtec")
class MVTec(CategoryDataset):
    layout = LAYOUTS["mvtec"]


@DATASETS.register("mpdd")
class MPDD(CategoryDataset):
    layout = LAYOUTS["mpdd"]


@DATASETS.register("btad")
class BTAD(CategoryDataset):
    layout = LAYOUTS["btad"]


@DATASETS.register("visa")
class VisA(CategoryDataset):
    layout = LAYOUTS["visa"]
