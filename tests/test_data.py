"""IDX reader, Fashion-MNIST one-class splits (on the installed files), data location and
corruption errors, the synthetic dataset and IndexBatches."""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import freqexp.data.fashion_mnist as fm
from freqexp.data.base import IndexBatches
from freqexp.data.fashion_mnist import FashionMNIST
from freqexp.data.idx import parse_idx, read_bytes
from freqexp.data.synthetic import TRAIN_CHUNK, Synthetic, gratings, inject_defect, split_generator
from freqexp.errors import ConfigError, DataError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
STEMS = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
HAVE_FMNIST = all((FMNIST_DIR / f"{s}.gz").is_file() for s in STEMS)
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def fm_cfg(**overrides):
    d = {
        "name": "fashion_mnist",
        "root": None,
        "normal_class": 0,
        "val_fraction": 0.1,
        "val_anomaly_ratio": 1.0,
        "limit_train": None,
        "limit_test": None,
        "split_seed": 0,
    }
    d.update(overrides)
    return OmegaConf.create(d)


def syn_cfg(**overrides):
    d = {
        "name": "synthetic",
        "image_size": 32,
        "channels": 1,
        "n_train": 256,
        "n_val": 64,
        "n_test": 128,
        "limit_train": None,
        "split_seed": 0,
    }
    d.update(overrides)
    return OmegaConf.create(d)


def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    """An IDX file built by hand: 0, 0, dtype code, ndim, big-endian uint32 dims, data."""
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return header + arr.tobytes()


def row_hashes(images) -> list[bytes]:
    a = images.numpy() if isinstance(images, torch.Tensor) else images
    return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in a.reshape(len(a), -1)]


# =========================================================================== IDX reader


def test_parse_idx_uint8_3d():
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = parse_idx(idx_bytes(arr, 0x08))
    assert out.shape == (2, 3, 4)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)
    out[0, 0, 0] = 99  # writable copy
    assert out[0, 0, 0] == 99


def test_parse_idx_1d_labels_and_big_endian_int32():
    labels = np.array([9, 0, 0, 3, 1], dtype=np.uint8)
    np.testing.assert_array_equal(parse_idx(idx_bytes(labels, 0x08)), labels)
    ints = np.array([[1, -2], [70000, -300000]], dtype=">i4")
    out = parse_idx(idx_bytes(ints, 0x0C))
    assert out.shape == (2, 2)
    assert out.tolist() == [[1, -2], [70000, -300000]]


def test_parse_idx_dims_are_big_endian_uint32():
    arr = np.zeros((300, 2), dtype=np.uint8)  # 300 > 255 needs two bytes of the dim
    assert parse_idx(idx_bytes(arr, 0x08)).shape == (300, 2)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00",
        b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x00",  # first byte not 0
        b"\x00\x01\x08\x01" + struct.pack(">I", 2) + b"\x00\x00",  # second byte not 0
        b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"\x00\x00",  # unknown dtype code
        b"\x1f\x8b\x08\x00" + b"\x00" * 20,  # a gzip stream passed in undecoded
    ],
)
def test_parse_idx_bad_magic(data):
    with pytest.raises(DataError, match="magic"):
        parse_idx(data, "somefile")


