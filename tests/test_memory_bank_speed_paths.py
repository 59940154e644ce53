"""The memory banks' fast paths give the fp32 path's answers: PatchCore's pooling rewrite equals
the official unfold pipeline, the chunked (and bf16-shortlisted) nearest-neighbour search equals
a float64 brute force, the cached bank norms follow the bank, micro-batches bound the work, BN
folding keeps the features, the reduced-precision coreset covers as well as fp32, and
`precision: auto` scores images as fp32 does. Expectations come from numpy / scikit-learn or from
torch's own reference ops written out here, never from the code under test."""
from __future__ import annotations

import copy
import logging
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from freqexp.models import bank_search, memory_bank as mb
from freqexp.models.bank_search import BankIndex, nearest_k
from freqexp.models.coreset import approximate_greedy_coreset, greedy_coreset
from freqexp.models.memory_bank import NeighbourhoodPooling, PatchCore
from freqexp.models.wedge import WedgeNet

SMALL = dict(backbone={"arch": "resnet18"}, input_size=64, center_crop=None)  # an 8x8 patch grid


@pytest.fixture
def fast_bf16_cpu(monkeypatch):
    """Pretend the CPU multiplies bf16 fast, so `auto` takes the bf16 search here too (a CPU
    without AMX computes the same products, only slower)."""
    monkeypatch.setattr(bank_search, "cpu_has_fast_bf16", lambda: True)


