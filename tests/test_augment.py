"""Augments: the CutPaste family (plain, scaled, frequency-aware with every strategy),
flip_rot, their config validation, one real training step per augment option, and the
pseudo-anomaly validation set built from them."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from freqexp.augment import build_augment
from freqexp.augment.base import NoAugment
from freqexp.augment.cutpaste import FrequencyCutPaste, PlainCutPaste, ScaledCutPaste
from freqexp.augment.geometric import FlipRot
from freqexp.data import build_dataset
from freqexp.data.pseudo import with_expanded_train, with_pseudo_val
from freqexp.errors import ConfigError
from freqexp.training import ReconstructionModule
from freqexp.validate import make_plan
from tests.conftest import compose_cfg

REPO = Path(__file__).resolve().parent.parent

HP = {"name": "fft", "kind": "butterworth", "pass": "high", "cutoff": 0.2, "order": 2}
VARIANTS = {
    "cutpaste": lambda **kw: PlainCutPaste(**kw),
    "scaled_cutpaste": lambda **kw: ScaledCutPaste(**kw),
    "freq-patch_filter": lambda **kw: FrequencyCutPaste(strategy="patch_filter", **kw),
    "freq-image_filter": lambda **kw: FrequencyCutPaste(strategy="image_filter", **kw),
    "freq-dual_path-mix": lambda **kw: FrequencyCutPaste(strategy="dual_path", dual_mode="mix", **kw),
    "freq-dual_path-random": lambda **kw: FrequencyCutPaste(strategy="dual_path", dual_mode="random", **kw),
    "freq-freq_weighted": lambda **kw: FrequencyCutPaste(strategy="freq_weighted", **kw),
}
EXACT = [v for v in VARIANTS if v != "freq-image_filter"]


def textures(b, c=3, h=48, w=48, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def box_of(mask2d: torch.Tensor):
    """(y0, y1, x0, x1) bounding box of a non-empty [H, W] bool mask (half-open)."""
    rows = torch.nonzero(mask2d.any(1)).flatten()
    cols = torch.nonzero(mask2d.any(0)).flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def is_rectangle(mask2d: torch.Tensor) -> bool:
    if not mask2d.any():
        return False
    y0, y1, x0, x1 = box_of(mask2d)
    full = torch.zeros_like(mask2d)
    full[y0:y1, x0:x1] = True
    return torch.equal(full, mask2d)


# ----------------------------------------------------------------------------- synthesize
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_synthesize_shapes_range_and_mask(variant):
    aug = VARIANTS[variant](p=1.0)
    x = textures(16)
    torch.manual_seed(0)
    out, mask = aug.synthesize(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert mask.shape == (16, 1, 48, 48) and mask.dtype == torch.bool
    assert mask.flatten(1).any(1).float().mean() > 0.8  # (almost) every image gets a defect
    if variant == "freq-image_filter":
        for b in range(16):
            assert is_rectangle(mask[b, 0]), f"image {b}: mask is not one axis-aligned rectangle"
        # the whole image is filtered, not only the patch
        assert ((out - x).abs().amax(1, keepdim=True) > 1e-3)[~mask].float().mean() > 0.5


@pytest.mark.parametrize("variant", EXACT)
def test_changed_pixels_are_exactly_the_mask(variant):
    aug = VARIANTS[variant](p=1.0)
    x = textures(16, seed=1)
    torch.manual_seed(1)
    out, mask = aug.synthesize(x)
    outside = ~mask.expand_as(x)
    assert torch.equal(out[outside], x[outside])  # nothing outside the mask moved, not even a bit
    changed = (out - x).abs().amax(1, keepdim=True) > 1e-6
    assert torch.equal(changed, mask)


def test_plain_cutpaste_masks_are_rectangles_with_area_and_aspect_in_range():
    area, aspect = (0.02, 0.15), (0.3, 3.3)
    h = w = 64
    aug = PlainCutPaste(p=1.0, area=area, aspect=aspect)
    x = textures(64, c=1, h=h, w=w, seed=2)
    torch.manual_seed(2)
    out, mask = aug.synthesize(x)
    n_checked = 0
    for b in range(64):
        m = mask[b, 0]
        if not m.any():  # the patch landed exactly on its own source: nothing changed
            assert torch.equal(out[b], x[b])
            continue
        n_checked += 1
        assert is_rectangle(m), f"image {b}: not a rectangle"
        y0, y1, x0, x1 = box_of(m)
        dh, dw = y1 - y0, x1 - x0
        # sides are rounded to whole pixels: up to half a pixel per side
        assert (dh + 0.5) * (dw + 0.5) >= area[0] * h * w - 1e-6, (b, dh, dw)
        assert (dh - 0.5) * (dw - 0.5) <= area[1] * h * w + 1e-6, (b, dh, dw)
        assert (dh + 0.5) / (dw - 0.5) >= aspect[0] and (dh - 0.5) / (dw + 0.5) <= aspect[1], (b, dh, dw)
    assert n_checked >= 60


def test_plain_cutpaste_pastes_a_copy_of_another_region():
    aug = PlainCutPaste(p=1.0)
    x = textures(8, c=1, h=40, w=40, seed=3)
    torch.manual_seed(3)
    out, mask = aug.synthesize(x)
    for b in range(8):
        if not mask[b, 0].any():
            continue
        y0, y1, x0, x1 = box_of(mask[b, 0])
        patch = out[b, 0, y0:y1, x0:x1]
        # the patch occurs somewhere in the original image (the cut), at another place
        windows = x[b, 0].unfold(0, y1 - y0, 1).unfold(1, x1 - x0, 1)
        hits = torch.nonzero((windows == patch).all(-1).all(-1))
        assert len(hits) >= 1
        assert all((int(r), int(c)) != (y0, x0) for r, c in hits)


def test_scaled_cutpaste_scale_two_doubles_the_sides():
    area, aspect = (0.01, 0.04), (0.5, 2.0)
    h = w = 64
    x = textures(48, c=1, h=h, w=w, seed=4)
    double = ScaledCutPaste(p=1.0, area=area, aspect=aspect, scale=[2, 2])
    single = ScaledCutPaste(p=1.0, area=area, aspect=aspect, scale=[1, 1])
    torch.manual_seed(4)
    _, m2 = double.synthesize(x)
    torch.manual_seed(4)  # same draws of size and aspect, scale 1
    _, m1 = single.synthesize(x)
    compared = 0
    for b in range(48):
        assert m2[b, 0].any()
        y0, y1, x0, x1 = box_of(m2[b, 0])
        dh, dw = y1 - y0, x1 - x0
        # the pasted region is the cut scaled x2 per side: area x4 (each side rounded to a pixel)
        assert (dh + 0.5) * (dw + 0.5) >= 4 * area[0] * h * w - 1e-6, (b, dh, dw)
        assert (dh - 0.5) * (dw - 0.5) <= 4 * area[1] * h * w + 1e-6, (b, dh, dw)
        # nearly a full rectangle (a fixed point of the scaling can leave a pixel unchanged)
        assert m2[b, 0].sum() >= 0.95 * dh * dw
        if m1[b, 0].any():
            a0, a1, c0, c1 = box_of(m1[b, 0])
            assert abs(dh - 2 * (a1 - a0)) <= 1 and abs(dw - 2 * (c1 - c0)) <= 1, (b, dh, dw, a1 - a0, c1 - c0)
            compared += 1
    assert compared >= 40


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_image_of_a_batch_gets_its_own_box(variant):
    aug = VARIANTS[variant](p=1.0)
    x = textures(1, seed=5).repeat(12, 1, 1, 1)  # the same image 12 times
    torch.manual_seed(5)
    out, mask = aug.synthesize(x)
    masks = mask.flatten(1)
    distinct = {tuple(torch.nonzero(m).flatten().tolist()) for m in masks}
    assert len(distinct) == 12
    assert not torch.equal(out[0], out[1])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_with_p_one_returns_augmented_and_clean_target(variant):
    aug = VARIANTS[variant](p=1.0)
    x = textures(8, seed=6)
    torch.manual_seed(6)
    expected, _ = aug.synthesize(x)
    torch.manual_seed(6)
    x_in, target = aug(x)
    assert torch.equal(target, x)
    assert torch.equal(x_in, expected)
    assert sum(not torch.equal(x_in[b], x[b]) for b in range(8)) >= 7


@pytest.mark.parametrize("variant", ["cutpaste", "freq-patch_filter"])
def test_forward_with_p_half_augments_about_half_the_batch(variant):
    aug = VARIANTS[variant](p=0.5)
    x = textures(400, c=1, h=24, w=24, seed=7)
    torch.manual_seed(7)
    x_in, target = aug(x)
    assert torch.equal(target, x)
    unchanged = int((x_in == x).flatten(1).all(1).sum())
    # Binomial(400, 0.5): mean 200, sd 10; +-6 sd (a few augmented images may change nothing)
    assert 140 <= unchanged <= 260, unchanged


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_deterministic_under_manual_seed(variant):
    aug = VARIANTS[variant](p=0.5)
    x = textures(8, seed=8)
    runs = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        out, mask = aug.synthesize(x)
        torch.manual_seed(seed)
        x_in, _ = aug(x)
        runs.append((out, mask, x_in))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][1], runs[2][1])


def test_patch_filter_high_pass_patch_has_the_image_mean():
    """A high-passed patch has (almost) no low-frequency content left: its mean is the image's
    mean (added back), whatever the brightness of the region it was cut from."""
    h = w = 64
    g = torch.Generator().manual_seed(9)
    wave = 0.35 + 0.25 * torch.cos(2 * math.pi * torch.arange(w) / w).view(1, w).expand(h, w)  # 1 cycle: r = 1/32
    # per-image brightness away from 0.5, so "the image's mean" is not a constant
    x = (wave + 0.1 * torch.rand(32, 1, 1, 1, generator=g) + 0.05 * torch.randn(32, 1, h, w, generator=g)).clamp(0, 1)

    def deviations(aug):
        torch.manual_seed(9)
        out, mask = aug.synthesize(x)
        dev = [float(out[b, 0][mask[b, 0]].mean() - x[b].mean()) for b in range(32) if mask[b, 0].sum() > 0]
        assert len(dev) >= 30
        return np.abs(dev)

    hp = deviations(FrequencyCutPaste(p=1.0, scale=(1, 1), strategy="patch_filter", patch_filter=HP))
    plain = deviations(PlainCutPaste(p=1.0))
    lp = deviations(FrequencyCutPaste(p=1.0, scale=(1, 1), strategy="patch_filter",
                                      patch_filter={**HP, "pass": "low"}))
    assert hp.max() < 0.03, hp.max()
    # the control: unfiltered and low-passed patches keep their region's brightness
    assert plain.max() > 0.15 and lp.max() > 0.15


@pytest.mark.parametrize("mode", ["random", "mix"])
def test_dual_path_pastes_the_high_or_low_passed_patch_or_a_mix(mode):
    x = textures(16, c=1, h=24, w=24, seed=10)
    aug = FrequencyCutPaste(p=1.0, scale=(1, 1), strategy="dual_path", dual_mode=mode)
    with torch.no_grad():
        hp = (aug.filter(x) + x.mean(dim=(-2, -1), keepdim=True)).clamp(0, 1)  # mean added back
        lp = aug.low(x).clamp(0, 1)
    torch.manual_seed(10)
    out, mask = aug.synthesize(x)

    def found_in(source, b, patch):
        ph, pw = patch.shape
        windows = source[b, 0].unfold(0, ph, 1).unfold(1, pw, 1)
        return bool(((windows - patch).abs().amax((-2, -1)) < 1e-5).any())

    kinds = []
    for b in range(16):
        assert mask[b, 0].any()
        y0, y1, x0, x1 = box_of(mask[b, 0])
        patch = out[b, 0, y0:y1, x0:x1]
        kinds.append((found_in(hp, b, patch), found_in(lp, b, patch)))
    if mode == "random":
        assert all(h != l for h, l in kinds)  # exactly one of the two paths
        assert 0 < sum(h for h, _ in kinds) < 16  # and both paths occur
    else:
        assert sum(h or l for h, l in kinds) <= 2  # a random mix is (almost) never a pure path


# ----------------------------------------------------------------------------- flip_rot
def square_symmetries(x: np.ndarray):
    """The 8 symmetries in FlipRot's order, written with numpy index arithmetic."""
    n = x.shape[-1]
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    pick = lambda yi, xj: x[..., yi, xj]  # noqa: E731  out[i, j] = x[yi(i, j), xj(i, j)]
    return [
        x,
        pick(i, n - 1 - j),  # flip_h
        pick(n - 1 - i, j),  # flip_v
        pick(n - 1 - i, n - 1 - j),  # rot180
        pick(j, n - 1 - i),  # rot90 (counter-clockwise, torch.rot90 k=1)
        pick(n - 1 - j, i),  # rot270
        pick(j, i),  # transpose
        pick(n - 1 - j, n - 1 - i),  # anti-transpose
    ]


