"""Loss terms and the composite loss: values checked against hand computations, torch.nn.functional
and pytorch_msssim (an independent SSIM implementation), plus the config validation of build_loss."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from pytorch_msssim import ssim as reference_ssim

from freqexp.errors import ConfigError
from freqexp.losses import LOSS_TERMS, build_loss, parse_spec

ALL_TERMS = ["mse", "l1", "charbonnier", "ssim", "gradient", "tv", "fft", "focal_freq", "wavelet", "ms_ssim", "center_crop", "center_weighted"]


def term(name: str, **params):
    """One term, built the way a user builds it: through build_loss."""
    cfg = {"spec": name, "weights": {}, "params": {name: params} if params else {}}
    loss = build_loss(cfg)
    return lambda pred, target: loss(pred, target)[1][name]


def rand_images(seed: int, b: int = 2, c: int = 1, h: int = 28, w: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g), torch.rand(b, c, h, w, generator=g)


# A small hand-made pair: pred 1x1x2x3, target 1x1x2x3.
PRED = torch.tensor([[[[0.0, 1.0, 0.5], [0.25, 0.75, 1.0]]]])
TARGET = torch.tensor([[[[0.0, 0.5, 1.0], [0.25, 0.25, 0.0]]]])
# differences d = pred - target: [[0, 0.5, -0.5], [0, 0.5, 1.0]]


def test_registry_has_exactly_the_documented_terms():
    assert sorted(LOSS_TERMS.names()) == sorted(ALL_TERMS)


# --------------------------------------------------------------------------- known values


def test_mse_known_value():
    expected = (0 + 0.25 + 0.25 + 0 + 0.25 + 1.0) / 6  # mean of d^2
    assert term("mse")(PRED, TARGET).item() == pytest.approx(expected, abs=1e-7)


def test_l1_known_value():
    expected = (0 + 0.5 + 0.5 + 0 + 0.5 + 1.0) / 6  # mean of |d|
    assert term("l1")(PRED, TARGET).item() == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("eps", [1e-3, 0.1, 0.5])
def test_charbonnier_known_value(eps):
    d = [0, 0.5, -0.5, 0, 0.5, 1.0]
    expected = sum(math.sqrt(x * x + eps * eps) for x in d) / len(d)
    got = term("charbonnier", eps=eps)(PRED, TARGET).item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_charbonnier_default_eps_is_near_l1_for_large_errors():
    pred, target = torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    # sqrt(1 + 1e-6) with the documented default eps = 1e-3
    assert term("charbonnier")(pred, target).item() == pytest.approx(math.sqrt(1 + 1e-6), rel=1e-7)
    # zero error -> eps exactly
    assert term("charbonnier")(target, target).item() == pytest.approx(1e-3, rel=1e-5)


def test_gradient_known_value():
    # horizontal differences of pred: [[1, -0.5], [0.5, 0.25]]; target: [[0.5, 0.5], [0, -0.25]]
    # |pdx - tdx| = [[0.5, 1.0], [0.5, 0.5]] -> mean 0.625
    # vertical differences of pred: [[0.25, -0.25, 0.5]]; target: [[0.25, -0.25, -1.0]]
    # |pdy - tdy| = [[0, 0, 1.5]] -> mean 0.5
    expected = 0.5 * (0.625 + 0.5)
    assert term("gradient")(PRED, TARGET).item() == pytest.approx(expected, abs=1e-7)


def test_gradient_numpy_reference_random():
    pred, target = rand_images(0, b=3, c=2, h=9, w=11)
    p, t = pred.numpy().astype(np.float64), target.numpy().astype(np.float64)
    gx = np.abs(np.diff(p, axis=3) - np.diff(t, axis=3)).mean()
    gy = np.abs(np.diff(p, axis=2) - np.diff(t, axis=2)).mean()
    assert term("gradient")(pred, target).item() == pytest.approx(0.5 * (gx + gy), rel=1e-5)


def test_gradient_ignores_a_constant_offset():
    pred, _ = rand_images(1, h=8, w=8)
    assert term("gradient")(pred + 0.3, pred).item() == pytest.approx(0.0, abs=1e-6)


def test_tv_known_value():
    # |dx| of pred = [[1, 0.5], [0.5, 0.25]] -> mean 0.5625; |dy| = [[0.25, 0.25, 0.5]] -> mean 1/3
    expected = 0.5625 + 1.0 / 3.0
    assert term("tv")(PRED, TARGET).item() == pytest.approx(expected, abs=1e-6)


def test_tv_ignores_target_and_numpy_reference():
    pred, target = rand_images(2, b=2, c=3, h=7, w=10)
    p = pred.numpy().astype(np.float64)
    expected = np.abs(np.diff(p, axis=3)).mean() + np.abs(np.diff(p, axis=2)).mean()
    tv = term("tv")
    assert tv(pred, target).item() == pytest.approx(expected, rel=1e-5)
    assert tv(pred, torch.zeros_like(target)).item() == pytest.approx(expected, rel=1e-5)
    assert tv(torch.full_like(pred, 0.4), target).item() == 0.0


def test_mse_l1_match_functional_on_random():
    pred, target = rand_images(3, b=4, c=3, h=16, w=16)
    assert term("mse")(pred, target).item() == pytest.approx(F.mse_loss(pred, target).item(), rel=1e-6)
    assert term("l1")(pred, target).item() == pytest.approx(F.l1_loss(pred, target).item(), rel=1e-6)
    p, t = pred.double().numpy(), target.double().numpy()
    assert term("mse")(pred, target).item() == pytest.approx(((p - t) ** 2).mean(), rel=1e-5)


# --------------------------------------------------------------------------- SSIM


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ssim_matches_pytorch_msssim(channels, seed):
    x, y = rand_images(seed, b=3, c=channels)
    # correlated pair too, so SSIM is not near 0 only
    y_corr = (0.7 * x + 0.3 * y).clamp(0, 1)
    for target in (y, y_corr):
        expected = 1.0 - reference_ssim(x, target, data_range=1, win_size=7, size_average=True).item()
        got = term("ssim")(x, target).item()
        assert got == pytest.approx(expected, abs=1e-5)


def test_ssim_window_param_matches_pytorch_msssim():
    x, y = rand_images(5, b=2, c=1)
    y = (0.5 * x + 0.5 * y).clamp(0, 1)
    for win in (3, 5, 11):
        expected = 1.0 - reference_ssim(x, y, data_range=1, win_size=win, size_average=True).item()
        assert term("ssim", win_size=win)(x, y).item() == pytest.approx(expected, abs=1e-5)
    expected = 1.0 - reference_ssim(x, y, data_range=1, win_size=7, win_sigma=2.5, size_average=True).item()
    assert term("ssim", sigma=2.5)(x, y).item() == pytest.approx(expected, abs=1e-5)


def test_ssim_of_constant_images_closed_form():
    # constant images: sigma terms vanish, SSIM = (2ab + c1) / (a^2 + b^2 + c1)
    a, b = 0.2, 0.6
    c1 = 0.01**2
    x, y = torch.full((1, 1, 12, 12), a), torch.full((1, 1, 12, 12), b)
    expected = 1.0 - (2 * a * b + c1) / (a * a + b * b + c1)
    assert term("ssim")(x, y).item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_identical_images_give_zero(channels):
    x, _ = rand_images(7, c=channels)
    assert abs(term("ssim")(x, x).item()) < 1e-5
    assert term("ssim")(x, 1 - x).item() > 0.5  # and a very different image does not


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", ALL_TERMS)
def test_every_term_passes_finite_nonzero_gradients(name):
    pred, target = rand_images(11, c=1, h=16, w=16)
    pred = pred.clone().requires_grad_(True)
    loss = term(name)(pred, target)
    loss.backward()
    assert pred.grad is not None
    assert torch.isfinite(pred.grad).all()
    assert pred.grad.abs().sum().item() > 0


def test_composite_passes_gradients_to_pred():
    pred, target = rand_images(12, c=3, h=28, w=28)
    pred = pred.clone().requires_grad_(True)
    loss = build_loss({"spec": "+".join(ALL_TERMS), "weights": {}, "params": {}})
    total, _ = loss(pred, target)
    total.backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad.abs().sum().item() > 0


def test_mse_gradient_matches_closed_form():
    pred = PRED.clone().requires_grad_(True)
    term("mse")(pred, TARGET).backward()
    assert torch.allclose(pred.grad, 2 * (PRED - TARGET) / PRED.numel(), atol=1e-7)


# --------------------------------------------------------------------------- composition


def test_weights_compose():
    pred, target = rand_images(20)
    loss = build_loss({"spec": "mse+ssim", "weights": {"mse": 1.0, "ssim": 0.5}, "params": {}})
    total, parts = loss(pred, target)
    assert set(parts) == {"mse", "ssim"}
    mse = F.mse_loss(pred, target).item()
    ssim_l = 1.0 - reference_ssim(pred, target, data_range=1, win_size=7, size_average=True).item()
    assert parts["mse"].item() == pytest.approx(mse, rel=1e-6)
    assert parts["ssim"].item() == pytest.approx(ssim_l, abs=1e-5)
    assert total.item() == pytest.approx(1.0 * mse + 0.5 * ssim_l, abs=1e-5)


def test_default_weight_is_one_and_zero_weight_drops_term():
    pred, target = rand_images(21)
    total, parts = build_loss({"spec": "l1+tv", "weights": {}, "params": {}})(pred, target)
    assert total.item() == pytest.approx(parts["l1"].item() + parts["tv"].item(), rel=1e-6)
    total0, parts0 = build_loss({"spec": "l1+tv", "weights": {"tv": 0}, "params": {}})(pred, target)
    assert total0.item() == pytest.approx(parts0["l1"].item(), rel=1e-6)
    assert parts0["tv"].item() > 0  # still reported for logging


def test_weights_compose_all_terms_from_omegaconf():
    pred, target = rand_images(22, c=3)
    weights = {"mse": 2.0, "l1": 0.25, "charbonnier": 1.5, "ssim": 0.5, "gradient": 3, "tv": 0.1}
    cfg = OmegaConf.create({"spec": "+".join(ALL_TERMS), "weights": weights, "params": {"charbonnier": {"eps": 0.01}}})
    total, parts = build_loss(cfg)(pred, target)
    expected = sum(weights.get(n, 1.0) * parts[n].item() for n in ALL_TERMS)  # unlisted terms weigh 1
    assert total.item() == pytest.approx(expected, rel=1e-6)
    # and the parts are the standalone terms
    assert parts["charbonnier"].item() == pytest.approx(
        torch.sqrt((pred - target) ** 2 + 0.01**2).mean().item(), rel=1e-6
    )


def test_any_order_gives_the_same_total():
    pred, target = rand_images(23)
    weights = {"mse": 1.0, "ssim": 0.5, "tv": 0.2, "l1": 2.0}
    totals = []
    for order in itertools.permutations(["mse", "ssim", "tv", "l1"]):
        total, parts = build_loss({"spec": "+".join(order), "weights": weights, "params": {}})(pred, target)
        assert set(parts) == set(order)
        totals.append(total.item())
    assert max(totals) - min(totals) < 1e-6
    assert totals[0] > 0


def test_spec_tolerates_spaces():
    assert parse_spec(" mse + ssim ") == ["mse", "ssim"]


# --------------------------------------------------------------------------- config errors


def test_unknown_term_lists_known_terms():
    with pytest.raises(ConfigError) as e:
        build_loss({"spec": "mse+perceptual", "weights": {}, "params": {}})
    msg = str(e.value)
    assert e.value.key == "loss"
    assert "perceptual" in msg
    for name in ALL_TERMS:
        assert name in msg


@pytest.mark.parametrize("spec", ["", "   ", None, "mse+", "+ssim"])
def test_empty_or_malformed_spec(spec):
    with pytest.raises(ConfigError) as e:
        build_loss({"spec": spec, "weights": {}, "params": {}})
    assert e.value.key == "loss"


def test_repeated_term():
    with pytest.raises(ConfigError) as e:
        build_loss({"spec": "mse+ssim+mse", "weights": {}, "params": {}})
    assert e.value.key == "loss"
    assert "mse" in str(e.value) and "twice" in str(e.value)


@pytest.mark.parametrize("bad", [-0.5, -1, float("nan"), "1.0", True])
def test_bad_weight_names_the_key(bad):
    with pytest.raises(ConfigError) as e:
        build_loss({"spec": "mse+ssim", "weights": {"ssim": bad}, "params": {}})
    assert e.value.key == "loss.weights.ssim"
    assert "loss.weights.ssim" in str(e.value)


def test_weight_for_term_not_in_spec():
    with pytest.raises(ConfigError) as e:
        build_loss({"spec": "mse", "weights": {"mse": 1.0, "ssim": 0.5}, "params": {}})
    assert e.value.key == "loss.weights.ssim"


def test_all_weights_zero():
    with pytest.raises(ConfigError) as e:
        build_loss({"spec": "mse+l1", "weights": {"mse": 0, "l1": 0.0}, "params": {}})
    assert e.value.key == "loss.weights"


def test_unknown_param_names_the_key():
    with pytest.raises(ConfigError) as e:
        build_loss({"spec": "mse+ssim", "weights": {}, "params": {"ssim": {"window": 5}}})
    assert e.value.key == "loss.params.ssim.window"
    assert "loss.params.ssim.window" in str(e.value)
    assert "win_size" in str(e.value)  # lists the real options
    with pytest.raises(ConfigError) as e:
        build_loss({"spec": "mse", "weights": {}, "params": {"mse": {"eps": 1}}})
    assert e.value.key == "loss.params.mse.eps"


def test_ssim_on_images_smaller_than_window():
    with pytest.raises(ConfigError) as e:
        build_loss({"spec": "mse+ssim", "weights": {}, "params": {}}, image_size=(5, 5))
    assert "ssim" in str(e.value) and "5x5" in str(e.value)
    # a smaller window fits, and 28x28 works with the default
    build_loss({"spec": "mse+ssim", "weights": {}, "params": {"ssim": {"win_size": 5}}}, image_size=(5, 5))
    build_loss({"spec": "mse+ssim", "weights": {}, "params": {}}, image_size=(28, 28))
    with pytest.raises(ConfigError):
        build_loss({"spec": "ssim", "weights": {}, "params": {}}, image_size=(28, 6))


def test_gradient_and_tv_need_two_pixels():
    for name in ("gradient", "tv"):
        with pytest.raises(ConfigError):
            build_loss({"spec": name, "weights": {}, "params": {}}, image_size=(1, 8))
        build_loss({"spec": name, "weights": {}, "params": {}}, image_size=(2, 2))


@pytest.mark.parametrize("win", [4, 8, 1, 7.0])
def test_bad_ssim_window(win):
    with pytest.raises(ConfigError) as e:
        build_loss({"spec": "ssim", "weights": {}, "params": {"ssim": {"win_size": win}}})
    assert e.value.key == "loss.params.ssim.win_size"


@pytest.mark.parametrize("key,value", [("ssim.sigma", 0), ("ssim.sigma", -1.0), ("charbonnier.eps", 0), ("charbonnier.eps", -1e-3)])
def test_bad_positive_params(key, value):
    name, param = key.split(".")
    with pytest.raises(ConfigError) as e:
        build_loss({"spec": name, "weights": {}, "params": {name: {param: value}}})
    assert e.value.key == f"loss.params.{key}"


# --------------------------------------------------------------------------- mixed precision


def test_bf16_autocast_on_cpu_gives_finite_loss():
    spec = "mse+ssim+gradient+tv+charbonnier+l1"
    loss = build_loss({"spec": spec, "weights": {}, "params": {}})
    g = torch.Generator().manual_seed(30)
    x = torch.rand(4, 1, 28, 28, generator=g)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    torch.nn.init.constant_(conv.weight, 1 / 9)
    torch.nn.init.zeros_(conv.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = torch.sigmoid(conv(x))
        assert pred.dtype == torch.bfloat16
        total, parts = loss(pred, x)
    assert torch.isfinite(total)
    assert all(torch.isfinite(v) for v in parts.values())
    total.float().backward()
    assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0
    # close to the fp32 value
    with torch.no_grad():
        ref, _ = loss(torch.sigmoid(conv(x)), x)
    assert total.float().item() == pytest.approx(ref.item(), rel=3e-2)
