"""The FFT multi-memory AE (memae_fft): k-means against scikit-learn and a numpy Lloyd loop, the
memory init modes, frozen keys vs trained values, the hard memory's exact slot value with a
straight-through gradient, soft attention, the entropy and commitment terms in closed form, the
FFT encoder input against numpy, option validation, and image sizes.

MemAE's sparse addressing (Gong et al. 2019; reference code donggong1/memae-anomaly-detection):
softmax -> hard shrinkage -> L1 re-normalisation and the entropy of the shrunk weights against
a numpy re-computation written here, in memae_fft (memory=memae) and in model=memae (the memory
at every position of the feature map, gradients, training, options, the Hydra config)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from freqexp.errors import ConfigError
from freqexp.losses import build_loss
from freqexp.models import MODELS
from freqexp.models.memae import (HardMemory, MemAEMemory, SoftMemory, attention_entropy, centre_mask, chunk_means,
                                  hard_shrink, kmeans, kmeans_plus_plus, log_spectrum, sparse_weights)

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
MEMAE_OPTIONS = {"memory": "memae", "addressing": "cosine", "shrink_threshold": 0.05}


@pytest.mark.parametrize("shape,options", [((1, 28, 28), {}), ((1, 32, 32), {}), ((1, 28, 28), OTHER_OPTIONS),
                                           ((3, 31, 45), OTHER_OPTIONS), ((1, 16, 16), {}),
                                           ((1, 28, 28), {"memory": "memae"}), ((3, 31, 45), MEMAE_OPTIONS)])
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
                                       ("entropy_weight", -1), ("commit_weight", -0.1), ("fft_phase", "yes"),
                                       ("memory", "sparse"), ("shrink_threshold", -0.01), ("shrink_threshold", 1.0),
                                       ("shrink_threshold", "0.1")])
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


# ----------------------------------------------------------------------------- MemAE's sparse addressing
def np_softmax(scores):
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_memae_weights(z, memory, lam, addressing="dot", temperature=1.0):
    """The paper / reference code in float64 numpy: softmax(z M^T) (or of cos(z, m)/temperature),
    then relu(w - lam) w / (|w - lam| + 1e-12) and w / max(sum |w|, 1e-12) when lam > 0."""
    z, memory = np.asarray(z, dtype=np.float64), np.asarray(memory, dtype=np.float64)
    if addressing == "cosine":
        zn = z / np.linalg.norm(z, axis=1, keepdims=True)
        mn = memory / np.linalg.norm(memory, axis=1, keepdims=True)
        scores = zn @ mn.T / temperature
    else:
        scores = z @ memory.T
    w = np_softmax(scores)
    if lam > 0:
        w = np.maximum(w - lam, 0.0) * w / (np.abs(w - lam) + 1e-12)
        w = w / np.maximum(np.abs(w).sum(axis=1, keepdims=True), 1e-12)
    return w


def np_entropy(w):
    w = np.asarray(w, dtype=np.float64)
    return float(np.mean(-np.sum(w * np.log(w + 1e-12), axis=1)))


def test_hard_shrink_of_a_hand_made_weight_vector():
    lam = 0.0025
    w = torch.tensor([[0.6, 0.3, 0.088, 0.0075, 0.0025, 0.002],  # sums to 1; the last two are <= lambda
                      [1 / 6] * 6])                                # nothing above lambda = 0.2 below
    shrunk = hard_shrink(w[:1], lam)
    assert torch.equal(shrunk[0, 4:], torch.zeros(2))  # at or below lambda: exactly 0
    expected = [wi * (wi - lam) / (abs(wi - lam) + 1e-12) for wi in [0.6, 0.3, 0.088, 0.0075]]
    np.testing.assert_allclose(shrunk[0, :4].numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(shrunk[0, :4].numpy(), w[0, :4].numpy(), rtol=1e-5)  # ~ w above lambda
    final = sparse_weights(w[:1], lam)
    assert float(final.sum()) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(final[0].numpy(), np.r_[w[0, :4].numpy() / float(w[0, :4].sum()), 0, 0], rtol=1e-5, atol=0)
    # a row with nothing above lambda becomes all zeros (no NaN), as in the reference
    dead = sparse_weights(w[1:], 0.2)
    assert torch.equal(dead, torch.zeros(1, 6))
    # lambda = 0: no shrinkage and no re-normalisation
    assert torch.equal(sparse_weights(w, 0.0), w)


@pytest.mark.parametrize("addressing,temperature,lam", [("dot", 1.0, 0.2), ("cosine", 0.25, 0.2), ("dot", 1.0, 0.05)])
def test_memae_memory_equals_numpy_softmax_shrink_normalise(addressing, temperature, lam):
    g = torch.Generator().manual_seed(0)
    memory, z = torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g)
    mem = MemAEMemory(6, 4, lam, addressing, temperature)
    mem.set_keys(memory)
    out, attn = mem(z)
    w = np_memae_weights(z.numpy(), memory.numpy(), lam, addressing, temperature)
    assert 0 < (w == 0).sum() < w.size - len(w)  # a non-trivial case: some slots shrunk, some kept
    np.testing.assert_allclose(attn.detach().numpy(), w, atol=1e-6)
    assert (attn.detach() == 0).sum() == (w == 0).sum()  # exact zeros where numpy has them
    np.testing.assert_allclose(attn.detach().sum(1).numpy(), np.ones(9), atol=1e-6)
    np.testing.assert_allclose(out.detach().numpy(), w @ memory.numpy().astype(np.float64), atol=1e-5)


def test_memae_memory_with_lambda_zero_is_the_plain_softmax():
    g = torch.Generator().manual_seed(1)
    memory, z = torch.randn(5, 3, generator=g), torch.randn(7, 3, generator=g)
    mem = MemAEMemory(5, 3, 0.0)
    mem.set_keys(memory)
    out, attn = mem(z)
    plain = np_softmax(z.double().numpy() @ memory.double().numpy().T)
    np.testing.assert_allclose(attn.detach().numpy(), plain, atol=1e-6)
    assert (attn > 0).all()
    np.testing.assert_allclose(out.detach().numpy(), plain @ memory.double().numpy(), atol=1e-5)


def test_memae_memory_starts_uniform_in_plus_minus_one_over_sqrt_d():
    torch.manual_seed(0)
    slots = MemAEMemory(2000, 16).slots.detach()
    assert slots.abs().max() <= 0.25 and slots.abs().max() > 0.249  # U(-1/sqrt(16), 1/sqrt(16))
    assert float(slots.mean()) == pytest.approx(0.0, abs=0.005)
    assert float(slots.var()) == pytest.approx(0.25 ** 2 / 3, rel=0.05)


# ----------------------------------------------------------------------------- memae_fft with memory=memae
def test_memae_fft_default_memory_is_the_study_recipe():
    from tests.conftest import compose_cfg

    assert compose_cfg(["model=memae_fft"]).model.memory == "study"
    m = make()
    assert isinstance(m.centre_memory, SoftMemory) and isinstance(m.fft_memory, SoftMemory)


def test_memae_fft_with_memae_memory_entropy_is_on_the_shrunk_weights():
    m = make(memory="memae", shrink_threshold=0.2, entropy_weight=0.3)  # 5 slots: 1/N = 0.2
    g = torch.Generator().manual_seed(0)
    m.centre_memory.set_keys(torch.randn(5, 8, generator=g))
    m.fft_memory.set_keys(torch.randn(5, 8, generator=g))
    out = m(images(8))
    ws = {k: np_memae_weights(out[f"z_{k}"].detach().numpy(), getattr(m, f"{k}_memory").slots.detach().numpy(), 0.2)
          for k in ("centre", "fft")}
    np.testing.assert_allclose(out["centre_attn"].detach().numpy(), ws["centre"], atol=1e-6)
    np.testing.assert_allclose(out["fft_attn"].detach().numpy(), ws["fft"], atol=1e-6)
    expected = 0.3 * 0.5 * (np_entropy(ws["centre"]) + np_entropy(ws["fft"]))
    assert m.extra_losses(out)["mem_entropy"].item() == pytest.approx(expected, rel=1e-5)
    pre = {k: np_softmax(out[f"z_{k}"].detach().double().numpy() @ getattr(m, f"{k}_memory").slots.detach().double().numpy().T)
           for k in ("centre", "fft")}
    before_shrink = 0.3 * 0.5 * (np_entropy(pre["centre"]) + np_entropy(pre["fft"]))
    assert abs(expected - before_shrink) > 0.01 * before_shrink  # the shrinkage matters here


def test_memae_fft_memae_memory_is_one_trainable_matrix_set_by_prepare():
    m = make(memory="memae", memory_size=1, memory_init="mean", init_samples=10)
    names = {n for n, _ in m.named_parameters()} | {n for n, _ in m.named_buffers()}
    assert {"centre_memory.slots", "fft_memory.slots"} <= names
    assert not any(n.startswith(("centre_memory.", "fft_memory.")) and not n.endswith("slots") for n in names)
    x = images(24)
    m.prepare([x[:8], x[8:16], x[16:]])
    z = features_as_prepare_sees_them(m, [x[:8], x[8:16]])
    torch.testing.assert_close(m.centre_memory.slots.detach()[0], z["centre"][:10].mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.fft_memory.slots.detach()[0], z["fft"][:10].mean(0), atol=1e-5, rtol=1e-5)
    before = m.fft_memory.slots.detach().clone()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    total, parts = m.training_loss(x, x, build_loss({"spec": "mse"}))
    total.backward()
    assert float(m.fft_memory.slots.grad.abs().sum()) > 0
    opt.step()
    assert not torch.equal(m.fft_memory.slots.detach(), before)


# ----------------------------------------------------------------------------- model=memae
MEMAE_SMALL = dict(channels=[8, 16], memory_size=10, shrink_threshold=0.05)


def make_memae(shape=(1, 28, 28), **options):
    torch.manual_seed(0)
    return MODELS.get("memae")(shape, **{**MEMAE_SMALL, **options})


def test_memae_applies_the_memory_at_every_position_of_the_feature_map():
    m = make_memae()
    x = images(3)
    out = m(x)
    z, z_hat, attn = out["z"].detach(), out["z_hat"].detach(), out["attn"].detach()
    assert out["recon"].shape == x.shape
    assert z.shape == z_hat.shape == (3, 16, 7, 7)  # 28 -> 14 -> 7
    assert attn.shape == (3 * 7 * 7, 10)  # one row per (image, position)
    memory = m.memory.slots.detach().double().numpy()
    for b in range(3):
        for i in range(7):
            for j in range(7):
                w = np_memae_weights(z[b, :, i, j].numpy()[None], memory, 0.05)
                np.testing.assert_allclose(attn[b * 49 + i * 7 + j].numpy(), w[0], atol=1e-6)
                np.testing.assert_allclose(z_hat[b, :, i, j].numpy(), (w @ memory)[0], atol=1e-5)
    assert (attn == 0).any() and (attn > 0).any()


def test_memae_entropy_term_is_on_the_shrunk_weights():
    m = make_memae(entropy_weight=0.5)
    m.memory.set_keys(torch.randn(10, 16, generator=torch.Generator().manual_seed(0)))
    out = m(images(4))
    q = out["z"].detach().permute(0, 2, 3, 1).reshape(-1, 16).numpy()
    shrunk = np_memae_weights(q, m.memory.slots.detach().numpy(), 0.05)
    assert 0.1 < (shrunk == 0).mean() < 0.9
    term = m.extra_losses(out)["mem_entropy"].item()
    assert term == pytest.approx(0.5 * np_entropy(shrunk), rel=1e-5)
    plain = np_memae_weights(q, m.memory.slots.detach().numpy(), 0.0)
    assert abs(term - 0.5 * np_entropy(plain)) > 0.01 * term
    total, logged = m.training_loss(images(4), images(4), build_loss({"spec": "mse"}))
    assert set(logged) == {"mse", "mem_entropy"}
    assert total.item() == pytest.approx(sum(v.item() for v in logged.values()), rel=1e-5)


def test_memae_gradients_reach_the_memory_matrix_and_the_encoder():
    m = make_memae()
    x = images(4)
    out = m(x)
    ((out["recon"] - x) ** 2).mean().backward()  # the reconstruction alone
    assert m.memory.slots.grad is not None and float(m.memory.slots.grad.abs().sum()) > 0
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in m.encoder.parameters())


def test_memae_a_few_optimisation_steps_reduce_the_loss():
    m = make_memae((1, 16, 16))
    x = images(4, (1, 16, 16))
    loss = build_loss({"spec": "mse"})
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        total, _ = m.training_loss(x, x, loss)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 31, 45), (1, 16, 16)])
def test_memae_trains_and_scores_at_several_sizes(shape):
    m = make_memae(shape, addressing="cosine")
    x = images(4, shape)
    total, _ = m.training_loss(x, x, build_loss({"spec": "mse+ssim"}, image_size=shape[1:]))
    assert torch.isfinite(total)
    total.backward()
    m.eval()
    with torch.no_grad():
        recon, amap = m.reconstruct(x), m.anomaly_map(x)
    assert recon.shape == x.shape and (recon >= 0).all() and (recon <= 1).all()
    assert amap.shape == (4, 1, *shape[1:]) and torch.isfinite(amap).all()
    torch.testing.assert_close(amap, ((recon - x) ** 2).mean(1, keepdim=True))
    assert type(m).published_score == "mean"


def test_memae_finite_under_bf16_autocast():
    for m in (make_memae(), make(memory="memae")):
        x = images(4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total, parts = m.training_loss(x, x, build_loss({"spec": "mse"}))
        assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())
        total.backward()


@pytest.mark.parametrize("key,value", [("memory_size", 0), ("shrink_threshold", -0.001), ("shrink_threshold", 1),
                                       ("shrink_threshold", 1.5), ("shrink_threshold", True), ("addressing", "l2"),
                                       ("temperature", 0), ("entropy_weight", -1), ("channels", [])])
def test_memae_bad_options_are_config_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError) as e:
        make_memae(**{key: value})
    assert e.value.key == f"model.{key}"


def test_memae_yaml_composes_builds_and_lists_every_option():
    import inspect

    from freqexp.models import build_model
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["model=memae"])
    params = set(inspect.signature(MODELS.get("memae").__init__).parameters) - {"self", "in_shape"}
    assert set(cfg.model) - {"name"} == params
    assert (cfg.model.memory_size, cfg.model.shrink_threshold, cfg.model.entropy_weight, cfg.model.addressing) == (
        100, 0.0025, 0.0002, "dot")
    assert cfg.loss.spec == "mse"  # the paper's reconstruction loss
    assert compose_cfg(["model=memae", "loss=mse+ssim"]).loss.spec == "mse+ssim"  # still configurable
    m = build_model(cfg.model, (1, 28, 28))
    assert m.memory.slots.shape == (100, list(cfg.model.channels)[-1])
    fft = build_model(compose_cfg(["model=memae_fft", "model.memory=memae", "model.shrink_threshold=0.01"]).model, (1, 28, 28))
    assert isinstance(fft.centre_memory, MemAEMemory) and fft.centre_memory.shrink_threshold == 0.01
    with pytest.raises(ConfigError) as e:
        build_model(compose_cfg(["model=memae", "model.shrink_threshold=1.0"]).model, (1, 28, 28))
    assert e.value.key == "model.shrink_threshold"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memae_16_mixed():
    for m in (make_memae(memory_size=100, shrink_threshold=0.0025).cuda(), make(memory="memae").cuda()):
        x = images(16).cuda()
        with torch.autocast("cuda", dtype=torch.float16):
            total, parts = m.training_loss(x, x, build_loss({"spec": "mse+ssim"}, image_size=(28, 28)).cuda())
        assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())
        total.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
