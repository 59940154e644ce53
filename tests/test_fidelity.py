"""Fidelity: each method named after a paper computes what the paper (and its official code)
computes. Every expected value here is written from the reference formula in this file, with
numpy / scipy, never by calling the code under test.

References: FAIR (Liu et al., 2023; github.com/liutongkun/FAIR, data_loaderbhpf.py), PatchCore
(Roth et al., CVPR 2022, eq. 7; amazon-science/patchcore-inspection), DRAEM (Zavrtanik et al.,
ICCV 2021; VitjanZ/DRAEM, test_DRAEM.py), WEDGE-Net (aura1999jmpark/WEDGE-Net, model.py), MemAE
(Gong et al., ICCV 2019; donggong1/memae-anomaly-detection, models/memory_module.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from freqexp.freq import build_filter
from tests.conftest import compose_cfg


# ----------------------------------------------------------------------------- FAIR's BHPF
def fair_bhpf_numpy(gray: np.ndarray, d0: float = 30.0, n: int = 2) -> np.ndarray:
    """FAIR's data loader, step by step: fft2, fftshift, H = 1 / (1 + (D0 / (D + 1e-6))^(2n)) with
    D the distance of each shifted bin from (rows/2, cols/2), ifftshift, ifft2, real part."""
    rows, cols = gray.shape
    crow, ccol = rows // 2, cols // 2
    y, x = np.ogrid[:rows, :cols]
    dist = np.sqrt((x - ccol) ** 2 + (y - crow) ** 2)
    h = 1.0 / (1.0 + (d0 / (dist + 1e-6)) ** (2 * n))
    return np.real(np.fft.ifft2(np.fft.ifftshift(np.fft.fftshift(np.fft.fft2(gray)) * h)))


def test_butterworth_high_pass_values_at_chosen_radii():
    # H(D) = 1 / (1 + (D0 / D)^(2n)) at D0 = 30 px, n = 2, on a 256 px grid (D in frequency samples)
    module, _ = build_filter(compose_cfg(["filter=fair"]).filter)
    mask = module.mask(256, 256, "cpu").double().numpy()
    for d, want in ((15, 1 / (1 + 2.0**4)), (30, 0.5), (60, 1 / (1 + 0.5**4))):
        assert mask[0, int(d)] == pytest.approx(want, abs=1e-6), d  # bin (0, d) lies at D = d
        assert mask[int(d), 0] == pytest.approx(want, abs=1e-6), d
    # at a tenth of Nyquist (D = 12.8 px -> the bin D = 13 nearest to it) FAIR passes ~0.035 of the amplitude
    assert mask[0, 13] == pytest.approx(1 / (1 + (30 / 13) ** 4), abs=1e-6)
    assert mask[0, 13] < 0.04
    assert mask[0, 0] == 0.0


def test_fair_preset_equals_fairs_filter_on_256px_images():
    module, placement = build_filter(compose_cfg(["filter=fair"]).filter)
    assert placement == "input"
    gray = np.random.default_rng(0).random((256, 256))
    got = module(torch.from_numpy(gray)[None, None].float()).double().numpy()[0, 0]
    np.testing.assert_allclose(got, fair_bhpf_numpy(gray), atol=2e-5)


@pytest.mark.parametrize("size", [28, 64])
def test_fair_preset_keeps_fairs_proportion_at_other_sizes(size):
    # D0 scales with the image: 30 px at 256 -> 30 * size / 256 px
    module, _ = build_filter(compose_cfg(["filter=fair"]).filter)
    gray = np.random.default_rng(1).random((size, size))
    got = module(torch.from_numpy(gray)[None, None].float()).double().numpy()[0, 0]
    np.testing.assert_allclose(got, fair_bhpf_numpy(gray, d0=30 * size / 256), atol=2e-5)


def test_cutoff_in_pixels_is_fairs_d0_at_any_size():
    module, _ = build_filter(compose_cfg(["filter=fft", "filter.unit=px", "filter.cutoff=30"]).filter)
    gray = np.random.default_rng(2).random((128, 128))
    got = module(torch.from_numpy(gray)[None, None].float()).double().numpy()[0, 0]
    np.testing.assert_allclose(got, fair_bhpf_numpy(gray, d0=30), atol=2e-5)


# ----------------------------------------------------------------------------- PatchCore
from scipy import ndimage  # noqa: E402
from scipy.spatial.distance import cdist as scipy_cdist  # noqa: E402

from freqexp.models.memory_bank import PatchCore, approximate_greedy_coreset, gaussian_filter, reweighted_max  # noqa: E402

TINY_PATCHCORE = dict(input_size=32, center_crop=None, feature_dim=12, pretrain_dim=20, projection_dim=None, smooth_sigma=0.0)


def eq7_numpy(test_feats: np.ndarray, bank: np.ndarray, b: int) -> float:
    """PatchCore eq. 7 for one image from its patch features [P, D] and a bank [M, D]."""
    d = np.sqrt(((test_feats[:, None, :] - bank[None]) ** 2).sum(-1))  # [P, M]
    nearest = d.argmin(1)
    patch_scores = d[np.arange(len(d)), nearest]
    p = int(patch_scores.argmax())
    s_star, m_star = patch_scores[p], bank[nearest[p]]
    neighbours = np.argsort(np.sqrt(((bank - m_star) ** 2).sum(1)))[:b]  # N_b(m*), m* itself first
    dist_to_neighbours = np.sqrt(((bank[neighbours] - test_feats[p]) ** 2).sum(1))
    weight = 1 - np.exp(np.sqrt(((test_feats[p] - m_star) ** 2).sum())) / np.exp(dist_to_neighbours).sum()
    return weight * s_star


def test_patchcore_reweighted_max_on_a_hand_built_bank():
    # bank: a tight cluster near the origin and one isolated point; two test images of 3 patches
    bank = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1], [3.0, 3.0]])
    feats = torch.tensor([[[0.05, 0.05], [0.5, 0.4], [0.0, 0.02]],    # worst patch near the dense cluster
                          [[0.0, 0.0], [2.0, 2.2], [0.1, 0.1]]])      # worst patch near the isolated point
    d = torch.cdist(feats.reshape(-1, 2), bank)
    dist, index = d.min(1)
    got = reweighted_max(dist.view(2, 3), index.view(2, 3), feats, bank, b=3)
    for i in range(2):
        assert float(got[i]) == pytest.approx(eq7_numpy(feats[i].numpy().astype(np.float64), bank.numpy().astype(np.float64), 3), rel=1e-5)
    # b = 1: the official repository's plain max of the patch scores
    plain = reweighted_max(dist.view(2, 3), index.view(2, 3), feats, bank, b=1)
    np.testing.assert_allclose(plain.numpy(), dist.view(2, 3).max(1).values.numpy())


def test_patchcore_score_is_eq7_over_its_own_features():
    torch.manual_seed(0)
    model = PatchCore((1, 28, 28), sampling_ratio=0.5, **TINY_PATCHCORE)
    train, test = torch.rand(6, 1, 28, 28), torch.rand(3, 1, 28, 28)
    model.observe(train)
    model.finalize()
    _, scores = model.score(test)
    feats = model.raw_features(test).double().numpy()  # [B, h, w, D]
    bank = model.memory_bank.double().numpy()
    for i in range(3):
        assert float(scores[i]) == pytest.approx(eq7_numpy(feats[i].reshape(-1, feats.shape[-1]), bank, 9), rel=1e-4)


@pytest.mark.parametrize("shape,sigma", [((20, 20), 4.0), ((64, 48), 4.0), ((7, 9), 1.5)])
def test_map_smoothing_is_scipy_gaussian_filter(shape, sigma):
    # PatchCore and WEDGE-Net smooth with scipy.ndimage.gaussian_filter(map, sigma=4): reflect mode,
    # truncate 4; also when the kernel radius (16) exceeds the map
    m = np.random.default_rng(3).random(shape)
    got = gaussian_filter(torch.from_numpy(m)[None, None].float(), sigma).double().numpy()[0, 0]
    np.testing.assert_allclose(got, ndimage.gaussian_filter(m, sigma=sigma), atol=1e-5)


def nearest_distance_grid(features: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """[h, w] Euclidean distance of each patch of features [h, w, D] to its nearest bank row, by
    brute force in float64."""
    h, w, d = features.shape
    return scipy_cdist(features.reshape(-1, d), bank).min(1).reshape(h, w)


def upsample_bilinear(grid: np.ndarray, size) -> np.ndarray:
    """The official code's F.interpolate(scores, size, mode="bilinear", align_corners=False)."""
    t = torch.from_numpy(grid)[None, None]
    return torch.nn.functional.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()


