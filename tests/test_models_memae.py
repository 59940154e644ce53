"""The FFT multi-memory AE (memae_fft): k-means against scikit-learn and a numpy Lloyd loop, the
memory init modes, frozen keys vs trained values, the hard memory's exact slot value with a
straight-through gradient, soft attention, the entropy and commitment terms in closed form, the
FFT encoder input against numpy, option validation, and image sizes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from freqexp.errors import ConfigError
from freqexp.losses import build_loss
from freqexp.models import MODELS
from freqexp.models.memae import (HardMemory, SoftMemory, attention_entropy, centre_mask, chunk_means, kmeans,
                                  kmeans_plus_plus, log_spectrum)

SMALL = dict(channels=[8, 16], feature_dim=8, memory_size=5)


def make(shape=(1, 28, 28), **options):
    torch.manual_seed(0)
    return MODELS.get("memae_fft")(shape, **{**SMALL, **options})


def images(n=16, shape=(1, 28, 28), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g)


def blobs(seed=0, per=40, centres=((0, 0, 0, 0), (6, 0, 0, 0), (0, 6, 0, 0), (0, 0, 6, 6))):
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(centres, dtype=torch.float32)
    return (c.repeat_interleave(per, 0) + 0.5 * torch.randn(len(c) * per, c.shape[1], generator=g)), c


def numpy_lloyd(x, centres, iters):
    """Brute-force Lloyd: loops over points, nearest centre by explicit distances."""
    x, centres = np.asarray(x, dtype=np.float64), np.array(centres, dtype=np.float64)
    for _ in range(iters):
        labels = [int(np.argmin([np.sum((p - c) ** 2) for c in centres])) for p in x]
        for j in range(len(centres)):
            members = [p for p, lab in zip(x, labels) if lab == j]
            if members:
                centres[j] = np.mean(members, axis=0)
    return centres


# ----------------------------------------------------------------------------- k-means
def test_kmeans_from_given_centres_equals_sklearn_and_numpy_lloyd():
    x, _ = blobs()
    start = x[[0, 1, 2, 45]]  # a poor start: three seeds in one blob, so Lloyd has work to do
    ours = kmeans(x, 4, iters=50, init=start).numpy()
    sk = KMeans(4, init=start.numpy().astype(np.float64), n_init=1, max_iter=50, tol=0.0, algorithm="lloyd").fit(x.double().numpy())
    np.testing.assert_allclose(ours, sk.cluster_centers_, atol=1e-4)
    np.testing.assert_allclose(ours, numpy_lloyd(x.numpy(), start.numpy(), 50), atol=1e-4)


def test_kmeans_few_iterations_equal_the_same_number_of_lloyd_steps():
    x, _ = blobs(1)
    start = x[[0, 1, 2, 3]]
    for iters in (1, 2, 3):
        np.testing.assert_allclose(kmeans(x, 4, iters=iters, init=start).numpy(),
                                   numpy_lloyd(x.numpy(), start.numpy(), iters), atol=1e-4)


def matched(a, b):
    """Rows of b reordered so row i is the row nearest to a[i] (a one-to-one match is asserted)."""
    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(np.asarray(b), dtype=torch.float64)
    nearest = torch.cdist(a, b).argmin(1)
    assert sorted(nearest.tolist()) == list(range(len(b)))
    return b[nearest].numpy()


def test_kmeans_plus_plus_run_finds_the_clusters_sklearn_finds():
    x, true_centres = blobs(2)
    torch.manual_seed(0)
    ours = kmeans(x, 4, iters=30, init="kmeans++").numpy()
    sk = KMeans(4, n_init=10, random_state=0).fit(x.double().numpy()).cluster_centers_
    np.testing.assert_allclose(ours, matched(ours, sk), atol=1e-4)
    assert np.abs(ours - matched(ours, true_centres)).max() < 0.5


def test_kmeans_random_seeding_starts_from_distinct_features():
    x, _ = blobs(3)
    torch.manual_seed(0)
    centres = kmeans(x, 6, iters=0, init="random")
    rows = [int(torch.nonzero((x == c).all(1))[0]) for c in centres]
    assert len(set(rows)) == 6


def test_kmeans_plus_plus_spreads_its_seeds_and_handles_fewer_points_than_slots():
    x, _ = blobs(3)
    torch.manual_seed(1)
    seeds = kmeans_plus_plus(x, 4)
    blob_of = lambda s: int(torch.cdist(s[None], x).argmin() // 40)  # noqa: E731
    assert sorted(blob_of(s) for s in seeds) == [0, 1, 2, 3]
    few = x[:3]
    centres = kmeans(few, 5, iters=5)
    assert centres.shape == (5, 4) and torch.isfinite(centres).all()
    assert all(any(torch.equal(c, p) for p in few) for c in centres)  # every slot is a real feature


def test_chunk_means_average_to_the_mean_and_cover_every_slot():
    x, _ = blobs(4)  # 160 rows into 8 chunks of 20
    torch.manual_seed(0)
    m = chunk_means(x, 8)
    torch.testing.assert_close(m.mean(0), x.mean(0), atol=1e-5, rtol=0)
    assert chunk_means(x[:3], 5).shape == (5, 4)


# ----------------------------------------------------------------------------- memories
def test_soft_memory_attention_rows_sum_to_one_and_match_the_formula():
    torch.manual_seed(0)
    q = torch.randn(6, 8)
    for addressing in ("dot", "cosine"):
        mem = SoftMemory(5, 8, addressing, temperature=0.2)
        with torch.no_grad():
            mem.values.add_(torch.randn(5, 8))
        out, attn = mem(q)
        torch.testing.assert_close(attn.sum(1), torch.ones(6))
        assert (attn >= 0).all()
        if addressing == "dot":
            scores = q @ mem.keys.T / math.sqrt(8)
        else:
            scores = (q / q.norm(dim=1, keepdim=True)) @ (mem.keys / mem.keys.norm(dim=1, keepdim=True)).T / 0.2
        torch.testing.assert_close(attn, torch.softmax(scores, 1))
        torch.testing.assert_close(out, attn @ mem.values.detach())


def test_hard_memory_returns_exactly_a_slot_value_and_passes_the_gradient_through():
    torch.manual_seed(0)
    mem = HardMemory(7, 4)
    with torch.no_grad():
        mem.values.add_(torch.randn(7, 4))  # values differ from keys, as after training
    z = torch.randn(9, 4, requires_grad=True)
    out, index, commit = mem(z)
    brute = torch.tensor([min(range(7), key=lambda j: float(((zi - mem.keys[j]) ** 2).sum())) for zi in z.detach()])
    assert torch.equal(index, brute)
    assert torch.equal(out.detach(), mem.values.detach()[index])  # bit-exact
    assert float(commit.detach()) == pytest.approx(float(((z.detach() - mem.keys[index]) ** 2).mean()), rel=1e-6)
    weights = torch.randn(9, 4)
    (out * weights).sum().backward()
    torch.testing.assert_close(z.grad, weights)  # straight-through: identity
    expected = torch.zeros(7, 4).index_add_(0, index, weights)
    torch.testing.assert_close(mem.values.grad, expected)  # only the chosen slots learn
    assert mem.keys.grad is None and not mem.keys.requires_grad


def test_entropy_equals_closed_form():
    uniform = torch.full((3, 8), 1 / 8)
    assert float(attention_entropy(uniform)) == pytest.approx(math.log(8), rel=1e-6)
    known = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1], [1.0, 0.0, 0.0, 0.0]])
    h1 = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))
    assert float(attention_entropy(known)) == pytest.approx((math.log(2) + h1 + 0) / 3, rel=1e-6)


def test_model_terms_are_weighted_entropy_and_commitment():
    m = make(entropy_weight=0.3, commit_weight=0.7)
    out = m(images(8))
    parts = m.extra_losses(out)
    ent = 0.5 * (attention_entropy(out["centre_attn"]) + attention_entropy(out["fft_attn"]))
    assert parts["mem_entropy"].item() == pytest.approx(0.3 * ent.item(), rel=1e-6)
    assert parts["commit"].item() == pytest.approx(0.7 * out["commit"].item(), rel=1e-6)
    total, logged = m.training_loss(images(8), images(8), build_loss({"spec": "mse"}))
    assert {"mse", "mem_entropy", "commit"} <= set(logged)
    assert total.item() == pytest.approx(sum(v.item() for v in logged.values()), rel=1e-5)


# ----------------------------------------------------------------------------- prepare / training
def features_as_prepare_sees_them(model, batches):
    """Encoded batch by batch in training mode (BatchNorm batch statistics), as prepare does."""
    model.train()
    with torch.no_grad():
        encoded = [model.encode(b) for b in batches]
    return {k: torch.cat([e[k] for e in encoded]) for k in encoded[0]}


def test_prepare_kmeans_keys_are_lloyd_fixed_points_of_the_encoder_features():
    m = make(memory_size=3, kmeans_iters=100)
    x = images(24)
    bn_before = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    batches = [x[:8], x[8:16], x[16:]]
    m.prepare(batches)
    for k, v in bn_before.items():  # prepare leaves BatchNorm statistics alone
        assert torch.equal(m.state_dict()[k], v), k
    z = features_as_prepare_sees_them(m, batches)
    for name, mem in (("centre", m.centre_memory), ("structure", m.structure_memory), ("fft", m.fft_memory)):
        feats = z[name]
        keys = mem.keys
        assign = torch.cdist(feats, keys).argmin(1)
        for j in range(len(keys)):
            if (assign == j).any():
                torch.testing.assert_close(keys[j], feats[assign == j].mean(0), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mem.values.detach(), keys)  # values start at the keys


def test_prepare_mean_with_one_slot_is_the_mean_of_the_first_init_samples_features():
    m = make(memory_size=1, memory_init="mean", init_samples=10)
    x = images(24)
    m.prepare([x[:8], x[8:16], x[16:]])
    z = features_as_prepare_sees_them(m, [x[:8], x[8:16]])  # prepare stops once it has 10
    torch.testing.assert_close(m.structure_memory.keys[0], z["structure"][:10].mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.fft_memory.keys[0], z["fft"][:10].mean(0), atol=1e-5, rtol=1e-5)


def test_prepare_random_keys_follow_the_feature_statistics():
    m = make(memory_size=400, memory_init="random")
    x = images(32)
    m.prepare([x])
    feats = features_as_prepare_sees_them(m, [x])["centre"]
    keys = m.centre_memory.keys
    # 400 Gaussian draws: mean within ~5 standard errors of the feature mean
    assert ((keys.mean(0) - feats.mean(0)).abs() < 5 * feats.std(0) / 20).all()


def test_keys_stay_frozen_while_values_and_encoders_train():
    m = make()
    x = images(16)
    m.prepare([x])
    keys = {n: b.clone() for n, b in m.named_buffers() if n.endswith("keys")}
    values = {n: p.detach().clone() for n, p in m.named_parameters() if n.endswith("values")}
    assert len(keys) == 3 and len(values) == 3
    assert not any(n.endswith("keys") for n, _ in m.named_parameters())
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    total, _ = m.training_loss(x, x, build_loss({"spec": "mse"}))
    total.backward()
    opt.step()
    for n, k in keys.items():
        assert torch.equal(dict(m.named_buffers())[n], k), n
    for n, v in values.items():
        assert not torch.equal(dict(m.named_parameters())[n].detach(), v), n


def test_structure_encoder_learns_through_the_hard_memory_from_the_reconstruction_alone():
    m = make(commit_weight=0.0, entropy_weight=0.0)
    x = images(8)
    m.prepare([x])
    out = m(x)
    mem = m.structure_memory
    ((out["recon"] - x) ** 2).mean().backward()
    grad = sum(float(p.grad.abs().sum()) for p in m.structure_encoder.parameters() if p.grad is not None)
    assert grad > 0
    assert mem.values.grad is not None and float(mem.values.grad.abs().sum()) > 0


def test_hard_slot_in_the_model_forward_is_exactly_the_value():
    m = make()
    x = images(8)
    m.prepare([x])
    m.eval()
    z = m.encode(x)["structure"]
    out, index, _ = m.structure_memory(z)
    assert torch.equal(out, m.structure_memory.values.detach()[index])


# ----------------------------------------------------------------------------- inputs, sizes, options
def test_fft_input_is_the_centred_log_amplitude_in_fp32():
    x = images(2, (2, 12, 15))
    expected = np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(x.double().numpy(), norm="ortho"), axes=(-2, -1))))
    np.testing.assert_allclose(log_spectrum(x, False).numpy(), expected, rtol=1e-5, atol=1e-6)
    with_phase = log_spectrum(x, True)
    assert with_phase.shape == (2, 6, 12, 15)
    torch.testing.assert_close(with_phase[:, 2:4] ** 2 + with_phase[:, 4:] ** 2, torch.ones(2, 2, 12, 15))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert log_spectrum(x.bfloat16(), False).dtype == torch.float32


def test_centre_mask_is_a_gaussian_peaking_in_the_middle():
    mask = centre_mask(29, 29, 0.25)
    assert float(mask[14, 14]) == 1.0
    assert float(mask[0, 14]) == pytest.approx(math.exp(-0.5 * (14 / (0.25 * 29)) ** 2), rel=1e-6)


OTHER_OPTIONS = {"addressing": "cosine", "fft_phase": True, "memory_init": "mean"}


@pytest.mark.parametrize("shape,options", [((1, 28, 28), {}), ((1, 32, 32), {}), ((1, 28, 28), OTHER_OPTIONS),
                                           ((3, 31, 45), OTHER_OPTIONS), ((1, 16, 16), {})])
def test_trains_and_scores_at_several_sizes(shape, options):
    m = make(shape, **options)
    x = images(6, shape)
    m.prepare([x])
    total, parts = m.training_loss(x, x, build_loss({"spec": "mse+ssim"}, image_size=shape[1:]))
    assert torch.isfinite(total)
    total.backward()
    m.eval()
    with torch.no_grad():
        recon = m.reconstruct(x)
        amap = m.anomaly_map(x)
    assert recon.shape == x.shape and (recon >= 0).all() and (recon <= 1).all()
    assert amap.shape == (6, 1, *shape[1:]) and torch.isfinite(amap).all()


def test_finite_under_bf16_autocast():
    m = make()
    x = images(8)
    m.prepare([x])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = m.training_loss(x, x, build_loss({"spec": "mse"}))
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())
    total.backward()


@pytest.mark.parametrize("key,value", [("memory_size", 0), ("memory_size", -3), ("memory_init", "median"),
                                       ("kmeans_seeding", "farthest"), ("addressing", "l2"), ("temperature", 0),
                                       ("centre_sigma", 0), ("feature_dim", 0), ("init_samples", 0),
                                       ("entropy_weight", -1), ("commit_weight", -0.1), ("fft_phase", "yes")])
def test_bad_options_are_config_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError) as e:
        make(**{key: value})
    assert e.value.key == f"model.{key}"


def test_too_many_stages_for_the_image_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        make((1, 16, 16), channels=[4, 4, 4, 4, 4])
    assert e.value.key == "model.channels"


def test_yaml_options_are_the_constructor_options():
    from tests.conftest import compose_cfg
    from freqexp.models import build_model

    cfg = compose_cfg(["model=memae_fft"])
    m = build_model(cfg.model, (1, 28, 28))
    assert len(m.centre_memory.keys) == cfg.model.memory_size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_16_mixed_with_the_study_recipe():
    m = make((1, 28, 28)).cuda()
    x = images(16).cuda()
    m.prepare([x[:8], x[8:]])
    loss = build_loss({"spec": "mse+center_crop+ms_ssim+center_weighted",
                       "weights": {"mse": 0.6, "center_crop": 1.0, "ms_ssim": 0.5, "center_weighted": 0.5}},
                      image_size=(28, 28)).cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        total, parts = m.training_loss(x, x, loss)
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
