"""Pixel-level evaluation: PRO (per-region overlap up to 30 % FPR) against a brute-force
reference that thresholds every map at every distinct value and labels regions image by image,
closed-form cases, pixel AUROC against scikit-learn, the overlay figure, and a full run that logs
both to MLflow."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from matplotlib.image import AxesImage
from scipy import ndimage
from sklearn import metrics as skm

from freqexp import metrics, plots
from freqexp.data import OneClassData, Split
from freqexp.evaluate import evaluate
from freqexp.training import to_unit_float

# --------------------------------------------------------------------------- reference


def reference_curve(maps: np.ndarray, masks: np.ndarray, connectivity: int, thresholds=None):
    """(fpr, pro) from (0, 0) for thresholds from high to low, brute force: each image labelled on
    its own, every threshold applied to all pixels at once."""
    structure = np.ones((3, 3)) if connectivity == 8 else None  # scipy's default is 4-connected
    regions = []  # one boolean [N,H,W] indicator per region
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=structure)
        for r in range(1, n + 1):
            ind = np.zeros(masks.shape, dtype=bool)
            ind[i] = lab == r
            regions.append(ind.ravel())
    onehot = np.stack(regions).astype(np.float64)  # [R, P]
    flat, normal = maps.ravel(), ~masks.ravel()
    if thresholds is None:
        thresholds = np.unique(flat)[::-1]
    pred = flat[None, :] >= thresholds[:, None]  # [T, P]
    fpr = pred[:, normal].sum(1) / normal.sum()
    pro = ((pred @ onehot.T) / onehot.sum(1)).mean(1)
    return np.r_[0.0, fpr], np.r_[0.0, pro]


def reference_pro_auc(fpr: np.ndarray, pro: np.ndarray, max_fpr: float = 0.3) -> float:
    """sklearn's trapezoid over the points up to max_fpr plus a linearly interpolated end point."""
    inside = fpr <= max_fpr
    x, y = list(fpr[inside]), list(pro[inside])
    after = np.nonzero(~inside)[0]
    if len(after) and x[-1] < max_fpr:
        j = after[0]
        x0, y0, x1, y1 = fpr[j - 1], pro[j - 1], fpr[j], pro[j]
        x.append(max_fpr)
        y.append(y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0))
    return skm.auc(x, y) / max_fpr