@pytest.mark.parametrize("multiplicity", [1, 2, 5, 8])
def test_flip_rot_expand_square(multiplicity):
    x = torch.rand(3, 2, 9, 9, generator=torch.Generator().manual_seed(11))
    out = FlipRot(multiplicity).expand(x)
    assert out.shape == (3 * multiplicity, 2, 9, 9)
    want = square_symmetries(x.numpy())
    torch_want = [x, x.flip(-1), x.flip(-2), x.flip(-2).flip(-1), torch.rot90(x, 1, (-2, -1)),
                  torch.rot90(x, 3, (-2, -1)), x.transpose(-1, -2), torch.rot90(x, 2, (-2, -1)).transpose(-1, -2)]
    for k in range(multiplicity):
        block = out[3 * k: 3 * (k + 1)]
        np.testing.assert_array_equal(block.numpy(), want[k])
        assert torch.equal(block, torch_want[k])
    assert torch.equal(out[:3], x)  # originals first
    blocks = {out[3 * k: 3 * (k + 1)].numpy().tobytes() for k in range(multiplicity)}
    assert len(blocks) == multiplicity  # all distinct transforms


def test_flip_rot_non_square():
    x = torch.rand(2, 1, 31, 95, generator=torch.Generator().manual_seed(12))
    out = FlipRot(4).expand(x)
    assert out.shape == (8, 1, 31, 95)
    for k, t in enumerate([x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]):
        assert torch.equal(out[2 * k: 2 * (k + 1)], t)
    with pytest.raises(ConfigError) as e:
        FlipRot(5).expand(x)
    assert e.value.key == "augment.multiplicity"


