"""dataset=tiff_domains: real TIFF folders built here (tifffile and Pillow writers), values read
exactly, normalized as numpy says, split without overlap, bad input named in one line, and a run
end to end on 31x95 images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import freqexp.data.tiff_domains as td  # noqa: F401  (registers the dataset until freqexp.data imports it)
from freqexp.data import build_dataset, dataset_shape
from freqexp.errors import ConfigError, DataError
from freqexp.run import execute
from freqexp.validate import make_plan
from tests.conftest import FAST, compose_cfg, read_runs

H, W = 31, 95


def sample(rng, shape, dtype, low=-3.0, high=250.0) -> np.ndarray:
    """Random samples spanning the dtype's range (integers) or [low, high] (floats), extremes included."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        x = rng.uniform(low, high, size=shape)
        x.flat[:2] = (low, high)
    else:
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max, size=shape, endpoint=True)
        x.flat[:2] = (info.min, info.max)
    return x.astype(dtype)


def write_domain(root: Path, name: str, counts=None, shape=(H, W), dtype=np.float32, seed=0, **value_range) -> dict:
    """root/name/<split>/<class>/NNN.tif; returns {path: the array written}."""
    counts = counts or {"train/good": 12, "test/good": 4, "test/fault": 6}
    rng = np.random.default_rng(seed)
    written = {}
    for folder, n in counts.items():
        d = root / name / folder
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            x = sample(rng, shape, dtype, **value_range)
            path = d / f"{i:03d}.tif"
            tifffile.imwrite(path, x)
            written[str(path)] = x
    return written


def cfg_for(root, *extra):
    return compose_cfg(["dataset=tiff_domains", f"dataset.root={root}", "dataset.domain=domain_A", *extra])


def load(root, *extra):
    return build_dataset(cfg_for(root, *extra).dataset)


def rows(data, split: str) -> list[tuple[str, np.ndarray]]:
    """(source file, stored image [H, W]) for every row of a split."""
    images = getattr(data, split).images
    return [(f, images[i, 0].numpy()) for i, f in enumerate(data.info["files"][split])]


# -- reading ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int16, np.uint8])
def test_reader_returns_the_written_samples_exactly(tmp_path, dtype):
    x = sample(np.random.default_rng(1), (H, W), dtype)
    tifffile.imwrite(tmp_path / "x.tif", x)
    y = td.read_tiff(tmp_path / "x.tif")
    assert y.dtype == x.dtype and y.shape == (H, W)
    assert np.array_equal(y, x)  # no clipping to a display range, no rounding


@pytest.mark.parametrize("dtype,compression", [(np.float32, None), (np.uint16, None), (np.uint8, None),
                                               (np.float32, "tiff_lzw"), (np.uint16, "tiff_adobe_deflate")])
def test_reader_reads_files_that_pillow_wrote(tmp_path, dtype, compression):
    """Another writer (and LZW, which tifffile leaves to Pillow without imagecodecs)."""
    x = sample(np.random.default_rng(2), (H, W), dtype)
    kwargs = {"compression": compression} if compression else {}
    Image.fromarray(x).save(tmp_path / "x.tiff", **kwargs)
    y = td.read_tiff(tmp_path / "x.tiff")
    assert y.dtype == x.dtype and np.array_equal(y, x)


# -- values -----------------------------------------------------------------------------------

def test_float32_outside_unit_range_minmax_per_image_and_native_31x95(tmp_path):
    written = write_domain(tmp_path, "domain_A")
    cfg = cfg_for(tmp_path)
    assert dataset_shape(cfg.dataset) == (1, H, W)  # non-square, odd: kept
    data = build_dataset(cfg.dataset)
    assert data.train.images.dtype == torch.float32 and data.train.images.shape[1:] == (1, H, W)
    for split in ("train", "val", "test"):
        for f, img in rows(data, split):
            x = written[f].astype(np.float64)
            expected = (x - x.min()) / (x.max() - x.min())
            np.testing.assert_allclose(img, expected, rtol=0, atol=1e-7)
            assert img.min() == 0.0 and img.max() == 1.0


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.int16])
def test_integer_tiffs_keep_their_full_precision(tmp_path, dtype):
    written = write_domain(tmp_path, "domain_A", dtype=dtype)
    data = load(tmp_path)
    for f, img in rows(data, "train"):
        x = written[f].astype(np.float64)
        np.testing.assert_allclose(img, (x - x.min()) / (x.max() - x.min()), rtol=0, atol=1e-7)
    if dtype == np.uint16:  # more distinct levels than 8 bits can hold
        assert len(np.unique(data.train.images[0].numpy())) > 256