def make_case(seed: int, n: int = 6, h: int = 19, w: int = 23):
    """Maps and masks with several regions per anomalous image: rectangles, single pixels and
    diagonal-touching pixels (which 4- and 8-connectivity split differently); some images have
    no defect; even seeds round the maps so that many pixels tie."""
    rs = np.random.RandomState(seed)
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(1, n):
        for _ in range(rs.randint(1, 5)):
            y, x = rs.randint(0, h - 4), rs.randint(0, w - 5)
            masks[i, y : y + rs.randint(1, 5), x : x + rs.randint(1, 6)] = True
        y, x = rs.randint(0, h - 1), rs.randint(0, w - 1)
        masks[i, y, x] = masks[i, y + 1, x + 1] = True  # a diagonal pair
    masks[n // 2] = False  # a normal image
    maps = rs.rand(n, h, w) + masks * rs.uniform(0.0, 0.8, size=(n, 1, 1))
    if seed % 2 == 0:
        maps = np.round(maps * 6) / 6  # heavy ties, also between normal and anomalous pixels
    return maps.astype(np.float32), masks


SEEDS = list(range(8))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("connectivity", [8, 4])
def test_pro_matches_brute_force_at_every_threshold(seed, connectivity):
    maps, masks = make_case(seed)
    ref_fpr, ref_pro = reference_curve(maps.astype(np.float64), masks, connectivity)
    fpr, pro, thr = metrics.pro_curve(torch.from_numpy(maps)[:, None], torch.from_numpy(masks)[:, None],
                                      max_fpr=1.0, connectivity=connectivity)
    np.testing.assert_allclose(fpr.numpy(), ref_fpr, atol=1e-12)
    np.testing.assert_allclose(pro.numpy(), ref_pro, atol=1e-12)
    assert np.isinf(thr[0]) and np.all(np.diff(thr.numpy()[1:]) < 0)  # distinct thresholds, high to low
    got = metrics.pro_auc(torch.from_numpy(maps), torch.from_numpy(masks), connectivity=connectivity)
    assert got == pytest.approx(reference_pro_auc(ref_fpr, ref_pro), abs=1e-12)
    # the whole curve integrated (max_fpr=1) is sklearn's AUC of the curve
    assert metrics.pro_auc(maps, masks, max_fpr=1.0, connectivity=connectivity) == pytest.approx(
        skm.auc(ref_fpr, ref_pro), abs=1e-12
    )


def test_cases_have_ties_several_regions_and_connectivity_differences():
    # guard: the generator must produce the cases the test above claims to cover
    tied = [s for s in SEEDS if len(np.unique(make_case(s)[0])) < make_case(s)[0].size / 10]
    assert len(tied) == len(SEEDS) // 2
    for s in SEEDS:
        masks = make_case(s)[1]
        n8, n4 = metrics.region_labels(masks, 8)[1], metrics.region_labels(masks, 4)[1]
        assert n8 >= 2 * (len(masks) - 2) and n4 > n8  # several regions per image; the diagonal pairs split


@pytest.mark.parametrize("seed", [1, 3])
def test_pro_agrees_with_a_fixed_threshold_grid(seed):
    # the grid-of-thresholds recipe many papers use converges to the exact curve
    maps, masks = make_case(seed, n=10, h=32, w=32)
    grid = np.linspace(maps.max(), maps.min(), 4000)
    assert metrics.pro_auc(maps, masks) == pytest.approx(reference_pro_auc(*reference_curve(maps, masks, 8, grid)), abs=2e-3)


@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 0.5, 0.999])
def test_truncated_curve_is_the_prefix_of_the_full_curve(max_fpr):
    maps, masks = make_case(5, n=8, h=24, w=24)
    full = metrics.pro_curve(maps, masks, max_fpr=1.0)
    cut = metrics.pro_curve(maps, masks, max_fpr=max_fpr)
    k = len(cut[0])
    for a, b in zip(full, cut):
        np.testing.assert_array_equal(a[:k].numpy(), b.numpy())
    assert cut[0][-1] > max_fpr and cut[0][-2] <= max_fpr  # it stops at the first point past max_fpr


# --------------------------------------------------------------------------- closed forms


def two_images():
    masks = torch.zeros(2, 1, 16, 20, dtype=torch.bool)
    masks[1, 0, 2:6, 3:9] = True
    masks[1, 0, 10:11, 15:16] = True
    return masks


def test_perfect_map_scores_one():
    masks = two_images()
    maps = masks.float() + 0.5 * torch.rand(masks.shape)
    assert metrics.pro_auc(maps, masks) == pytest.approx(1.0, abs=1e-12)


def test_map_ranking_every_normal_pixel_above_the_anomalies_scores_zero():
    masks = two_images()
    maps = (~masks).float() + 0.5 * torch.rand(masks.shape)
    assert metrics.pro_auc(maps, masks) == pytest.approx(0.0, abs=1e-12)


def test_constant_map_is_the_diagonal():
    # one threshold: (0, 0) -> (1, 1); area up to 0.3 is 0.3**2 / 2, divided by 0.3
    masks = two_images()
    assert metrics.pro_auc(torch.full(masks.shape, 0.7), masks) == pytest.approx(0.15, abs=1e-12)
    assert metrics.pro_auc(torch.full(masks.shape, 0.7), masks, max_fpr=1.0) == pytest.approx(0.5, abs=1e-12)