@pytest.mark.parametrize("m", [0, 9, -1, 2.5, True, "5"])
def test_flip_rot_bad_multiplicity(m):
    with pytest.raises(ConfigError) as e:
        FlipRot(m)
    assert e.value.key == "augment.multiplicity"


def test_flip_rot_forward_is_identity():
    x = textures(4)
    x_in, target = FlipRot(5)(x)
    assert torch.equal(x_in, x) and torch.equal(target, x)


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides,key",
    [
        (["augment=cutpaste", "augment.p=0"], "augment.p"),
        (["augment=cutpaste", "augment.p=1.5"], "augment.p"),
        (["augment=cutpaste", "augment.area=[0.5,0.1]"], "augment.area"),
        (["augment=cutpaste", "augment.area=[0.1]"], "augment.area"),
        (["augment=scaled_cutpaste", "augment.scale=[2,1]"], "augment.scale"),
        (["augment=scaled_cutpaste", "augment.aspect=[0,1]"], "augment.aspect"),
        (["augment=freq_cutpaste", "augment.strategy=foo"], "augment.strategy"),
        (["augment=freq_cutpaste", "augment.dual_mode=foo"], "augment.dual_mode"),
        (["augment=freq_cutpaste", "augment.band_weights=[1,1,1]"], "augment.band_weights"),
        (["augment=freq_cutpaste", "augment.band_weights=[1,1,1,1,-1]"], "augment.band_weights"),
        (["augment=freq_cutpaste", "augment.band_edges=[0.3,0.1,0.4,0.5]"], "augment.band_edges"),
        (["augment=freq_cutpaste", "augment.patch_filter.cutoff=0"], "augment.patch_filter.cutoff"),
        (["augment=freq_cutpaste", "augment.low_filter.kind=box"], "augment.low_filter.kind"),
        (["augment=flip_rot", "augment.multiplicity=0"], "augment.multiplicity"),
        (["augment=flip_rot", "augment.multiplicity=9"], "augment.multiplicity"),
        (["augment=noise", "augment.std=0"], "augment.std"),
        (["augment=noise", "augment.p=0"], "augment.p"),
    ],
)
def test_bad_augment_values_name_the_key(overrides, key):
    cfg = compose_cfg(["dataset=synthetic", *overrides])
    with pytest.raises(ConfigError) as e:
        make_plan(cfg)
    assert e.value.key == key


