"""BTAD (beanTech Anomaly Detection): MVTec AD's folder layout with ok/ko folders.

    root/<category>/train/ok/*.bmp|png           normal training images
    root/<category>/test/ok/*.bmp|png            test normals
    root/<category>/test/ko/*.bmp|png            test anomalies (one folder: BTAD has no defect types)
    root/<category>/ground_truth/ko/<stem>.png|bmp   pixel mask of test/ko/<stem>.<ext>: the same
                                                 stem as its image, no _mask suffix; the mask's
                                                 extension may differ from the image's

Categories: 01, 02, 03 (01 and 03 are .bmp images, 02 .png; on the command line a category may be
given as 1 or 01). Masks are 0/255: a pixel above MASK_THRESHOLD (127) is defect, as for MVTec AD.
Scanning and the split are freqexp.data.mvtec's with the normals' folder named `ok`; the dataset is
registered as `btad` in freqexp.data.categories.
"""
from __future__ import annotations

from pathlib import Path

from freqexp.data import mvtec
from freqexp.data.mvtec import CategoryFiles

NAME = "btad"
CATEGORIES = ("01", "02", "03")
GOOD = "ok"
MASK_SUFFIX = ""
MASK_THRESHOLD = mvtec.MASK_THRESHOLD
ROOT_WHAT = "the BTAD folder holding one folder per category (01/, 02/, 03/)"
STRUCTURE = "<category>/train/ok, <category>/test/ok, test/ko/, ground_truth/ko/<stem>.png"

list_categories = mvtec.list_categories


def scan(root: Path, category: str, extensions, with_train: bool = True) -> CategoryFiles:
    return mvtec.scan_category(root, category, extensions, GOOD, MASK_SUFFIX, NAME, with_train)
