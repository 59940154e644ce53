"""augment=perlin: DRAEM's pseudo-anomalies (VitjanZ/DRAEM, perlin.py and data_loader.py). The
noise, rotation, threshold, blend and texture operations are checked against formulas written
here with numpy (or against Pillow, whose functions DRAEM's imgaug operations reproduce), never
against the code under test."""
from __future__ import annotations

import colorsys
import logging
import math

import numpy as np
import pytest
import torch

from freqexp.augment import build_augment
from freqexp.augment.geometric import random_rotation, rotate
from freqexp.augment.perlin import PerlinAnomaly, blend, perlin_masks, perlin_noise, random_perlin_noise
from freqexp.errors import ConfigError
from tests.conftest import compose_cfg


def fade_np(t):
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_grid_np(shape, res, angles):
    """The official construction, for sizes that are multiples of the lattice: positions from
    np.mgrid with step res/shape taken mod 1, each cell's 4 corner gradients repeated over its
    shape/res pixels, dot products with the offsets to the corners, quintic-fade lerps, sqrt 2."""
    (h, w), (r0, r1) = shape, res
    d0, d1 = h // r0, w // r1
    grid = np.mgrid[0:r0:r0 / h, 0:r1:r1 / w].transpose(1, 2, 0) % 1
    grads = np.stack([np.cos(angles), np.sin(angles)], -1)[: r0 + 1, : r1 + 1]
    tile = lambda g: np.repeat(np.repeat(g, d0, 0), d1, 1)  # noqa: E731
    n00 = (grid * tile(grads[:-1, :-1])).sum(-1)
    n10 = (np.stack([grid[..., 0] - 1, grid[..., 1]], -1) * tile(grads[1:, :-1])).sum(-1)
    n01 = (np.stack([grid[..., 0], grid[..., 1] - 1], -1) * tile(grads[:-1, 1:])).sum(-1)
    n11 = (np.stack([grid[..., 0] - 1, grid[..., 1] - 1], -1) * tile(grads[1:, 1:])).sum(-1)
    t = fade_np(grid)
    n0 = n00 + t[..., 0] * (n10 - n00)
    n1 = n01 + t[..., 0] * (n11 - n01)
    return math.sqrt(2) * (n0 + t[..., 1] * (n1 - n0))


def perlin_pixel_np(shape, res, angles):
    """The same gradient-noise formula pixel by pixel at lattice position (y*r0/H, x*r1/W): any size."""
    h, w = shape
    out = np.zeros(shape)
    for y in range(h):
        for x in range(w):
            u, v = y * res[0] / h, x * res[1] / w
            i, j = int(math.floor(u)), int(math.floor(v))
            fu, fv = u - i, v - j
            ramp = lambda di, dj: (math.cos(angles[i + di, j + dj]) * (fu - di)  # noqa: E731
                                   + math.sin(angles[i + di, j + dj]) * (fv - dj))
            tu, tv = fade_np(fu), fade_np(fv)
            n0 = ramp(0, 0) * (1 - tu) + ramp(1, 0) * tu
            n1 = ramp(0, 1) * (1 - tu) + ramp(1, 1) * tu
            out[y, x] = math.sqrt(2) * (n0 * (1 - tv) + n1 * tv)
    return out


def noise_of(shape, res, angles):
    return perlin_noise(*shape, torch.tensor([res]), torch.from_numpy(angles).float()[None])[0].double().numpy()


# ----------------------------------------------------------------------------- the noise
@pytest.mark.parametrize("shape,res", [((32, 32), (4, 8)), ((64, 32), (1, 32)), ((16, 16), (16, 2)), ((8, 8), (1, 1))])
def test_perlin_noise_equals_the_official_grid_construction(shape, res):
    angles = 2 * np.pi * np.random.default_rng(sum(shape) + res[0]).random((33, 33))
    np.testing.assert_allclose(noise_of(shape, res, angles), perlin_grid_np(shape, res, angles), atol=2e-6)


