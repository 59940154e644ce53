"""VisA (Visual Anomaly dataset), read through the split file it ships with:

    root/split_csv/1cls.csv                      the split: header object,split,label,image,mask
    root/<object>/Data/Images/Normal/*.JPG       normal images (train and test rows)
    root/<object>/Data/Images/Anomaly/*.JPG      anomalous images (test rows)
    root/<object>/Data/Masks/Anomaly/*.png       their masks

Each csv row is one image: object = its category (candle, capsules, cashew, chewinggum, fryum,
macaroni1, macaroni2, pcb1, pcb2, pcb3, pcb4, pipe_fryum), split = train | test, label =
normal | anomaly, image and mask = paths relative to root (e.g. candle/Data/Images/Anomaly/000.JPG
and candle/Data/Masks/Anomaly/000.png); mask is empty for normals. Train rows are normals (the
one-class training split); an anomalous train row is an error. A missing csv, a missing column, a
value outside those lists, or a file named by a row that does not exist is a DataError naming the
file (and the csv line). Files are the rows' files whatever their folders; their extensions must
be among dataset.extensions (JPG is, case-insensitively).

Masks: VisA's raw masks hold small integer class ids (1, 2, ... on 0), not 255, so here a pixel is
defect when its value is nonzero (MASK_THRESHOLD = 0; read_mask in freqexp.data.images). Test
images are grouped as `normal` and `anomaly` (VisA's labels; the csv names no defect types), so
info["test_defects"] holds those two words. The split (held-out normals, val_anomalies) is
freqexp.data.mvtec's; the dataset is registered as `visa` in freqexp.data.categories.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from freqexp.data.mvtec import CategoryFiles
from freqexp.errors import DataError

NAME = "visa"
CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
              "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum")
CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
SPLITS = ("train", "test")
NORMAL, ANOMALY = "normal", "anomaly"
GOOD = NORMAL
MASK_THRESHOLD = 0  # class-id masks: any nonzero pixel is defect
ROOT_WHAT = "the VisA folder holding split_csv/1cls.csv and one folder per object (candle/, pcb1/, ...)"
STRUCTURE = "split_csv/1cls.csv with columns object,split,label,image,mask"


@dataclass(frozen=True)
class Row:
    line: int  # in the csv file, the header being line 1
    object: str
    split: str
    label: str
    image: str
    mask: str


def csv_path(root: Path) -> Path:
    return root / CSV


def read_rows(root: Path) -> list[Row]:
    """Every row of root/split_csv/1cls.csv, values checked (not the files they name)."""
    path = csv_path(root)
    if not path.is_file():
        raise DataError(f"{path}: not found (visa reads its split from {CSV}, as VisA ships it)")
    rows: list[Row] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise DataError(f"{path}: no column {', '.join(missing)} (the header must name {','.join(COLUMNS)}; "
                            f"it is {','.join(header) or 'empty'})")
        index = {c: header.index(c) for c in COLUMNS}
        for line, values in enumerate(reader, start=2):
            if not any(v.strip() for v in values):
                continue  # a blank line
            values = [v.strip() for v in values] + [""] * (len(header) - len(values))
            row = Row(line, *(values[index[c]] for c in COLUMNS))
            if row.split not in SPLITS:
                raise DataError(f"{path}, line {line}: split must be {' or '.join(SPLITS)}; got {row.split!r}")
            if row.label not in (NORMAL, ANOMALY):
                raise DataError(f"{path}, line {line}: label must be {NORMAL} or {ANOMALY}; got {row.label!r}")
            if not row.object or not row.image:
                raise DataError(f"{path}, line {line}: object and image must not be empty")
            rows.append(row)
    return rows


def list_categories(root: Path) -> list[str]:
    """The objects the csv names, sorted."""
    return sorted({row.object for row in read_rows(root)})


def existing(root: Path, relative: str, row: Row, what: str, extensions) -> Path:
    path = root / relative
    if not path.is_file():
        raise DataError(f"{path}: not found ({what} named by {csv_path(root)}, line {row.line})")
    if path.suffix.lower() not in extensions:
        raise DataError(f"{path}: its extension is not among dataset.extensions ({', '.join(extensions)}); "
                        f"named by {csv_path(root)}, line {row.line}")
    return path


def scan(root: Path, category: str, extensions, with_train: bool = True) -> CategoryFiles:
    """The files of one object: train normals, test images as {anomaly, normal}, and masks.
    with_train=False leaves the train rows' files untouched (train_good empty)."""
    rows = [row for row in read_rows(root) if row.object == category]
    where = csv_path(root)
    train_good: list[Path] = []
    test: dict[str, list[Path]] = {ANOMALY: [], NORMAL: []}
    masks: dict[Path, Path] = {}
    for row in rows:
        if row.split == "train":
            if row.label != NORMAL:
                raise DataError(f"{where}, line {row.line}: a train row labelled {row.label} ({row.image}); "
                                "the training split holds normal images only")
            if with_train:
                train_good.append(existing(root, row.image, row, "a train image", extensions))
            continue
        image = existing(root, row.image, row, f"a test image ({row.label})", extensions)
        test[row.label].append(image)
        if row.label == ANOMALY:
            if not row.mask:
                raise DataError(f"{where}, line {row.line}: the anomalous image {row.image} has no mask (the mask column is empty)")
            masks[image] = existing(root, row.mask, row, "a mask", extensions)
    if with_train and not train_good:
        raise DataError(f"{where}: no train rows of object {category!r} (the normal training images)")
    for label, images in test.items():
        if not images:
            raise DataError(f"{where}: no test rows of object {category!r} labelled {label}")
    return CategoryFiles(sorted(train_good), {k: sorted(v) for k, v in test.items()}, masks, GOOD)