def test_minmax_per_dataset_uses_the_domains_train_good_range(tmp_path):
    counts = {"train/good": 10, "test/good": 4, "test/fault": 4}
    written = write_domain(tmp_path, "domain_A", counts=counts, low=0.0, high=100.0)
    # a test fault brighter than any training image: clipped to 1
    hot = tmp_path / "domain_A/test/fault/000.tif"
    written[str(hot)] = written[str(hot)] * 3
    tifffile.imwrite(hot, written[str(hot)])
    data = load(tmp_path, "dataset.minmax_scope=dataset")
    train_good = np.stack([a for f, a in written.items() if "/train/good/" in f]).astype(np.float64)
    low, high = train_good.min(), train_good.max()
    for split in ("train", "val", "test"):
        for f, img in rows(data, split):
            expected = np.clip((written[f].astype(np.float64) - low) / (high - low), 0, 1)
            np.testing.assert_allclose(img, expected, rtol=0, atol=1e-7)
    assert str(hot) in data.info["files"]["test"] + data.info["files"]["val"]


def test_normalize_fixed_maps_the_range_and_clips(tmp_path):
    written = write_domain(tmp_path, "domain_A", low=-3.0, high=250.0)
    data = load(tmp_path, "dataset.normalize=fixed", "dataset.range=[0,200]")
    for f, img in rows(data, "test"):
        np.testing.assert_allclose(img, np.clip(written[f].astype(np.float64) / 200.0, 0, 1), rtol=0, atol=1e-7)


def test_normalize_none_keeps_values_and_rejects_a_file_out_of_range(tmp_path):
    written = write_domain(tmp_path, "domain_A", low=0.0, high=1.0)
    data = load(tmp_path, "dataset.normalize=none")
    for f, img in rows(data, "train"):
        assert np.array_equal(img, written[f])  # float32 in, float32 out, bit for bit
    bad = tmp_path / "domain_A/test/good/002.tif"
    tifffile.imwrite(bad, np.full((H, W), 1.5, np.float32))
    with pytest.raises(DataError, match=r"002\.tif: values in \[1\.5, 1\.5\] are outside \[0, 1\]"):
        load(tmp_path, "dataset.normalize=none")


def test_image_size_resizes_like_pillow_bilinear(tmp_path):
    written = write_domain(tmp_path, "domain_A")
    cfg = cfg_for(tmp_path, "dataset.image_size=[16,40]")
    assert dataset_shape(cfg.dataset) == (1, 16, 40)
    data = build_dataset(cfg.dataset)
    for f, img in rows(data, "train")[:3]:
        x = written[f].astype(np.float64)
        unit = ((x - x.min()) / (x.max() - x.min())).astype(np.float32)
        reference = np.asarray(Image.fromarray(unit).resize((40, 16), Image.BILINEAR))  # PIL's antialiased bilinear
        np.testing.assert_allclose(img, reference, rtol=0, atol=1e-5)
    square = load(tmp_path, "dataset.image_size=20")
    assert square.test.images.shape[1:] == (1, 20, 20)
    assert 0.0 <= float(square.test.images.min()) and float(square.test.images.max()) <= 1.0


def test_mixed_sizes_resize_to_one_size_when_asked(tmp_path):
    write_domain(tmp_path, "domain_A")
    tifffile.imwrite(tmp_path / "domain_A/test/good/001.tif", np.ones((40, 60), np.float32))
    with pytest.raises(DataError, match=r"000\.tif is 31x95, .*001\.tif is 40x60; set dataset.image_size"):
        load(tmp_path)
    assert load(tmp_path, "dataset.image_size=[31,95]").test.images.shape[1:] == (1, 31, 95)


# -- the split --------------------------------------------------------------------------------

def file_sets(data):
    return {s: set(data.info["files"][s]) for s in ("train", "val", "test")}