@pytest.mark.parametrize("shape,res", [((28, 28), (8, 4)), ((28, 20), (32, 2)), ((13, 17), (2, 16))])
def test_perlin_noise_at_sizes_that_are_not_multiples_of_the_lattice(shape, res):
    angles = 2 * np.pi * np.random.default_rng(7).random((33, 33))
    np.testing.assert_allclose(noise_of(shape, res, angles), perlin_pixel_np(shape, res, angles), atol=2e-6)


def test_noise_is_zero_on_lattice_points_and_within_minus_one_one():
    rng = np.random.default_rng(3)
    for res in [(2, 4), (8, 8), (1, 32)]:
        angles = 2 * np.pi * rng.random((33, 33))
        n = noise_of((64, 64), res, angles)
        assert np.abs(n).max() <= 1 + 1e-6  # 2-D Perlin noise with unit gradients, times sqrt(2)
        on_lattice = n[:: 64 // res[0], :: 64 // res[1]]
        np.testing.assert_allclose(on_lattice, 0, atol=1e-6)


def test_random_noise_draws_lattices_of_1_to_32_cells_with_uniform_angles():
    torch.manual_seed(11)
    got = random_perlin_noise(4, 32, 32, "cpu", (0, 6))
    torch.manual_seed(11)  # the draws, in order: lattice exponents in [0, 6) per axis, then the corner angles
    exponents = torch.randint(0, 6, (4, 2))
    angles = 2 * math.pi * torch.rand(4, 33, 33)
    for i in range(4):
        res = tuple(int(2 ** e) for e in exponents[i])
        assert 1 <= min(res) and max(res) <= 32
        np.testing.assert_allclose(got[i].double().numpy(), perlin_pixel_np((32, 32), res, angles[i].double().numpy()), atol=2e-6)


# ----------------------------------------------------------------------------- rotation, threshold, masks
def test_rotation_by_90_degrees_is_rot90_and_zero_fills_the_corners():
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rotate(x, torch.zeros(2)), x)
    quarter = rotate(x, torch.tensor([90.0, -90.0]))
    ok = [any(torch.allclose(quarter[i], torch.rot90(x[i], k, (-2, -1)), atol=1e-5) for k in (1, 3)) for i in range(2)]
    assert all(ok)
    assert not torch.allclose(quarter[0], quarter[1], atol=1e-3)  # opposite senses
    eighth = rotate(torch.ones(1, 1, 32, 32), torch.tensor([45.0]))
    assert float(eighth[0, 0, 0, 0]) == 0.0 and float(eighth[0, 0, 16, 16]) == pytest.approx(1.0)
    # non-square images are rotated in pixel space: 180 degrees is a flip of both axes
    wide = torch.rand(1, 2, 6, 10)
    torch.testing.assert_close(rotate(wide, torch.tensor([180.0])), wide.flip(-1).flip(-2), atol=1e-5, rtol=0)


def test_masks_are_the_rotated_noise_above_the_threshold():
    torch.manual_seed(4)
    masks = perlin_masks(6, 32, 32, "cpu", (0, 6), threshold=0.5, rotation=90.0)
    torch.manual_seed(4)
    noise = random_perlin_noise(6, 32, 32, "cpu", (0, 6)).unsqueeze(1)
    degrees = (2 * torch.rand(6) - 1) * 90
    assert masks.dtype == torch.bool and masks.shape == (6, 1, 32, 32)
    assert torch.equal(masks, rotate(noise, degrees) > 0.5)
    assert degrees.abs().max() <= 90


def test_mask_coverage_statistics():
    torch.manual_seed(0)
    masks = perlin_masks(400, 64, 64, "cpu")
    coverage = masks.float().mean((1, 2, 3))
    # above 0.5 of a noise within [-1, 1]: a minority of pixels, empty masks happen but are few
    assert 0.01 < float(coverage.mean()) < 0.2
    assert float((coverage == 0).float().mean()) < 0.5
    assert float(coverage.max()) < 0.6
    # a higher threshold keeps a subset
    torch.manual_seed(0)
    stricter = perlin_masks(400, 64, 64, "cpu", threshold=0.7)
    assert not (stricter & ~masks).any()


