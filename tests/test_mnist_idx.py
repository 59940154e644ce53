"""dataset=mnist_idx: any IDX set from a folder, built here in real IDX format."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from freqexp.data import build_dataset, dataset_shape
from freqexp.errors import ConfigError, DataError
from freqexp.run import execute
from freqexp.validate import make_plan
from tests.conftest import FAST, compose_cfg, read_runs


def idx_bytes(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


def write_set(folder, n_train=300, n_test=120, h=12, w=10, classes=3, gz=True, seed=0):
    """Class c images: a bright horizontal band at a class-specific height, plus noise."""
    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def make(n):
        y = (np.arange(n) % classes).astype(np.uint8)
        x = rng.randint(0, 40, size=(n, h, w)).astype(np.uint8)
        for i, c in enumerate(y):
            x[i, 2 + 3 * c : 4 + 3 * c] = 230
        return x, y

    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x, y = make(n)
        for suffix, arr in ((f"{prefix}-images-idx3-ubyte", x), (f"{prefix}-labels-idx1-ubyte", y)):
            data = idx_bytes(arr)
            if gz:
                (folder / f"{suffix}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / suffix).write_bytes(data)
    return folder


def cfg_for(root, *extra):
    return compose_cfg(["dataset=mnist_idx", f"dataset.root={root}", *extra])


@pytest.mark.parametrize("gz,layout", [(True, ""), (False, "MyDigits/raw")])
def test_loads_any_idx_set_under_the_class_protocol(tmp_path, gz, layout):
    write_set(tmp_path / layout if layout else tmp_path, gz=gz)
    cfg = cfg_for(tmp_path, "dataset.normal_class=1")
    assert dataset_shape(cfg.dataset) == (1, 12, 10)
    d = build_dataset(cfg.dataset)
    # 100 train images of class 1: 10 held out; val anomalies = as many, from classes 0 and 2
    assert d.counts() == {"train_normal": 90, "train_anomalous": 0, "val_normal": 10, "val_anomalous": 10,
                          "test_normal": 40, "test_anomalous": 80}
    assert (d.train.images[:, 0, 5:7].float().mean() > 200)  # class 1's band at rows 5-6
    assert d.info["normal_classes"] == ["class 1"]


def test_a_run_end_to_end_separates_the_classes(tmp_path, store):
    write_set(tmp_path / "set")
    cfg = cfg_for(tmp_path / "set", *FAST, f"tracking.uri={store}", "trainer.max_epochs=3", "trainer.batch_size=32",
                  "loss=mse", "model=ae", "dataset.normal_class=0")
    result = execute(cfg, tmp_path / "run")
    assert result.metrics["test/auroc"] > 0.9  # a band in the wrong place is easy to see
    assert read_runs(store)["params.dataset.name"].iloc[0] == "mnist_idx"


def test_bad_input_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="dataset.root"):
        make_plan(compose_cfg(["dataset=mnist_idx"]))  # root is required
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no IDX set"):
        build_dataset(cfg_for(empty).dataset)
    write_set(tmp_path / "ok")
    with pytest.raises(ConfigError, match="class 7 is not in"):
        build_dataset(cfg_for(tmp_path / "ok", "dataset.normal_class=7").dataset)
    with pytest.raises(ConfigError, match="every class is normal"):
        build_dataset(cfg_for(tmp_path / "ok", "dataset.normal_class=[0,1,2]").dataset)
    bad = write_set(tmp_path / "bad")
    (bad / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(5, dtype=np.uint8))))
    with pytest.raises(DataError, match="do not match"):
        build_dataset(cfg_for(bad).dataset)
