"""Frequency filters (FFT, DWT, DCT), radial band shares and the `filter` config group.

The FFT transfer functions are checked against closed forms evaluated on a frequency grid
built here with numpy.fft.fftfreq (r = 1 at the Nyquist frequency of an axis); the DWT
against pywavelets (mode='periodization'); the DCT against scipy.fft.dctn."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import pywt
import scipy.fft
import torch

from freqexp.errors import ConfigError
from freqexp.freq import build_filter
from freqexp.freq.bands import BAND_NAMES, DEFAULT_EDGES, band_shares, check_edges
from freqexp.freq.dct import DCTFilter, dct2, idct2
from freqexp.freq.dwt import DWTFilter, dwt2, idwt2, wavedec2, waverec2, wavelet_filters
from freqexp.freq.fft import FFTFilter
from freqexp.validate import make_plan
from tests.conftest import compose_cfg

REPO = Path(__file__).resolve().parent.parent
KINDS = ("ideal", "gaussian", "butterworth", "butterworth_3db")


# ----------------------------------------------------------------------------- closed forms
def np_radius(h: int, w: int) -> np.ndarray:
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    return np.sqrt((fy / 0.5) ** 2 + (fx / 0.5) ** 2)


def np_low(r, kind, c, n=2):
    r = np.asarray(r, dtype=np.float64)
    if kind == "ideal":
        return (r <= c).astype(np.float64)
    if kind == "gaussian":
        return np.exp(-(r**2) / (2 * c**2))
    if kind == "butterworth":  # Gonzalez & Woods / FAIR: 1 / (1 + (D / D0)^2n)
        return 1.0 / (1.0 + (r / c) ** (2 * n))
    return 1.0 / np.sqrt(1.0 + (r / c) ** (2 * n))  # butterworth_3db


def np_high(r, kind, c, n=2):
    r = np.asarray(r, dtype=np.float64)
    if kind.startswith("butterworth"):
        with np.errstate(divide="ignore"):
            ratio = (c / np.where(r > 0, r, 1.0)) ** (2 * n)
        h = 1.0 / (1.0 + ratio) if kind == "butterworth" else 1.0 / np.sqrt(1.0 + ratio)
        return np.where(r > 0, h, 0.0)
    return 1.0 - np_low(r, kind, c, n)


def np_transfer(h, w, kind, passband, cutoff, n=2):
    r = np_radius(h, w)
    if passband == "low":
        return np_low(r, kind, cutoff, n)
    if passband == "high":
        return np_high(r, kind, cutoff, n)
    return np_high(r, kind, cutoff[0], n) * np_low(r, kind, cutoff[1], n)


def mask_np(f: FFTFilter, h: int, w: int) -> np.ndarray:
    return f.mask(h, w, torch.device("cpu")).double().numpy()


# ----------------------------------------------------------------------------- FFT
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("passband,dc", [("low", 1.0), ("high", 0.0), ("band", 0.0)])
def test_fft_dc_gain(kind, passband, dc):
    cutoff = (0.1, 0.5) if passband == "band" else 0.2
    f = FFTFilter(kind=kind, passband=passband, cutoff=cutoff)
    for h, w in [(32, 32), (31, 95)]:
        m = mask_np(f, h, w)
        assert m[0, 0] == pytest.approx(dc, abs=1e-7)
        # a constant image is passed unchanged / removed
        x = torch.full((1, 1, h, w), 0.7)
        assert torch.allclose(f(x), torch.full_like(x, 0.7 * dc), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("passband", ["low", "high", "band"])
@pytest.mark.parametrize("size", [(32, 32), (31, 95), (95, 31), (28, 28)])
def test_fft_mask_matches_closed_form(kind, passband, size):
    cutoff = (0.15, 0.6) if passband == "band" else 0.3
    f = FFTFilter(kind=kind, passband=passband, cutoff=cutoff, order=3)
    got = mask_np(f, *size)
    want = np_transfer(*size, kind, passband, cutoff, 3)
    assert got.shape == size
    if kind == "ideal":
        # only points exactly on the cutoff circle could differ by float rounding
        r = np_radius(*size)
        edges = [cutoff] if passband != "band" else list(cutoff)
        off_edge = np.all([np.abs(r - c) > 1e-6 for c in edges], axis=0)
        np.testing.assert_array_equal(got[off_edge], want[off_edge])
    else:
        np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("passband", ["low", "high"])
def test_butterworth_3db_is_minus_3db_at_cutoff(order, passband):
    # 40 px: fftfreq(40)[4] = 0.1 cycles/px -> r = 0.2 lies exactly on the grid
    f = FFTFilter(kind="butterworth_3db", passband=passband, cutoff=0.2, order=order)
    m = mask_np(f, 40, 40)
    r = np_radius(40, 40)
    on_circle = np.isclose(r, 0.2, atol=1e-12)
    assert on_circle.sum() >= 4  # (+-4, 0) and (0, +-4)
    np.testing.assert_allclose(m[on_circle] ** 2, 0.5, atol=1e-6)
    # and monotone on either side of it: the right pass band
    inside, outside = m[(r > 0) & (r < 0.15)], m[r > 0.3]
    if passband == "low":
        assert inside.min() > 0.5 ** 0.5 > outside.max()
    else:
        assert inside.max() < 0.5 ** 0.5 < outside.min()


@pytest.mark.parametrize("order", [1, 2, 4])
def test_butterworth_3db_low_and_high_are_power_complementary(order):
    lo = mask_np(FFTFilter("butterworth_3db", "low", 0.25, order), 31, 95)
    hi = mask_np(FFTFilter("butterworth_3db", "high", 0.25, order), 31, 95)
    np.testing.assert_allclose(lo**2 + hi**2, 1.0, atol=1e-6)


@pytest.mark.parametrize("order", [1, 2, 4])
def test_butterworth_low_and_high_are_amplitude_complementary_and_half_at_cutoff(order):
    # the textbook (FAIR) convention: H_low + H_high = 1 everywhere but DC, and H(c) = 1/2
    lo = mask_np(FFTFilter("butterworth", "low", 0.2, order), 40, 40)
    hi = mask_np(FFTFilter("butterworth", "high", 0.2, order), 40, 40)
    r = np_radius(40, 40)
    np.testing.assert_allclose((lo + hi)[r > 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(hi[np.isclose(r, 0.2, atol=1e-12)], 0.5, atol=1e-6)
    # the -3 dB variant is the square root of it: a gentler filter
    hi3 = mask_np(FFTFilter("butterworth_3db", "high", 0.2, order), 40, 40)
    np.testing.assert_allclose(hi3, np.sqrt(hi), atol=1e-6)


def test_gaussian_value_at_cutoff():
    r = np_radius(40, 40)
    on_circle = np.isclose(r, 0.2, atol=1e-12)
    lo = mask_np(FFTFilter("gaussian", "low", 0.2), 40, 40)
    hi = mask_np(FFTFilter("gaussian", "high", 0.2), 40, 40)
    np.testing.assert_allclose(lo[on_circle], math.exp(-0.5), atol=1e-6)
    np.testing.assert_allclose(hi[on_circle], 1 - math.exp(-0.5), atol=1e-6)


@pytest.mark.parametrize("kind", ["ideal", "gaussian"])
@pytest.mark.parametrize("size", [(32, 32), (31, 95), (7, 5)])
def test_low_plus_high_is_identity(kind, size):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, *size, generator=g)
    lo, hi = FFTFilter(kind, "low", 0.3), FFTFilter(kind, "high", 0.3)
    assert torch.allclose(lo(x) + hi(x), x, atol=1e-5)
    assert not torch.allclose(lo(x), x, atol=1e-3)  # neither part alone is the identity


def test_ideal_band_pass_zero_outside_band_one_inside():
    c_lo, c_hi = 0.2, 0.55
    for size in [(64, 64), (31, 95)]:
        m = mask_np(FFTFilter("ideal", "band", (c_lo, c_hi)), *size)
        r = np_radius(*size)
        assert np.all(m[(r < c_lo - 1e-6) | (r > c_hi + 1e-6)] == 0)
        assert np.all(m[(r > c_lo + 1e-6) & (r < c_hi - 1e-6)] == 1)
        assert m.sum() > 0


def test_butterworth_band_is_product_of_high_and_low():
    band = mask_np(FFTFilter("butterworth", "band", (0.1, 0.4), order=2), 31, 95)
    r = np_radius(31, 95)
    np.testing.assert_allclose(band, np_high(r, "butterworth", 0.1) * np_low(r, "butterworth", 0.4), atol=1e-6)


def _cosine(h, w, axis, k):
    """A pure cosine with k cycles over the image along `axis` (-1: across columns)."""
    n = w if axis == -1 else h
    c = np.cos(2 * np.pi * k * np.arange(n) / n)
    img = np.broadcast_to(c[None, :], (h, w)) if axis == -1 else np.broadcast_to(c[:, None], (h, w))
    return torch.tensor(np.ascontiguousarray(img), dtype=torch.float32).view(1, 1, h, w)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("passband", ["low", "high"])
@pytest.mark.parametrize("size,axis", [((31, 95), -1), ((95, 31), -2), ((31, 95), -2), ((95, 31), -1)])
@pytest.mark.parametrize("k", [3, 7, 12])
def test_non_square_cosine_attenuated_by_h_at_its_frequency(kind, passband, size, axis, k):
    """No row/column swap: a cosine of k cycles along an n-px axis has r = 2k/n, and comes
    out scaled by exactly H(2k/n)."""
    h, w = size
    n = w if axis == -1 else h
    if 2 * k >= n:
        pytest.skip("above Nyquist")
    cutoff = 0.3
    r = 2 * k / n
    if kind == "ideal" and abs(r - cutoff) < 0.02:
        pytest.skip("on the ideal edge")
    x = _cosine(h, w, axis, k)
    f = FFTFilter(kind, passband, cutoff, order=2)
    gain = float(np_low(r, kind, cutoff) if passband == "low" else np_high(r, kind, cutoff))
    y = f(x)
    assert y.shape == x.shape and not y.is_complex()
    assert torch.allclose(y, gain * x, atol=2e-5)
    # the same frequency on the other axis would (for these sizes) give a different gain, so a
    # swapped grid cannot pass the check above
    other = h if axis == -1 else w
    r_swapped = 2 * k / other
    gain_swapped = float(np_low(r_swapped, kind, cutoff) if passband == "low" else np_high(r_swapped, kind, cutoff))
    if abs(gain_swapped - gain) > 1e-3:
        assert not torch.allclose(y, gain_swapped * x, atol=2e-5)


def test_fft_output_is_real_and_matches_numpy():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 31, 95, generator=g, dtype=torch.float64)
    f = FFTFilter("butterworth", "high", 0.2, order=2)
    y = f(x)
    assert y.dtype == torch.float64 and not y.is_complex()
    want = np.fft.ifft2(np.fft.fft2(x.numpy()) * np_transfer(31, 95, "butterworth", "high", 0.2))
    assert np.abs(want.imag).max() < 1e-10  # a real, even mask keeps a real image real
    np.testing.assert_allclose(y.numpy(), want.real, atol=1e-5)


def test_fft_mask_is_cached():
    f = FFTFilter("gaussian", "low", 0.2)
    cpu = torch.device("cpu")
    m1 = f.mask(31, 95, cpu)
    m2 = f.mask(31, 95, cpu)
    assert m1 is m2
    assert f.mask(95, 31, cpu) is not m1 and f.mask(95, 31, cpu).shape == (95, 31)
    f(torch.rand(1, 1, 31, 95))
    assert f.mask(31, 95, cpu) is m1  # forward used (and kept) the cached mask


# ----------------------------------------------------------------------------- DWT
WAVELETS = ["haar", "db2", "bior2.2", "sym4"]
SIZES = [(28, 28), (31, 95), (7, 5)]


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("size", SIZES)
def test_dwt2_matches_pywt(wavelet, size):
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, *size))
    ll, (lh, hl, hh) = dwt2(torch.from_numpy(x), wavelet_filters(wavelet))
    ca, (ch, cv, cd) = pywt.dwt2(x, wavelet, mode="periodization")
    for got, want in [(ll, ca), (lh, ch), (hl, cv), (hh, cd)]:
        assert got.shape == want.shape == (2, 3, math.ceil(size[0] / 2), math.ceil(size[1] / 2))
        np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("size", SIZES)
def test_idwt2_matches_pywt(wavelet, size):
    rng = np.random.default_rng(1)
    k = (math.ceil(size[0] / 2), math.ceil(size[1] / 2))
    ca, ch, cv, cd = (rng.standard_normal((2, *k)) for _ in range(4))
    got = idwt2(torch.from_numpy(ca), [torch.from_numpy(c) for c in (ch, cv, cd)], wavelet_filters(wavelet))
    want = pywt.idwt2((ca, (ch, cv, cd)), wavelet, mode="periodization")
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("size", SIZES)
def test_wavedec2_matches_pywt_level_2(wavelet, size):
    rng = np.random.default_rng(2)
    x = rng.random((2, *size))
    ll, details, sizes = wavedec2(torch.from_numpy(x), wavelet_filters(wavelet), level=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pywt warns when the level is high for the filter length
        ref = pywt.wavedec2(x, wavelet, mode="periodization", level=2)
    np.testing.assert_allclose(ll.numpy(), ref[0], atol=1e-6)
    assert len(details) == 2
    # ours: finest first; pywt: coarsest first
    for ours, theirs in zip(details, reversed(ref[1:])):
        for a, b in zip(ours, theirs):
            assert a.shape == b.shape
            np.testing.assert_allclose(a.numpy(), b, atol=1e-6)
    assert sizes[0] == size


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("size", SIZES + [(33, 17), (1, 9)])
@pytest.mark.parametrize("level", [1, 2, 3])
def test_wavelet_round_trip_is_perfect(wavelet, size, level):
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.random((2, 2, *size)))
    f = wavelet_filters(wavelet)
    ll, details, sizes = wavedec2(x, f, level)
    y = waverec2(ll, details, sizes, f)
    assert y.shape == x.shape
    assert torch.allclose(y, x, atol=1e-6)


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("level", [1, 2])
def test_dwt_filter_keep_all_is_identity_and_parts_sum_to_identity(wavelet, level):
    g = torch.Generator().manual_seed(4)
    for size in [(28, 28), (31, 95)]:
        x = torch.rand(3, 2, *size, generator=g)
        full = DWTFilter(wavelet, level, keep=["LL", "LH", "HL", "HH"])
        assert torch.allclose(full(x), x, atol=1e-5)
        approx = DWTFilter(wavelet, level, keep=["LL"])(x)
        detail = DWTFilter(wavelet, level, keep=["LH", "HL", "HH"])(x)
        assert torch.allclose(approx + detail, x, atol=1e-5)
        assert not torch.allclose(detail, x, atol=1e-2)


def test_dwt_high_pass_removes_constants():
    x = torch.full((2, 1, 31, 95), 0.4)
    assert torch.allclose(DWTFilter("db2", 2, keep=["LH", "HL", "HH"])(x), torch.zeros_like(x), atol=1e-5)
    assert torch.allclose(DWTFilter("db2", 2, keep=["LL"])(x), x, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"wavelet": "nope"}, "filter.wavelet"),
        ({"wavelet": "morl"}, "filter.wavelet"),  # continuous, not usable for a DWT
        ({"level": 0}, "filter.level"),
        ({"level": 1.5}, "filter.level"),
        ({"level": True}, "filter.level"),
        ({"keep": ["LL", "XX"]}, "filter.keep"),
        ({"keep": []}, "filter.keep"),
    ],
)
def test_dwt_filter_bad_options(kwargs, key):
    with pytest.raises(ConfigError) as e:
        DWTFilter(**kwargs)
    assert e.value.key == key


# ----------------------------------------------------------------------------- DCT
@pytest.mark.parametrize("size", [(8, 8), (28, 28), (31, 95), (7, 5)])
def test_dct2_matches_scipy_and_inverts(size):
    rng = np.random.default_rng(5)
    x = rng.random((2, 3, *size))
    got = dct2(torch.from_numpy(x))
    want = scipy.fft.dctn(x, type=2, norm="ortho", axes=(-2, -1))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-10)
    np.testing.assert_allclose(idct2(got).numpy(), x, atol=1e-10)
    np.testing.assert_allclose(idct2(torch.from_numpy(want)).numpy(), scipy.fft.idctn(want, type=2, norm="ortho", axes=(-2, -1)), atol=1e-10)


@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("size", [(8, 8), (28, 28), (32, 32)])
def test_dct_low_plus_high_complement_is_identity(fraction, size):
    g = torch.Generator().manual_seed(6)
    x = torch.rand(2, 3, *size, generator=g)
    low = DCTFilter(keep="low", fraction=fraction)(x)
    high = DCTFilter(keep="high", fraction=1 - fraction)(x)
    assert torch.allclose(low + high, x, atol=1e-5)
    assert not torch.allclose(low, x, atol=1e-3)


@pytest.mark.parametrize("size", [(7, 5), (5, 5), (31, 95)])
def test_dct_low_plus_high_complement_is_identity_for_every_percent(size):
    """Including the fractions where f * H * W is a .5 tie and 1 - (1 - f) != f in floats
    (e.g. 0.1 on 7x5, 0.3 on 31x95): no coefficient may be kept twice or dropped by both."""
    g = torch.Generator().manual_seed(6)
    x = torch.rand(1, 1, *size, generator=g, dtype=torch.float64)
    bad = []
    for i in range(1, 100):
        f = i / 100
        low = DCTFilter(keep="low", fraction=f)(x)
        high = DCTFilter(keep="high", fraction=1 - f)(x)
        if not torch.allclose(low + high, x, atol=1e-5):
            bad.append(f)
    assert bad == []


@pytest.mark.parametrize("keep", ["low", "high"])
def test_dct_fraction_one_is_identity(keep):
    x = torch.rand(2, 3, 31, 95, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(DCTFilter(keep=keep, fraction=1.0)(x), x, atol=1e-5)


def test_dct_low_keeps_the_lowest_coefficients():
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    y = DCTFilter(keep="low", fraction=0.1)(x)
    coeffs = scipy.fft.dctn(y.numpy()[0, 0], type=2, norm="ortho")
    kept = np.abs(coeffs) > 1e-5
    assert kept.sum() == round(0.1 * 256)
    assert kept[0, 0] and kept[0, 1] and kept[1, 0] and not kept[-1, -1]


@pytest.mark.parametrize(
    "kwargs,key",
    [({"fraction": 0}, "filter.fraction"), ({"fraction": 1.5}, "filter.fraction"), ({"fraction": -0.1}, "filter.fraction"),
     ({"fraction": True}, "filter.fraction"), ({"fraction": "half"}, "filter.fraction"), ({"keep": "mid"}, "filter.keep")],
)
def test_dct_bad_options(kwargs, key):
    with pytest.raises(ConfigError) as e:
        DCTFilter(**kwargs)
    assert e.value.key == key


# ----------------------------------------------------------------------------- band shares
def test_band_shares_rows_sum_to_100():
    x = torch.rand(5, 3, 31, 95, generator=torch.Generator().manual_seed(9))
    s = band_shares(x)
    assert s.shape == (5, len(BAND_NAMES))
    assert torch.allclose(s.sum(1), torch.full((5,), 100.0), atol=1e-3)
    assert (s >= 0).all()


def test_band_shares_constant_image_is_all_very_low():
    s = band_shares(torch.full((2, 1, 32, 32), 0.3))
    assert torch.allclose(s[:, 0], torch.full((2,), 100.0), atol=1e-4)
    assert torch.allclose(s[:, 1:], torch.zeros(2, 4), atol=1e-4)


def test_band_shares_checkerboard_is_all_very_high():
    i, j = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    board = ((-1.0) ** (i + j)).view(1, 1, 32, 32).repeat(2, 3, 1, 1)  # zero-mean, Nyquist in both axes
    s = band_shares(board)
    assert torch.allclose(s[:, -1], torch.full((2,), 100.0), atol=1e-4)
    assert torch.allclose(s[:, :-1], torch.zeros(2, 4), atol=1e-4)


def test_band_shares_single_frequency_lands_in_its_band():
    # r = 2k/n; with n = 64: k=4 -> 0.125 (low band: 0.05 < r <= 0.15), k=12 -> 0.375 (high band)
    for k, band in [(4, 1), (12, 3)]:
        s = band_shares(_cosine(64, 64, -1, k))
        assert float(s[0, band]) == pytest.approx(100.0, abs=1e-3)


@pytest.mark.parametrize(
    "edges",
    [[0.15, 0.05, 0.3, 0.5], [0.05, 0.15, 0.3], [0.05, 0.15, 0.3, 0.5, 0.7], [0.0, 0.15, 0.3, 0.5],
     [-0.1, 0.15, 0.3, 0.5], [0.05, 0.05, 0.3, 0.5], "0.05", 0.3, [0.05, "a", 0.3, 0.5]],
)
def test_bad_band_edges_raise_config_error(edges):
    with pytest.raises(ConfigError) as e:
        check_edges(edges, "analysis.band_edges")
    assert e.value.key == "analysis.band_edges"


def test_default_edges_are_valid():
    assert check_edges(DEFAULT_EDGES, "x") == list(DEFAULT_EDGES)


# ----------------------------------------------------------------------------- config group
FILTER_OPTIONS = sorted(p.stem for p in (REPO / "conf" / "filter").glob("*.yaml"))


@pytest.mark.parametrize("option", FILTER_OPTIONS)
def test_every_filter_option_composes_plans_and_filters(option):
    cfg = compose_cfg(["dataset=synthetic", f"filter={option}"])
    assert cfg.filter.name in ("none", "fft", "dwt", "dct")
    plan = make_plan(cfg)
    assert plan.placement == cfg.filter.apply_to
    x = torch.rand(4, *plan.shape, generator=torch.Generator().manual_seed(10))
    y = plan.filter(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    if option != "none":
        assert not torch.allclose(y, x, atol=1e-3)


@pytest.mark.parametrize(
    "option,kind,passband",
    [("bhpf", "butterworth", "high"), ("blpf", "butterworth", "low"), ("ghpf", "gaussian", "high"),
     ("glpf", "gaussian", "low"), ("ihpf", "ideal", "high"), ("ilpf", "ideal", "low")],
)
def test_fft_shortcut_options_build_the_named_filter(option, kind, passband):
    module, placement = build_filter(compose_cfg(["dataset=synthetic", f"filter={option}"]).filter)
    assert isinstance(module, FFTFilter)
    assert (module.kind, module.passband, module.cutoff, placement) == (kind, passband, 0.2, "input")


def test_band_pass_from_the_command_line():
    cfg = compose_cfg(["dataset=synthetic", "filter=fft", "filter.pass=band", "filter.cutoff=[0.1,0.5]", "filter.kind=ideal"])
    plan = make_plan(cfg)
    assert plan.filter.cutoff == (0.1, 0.5)
    np.testing.assert_array_equal(mask_np(plan.filter, 32, 32), np_transfer(32, 32, "ideal", "band", (0.1, 0.5)))


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["filter=fft", "filter.cutoff=0"], "filter.cutoff"),
        (["filter=fft", "filter.cutoff=1.5"], "filter.cutoff"),
        (["filter=fft", "filter.unit=mm"], "filter.unit"),
        (["filter=fft", "filter.unit=px", "filter.cutoff=-3"], "filter.cutoff"),
        (["filter=fair", "filter.kind=butterworth_6db"], "filter.kind"),
        (["filter=bhpf", "filter.cutoff=0"], "filter.cutoff"),
        (["filter=ilpf", "filter.cutoff=1.5"], "filter.cutoff"),
        (["filter=fft", "filter.order=0"], "filter.order"),
        (["filter=fft", "filter.kind=box"], "filter.kind"),
        (["filter=fft", "filter.pass=notch"], "filter.pass"),
        (["filter=fft", "filter.pass=band", "filter.cutoff=0.2"], "filter.cutoff"),
        (["filter=fft", "filter.pass=band", "filter.cutoff=[0.5,0.1]"], "filter.cutoff"),
        (["filter=dwt", "filter.wavelet=nope"], "filter.wavelet"),
        (["filter=dwt", "filter.level=0"], "filter.level"),
        (["filter=dwt", "filter.keep=[LL,XX]"], "filter.keep"),
        (["filter=dct", "filter.fraction=0"], "filter.fraction"),
        (["filter=bhpf", "filter.apply_to=output"], "filter.apply_to"),
        (["filter.apply_to=output"], "filter.apply_to"),
    ],
)
def test_bad_filter_values_name_the_key(overrides, key):
    cfg = compose_cfg(["dataset=synthetic", *overrides])
    with pytest.raises(ConfigError) as e:
        make_plan(cfg)
    assert e.value.key == key


ALL_FILTERS = [
    ("none", {}),
    *[(f"fft-{k}-{p}", {"name": "fft", "kind": k, "pass": p, "cutoff": (0.1, 0.5) if p == "band" else 0.2})
      for k in KINDS for p in ("low", "high", "band")],
    ("dwt-haar", {"name": "dwt", "wavelet": "haar", "level": 1, "keep": ["LH", "HL", "HH"]}),
    ("dwt-db2-l2", {"name": "dwt", "wavelet": "db2", "level": 2, "keep": ["LL"]}),
    ("dct-high", {"name": "dct", "keep": "high", "fraction": 0.9}),
    ("dct-low", {"name": "dct", "keep": "low", "fraction": 0.2}),
]


@pytest.mark.parametrize("name,spec", ALL_FILTERS, ids=[n for n, _ in ALL_FILTERS])
def test_every_filter_runs_batched_and_is_differentiable(name, spec):
    from omegaconf import OmegaConf

    from freqexp.freq import build_filter_module

    module = build_filter_module(OmegaConf.create({"name": "none"} if name == "none" else spec))
    x = torch.rand(64, 3, 64, 64, generator=torch.Generator().manual_seed(11), requires_grad=True)
    y = module(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    # per-image: filtering one image alone gives the same as in the batch
    assert torch.allclose(module(x[5:6].detach()), y[5:6].detach(), atol=1e-5)
    (y * torch.linspace(0, 1, 64).view(1, 1, 1, 64)).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