def test_parse_idx_truncated_or_padded():
    arr = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    data = idx_bytes(arr, 0x08)
    for bad in (data[:-1], data[: len(data) // 2], data[:10], data + b"\x00"):
        with pytest.raises(DataError, match="truncated or corrupt") as e:
            parse_idx(bad, "images.idx")
        assert "images.idx" in str(e.value)


def test_read_bytes_gz_and_raw(tmp_path):
    payload = idx_bytes(np.arange(100, dtype=np.uint8).reshape(4, 25), 0x08)
    raw, gz = tmp_path / "x-idx2-ubyte", tmp_path / "x-idx2-ubyte.gz"
    raw.write_bytes(payload)
    with gzip.open(gz, "wb") as f:
        f.write(payload)
    assert gz.read_bytes() != payload  # really compressed
    assert read_bytes(raw) == payload
    assert read_bytes(gz) == payload
    np.testing.assert_array_equal(parse_idx(read_bytes(gz)), np.arange(100, dtype=np.uint8).reshape(4, 25))


def test_read_bytes_errors(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_bytes(tmp_path / "missing-idx1-ubyte")
    not_gz = tmp_path / "fake.gz"
    not_gz.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError):
        read_bytes(not_gz)
    good = gzip.compress(b"\x00" * 5000)
    short = tmp_path / "short.gz"
    short.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError):
        read_bytes(short)


# =========================================================================== Fashion-MNIST


def read_raw(stem: str) -> np.ndarray:
    """Independent reader for the installed files (fixed IDX header sizes)."""
    with gzip.open(FMNIST_DIR / f"{stem}.gz", "rb") as f:
        data = f.read()
    if "images" in stem:
        n = int.from_bytes(data[4:8], "big")
        return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, 28, 28)
    return np.frombuffer(data, dtype=np.uint8, offset=8)


@pytest.fixture(scope="module")
def raw():
    """The raw arrays, and a pixel-hash -> index map for each split (Fashion-MNIST's train split
    has no duplicate images, which the fixture asserts so the lookups are unambiguous)."""
    tr_x, tr_y = read_raw(STEMS[0]), read_raw(STEMS[1])
    te_x, te_y = read_raw(STEMS[2]), read_raw(STEMS[3])
    tr_index = {h: i for i, h in enumerate(row_hashes(tr_x))}
    assert len(tr_index) == len(tr_x)
    te_index = {}
    for i, h in enumerate(row_hashes(te_x)):
        te_index.setdefault(h, []).append(i)
    return {"train_x": tr_x, "train_y": tr_y, "test_x": te_x, "test_y": te_y, "train_index": tr_index, "test_index": te_index}


@pytest.fixture(scope="module")
def load():
    """FashionMNIST.load with a per-module cache, keyed by the config overrides."""
    cache = {}

    def get(**overrides):
        key = tuple(sorted((k, str(v)) for k, v in overrides.items()))
        if key not in cache:
            cache[key] = FashionMNIST.load(fm_cfg(**overrides))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def default_data(load):
    """The default split (normal_class=0), loaded before any test patches the default locations."""
    return load()


def train_indices(images, raw) -> np.ndarray:
    """Where each image sits in the raw train split."""
    return np.array([raw["train_index"][h] for h in row_hashes(images)])


@needs_fmnist
def test_default_split_counts(load):
    d = load()
    assert d.counts() == {
        "train_normal": 5400,
        "train_anomalous": 0,
        "val_normal": 600,
        "val_anomalous": 600,
        "test_normal": 1000,
        "test_anomalous": 9000,
    }
    assert d.train.masks is None and d.val.masks is None and d.test.masks is None
    assert d.info["normal_classes"] == ["T-shirt/top"]


@needs_fmnist
def test_images_are_uint8_n_1_28_28(load):
    d = load()
    for split in (d.train, d.val, d.test):
        assert split.images.dtype == torch.uint8
        assert split.images.ndim == 4 and tuple(split.images.shape[1:]) == (1, 28, 28)
        assert split.labels.dtype == torch.int64
        assert set(split.labels.unique().tolist()) <= {0, 1}
    assert d.shape == (1, 28, 28)
    assert FashionMNIST.shape(fm_cfg()) == (1, 28, 28)


@needs_fmnist
def test_train_and_val_come_from_the_right_classes(load, raw):
    d = load()
    ys = raw["train_y"]
    tr = train_indices(d.train.images, raw)
    va = train_indices(d.val.images, raw)
    assert (ys[tr] == 0).all()
    val_labels = d.val.labels.numpy()
    # val normals are class 0, val anomalies come only from classes 1-9, labels agree
    assert (ys[va[val_labels == 0]] == 0).all()
    assert (ys[va[val_labels == 1]] != 0).all()
    np.testing.assert_array_equal(val_labels, (ys[va] != 0).astype(np.int64))
    # anomalies are drawn from every anomalous class, not just one
    assert set(ys[va[val_labels == 1]].tolist()) == set(range(1, 10))
    # no image twice, none both in train and val, and the normals cover class 0 exactly
    assert len(set(tr)) == len(tr) and len(set(va)) == len(va)
    assert not set(tr) & set(va)
    assert set(tr) | set(va[val_labels == 0]) == set(np.nonzero(ys == 0)[0])


