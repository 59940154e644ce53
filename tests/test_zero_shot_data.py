"""dataset=visa, btad and mpdd in their real layouts (VisA's split csv and class-id masks, BTAD's
ok/ko folders and .bmp files, MPDD's MVTec layout), written here with Pillow; labelled pools of
test images; the zero-shot protocol (dataset.train_from): trained on every test image of another
dataset, tested on every category of the target, whose training images are never read; and each
refusal in one line naming its key. Expectations are computed from the files the tests write."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from freqexp.data import DATASETS, build_dataset, dataset_shape
from freqexp.data.categories import LAYOUTS, labelled_pool
from freqexp.errors import ConfigError, DataError
from tests.conftest import compose_cfg

BOX = (6, 14, 9, 21)  # rows 6-13, columns 9-20: the defect in every test image here


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def picture(rng, size, rgb=True) -> np.ndarray:
    shape = (*size, 3) if rgb else size
    return rng.integers(30, 90, size=shape, dtype=np.uint8)


def with_defect(x: np.ndarray) -> np.ndarray:
    top, bottom, left, right = BOX
    out = x.copy()
    out[top:bottom, left:right] = 250
    return out


def gray_mask(size) -> np.ndarray:
    """A 0/255 mask of BOX with a faint (100, below 127) rim: the rim is not defect."""
    top, bottom, left, right = BOX
    m = np.zeros(size, dtype=np.uint8)
    m[top - 1:bottom + 1, left - 1:right + 1] = 100
    m[top:bottom, left:right] = 255
    return m


def id_mask(size) -> np.ndarray:
    """VisA's masks: class ids on 0 (here 1 and 2, left and right half of BOX)."""
    top, bottom, left, right = BOX
    m = np.zeros(size, dtype=np.uint8)
    mid = (left + right) // 2
    m[top:bottom, left:mid] = 1
    m[top:bottom, mid:right] = 2
    return m


# -- fixture datasets in the real layouts ------------------------------------------------------

def make_visa(root: Path, objects=("candle", "pcb1"), n_train=8, n_normal=3, n_anomaly=4, size=(30, 40), seed=0) -> Path:
    """root/split_csv/1cls.csv and root/<object>/Data/{Images,Masks}/..., as VisA ships them."""
    rng = np.random.default_rng(seed)
    rows = []
    for obj in objects:
        images, masks = root / obj / "Data" / "Images", root / obj / "Data" / "Masks"
        for i in range(n_train + n_normal):  # VisA numbers normals in one folder; the csv splits them
            save(images / "Normal" / f"{i:04d}.JPG", picture(rng, size))
            rows.append([obj, "train" if i < n_train else "test", "normal", f"{obj}/Data/Images/Normal/{i:04d}.JPG", ""])
        for i in range(n_anomaly):
            save(images / "Anomaly" / f"{i:03d}.JPG", with_defect(picture(rng, size)))
            save(masks / "Anomaly" / f"{i:03d}.png", id_mask(size))
            rows.append([obj, "test", "anomaly", f"{obj}/Data/Images/Anomaly/{i:03d}.JPG", f"{obj}/Data/Masks/Anomaly/{i:03d}.png"])
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root


BTAD_FILES = {"01": ("bmp", "png"), "02": ("png", "bmp")}  # category: (image, mask) extension


def make_btad(root: Path, categories=("01", "02"), n_train=6, n_ok=2, n_ko=3, size=(32, 32), seed=1) -> Path:
    """root/<cat>/train/ok, test/ok, test/ko, ground_truth/ko/<stem>.<ext> (no _mask suffix)."""
    rng = np.random.default_rng(seed)
    for cat in categories:
        image_ext, mask_ext = BTAD_FILES[cat]
        for i in range(n_train):
            save(root / cat / "train" / "ok" / f"{i:04d}.{image_ext}", picture(rng, size))
        for i in range(n_ok):
            save(root / cat / "test" / "ok" / f"{i:04d}.{image_ext}", picture(rng, size))
        for i in range(n_ko):
            save(root / cat / "test" / "ko" / f"{i:04d}.{image_ext}", with_defect(picture(rng, size)))
            save(root / cat / "ground_truth" / "ko" / f"{i:04d}.{mask_ext}", gray_mask(size))
    return root


MPDD_DEFECTS = {"bracket_black": {"hole": 2, "scratches": 3}, "connector": {"parts_mismatch": 2}}


