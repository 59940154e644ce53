"""The shapes data takes inside freqexp: uint8 image tensors with labels (0 normal,
1 anomalous) and optional pixel masks, split into train / val / test, and an iterable that
slices batches out of a device-resident tensor by index."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional

import torch

from freqexp.registry import Registry

DATASETS: Registry[Any] = Registry("dataset", "dataset")


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]: 0 normal, 1 anomalous
    masks: Optional[torch.Tensor] = None  # bool [N, 1, H, W] where pixel ground truth exists

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.labels) != len(self.images):
            raise ValueError("labels and images differ in length")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_anomalous(self) -> int:
        return int(self.labels.sum())

    def to(self, device) -> "Split":
        masks = None if self.masks is None else self.masks.to(device)
        return Split(self.images.to(device), self.labels.to(device), masks)

    def subset(self, index: torch.Tensor) -> "Split":
        masks = None if self.masks is None else self.masks[index]
        return Split(self.images[index], self.labels[index], masks)


@dataclass
class OneClassData:
    """train: normal images only; val: held-out normals + labelled anomalies (model selection,
    thresholds, the sweep objective); test: reported, never optimized on."""

    train: Split
    val: Split
    test: Split
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def to(self, device) -> "OneClassData":
        return OneClassData(self.train.to(device), self.val.to(device), self.test.to(device), self.info)

    def counts(self) -> Dict[str, int]:
        out = {}
        for name in ("train", "val", "test"):
            split = getattr(self, name)
            out[f"{name}_normal"] = len(split) - split.n_anomalous
            out[f"{name}_anomalous"] = split.n_anomalous
        return out


class IndexBatches:
    """Batches sliced from tensors already on the training device: no DataLoader workers,
    no per-sample Python, no host-to-device copy per step. Reshuffled every epoch from its own
    seeded generator, so runs repeat exactly."""

    def __init__(self, *tensors: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0):
        self.tensors = tensors
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self.n = len(tensors[0])

    @property
    def stop(self) -> int:
        """When shuffling (training), a last batch of one image is dropped: BatchNorm cannot
        normalize a single sample. It is a different image each epoch."""
        if self.shuffle and self.n > 1 and self.n % self.batch_size == 1:
            return self.n - 1
        return self.n

    def __len__(self) -> int:
        return (self.stop + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator:
        device = self.tensors[0].device
        if self.shuffle:
            order = torch.randperm(self.n, generator=self.generator).to(device)
        for start in range(0, self.stop, self.batch_size):
            if self.shuffle:
                idx = order[start : start + self.batch_size]
                batch = tuple(t[idx] for t in self.tensors)
            else:
                batch = tuple(t[start : start + self.batch_size] for t in self.tensors)
            yield batch[0] if len(batch) == 1 else batch


def one_class_split(
    labels_train: torch.Tensor,
    is_normal_train: torch.Tensor,
    val_fraction: float,
    val_anomaly_ratio: float,
    limit_train: Optional[int],
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices into the train split: (train normals, val normals, val anomalies)."""
    g = torch.Generator().manual_seed(seed)
    normal_idx = torch.nonzero(is_normal_train).flatten()
    normal_idx = normal_idx[torch.randperm(len(normal_idx), generator=g)]
    n_val = int(round(len(normal_idx) * val_fraction))
    val_normal, train_normal = normal_idx[:n_val], normal_idx[n_val:]
    if limit_train is not None:
        train_normal = train_normal[: int(limit_train)]
    anomal_idx = torch.nonzero(~is_normal_train).flatten()
    anomal_idx = anomal_idx[torch.randperm(len(anomal_idx), generator=g)]
    n_anom = min(len(anomal_idx), int(round(n_val * val_anomaly_ratio)))
    return train_normal.sort().values, val_normal.sort().values, anomal_idx[:n_anom].sort().values
