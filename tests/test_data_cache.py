"""dataset.cache: memory-mapped splits give the same batches as in-memory ones, cache files are
reused (not rewritten) and rebuilt when a source changes, auto follows the memory budget, and
Split accepts float images in [0, 1]."""
from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile
import torch
from omegaconf import OmegaConf

import freqexp.data.cache as cache
import freqexp.data.tiff_domains as td
from freqexp.data import build_dataset
from freqexp.data.base import IndexBatches, OneClassData, Split
from freqexp.data.synthetic import Synthetic
from freqexp.errors import ConfigError
from tests.test_tiff_domains import cfg_for, write_domain


def load(root, cache_dir, *extra):
    return build_dataset(cfg_for(root, f"dataset.cache_dir={cache_dir}", *extra).dataset)


def batches(images, labels, **kw):
    return [tuple(t.clone() for t in b) for b in IndexBatches(images, labels, batch_size=5, **kw)]


def assert_same_batches(a: Split, b: Split):
    for kw in ({"shuffle": True, "seed": 3}, {}):
        for (xa, ya), (xb, yb) in zip(batches(a.images, a.labels, **kw), batches(b.images, b.labels, **kw), strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def npy_files(folder):
    return sorted(p.name for p in folder.glob("*.npy"))


# -- tiff_domains streams into the cache ------------------------------------------------------

def test_memmap_split_gives_the_batches_of_the_in_memory_path(tmp_path):
    write_domain(tmp_path / "set", "domain_A")
    mem = load(tmp_path / "set", tmp_path / "cache", "dataset.cache=memory")
    mm = load(tmp_path / "set", tmp_path / "cache", "dataset.cache=memmap")
    assert mem.info["cache"] == "memory" and mm.info["cache"] == "memmap"
    assert mem.train.cache_file is None and npy_files(tmp_path / "cache") == sorted(
        os.path.basename(getattr(mm, s).cache_file) for s in ("train", "val", "test"))
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(mem, split).images, getattr(mm, split).images)
        assert_same_batches(getattr(mem, split), getattr(mm, split))
    # the memory-mapped images are backed by the file, mapped copy-on-write: writes never reach it
    path = mm.train.cache_file
    assert np.array_equal(np.load(path), mem.train.images.numpy())
    mm.train.images[0].fill_(0.5)
    assert np.array_equal(np.load(path), mem.train.images.numpy())


def test_cache_is_reused_without_reading_a_tiff_and_rebuilt_when_a_source_changes(tmp_path, monkeypatch):
    written = write_domain(tmp_path / "set", "domain_A")
    first = load(tmp_path / "set", tmp_path / "cache", "dataset.cache=memmap")
    files = {s: getattr(first, s).cache_file for s in ("train", "val", "test")}
    mtimes = {s: os.stat(f).st_mtime_ns for s, f in files.items()}

    real_read = td.read_tiff
    monkeypatch.setattr(td, "read_tiff", lambda path: pytest.fail(f"decoded {path} although the cache holds it"))
    again = load(tmp_path / "set", tmp_path / "cache", "dataset.cache=memmap")
    for s, f in files.items():
        assert getattr(again, s).cache_file == f and os.stat(f).st_mtime_ns == mtimes[s]
        assert torch.equal(getattr(again, s).images, getattr(first, s).images)
    monkeypatch.setattr(td, "read_tiff", real_read)

    # change one test image: its split gets a new file (the stale one goes), the others are kept
    changed = first.info["files"]["test"][0]
    new = np.asarray(written[changed])[::-1].copy()
    tifffile.imwrite(changed, new)
    third = load(tmp_path / "set", tmp_path / "cache", "dataset.cache=memmap")
    assert third.test.cache_file != files["test"] and not os.path.exists(files["test"])
    assert third.train.cache_file == files["train"] and os.stat(files["train"]).st_mtime_ns == mtimes["train"]
    x = new.astype(np.float64)
    np.testing.assert_allclose(third.test.images[0, 0].numpy(), (x - x.min()) / (x.max() - x.min()), atol=1e-7)
    assert len(npy_files(tmp_path / "cache")) == 3