def official_pooling(maps, grid, k, pretrain_dim, feature_dim):
    """amazon-science/patchcore-inspection: unfold (zero padding), upsample to the first grid,
    adaptive_avg_pool1d per layer (MeanMapper), concatenate, pool again (Aggregator)."""
    per_layer = []
    for f in maps:
        b, c, h, w = f.shape
        u = F.unfold(f.double(), k, padding=k // 2).view(b, c * k * k, h, w)
        if (h, w) != tuple(grid):
            u = F.interpolate(u, size=tuple(grid), mode="bilinear", align_corners=False)
        per_layer.append(F.adaptive_avg_pool1d(u.permute(0, 2, 3, 1).reshape(-1, 1, c * k * k), pretrain_dim))
    out = F.adaptive_avg_pool1d(torch.cat(per_layer, 2), feature_dim).squeeze(1)
    return out.view(maps[0].shape[0], *grid, feature_dim).permute(0, 3, 1, 2)


@pytest.mark.parametrize("channels, k, pretrain_dim, feature_dim", [
    ((512, 1024), 3, 1024, 1024),   # the paper's WideResNet-50-2 widths: 1 and 2 channels per output row
    ((16, 32), 3, 20, 12),          # rows spanning several channels
    ((10, 7, 5), 5, 13, 9),         # three layers, 5x5 neighbourhoods
    ((8, 8), 3, 5, 3),              # a final bin straddles the two layers: rows summed from both
    ((24,), 1, 50, 30),             # no neighbourhood, upsampling pools
])
def test_neighbourhood_pooling_equals_the_official_unfold_pipeline(channels, k, pretrain_dim, feature_dim):
    gen = torch.Generator().manual_seed(0)
    sizes = [(8, 6), (4, 3), (2, 2)][: len(channels)]
    maps = [torch.randn(2, c, *s, generator=gen) for c, s in zip(channels, sizes)]
    pooling = NeighbourhoodPooling(channels, k, pretrain_dim, feature_dim)
    got = pooling(maps, sizes[0]).double()
    expected = official_pooling(maps, sizes[0], k, pretrain_dim, feature_dim)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    assert pooling.concatenate == (channels != (8, 8))


def brute_force(queries: torch.Tensor, bank: torch.Tensor) -> np.ndarray:
    q, b = queries.double().numpy(), bank.double().numpy()
    return np.sqrt(np.maximum((q**2).sum(1)[:, None] + (b**2).sum(1)[None] - 2 * q @ b.T, 0))


@pytest.mark.parametrize("search", ["fp32", "bf16"])
@pytest.mark.parametrize("n_bank, k, query_chunk, bank_chunk", [
    (53, 1, 5, 16), (53, 1, None, None), (53, 4, 7, 13), (3, 5, None, None), (200, 1, 64, 48), (200, 9, 33, 64),
])
def test_chunked_search_equals_brute_force(search, n_bank, k, query_chunk, bank_chunk):
    gen = torch.Generator().manual_seed(n_bank + k)
    offset = 5.0  # a common offset, as ReLU features have: |b|^2 far above the distances
    queries, bank = torch.randn(70, 24, generator=gen) + offset, torch.randn(n_bank, 24, generator=gen) + offset
    d = brute_force(queries, bank)
    got_d, got_i = nearest_k(queries, bank, k, BankIndex(bank, search), query_chunk=query_chunk, bank_chunk=bank_chunk)
    kk = min(k, n_bank)
    assert got_d.shape == got_i.shape == (70, kk)
    np.testing.assert_allclose(got_d.numpy(), np.sort(d, 1)[:, :kk], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(d, got_i.numpy(), 1), got_d.numpy(), rtol=1e-5, atol=1e-5)


def patch_like(n: int, dim: int, seed: int, centres: torch.Tensor) -> torch.Tensor:
    """Non-negative, clustered rows with near-duplicates, like CNN patch features."""
    gen = torch.Generator().manual_seed(seed)
    rows = centres[torch.randint(len(centres), (n,), generator=gen)] + 0.15 * torch.randn(n, dim, generator=gen)
    rows[: n // 4] = rows[n // 4 : n // 2] + 1e-3 * torch.randn(n // 4, dim, generator=gen)  # near-duplicates
    return rows.relu() * 20


def test_bf16_shortlist_finds_the_true_nearest_rows():
    # many near ties (clusters, near-duplicates) and a large common offset: the bf16 product alone
    # misorders rows; after the exact fp32 re-rank every reported distance is the true nearest one
    centres = torch.rand(40, 256, generator=torch.Generator().manual_seed(9))
    bank, queries = patch_like(3000, 256, 1, centres), patch_like(1500, 256, 2, centres)
    expected = brute_force(queries, bank).min(1)
    got = nearest_k(queries, bank, 1, BankIndex(bank, "bf16"))[0][:, 0].double().numpy()
    np.testing.assert_allclose(got, expected, rtol=2e-6)
    # the naive bf16 score |b|^2 - 2 q.b (norms in the product's output) would not do
    naive = (bank.bfloat16().float().pow(2).sum(1) - 2 * (queries.bfloat16() @ bank.bfloat16().T).float()).argmin(1)
    assert (torch.from_numpy(brute_force(queries, bank)).gather(1, naive[:, None])[:, 0].numpy() > expected * (1 + 1e-6)).sum() > 10


def low_rank_like(n: int, dim: int, rank: int, seed: int, basis: torch.Tensor) -> torch.Tensor:
    """Rows whose variance lies mostly in `rank` directions (as CNN patch features' does), plus
    small full-width noise, clusters and near-duplicates."""
    gen = torch.Generator().manual_seed(seed)
    rows = (torch.randn(n, rank, generator=gen) * torch.linspace(3, 0.3, rank)) @ basis + 0.05 * torch.randn(n, dim, generator=gen)
    m = n // 8
    rows[:m] = rows[m : 2 * m] + 1e-3 * torch.randn(m, dim, generator=gen)  # near-duplicates
    return rows + 4.0  # a common offset, as ReLU features have


class CountsRedo:
    """Spy on nearest_k: the sizes of the query sets the pruned search hands back to the fp32 product."""

    def __init__(self, monkeypatch):
        self.sizes: list[int] = []
        original = bank_search.nearest_k

        def spy(queries, bank, k=1, index=None, **kw):
            if index is not None and index.search == "fp32":
                self.sizes.append(queries.shape[0])
            return original(queries, bank, k, index, **kw)

        monkeypatch.setattr(bank_search, "nearest_k", spy)


@pytest.fixture
def prune_any_bank(monkeypatch):
    """The pruned search on banks of any size (by default narrow or short ones use the fp32
    product), so the algorithm is tested on small, fast data."""
    monkeypatch.setattr(bank_search, "PRUNE_MIN_DIM", 0)
    monkeypatch.setattr(bank_search, "PRUNE_MIN_ROWS", 0)
    monkeypatch.setattr(bank_search, "PRUNE_MIN_WORK", 0)


@pytest.mark.parametrize("n_bank", [1000, 1003, 17])  # whole groups, a tail of n % GROUP rows, a bank of one shortlist
def test_pruned_search_equals_brute_force_and_settles_most_queries(n_bank, monkeypatch, prune_any_bank):
    gen = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(96, 24, generator=gen))[0].T  # 24 orthonormal rows in 96 dims
    bank, queries = low_rank_like(n_bank, 96, 24, 1, basis), low_rank_like(700, 96, 24, 2, basis)
    redo = CountsRedo(monkeypatch)
    got_d, got_i = nearest_k(queries, bank, 1, BankIndex(bank, "pruned"))
    d = brute_force(queries, bank)
    np.testing.assert_allclose(got_d[:, 0].numpy(), d.min(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d[np.arange(len(d)), got_i[:, 0].numpy()], d.min(1), rtol=1e-5, atol=1e-6)
    assert sum(redo.sizes) <= 0.05 * len(queries)  # the bound settles nearly every query by itself


def test_pruned_search_falls_back_where_the_bound_is_weak(monkeypatch, prune_any_bank):
    # isotropic rows in 300 dims: no subspace holds their variance, the bound settles few queries
    gen = torch.Generator().manual_seed(4)
    bank, queries = torch.randn(800, 300, generator=gen), torch.randn(300, 300, generator=gen)
    redo = CountsRedo(monkeypatch)
    got_d, got_i = nearest_k(queries, bank, 1, BankIndex(bank, "pruned"))
    d = brute_force(queries, bank)
    assert sum(redo.sizes) > 100  # the fp32 product answered those
    np.testing.assert_allclose(got_d[:, 0].numpy(), d.min(1), rtol=1e-5)
    assert (got_i[:, 0].numpy() == d.argmin(1)).all()


def test_pruned_bound_never_exceeds_the_distance(prune_any_bank):
    gen = torch.Generator().manual_seed(5)
    basis = torch.linalg.qr(torch.randn(64, 10, generator=gen))[0].T
    bank, queries = low_rank_like(500, 64, 10, 1, basis), low_rank_like(200, 64, 10, 2, basis)
    index = BankIndex(bank, "pruned")
    assert index.basis.shape == (64, min(bank_search.PRUNE_DIMS, 64))
    bound = torch.cdist(index.embed(queries).double(), index.embedded.double())
    assert (bound.numpy() <= brute_force(queries, bank) * (1 + 1e-5) + 1e-6).all()


@pytest.mark.parametrize("short", ["dims", "rows", "work"])
def test_narrow_or_short_banks_are_searched_by_the_fp32_product(short, monkeypatch):
    # below PRUNE_MIN_DIM dims, PRUNE_MIN_ROWS rows or PRUNE_MIN_WORK rows x dims the bound costs
    # more than it saves: no embedding is built, the pruned index answers through the fp32 product,
    # with its answers (each limit is tested alone, the others lowered: a small bank, a fast test)
    gen = torch.Generator().manual_seed(6)
    monkeypatch.setattr(bank_search, "PRUNE_MIN_ROWS", 301 if short == "rows" else 0)
    monkeypatch.setattr(bank_search, "PRUNE_MIN_WORK", 300 * bank_search.PRUNE_MIN_DIM + 1 if short == "work" else 0)
    width = bank_search.PRUNE_MIN_DIM - 1 if short == "dims" else bank_search.PRUNE_MIN_DIM
    bank, queries = torch.randn(300, width, generator=gen) + 3.0, torch.randn(80, width, generator=gen) + 3.0
    called = []
    monkeypatch.setattr(bank_search, "_pruned_nearest", lambda *a: called.append(1))
    index = BankIndex(bank, "pruned")
    assert index.embedded is None and index.matches(bank, "pruned")  # still the index bank_index() asked for
    got_d, got_i = nearest_k(queries, bank, 1, index)
    assert not called
    d = brute_force(queries, bank)
    np.testing.assert_allclose(got_d[:, 0].numpy(), d.min(1), rtol=1e-5)
    assert (got_i[:, 0].numpy() == d.argmin(1)).all()
    monkeypatch.setattr(bank_search, "PRUNE_MIN_ROWS", 40)
    monkeypatch.setattr(bank_search, "PRUNE_MIN_WORK", 40 * bank_search.PRUNE_MIN_DIM)
    wide = torch.randn(40, bank_search.PRUNE_MIN_DIM, generator=gen)  # at every limit
    assert BankIndex(wide, "pruned").embedded.shape == (40, bank_search.PRUNE_DIMS + 1)


def fitted(cls, x, **options):
    model = cls(tuple(x.shape[1:]), **options)
    model.observe(x)
    model.finalize()
    return model


def images(n, seed, size=32, anomalous=False):
    gen = torch.Generator().manual_seed(seed)
    base = F.avg_pool2d(torch.rand(n, 1, size, size, generator=gen), 5, stride=1, padding=2)  # smooth textures
    if anomalous:
        base[:, :, 10:18, 12:20] += 0.6  # a bright square
    return base.clamp(0, 1)


def test_cached_norms_follow_the_bank_and_are_not_saved(fast_bf16_cpu, tmp_path):
    torch.manual_seed(0)
    model = fitted(PatchCore, images(6, 1), sampling_ratio=0.5, **SMALL)
    index = model.bank_index()
    assert index.search == "bf16" and model.bank_index() is index  # built once by finalize, reused
    model.score(images(2, 2))
    assert model.bank_index() is index  # scoring does not rebuild it

    def norms_match(model):
        expected = (model.memory_bank.double().numpy() ** 2).sum(1)
        np.testing.assert_allclose(model.bank_index().sq_norms.double().numpy(), expected, rtol=1e-5)

    model.memory_bank.mul_(2.0)  # in place
    assert model.bank_index() is not index
    norms_match(model)
    model.memory_bank = model.memory_bank[: 10].clone()  # replaced
    norms_match(model)
    assert model.bank_index().rows == 10

    torch.manual_seed(1)
    other = fitted(PatchCore, images(6, 3), sampling_ratio=0.25, **SMALL)
    keys = set(model.state_dict())
    assert not any("pooling" in k or "index" in k or "inference" in k for k in keys)
    model.load_state_dict(other.state_dict())  # loaded: the bank (and its size) of the other model
    norms_match(model)
    torch.testing.assert_close(model.score(images(3, 4))[1], other.score(images(3, 4))[1])
    assert copy.deepcopy(model)._index is None and pickle.loads(pickle.dumps(model))._index is None


def test_micro_batches_bound_the_work_and_change_nothing(monkeypatch):
    torch.manual_seed(0)
    model = fitted(PatchCore, images(8, 1), sampling_ratio=0.5, **SMALL)
    x = images(10, 2)
    whole_maps, whole_scores = model.score(x)
    seen = []
    hook = model.extractor.inference_net().conv1.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    monkeypatch.setattr(mb, "work_budget", lambda device: 3 * model.bytes_per_image(x.shape[-2:]))
    model._micro.clear()
    assert model.micro_batch(x) == 3
    maps, scores = model.score(x)
    hook.remove()
    assert seen == [3, 3, 3, 1]
    torch.testing.assert_close(maps, whole_maps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores, whole_scores, rtol=1e-5, atol=1e-6)


def test_folded_batch_norm_keeps_the_features():
    from freqexp.models.backbone import FeatureExtractor

    torch.manual_seed(0)
    extractor = FeatureExtractor((3, 64, 64), ["layer2", "layer3"], {"arch": "resnet18"})
    for m in extractor.net.modules():  # non-trivial statistics, as an ImageNet checkpoint has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)
    x = torch.rand(2, 3, 64, 64)
    plain, fast = extractor(x), extractor(x, fast=True)
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-4, atol=1e-4 * float(plain[name].abs().max()))
    first = extractor.inference_net()
    assert extractor.inference_net() is first  # made once
    extractor.net.layer2[0].bn1.running_mean.add_(1.0)  # a weight changes: made again
    assert extractor.inference_net() is not first


def covering_radius(points: np.ndarray, chosen) -> float:
    d = ((points[:, None, :] - points[None, list(chosen), :]) ** 2).sum(-1)
    return float(np.sqrt(d.min(1)).max())


def greedy_step_ratios(points: np.ndarray, chosen) -> float:
    """The smallest, over the steps, of d^2(row chosen, chosen so far) / max_j d^2(j, chosen so far)
    in float64: 1 for an exact farthest-first selection."""
    nearest, worst = np.full(len(points), np.inf), 1.0
    for i, c in enumerate(chosen):
        if i:
            worst = min(worst, nearest[c] / nearest.max())
        nearest = np.minimum(nearest, ((points - points[c]) ** 2).sum(1))
    return worst


@pytest.mark.parametrize("dtype, rounding", [(torch.bfloat16, 2**-7), (torch.float16, 2**-9)])
def test_reduced_precision_coreset_is_farthest_first_up_to_rounding(dtype, rounding):
    # each step takes a row whose exact squared distance is within the dtype's rounding of the
    # farthest one, so the selection may differ from fp32's but covers about as well
    centres = torch.rand(30, 48, generator=torch.Generator().manual_seed(3))
    points = patch_like(1500, 48, 4, centres)
    p = points.double().numpy()
    exact = greedy_coreset(points, 60, start=0).tolist()
    low = greedy_coreset(points, 60, start=0, low_precision=dtype).tolist()
    assert greedy_step_ratios(p, exact) == 1.0 and len(set(low)) == 60
    assert greedy_step_ratios(p, low) >= 1 - rounding
    assert covering_radius(p, low) <= 1.05 * covering_radius(p, exact)
    approx = approximate_greedy_coreset(points, 60, torch.Generator().manual_seed(5), low_precision=dtype).tolist()
    approx_exact = approximate_greedy_coreset(points, 60, torch.Generator().manual_seed(5)).tolist()
    assert covering_radius(p, approx) <= 1.05 * covering_radius(p, approx_exact)


def test_precision_option_picks_the_fast_settings_only_where_they_are(monkeypatch, caplog):
    cpu = torch.device("cpu")
    for fast in (True, False):
        monkeypatch.setattr(bank_search, "cpu_has_fast_bf16", lambda fast=fast: fast)
        mb._warned.clear()
        models = {p: PatchCore((1, 32, 32), precision=p, **SMALL) for p in ("auto", "fp32", "bf16", "fp16")}
        assert models["auto"].search_mode(cpu) == ("bf16" if fast else "pruned") and models["auto"].compute_dtype(cpu) is None
        assert models["fp32"].search_mode(cpu) == "fp32" and models["fp32"].compute_dtype(cpu) is None
        with caplog.at_level(logging.WARNING, logger="freqexp"):
            assert models["bf16"].compute_dtype(cpu) == (torch.bfloat16 if fast else None)
            assert models["fp16"].compute_dtype(cpu) is None
        assert "fp16 is a CUDA setting" in caplog.text and (fast or "no fast bf16" in caplog.text)
    from freqexp.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        PatchCore((1, 32, 32), precision="fp8", **SMALL)
    assert err.value.key == "model.precision"


@pytest.mark.parametrize("cls", [PatchCore, WedgeNet])
def test_auto_precision_scores_images_as_fp32_does(cls, fast_bf16_cpu):
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    model = fitted(cls, images(12, 1), sampling_ratio=0.25, **SMALL)
    test = torch.cat([images(20, 2), images(20, 3, anomalous=True)])
    labels = np.r_[np.zeros(20), np.ones(20)]
    model.precision = "fp32"
    maps32, scores32 = model.score(test)
    assert model.bank_index().search == "fp32"
    model.precision = "auto"
    maps, scores = model.score(test)
    assert model.bank_index().search == "bf16"
    assert abs(roc_auc_score(labels, scores.numpy()) - roc_auc_score(labels, scores32.numpy())) <= 1e-4
    torch.testing.assert_close(scores, scores32, rtol=1e-5, atol=0)
    torch.testing.assert_close(maps, maps32, rtol=0, atol=1e-5 * float(maps32.max() - maps32.min()))


@pytest.mark.parametrize("cls", [PatchCore, WedgeNet])
def test_auto_precision_on_a_plain_cpu_prunes_and_scores_as_fp32_does(cls, monkeypatch, prune_any_bank):
    from sklearn.metrics import roc_auc_score

    monkeypatch.setattr(bank_search, "cpu_has_fast_bf16", lambda: False)
    torch.manual_seed(0)
    model = fitted(cls, images(12, 1), sampling_ratio=0.25, **SMALL)
    test = torch.cat([images(20, 2), images(20, 3, anomalous=True)])
    labels = np.r_[np.zeros(20), np.ones(20)]
    model.precision = "fp32"
    maps32, scores32 = model.score(test)
    assert model.bank_index().search == "fp32"
    model.precision = "auto"
    maps, scores = model.score(test)
    assert model.bank_index().search == "pruned" and model.bank_index().embedded is not None
    assert abs(roc_auc_score(labels, scores.numpy()) - roc_auc_score(labels, scores32.numpy())) <= 1e-4
    torch.testing.assert_close(scores, scores32, rtol=1e-5, atol=0)
    torch.testing.assert_close(maps, maps32, rtol=0, atol=1e-5 * float(maps32.max() - maps32.min()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine: pytest -k cuda)")
def test_cuda_scoring_has_no_host_sync_and_graph_coresets_equal_eager(monkeypatch):
    from freqexp.models import coreset

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = PatchCore((1, 32, 32), sampling_ratio=0.5, **SMALL).to(device)
    model.observe(images(8, 1).to(device))
    model.finalize()
    x = images(6, 2).to(device)
    model.score(x)  # warm: micro-batch size, cuDNN
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.observe(x)
        model._observed = []
        model.score(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    points = torch.randn(4000, 32, generator=torch.Generator().manual_seed(0)).to(device)
    monkeypatch.setattr(coreset, "GRAPH_MIN_STEPS", 64)
    graphed = coreset.greedy_coreset(points, 600, start=3)
    monkeypatch.setenv("FREQEXP_CUDA_GRAPHS", "0")
    assert torch.equal(graphed, coreset.greedy_coreset(points, 600, start=3))