def test_split_counts_faults_moved_out_of_test_without_train_fault(tmp_path):
    write_domain(tmp_path, "domain_A", counts={"train/good": 20, "test/good": 5, "test/fault": 6})
    data = load(tmp_path, "dataset.val_fraction=0.2")
    # 4 held-out normals; 4 faults wanted, at most half of test/fault (3) moved out of test
    assert data.counts() == {"train_normal": 16, "train_anomalous": 0, "val_normal": 4, "val_anomalous": 3,
                             "test_normal": 5, "test_anomalous": 3}
    sets = file_sets(data)
    assert not (sets["val"] & sets["test"]) and not (sets["train"] & sets["val"])
    all_faults = {str(p) for p in (tmp_path / "domain_A/test/fault").iterdir()}
    assert {f for f in sets["val"] if "/fault/" in f} | {f for f in sets["test"] if "/fault/" in f} == all_faults
    labels = {f: int(y) for f, y in zip(data.info["files"]["val"], data.val.labels)}
    assert all(labels[f] == ("/fault/" in f) for f in labels)


def test_split_takes_val_faults_from_train_fault_when_present(tmp_path):
    write_domain(tmp_path, "domain_A", counts={"train/good": 20, "train/fault": 7, "test/good": 5, "test/fault": 6})
    data = load(tmp_path, "dataset.val_fraction=0.25", "dataset.val_anomaly_ratio=1.0")
    assert data.counts() == {"train_normal": 15, "train_anomalous": 0, "val_normal": 5, "val_anomalous": 5,
                             "test_normal": 5, "test_anomalous": 6}  # the test split is untouched
    assert all("/train/" in f for f in data.info["files"]["val"])
    pseudo = load(tmp_path, "dataset.val_fraction=0.25", "dataset.val_anomalies=pseudo")
    assert pseudo.val.n_anomalous == 0 and pseudo.test.n_anomalous == 6  # the run adds pseudo-anomalies to val


def test_split_is_fixed_by_split_seed(tmp_path):
    write_domain(tmp_path, "domain_A", counts={"train/good": 30, "test/good": 4, "test/fault": 8})
    a, b = load(tmp_path), load(tmp_path)
    c = load(tmp_path, "dataset.split_seed=1")
    assert file_sets(a) == file_sets(b) and file_sets(a) != file_sets(c)
    assert torch.equal(a.train.images, b.train.images)


def test_domain_all_is_the_union_of_each_domain_alone(tmp_path):
    write_domain(tmp_path, "domain_A", seed=0)
    write_domain(tmp_path, "domain_B", counts={"train/good": 8, "test/good": 3, "test/fault": 2}, seed=1)
    (tmp_path / "notes").mkdir()  # a folder without train/ or test/ is not a domain
    both = load(tmp_path, "dataset.domain=all")
    assert both.info["domains"] == ["domain_A", "domain_B"]
    alone = {d: load(tmp_path, f"dataset.domain={d}") for d in ("domain_A", "domain_B")}
    for split in ("train", "val", "test"):
        files = both.info["files"][split]
        assert files == alone["domain_A"].info["files"][split] + alone["domain_B"].info["files"][split]
        images = torch.cat([getattr(alone[d], split).images for d in ("domain_A", "domain_B")])
        assert torch.equal(getattr(both, split).images, images)


# -- bad input --------------------------------------------------------------------------------

def test_bad_config_names_the_key(tmp_path):
    write_domain(tmp_path, "domain_A")
    write_domain(tmp_path, "domain_B")
    with pytest.raises(ConfigError, match="dataset.root"):
        make_plan(compose_cfg(["dataset=tiff_domains"]))
    with pytest.raises(ConfigError, match=r"dataset.domain: must be one of the domains in .*: domain_A, domain_B, or all; got 'domain_Z'"):
        make_plan(cfg_for(tmp_path, "dataset.domain=domain_Z"))
    with pytest.raises(ConfigError, match="domain_A, domain_B, or all; got None"):
        make_plan(compose_cfg(["dataset=tiff_domains", f"dataset.root={tmp_path}"]))  # domain is required
    with pytest.raises(ConfigError, match="set dataset.root to its parent"):
        make_plan(cfg_for(tmp_path / "domain_A"))
    for override, key in [("dataset.image_size=[31]", "dataset.image_size"), ("dataset.image_size=2", "dataset.image_size"),
                          ("dataset.normalize=zscore", "dataset.normalize"), ("dataset.minmax_scope=batch", "dataset.minmax_scope"),
                          ("dataset.val_fraction=1.0", "dataset.val_fraction"), ("dataset.val_anomalies=classes", "dataset.val_anomalies"),
                          ("dataset.cache=gpu", "dataset.cache"), ("dataset.limit_train=0", "dataset.limit_train")]:
        with pytest.raises(ConfigError, match=key):
            make_plan(cfg_for(tmp_path, override))
    with pytest.raises(ConfigError, match=r"dataset.range: must be \[lo, hi\] with lo < hi"):
        make_plan(cfg_for(tmp_path, "dataset.normalize=fixed", "dataset.range=[5,5]"))