def test_a_damaged_cache_file_is_rebuilt_and_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    write_domain(tmp_path / "set", "domain_A")
    good = load(tmp_path / "set", tmp_path / "cache", "dataset.cache=memmap")
    path, expected = good.val.cache_file, good.val.images.clone()
    # damaged from outside by a new file under its name (truncating a mapped file in place would
    # crash this process's mapping: freqexp itself only ever renames whole files into place)
    with open(path + ".damaged", "wb") as f:
        f.write(b"\x93NUMPY garbage")
    os.replace(path + ".damaged", path)
    rebuilt = load(tmp_path / "set", tmp_path / "cache", "dataset.cache=memmap")
    assert rebuilt.val.cache_file == path and torch.equal(rebuilt.val.images, expected)

    calls = {"n": 0}
    real_read = td.read_tiff

    def fails_on_the_third(p):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("stopped mid-build")
        return real_read(p)

    monkeypatch.setattr(td, "read_tiff", fails_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        load(tmp_path / "set", tmp_path / "other", "dataset.cache=memmap")
    assert list((tmp_path / "other").iterdir()) == []  # no half-written file to trust later


# -- auto ---------------------------------------------------------------------------------------

def test_auto_memory_maps_when_the_images_exceed_the_budget(tmp_path, monkeypatch):
    write_domain(tmp_path / "set", "domain_A")  # 22 images of 31x95 float32 = 259,160 bytes
    monkeypatch.setattr(cache, "memory_budget", lambda device: 259_159)
    small = load(tmp_path / "set", tmp_path / "cache")
    assert small.info["cache"] == "memmap" and small.train.cache_file is not None
    monkeypatch.setattr(cache, "memory_budget", lambda device: 259_160)
    fits = load(tmp_path / "set", tmp_path / "cache")
    assert fits.info["cache"] == "memory" and fits.train.cache_file is None
    assert torch.equal(small.test.images, fits.test.images)


def test_auto_on_a_gpu_compares_with_its_free_memory(monkeypatch):
    seen = []
    monkeypatch.setattr(cache, "memory_budget", lambda device: seen.append(torch.device(device).type) or 1000)
    assert cache.resolve_mode("auto", 1001, torch.device("cuda")) == "memmap"
    assert cache.resolve_mode("auto", 1000, torch.device("cuda")) == "memory"
    assert seen == ["cuda", "cuda"]
    assert cache.resolve_mode("memory", 10**15, "cpu") == "memory" and cache.resolve_mode("memmap", 1, "cpu") == "memmap"


def test_host_budget_is_a_fraction_of_memavailable():
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    budget = cache.memory_budget("cpu")
    assert abs(budget - cache.SAFETY_FRACTION * available) < 0.05 * available  # other processes move it a little


def test_cache_option_is_checked_and_defaults_to_auto():
    cache.check_cache_options(OmegaConf.create({}))  # datasets whose yaml has no cache key yet
    with pytest.raises(ConfigError, match="dataset.cache: must be one of auto | memory | memmap"):
        cache.check_cache_options(OmegaConf.create({"cache": "disk"}))


# -- place(): any dataset -----------------------------------------------------------------------

def synthetic():
    cfg = OmegaConf.create({"name": "synthetic", "image_size": 16, "channels": 1, "n_train": 23, "n_val": 8, "n_test": 8,
                            "limit_train": None, "split_seed": 0})
    return Synthetic.load(cfg)


def test_place_memmap_keeps_every_batch_and_reuses_the_file(tmp_path):
    data = synthetic()
    placed = cache.place(data, "cpu", "memmap", tmp_path)
    assert placed.info["cache"] == "memmap"
    for split in ("train", "val", "test"):
        a, b = getattr(data, split), getattr(placed, split)
        assert b.cache_file is not None and b.images.dtype == torch.uint8
        assert torch.equal(a.images, b.images) and torch.equal(a.masks if a.masks is not None else torch.zeros(0),
                                                                b.masks if b.masks is not None else torch.zeros(0))
        assert_same_batches(a, b)
    mtime = os.stat(placed.train.cache_file).st_mtime_ns
    again = cache.place(synthetic(), "cpu", "memmap", tmp_path)
    assert again.train.cache_file == placed.train.cache_file and os.stat(again.train.cache_file).st_mtime_ns == mtime
    assert cache.place(data, "cpu", "auto", tmp_path) is data  # on the CPU, auto leaves loaded data where it is
    resident = cache.place(placed, "cpu", "memory", tmp_path)
    assert resident.train.cache_file is None and torch.equal(resident.train.images, data.train.images)


def test_index_batches_copy_each_batch_to_the_given_device():
    x, y = torch.arange(12.0).view(12, 1), torch.arange(12)
    for bx, by in IndexBatches(x, y, batch_size=5, shuffle=True, seed=0, device="meta"):
        assert bx.device.type == "meta" and by.device.type == "meta"
    plain = list(IndexBatches(x, batch_size=5))
    assert plain[0].device.type == "cpu" and torch.equal(torch.cat(plain), x)


# -- Split precision -----------------------------------------------------------------------------

def test_split_takes_uint8_or_float_in_unit_range_only():
    labels = torch.zeros(2, dtype=torch.long)
    Split(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), labels)
    for dtype in (torch.float16, torch.float32):
        Split(torch.rand(2, 1, 4, 4).to(dtype), labels)
    with pytest.raises(ValueError, match=r"float images must be in \[0, 1\], got values in \[0.0, 2.0\]"):
        Split(torch.tensor([0.0, 2.0]).view(2, 1, 1, 1), labels)
    with pytest.raises(ValueError, match="must be in"):
        Split(torch.full((2, 1, 1, 1), float("nan")), labels)
    with pytest.raises(ValueError, match="uint8, float16 or float32"):
        Split(torch.zeros(2, 1, 4, 4, dtype=torch.int16), labels)
    data = OneClassData(Split(torch.rand(2, 1, 4, 4), labels), Split(torch.rand(2, 1, 4, 4), labels),
                        Split(torch.rand(2, 1, 4, 4), labels))
    assert data.to("cpu").shape == (1, 4, 4)


