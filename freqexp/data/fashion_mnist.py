"""Fashion-MNIST (Xiao et al. 2017) from its four IDX files, under the one-class protocol:
the classes in `normal_class` are normal, every other class is anomalous."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from freqexp.data.base import DATASETS, OneClassData, Split, one_class_split
from freqexp.data import idx
from freqexp.data.idx import parse_idx, read_bytes, sha256
from freqexp.errors import ConfigError, DataError

SYSTEM_ROOT = "/usr/share/datasets/fashion-mnist"
APT_PACKAGE = "dataset-fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# SHA-256 of the decompressed files: independent of how a mirror gzipped them.
FILES = {
    "train_images": ("train-images-idx3-ubyte", 47040016, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train_labels": ("train-labels-idx1-ubyte", 60008, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "test_images": ("t10k-images-idx3-ubyte", 7840016, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "test_labels": ("t10k-labels-idx1-ubyte", 10008, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}


def normal_classes(cfg, n_classes: Optional[int] = 10) -> list[int]:
    """dataset.normal_class as a sorted list; labels 0..n_classes-1 (any label >= 0 when the
    number of classes is only known once the data is read)."""
    value = cfg.normal_class
    values = list(value) if hasattr(value, "__iter__") and not isinstance(value, str) else [value]
    top = float("inf") if n_classes is None else n_classes - 1
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= top for v in values):
        allowed = "a class label >= 0" if n_classes is None else f"a class 0-{n_classes - 1}"
        raise ConfigError("dataset.normal_class", f"must be {allowed} or a list of them (e.g. [0,6]); got {value}")
    if n_classes is not None and len(set(values)) == n_classes:
        raise ConfigError("dataset.normal_class", f"all {n_classes} classes are normal, so nothing is anomalous; pick 1-{n_classes - 1} classes")
    return sorted(set(values))


def candidate_roots(root: Optional[str]) -> list[Path]:
    dirs = [Path(root).expanduser()] if root else []
    dirs += [Path("data/fashion-mnist").resolve(), Path(SYSTEM_ROOT)]
    out = []
    for d in dirs:  # each may also hold torchvision's FashionMNIST/raw layout
        out += [d, d / "FashionMNIST" / "raw"]
    return out


def find_file(directory: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def locate(root: Optional[str]) -> Path:
    for d in candidate_roots(root):
        if all(find_file(d, stem) for stem, _, _ in FILES.values()):
            return d
    looked = ", ".join(dict.fromkeys(str(d) for d in candidate_roots(root) if "FashionMNIST" not in str(d)))
    raise DataError(
        f"Fashion-MNIST not found (looked in {looked}); install it with `apt-get install -y {APT_PACKAGE}` "
        f"(as root) or set dataset.root=DIR to a folder with the four IDX files ({FILES['train_images'][0]}.gz, ...)"
    )


def prefetch_set(directory: Path) -> None:
    """Decompress an IDX set's four files in a thread while the run starts (freqexp.data.prefetch)."""
    idx.prefetch(find_file(directory, stem) for stem, _, _ in FILES.values())


def load_arrays(directory: Path) -> dict:
    arrays = {}
    for key, (stem, size, digest) in FILES.items():
        path = find_file(directory, stem)
        try:
            data = read_bytes(path)
        except DataError as e:
            raise DataError(f"{path} is corrupt ({e}); reinstall `apt-get install --reinstall -y {APT_PACKAGE}` "
                            f"or point dataset.root at a good copy") from None
        if len(data) != size or sha256(data) != digest:
            raise DataError(
                f"{path} is corrupt (size or checksum does not match Fashion-MNIST); reinstall "
                f"`apt-get install --reinstall -y {APT_PACKAGE}` or point dataset.root at a good copy"
            )
        arrays[key] = parse_idx(data, str(path))
    return arrays


def stratified_subset(labels: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """Exactly `limit` indices keeping each class's share (used by dataset.limit_test):
    floor quotas, then the largest remainders get the leftover places."""
    g = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    exact = limit * counts.double() / len(labels)
    quota = exact.floor().long()
    leftover = limit - int(quota.sum())
    quota[torch.argsort(exact - quota, descending=True, stable=True)[:leftover]] += 1
    keep = []
    for c, k in zip(classes.tolist(), quota.tolist()):
        idx = torch.nonzero(labels == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(keep).sort().values


def check_protocol(cfg) -> None:
    """The one-class protocol's own keys, shared by every class-labelled dataset."""
    vf = cfg.val_fraction
    if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 < vf < 1:
        raise ConfigError("dataset.val_fraction", f"must be a number in (0, 1); got {vf!r}")
    if cfg.get("val_anomalies", "classes") not in ("classes", "pseudo"):
        raise ConfigError("dataset.val_anomalies", f"must be classes (other classes of the train split) or pseudo (CutPaste-family images of held-out normals); got {cfg.val_anomalies!r}")
    ar = cfg.val_anomaly_ratio
    if isinstance(ar, bool) or not isinstance(ar, (int, float)) or not ar > 0:
        raise ConfigError("dataset.val_anomaly_ratio", f"must be a number > 0; got {ar!r}")
    for key, low in (("limit_train", 1), ("limit_test", 10)):
        v = cfg.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
            raise ConfigError(f"dataset.{key}", f"must be null or an integer >= {low}; got {v}")


def class_protocol(train_x, train_y, test_x, test_y, normal: list[int], cfg, class_names, root: str) -> OneClassData:
    """train: normal classes minus a held-out part; val: held-out normals + other-class images of
    the train split; test: the whole test split (or a stratified limit_test subset)."""
    normal_t = torch.tensor(normal)
    tr, val_n, val_a = one_class_split(
        train_y, torch.isin(train_y, normal_t), cfg.val_fraction, cfg.val_anomaly_ratio, cfg.limit_train, cfg.split_seed
    )
    val_idx = torch.cat([val_n, val_a])
    if cfg.get("limit_test") is not None and cfg.limit_test < len(test_y):
        keep = stratified_subset(test_y, cfg.limit_test, cfg.split_seed)
        test_x, test_y = test_x[keep], test_y[keep]
    return OneClassData(
        train=Split(train_x[tr], torch.zeros(len(tr), dtype=torch.long)),
        val=Split(train_x[val_idx], (~torch.isin(train_y[val_idx], normal_t)).long()),
        test=Split(test_x, (~torch.isin(test_y, normal_t)).long()),
        info={"root": root, "normal_classes": [class_names(i) for i in normal], "test_classes": test_y},
    )


@DATASETS.register("fashion_mnist")
class FashionMNIST:
    @staticmethod
    def check(cfg) -> None:
        normal_classes(cfg)
        check_protocol(cfg)
        if cfg.root is not None and not os.path.isdir(os.path.expanduser(str(cfg.root))):
            raise ConfigError("dataset.root", f"{cfg.root} is not a directory; set it to the folder holding the IDX files or null to search the defaults")

    @staticmethod
    def shape(cfg) -> tuple[int, int, int]:
        return (1, 28, 28)

    @staticmethod
    def prefetch(cfg) -> None:
        prefetch_set(locate(cfg.root))

    @staticmethod
    def load(cfg) -> OneClassData:
        directory = locate(cfg.root)
        a = load_arrays(directory)
        return class_protocol(
            torch.from_numpy(a["train_images"]).unsqueeze(1), torch.from_numpy(a["train_labels"]).long(),
            torch.from_numpy(a["test_images"]).unsqueeze(1), torch.from_numpy(a["test_labels"]).long(),
            normal_classes(cfg), cfg, lambda i: CLASSES[i], str(directory),
        )
