"""The spatial terms of the FFT multi-memory AE recipe: ms_ssim against pytorch_msssim (an
independent implementation) and its scale rule, center_crop against a hand-computed crop,
center_weighted against a numpy reference, and the recipe composed like any loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_msssim import ms_ssim as reference_ms_ssim

from freqexp.errors import ConfigError
from freqexp.losses import LOSS_TERMS, build_loss
from freqexp.losses.spatial import MS_SSIM_WEIGHTS
from freqexp.losses.terms import ssim as our_ssim


def term(name: str, image_size=(28, 28), **params):
    """One term built the way a run builds it (build_loss with the dataset's image size)."""
    loss = build_loss({"spec": name, "weights": {}, "params": {name: params}}, image_size=image_size)
    return lambda pred, target: loss(pred, target)[1][name]


def similar_pair(seed=0, b=2, c=1, h=28, w=28, noise=0.2):
    """A target and a noisy prediction of it (correlated, so SSIM is well inside (0, 1))."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(b, c, h, w, generator=g)
    t = torch.nn.functional.avg_pool2d(t, 3, stride=1, padding=1)  # some structure across scales
    p = (t + noise * (torch.rand(b, c, h, w, generator=g) - 0.5)).clamp(0, 1)
    return p, t


def renormalized(n):
    w = np.array(MS_SSIM_WEIGHTS[:n])
    return list(w / w.sum())


# ----------------------------------------------------------------------------- ms_ssim
@pytest.mark.parametrize("size,channels", [((161, 161), 1), ((171, 166), 3)])
def test_ms_ssim_matches_pytorch_msssim_at_five_scales(size, channels):
    p, t = similar_pair(1, b=1, c=channels, h=size[0], w=size[1])
    ours = 1 - float(term("ms_ssim", image_size=size, win_size=11, sigma=1.5)(p, t))
    # exactly its algorithm with our renormalized weights; odd sides exercise the padded pooling
    assert ours == pytest.approx(float(reference_ms_ssim(p, t, data_range=1.0, weights=renormalized(5))), rel=1e-5)
    # and its default weights (they sum to 1.0001, hence the looser tolerance)
    assert ours == pytest.approx(float(reference_ms_ssim(p, t, data_range=1.0)), rel=1e-4)
    assert 0.2 < ours < 0.999


@pytest.mark.parametrize("scales", [2, 3, 4])
def test_explicit_scales_match_pytorch_msssim_with_the_first_weights(scales):
    p, t = similar_pair(2, b=1, c=1, h=170, w=175)
    ours = 1 - float(term("ms_ssim", image_size=(170, 175), scales=scales)(p, t))
    ref = float(reference_ms_ssim(p, t, data_range=1.0, weights=renormalized(scales)))
    assert ours == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize(
    "side,expected",
    [(11, 1), (20, 1), (21, 2), (28, 2), (32, 2), (40, 2), (41, 3), (80, 3), (81, 4), (160, 4), (161, 5), (200, 5)],
)
def test_auto_uses_every_scale_whose_smallest_side_fits_the_window(side, expected):
    """Scale s has side ceil(n / 2^(s-1)) (pooling pads odd sides); it fits when >= win_size 11."""
    p, t = similar_pair(3, b=1, h=side, w=side + 3)
    auto = term("ms_ssim", image_size=(side, side + 3))(p, t)
    explicit = term("ms_ssim", image_size=(side, side + 3), scales=expected)(p, t)
    assert float(auto) == float(explicit)
    if expected < 5:  # one more scale does not fit: rejected up front
        with pytest.raises(ConfigError):
            term("ms_ssim", image_size=(side, side + 3), scales=expected + 1)


def test_auto_at_28_px_is_finite_with_gradients_and_zero_for_identical_images():
    p, t = similar_pair(4, b=4, c=1, h=28, w=28)
    p.requires_grad_(True)
    value = term("ms_ssim")(p, t)
    assert torch.isfinite(value) and 0 < float(value.detach()) < 1
    value.backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert float(term("ms_ssim")(t, t.clone())) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("win_size,size,channels", [(15, (28, 28), 1), (11, (20, 33), 3), (7, (12, 12), 1)])  # 13 px would fit 2: ceil(13/2) = 7
def test_one_scale_is_one_minus_ssim(win_size, size, channels):
    p, t = similar_pair(5, c=channels, h=size[0], w=size[1])
    value = term("ms_ssim", image_size=size, win_size=win_size)(p, t)
    assert float(value) == pytest.approx(1 - float(our_ssim(p, t, win_size=win_size, sigma=1.5)), abs=1e-6)


def test_gradient_matches_finite_difference_at_two_scales():
    g = torch.Generator().manual_seed(6)
    t = torch.rand(1, 1, 22, 22, generator=g, dtype=torch.float64)
    p = (t + 0.1 * torch.rand(1, 1, 22, 22, generator=g, dtype=torch.float64)).clamp(0, 1).requires_grad_(True)
    f = term("ms_ssim", image_size=(22, 22))
    f(p, t).backward()
    # the term computes in fp32 whatever its input, so the step must be large enough that fp32
    # rounding of the loss (~1e-7) stays small against the difference: 1e-3 left ~20 % noise
    h = 1e-2
    for idx in [(0, 0, 10, 11), (0, 0, 0, 0), (0, 0, 21, 3)]:
        e = torch.zeros_like(p)
        e[idx] = h
        with torch.no_grad():
            fd = (f(p + e, t) - f(p - e, t)) / (2 * h)
        assert float(p.grad[idx]) == pytest.approx(float(fd), rel=3e-2, abs=3e-4), idx


def test_finite_under_bf16_autocast_and_computed_in_fp32():
    p, t = similar_pair(7, c=3)
    p, t = p.bfloat16().requires_grad_(True), t.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = term("ms_ssim")(p, t)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(p.grad.float()).all()
    assert float(value.detach()) == pytest.approx(float(term("ms_ssim")(p.detach().float(), t.float())), rel=1e-6)


def test_too_many_explicit_scales_fail_in_build_loss_naming_the_size():
    with pytest.raises(ConfigError) as e:
        term("ms_ssim", image_size=(28, 28), scales=3)  # needs 10 * 4 + 1 = 41 px
    assert e.value.key == "loss" and "41x41" in e.value.message
    term("ms_ssim", image_size=(41, 41), scales=3)  # exactly enough


def test_too_small_for_one_scale_fails_up_front_with_auto():
    with pytest.raises(ConfigError) as e:
        term("ms_ssim", image_size=(10, 28))
    assert "11x11" in e.value.message


def test_built_without_image_size_still_fails_with_a_config_error_not_a_crash():
    loss = build_loss({"spec": "ms_ssim", "params": {"ms_ssim": {"scales": 4}}})
    p, t = similar_pair(8)
    with pytest.raises(ConfigError) as e:
        loss(p, t)
    assert e.value.key == "loss.params.ms_ssim.scales"


@pytest.mark.parametrize("key,value", [("scales", 0), ("scales", 6), ("scales", "many"), ("scales", 2.5),
                                       ("win_size", 8), ("win_size", 1), ("sigma", 0)])
def test_bad_options_are_config_errors(key, value):
    with pytest.raises(ConfigError) as e:
        term("ms_ssim", image_size=(300, 300), **{key: value})
    assert e.value.key == f"loss.params.ms_ssim.{key}"


# ----------------------------------------------------------------------------- center_crop
def test_center_crop_is_the_loss_of_the_hand_cut_centre():
    p, t = similar_pair(9, b=3, c=2, noise=0.5)
    # 28 px, fraction 0.5: the central 14 rows and columns, 7..20
    expected_mse = float(((p[:, :, 7:21, 7:21] - t[:, :, 7:21, 7:21]) ** 2).mean())
    expected_l1 = float((p[:, :, 7:21, 7:21] - t[:, :, 7:21, 7:21]).abs().mean())
    assert float(term("center_crop")(p, t)) == pytest.approx(expected_mse, rel=1e-6)
    assert float(term("center_crop", base="l1")(p, t)) == pytest.approx(expected_l1, rel=1e-6)


def test_center_crop_odd_non_square_and_other_fraction():
    p, t = similar_pair(10, h=31, w=95, noise=0.5)
    # fraction 0.5: round(15.5) = 16 rows from (31 - 16) // 2 = 7; round(47.5) = 48 cols from 23
    crop = (slice(7, 23), slice(23, 71))
    expected = float(((p[..., crop[0], crop[1]] - t[..., crop[0], crop[1]]) ** 2).mean())
    assert float(term("center_crop", image_size=(31, 95))(p, t)) == pytest.approx(expected, rel=1e-6)
    # fraction 0.25 of 28: 7 rows/cols from 10
    p, t = similar_pair(11, noise=0.5)
    expected = float(((p[..., 10:17, 10:17] - t[..., 10:17, 10:17]) ** 2).mean())
    assert float(term("center_crop", fraction=0.25)(p, t)) == pytest.approx(expected, rel=1e-6)
    # fraction 1: the plain MSE
    assert float(term("center_crop", fraction=1.0)(p, t)) == pytest.approx(float(((p - t) ** 2).mean()), rel=1e-6)


def test_center_crop_ignores_the_border():
    p, t = similar_pair(12, noise=0.5)
    q = p.clone()
    q[..., :7, :] = 1 - q[..., :7, :]
    q[..., :, 21:] = 0
    assert float(term("center_crop")(q, t)) == float(term("center_crop")(p, t))


@pytest.mark.parametrize("key,value", [("fraction", 0), ("fraction", 1.5), ("base", "huber")])
def test_center_crop_bad_options(key, value):
    with pytest.raises(ConfigError) as e:
        term("center_crop", **{key: value})
    assert e.value.key == f"loss.params.center_crop.{key}"


# ----------------------------------------------------------------------------- center_weighted
def np_center_weighted(p, t, sigma):
    h, w = p.shape[-2:]
    y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    d2 = ((y - (h - 1) / 2) / (sigma * h)) ** 2 + ((x - (w - 1) / 2) / (sigma * w)) ** 2
    weight = np.exp(-d2 / 2)
    weight = weight / weight.mean()
    return np.mean(weight * (p - t) ** 2)


@pytest.mark.parametrize("size", [(28, 28), (32, 32), (31, 95)])
@pytest.mark.parametrize("sigma", [0.25, 0.1, 1.0])
def test_center_weighted_matches_numpy(size, sigma):
    p, t = similar_pair(13, b=2, c=3, h=size[0], w=size[1], noise=0.5)
    got = float(term("center_weighted", image_size=size, sigma=sigma)(p, t))
    assert got == pytest.approx(np_center_weighted(p.double().numpy(), t.double().numpy(), sigma), rel=1e-5)


def test_center_weighted_weights_have_mean_one_and_favour_the_centre():
    t = torch.zeros(1, 1, 28, 28)
    assert float(term("center_weighted")(t + 0.5, t)) == pytest.approx(0.25, rel=1e-6)  # constant error: MSE
    centre, corner = t.clone(), t.clone()
    centre[..., 14, 14] = 1
    corner[..., 0, 0] = 1
    assert float(term("center_weighted")(centre, t)) > 10 * float(term("center_weighted")(corner, t))


def test_center_weighted_bad_sigma():
    with pytest.raises(ConfigError) as e:
        term("center_weighted", sigma=-1)
    assert e.value.key == "loss.params.center_weighted.sigma"


# ----------------------------------------------------------------------------- composition
def test_study_recipe_composes_from_the_command_line():
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["loss=mse+center_crop+ms_ssim+center_weighted", "loss.weights.mse=0.6",
                       "loss.weights.ms_ssim=0.5", "loss.weights.center_weighted=0.5"])
    assert cfg.loss.params.ms_ssim.scales == "auto"
    loss = build_loss(cfg.loss, image_size=(28, 28))
    p, t = similar_pair(14, b=4)
    total, parts = loss(p, t)
    assert set(parts) == {"mse", "center_crop", "ms_ssim", "center_weighted"}
    expected = 0.6 * parts["mse"] + 1.0 * parts["center_crop"] + 0.5 * parts["ms_ssim"] + 0.5 * parts["center_weighted"]
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    assert float(parts["mse"]) == pytest.approx(float(((p - t) ** 2).mean()), rel=1e-6)
    assert all(n in LOSS_TERMS for n in ("ms_ssim", "center_crop", "center_weighted"))