def test_every_region_counts_the_same_whatever_its_size():
    # a 1-pixel region found above all normal pixels, a 24-pixel region below all of them:
    # PRO is 1/2 at every FPR, while pixel AUROC sees 1 of 25 anomalous pixels found
    masks = two_images()
    maps = torch.linspace(0.1, 0.9, masks.numel()).reshape(masks.shape)
    maps[1, 0, 10, 15] = 2.0
    maps[1, 0, 2:6, 3:9] = 0.0
    assert metrics.pro_auc(maps, masks) == pytest.approx(0.5, abs=1e-12)
    assert metrics.roc_auc(maps.flatten(), masks.flatten()) == pytest.approx(1 / 25, abs=1e-12)


def test_connectivity_and_images_never_join():
    masks = torch.zeros(2, 6, 6, dtype=torch.bool)
    masks[0, 1, 1] = True  # one pixel touching a 2x2 block only at a corner
    masks[0, 2:4, 2:4] = True
    masks[0, 5, 0] = True  # bottom row of image 0 ...
    masks[1, 0, 0] = True  # ... above the top row of image 1: different images, different regions
    assert metrics.region_labels(masks, 8)[1] == 3
    assert metrics.region_labels(masks, 4)[1] == 4
    maps = torch.where(masks, -1.0, 0.5)  # defect pixels below every normal pixel ...
    maps[0, 1, 1] = maps[0, 5, 0] = 1.0  # ... except the single pixel and image 0's corner pixel
    # 8-connected: regions {corner+block: 1/5, image 0 corner: 1, image 1 corner: 0} -> mean 0.4
    # 4-connected: {pixel: 1, block: 0, image 0 corner: 1, image 1 corner: 0} -> mean 0.5
    # found above every normal pixel, the rest below: PRO is that value for every FPR < 1
    assert metrics.pro_auc(maps, masks, connectivity=8) == pytest.approx(0.4, abs=1e-12)
    assert metrics.pro_auc(maps, masks, connectivity=4) == pytest.approx(0.5, abs=1e-12)


def test_bad_inputs_raise():
    masks = two_images()
    with pytest.raises(ValueError, match="region"):
        metrics.pro_auc(torch.rand(masks.shape), torch.zeros_like(masks))
    with pytest.raises(ValueError, match="normal pixel"):
        metrics.pro_auc(torch.rand(masks.shape), torch.ones_like(masks))
    bad = torch.rand(masks.shape)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        metrics.pro_auc(bad, masks)
    with pytest.raises(ValueError, match="differ"):
        metrics.pro_auc(torch.rand(2, 1, 16, 19), masks)
    with pytest.raises(ValueError, match="max_fpr"):
        metrics.pro_auc(torch.rand(masks.shape), masks, max_fpr=0.0)
    with pytest.raises(ValueError, match="connectivity"):
        metrics.pro_auc(torch.rand(masks.shape), masks, connectivity=6)


# --------------------------------------------------------------------------- evaluate


class MeanOfChannels:
    """A stand-in for a trained module: the map is the image's channel mean."""

    device = torch.device("cpu")

    def eval(self):
        return self

    def calibrate(self, images, batch_size):
        pass

    def as_input(self, x):
        return to_unit_float(x)

    def anomaly_map(self, x):
        return x.mean(1, keepdim=True)

    def score(self, x):
        maps = self.anomaly_map(x)
        return maps, metrics.reduce_map(maps, "max")


def split_with_masks(seed: int, masks: np.ndarray) -> Split:
    rs = np.random.RandomState(seed)
    n = len(masks)
    images = rs.randint(0, 200, size=(n, 3, *masks.shape[1:])) + 55 * masks[:, None]
    labels = torch.from_numpy(masks.reshape(n, -1).any(1)).long()
    labels[0], labels[1] = 0, 1  # image-level metrics need both classes
    return Split(torch.from_numpy(images.astype(np.uint8)), labels, torch.from_numpy(masks)[:, None])