@needs_fmnist
def test_no_image_in_both_train_and_val_by_pixels(load):
    d = load(normal_class=[0, 6])
    assert not set(row_hashes(d.train.images)) & set(row_hashes(d.val.images))


@needs_fmnist
def test_test_split_is_the_full_test_set(load, raw):
    d = load()
    np.testing.assert_array_equal(d.test.images[:, 0].numpy(), raw["test_x"])
    np.testing.assert_array_equal(d.test.labels.numpy(), (raw["test_y"] != 0).astype(np.int64))
    np.testing.assert_array_equal(d.info["test_classes"].numpy(), raw["test_y"])


@needs_fmnist
def test_two_normal_classes(load, raw):
    d = load(normal_class=[0, 6])
    assert len(d.train) == 10800
    c = d.counts()
    assert (c["val_normal"], c["val_anomalous"]) == (1200, 1200)
    assert (c["test_normal"], c["test_anomalous"]) == (2000, 8000)
    ys = raw["train_y"]
    assert set(ys[train_indices(d.train.images, raw)].tolist()) == {0, 6}
    va = train_indices(d.val.images, raw)
    anomal = ys[va[d.val.labels.numpy() == 1]]
    assert not set(anomal.tolist()) & {0, 6}
    assert d.info["normal_classes"] == ["T-shirt/top", "Shirt"]


@needs_fmnist
def test_val_anomaly_ratio_and_fraction(load):
    d = load(val_fraction=0.2, val_anomaly_ratio=0.5)
    assert d.counts()["train_normal"] == 4800
    assert (d.counts()["val_normal"], d.counts()["val_anomalous"]) == (1200, 600)


@needs_fmnist
def test_limit_train_caps_train_only(load, raw):
    full, small = load(), load(limit_train=500)
    assert len(small.train) == 500
    assert small.counts()["val_normal"] == 600 and small.counts()["val_anomalous"] == 600
    # the capped train set is a subset of the full one, and val does not change
    assert set(row_hashes(small.train.images)) <= set(row_hashes(full.train.images))
    assert torch.equal(small.val.images, full.val.images)
    assert len(load(limit_train=100000).train) == 5400  # a cap above the size changes nothing


@needs_fmnist
def test_limit_test_stratified(load, raw):
    d = load(limit_test=1000)
    assert len(d.test) == 1000
    classes = d.info["test_classes"].numpy()
    assert np.bincount(classes, minlength=10).tolist() == [100] * 10
    assert d.counts()["test_normal"] == 100 and d.counts()["test_anomalous"] == 900
    np.testing.assert_array_equal(d.test.labels.numpy(), (classes != 0).astype(np.int64))
    # every kept image is a real test image of the class it claims
    for h, c in zip(row_hashes(d.test.images), classes):
        assert c in raw["test_y"][raw["test_index"][h]]
    assert len(set(row_hashes(d.test.images))) == 1000
    # train / val untouched
    assert torch.equal(d.train.images, load().train.images)


@needs_fmnist
def test_limit_test_is_a_cap_when_not_divisible(load):
    d = load(limit_test=155)
    assert len(d.test) <= 155
    assert len(d.test) == 155


@needs_fmnist
def test_split_is_deterministic_per_seed(load):
    a = load()
    b = FashionMNIST.load(fm_cfg())  # a fresh load, not the cached object
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.val.labels, b.val.labels)
    c = load(split_seed=1)
    assert len(c.train) == len(a.train)
    assert set(row_hashes(c.val.images)) != set(row_hashes(a.val.images))
    assert set(row_hashes(c.train.images)) != set(row_hashes(a.train.images))
    assert torch.equal(c.test.images, a.test.images)  # the test split is fixed


