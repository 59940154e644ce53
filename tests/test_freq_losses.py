"""Frequency-domain loss terms (fft, focal_freq, wavelet) against independent numpy / pywavelets
implementations, their gradients, mixed precision, and their config validation."""
from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch

from freqexp.errors import ConfigError
from freqexp.losses import build_loss


def term(name: str, image_size=(28, 28), **params):
    """One term built the way a run builds it (build_loss with the dataset's image size)."""
    loss = build_loss({"spec": name, "weights": {}, "params": {name: params}}, image_size=image_size)
    return lambda pred, target: loss(pred, target)[1][name]


def pair(seed=0, b=3, c=1, h=28, w=28, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g, dtype=dtype), torch.rand(b, c, h, w, generator=g, dtype=dtype)


# ----------------------------------------------------------------------------- references
def np_fft_l1(p, t):
    return np.mean(np.abs(np.abs(np.fft.fft2(p, norm="ortho")) - np.abs(np.fft.fft2(t, norm="ortho"))))


def np_focal_freq(p, t, alpha, log_weight=False):
    """Jiang et al., ICCV 2021 (official code): weight = |F_p - F_t|^alpha (optionally
    log(1 + .)), divided by its max over the spectrum of each image (and channel), then
    loss = mean(weight * |F_p - F_t|^2)."""
    d = np.fft.fft2(p, norm="ortho") - np.fft.fft2(t, norm="ortho")
    dist = d.real**2 + d.imag**2
    weight = np.sqrt(dist) ** alpha
    if log_weight:
        weight = np.log1p(weight)
    weight = weight / weight.max(axis=(-2, -1), keepdims=True)
    return np.mean(weight * dist)


def np_wavelet_l1(p, t, wavelet, level):
    cp = pywt.wavedec2(p, wavelet, mode="periodization", level=level, axes=(-2, -1))
    ct = pywt.wavedec2(t, wavelet, mode="periodization", level=level, axes=(-2, -1))
    bands_p = [cp[0]] + [b for details in cp[1:] for b in details]
    bands_t = [ct[0]] + [b for details in ct[1:] for b in details]
    assert len(bands_p) == 1 + 3 * level
    return np.mean([np.mean(np.abs(a - b)) for a, b in zip(bands_p, bands_t)])


CASES = [
    ("fft", {}),
    ("focal_freq", {"alpha": 1.0}),
    ("focal_freq", {"alpha": 2.0}),
    ("wavelet", {"wavelet": "haar", "level": 1}),
    ("wavelet", {"wavelet": "db2", "level": 2}),
]
IDS = [f"{n}-{'-'.join(map(str, p.values()))}" if p else n for n, p in CASES]


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_identical_inputs_give_zero(name, params):
    x, _ = pair(1, c=3)
    value = term(name, **params)(x, x.clone())
    assert torch.isfinite(value)
    assert float(value) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("size", [(28, 28), (31, 95)])
@pytest.mark.parametrize("channels", [1, 3])
def test_fft_matches_numpy(size, channels):
    p, t = pair(2, c=channels, h=size[0], w=size[1], dtype=torch.float64)
    got = float(term("fft", image_size=size)(p, t))
    assert got == pytest.approx(np_fft_l1(p.numpy(), t.numpy()), rel=1e-5)
    assert got > 0


