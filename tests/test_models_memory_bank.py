"""Memory-bank detectors (patchcore, patchcore_dwt, wedge), their ResNet backbone, and the pixel baselines
(knn, pca), each checked against an independent reference: torchvision's published parameter
counts, brute-force numpy loops, scikit-learn and pywavelets."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from freqexp.errors import ConfigError
from freqexp.models import memory_bank as mb
from freqexp.models.backbone import FeatureExtractor, ResNet
from freqexp.models.baselines import NearestImage, PCAReconstruction
from freqexp.models.memory_bank import PatchCore, PatchCoreDWT, greedy_coreset, nearest_distance
from freqexp.models.wedge import WedgeNet

SMALL = dict(input_size=32, center_crop=None, feature_reduction="avgpool", feature_dim=16, pretrain_dim=16, projection_dim=8,
             smooth_sigma=0.0)  # 4x4 patch grid, resnet18


def images(n: int, shape=(1, 16, 16), seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def fitted(cls, x: torch.Tensor, **options):
    model = cls(tuple(x.shape[1:]), **options)
    for batch in x.split(8):
        model.observe(batch)
    model.finalize()
    return model


# -- backbone


@pytest.mark.parametrize("arch, n_params, channels", [
    ("resnet18", 11_689_512, (64, 128, 256, 512)),  # torchvision's published parameter counts
    ("resnet50", 25_557_032, (256, 512, 1024, 2048)),
])
def test_resnet_matches_torchvision_sizes_and_strides(arch, n_params, channels):
    net = ResNet(arch).eval()
    assert sum(p.numel() for p in net.parameters()) == n_params
    assert "layer2.0.downsample.1.running_var" in net.state_dict() and "fc.weight" in net.state_dict()
    with torch.no_grad():
        feats = net.features(torch.rand(2, 3, 64, 48), ["layer1", "layer2", "layer3", "layer4"])
        assert net(torch.rand(2, 3, 64, 48)).shape == (2, 1000)
    for (name, f), ch, stride in zip(feats.items(), channels, (4, 8, 16, 32)):
        assert f.shape == (2, ch, 64 // stride, -(-48 // stride)), name  # odd sides round up


def test_wide_resnet_has_double_bottleneck_width():
    net = ResNet("wide_resnet50_2")
    assert net.layer1[0].conv1.out_channels == 128 and net.layer3[0].conv2.out_channels == 512
    assert sum(p.numel() for p in net.parameters()) == 68_883_240


def test_weights_file_round_trips_and_bad_files_name_the_key(tmp_path):
    torch.manual_seed(1)
    source = ResNet("resnet18").eval()
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)  # a different random init, overwritten by the file
    extractor = FeatureExtractor((1, 32, 32), ["layer2", "layer3"], {"arch": "resnet18", "weights": str(path)}, input_size=None)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = source.features((x.expand(-1, 3, -1, -1) - extractor.mean) / extractor.std, ["layer2", "layer3"])
    got = extractor(x)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)

    state = source.state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(state, tmp_path / "shape.pth")
    del state["layer2.0.conv1.weight"]
    torch.save(state, tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    for name, needle in [("shape.pth", "layer2.0.conv1.weight"), ("missing.pth", "layer2.0.conv1.weight"),
                         ("nofile.pth", "no weights file"), ("junk.pth", "cannot read")]:
        with pytest.raises(ConfigError) as err:
            PatchCore((1, 32, 32), backbone={"weights": str(tmp_path / name)}, **SMALL)
        assert err.value.key == "model.backbone.weights" and name in str(err.value) and needle in str(err.value)


def test_random_backbone_warns_and_stays_frozen(caplog):
    with caplog.at_level(logging.WARNING, logger="freqexp"):
        model = PatchCore((1, 16, 16), **SMALL)
    assert "random" in caplog.text and "not the published method's" in caplog.text
    before = {k: v.clone() for k, v in model.extractor.state_dict().items()}
    model.train()
    assert not model.extractor.training and not any(p.requires_grad for p in model.parameters())
    model.observe(images(8) * 3)  # batch statistics must not leak into BatchNorm
    for k, v in model.extractor.state_dict().items():
        assert torch.equal(v, before[k]), k


# -- coreset and nearest-neighbour search


def numpy_greedy(points: np.ndarray, k: int, start: int) -> list[int]:
    chosen, dist = [start], ((points - points[start]) ** 2).sum(1)
    while len(chosen) < k:
        i = int(np.argmax(dist))
        chosen.append(i)
        dist = np.minimum(dist, ((points - points[i]) ** 2).sum(1))
    return chosen


def covering_radius(points: np.ndarray, chosen) -> float:
    d = ((points[:, None, :] - points[None, chosen, :]) ** 2).sum(-1)
    return float(np.sqrt(d.min(1)).max())


def test_greedy_coreset_matches_numpy_and_covers_better_than_random():
    points = torch.randn(300, 6, generator=torch.Generator().manual_seed(0))
    chosen = greedy_coreset(points, 30, start=7).tolist()
    assert chosen == numpy_greedy(points.double().numpy(), 30, 7)
    rng = np.random.default_rng(0)
    random_radii = [covering_radius(points.numpy(), rng.choice(300, 30, replace=False)) for _ in range(20)]
    assert covering_radius(points.numpy(), chosen) < min(random_radii)


@pytest.mark.parametrize("search", ["fp32", "bf16"])
@pytest.mark.parametrize("k, query_chunk, bank_chunk", [(1, 7, 11), (1, 7, 32), (3, 7, 11), (1, None, None)])
def test_nearest_k_matches_brute_force_across_chunks(search, k, query_chunk, bank_chunk):
    from freqexp.models.bank_search import BankIndex, nearest_k

    gen = torch.Generator().manual_seed(1)
    queries, bank = torch.randn(40, 5, generator=gen), torch.randn(50, 5, generator=gen)  # 50 = 3 groups of 16 + a tail of 2
    d = np.sqrt(((queries.double().numpy()[:, None] - bank.double().numpy()[None]) ** 2).sum(-1))
    expected_i = np.argsort(d, 1, kind="stable")[:, :k]
    got_d, got_i = nearest_k(queries, bank, k, BankIndex(bank, search), query_chunk=query_chunk, bank_chunk=bank_chunk)
    np.testing.assert_allclose(got_d.numpy(), np.take_along_axis(d, expected_i, 1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got_i.numpy(), expected_i)
    np.testing.assert_allclose(nearest_distance(queries, bank).numpy(), d.min(1), rtol=1e-6, atol=1e-6)


def test_patch_scores_are_nearest_bank_distances_upsampled():
    x = images(16)
    model = fitted(PatchCore, x, sampling_ratio=0.5, **SMALL)
    assert model.memory_bank.shape == (round(0.5 * 16 * 16), 16)  # 16 images x 4x4 patches, halved
    test = images(3, seed=5)
    feats = model.raw_features(test).reshape(-1, 16).numpy()
    bank = model.memory_bank.numpy()
    expected = np.sqrt(((feats[:, None] - bank[None]) ** 2).sum(-1)).min(1).reshape(3, 1, 4, 4)
    np.testing.assert_allclose(model.patch_scores(test).numpy(), expected, rtol=1e-4, atol=1e-4)
    maps = model.anomaly_map(test)
    assert maps.shape == (3, 1, 16, 16)
    # a training image's own patches are in a full bank: distance 0 (up to fp32 rounding)
    full = fitted(PatchCore, x, sampling_ratio=1.0, **SMALL)
    assert float(full.patch_scores(x[:2]).max()) < 1e-2 * float(full.patch_scores(test).mean())


def test_channel_reductions():
    feats = torch.rand(2, 32, 3, 3)
    expected = feats.numpy().reshape(2, 8, 4, 3, 3).mean(2)  # 32 -> 8 channels: means of 4 neighbours
    np.testing.assert_allclose(mb.reduce_channels(feats, 8).numpy(), expected, rtol=1e-6)
    x = images(4)
    widths = {}
    for reduction in ("patchcore", "avgpool", "projection", "none"):
        model = PatchCore((1, 16, 16), **{**SMALL, "feature_reduction": reduction, "feature_dim": 10})
        widths[reduction] = model.raw_features(x).shape
    assert widths == {"patchcore": (4, 4, 4, 10), "avgpool": (4, 4, 4, 10), "projection": (4, 4, 4, 10), "none": (4, 4, 4, 128 + 256)}


@pytest.mark.parametrize("ratio", [0, 1.5, -0.1, "half"])
def test_sampling_ratio_outside_unit_interval_is_a_config_error(ratio):
    with pytest.raises(ConfigError) as err:
        PatchCore((1, 16, 16), sampling_ratio=ratio, **{k: v for k, v in SMALL.items()})
    assert err.value.key == "model.sampling_ratio"


@pytest.mark.parametrize("key, value", [("input_size", 8), ("sampling", "kmeans"), ("layers", ["layer9"]), ("patch_size", 2)])
def test_bad_options_name_their_key(key, value):
    with pytest.raises(ConfigError) as err:
        PatchCore((1, 32, 32), **{**SMALL, key: value})
    assert err.value.key == f"model.{key}"


def test_tiny_images_need_input_size():
    with pytest.raises(ConfigError) as err:
        PatchCore((1, 12, 12), **{**SMALL, "input_size": None})
    assert err.value.key == "model.input_size"


def test_fit_is_deterministic_under_the_seed_and_finalize_idempotent():
    x = images(16)
    torch.manual_seed(0)
    a = fitted(PatchCore, x, sampling_ratio=0.1, **SMALL)
    bank = a.memory_bank.clone()
    a.finalize()
    assert torch.equal(a.memory_bank, bank)
    torch.manual_seed(0)
    b = fitted(PatchCore, x, sampling_ratio=0.1, **SMALL)
    assert torch.equal(b.memory_bank, bank)


# -- patchcore_dwt streams


def test_dwt_stream_matches_pywt_haar():
    import pywt

    x = images(2, (1, 16, 16), seed=3)
    model = PatchCoreDWT((1, 16, 16), wavelet="haar", use_semantic=False, **SMALL)
    filters = {k: getattr(model, k) for k in ("dec_lo", "dec_hi", "rec_lo", "rec_hi")}
    got = mb.dwt_magnitudes(x, filters, (4, 4)).numpy()
    for i in range(2):
        _, (ch, cv, cd) = pywt.dwt2(x[i, 0].double().numpy(), "haar", mode="periodization")
        for band, coeffs in enumerate((ch, cv, cd)):  # 8x8 band -> 4x4 grid: means of 2x2 blocks
            expected = np.abs(coeffs).reshape(4, 2, 4, 2).mean(axis=(1, 3))
            np.testing.assert_allclose(got[i, band], expected, rtol=1e-5, atol=1e-6)


def test_wedge_streams_are_balanced_by_freq_weight():
    x = images(16)
    model = fitted(PatchCoreDWT, x, sampling_ratio=1.0, freq_weight=0.5, wavelet="bior2.2", **SMALL)
    cnn, freq = model.memory_bank.split([16, 3], dim=1)
    assert model.memory_bank.shape == (256, 19)
    torch.testing.assert_close(freq.norm(dim=1).mean(), 0.5 * cnn.norm(dim=1).mean(), rtol=1e-4, atol=0)
    # with the frequency stream off and no semantic attention, wedge is PatchCore
    torch.manual_seed(0)
    plain = fitted(PatchCoreDWT, x, sampling_ratio=1.0, freq_weight=0.0, use_semantic=False, **SMALL)
    torch.manual_seed(0)
    core = fitted(PatchCore, x, sampling_ratio=1.0, **SMALL)
    torch.testing.assert_close(plain.memory_bank[:, :16], core.memory_bank)
    assert float(plain.memory_bank[:, 16:].abs().max()) == 0.0


def test_semantic_attention_reweights_by_one_plus_normalized_energy():
    x = images(4)
    torch.manual_seed(0)
    off = PatchCoreDWT((1, 16, 16), use_semantic=False, **SMALL)
    torch.manual_seed(0)
    on = PatchCoreDWT((1, 16, 16), use_semantic=True, **SMALL)
    cnn_off, cnn_on = off.streams(x)[0], on.streams(x)[0]
    ratio = cnn_on / cnn_off  # a per-position factor shared by all channels, in [1, 2], max 2 per image
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4, atol=1e-4)
    assert float(ratio.min()) >= 1.0 - 1e-5
    torch.testing.assert_close(ratio.amax(dim=(1, 2, 3)), torch.full((4,), 2.0), rtol=1e-4, atol=1e-4)


# -- saving and loading a fitted bank


@pytest.mark.parametrize("cls, options", [
    (PatchCore, dict(sampling_ratio=0.25, **SMALL)),
    (PatchCoreDWT, dict(sampling_ratio=0.25, sampling="random", **SMALL)),
    (WedgeNet, dict(sampling_ratio=0.25, input_size=32, smooth_sigma=4.0)),
    (PatchCore, dict(sampling_ratio=0.25, **{**SMALL, "feature_reduction": "patchcore", "center_crop": 0.875, "smooth_sigma": 4.0})),
    (PatchCore, dict(sampling_ratio=1.0, **{**SMALL, "feature_reduction": "projection"})),
    (NearestImage, dict(k=2)),
    (PCAReconstruction, dict(n_components=5)),
])
def test_state_dict_round_trip_into_a_fresh_model(cls, options, tmp_path):
    x, test = images(16), images(4, seed=9)
    torch.manual_seed(0)
    model = fitted(cls, x, **options)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(1)  # another random backbone / projection: all replaced by the file
    fresh = cls((1, 16, 16), **options)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt"))
    fresh.finalize()  # a loaded model is fitted: finalize keeps it
    torch.testing.assert_close(fresh.anomaly_map(test), model.anomaly_map(test), rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        cls((1, 16, 16), **options).anomaly_map(test)  # unfitted


# -- pixel baselines


def test_knn_matches_sklearn_nearest_neighbors():
    from sklearn.neighbors import NearestNeighbors

    x, test = images(40, (1, 8, 8)), images(6, (1, 8, 8), seed=4)
    model = fitted(NearestImage, x, k=3)
    ref = NearestNeighbors(n_neighbors=3).fit(x.reshape(40, -1).double().numpy())
    dist, index = ref.kneighbors(test.reshape(6, -1).double().numpy())
    np.testing.assert_allclose(model.distances(test).numpy(), dist.mean(1), rtol=1e-4)
    torch.testing.assert_close(model.reconstruct(test), x[torch.from_numpy(index[:, 0])])
    nearest_sq = (x[torch.from_numpy(index)] - test.unsqueeze(1)).pow(2).flatten(2).sum(-1).mean(1)
    np.testing.assert_allclose(model.anomaly_map(test).mean((1, 2, 3)).numpy(), nearest_sq.numpy() / 64, rtol=1e-4)
    one = fitted(NearestImage, x, k=1)  # k=1: the map's mean is the squared distance / pixels
    np.testing.assert_allclose(one.anomaly_map(test).mean((1, 2, 3)).numpy(), dist[:, 0] ** 2 / 64, rtol=1e-4)


@pytest.mark.parametrize("n_components", [4, 0.8])
def test_pca_reconstruction_matches_sklearn(n_components):
    from sklearn.decomposition import PCA

    base = torch.rand(3, 48, generator=torch.Generator().manual_seed(2))  # low-rank data + noise
    coef = torch.rand(60, 3, generator=torch.Generator().manual_seed(3))
    x = (coef @ base / 3 + 0.05 * torch.rand(60, 48, generator=torch.Generator().manual_seed(4))).view(60, 3, 4, 4)
    test = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    model = fitted(PCAReconstruction, x, n_components=n_components)
    ref = PCA(n_components=n_components, svd_solver="full").fit(x.reshape(60, -1).double().numpy())
    assert model.components.shape[0] == ref.n_components_
    flat = test.reshape(5, -1).double().numpy()
    expected = ref.inverse_transform(ref.transform(flat))
    np.testing.assert_allclose(model.reconstruct(test).reshape(5, -1).numpy(), expected, rtol=1e-4, atol=1e-4)
    residual = ((expected - flat) ** 2).reshape(5, 3, 16).mean(1)
    np.testing.assert_allclose(model.anomaly_map(test).reshape(5, 16).numpy(), residual, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("value", [0, 1.0, 49, -2, True])
def test_pca_n_components_is_checked(value):
    with pytest.raises(ConfigError) as err:
        PCAReconstruction((3, 4, 4), n_components=value)
    assert err.value.key == "model.n_components"


def test_score_placed_filters_only_for_residual_maps():
    from freqexp.validate import make_plan
    from tests.conftest import compose_cfg

    common = ["dataset=synthetic", "filter=fft", "filter.apply_to=score", "hardware=cpu"]
    with pytest.raises(ConfigError) as err:
        make_plan(compose_cfg(["model=patchcore", *common]))  # a distance map has no residual to filter
    assert err.value.key == "filter.apply_to"
    for name in ("knn", "pca"):
        assert make_plan(compose_cfg([f"model={name}", *common])).placement == "score"


def test_a_bank_too_large_for_the_machine_is_refused_before_the_run(monkeypatch):
    monkeypatch.setattr(mb, "available_memory_bytes", lambda device: 24 * 2**30)
    model = PatchCore((1, 28, 28), backbone={"arch": "resnet18"})  # the paper's 256 -> 224: 28 x 28 patches of 1024 dims
    assert model.patches_per_image() == 784
    with pytest.raises(ConfigError) as err:
        model.check_fit(5400, torch.device("cpu"))  # a whole Fashion-MNIST class: 5400 x 784 x 1024 x 4 B = 16.1 GiB
    assert err.value.key == "model.feature_dim" and "16.1 GiB" in str(err.value) and "dataset.limit_train" in str(err.value)
    model.check_fit(500, torch.device("cpu"))  # 1.5 GiB: fine