@pytest.mark.parametrize("side", [8, 16, 28, 32, 64, 100, 256, 512])
def test_lattices_are_the_officials_and_auto_keeps_cells_of_at_least_8_px(side, monkeypatch):
    import freqexp.augment.perlin as P

    finest = max(c for c in (1, 2, 4, 8, 16, 32) if c == 1 or side / c >= 8)  # official: 32 cells of 8 px at 256 px
    seen = []
    real = P.perlin_masks
    monkeypatch.setattr(P, "perlin_masks", lambda b, h, w, device, scale, *a: seen.append(scale) or real(b, h, w, device, scale, *a))
    PerlinAnomaly(p=1.0, texture_ops=0, perlin_scale="auto").synthesize(torch.rand(2, 1, side, side))
    low, high = seen[0]
    assert low == 0 and 2 ** (high - 1) == finest
    seen.clear()
    PerlinAnomaly(p=1.0, texture_ops=0).synthesize(torch.rand(2, 1, side, side))
    assert seen[0] == (0, 6)  # the default: the official choice at any size


def test_random_rotation_rotates_about_a_fraction_p():
    torch.manual_seed(0)
    x = torch.rand(2000, 1, 8, 8)
    out = random_rotation(x, 0.3, 90.0)
    rotated = (out != x).flatten(1).any(1).float().mean()
    assert 0.25 < float(rotated) < 0.35
    assert torch.equal(random_rotation(x, 0.0, 90.0), x)


# ----------------------------------------------------------------------------- blend and synthesize
def test_blend_is_drams_formula():
    rng = np.random.default_rng(0)
    x, tex = rng.random((3, 2, 5, 6)), rng.random((3, 2, 5, 6))
    m = rng.random((3, 1, 5, 6)) > 0.5
    beta = rng.random((3, 1, 1, 1)) * 0.8
    want = x * (1 - m) + (1 - beta) * tex * m + beta * x * m
    got = blend(*(torch.from_numpy(a) for a in (x, tex, m, beta)))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