def test_evaluate_reports_pixel_auroc_and_pro_where_masks_have_defects():
    masks = make_case(2, n=8, h=17, w=29)[1]
    split = split_with_masks(0, masks)
    data = OneClassData(train=split, val=split, test=split)
    m, scored = evaluate(MeanOfChannels(), data, batch_size=3)
    maps = split.images.float().div(255).mean(1).numpy()
    assert m["test/pixel_auroc"] == pytest.approx(skm.roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert m["test/pro"] == pytest.approx(reference_pro_auc(*reference_curve(maps, masks, 8)), abs=1e-9)
    assert scored["test"].maps.shape == (8, 1, 17, 29)


def test_evaluate_leaves_pixel_metrics_out_without_defect_pixels():
    masks = np.zeros((6, 12, 12), dtype=bool)
    split = split_with_masks(1, masks)
    m, _ = evaluate(MeanOfChannels(), OneClassData(train=split, val=split, test=split), batch_size=4)
    assert "test/pixel_auroc" not in m and "test/pro" not in m
    assert math.isfinite(m["test/auroc"])


# --------------------------------------------------------------------------- overlays


def test_overlay_indices_first_normals_and_anomalies_spread_evenly():
    labels = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0, 1, 1] + [1] * 10 + [0])
    idx = plots.overlay_indices(labels).tolist()
    anomalous = torch.nonzero(labels == 1).flatten().tolist()
    assert len(anomalous) == 15
    assert idx[:4] == [1, 2, 4, 6]
    assert idx[4:] == [anomalous[2 * k] for k in range(8)]  # 8 of 15 evenly spread: every other one
    assert idx[4] == 0 and idx[-1] == 19  # first and last anomalous image
    assert plots.overlay_indices(torch.tensor([1, 0, 1])).tolist() == [1, 0, 2]  # fewer available: all of them
    assert plots.overlay_indices(labels).tolist() == idx  # deterministic


def test_colour_range_is_the_percentiles_of_all_test_pixels():
    maps = torch.rand(7, 1, 13, 11) ** 3
    flat = np.sort(maps.numpy().ravel())
    vmin, vmax = plots.map_colour_range(maps)
    assert vmin == pytest.approx(flat[round(0.01 * flat.size) - 1]) and vmax == pytest.approx(flat[round(0.995 * flat.size) - 1])
    lo, hi = plots.map_colour_range(torch.full((2, 1, 4, 4), 3.0))
    assert lo == 3.0 and hi > lo  # constant maps still get a usable range