def test_patchcore_map_is_upsampled_then_smoothed_with_sigma_4():
    # the official RescaleSegmentor: nearest-bank distance of each patch, bilinear upsampling to the
    # backbone input (align_corners=False), scipy's gaussian_filter(sigma=4)
    torch.manual_seed(0)
    model = PatchCore((1, 28, 28), sampling_ratio=0.5, **{**TINY_PATCHCORE, "input_size": None, "smooth_sigma": 4.0})
    model.observe(torch.rand(4, 1, 28, 28))
    model.finalize()
    test = torch.rand(2, 1, 28, 28)
    maps, _ = model.score(test)
    feats = model.raw_features(test).double().numpy()  # the feature extractor's output: not what is tested here
    bank = model.memory_bank.double().numpy()
    assert feats.shape[1:3] == (4, 4) and maps.shape == (2, 1, 28, 28)
    for i in range(2):
        expected = ndimage.gaussian_filter(upsample_bilinear(nearest_distance_grid(feats[i], bank), (28, 28)), sigma=4)
        np.testing.assert_allclose(maps[i, 0].double().numpy(), expected, rtol=1e-4, atol=1e-5 * expected.max())
        # the map is not the unsmoothed one: sigma 4 matters at this size
        assert np.abs(upsample_bilinear(nearest_distance_grid(feats[i], bank), (28, 28)) - expected).max() > 1e-3 * expected.max()