@pytest.mark.parametrize("alpha", [1.0, 2.0])
@pytest.mark.parametrize("log_weight", [False, True])
@pytest.mark.parametrize("size", [(28, 28), (31, 95)])
def test_focal_freq_matches_numpy_reference(alpha, log_weight, size):
    p, t = pair(3, c=1, h=size[0], w=size[1], dtype=torch.float64)
    got = float(term("focal_freq", image_size=size, alpha=alpha, log_weight=log_weight)(p, t))
    assert got == pytest.approx(np_focal_freq(p.numpy(), t.numpy(), alpha, log_weight), rel=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_focal_freq_multichannel_normalizes_per_image_and_channel(alpha):
    """As in the official code, the weight's max is taken over each 2D spectrum."""
    p, t = pair(4, c=3, dtype=torch.float64)
    t[:, 1] = p[:, 1] + 0.01 * (t[:, 1] - p[:, 1])  # a channel with a much smaller error
    got = float(term("focal_freq", alpha=alpha)(p, t))
    assert got == pytest.approx(np_focal_freq(p.numpy(), t.numpy(), alpha), rel=1e-5)


def test_focal_freq_weighs_hard_frequencies_more_than_l2():
    """With alpha > 0 the loss is below the plain spectral L2 (weights <= 1, max weight 1),
    and a larger alpha concentrates on the hardest frequencies (smaller loss)."""
    p, t = pair(5)
    d = torch.fft.fft2(p, norm="ortho") - torch.fft.fft2(t, norm="ortho")
    l2 = float((d.abs() ** 2).mean())
    a1, a2 = float(term("focal_freq", alpha=1.0)(p, t)), float(term("focal_freq", alpha=2.0)(p, t))
    assert 0 < a2 < a1 < l2


@pytest.mark.parametrize("wavelet,level", [("haar", 1), ("db2", 2), ("bior2.2", 2), ("sym4", 1)])
@pytest.mark.parametrize("size", [(28, 28), (31, 95)])
def test_wavelet_matches_pywt(wavelet, level, size):
    p, t = pair(6, c=2, h=size[0], w=size[1], dtype=torch.float64)
    got = float(term("wavelet", image_size=size, wavelet=wavelet, level=level)(p, t))
    assert got == pytest.approx(np_wavelet_l1(p.numpy(), t.numpy(), wavelet, level), rel=1e-5)


def test_wavelet_level_changes_the_value():
    p, t = pair(7)
    l1 = float(term("wavelet", wavelet="haar", level=1)(p, t))
    l2 = float(term("wavelet", wavelet="haar", level=2)(p, t))
    assert l1 != pytest.approx(l2, rel=1e-3)


# ----------------------------------------------------------------------------- gradients, precision
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_gradients_finite_and_nonzero(name, params):
    p, t = pair(8, c=3)
    p.requires_grad_(True)
    term(name, **params)(p, t).backward()
    assert p.grad is not None
    assert torch.isfinite(p.grad).all()
    assert float(p.grad.abs().sum()) > 0


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_gradient_matches_finite_difference(name, params):
    p, t = pair(9, b=1, c=1, h=8, w=8, dtype=torch.float64)
    p.requires_grad_(True)
    f = term(name, image_size=(8, 8), **params)
    f(p, t).backward()
    # focal_freq's weight is detached by design, so its gradient is not that of its value
    if name == "focal_freq":
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        return
    # central differences on a few coordinates (the terms compute in fp32: a 1e-3 step)
    for idx in [(0, 0, 3, 5), (0, 0, 0, 0), (0, 0, 7, 2)]:
        e = torch.zeros_like(p)
        e[idx] = 1e-3
        with torch.no_grad():
            fd = (f(p + e, t) - f(p - e, t)) / 2e-3
        assert float(p.grad[idx]) == pytest.approx(float(fd), rel=2e-2, abs=2e-4), idx


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_finite_under_bf16_autocast(name, params):
    p, t = pair(10, c=3)
    p, t = p.bfloat16().requires_grad_(True), t.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = term(name, **params)(p, t)
    assert torch.isfinite(value.detach())
    assert float(value.detach()) > 0
    value.float().backward()
    assert p.grad is not None and torch.isfinite(p.grad.float()).all()
    # the value is that of the (bf16-rounded) inputs computed at fp32, to bf16 accuracy
    ref = float(term(name, **params)(p.detach().float(), t.float()))
    assert float(value.detach()) == pytest.approx(ref, rel=1e-2)


@pytest.mark.parametrize("name,params", [c for c in CASES if c[0] != "wavelet"], ids=[i for i in IDS if not i.startswith("wavelet")])
def test_fft_terms_compute_in_fp32_under_autocast(name, params):
    p, t = pair(11, c=3)
    p, t = p.bfloat16(), t.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = term(name, **params)(p, t)
    ref = term(name, **params)(p.float(), t.float())
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(float(ref), rel=1e-6)


@pytest.mark.parametrize("wavelet,level", [("haar", 1), ("db2", 2)])
def test_wavelet_computes_in_fp32_under_autocast(wavelet, level):
    p, t = pair(11, c=3)
    p, t = p.bfloat16(), t.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = term("wavelet", wavelet=wavelet, level=level)(p, t)
    ref = term("wavelet", wavelet=wavelet, level=level)(p.float(), t.float())
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(float(ref), rel=1e-5)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("level,size", [(1, (1, 28)), (2, (3, 28)), (3, (28, 7)), (5, (28, 28))])
def test_wavelet_on_images_smaller_than_two_to_the_level(level, size):
    with pytest.raises(ConfigError) as e:
        term("wavelet", image_size=size, wavelet="haar", level=level)
    assert e.value.key == "loss"
    assert str(2**level) in e.value.message


def test_wavelet_at_exactly_two_to_the_level_is_fine():
    f = term("wavelet", image_size=(4, 4), wavelet="haar", level=2)
    p, t = pair(12, h=4, w=4)
    assert torch.isfinite(f(p, t))


@pytest.mark.parametrize("wavelet", ["nope", "morl", "db99"])
def test_unknown_wavelet_names_the_key(wavelet):
    with pytest.raises(ConfigError) as e:
        term("wavelet", wavelet=wavelet)
    assert e.value.key == "loss.params.wavelet.wavelet"
    assert wavelet in e.value.message


@pytest.mark.parametrize("wavelet", [None, "", 5])
def test_non_string_or_empty_wavelet_is_a_config_error(wavelet):
    with pytest.raises(ConfigError) as e:
        term("wavelet", wavelet=wavelet)
    assert e.value.key == "loss.params.wavelet.wavelet"


@pytest.mark.parametrize(
    "name,params,key",
    [
        ("focal_freq", {"alpha": 0}, "loss.params.focal_freq.alpha"),
        ("focal_freq", {"alpha": -1.0}, "loss.params.focal_freq.alpha"),
        ("focal_freq", {"alpha": "big"}, "loss.params.focal_freq.alpha"),
        ("wavelet", {"level": 0}, "loss.params.wavelet.level"),
        ("wavelet", {"level": 1.5}, "loss.params.wavelet.level"),
        ("wavelet", {"level": True}, "loss.params.wavelet.level"),
        ("wavelet", {"mode": "zero"}, "loss.params.wavelet.mode"),
        ("fft", {"norm": "backward"}, "loss.params.fft.norm"),
    ],
)
def test_bad_params_name_the_key(name, params, key):
    with pytest.raises(ConfigError) as e:
        term(name, **params)
    assert e.value.key == key


def test_frequency_terms_combine_with_pixel_terms():
    loss = build_loss({"spec": "mse+fft+focal_freq+wavelet", "weights": {"fft": 0.5, "wavelet": 2.0},
                       "params": {"wavelet": {"wavelet": "db2", "level": 2}}}, image_size=(28, 28))
    p, t = pair(13)
    total, parts = loss(p, t)
    assert list(parts) == ["mse", "fft", "focal_freq", "wavelet"]
    want = parts["mse"] + 0.5 * parts["fft"] + parts["focal_freq"] + 2.0 * parts["wavelet"]
    assert float(total) == pytest.approx(float(want), rel=1e-6)
    assert float(parts["wavelet"]) == pytest.approx(np_wavelet_l1(p.double().numpy(), t.double().numpy(), "db2", 2), rel=1e-4)


def test_every_term_is_finite_with_finite_gradients_under_fp16_autocast():
    """GPUs train in 16-mixed; CPU autocast in float16 exercises the same casts."""
    loss = build_loss({"spec": "mse+l1+charbonnier+ssim+gradient+tv+fft+focal_freq+wavelet", "weights": {}, "params": {}}, image_size=(28, 28))
    g = torch.Generator().manual_seed(0)
    p = torch.rand(4, 1, 28, 28, generator=g).half().requires_grad_(True)
    t = torch.rand(4, 1, 28, 28, generator=g).half()
    with torch.autocast("cpu", dtype=torch.float16):
        total, parts = loss(p, t)
    total.backward()
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert all(torch.isfinite(v) for v in parts.values())
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
