"""Your own images in plain folders: one of normal images, one of anomalies.

    normal_dir        normal images (training, and the held-out val/test normals)
    abnormal_dir      anomalies, split between val and test
    normal_test_dir   optional: the test normals; without it a share of normal_dir is held out
    mask_dir          optional: pixel masks of the anomalies, matched by file stem
                      (crack_01.png <- crack_01.png or crack_01_mask.png, any of the extensions)

Each folder is read flat (not its subfolders). It is also how two collections are compared, for
instance two painters: one folder is "normal" (the model learns it), the other "anomalous";
test AUROC then says how well the second is told apart from held-out images of the first by
what the model failed to learn. Set dataset.image_size (such collections have many sizes), and
keep_aspect=true to crop instead of stretch, so the two keep their brush-stroke frequencies.

The split (fixed by dataset.split_seed):
- normals of normal_dir, shuffled: val_fraction of them to val, test_fraction to test (only when
  there is no normal_test_dir; at least one each), the rest to train (limit_train caps it);
- anomalies of abnormal_dir, shuffled: with val_anomalies=abnormal, val_anomaly_fraction of
  them (at least one, never all) to val and the rest to test; no file is in two splits. With
  val_anomalies=pseudo all of them are the test's and the run adds CutPaste-family
  pseudo-anomalies of the val normals (freqexp.data.pseudo).
With mask_dir every anomaly needs a mask and every mask an anomaly (DataError otherwise);
normal images get all-zero masks, and the run then reports test/pixel_auroc.
info["files"] lists each split's source files, row by row.
"""
from __future__ import annotations

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

MASK_SUFFIX = "_mask"
VAL_ANOMALIES = ("abnormal", "pseudo")
FOLDERS = {
    "normal_dir": ("the folder of normal images", True),
    "abnormal_dir": ("the folder of anomalous images", True),
    "normal_test_dir": ("null or a folder of normal test images", False),
    "mask_dir": ("null or a folder of pixel masks for the anomalies", False),
}

Entry = tuple[Path, int]  # (file, label)


def folders(cfg) -> dict[str, Optional[Path]]:
    out = {key: folder_option(cfg, key, what, required) for key, (what, required) in FOLDERS.items()}
    seen: dict[Path, str] = {}
    for key, path in out.items():  # one folder in two roles would put a file in two splits (or read masks as images)
        if path is None:
            continue
        if path.resolve() in seen:
            raise ConfigError(f"dataset.{key}", f"is the same folder as dataset.{seen[path.resolve()]} ({path}); give each role its own folder")
        seen[path.resolve()] = key
    return out


def check_options(cfg) -> None:
    folders(cfg)
    extensions_option(cfg)
    Geometry.from_cfg(cfg)
    channels_option(cfg)
    val = fraction_option(cfg, "val_fraction")
    test = fraction_option(cfg, "test_fraction")
    if cfg.get("normal_test_dir") is None and val + test >= 1:
        raise ConfigError("dataset.test_fraction", f"val_fraction + test_fraction must be below 1 so that normals are left "
                          f"for training; got {val} + {test}")
    choice_option(cfg, "val_anomalies", VAL_ANOMALIES,
                  " (abnormal: a share of abnormal_dir moves to val; pseudo: CutPaste-family images of held-out normals)")
    fraction_option(cfg, "val_anomaly_fraction")
    limit_option(cfg)
    seed_option(cfg)
    check_cache_options(cfg)


def match_masks(abnormal: list[Path], mask_dir: Path, extensions) -> dict[Path, Path]:
    """Each anomaly -> its mask, by stem (<stem> or <stem>_mask); DataError for an anomaly
    without a mask, a mask without an anomaly, or a name that matches twice."""
    by_stem: dict[str, Path] = {}
    for image in abnormal:
        if image.stem in by_stem:
            raise DataError(f"{image}: shares its name with {by_stem[image.stem].name}, so a mask in {mask_dir} cannot tell them apart")
        by_stem[image.stem] = image
    out: dict[Path, Path] = {}
    for mask in list_images(mask_dir, extensions, "dataset.mask_dir"):
        stem = mask.stem
        if stem not in by_stem and stem.endswith(MASK_SUFFIX):
            stem = stem[: -len(MASK_SUFFIX)]
        image = by_stem.get(stem)
        if image is None:
            raise DataError(f"{mask}: mask with no image (no {stem}.* in {abnormal[0].parent})")
        if image in out:
            raise DataError(f"{mask}: a second mask for {image.name} (the other is {out[image].name})")
        out[image] = mask
    for image in abnormal:
        if image not in out:
            raise DataError(f"{image}: anomaly with no mask (expected {mask_dir / image.stem}.png or {image.stem}{MASK_SUFFIX}.png)")
    return out