AUGMENT_OPTIONS = sorted(p.stem for p in (REPO / "conf" / "augment").glob("*.yaml"))


@pytest.fixture(scope="module")
def synthetic():
    return build_dataset(compose_cfg(["dataset=synthetic"]).dataset)


@pytest.mark.parametrize("option", AUGMENT_OPTIONS)
def test_every_augment_option_composes_and_trains_one_step(option, synthetic):
    cfg = compose_cfg(["dataset=synthetic", f"augment={option}"])
    assert cfg.augment.name == option
    plan = make_plan(cfg)
    module = ReconstructionModule.from_plan(plan, cfg, max_epochs=1)
    module.train()
    images = synthetic.train.images[:8]
    if option == "flip_rot":
        images = plan.augment.expand(images)
        assert len(images) == 8 * cfg.augment.multiplicity
    batch = module.on_after_batch_transfer(images, 0)
    assert batch.dtype == torch.float32 and float(batch.max()) <= 1.0
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() without a Trainer warns
        loss = module.training_step(batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    grads = [p.grad for p in plan.model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # the synthesizing / noising augments really change the model input in training
    if option not in ("none", "flip_rot"):
        changed = False
        for _ in range(4):
            x_in, target = module.model_io(batch, train=True)
            assert torch.equal(target, batch)
            changed |= not torch.equal(x_in, batch)
        assert changed
    else:
        x_in, target = module.model_io(batch, train=True)
        assert torch.equal(x_in, batch) and torch.equal(target, batch)


# ----------------------------------------------------------------------------- pseudo validation
def source_normal(anomaly: torch.Tensor, mask: torch.Tensor, normals: torch.Tensor) -> int:
    """Index of a normal equal to `anomaly` everywhere outside `mask` (-1 if none)."""
    outside = ~mask.expand_as(anomaly)
    same = (normals[:, outside] == anomaly[outside]).all(1)
    hits = torch.nonzero(same).flatten()
    return int(hits[0]) if len(hits) else -1


def test_pseudo_val_keeps_normals_and_adds_masked_anomalies(synthetic):
    old = synthetic.val
    normals = old.images[old.labels == 0]
    state = torch.get_rng_state()
    data = with_pseudo_val(synthetic, NoAugment(), seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    val = data.val
    n_norm, n_anom = len(normals), old.n_anomalous
    assert len(val) == n_norm + n_anom
    assert torch.equal(val.labels, torch.cat([torch.zeros(n_norm), torch.ones(n_anom)]).long())
    assert torch.equal(val.images[:n_norm], normals)
    assert val.images.dtype == torch.uint8 and val.masks.dtype == torch.bool
    assert val.masks.shape == (len(val), 1, *val.images.shape[-2:])
    assert not val.masks[:n_norm].any()
    anomalies, masks = val.images[n_norm:], val.masks[n_norm:]
    assert masks.flatten(1).any(1).float().mean() >= 0.9
    for a, m in zip(anomalies, masks):
        if not m.any():
            continue
        k = source_normal(a, m, normals)
        assert k >= 0, "an anomaly changed pixels outside its mask"
        # plain CutPaste copies pixels: every masked pixel really changed
        assert ((a != normals[k]).any(0) == m[0]).all()
        # a pasted rectangle; uint8 textures repeat values, so pixels pasted onto an equal
        # value are unchanged and left out of the (exact) mask
        y0, y1, x0, x1 = box_of(m[0])
        assert m[0].sum() >= 0.8 * (y1 - y0) * (x1 - x0)
    assert data.train is synthetic.train and data.test is synthetic.test
    assert "PlainCutPaste" in data.info["val_anomalies"]


def test_pseudo_val_is_reproducible_per_seed(synthetic):
    a = with_pseudo_val(synthetic, NoAugment(), seed=0).val
    b = with_pseudo_val(synthetic, NoAugment(), seed=0).val
    c = with_pseudo_val(synthetic, NoAugment(), seed=1).val
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, c.images)


def test_pseudo_val_non_synthesizing_augment_falls_back_to_plain_cutpaste(synthetic):
    fallback = with_pseudo_val(synthetic, NoAugment(), seed=3)
    noise = with_pseudo_val(synthetic, build_augment(compose_cfg(["augment=noise"]).augment), seed=3)
    explicit = with_pseudo_val(synthetic, PlainCutPaste(p=1.0), seed=3)
    for other in (noise, explicit):
        assert torch.equal(fallback.val.images, other.val.images)
        assert torch.equal(fallback.val.masks, other.val.masks)


def test_pseudo_val_uses_a_synthesizing_augment(synthetic):
    aug = FrequencyCutPaste(p=0.5, strategy="patch_filter")
    data = with_pseudo_val(synthetic, aug, seed=0)
    assert "FrequencyCutPaste" in data.info["val_anomalies"]
    val = data.val
    normals = synthetic.val.images[synthetic.val.labels == 0]
    n = len(normals)
    assert val.n_anomalous == synthetic.val.n_anomalous
    assert not torch.equal(val.images[n:], with_pseudo_val(synthetic, NoAugment(), seed=0).val.images[n:])
    for a, m in zip(val.images[n:], val.masks[n:]):
        assert m.any()
        assert source_normal(a, m, normals) >= 0


def test_with_expanded_train_multiplies_the_train_split(synthetic):
    data = with_expanded_train(synthetic, FlipRot(5))
    n = len(synthetic.train)
    assert len(data.train) == 5 * n
    assert torch.equal(data.train.images[:n], synthetic.train.images)
    assert torch.equal(data.train.images[n:2 * n], synthetic.train.images.flip(-1))
    assert torch.equal(data.train.labels, torch.zeros(5 * n, dtype=torch.long))
    assert data.val is synthetic.val and data.test is synthetic.test
    assert with_expanded_train(synthetic, NoAugment()) is synthetic
    assert with_expanded_train(synthetic, PlainCutPaste()) is synthetic
