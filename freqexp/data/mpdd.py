"""MPDD (Metal Parts Defect Detection): MVTec AD's layout, read by the mvtec code.

    root/<category>/train/good/*.png                        normal training images
    root/<category>/test/good/*.png                         test normals
    root/<category>/test/<defect>/*.png                     test anomalies, one folder per defect type
    root/<category>/ground_truth/<defect>/<name>_mask.png   pixel mask of test/<defect>/<name>.png

Categories: bracket_black, bracket_brown, bracket_white, connector, metal_plate, tubes.
Masks are 0/255: a pixel above MASK_THRESHOLD (127) is defect, as for MVTec AD. Everything else
(the split, val_anomalies, geometry) is freqexp.data.mvtec's; the dataset is registered as
`mpdd` in freqexp.data.categories.
"""
from __future__ import annotations

from pathlib import Path

from freqexp.data import mvtec
from freqexp.data.mvtec import CategoryFiles

NAME = "mpdd"
CATEGORIES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")
GOOD = mvtec.GOOD
MASK_SUFFIX = mvtec.MASK_SUFFIX
MASK_THRESHOLD = mvtec.MASK_THRESHOLD
ROOT_WHAT = "the MPDD folder holding one folder per category (bracket_black/, connector/, ...)"
STRUCTURE = mvtec.STRUCTURE

list_categories = mvtec.list_categories


def scan(root: Path, category: str, extensions, with_train: bool = True) -> CategoryFiles:
    return mvtec.scan_category(root, category, extensions, GOOD, MASK_SUFFIX, NAME, with_train)