def test_synthesize_changes_only_inside_its_mask_and_is_seeded():
    aug = PerlinAnomaly(p=1.0)
    x = torch.rand(16, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    out, mask = aug.synthesize(x)
    assert out.shape == x.shape and mask.shape == (16, 1, 24, 24) and mask.dtype == torch.bool
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    assert torch.equal(out[~mask.expand_as(x)], x[~mask.expand_as(x)])
    assert mask.any()
    torch.manual_seed(2)
    again, mask2 = aug.synthesize(x)
    assert torch.equal(again, out) and torch.equal(mask2, mask)


def test_without_a_texture_folder_each_image_is_its_own_texture_with_one_warning(caplog):
    aug = PerlinAnomaly(p=1.0, texture_ops=0, beta=[0.0, 0.0])
    x = torch.rand(8, 1, 16, 16)
    with caplog.at_level(logging.WARNING, logger="freqexp"):
        out, mask = aug.synthesize(x)
        aug.synthesize(x)
    assert torch.equal(out, x)  # the unchanged image blended into itself
    warnings = [r for r in caplog.records if "texture_dir" in r.getMessage()]
    assert len(warnings) == 1 and "its own texture" in warnings[0].getMessage()


def write_textures(root, levels, mode="L"):
    from PIL import Image

    for i, level in enumerate(levels):
        folder = root / f"class{i % 2}"  # DTD: images/<class>/<name>.jpg
        folder.mkdir(parents=True, exist_ok=True)
        colour = level if mode == "L" else (level, 255 - level, level // 2)
        Image.new(mode, (40 + i, 30), colour).save(folder / f"t{i}.png")


@pytest.mark.parametrize("channels", [1, 3])
def test_texture_folder_in_dtd_layout_fills_the_masks(tmp_path, channels):
    levels = [10, 60, 110, 160, 210, 250]
    write_textures(tmp_path, levels, "L" if channels == 1 else "RGB")
    aug = PerlinAnomaly(p=1.0, texture_dir=str(tmp_path), texture_ops=0, beta=[0.0, 0.0])
    x = torch.rand(12, channels, 20, 20, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    out, mask = aug.synthesize(x)
    colours = [torch.tensor([v] if channels == 1 else [v, 255 - v, v // 2]).float() / 255 for v in levels]
    used = set()
    for i in range(12):
        if not mask[i].any():
            continue
        inside = out[i][:, mask[i, 0]]  # [C, pixels]: one solid texture, resized
        match = [k for k, c in enumerate(colours) if torch.allclose(inside, c.view(-1, 1).expand_as(inside), atol=1e-6)]
        assert len(match) == 1
        used.add(match[0])
    assert len(used) >= 2  # a random texture per image


def test_max_textures_keeps_an_even_spread(tmp_path):
    from freqexp.augment.texture import spread, texture_bank, texture_files

    write_textures(tmp_path, list(range(0, 200, 20)))
    files = texture_files(tmp_path)
    assert len(files) == 10 and files == sorted(files)
    assert spread(files, 5) == files[::2]
    assert texture_bank(tmp_path, 1, 8, 8, 5).shape == (5, 1, 8, 8)


@pytest.mark.parametrize("overrides,key", [
    (["augment.texture_dir=/nonexistent/dtd"], "augment.texture_dir"),
    (["augment.perlin_scale=[3,3]"], "augment.perlin_scale"),
    (["augment.threshold=1.5"], "augment.threshold"),
    (["augment.beta=[0.5,0.2]"], "augment.beta"),
    (["augment.texture_ops=11"], "augment.texture_ops"),
    (["augment.max_textures=0"], "augment.max_textures"),
    (["augment.noise_rotation=-1"], "augment.noise_rotation"),
])
def test_bad_perlin_options_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        build_augment(compose_cfg(["augment=perlin", *overrides]).augment)
    assert e.value.key == key


def test_an_empty_texture_folder_is_refused(tmp_path):
    (tmp_path / "sub").mkdir()
    with pytest.raises(ConfigError) as e:
        PerlinAnomaly(texture_dir=str(tmp_path))
    assert e.value.key == "augment.texture_dir" and "no images" in e.value.message


# ----------------------------------------------------------------------------- texture operations
def pil_of(levels: np.ndarray):
    from PIL import Image

    return Image.fromarray(levels.astype(np.uint8))


def as_float(levels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(levels.astype(np.float32) / 255)[None, None]


def as_levels(x: torch.Tensor) -> np.ndarray:
    return (x[0, 0].numpy() * 255).round().astype(int)


@pytest.fixture
def gray_levels():
    return (np.random.default_rng(0).random((21, 26)) ** 2 * 255).round().astype(np.uint8)


def test_equalize_and_autocontrast_are_pils(gray_levels):
    from PIL import ImageOps

    from freqexp.augment.texture import autocontrast, equalize

    assert (as_levels(equalize(as_float(gray_levels))) == np.asarray(ImageOps.equalize(pil_of(gray_levels)))).all()
    for cutoff in (0, 3, 20):
        got = as_levels(autocontrast(as_float(gray_levels), torch.tensor([cutoff])))
        assert (got == np.asarray(ImageOps.autocontrast(pil_of(gray_levels), cutoff=cutoff))).all(), cutoff


def test_posterize_solarize_invert_gamma_are_the_8_bit_formulas(gray_levels):
    from PIL import ImageOps

    from freqexp.augment.texture import gamma_contrast, invert, posterize, solarize

    x = as_float(gray_levels)
    for bits in (1, 3, 8):
        got = as_levels(posterize(x, torch.tensor(bits).view(1, 1, 1, 1)))
        assert (got == np.asarray(ImageOps.posterize(pil_of(gray_levels), bits))).all()
    got = as_levels(solarize(x, torch.tensor(100).view(1, 1, 1, 1), torch.tensor(True).view(1, 1, 1, 1)))
    assert (got == np.asarray(ImageOps.solarize(pil_of(gray_levels), 100))).all()
    assert (as_levels(solarize(x, torch.tensor(100).view(1, 1, 1, 1), torch.tensor(False).view(1, 1, 1, 1))) == gray_levels).all()
    assert (as_levels(invert(x)) == 255 - gray_levels.astype(int)).all()
    np.testing.assert_allclose(gamma_contrast(x, torch.tensor(2.0).view(1, 1, 1, 1))[0, 0].numpy(),
                               (gray_levels / 255.0) ** 2, atol=1e-6)


def test_sharpness_is_pils_enhance(gray_levels):
    from PIL import ImageEnhance

    from freqexp.augment.texture import sharpness

    for factor in (0.0, 0.5, 1.7):
        got = sharpness(as_float(gray_levels), torch.tensor(factor).view(1, 1, 1, 1))[0, 0].numpy() * 255
        want = np.asarray(ImageEnhance.Sharpness(pil_of(gray_levels)).enhance(factor)).astype(float)
        assert np.abs(got - want).max() <= 2.0, factor  # Pillow rounds the smoothed image and the blend to 8 bit


def test_hue_and_saturation_shift_in_hsv():
    from freqexp.augment.texture import hue_saturation, rgb_to_hsv

    x = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    hsv = rgb_to_hsv(x).numpy()
    want = np.array([[[colorsys.rgb_to_hsv(*x[b, :, i, j].tolist()) for j in range(5)] for i in range(4)] for b in range(2)])
    np.testing.assert_allclose(hsv, want.transpose(0, 3, 1, 2), atol=1e-6)
    out = hue_saturation(x, torch.tensor([0.1, -0.2]).view(2, 1, 1), torch.tensor([0.0, 0.1]).view(2, 1, 1))
    for b, (dh, ds) in enumerate([(0.1, 0.0), (-0.2, 0.1)]):
        for i, j in [(0, 0), (3, 4), (2, 1)]:
            h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
            want_rgb = colorsys.hsv_to_rgb((h + dh) % 1, min(max(s + ds, 0), 1), v)
            np.testing.assert_allclose(out[b, :, i, j].numpy(), want_rgb, atol=1e-5)
    grey = torch.rand(2, 1, 4, 5)
    assert torch.equal(hue_saturation(grey), grey)


@pytest.mark.parametrize("subsets", [True, False])
def test_each_texture_gets_k_distinct_operations_in_random_order(monkeypatch, subsets):
    import freqexp.augment.texture as T

    # stand-ins that write their index as a digit: 3 rounds from 0 give 100a + 10b + c
    fakes = {f"op{j}": (lambda j: lambda x: x * 10 + j)(j) for j in range(10)}
    monkeypatch.setattr(T, "TEXTURE_OPS", fakes)
    torch.manual_seed(0)
    out = T.random_texture_ops(torch.zeros(300, 1, 2, 2), 3, subsets=subsets)
    codes = out[:, 0, 0, 0].round().long().tolist()
    digits = [(c // 100, c // 10 % 10, c % 10) for c in codes]
    assert all(len(set(d)) == 3 for d in digits)  # distinct operations
    assert len(set(digits)) > 100  # many orders and choices
    torch.manual_seed(0)
    other = T.random_texture_ops(torch.zeros(300, 1, 2, 2), 3, subsets=not subsets)
    assert torch.equal(other, out)  # both paths: the same draw of operations and order
    assert torch.equal(T.random_texture_ops(out, 0), out)


def test_every_texture_operation_keeps_shape_and_range():
    from freqexp.augment.texture import TEXTURE_OPS, random_texture_ops

    torch.manual_seed(0)
    for c in (1, 3):
        x = torch.rand(4, c, 9, 11)
        for name, op in TEXTURE_OPS.items():
            y = op(x)
            assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1, name
        y = random_texture_ops(x, 3)
        assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
