"""Datasets under the one-class protocol. Importing this package registers every dataset."""
from freqexp.data.base import DATASETS, IndexBatches, OneClassData, Split, StepGroups
from freqexp.data import categories, fashion_mnist, folder, mnist_idx, synthetic, tiff_domains  # noqa: F401  (registration)

__all__ = ["DATASETS", "IndexBatches", "OneClassData", "Split", "StepGroups", "build_dataset", "dataset_shape", "prefetch"]


def dataset_shape(cfg) -> tuple[int, int, int]:
    """(C, H, W) of the images a dataset config yields, known without loading any file."""
    return DATASETS.get(cfg.name).shape(cfg)


def build_dataset(cfg) -> OneClassData:
    return DATASETS.get(cfg.name).load(cfg)


def prefetch(cfg) -> None:
    """Start reading a dataset's files in a thread where its loader can (the IDX sets: their
    gzip is decompressed by zlib, which lets other threads run), so a run decompresses them
    while it imports Lightning (a sweep's job too: its worker then finds them decompressed
    already). Best effort: a bad config or a missing or corrupt file is left to the run's own
    checks, which report it as before; a config the dataset's own check() refuses reads nothing."""
    try:
        dataset = DATASETS.get(cfg.name)
        if hasattr(dataset, "prefetch"):
            dataset.check(cfg)
            dataset.prefetch(cfg)
    except Exception:  # noqa: BLE001 - whatever it is, validation and loading say it in one line later
        pass