def make_mpdd(root: Path, categories=("bracket_black", "connector"), n_train=6, n_good=3, size=(32, 32), rgb=True, seed=2) -> Path:
    """MVTec's layout: root/<cat>/train/good, test/good, test/<defect>, ground_truth/<defect>/<name>_mask.png."""
    rng = np.random.default_rng(seed)
    for cat in categories:
        for i in range(n_train):
            save(root / cat / "train" / "good" / f"{i:03d}.png", picture(rng, size, rgb))
        for i in range(n_good):
            save(root / cat / "test" / "good" / f"{i:03d}.png", picture(rng, size, rgb))
        for defect, n in MPDD_DEFECTS[cat].items():
            for i in range(n):
                save(root / cat / "test" / defect / f"{i:03d}.png", with_defect(picture(rng, size, rgb)))
                save(root / cat / "ground_truth" / defect / f"{i:03d}_mask.png", gray_mask(size))
    return root


MAKERS = {"visa": make_visa, "btad": make_btad, "mpdd": make_mpdd}
FIRST = {"visa": "candle", "btad": "01", "mpdd": "bracket_black"}


def config_overrides(name: str, tmp_path: Path) -> list[str]:
    """What `dataset=<name>` needs to compose and validate: a fixture root and a category."""
    root = MAKERS[name](tmp_path / name)
    return [f"dataset={name}", f"dataset.root={root}", f"dataset.category={FIRST[name]}", "dataset.image_size=32"]


def cfg_of(name, root, *extra):
    return compose_cfg([f"dataset={name}", f"dataset.root={root}", *extra]).dataset


# -- what the files hold, read back independently ------------------------------------------------

def expected_rows(name: str, root: Path, categories) -> list[tuple[str, str, int, Path, object]]:
    """(category, defect, label, image, mask or None) of every test image, in the pool's order:
    categories as given, then test folder (or VisA label) by name, then file name."""
    out = []
    for cat in categories:
        if name == "visa":
            with open(root / "split_csv" / "1cls.csv", newline="") as f:
                rows = [r for r in csv.DictReader(f) if r["object"] == cat and r["split"] == "test"]
            for label in ("anomaly", "normal"):
                for r in sorted((r for r in rows if r["label"] == label), key=lambda r: r["image"]):
                    out.append((cat, label, int(label == "anomaly"), root / r["image"], root / r["mask"] if r["mask"] else None))
            continue
        good = "ok" if name == "btad" else "good"
        for kind in sorted(d.name for d in (root / cat / "test").iterdir()):
            for image in sorted((root / cat / "test" / kind).iterdir()):
                mask = None
                if kind != good:
                    mask = next((root / cat / "ground_truth" / kind).glob(image.stem + ("" if name == "btad" else "_mask") + ".*"))
                out.append((cat, kind, int(kind != good), image, mask))
    return out


def pixels(path: Path, channels=3) -> np.ndarray:
    image = np.asarray(Image.open(path).convert("RGB" if channels == 3 else "L"))
    return image.transpose(2, 0, 1) if channels == 3 else image[None]


def defect(path, name) -> np.ndarray:
    """The mask file as booleans: VisA ids > 0, else > 127."""
    raw = np.asarray(Image.open(path))
    return raw > 0 if name == "visa" else raw > 127


def test_the_mask_fixtures_test_both_thresholds():
    m, ids = gray_mask((30, 40)), id_mask((30, 40))
    top, bottom, left, right = BOX
    assert (m > 0).sum() > (m > 127).sum() == (bottom - top) * (right - left)  # the faint rim is not defect
    assert ids.max() == 2 and (ids > 127).sum() == 0 and (ids > 0).sum() == (bottom - top) * (right - left)
    assert LAYOUTS["visa"].mask_threshold == 0 and {LAYOUTS[n].mask_threshold for n in ("mvtec", "btad", "mpdd")} == {127}


# -- one category per run, as for mvtec ----------------------------------------------------------