def adaptive_avg_pool_1d_numpy(v: np.ndarray, out: int) -> np.ndarray:
    n = len(v)
    return np.array([v[(i * n) // out: -(-((i + 1) * n) // out)].mean() for i in range(out)])


def test_patchcore_features_follow_the_official_mean_mapper_and_aggregator():
    # per layer: the (C, 3, 3) zero-padded neighbourhood of each location, flattened channel-major,
    # adaptive-average-pooled to pretrain_dim; deeper grids bilinearly upsampled first; the layers'
    # vectors concatenated and pooled to feature_dim
    torch.manual_seed(0)
    model = PatchCore((1, 32, 32), **TINY_PATCHCORE)
    x = torch.rand(1, 1, 32, 32)
    maps = model.extractor(x)
    f2, f3 = maps["layer2"][0].double().numpy(), maps["layer3"][0].double().numpy()  # [C, 4, 4], [C, 2, 2]

    def neighbourhoods(f):  # [C, h, w] -> [h, w, C*9]
        c, h, w = f.shape
        p = np.pad(f, ((0, 0), (1, 1), (1, 1)))
        return np.stack([np.stack([p[:, y:y + 3, x:x + 3].reshape(-1) for x in range(w)]) for y in range(h)])

    n2 = neighbourhoods(f2)
    n3 = neighbourhoods(f3)  # upsample each of the C*9 channels from 2x2 to 4x4 (torch's bilinear as the reference's)
    n3 = torch.nn.functional.interpolate(torch.from_numpy(n3).permute(2, 0, 1)[None], size=(4, 4), mode="bilinear",
                                         align_corners=False)[0].permute(1, 2, 0).numpy()
    got = model.raw_features(x)[0].double().numpy()  # [4, 4, 12]
    for y in range(4):
        for x_ in range(4):
            v = np.concatenate([adaptive_avg_pool_1d_numpy(n2[y, x_], 20), adaptive_avg_pool_1d_numpy(n3[y, x_], 20)])
            np.testing.assert_allclose(got[y, x_], adaptive_avg_pool_1d_numpy(v, 12), rtol=1e-4, atol=1e-6)


def test_approximate_greedy_coreset_follows_patchcore():
    # start: each row's mean distance to 10 random rows; then the farthest row, k times
    feats = torch.randn(200, 5, generator=torch.Generator().manual_seed(4))
    got = approximate_greedy_coreset(feats, 15, torch.Generator().manual_seed(7)).tolist()
    starts = torch.randperm(200, generator=torch.Generator().manual_seed(7))[:10].numpy()
    f = feats.double().numpy()
    d = np.sqrt(((f[:, None] - f[None, starts]) ** 2).sum(-1)).mean(1)
    chosen = []
    for _ in range(15):
        i = int(d.argmax())
        chosen.append(i)
        d = np.minimum(d, np.sqrt(((f - f[i]) ** 2).sum(1)))
    assert got == chosen


def greedy_from_mean_start_numpy(f: np.ndarray, starts: np.ndarray, k: int) -> list:
    """The official ApproximateGreedyCoresetSampler on features f [N, d]: each row's mean
    Euclidean distance to the start rows, then k times the farthest row, min-updated."""
    d = np.sqrt(((f[:, None] - f[None, starts]) ** 2).sum(-1)).mean(1)
    chosen = []
    for _ in range(k):
        i = int(d.argmax())
        chosen.append(i)
        d = np.minimum(d, np.sqrt(((f - f[i]) ** 2).sum(1)))
    return chosen


def test_patchcore_coreset_runs_on_a_random_128_dim_linear_projection():
    # the official sampler first maps the features by torch.nn.Linear(D, 128, bias=False) with its
    # default (kaiming-uniform, a = sqrt(5)) init: weights uniform in [-1/sqrt(D), 1/sqrt(D)]; the
    # k-center search then runs on the projected rows. Our draw: a D x 128 uniform matrix from the
    # sampling seed's generator, then the 10 random starts from the same generator.
    torch.manual_seed(0)
    model = PatchCore((1, 28, 28), sampling_ratio=0.05, **{**TINY_PATCHCORE, "projection_dim": 128})
    n, dim = 400, 300
    rng = np.random.default_rng(8)
    # clustered rows with many near-ties, so the chosen rows depend on the metric the search uses
    feats = rng.normal(size=(8, dim))[rng.integers(0, 8, n)] + 0.3 * rng.normal(size=(n, dim))
    features = torch.from_numpy(feats).float()
    k = int(0.05 * n)
    got = model.select(features).tolist()

    gen = torch.Generator().manual_seed(model.sampling_seed)
    bound = 1 / np.sqrt(dim)
    weight = (torch.rand(dim, 128, generator=gen).double().numpy() * 2 - 1) * bound
    starts = torch.randperm(n, generator=gen)[:10].numpy()
    f = features.double().numpy()
    assert got == greedy_from_mean_start_numpy(f @ weight, starts, k)
    # the projection is what makes this selection: without it, or to another width, it differs
    assert got != greedy_from_mean_start_numpy(f, starts, k)
    gen64 = torch.Generator().manual_seed(model.sampling_seed)
    weight64 = (torch.rand(dim, 64, generator=gen64).double().numpy() * 2 - 1) * bound
    assert got != greedy_from_mean_start_numpy(f @ weight64, torch.randperm(n, generator=gen64)[:10].numpy(), k)
    # and the matrix is nn.Linear's: its default init draws from the same interval
    linear = torch.nn.Linear(dim, 128, bias=False).weight.detach().numpy()
    assert np.abs(linear).max() <= bound and np.abs(weight).max() <= bound and np.abs(weight).max() > 0.95 * bound
    assert weight.std() == pytest.approx(bound / np.sqrt(3), rel=0.02) and linear.std() == pytest.approx(bound / np.sqrt(3), rel=0.02)


def test_patchcore_defaults_are_the_papers():
    cfg = compose_cfg(["model=patchcore"]).model
    assert cfg.backbone.arch == "wide_resnet50_2" and list(cfg.layers) == ["layer2", "layer3"]
    assert (cfg.input_size, cfg.center_crop, cfg.patch_size) == (256, 0.875, 3)
    assert (cfg.feature_dim, cfg.pretrain_dim, cfg.sampling, cfg.sampling_ratio, cfg.projection_dim) == (1024, 1024, "approximate_greedy", 0.1, 128)
    assert (cfg.smooth_sigma, cfg.reweight_neighbours) == (4.0, 9)
    model = PatchCore((3, 300, 300), backbone={"arch": "resnet18"}, **{k: v for k, v in cfg.items() if k not in ("name", "backbone")})
    assert model.extractor.backbone_size() == (224, 224) and model.patches_per_image() == 28 * 28


# ----------------------------------------------------------------------------- DRAEM
from freqexp.models import MODELS  # noqa: E402
from freqexp.models.draem import draem_score_pool  # noqa: E402


def draem_score_numpy(prob: np.ndarray, k: int) -> float:
    """DRAEM's test script: avg_pool2d(P(anomalous), k, stride 1, padding k // 2) with the zero
    padding counted in the mean (divide by k^2 everywhere), then the maximum."""
    h, w = prob.shape
    p = np.pad(prob, k // 2)
    pooled = np.array([[p[y:y + k, x:x + k].sum() / k**2 for x in range(w)] for y in range(h)])
    return float(pooled.max())


@pytest.mark.parametrize("size,pool", [(64, 21), (28, 3), (40, 5)])
def test_draem_image_score_is_the_max_of_the_mean_pooled_map(size, pool):
    model = MODELS.get("draem")((1, size, size), channels=[8, 16], seg_channels=[8, 16], score_pool=pool)
    prob = torch.from_numpy(np.random.default_rng(size).random((2, 1, size, size))).float()
    prob[0, 0, :6, :6] = 1.0  # a corner blob: zero padding must pull its pooled value down
    got = model.image_scores(prob)
    for i in range(2):
        assert float(got[i]) == pytest.approx(draem_score_numpy(prob[i, 0].double().numpy(), pool), rel=1e-5)


def test_draem_pool_auto_keeps_21_px_at_256_px():
    assert draem_score_pool("auto", (256, 256)) == 21
    assert draem_score_pool("auto", (28, 28)) == 3  # 21 * 28 / 256 = 2.3 -> the nearest odd size
    assert draem_score_pool("auto", (512, 512)) == 43
    assert draem_score_pool("auto", (8, 8)) == 1


# ----------------------------------------------------------------------------- WEDGE-Net
from freqexp.models.wedge import WedgeNet  # noqa: E402


def test_wedge_feature_layout_and_shapes():
    torch.manual_seed(0)
    on = WedgeNet((3, 64, 64), backbone={"arch": "resnet50"})  # the reference's Resize(256) + CenterCrop(224)
    off = WedgeNet((3, 64, 64), backbone={"arch": "resnet50"}, use_semantic=False)
    assert on.extractor.backbone_size() == (224, 224)
    assert on.feature_width() == 512 + 1024 + 512 and off.feature_width() == 512 + 1024
    x = torch.rand(1, 3, 64, 64)
    feats = on.raw_features(x)
    assert feats.shape == (1, 28, 28, 2048)  # layer2's grid at 224 px


def sigmoid_numpy(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def l2_normalise_channels(f: np.ndarray) -> np.ndarray:
    """torch's F.normalize(f, p=2, dim=1): f / max(||f||_2 over channels, 1e-12)."""
    return f / np.maximum(np.sqrt((f**2).sum(1, keepdims=True)), 1e-12)


def avg_pool_3x3_zero_padded(f: np.ndarray) -> np.ndarray:
    """avg_pool2d(f, 3, stride=1, padding=1): the zero padding counted in every mean."""
    h, w = f.shape[-2:]
    padded = np.pad(f, ((0, 0), (0, 0), (1, 1), (1, 1)))
    return sum(padded[:, :, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9


def test_wedge_blocks_are_l2_normalised_gated_features_and_the_semantic_block():
    # WEDGE-Net's model.py: enc = freq_encoder(guidance at layer2's grid);
    #   block 1: normalize(f2 * (1 + sigmoid(enc))), block 2: normalize(up(f3) * (1 + sigmoid(proj_to_f3(enc)))),
    #   block 3: normalize(f2) * minmax(mean_c |f2|) * 2; concatenated, then 3x3 average pooling
    from freqexp.models.wedge import guidance_map

    torch.manual_seed(0)
    model = WedgeNet((1, 32, 32), input_size=64, center_crop=None)  # resnet18: C2 = 128, C3 = 256, an 8x8 grid
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():  # the sub-modules' raw outputs
        normalised = model.extractor.prepare_input(x)
        raw = model.extractor.net.features(normalised, ["layer2", "layer3"])
        f3_up = torch.nn.functional.interpolate(raw["layer3"], size=(8, 8), mode="bilinear", align_corners=False)
        guide = torch.nn.functional.interpolate(guidance_map(normalised, model.dwt_kernels, "haar"), size=(8, 8), mode="bilinear",
                                                align_corners=False)
        enc = model.freq_encoder(guide)
        proj = model.proj_to_f3(enc)
    f2, f3_up, enc, proj = (t.double().numpy() for t in (raw["layer2"], f3_up, enc, proj))
    assert f2.shape == (2, 128, 8, 8) and f3_up.shape == (2, 256, 8, 8) and enc.shape == (2, 128, 8, 8) and proj.shape == (2, 256, 8, 8)

    block2 = l2_normalise_channels(f2 * (1 + sigmoid_numpy(enc)))
    block3 = l2_normalise_channels(f3_up * (1 + sigmoid_numpy(proj)))
    amp = np.abs(f2).mean(1, keepdims=True)
    lo, hi = amp.min(axis=(1, 2, 3), keepdims=True), amp.max(axis=(1, 2, 3), keepdims=True)
    semantic = l2_normalise_channels(f2) * ((amp - lo) / (hi - lo + 1e-6)) * 2.0
    expected = avg_pool_3x3_zero_padded(np.concatenate([block2, block3, semantic], 1))

    got = model.streams(x)[0].double().numpy()  # [2, 512, 8, 8]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.raw_features(x).double().numpy(), expected.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-6)
    # the gates change the features beyond the tolerance above (a gate dropped, or applied after
    # the normalisation, would fail): compare the ungated blocks
    ungated2 = avg_pool_3x3_zero_padded(l2_normalise_channels(f2))
    ungated3 = avg_pool_3x3_zero_padded(l2_normalise_channels(f3_up))
    assert np.abs(ungated2 - expected[:, :128]).max() > 1e-3
    assert np.abs(ungated3 - expected[:, 128:384]).max() > 1e-3


def test_wedge_guidance_is_the_min_max_normalised_total_haar_energy():
    from freqexp.models.wedge import guidance_map, wedge_dwt_kernels

    x = torch.from_numpy(np.random.default_rng(5).random((1, 3, 12, 12))).float()
    got = guidance_map(x, wedge_dwt_kernels("haar"), "haar")[0, 0].double().numpy()
    gray = 0.299 * x[0, 0].double().numpy() + 0.587 * x[0, 1].double().numpy() + 0.114 * x[0, 2].double().numpy()
    energy = np.zeros((12, 12))
    for y in range(11):  # stride-1 2x2 orthonormal haar: LL^2+LH^2+HL^2+HH^2 = the block's sum of squares
        for x_ in range(11):
            energy[y, x_] = np.sqrt((gray[y:y + 2, x_:x_ + 2] ** 2).sum())
    expected = (energy - energy.min()) / (energy.max() - energy.min() + 1e-6)  # last row/col: zero padding
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_wedge_image_score_is_the_max_of_the_smoothed_map_at_the_backbone_size():
    # WEDGE-Net's evaluation.py: min cdist to the bank per patch, F.interpolate to the 224 px crop
    # (bilinear, align_corners=False), gaussian_filter(sigma=4), max; here the backbone input is 64 px
    torch.manual_seed(0)
    model = WedgeNet((1, 32, 32), input_size=64, center_crop=None, sampling_ratio=0.5)
    model.observe(torch.rand(4, 1, 32, 32))
    model.finalize()
    test = torch.rand(2, 1, 32, 32)
    _, scores = model.score(test)
    feats = model.raw_features(test).double().numpy()  # the feature extractor's output: not what is tested here
    bank = model.memory_bank.double().numpy()
    assert feats.shape[1:3] == (8, 8)
    for i in range(2):
        patch = nearest_distance_grid(feats[i], bank)
        smoothed = ndimage.gaussian_filter(upsample_bilinear(patch, (64, 64)), sigma=4)
        assert float(scores[i]) == pytest.approx(smoothed.max(), rel=1e-5)
        assert smoothed.max() < patch.max() * (1 - 1e-3)  # the smoothing lowers the peak: the plain max would fail


def test_auto_score_of_a_reconstruction_model_is_the_mean_squared_error():
    from freqexp.training import build_module
    from freqexp.validate import make_plan

    cfg = compose_cfg(["model=cae", "dataset=synthetic", "hardware=cpu", "loss=mse"])
    module = build_module(make_plan(cfg), cfg)
    x = torch.rand(3, 1, 32, 32)
    maps, scores = module.score(x)
    recon = module.model.eval().reconstruct(x)
    np.testing.assert_allclose(scores.numpy(), ((recon - x) ** 2).mean((1, 2, 3)).detach().numpy(), rtol=1e-5)


# ----------------------------------------------------------------------------- filter.apply_to=both
@pytest.mark.parametrize("filt", ["bhpf", "fair", "dwt", "dct"])
def test_apply_to_both_trains_towards_a_reachable_target(filt):
    """A high pass takes the target out of [0, 1]; every decoder ends in a sigmoid. The training
    objective compares the filtered output with the filtered image, so a model that reproduces
    its input drives the loss to zero; the old objective (sigmoid output vs filtered image) has
    a floor of about half the filtered image's energy outside [0, 1]."""
    from freqexp.training import build_module
    from freqexp.validate import make_plan

    cfg = compose_cfg(["model=cae", "dataset=synthetic", "hardware=cpu", "loss=mse", f"filter={filt}", "filter.apply_to=both"])
    module = build_module(make_plan(cfg), cfg)
    x = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    x_in, target = module.model_io(x, train=True)
    floor = float((target.clamp(0, 1) - target).pow(2).mean())  # the best any [0,1] output can do against it
    assert floor > 1e-3
    # a memorising "model": one free logit per pixel, trained through the module's own comparison
    logits = torch.zeros_like(x, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        loss, _ = module.compare(torch.sigmoid(logits), target)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05 * floor
    assert float(module.compare(x, target)[0]) < 1e-10  # a perfect reconstruction scores 0
    with torch.no_grad():
        maps, scores = module.score(x)
    assert maps.shape == (8, 1, 32, 32) and torch.isfinite(scores).all()


@pytest.mark.parametrize("model", ["ddpm", "ganomaly", "vit_ad"])
def test_apply_to_both_is_refused_where_the_objective_uses_the_target_itself(model):
    from freqexp.errors import ConfigError
    from freqexp.validate import make_plan

    with pytest.raises(ConfigError) as err:
        make_plan(compose_cfg([f"model={model}", "dataset=synthetic", "hardware=cpu", "filter=bhpf", "filter.apply_to=both"]))
    assert err.value.key == "filter.apply_to" and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("model,loss,augment,optim", [
    ("draem", "mse+ssim", "perlin", dict(name="adam", lr=1e-4, weight_decay=0.0, scheduler="multistep")),
    ("ganomaly", "l1", "none", dict(name="adam", lr=2e-4, betas=[0.5, 0.999], weight_decay=0.0, scheduler="none")),
    ("memae", "mse", "none", dict(name="adam", lr=1e-4, weight_decay=0.0, scheduler="none")),
    ("ddpm", "mse", "none", dict(name="adamw", lr=1e-3, scheduler="cosine")),
    ("cae", "mse+ssim", "none", dict(name="adamw", lr=1e-3, scheduler="cosine")),
])
def test_model_alone_brings_its_papers_recipe(model, loss, augment, optim):
    cfg = compose_cfg([f"model={model}"])
    assert (cfg.loss.spec, cfg.augment.name) == (loss, augment)
    for key, value in optim.items():
        assert cfg.optim[key] == value, key


def test_every_part_of_a_recipe_stays_overridable():
    cfg = compose_cfg(["model=draem", "loss=mse", "augment=freq_cutpaste", "optim.lr=3e-4", "optim=default"])
    assert (cfg.loss.spec, cfg.augment.name, cfg.optim.name, cfg.optim.lr) == ("mse", "freq_cutpaste", "adamw", 3e-4)


def test_draems_lr_drops_by_5_at_80_and_90_percent_of_training():
    from freqexp.training import build_module
    from freqexp.validate import make_plan

    cfg = compose_cfg(["model=draem", "dataset=synthetic", "hardware=cpu", "trainer.max_epochs=10"])
    module = build_module(make_plan(cfg), cfg)
    opt = module.make_optimizer([torch.nn.Parameter(torch.zeros(1))])
    sched = module.make_scheduler(opt)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lrs, [1e-4] * 8 + [2e-5] + [4e-6], rtol=1e-9)