def split_files(normal: list[Path], normal_test: Optional[list[Path]], abnormal: list[Path], cfg) -> dict[str, list[Entry]]:
    g = torch.Generator().manual_seed(seed_option(cfg))
    shuffled = permuted(normal, g)
    n_val = held_out(len(shuffled), cfg.val_fraction)
    n_test = 0 if normal_test is not None else held_out(len(shuffled), cfg.test_fraction)
    if len(shuffled) - n_val - n_test < 1:
        taken = "dataset.val_fraction" + ("" if normal_test is not None else " and dataset.test_fraction")
        raise DataError(f"{normal[0].parent}: {len(normal)} normal image(s) leave none for training after {taken}; add images")
    val_normal, test_normal = sorted(shuffled[:n_val]), sorted(shuffled[n_val : n_val + n_test])
    train = sorted(shuffled[n_val + n_test :])
    if cfg.get("limit_train") is not None:
        train = train[: int(cfg.limit_train)]
    if normal_test is not None:
        test_normal = normal_test
    moved: set[Path] = set()
    if cfg.val_anomalies == "abnormal":
        if len(abnormal) < 2:
            raise DataError(f"{abnormal[0].parent}: has {len(abnormal)} image; val and test need one each "
                            f"(or set dataset.val_anomalies=pseudo)")
        moved = set(permuted(abnormal, g)[: min(len(abnormal) - 1, held_out(len(abnormal), cfg.val_anomaly_fraction))])
    return {
        "train": [(p, 0) for p in train],
        "val": [(p, 0) for p in val_normal] + [(p, 1) for p in abnormal if p in moved],
        "test": [(p, 0) for p in test_normal] + [(p, 1) for p in abnormal if p not in moved],
    }


@DATASETS.register("folder")
class Folder:
    @staticmethod
    def check(cfg) -> None:
        check_options(cfg)

    @staticmethod
    def shape(cfg) -> tuple[int, int, int]:
        dirs, extensions = folders(cfg), extensions_option(cfg)
        normal = list_images(dirs["normal_dir"], extensions, "dataset.normal_dir")
        channels = resolve_channels(channels_option(cfg), normal + Folder.other_files(dirs, extensions))
        return (channels, *Geometry.from_cfg(cfg).output_size(native_size(normal[0])))

    @staticmethod
    def other_files(dirs, extensions) -> list[Path]:
        files = list_images(dirs["abnormal_dir"], extensions, "dataset.abnormal_dir")
        if dirs["normal_test_dir"] is not None:
            files = list_images(dirs["normal_test_dir"], extensions, "dataset.normal_test_dir") + files
        return files

    @staticmethod
    def load(cfg) -> OneClassData:
        check_options(cfg)
        dirs, extensions = folders(cfg), extensions_option(cfg)
        normal = list_images(dirs["normal_dir"], extensions, "dataset.normal_dir")
        abnormal = list_images(dirs["abnormal_dir"], extensions, "dataset.abnormal_dir")
        normal_test = None
        if dirs["normal_test_dir"] is not None:
            normal_test = list_images(dirs["normal_test_dir"], extensions, "dataset.normal_test_dir")
        masks = match_masks(abnormal, dirs["mask_dir"], extensions) if dirs["mask_dir"] is not None else None
        splits = split_files(normal, normal_test, abnormal, cfg)
        channels = resolve_channels(channels_option(cfg), normal + (normal_test or []) + abnormal)
        geometry = Geometry.from_cfg(cfg)

        def build(entries: list[Entry], with_masks: bool) -> Split:
            paths = [p for p, _ in entries]
            mask_paths = [masks.get(p) for p in paths] if with_masks and masks is not None else None
            images, mask_tensor = decode(paths, channels, geometry, mask_paths, reference=normal[0])
            return Split(images, torch.tensor([y for _, y in entries], dtype=torch.long), mask_tensor)

        out = {"train": build(splits["train"], False), "val": build(splits["val"], True), "test": build(splits["test"], True)}
        info = {
            "root": str(dirs["normal_dir"]), "normal_classes": [dirs["normal_dir"].name],
            "abnormal_dir": str(dirs["abnormal_dir"]), "channels": channels, "val_anomalies": cfg.val_anomalies,
            "counts": {name: {"normal": sum(1 for _, y in e if y == 0), "abnormal": sum(y for _, y in e)} for name, e in splits.items()},
            "files": {name: [str(p) for p, _ in entries] for name, entries in splits.items()},
        }
        return OneClassData(out["train"], out["val"], out["test"], info)
