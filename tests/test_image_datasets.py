"""dataset=mvtec and dataset=folder: real image files (gray/RGB PNG, JPEG, 16-bit PNG, masks)
written here with Pillow, split without overlap, pixels and masks checked against numpy
references, bad input named in one line before any MLflow run, and one run of each end to end."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from freqexp.data import build_dataset, dataset_shape
from freqexp.errors import ConfigError, DataError
from freqexp.run import execute
from freqexp.validate import make_plan
from tests.conftest import FAST, compose_cfg, read_runs

SQUARE = (20, 36, 12, 28)  # rows 20-35, columns 12-27 of a 64x48 image: the defect


def background(rng, h, w, channels=1) -> np.ndarray:
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(30, 90, size=shape, dtype=np.uint8)


def with_square(x: np.ndarray, box=SQUARE) -> tuple[np.ndarray, np.ndarray]:
    """The image with a white square defect, and a mask of exactly that square (0/255)."""
    top, bottom, left, right = box
    out, mask = x.copy(), np.zeros(x.shape[:2], dtype=np.uint8)
    out[top:bottom, left:right] = 255
    mask[top:bottom, left:right] = 255
    return out, mask


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_mvtec(root: Path, category="widget", n_train=10, n_good=5, defects=None, size=(64, 48), rgb=False, seed=0) -> Path:
    """root/category in MVTec's layout; defect images carry the white square, masks mark it."""
    defects = {"crack": 5, "hole": 3, "scuff": 1} if defects is None else defects
    rng = np.random.default_rng(seed)
    base = root / category
    channels = 3 if rgb else 1
    for i in range(n_train):
        save(base / "train" / "good" / f"{i:03d}.png", background(rng, *size, channels))
    for i in range(n_good):
        save(base / "test" / "good" / f"{i:03d}.png", background(rng, *size, channels))
    for defect, n in defects.items():
        for i in range(n):
            image, mask = with_square(background(rng, *size, channels))
            save(base / "test" / defect / f"{i:03d}.png", image)
            save(base / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return root


def mvtec_cfg(root, *extra, category="widget"):
    return compose_cfg(["dataset=mvtec", f"dataset.root={root}", f"dataset.category={category}", "dataset.image_size=null", *extra])


def make_folders(root: Path, n_normal=20, n_abnormal=10, n_normal_test=0, size=(32, 32), masks=False, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n_normal):
        save(root / "normal" / f"n{i:03d}.png", background(rng, *size))
    for i in range(n_normal_test):
        save(root / "normal_test" / f"t{i:03d}.png", background(rng, *size))
    for i in range(n_abnormal):
        image, mask = with_square(background(rng, *size), box=(8, 16, 10, 18))
        save(root / "abnormal" / f"a{i:03d}.png", image)
        if masks:  # both naming conventions: <stem>.png and <stem>_mask.png
            save(root / "masks" / (f"a{i:03d}.png" if i % 2 else f"a{i:03d}_mask.png"), mask)
    return root


def folder_cfg(root, *extra):
    return compose_cfg(["dataset=folder", f"dataset.normal_dir={root / 'normal'}", f"dataset.abnormal_dir={root / 'abnormal'}",
                        "dataset.image_size=null", *extra])


def names(paths) -> set[str]:
    return {str(p) for p in paths}


def assert_disjoint(d) -> None:
    """No file in two splits, and (independently of the names) no identical image in val and test."""
    files = {k: names(v) for k, v in d.info["files"].items()}
    assert not files["train"] & files["val"] and not files["train"] & files["test"] and not files["val"] & files["test"]
    val = d.val.images.flatten(1)
    test = d.test.images.flatten(1)
    assert not (val[:, None, :] == test[None, :, :]).all(-1).any()
    for name in ("train", "val", "test"):
        assert len(d.info["files"][name]) == len(getattr(d, name))


# -- mvtec ------------------------------------------------------------------------------------

def test_mvtec_split_moves_a_share_of_each_test_folder_to_val(tmp_path):
    make_mvtec(tmp_path)
    cfg = mvtec_cfg(tmp_path, "dataset.val_fraction=0.2", "dataset.val_anomaly_fraction=0.2", "dataset.val_anomalies=test")
    assert dataset_shape(cfg.dataset) == (1, 64, 48)
    d = build_dataset(cfg.dataset)
    # train/good 10: 2 to val. test/good 5 -> 1, crack 5 -> 1, hole 3 -> 1 (at least one), scuff 1 -> stays in test
    assert d.counts() == {"train_normal": 8, "train_anomalous": 0, "val_normal": 3, "val_anomalous": 2,
                          "test_normal": 4, "test_anomalous": 7}
    assert d.info["counts"]["val"] == {"train/good": 2, "good": 1, "crack": 1, "hole": 1}
    assert d.info["counts"]["test"] == {"good": 4, "crack": 4, "hole": 2, "scuff": 1}
    assert_disjoint(d)
    every_test_file = names((tmp_path / "widget" / "test").glob("*/*.png"))
    moved = {f for f in d.info["files"]["val"] if "/test/" in f}
    assert moved | names(d.info["files"]["test"]) == every_test_file  # nothing lost, nothing twice
    # labels follow the folders; good images have empty masks, defect images the square
    for split in (d.val, d.test):
        assert split.masks.shape == (len(split), 1, 64, 48) and split.masks.dtype == torch.bool
        assert (split.masks.flatten(1).any(1) == split.labels.bool()).all()
    assert [f.split("/")[-2] for f in d.info["files"]["test"]] == d.info["test_defects"]
    assert d.train.masks is None and d.info["normal_classes"] == ["widget (good)"]
    # the split is fixed by split_seed
    again = build_dataset(mvtec_cfg(tmp_path, "dataset.val_fraction=0.2", "dataset.val_anomalies=test").dataset)
    other = build_dataset(mvtec_cfg(tmp_path, "dataset.val_fraction=0.2", "dataset.val_anomalies=test", "dataset.split_seed=5").dataset)
    assert again.info["files"] == d.info["files"] and other.info["files"] != d.info["files"]


def test_mvtec_pseudo_keeps_the_test_complete(tmp_path):
    make_mvtec(tmp_path)
    d = build_dataset(mvtec_cfg(tmp_path, "dataset.val_anomalies=pseudo", "dataset.val_fraction=0.2", "dataset.limit_train=5").dataset)
    assert d.counts() == {"train_normal": 5, "train_anomalous": 0, "val_normal": 2, "val_anomalous": 0,
                          "test_normal": 5, "test_anomalous": 9}
    assert_disjoint(d)


def expected_nearest_mask(h_in, w_in, h_out, w_out, box=SQUARE) -> tuple[np.ndarray, np.ndarray]:
    """Reference: an output pixel is defect when its centre, mapped back, lands in the square.
    Also returns where a centre falls exactly on the square's edge (either answer is right)."""
    top, bottom, left, right = box
    rows = (np.arange(h_out) + 0.5) * h_in / h_out
    cols = (np.arange(w_out) + 0.5) * w_in / w_out
    inside = ((rows >= top) & (rows < bottom))[:, None] & ((cols >= left) & (cols < right))[None, :]
    tie = np.isclose(rows[:, None], [top, bottom]).any(1)[:, None] | np.isclose(cols[:, None], [left, right]).any(1)[None, :]
    return inside, tie


def same_mask(mask: torch.Tensor, reference) -> bool:
    inside, tie = reference
    return bool(np.array_equal(mask.numpy()[~tie], inside[~tie])) and tie.mean() < 0.2


@pytest.mark.parametrize("geometry,out_size,crop", [
    (["dataset.image_size=[32,20]"], (32, 20), None),                               # non-integer factor in W
    (["dataset.image_size=[40,30]", "dataset.center_crop=[30,21]"], (40, 30), (30, 21)),  # odd crop offsets
])
def test_mvtec_masks_stay_on_their_defect_after_resize_and_crop(tmp_path, geometry, out_size, crop):
    make_mvtec(tmp_path, defects={"crack": 3}, rgb=True)
    cfg = mvtec_cfg(tmp_path, *geometry, "dataset.val_anomalies=pseudo")
    d = build_dataset(cfg.dataset)
    expected = expected_nearest_mask(64, 48, *out_size)
    if crop:
        top, left = (out_size[0] - crop[0]) // 2, (out_size[1] - crop[1]) // 2
        expected = tuple(e[top : top + crop[0], left : left + crop[1]] for e in expected)
    assert dataset_shape(cfg.dataset) == (3, *expected[0].shape) == tuple(d.test.images.shape[1:])
    defects = d.test.labels == 1
    assert int(defects.sum()) == 3
    for image, mask in zip(d.test.images[defects], d.test.masks[defects]):
        assert same_mask(mask[0], expected)
        gray = image.float().mean(0)
        assert (gray[~mask[0]] < 200).all()  # no bright pixel outside the mask: it did not drift
        assert (gray[mask[0]] > 140).all()  # every mask pixel is mostly defect


def test_mvtec_keep_aspect_crops_instead_of_stretching(tmp_path):
    make_mvtec(tmp_path, defects={"crack": 2})
    d = build_dataset(mvtec_cfg(tmp_path, "dataset.image_size=24", "dataset.keep_aspect=true", "dataset.val_anomalies=pseudo").dataset)
    # 64x48 scaled by 0.5 to 32x24 covers 24x24; 4 rows are cropped at the top
    expected = tuple(e[4:28] for e in expected_nearest_mask(64, 48, 32, 24))
    for mask in d.test.masks[d.test.labels == 1]:
        assert same_mask(mask[0], expected)


# -- reading formats (through dataset=folder) -------------------------------------------------

def test_reads_gray_rgb_jpeg_and_16_bit_files_as_numpy_says(tmp_path):
    rng = np.random.default_rng(1)
    normal, written = tmp_path / "normal", {}
    gray = background(rng, 16, 20)
    written["gray.png"] = np.repeat(gray[..., None], 3, axis=2)
    save(normal / "gray.png", gray)
    rgb = rng.integers(0, 256, size=(16, 20, 3), dtype=np.uint8)
    written["rgb.PNG"] = rgb  # extensions are compared case-insensitively
    save(normal / "rgb.PNG", rgb)
    ramp = (np.arange(16 * 20, dtype=np.uint16).reshape(16, 20) * 205) + np.uint16(7)  # 7 .. 65402
    save(normal / "deep.png", ramp)  # a 16-bit gray PNG
    assert Image.open(normal / "deep.png").mode.startswith("I")
    scaled = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    written["deep.png"] = np.repeat(scaled[..., None], 3, axis=2)
    smooth = np.broadcast_to(np.linspace(40, 200, 20, dtype=np.uint8), (16, 20))
    jpeg = np.stack([smooth, smooth[::-1], np.full((16, 20), 120, np.uint8)], axis=2)
    Image.fromarray(np.ascontiguousarray(jpeg)).save(normal / "photo.Jpg", quality=95)
    written["photo.Jpg"] = jpeg
    for i in range(4):
        save(normal / f"more{i}.png", np.repeat(background(rng, 16, 20)[..., None], 3, axis=2))
        written[f"more{i}.png"] = np.asarray(Image.open(normal / f"more{i}.png"))
    (normal / "notes.txt").write_text("not an image")
    (normal / "._hidden.png").write_bytes(b"macOS resource fork")
    for i in range(3):
        save(tmp_path / "abnormal" / f"a{i}.png", rng.integers(0, 256, size=(16, 20, 3), dtype=np.uint8))
    cfg = folder_cfg(tmp_path, "dataset.val_fraction=0.2", "dataset.test_fraction=0.2")
    assert dataset_shape(cfg.dataset) == (3, 16, 20)  # auto: an RGB file makes every image RGB
    d = build_dataset(cfg.dataset)
    seen = {}
    for name in ("train", "val", "test"):
        for path, image in zip(d.info["files"][name], getattr(d, name).images):
            seen[Path(path).name] = image.permute(1, 2, 0).numpy()
    assert set(written) <= set(seen) and "notes.txt" not in seen and "._hidden.png" not in seen
    for name, array in written.items():
        if name == "photo.Jpg":  # lossy
            assert np.abs(seen[name].astype(int) - array).mean() < 3
        else:
            assert np.array_equal(seen[name], array), name
    # channels=1: colour becomes Pillow's luma, gray stays exact
    d1 = build_dataset(folder_cfg(tmp_path, "dataset.channels=1", "dataset.val_fraction=0.2", "dataset.test_fraction=0.2").dataset)
    rows = {Path(p).name: img for n in ("train", "val", "test") for p, img in zip(d1.info["files"][n], getattr(d1, n).images)}
    assert rows["gray.png"].shape == (1, 16, 20) and np.array_equal(rows["gray.png"][0].numpy(), gray)
    luma = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.array_equal(rows["rgb.PNG"][0].numpy(), luma)
    assert np.array_equal(rows["deep.png"][0].numpy(), scaled)


def test_gray_sets_stay_one_channel_and_resize_is_antialiased(tmp_path):
    make_folders(tmp_path, size=(32, 32))
    cfg = folder_cfg(tmp_path, "dataset.image_size=[16,12]")
    assert dataset_shape(cfg.dataset) == (1, 16, 12)
    d = build_dataset(cfg.dataset)
    for path, image in zip(d.info["files"]["train"][:3], d.train.images):
        source = torch.from_numpy(np.array(Image.open(path))).double()[None, None]
        # reference: torch's antialiased bilinear (a triangle filter widened by the reduction factor)
        reference = torch.nn.functional.interpolate(source, size=(16, 12), mode="bilinear", antialias=True, align_corners=False)
        assert (image[0].double() - reference[0, 0]).abs().max() <= 1.0
        naive = torch.nn.functional.interpolate(source, size=(16, 12), mode="bilinear", align_corners=False)
        assert (image[0].double() - naive[0, 0]).abs().max() > 3  # not plain 2-tap bilinear, which aliases


# -- folder -----------------------------------------------------------------------------------

def test_folder_split_counts(tmp_path):
    make_folders(tmp_path, n_normal=20, n_abnormal=10, n_normal_test=5)
    d = build_dataset(folder_cfg(tmp_path).dataset)  # val 0.1, test 0.2, anomalies to val 0.2
    assert d.counts() == {"train_normal": 14, "train_anomalous": 0, "val_normal": 2, "val_anomalous": 2,
                          "test_normal": 4, "test_anomalous": 8}
    assert_disjoint(d)
    assert d.info["normal_classes"] == ["normal"] and d.val.masks is None and d.test.masks is None
    # a separate folder of test normals: normal_dir only gives train and val
    d = build_dataset(folder_cfg(tmp_path, f"dataset.normal_test_dir={tmp_path / 'normal_test'}").dataset)
    assert d.counts()["train_normal"] == 18 and d.counts()["test_normal"] == 5
    assert all("/normal_test/" in f for f in d.info["files"]["test"][:5])
    assert_disjoint(d)
    d = build_dataset(folder_cfg(tmp_path, "dataset.val_anomalies=pseudo", "dataset.limit_train=3").dataset)
    assert d.counts() == {"train_normal": 3, "train_anomalous": 0, "val_normal": 2, "val_anomalous": 0,
                          "test_normal": 4, "test_anomalous": 10}


def test_folder_masks_match_by_stem_and_line_up(tmp_path):
    make_folders(tmp_path, masks=True)
    d = build_dataset(folder_cfg(tmp_path, f"dataset.mask_dir={tmp_path / 'masks'}", "dataset.image_size=16").dataset)
    expected = expected_nearest_mask(32, 32, 16, 16, box=(8, 16, 10, 18))
    for split in (d.val, d.test):
        for image, mask, label in zip(split.images, split.masks, split.labels):
            assert same_mask(mask[0], expected) if label else not mask.any()
            if label:
                assert (image[0][mask[0]] > 140).all() and (image[0][~mask[0]] < 200).all()


# -- end to end -------------------------------------------------------------------------------

def test_mvtec_run_end_to_end_logs_pixel_auroc(tmp_path, store):
    make_mvtec(tmp_path / "mvtec", n_train=16, n_good=6, defects={"crack": 6, "hole": 4})
    cfg = mvtec_cfg(tmp_path / "mvtec", *FAST, f"tracking.uri={store}", "tracking.figures=none", "model=cae", "loss=mse",
                    "dataset.image_size=32", "trainer.batch_size=8")
    result = execute(cfg, tmp_path / "run")
    m = result.metrics
    # the white square is far brighter than any normal pixel: the residual finds it even after one epoch
    assert 0.7 < m["test/pixel_auroc"] <= 1.0 and 0.0 <= m["test/pro"] <= 1.0
    runs = read_runs(store)
    assert len(runs) == 1 and runs["status"].iloc[0] == "FINISHED"
    assert runs["params.dataset.name"].iloc[0] == "mvtec" and runs["params.data.root"].iloc[0] == str(tmp_path / "mvtec")
    assert runs["params.data.test_anomalous"].iloc[0] == "10"  # 6 + 4: the published protocol keeps the whole test split
    assert runs["tags.protocol"].iloc[0] == "unsupervised"  # validated on pseudo-anomalies
    assert result.info["normal"] == ["widget (good)"]


def test_folder_run_end_to_end(tmp_path, store):
    make_folders(tmp_path, n_normal=24, n_abnormal=8)
    cfg = folder_cfg(tmp_path, *FAST, f"tracking.uri={store}", "tracking.figures=none", "model=cae", "loss=mse",
                     "trainer.batch_size=8")
    m = execute(cfg, tmp_path / "run").metrics
    assert 0.0 <= m["test/auroc"] <= 1.0 and "test/pixel_auroc" not in m  # no mask_dir, no pixel metric
    runs = read_runs(store)
    assert len(runs) == 1 and runs["status"].iloc[0] == "FINISHED" and runs["params.dataset.name"].iloc[0] == "folder"


# -- bad input: one line, naming the file, folder or key, before any run ------------------------

def raises_one_line(error, match, call):
    with pytest.raises(error, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_mvtec_bad_config_names_the_key(tmp_path):
    make_mvtec(tmp_path, category="bottle")
    make_mvtec(tmp_path, category="cable")
    raises_one_line(ConfigError, "dataset.root: must be the MVTec AD folder", lambda: make_plan(compose_cfg(["dataset=mvtec"])))
    raises_one_line(ConfigError, "dataset.root: .*nowhere is not a folder", lambda: make_plan(mvtec_cfg(tmp_path / "nowhere")))
    message = raises_one_line(ConfigError, "dataset.category", lambda: make_plan(mvtec_cfg(tmp_path, category="all")))
    assert f"python -m freqexp --multirun dataset=mvtec dataset.root={tmp_path} dataset.category=bottle,cable" in message
    raises_one_line(ConfigError, "dataset.category: must be one of the categories in .*: bottle, cable",
                    lambda: make_plan(mvtec_cfg(tmp_path, category="screw")))
    raises_one_line(ConfigError, "dataset.root: .*looks like one category itself", lambda: make_plan(mvtec_cfg(tmp_path / "bottle")))
    for override, key in (("dataset.image_size=2", "dataset.image_size"), ("dataset.channels=2", "dataset.channels"),
                          ("dataset.val_anomalies=classes", "dataset.val_anomalies"), ("dataset.extensions=[]", "dataset.extensions"),
                          ("dataset.val_fraction=1.5", "dataset.val_fraction"),
                          ("dataset.image_size=32 dataset.center_crop=40", "dataset.center_crop")):
        raises_one_line(ConfigError, key, lambda: make_plan(mvtec_cfg(tmp_path, *override.split(), category="bottle")))
    # a crop larger than the native size is found from the first image's header
    raises_one_line(ConfigError, "dataset.center_crop: 80x80 is larger than the 64x48",
                    lambda: make_plan(mvtec_cfg(tmp_path, "dataset.center_crop=80", category="bottle")))


def test_mvtec_bad_files_are_named(tmp_path):
    def fresh(name):
        return make_mvtec(tmp_path / name, defects={"crack": 2})

    def load(root):
        return build_dataset(mvtec_cfg(root).dataset)

    root = fresh("empty")
    for f in (root / "widget" / "test" / "crack").iterdir():
        f.unlink()
    (root / "widget" / "test" / "crack" / "readme.txt").write_text("x")
    raises_one_line(DataError, r"test/crack: no images with extensions \.png, \.jpg, .* \(dataset\.extensions\)", lambda: load(root))
    root = fresh("notrain")
    for f in (root / "widget" / "train" / "good").iterdir():
        f.unlink()
    (root / "widget" / "train" / "good").rmdir()
    raises_one_line(DataError, r"widget/train/good: folder not found \(normal training images\)", lambda: load(root))
    root = fresh("nomask")
    (root / "widget" / "ground_truth" / "crack" / "001_mask.png").unlink()
    raises_one_line(DataError, r"test/crack/001\.png: defect image with no mask \(expected .*ground_truth/crack/001_mask\.png\)",
                    lambda: load(root))
    root = fresh("orphan")
    (root / "widget" / "test" / "crack" / "000.png").unlink()
    raises_one_line(DataError, r"ground_truth/crack/000_mask\.png: mask with no image", lambda: load(root))
    root = fresh("truncated")
    victim = root / "widget" / "test" / "good" / "002.png"
    victim.write_bytes(victim.read_bytes()[:200])
    raises_one_line(DataError, f"{victim}: cannot be decoded, the file is truncated or corrupt", lambda: load(root))
    root = fresh("garbage")
    victim = root / "widget" / "train" / "good" / "004.png"
    victim.write_bytes(b"this is not a PNG")
    raises_one_line(DataError, f"{victim}: cannot be read as an image", lambda: load(root))
    root = fresh("mixed")
    odd = root / "widget" / "test" / "good" / "003.png"
    save(odd, np.zeros((50, 40), np.uint8))
    message = raises_one_line(DataError, "images differ in size", lambda: load(root))
    assert "000.png is 64x48" in message and f"{odd} is 50x40" in message and "'dataset.image_size=[64,48]'" in message
    root = fresh("badmask")
    save(root / "widget" / "ground_truth" / "crack" / "000_mask.png", np.zeros((10, 10), np.uint8))
    raises_one_line(DataError, r"000_mask\.png: the mask is 10x10 but its image .*test/crack/000\.png is 64x48",
                    lambda: build_dataset(mvtec_cfg(root, "dataset.image_size=32").dataset))


def test_folder_bad_input_is_named(tmp_path):
    make_folders(tmp_path, masks=True)
    raises_one_line(ConfigError, "dataset.normal_dir: must be the folder of normal images",
                    lambda: make_plan(compose_cfg(["dataset=folder"])))
    raises_one_line(ConfigError, "dataset.abnormal_dir: .*missing is not a folder",
                    lambda: make_plan(folder_cfg(tmp_path, f"dataset.abnormal_dir={tmp_path / 'missing'}")))
    raises_one_line(ConfigError, "dataset.abnormal_dir: is the same folder as dataset.normal_dir",
                    lambda: make_plan(folder_cfg(tmp_path, f"dataset.abnormal_dir={tmp_path / 'normal'}")))
    raises_one_line(ConfigError, "dataset.test_fraction: val_fraction \\+ test_fraction must be below 1",
                    lambda: make_plan(folder_cfg(tmp_path, "dataset.val_fraction=0.5", "dataset.test_fraction=0.5")))
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "sub").mkdir()
    raises_one_line(DataError, r"nothing: no images with extensions .*\(dataset.normal_dir\); it has subfolders \(sub\)",
                    lambda: make_plan(compose_cfg(["dataset=folder", f"dataset.normal_dir={tmp_path / 'nothing'}",
                                                   f"dataset.abnormal_dir={tmp_path / 'abnormal'}"])))
    masks = f"dataset.mask_dir={tmp_path / 'masks'}"
    (tmp_path / "masks" / "a003.png").rename(tmp_path / "masks" / "zzz.png")
    raises_one_line(DataError, r"masks/zzz\.png: mask with no image", lambda: build_dataset(folder_cfg(tmp_path, masks).dataset))
    (tmp_path / "masks" / "zzz.png").unlink()
    raises_one_line(DataError, r"abnormal/a003\.png: anomaly with no mask", lambda: build_dataset(folder_cfg(tmp_path, masks).dataset))
    jpeg = tmp_path / "normal" / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:-40])
    raises_one_line(DataError, f"{jpeg}: cannot be decoded, the file is truncated", lambda: build_dataset(folder_cfg(tmp_path).dataset))
    jpeg.unlink()
    single = tmp_path / "single"
    save(single / "only.png", np.zeros((32, 32), np.uint8))
    raises_one_line(DataError, r"single: has 1 image; val and test need one each",
                    lambda: build_dataset(folder_cfg(tmp_path, f"dataset.abnormal_dir={single}").dataset))


def test_data_errors_open_no_mlflow_run(tmp_path, store):
    make_mvtec(tmp_path / "set", defects={"crack": 2})
    victim = tmp_path / "set" / "widget" / "test" / "crack" / "001.png"
    victim.write_bytes(victim.read_bytes()[:150])
    cfg = mvtec_cfg(tmp_path / "set", *FAST, f"tracking.uri={store}", "model=cae", "loss=mse")
    with pytest.raises(DataError, match="001.png: cannot be decoded"):
        execute(cfg, tmp_path / "run")
    make_folders(tmp_path / "f")
    (tmp_path / "f" / "abnormal" / "a002.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="a002.png: cannot be read as an image"):
        execute(folder_cfg(tmp_path / "f", *FAST, f"tracking.uri={store}", "model=cae", "loss=mse"), tmp_path / "run2")
    assert len(read_runs(store)) == 0