def test_missing_or_empty_folders_are_named(tmp_path):
    write_domain(tmp_path, "domain_A", counts={"train/good": 4, "test/good": 2})
    with pytest.raises(DataError, match=r"domain_A/test/fault: folder not found"):
        load(tmp_path)
    (tmp_path / "domain_A/test/fault").mkdir()
    (tmp_path / "domain_A/test/fault/readme.txt").write_text("no images")
    with pytest.raises(DataError, match=r"domain_A/test/fault: holds no .tif/.tiff files"):
        load(tmp_path)
    (tmp_path / "domain_A/train/fault").mkdir()  # present but empty: also named
    tifffile.imwrite(tmp_path / "domain_A/test/fault/000.tif", np.zeros((H, W), np.float32))
    with pytest.raises(DataError, match=r"domain_A/train/fault: holds no"):
        load(tmp_path)


def write_bad(path: Path, kind: str) -> None:
    good = np.random.default_rng(0).random((H, W)).astype(np.float32)
    if kind == "truncated":
        tifffile.imwrite(path, good)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "not a tiff":
        path.write_bytes(b"this is not an image")
    elif kind == "complex":
        tifffile.imwrite(path, good.astype(np.complex64))
    elif kind == "multi-page":
        tifffile.imwrite(path, good)
        tifffile.imwrite(path, good, append=True)
    elif kind == "rgb":
        tifffile.imwrite(path, np.stack([good] * 3, -1), photometric="rgb")
    elif kind == "nan":
        good[3, 4] = np.nan
        tifffile.imwrite(path, good)


@pytest.mark.parametrize("kind,message", [
    ("truncated", r"003\.tif: cannot be read as a TIFF \(.*\)$"),
    ("not a tiff", r"003\.tif: cannot be read as a TIFF \(.*not a TIFF"),
    ("complex", r"003\.tif: has complex64 samples"),
    ("multi-page", r"003\.tif: has 2 pages"),
    ("rgb", r"003\.tif: has 3 samples per pixel \(float32\)"),
    ("nan", r"003\.tif: contains NaN"),
])
def test_a_bad_file_is_named_in_one_line(tmp_path, kind, message):
    write_domain(tmp_path, "domain_A")
    write_bad(tmp_path / "domain_A/train/good/003.tif", kind)
    with pytest.raises(DataError, match=message) as e:
        load(tmp_path)
    assert "\n" not in str(e.value)


# -- end to end -------------------------------------------------------------------------------

def test_a_run_end_to_end_on_31x95_float_maps(tmp_path, store):
    counts = {"train/good": 24, "test/good": 6, "test/fault": 8}
    rng = np.random.default_rng(3)
    for folder, n in counts.items():
        d = tmp_path / "hdmap/domain_A" / folder
        d.mkdir(parents=True)
        for i in range(n):  # smooth ramps; faults carry a bright horizontal scratch
            x = np.linspace(0, 1, W)[None, :] * np.linspace(0.5, 1, H)[:, None] * 40 - 3 + rng.normal(0, 0.3, (H, W))
            if folder.endswith("fault"):
                x[10:12, 20:70] += 60
            tifffile.imwrite(d / f"{i:03d}.tif", x.astype(np.float32))
    cfg = compose_cfg(["dataset=tiff_domains", f"dataset.root={tmp_path / 'hdmap'}", "dataset.domain=domain_A",
                       "dataset.val_fraction=0.25", f"dataset.cache_dir={tmp_path / 'cache'}", "model=cae", "loss=mse",
                       "trainer.batch_size=8", *FAST, f"tracking.uri={store}"])
    result = execute(cfg, tmp_path / "run")
    for key in ("val/auroc", "test/auroc", "test/ap"):
        assert 0.0 <= result.metrics[key] <= 1.0
    runs = read_runs(store)
    assert runs["params.dataset.name"].iloc[0] == "tiff_domains"
    assert runs["params.data.train_normal"].iloc[0] == "18" and runs["params.data.test_anomalous"].iloc[0] == "4"
    assert (tmp_path / "run" / "reconstructions.png").exists()