def test_variants_of_one_set_keep_their_own_files_and_a_range_source_invalidates(tmp_path):
    """A sweep over normalization (or split) options must not evict one variant's cache with the
    other's; a dataset-wide range is rebuilt when a train/good file it was taken from changes."""
    written = write_domain(tmp_path / "set", "domain_A", low=0.0, high=10.0)
    variants = [("dataset.normalize=minmax",), ("dataset.normalize=fixed", "dataset.range=[0,20]"), ("dataset.split_seed=4",)]
    first = [load(tmp_path / "set", tmp_path / "cache", "dataset.cache=memmap", *v) for v in variants]
    used = {os.path.basename(getattr(d, s).cache_file) for d in first for s in ("train", "val", "test")}
    assert npy_files(tmp_path / "cache") == sorted(used) and len(used) >= 8  # a split alike in two variants may share one
    assert not {getattr(first[0], s).cache_file for s in ("train", "val", "test")} & {getattr(first[1], s).cache_file for s in ("train", "val", "test")}
    mtimes = {p: os.stat(tmp_path / "cache" / p).st_mtime_ns for p in npy_files(tmp_path / "cache")}
    for v, data in zip(variants, first):
        again = load(tmp_path / "set", tmp_path / "cache", "dataset.cache=memmap", *v)
        assert again.test.cache_file == data.test.cache_file
    assert {p: os.stat(tmp_path / "cache" / p).st_mtime_ns for p in npy_files(tmp_path / "cache")} == mtimes

    scope = ("dataset.cache=memmap", "dataset.minmax_scope=dataset")
    before = load(tmp_path / "set", tmp_path / "cache", *scope)
    source = before.info["files"]["train"][0]
    tifffile.imwrite(source, np.asarray(written[source]) * 2)  # a new maximum for the domain's range
    after = load(tmp_path / "set", tmp_path / "cache", *scope)
    assert after.test.cache_file != before.test.cache_file
    f = after.info["files"]["test"][0]
    np.testing.assert_allclose(after.test.images[0, 0].numpy(), written[f] / (2 * written[source].max()), atol=1e-6)
