"""Datasets under the one-class protocol. Importing this package registers every dataset."""
from freqexp.data.base import DATASETS, IndexBatches, OneClassData, Split, StepGroups
from freqexp.data import categories, fashion_mnist, folder, mnist_idx, synthetic, tiff_domains  # noqa: F401  (registration)

__all__ = ["DATASETS", "IndexBatches", "OneClassData", "Split", "StepGroups", "build_dataset", "dataset_shape"]


def dataset_shape(cfg) -> tuple[int, int, int]:
    """(C, H, W) of the images a dataset config yields, known without loading any file."""
    return DATASETS.get(cfg.name).shape(cfg)


def build_dataset(cfg) -> OneClassData:
    return DATASETS.get(cfg.name).load(cfg)