@pytest.mark.parametrize("name", ["visa", "btad", "mpdd"])
def test_one_category_loads_like_mvtec(name, tmp_path):
    root = MAKERS[name](tmp_path / name)
    category = FIRST[name]
    native = (30, 40) if name == "visa" else (32, 32)
    d = build_dataset(cfg_of(name, root, f"dataset.category={category}", f"dataset.image_size=[{native[0]},{native[1]}]"))
    rows = expected_rows(name, root, [category])
    n_train = {"visa": 8, "btad": 6, "mpdd": 6}[name]
    n_val = max(1, round(0.1 * n_train))
    assert (len(d.train), len(d.val), d.val.n_anomalous) == (n_train - n_val, n_val, 0)  # pseudo: the run adds val anomalies
    assert d.train.n_anomalous == 0 and d.train.images.shape[1:] == (3, *native)
    assert len(d.test) == len(rows) and d.test.n_anomalous == sum(r[2] for r in rows)
    train_files = set(d.info["files"]["train"]) | set(d.info["files"]["val"])
    assert not train_files & set(d.info["files"]["test"])
    by_file = {Path(f): i for i, f in enumerate(d.info["files"]["test"])}
    for cat, kind, label, image, mask in rows:
        i = by_file[image]
        assert int(d.test.labels[i]) == label and d.info["test_defects"][i] == kind
        assert np.array_equal(d.test.images[i].numpy(), pixels(image))
        want = defect(mask, name) if mask is not None else np.zeros(native, dtype=bool)
        assert np.array_equal(d.test.masks[i, 0].numpy(), want)
    for i, f in enumerate(d.info["files"]["train"]):
        assert np.array_equal(d.train.images[i].numpy(), pixels(Path(f)))
    good = {"visa": "normal", "btad": "ok", "mpdd": "good"}[name]
    assert d.info["normal_classes"] == [f"{category} ({good})"]
    assert dataset_shape(cfg_of(name, root, f"dataset.category={category}", "dataset.image_size=24")) == (3, 24, 24)


def test_visa_id_masks_are_defect_where_nonzero_even_one(tmp_path):
    root = make_visa(tmp_path / "visa", objects=("candle",))
    d = build_dataset(cfg_of("visa", root, "dataset.category=candle", "dataset.image_size=[30,40]"))
    top, bottom, left, right = BOX
    anomalous = d.test.labels == 1
    assert int(anomalous.sum()) == 4
    # every pixel of id 1 and of id 2 is defect; a threshold of 127 would have found none
    assert int(d.test.masks[anomalous].sum()) == 4 * (bottom - top) * (right - left)
    assert int(d.test.masks[~anomalous].sum()) == 0


def test_btad_category_may_be_a_number_and_val_anomalies_test_moves_ko_images(tmp_path):
    root = make_btad(tmp_path / "btad")
    d = build_dataset(cfg_of("btad", root, "dataset.category=2", "dataset.image_size=32", "dataset.val_anomalies=test"))
    assert d.info["category"] == "02" and all("/02/" in f for f in d.info["files"]["test"])
    # test/ko 3 -> round(0.2 * 3) = 1 moved to val; test/ok 2 -> 1 moved (never a folder's last image)
    assert d.info["counts"]["val"] == {"train/ok": 1, "ko": 1, "ok": 1}
    assert d.info["counts"]["test"] == {"ko": 2, "ok": 1}
    assert d.val.masks is not None and int(d.val.masks[d.val.labels == 1].sum()) > 0


@pytest.mark.parametrize("name", ["visa", "btad", "mpdd"])
def test_all_is_refused_without_train_from_with_the_sweep_command(name, tmp_path):
    root = MAKERS[name](tmp_path / name)
    cfg = cfg_of(name, root, "dataset.category=all")
    with pytest.raises(ConfigError, match=rf"dataset.category: one run reads one category; .*--multirun dataset={name} "):
        DATASETS.get(name).check(cfg)
    cats = ",".join(sorted(BTAD_FILES) if name == "btad" else sorted(MPDD_DEFECTS) if name == "mpdd" else ["candle", "pcb1"])
    with pytest.raises(ConfigError, match=f"dataset.category={cats}"):
        build_dataset(cfg)


# -- VisA's csv: bad rows and missing files are named -------------------------------------------