@pytest.mark.parametrize("channels,h,w", [(3, 20, 57), (1, 33, 14)])
def test_overlay_figure_panels(channels, h, w):
    """Each figure row is one mosaic image; every cell is recomputed here from its definition:
    the input as shown, inferno over [vmin, vmax], the map blended over the input with opacity
    0.15 + 0.7 * scaled map, and the red ground-truth fill exactly on the mask."""
    import matplotlib
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(channels)
    n = 9
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0, 1])
    masks = torch.zeros(n, 1, h, w, dtype=torch.bool)
    masks[labels == 1, :, 3:8, 4:10] = True
    images = torch.randint(0, 256, (n, channels, h, w), generator=g, dtype=torch.uint8)
    maps = torch.rand(n, 1, h, w, generator=g) + masks
    idx = plots.overlay_indices(labels, n_normal=2, n_anomalous=3)
    assert idx.tolist() == [0, 2, 1, 4, 8]
    vmin, vmax = 0.2, 1.5
    rows = plots.overlay_panels(images, maps, masks, idx, vmin, vmax)
    gap = plots.cell_gap(w)
    assert rows["input"].shape == (h, len(idx) * (w + gap) - gap, 3)
    inferno = matplotlib.colormaps["inferno"]
    for col, i in enumerate(idx.tolist()):
        cell = {name: rows[name][:, col * (w + gap): col * (w + gap) + w] for name in rows}
        img = images[i].permute(1, 2, 0).double().numpy() / 255
        img = np.repeat(img, 3, axis=2) if channels == 1 else img
        np.testing.assert_allclose(cell["input"], img, atol=1e-12)
        scaled = (maps[i, 0].double().numpy() - vmin) / (vmax - vmin)
        colour = inferno(scaled)[..., :3]  # one colour scale for every cell
        np.testing.assert_allclose(cell["anomaly map"], colour, atol=1e-12)
        alpha = (0.15 + 0.7 * np.clip(scaled, 0, 1))[..., None]
        np.testing.assert_allclose(cell["overlay"], alpha * colour + (1 - alpha) * img, atol=1e-6)  # maps are float32
        mask = masks[i, 0].numpy()
        filled = 0.55 * np.array([1.0, 0.1, 0.1]) + 0.45 * img
        np.testing.assert_allclose(cell["ground truth"], np.where(mask[..., None], filled, img), atol=1e-12)
        np.testing.assert_array_equal(cell["mask"] > 0.5, mask)
        if col:  # the white gap before this cell is no defect
            np.testing.assert_array_equal(rows["input"][:, col * (w + gap) - gap: col * (w + gap)], 1.0)
            assert not rows["mask"][:, col * (w + gap) - gap: col * (w + gap)].any()
    fig = plots.overlay_figure(images, maps, masks, labels, torch.rand(n), idx, vmin, vmax)
    try:
        axes, side = fig.axes[0:8:2], fig.axes[1:8:2]  # 4 rows x (mosaic, narrow colour-bar column)
        assert [ax.get_ylabel() for ax in axes] == list(plots.OVERLAY_ROWS)
        titles = [t.get_text() for t in axes[0].get_xticklabels()]
        assert [t.split("\n")[0] for t in titles] == [f"#{i} " + ("anom" if labels[i] else "norm") for i in idx.tolist()]
        for ax, name in zip(axes, plots.OVERLAY_ROWS):
            np.testing.assert_array_equal(ax.get_images()[0].get_array(), rows[name])
        # ground-truth outlines on the overlay and ground-truth rows only
        assert [len(ax.collections) for ax in axes] == [0, 0, 1, 1]
        # one colour bar, beside the map row, spanning the figure's colour range; the other side cells empty
        assert side[1].get_ylim() == pytest.approx((vmin, vmax)) and side[1].collections
        assert not any(ax.axison for ax in (side[0], side[2], side[3]))
    finally:
        plt.close(fig)
    # numbers shown in the titles can differ from the indices (a figure drawn later from the picked images only)
    fig = plots.overlay_figure(images[idx], maps[idx], masks[idx], labels[idx], torch.rand(len(idx)), torch.arange(len(idx)),
                               vmin, vmax, numbers=idx.tolist())
    try:
        assert [t.get_text().split(" ")[0] for t in fig.axes[0].get_xticklabels()] == [f"#{i}" for i in idx.tolist()]
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- a logged run


def test_synthetic_run_logs_pro_and_overlays(tmp_path, store):
    from mlflow.tracking import MlflowClient

    from freqexp.run import execute, summary
    from tests.conftest import FAST, compose_cfg

    cfg = compose_cfg(["dataset=synthetic", "model=cae", *FAST, f"tracking.uri={store}",
                       "dataset.n_train=48", "dataset.n_val=16", "dataset.n_test=24"])
    result = execute(cfg, tmp_path / "run", run_name="run")
    client = MlflowClient(store)
    run = client.get_run(result.run_id)
    assert "anomaly_overlays.png" in {a.path for a in client.list_artifacts(result.run_id)}
    saved = json.loads((result.output_dir / "metrics.json").read_text())
    assert 0.0 <= run.data.metrics["test/pro"] <= 1.0
    assert run.data.metrics["test/pro"] == pytest.approx(saved["test/pro"], rel=1e-9)
    text = summary(cfg, result)
    assert f"PRO (FPR <= 0.3) {saved['test/pro']:.4f}" in text and "pixel AUROC" in text