# --------------------------------------------------------------------------- location


@pytest.fixture(scope="module")
def decompressed():
    out = {}
    for stem in STEMS:
        with gzip.open(FMNIST_DIR / f"{stem}.gz", "rb") as f:
            out[stem] = f.read()
    return out


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No default location holds the files: SYSTEM_ROOT points nowhere, cwd has no ./data."""
    monkeypatch.setattr(fm, "SYSTEM_ROOT", str(tmp_path / "no-such-system-root"))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


@needs_fmnist
@pytest.mark.parametrize("compressed", [False, True])
def test_torchvision_layout_is_found(isolated, decompressed, default_data, compressed):
    raw_dir = isolated / "tv" / "FashionMNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for stem in STEMS:
        if compressed:
            (raw_dir / f"{stem}.gz").write_bytes((FMNIST_DIR / f"{stem}.gz").read_bytes())
        else:
            (raw_dir / stem).write_bytes(decompressed[stem])
    d = FashionMNIST.load(fm_cfg(root=str(isolated / "tv")))
    assert Path(d.info["root"]) == raw_dir
    assert torch.equal(d.train.images, default_data.train.images)
    assert torch.equal(d.val.labels, default_data.val.labels)


@needs_fmnist
def test_flat_root_and_default_locations(isolated, monkeypatch):
    flat = isolated / "flat"
    flat.mkdir()
    for stem in STEMS:
        os.symlink(FMNIST_DIR / f"{stem}.gz", flat / f"{stem}.gz")
    cfg = fm_cfg(root=str(flat), limit_train=10, limit_test=10)
    FashionMNIST.check(cfg)
    assert Path(FashionMNIST.load(cfg).info["root"]) == flat
    # root null: ./data/fashion-mnist relative to the working directory ...
    (Path.cwd() / "data").mkdir()
    os.symlink(flat, Path.cwd() / "data" / "fashion-mnist")
    d = FashionMNIST.load(fm_cfg(limit_train=10, limit_test=10))
    assert Path(d.info["root"]) == (Path.cwd() / "data" / "fashion-mnist").resolve()
    # ... then the system location
    os.unlink(Path.cwd() / "data" / "fashion-mnist")
    monkeypatch.setattr(fm, "SYSTEM_ROOT", str(flat))
    assert Path(FashionMNIST.load(fm_cfg(limit_train=10, limit_test=10)).info["root"]) == flat


def corrupt_copy(tmp: Path, decompressed: dict, how: str) -> Path:
    """A folder with three good files (links to the installed .gz) and one damaged one."""
    d = tmp / f"corrupt-{how}"
    d.mkdir()
    victim = "train-labels-idx1-ubyte" if "labels" in how else "train-images-idx3-ubyte"
    for stem in STEMS:
        if stem != victim:
            os.symlink(FMNIST_DIR / f"{stem}.gz", d / f"{stem}.gz")
    if how.startswith("raw"):
        data = bytearray(decompressed[victim])
        if "flip" in how:
            for i in range(5000, 5010):  # inside the data, so the IDX header stays valid
                data[i] ^= 0xFF
        else:
            data = data[: len(data) - 784]
        (d / victim).write_bytes(bytes(data))
    else:
        data = bytearray((FMNIST_DIR / f"{victim}.gz").read_bytes())
        if "flip" in how:
            for i in range(100, 120):
                data[i] ^= 0xFF
        else:
            data = data[: len(data) // 2]
        (d / f"{victim}.gz").write_bytes(bytes(data))
    return d


@needs_fmnist
@pytest.mark.parametrize("how", ["raw-labels-flip", "raw-images-truncate", "raw-labels-truncate", "gz-labels-flip", "gz-labels-truncate"])
def test_corrupt_copy_is_reported(isolated, decompressed, how):
    d = corrupt_copy(isolated, decompressed, how)
    with pytest.raises(DataError) as e:
        FashionMNIST.load(fm_cfg(root=str(d)))
    msg = str(e.value)
    assert "corrupt" in msg
    assert "dataset-fashion-mnist" in msg


def test_missing_files(isolated):
    empty = isolated / "empty"
    empty.mkdir()
    (empty / "train-images-idx3-ubyte.gz").write_bytes(b"")  # only some of the four files
    with pytest.raises(DataError) as e:
        FashionMNIST.load(fm_cfg(root=str(empty)))
    msg = str(e.value)
    assert "dataset-fashion-mnist" in msg
    assert "dataset.root" in msg
    assert str(empty) in msg  # says where it looked


# --------------------------------------------------------------------------- config check


@pytest.mark.parametrize("value", [12, -1, [], list(range(10)), "a", [0, 10], True, 1.0])
def test_check_rejects_bad_normal_class(value):
    with pytest.raises(ConfigError) as e:
        FashionMNIST.check(fm_cfg(normal_class=value))
    assert e.value.key == "dataset.normal_class"


@pytest.mark.parametrize("value", [0, 9, [0, 6], [3, 3]])
def test_check_accepts_good_normal_class(value):
    FashionMNIST.check(fm_cfg(normal_class=value))
    assert fm.normal_classes(fm_cfg(normal_class=value)) == sorted(set(value if isinstance(value, list) else [value]))


@pytest.mark.parametrize(
    "key,value",
    [("val_fraction", 0), ("val_fraction", 1.0), ("val_anomaly_ratio", 0), ("limit_train", 0), ("limit_test", 5), ("limit_test", 10.5)],
)
def test_check_rejects_bad_options(key, value):
    with pytest.raises(ConfigError) as e:
        FashionMNIST.check(fm_cfg(**{key: value}))
    assert e.value.key == f"dataset.{key}"


def test_check_rejects_missing_root_dir(tmp_path):
    with pytest.raises(ConfigError) as e:
        FashionMNIST.check(fm_cfg(root=str(tmp_path / "nope")))
    assert e.value.key == "dataset.root"
    FashionMNIST.check(fm_cfg(root=str(tmp_path)))  # an existing directory is fine


# =========================================================================== synthetic


@pytest.fixture(scope="module")
def syn():
    return Synthetic.load(syn_cfg())


def test_synthetic_shapes_and_counts(syn):
    assert tuple(syn.train.images.shape) == (256, 1, 32, 32)
    assert tuple(syn.val.images.shape) == (64, 1, 32, 32)
    assert tuple(syn.test.images.shape) == (128, 1, 32, 32)
    assert all(s.images.dtype == torch.uint8 for s in (syn.train, syn.val, syn.test))
    assert syn.counts() == {
        "train_normal": 256,
        "train_anomalous": 0,
        "val_normal": 32,
        "val_anomalous": 32,
        "test_normal": 64,
        "test_anomalous": 64,
    }
    assert Synthetic.shape(syn_cfg()) == (1, 32, 32) == syn.shape


def test_synthetic_odd_sizes_and_limit_train():
    d = Synthetic.load(syn_cfg(image_size=16, n_train=10, n_val=5, n_test=7, limit_train=4))
    assert len(d.train) == 4
    assert (d.counts()["val_normal"], d.counts()["val_anomalous"]) == (3, 2)
    assert (d.counts()["test_normal"], d.counts()["test_anomalous"]) == (4, 3)
    assert tuple(d.test.images.shape[1:]) == (1, 16, 16)


def test_synthetic_masks(syn):
    assert syn.train.masks is None
    for split in (syn.val, syn.test):
        assert split.masks is not None
        assert split.masks.dtype == torch.bool
        assert tuple(split.masks.shape) == (len(split), 1, 32, 32)
        nonempty = split.masks.flatten(1).any(1)
        assert torch.equal(nonempty, split.labels.bool())
        # defects are local: no mask covers most of the image
        assert split.masks.flatten(1).float().mean(1).max() < 0.5


@pytest.mark.parametrize(
    "size", [4, 6, 8, 16]
)
def test_synthetic_every_accepted_size_gives_real_defects(size):
    cfg0 = syn_cfg(image_size=size, n_train=1, n_val=16, n_test=16)
    try:
        Synthetic.check(cfg0)
    except ConfigError:
        pytest.skip(f"image_size={size} is rejected by the config check")
    for seed in range(25):
        d = Synthetic.load(syn_cfg(image_size=size, n_train=1, n_val=16, n_test=16, split_seed=seed))
        for split in (d.val, d.test):
            assert torch.equal(split.masks.flatten(1).any(1), split.labels.bool()), f"seed {seed}"


def test_synthetic_deterministic_per_seed(syn):
    again = Synthetic.load(syn_cfg())
    for a, b in ((syn.train, again.train), (syn.val, again.val), (syn.test, again.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(syn.test.masks, again.test.masks)
    other = Synthetic.load(syn_cfg(split_seed=1))
    assert not torch.equal(other.train.images, syn.train.images)
    assert not torch.equal(other.test.masks, syn.test.masks)


def test_synthetic_three_channels(syn):
    d = Synthetic.load(syn_cfg(channels=3))
    assert tuple(d.train.images.shape) == (256, 3, 32, 32)
    assert tuple(d.val.masks.shape) == (64, 1, 32, 32)
    for split in (d.train, d.val, d.test):
        assert torch.equal(split.images[:, 0], split.images[:, 1]) and torch.equal(split.images[:, 0], split.images[:, 2])
    assert torch.equal(d.test.images[:, :1], syn.test.images)  # same seed, same content
    assert Synthetic.shape(syn_cfg(channels=3)) == (3, 32, 32)


def test_synthetic_normals_are_varied_textures(syn):
    x = syn.train.images.float() / 255
    assert x.std() > 0.05
    assert (x.flatten(1).std(1) > 0.05).all()  # no flat image
    assert not torch.equal(syn.train.images[0], syn.train.images[1])


def test_inject_defect_changes_pixels_inside_the_mask_only():
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        clean = gratings(1, 32, g)[0]
        out, mask = inject_defect(clean, g)
        assert mask.dtype == torch.bool and mask.shape == clean.shape and mask.any()
        changed = (out - clean).abs() > 1e-3
        assert not (changed & ~mask).any()
        assert changed[mask].float().mean() > 0.5


def test_synthetic_anomalies_differ_from_clean_texture_mostly_inside_mask(syn):
    # rebuild the defect-free val textures from the val split's own generator
    clean = (gratings(64, 32, split_generator(0, "val")) * 255).round().to(torch.uint8)
    imgs, masks, labels = syn.val.images[:, 0], syn.val.masks[:, 0], syn.val.labels
    diff = imgs != clean
    assert not diff[labels == 0].any()  # normals are the clean texture
    for d, m in zip(diff[labels == 1], masks[labels == 1]):
        inside = (d & m).sum().item()
        outside = (d & ~m).sum().item()
        assert inside >= 0.5 * m.sum().item()
        assert outside <= 0.1 * inside


def test_synthetic_val_and_test_are_fixed_by_split_seed_alone(syn):
    """limit_train and n_train change the train split only; val and test stay the same images."""
    variants = [Synthetic.load(syn_cfg(**o)) for o in ({"limit_train": 10}, {"limit_train": 100}, {"n_train": 7},
                                                       {"n_train": 1000, "limit_train": None})]
    for d in variants:
        for a, b in ((d.val, syn.val), (d.test, syn.test)):
            assert torch.equal(a.images, b.images)
            assert torch.equal(a.labels, b.labels)
            assert torch.equal(a.masks, b.masks)
    assert [len(d.train) for d in variants] == [10, 100, 7, 1000]
    assert torch.equal(variants[-1].train.images[:256], syn.train.images)  # a larger n_train extends the split


@pytest.mark.parametrize("k", [1, 10, TRAIN_CHUNK, TRAIN_CHUNK + 1, 100])
def test_synthetic_limit_train_takes_the_first_images_of_the_full_split(syn, k):
    limited = Synthetic.load(syn_cfg(limit_train=k))
    assert torch.equal(limited.train.images, syn.train.images[:k])
    assert torch.equal(limited.train.labels, syn.train.labels[:k])
    assert torch.equal(Synthetic.load(syn_cfg(n_train=k)).train.images, syn.train.images[:k])


def test_synthetic_split_seed_changes_every_split_and_splits_are_distinct(syn):
    other = Synthetic.load(syn_cfg(split_seed=1))
    for a, b in ((syn.train, other.train), (syn.val, other.val), (syn.test, other.test)):
        assert not torch.equal(a.images, b.images)
    assert not torch.equal(syn.val.masks, other.val.masks) and not torch.equal(syn.test.masks, other.test.masks)
    # the splits are not copies of each other (distinct generators, not one stream restarted)
    assert not torch.equal(syn.val.images[:32], syn.test.images[:32])
    assert not torch.equal(syn.train.images[:32], syn.val.images[:32])
    assert not torch.equal(syn.train.images[:TRAIN_CHUNK], syn.train.images[TRAIN_CHUNK : 2 * TRAIN_CHUNK])


@pytest.mark.parametrize(
    "key,value",
    [("image_size", 2), ("image_size", -8), ("image_size", 32.0), ("channels", 2), ("n_train", 0), ("n_val", 1), ("n_test", 1), ("limit_train", 0)],
)
def test_synthetic_check(key, value):
    with pytest.raises(ConfigError) as e:
        Synthetic.check(syn_cfg(**{key: value}))
    assert e.value.key == f"dataset.{key}"
    Synthetic.check(syn_cfg())


# =========================================================================== IndexBatches


def epoch(batches) -> list[torch.Tensor]:
    return [b.clone() for b in batches]


def test_index_batches_shuffle_covers_each_index_once():
    data = torch.arange(103) * 10
    ib = IndexBatches(data, batch_size=10, shuffle=True, seed=0)
    assert len(ib) == 11
    orders = []
    for _ in range(3):
        bs = epoch(ib)
        assert len(bs) == len(ib)
        assert [len(b) for b in bs] == [10] * 10 + [3]
        flat = torch.cat(bs)
        assert torch.equal(flat.sort().values, data)
        orders.append(flat)
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    assert not torch.equal(orders[0], data)  # actually shuffled
    # a second loader with the same seed replays the same epochs; another seed does not
    same = IndexBatches(data, batch_size=10, shuffle=True, seed=0)
    for o in orders:
        assert torch.equal(torch.cat(epoch(same)), o)
    other = IndexBatches(data, batch_size=10, shuffle=True, seed=1)
    assert not torch.equal(torch.cat(epoch(other)), orders[0])


def test_index_batches_len():
    x = torch.zeros(100, 3)
    assert len(IndexBatches(x, batch_size=10)) == 10
    assert len(IndexBatches(x, batch_size=7)) == 15
    assert len(IndexBatches(x, batch_size=100)) == 1
    assert len(IndexBatches(x, batch_size=1000)) == 1
    assert len(list(IndexBatches(x, batch_size=7))) == 15


def test_index_batches_in_order_and_aligned_tensors():
    x = torch.arange(25)
    y = torch.arange(25) * -1
    plain = list(IndexBatches(x, batch_size=8))
    assert torch.equal(torch.cat(plain), x)
    for bx, by in IndexBatches(x, y, batch_size=8, shuffle=True, seed=5):
        assert torch.equal(by, -bx)  # rows stay paired across tensors


def test_training_batches_never_end_in_a_single_image():
    """BatchNorm cannot train on one sample: a shuffled last batch of 1 is dropped (evaluation keeps all)."""
    x = torch.arange(257)
    train = IndexBatches(x, batch_size=32, shuffle=True, seed=0)
    sizes = [len(b) for b in train]
    assert sizes[-1] == 32 and sum(sizes) == 256 and len(train) == len(sizes) == 8
    seen = set(torch.cat(list(train)).tolist()) | set(torch.cat(list(train)).tolist())
    assert len(seen) > 256  # a different image is left out each epoch
    full = IndexBatches(x, batch_size=32)
    assert sum(len(b) for b in full) == 257 and len(full) == 9
