"""Any IDX-format image set with class labels (MNIST, KMNIST, EMNIST, ...) from a folder the
user gives, under the same class-as-normal protocol as Fashion-MNIST. The folder holds the four
files with the usual names (train-images-idx3-ubyte, train-labels-idx1-ubyte,
t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; .gz or not), or torchvision's <Name>/raw layout."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from freqexp.data.base import DATASETS, OneClassData
from freqexp.data.fashion_mnist import FILES, check_protocol, class_protocol, find_file, normal_classes, prefetch_set
from freqexp.data.idx import parse_idx, read_bytes
from freqexp.errors import ConfigError, DataError


def folders(root: Path) -> list[Path]:
    return [root, root / "raw", *sorted(root.glob("*/raw"))]


def locate(cfg) -> Path:
    root = Path(os.path.expanduser(str(cfg.root)))
    for d in folders(root):
        if all(find_file(d, stem) for stem, _, _ in FILES.values()):
            return d
    names = ", ".join(stem for stem, _, _ in FILES.values())
    raise DataError(f"dataset.root: no IDX set in {root} (nor in its raw/ or */raw/); it needs {names} (.gz or not)")


@DATASETS.register("mnist_idx")
class MnistIDX:
    @staticmethod
    def check(cfg) -> None:
        from omegaconf import OmegaConf

        root = None if OmegaConf.is_missing(cfg, "root") else cfg.root
        if root in (None, "") or not os.path.isdir(os.path.expanduser(str(root))):
            raise ConfigError("dataset.root", f"must be the folder holding the four IDX files (dataset=mnist_idx dataset.root=DIR); got {root!r}")
        normal_classes(cfg, n_classes=None)
        check_protocol(cfg)

    @staticmethod
    def shape(cfg) -> tuple[int, int, int]:
        path = find_file(locate(cfg), FILES["train_images"][0])
        header = read_bytes(path)[:16] if path.suffix == ".gz" else path.open("rb").read(16)
        if len(header) < 16 or header[2] != 0x08 or header[3] != 3:
            raise DataError(f"{path} is not an IDX file of uint8 images [N, H, W]")
        return (1, int.from_bytes(header[8:12], "big"), int.from_bytes(header[12:16], "big"))

    @staticmethod
    def prefetch(cfg) -> None:
        prefetch_set(locate(cfg))

    @staticmethod
    def load(cfg) -> OneClassData:
        directory = locate(cfg)
        arrays = {}
        for key, (stem, _, _) in FILES.items():
            path = find_file(directory, stem)
            arrays[key] = parse_idx(read_bytes(path), str(path))
        for split in ("train", "test"):
            x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            if x.ndim != 3 or x.dtype != np.uint8 or y.ndim != 1 or len(x) != len(y):
                raise DataError(f"{directory}: {split} images {x.shape} {x.dtype} and labels {y.shape} do not match (need uint8 [N,H,W] and [N])")
        if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
            raise DataError(f"{directory}: train images are {arrays['train_images'].shape[1:]}, test images {arrays['test_images'].shape[1:]}")
        train_y = torch.from_numpy(arrays["train_labels"]).long()
        present = sorted(set(train_y.tolist()))
        normal = normal_classes(cfg, n_classes=None)
        missing = [c for c in normal if c not in present]
        if missing:
            raise ConfigError("dataset.normal_class", f"class {missing[0]} is not in {directory} (its classes: {', '.join(map(str, present))})")
        if len(normal) == len(present):
            raise ConfigError("dataset.normal_class", "every class is normal, so nothing is anomalous; leave at least one class out")
        return class_protocol(
            torch.from_numpy(arrays["train_images"]).unsqueeze(1), train_y,
            torch.from_numpy(arrays["test_images"]).unsqueeze(1), torch.from_numpy(arrays["test_labels"]).long(),
            normal, cfg, lambda i: f"class {i}", str(directory),
        )