def test_visa_missing_csv_and_missing_files_name_the_file(tmp_path):
    root = make_visa(tmp_path / "visa")
    (root / "candle" / "Data" / "Images" / "Anomaly" / "002.JPG").unlink()
    with pytest.raises(DataError, match=r"candle/Data/Images/Anomaly/002\.JPG: not found .*1cls\.csv, line \d+"):
        build_dataset(cfg_of("visa", root, "dataset.category=candle"))
    build_dataset(cfg_of("visa", root, "dataset.category=pcb1", "dataset.image_size=32"))  # the other object is whole
    (root / "pcb1" / "Data" / "Masks" / "Anomaly" / "001.png").unlink()
    with pytest.raises(DataError, match=r"pcb1/Data/Masks/Anomaly/001\.png: not found \(a mask named by"):
        build_dataset(cfg_of("visa", root, "dataset.category=pcb1"))
    (root / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DataError, match=r"split_csv/1cls\.csv: not found"):
        build_dataset(cfg_of("visa", root, "dataset.category=candle"))


def test_visa_csv_values_are_checked(tmp_path):
    root = make_visa(tmp_path / "visa", objects=("candle",))
    path = root / "split_csv" / "1cls.csv"
    text = path.read_text()
    path.write_text(text.replace("candle,test,anomaly", "candle,test,defect", 1))
    with pytest.raises(DataError, match=r"1cls\.csv, line \d+: label must be normal or anomaly; got 'defect'"):
        build_dataset(cfg_of("visa", root, "dataset.category=candle"))
    path.write_text(text.replace("object,split,label,image,mask", "object,split,label,image"))
    with pytest.raises(DataError, match=r"1cls\.csv: no column mask"):
        build_dataset(cfg_of("visa", root, "dataset.category=candle"))


# -- labelled pools ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["visa", "btad", "mpdd"])
def test_labelled_pool_holds_every_test_image_with_labels_masks_and_categories(name, tmp_path):
    root = MAKERS[name](tmp_path / name)
    categories = sorted(LAYOUTS[name].list_categories(root))
    native = (30, 40) if name == "visa" else (32, 32)
    cfg = cfg_of(name, root, f"dataset.image_size=[{native[0]},{native[1]}]")
    split, info = labelled_pool(name, root, categories, cfg)
    rows = expected_rows(name, root, categories)
    assert [Path(f) for f in info["files"]] == [r[3] for r in rows]
    assert info["categories"] == [r[0] for r in rows] and info["defects"] == [r[1] for r in rows]
    assert split.labels.tolist() == [r[2] for r in rows]
    assert split.images.shape == (len(rows), 3, *native) and split.masks.shape == (len(rows), 1, *native)
    for i, (_, _, label, image, mask) in enumerate(rows):
        assert np.array_equal(split.images[i].numpy(), pixels(image))
        want = defect(mask, name) if label else np.zeros(native, dtype=bool)
        assert np.array_equal(split.masks[i, 0].numpy(), want)
    assert set(info["categories"]) == set(categories) and len(categories) == 2


