"""The shapes data takes inside freqexp: image tensors with labels (0 normal, 1 anomalous) and
optional pixel masks, split into train / val / test, and an iterable that slices batches out of
those tensors by index.

Images are uint8 (0-255, the compact form for 8-bit sources) or float16/float32 already in
[0, 1] (sensor maps, 16-bit and float TIFFs, which lose precision at 8 bit); the training module
turns either into float in [0, 1] on the device (freqexp.training.to_unit_float). A split's
images may live in a memory-mapped cache file on the host (freqexp.data.cache) instead of on the
training device; IndexBatches then copies each batch to the device."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional

import torch

from freqexp.registry import Registry

DATASETS: Registry[Any] = Registry("dataset", "dataset")


IMAGE_DTYPES = (torch.uint8, torch.float16, torch.float32)


@dataclass
class Split:
    images: torch.Tensor  # [N, C, H, W]: uint8 0-255, or float16/float32 in [0, 1]
    labels: torch.Tensor  # int64 [N]: 0 normal, 1 anomalous
    masks: Optional[torch.Tensor] = None  # bool [N, 1, H, W] where pixel ground truth exists
    cache_file: Optional[str] = None  # the .npy file `images` is memory-mapped from, if any

    def __post_init__(self):
        if self.images.dtype not in IMAGE_DTYPES or self.images.ndim != 4:
            raise ValueError(f"images must be uint8, float16 or float32 [N,C,H,W], got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.labels) != len(self.images):
            raise ValueError("labels and images differ in length")
        # A float range check reads every pixel: skipped for a cache file, which freqexp wrote
        # from checked values, so that opening a large one stays lazy.
        if self.images.is_floating_point() and self.cache_file is None and self.images.numel():
            low, high = (float(v) for v in torch.aminmax(self.images))
            if not (0.0 <= low and high <= 1.0):  # also false for NaN
                raise ValueError(f"float images must be in [0, 1], got values in [{low}, {high}]")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_anomalous(self) -> int:
        return int(self.labels.sum())

    @property
    def nbytes(self) -> int:
        masks = 0 if self.masks is None else self.masks.nbytes
        return self.images.nbytes + self.labels.nbytes + masks

    def to(self, device) -> "Split":
        masks = None if self.masks is None else self.masks.to(device)
        images = self.images.to(device)
        return Split(images, self.labels.to(device), masks, self.cache_file if images is self.images else None)

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
    """Batches sliced from tensors by index: no DataLoader workers, no per-sample Python.
    Tensors already on the training device are sliced there (no host-to-device copy per step);
    tensors kept on the host (a memory-mapped cache, freqexp.data.cache) are gathered there and
    each batch is copied to `device`. Reshuffled every epoch from its own seeded generator, so
    runs repeat exactly, and the order does not depend on where the tensors live."""

    def __init__(self, *tensors: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0, device=None):
        self.tensors = tensors
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self.n = len(tensors[0])
        self.device = tensors[0].device if device is None else torch.device(device)

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
        if self.shuffle:
            order = torch.randperm(self.n, generator=self.generator)
            order_on = {t.device: order.to(t.device) for t in self.tensors}  # one copy per epoch
        for start in range(0, self.stop, self.batch_size):
            if self.shuffle:
                batch = tuple(t[order_on[t.device][start : start + self.batch_size]] for t in self.tensors)
            else:
                batch = tuple(t[start : start + self.batch_size] for t in self.tensors)
            batch = tuple(b.to(self.device) for b in batch)  # no-op for tensors already there
            yield batch[0] if len(batch) == 1 else batch


class StepGroup:
    """Consecutive training batches that one call of the shared training step trains on, one
    optimizer step each (see StepGroups). A plain object, not a collection, so Lightning's loop
    passes it through untouched: each batch is already on the training device."""

    __slots__ = ("batches",)

    def __init__(self, batches: list):
        self.batches = batches

    def __iter__(self) -> Iterator:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StepGroups:
    """A training loader's batches in groups of `steps` (trainer.steps_per_call): Lightning's loop
    (fetching, hooks, progress, the strategy and precision wrappers) then runs once a group, not
    once a batch, and the module's step trains on each batch of the group in turn. The batches,
    their order and the optimizer steps are the loader's own, so the training is the same; only
    the loop's host time per step shrinks. The last group may be shorter."""

    def __init__(self, loader: IndexBatches, steps: int):
        if steps < 1:
            raise ValueError(f"steps must be >= 1; got {steps}")
        self.loader, self.steps = loader, int(steps)

    def __len__(self) -> int:
        return (len(self.loader) + self.steps - 1) // self.steps

    def __iter__(self) -> Iterator[StepGroup]:
        group: list = []
        for batch in self.loader:
            group.append(batch)
            if len(group) == self.steps:
                yield StepGroup(group)
                group = []
        if group:
            yield StepGroup(group)


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


# -- protocols: what validation holds and what a one-pass model is fitted on -------------------

FIT_ON = ("auto", "train", "all")
# dataset.val_anomalies values whose validation anomalies are taken out of the test split: fitting
# a bank on the held-out normals would leave those images in neither split
VAL_FROM_TEST = ("test", "abnormal", "faults")
UNSUPERVISED = "unsupervised"
SEMI_SUPERVISED = "semi-supervised"
ZERO_SHOT = "zero-shot"  # trained on another dataset (dataset.train_from), tested on every category of the target


def fits_all_normals(fit_on: str, gradient_free: bool, val_anomalies: Optional[str]) -> bool:
    """Whether the model is fitted on every normal training image (trainer.fit_on, checked by
    freqexp.validate): only one-pass models, which select nothing on validation."""
    if not gradient_free or fit_on == "train":
        return False
    return fit_on == "all" or val_anomalies not in VAL_FROM_TEST


def validation_protocol(val_anomalies: Optional[str], validated: bool) -> str:
    """semi-supervised when validation (the epoch, the threshold, a sweep's objective) sees real
    anomalies of the kind the test holds; unsupervised with pseudo-anomalies or no validation."""
    return SEMI_SUPERVISED if validated and val_anomalies not in (None, "pseudo") else UNSUPERVISED


def with_all_normals(data: OneClassData, limit: Optional[int] = None) -> OneClassData:
    """The held-out validation normals join the training split and validation is left empty:
    a one-pass model (PatchCore, WEDGE-Net, kNN, PCA) fitted on every normal training image, as
    the official code fits its bank on all of train/good. `limit` (dataset.limit_train) still
    caps the images fitted on."""
    normal = data.val.labels == 0
    images = torch.cat([data.train.images, data.val.images[normal].to(data.train.images.device, data.train.images.dtype)])
    if limit is not None:
        images = images[: max(len(data.train), int(limit))]
    train = Split(images, torch.zeros(len(images), dtype=torch.long))
    empty = data.val.subset(torch.zeros(0, dtype=torch.long))
    return OneClassData(train, empty, data.test, data.info)