def test_labelled_pool_resizes_images_bilinear_and_masks_nearest(tmp_path):
    root = make_visa(tmp_path / "visa", objects=("candle",))
    split, info = labelled_pool("visa", root, ["candle"], cfg_of("visa", root, "dataset.image_size=20"))
    for i, f in enumerate(info["files"]):
        with Image.open(f) as im:
            want = np.asarray(im.convert("RGB").resize((20, 20), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
        assert np.array_equal(split.images[i].numpy(), want)
    masks = expected_rows("visa", root, ["candle"])
    for i, (_, _, label, _, mask) in enumerate(masks):
        if label:
            ref = Image.fromarray((np.asarray(Image.open(mask)) > 0).astype(np.uint8) * 255).resize((20, 20), Image.Resampling.NEAREST)
            assert np.array_equal(split.masks[i, 0].numpy(), np.asarray(ref) > 127)


# -- the zero-shot protocol ----------------------------------------------------------------------

def zero_shot_cfg(name, root, train_from, train_root, *extra):
    return cfg_of(name, root, f"dataset.train_from={train_from}", f"dataset.train_root={train_root}", "dataset.image_size=32", *extra)


def test_zero_shot_trains_on_every_auxiliary_test_image_and_tests_every_target_category(tmp_path):
    visa = make_visa(tmp_path / "visa")  # 30x40 JPEGs: resized to 32x32
    mpdd = make_mpdd(tmp_path / "mpdd")  # 32x32: decoded as they are
    # a corrupt target training image: the zero-shot load never reads train/
    (mpdd / "connector" / "train" / "good" / "000.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="000.png: cannot be"):
        build_dataset(cfg_of("mpdd", mpdd, "dataset.category=connector", "dataset.image_size=32"))  # one-class reads it
    cfg = zero_shot_cfg("mpdd", mpdd, "visa", visa)  # category unset (???): every category
    d = build_dataset(cfg)
    aux = expected_rows("visa", visa, ["candle", "pcb1"])
    target = expected_rows("mpdd", mpdd, ["bracket_black", "connector"])
    # train: VisA's test images, normal and anomalous, with labels and masks
    assert [Path(f) for f in d.info["files"]["train"]] == [r[3] for r in aux]
    assert d.train.labels.tolist() == [r[2] for r in aux] and d.train.n_anomalous == 8
    assert d.info["train_categories"] == [r[0] for r in aux] and d.info["train_category_names"] == ["candle", "pcb1"]
    for i, (_, _, label, image, mask) in enumerate(aux):
        with Image.open(image) as im:
            want = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
        assert np.array_equal(d.train.images[i].numpy(), want)
        if label:
            ref = Image.fromarray(defect(mask, "visa").astype(np.uint8) * 255).resize((32, 32), Image.Resampling.NEAREST)
            assert np.array_equal(d.train.masks[i, 0].numpy(), np.asarray(ref) > 127)
        else:
            assert not d.train.masks[i].any()
    # test: every MPDD category's test images, pixel for pixel
    assert [Path(f) for f in d.info["files"]["test"]] == [r[3] for r in target]
    assert d.test.labels.tolist() == [r[2] for r in target]
    assert d.info["test_categories"] == [r[0] for r in target] and d.info["test_defects"] == [r[1] for r in target]
    for i, (_, _, label, image, mask) in enumerate(target):
        assert np.array_equal(d.test.images[i].numpy(), pixels(image))
        assert np.array_equal(d.test.masks[i, 0].numpy(), defect(mask, "mpdd") if label else np.zeros((32, 32), bool))
    assert not any("/train/" in f for f in d.info["files"]["test"] + d.info["files"]["train"])
    # val: empty, with a mask tensor of the right shape
    assert len(d.val) == 0 and d.val.images.shape == (0, 3, 32, 32) and d.val.masks.shape == (0, 1, 32, 32)
    info = d.info
    assert info["protocol"] == "zero-shot" and info["train_from"] == "visa" and info["train_root"] == str(visa)
    assert info["root"] == str(mpdd) and info["categories"] == ["bracket_black", "connector"] and info["category"] == "all"
    assert info["normal_classes"] == ["visa: all 2 categories"] and info["channels"] == 3
    assert info["counts"]["test"] == {"bracket_black/good": 3, "bracket_black/hole": 2, "bracket_black/scratches": 3,
                                      "connector/good": 3, "connector/parts_mismatch": 2}
    assert info["counts"]["train"] == {"candle/anomaly": 4, "candle/normal": 3, "pcb1/anomaly": 4, "pcb1/normal": 3}
    assert dataset_shape(cfg) == (3, 32, 32)


def test_zero_shot_category_all_or_one(tmp_path):
    btad, mpdd = make_btad(tmp_path / "btad"), make_mpdd(tmp_path / "mpdd")
    every = build_dataset(zero_shot_cfg("btad", btad, "mpdd", mpdd, "dataset.category=all"))
    assert sorted(set(every.info["test_categories"])) == ["01", "02"] and len(every.test) == 2 * (2 + 3)
    one = build_dataset(zero_shot_cfg("btad", btad, "mpdd", mpdd, "dataset.category=02"))
    rows = expected_rows("btad", btad, ["02"])
    assert one.info["categories"] == ["02"] and one.info["category"] == "02"
    assert [Path(f) for f in one.info["files"]["test"]] == [r[3] for r in rows]
    n_mpdd_test = sum(3 + sum(defects.values()) for defects in MPDD_DEFECTS.values())  # test/good 3 + defects
    assert len(one.train) == len(every.train) == n_mpdd_test  # all of MPDD's test images either way
    for i, (_, _, label, image, mask) in enumerate(rows):  # .png images, .bmp masks with a faint rim
        assert np.array_equal(one.test.masks[i, 0].numpy(), defect(mask, "btad") if label else np.zeros((32, 32), bool))
    with pytest.raises(ConfigError, match=r"dataset.category: must be all .* 01, 02; got 'nope'"):
        build_dataset(zero_shot_cfg("btad", btad, "mpdd", mpdd, "dataset.category=nope"))


def test_zero_shot_channels_are_shared(tmp_path):
    gray = make_mpdd(tmp_path / "mpdd", rgb=False)
    visa = make_visa(tmp_path / "visa")
    d = build_dataset(zero_shot_cfg("mpdd", gray, "visa", visa))
    assert d.test.images.shape[1] == d.train.images.shape[1] == 3  # a colour set makes both 3 channels
    first = Path(d.info["files"]["test"][0])
    assert all(np.array_equal(d.test.images[0, c].numpy(), np.asarray(Image.open(first))) for c in range(3))
    alone, _ = labelled_pool("mpdd", gray, ["connector"], cfg_of("mpdd", gray, "dataset.image_size=32"))
    assert alone.images.shape[1] == 1  # auto on gray images alone
    ones = build_dataset(zero_shot_cfg("mpdd", gray, "visa", visa, "dataset.channels=1"))
    assert ones.train.images.shape[1] == ones.test.images.shape[1] == 1


def test_zero_shot_from_the_same_layout_needs_another_folder(tmp_path):
    a, b = make_mpdd(tmp_path / "a"), make_mpdd(tmp_path / "b", categories=("connector",), seed=5)
    d = build_dataset(zero_shot_cfg("mpdd", a, "mpdd", b))  # another copy of the same kind of set: allowed
    assert all(f.startswith(str(b)) for f in d.info["files"]["train"]) and all(f.startswith(str(a)) for f in d.info["files"]["test"])
    (tmp_path / "link").symlink_to(a)  # the same folder under another name
    with pytest.raises(ConfigError, match=r"^dataset.train_root: .* is dataset.root itself: .*leak"):
        build_dataset(zero_shot_cfg("mpdd", a, "mpdd", tmp_path / "link"))


@pytest.mark.parametrize("case,key,pattern", [
    ("unknown", "dataset.train_from", r"must be null \(the one-class protocol\) .*mvtec \| visa \| btad \| mpdd; got 'vsia'; did you mean visa\?"),
    ("no_root", "dataset.train_root", r"must be set \(dataset.train_root=DIR\): the visa folder trained on .*; it is not set"),
    ("not_a_folder", "dataset.train_root", r"nowhere is not a folder; it must be the visa folder"),
    ("wrong_layout", "dataset.train_root", r"is not a visa folder: .*split_csv/1cls\.csv: not found"),
    ("no_categories", "dataset.train_root", r"has no mpdd categories \(<category>/train/good"),
    ("same_root", "dataset.train_root", r"is dataset.root itself"),
    ("size_null", "dataset.image_size", r"must be set under dataset.train_from .*; got null"),
    ("root_alone", "dataset.train_root", r"is read only with dataset.train_from set"),
])
def test_zero_shot_refusals_name_the_key_in_one_line(case, key, pattern, tmp_path):
    btad, visa, mpdd = make_btad(tmp_path / "btad"), make_visa(tmp_path / "visa"), make_mpdd(tmp_path / "mpdd")
    extra = {
        "unknown": ["dataset.train_from=vsia", f"dataset.train_root={visa}", "dataset.image_size=32"],
        "no_root": ["dataset.train_from=visa", "dataset.image_size=32"],
        "not_a_folder": ["dataset.train_from=visa", f"dataset.train_root={tmp_path / 'nowhere'}", "dataset.image_size=32"],
        "wrong_layout": ["dataset.train_from=visa", f"dataset.train_root={mpdd}", "dataset.image_size=32"],
        "no_categories": ["dataset.train_from=mpdd", f"dataset.train_root={visa}", "dataset.image_size=32"],
        "same_root": ["dataset.train_from=btad", f"dataset.train_root={btad}", "dataset.image_size=32"],
        "size_null": ["dataset.train_from=visa", f"dataset.train_root={visa}", "dataset.image_size=null"],
        "root_alone": [f"dataset.train_root={visa}", "dataset.category=01"],
    }[case]
    cfg = cfg_of("btad", btad, *extra)
    for call in (DATASETS.get("btad").check, build_dataset, dataset_shape):
        with pytest.raises(ConfigError) as e:
            call(cfg)
        assert e.value.key == key and "\n" not in str(e.value)
        assert re.search(pattern, e.value.message), e.value.message


def test_the_zero_shot_keys_are_in_every_category_config():
    for name in ("mvtec", "visa", "btad", "mpdd"):
        d = compose_cfg([f"dataset={name}"]).dataset
        assert d.name == name and d.train_from is None and d.train_root is None
