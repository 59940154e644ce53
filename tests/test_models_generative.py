"""Diffusion (ddpm, diffusion_unet) and masked-patch transformer (vit_ad) models: the noise
schedule against its closed form, the forward process statistics, the DDIM sampler with an
oracle noise predictor, deterministic batch-independent scoring, and the vit's promise that
no patch is scored by a pass that saw it."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from freqexp.errors import ConfigError
from freqexp.losses import build_loss
from freqexp.models.diffusion import DDPM, DiffusionUNet
from freqexp.models.vit import TransformerAnomalyDetector, patch_groups

TINY_DDPM = dict(channels=8, dilations=[1, 2], time_dim=16)
TINY_UNET = dict(channels=[8, 16], heads=2, time_dim=16)
TINY_VIT = dict(dim=16, depth=1, heads=2)
MSE = build_loss({"spec": "mse"})


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter non-trivial values (untrained models start near eps_hat = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


class ZeroDenoiser(nn.Module):
    def forward(self, x_t, t):
        return torch.zeros_like(x_t)


class OracleDenoiser(nn.Module):
    """Knows the clean images x0 ([-1,1] scale) and returns the exact noise in x_t at step t."""

    def __init__(self, x0: torch.Tensor, abar: torch.Tensor):
        super().__init__()
        self.x0, self.abar = x0, abar
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x_t, t):
        self.calls.append((x_t.clone(), t.clone()))
        a = self.abar[t.long()].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()


# ---------------------------------------------------------------- schedule and forward process
def test_linear_schedule_abar_is_the_product_of_one_minus_beta():
    model = DDPM((1, 16, 16), schedule="linear", timesteps=200, **TINY_DDPM)
    betas = np.linspace(1e-4 * 5, 0.02 * 5, 200)  # Ho et al.'s range, rescaled by 1000/T
    expected = np.array([np.prod(1 - betas[: t + 1]) for t in range(200)])
    np.testing.assert_allclose(model.schedule.abar.numpy(), expected, rtol=1e-5)


def test_cosine_schedule_abar_matches_the_closed_form():
    T, s = 1000, 0.008
    model = DDPM((1, 16, 16), schedule="cosine", timesteps=T, **TINY_DDPM)
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    abar = model.schedule.abar.numpy()
    # every step but the last, where beta is clipped at 0.999 (abar ~ 0 there anyway)
    np.testing.assert_allclose(abar[:-1], expected[:-1], rtol=1e-5, atol=1e-8)
    assert abar[-1] < 1e-3 and np.all(np.diff(abar) < 0)


def test_q_sample_has_the_forward_process_mean_and_variance():
    torch.manual_seed(0)
    model = DDPM((1, 16, 16), **TINY_DDPM)
    x0 = torch.rand(1, 1, 4, 4) * 2 - 1
    n, t = 20000, 250
    eps = torch.randn(n, 1, 4, 4)
    x_t = model.schedule.q_sample(x0.expand(n, -1, -1, -1), torch.full((n,), t), eps)
    abar = float(model.schedule.abar[t])
    sd = math.sqrt(1 - abar)
    # 5 standard errors of the mean / variance estimates
    torch.testing.assert_close(x_t.mean(0), math.sqrt(abar) * x0[0], atol=5 * sd / math.sqrt(n), rtol=0)
    torch.testing.assert_close(x_t.var(0), torch.full((1, 4, 4), 1 - abar), atol=5 * (1 - abar) * math.sqrt(2 / n), rtol=0)


def test_training_loss_targets_the_noise_that_was_added():
    """With an oracle denoiser the training loss is 0, so (x_t, eps, t) are consistent and the
    target is scaled to [-1, 1]; a zero predictor's mse is the noise variance, 1."""
    torch.manual_seed(1)
    model = DDPM((1, 16, 16), **TINY_DDPM)
    target = torch.rand(512, 1, 16, 16)
    model.denoiser = OracleDenoiser(target * 2 - 1, model.schedule.abar)
    total, parts = model.training_loss(torch.zeros_like(target), target, MSE)
    assert float(total) < 1e-8 and set(parts) == {"mse"}
    model.denoiser = ZeroDenoiser()
    total, _ = model.training_loss(target, target, MSE)
    assert abs(float(total) - 1.0) < 0.02


# ---------------------------------------------------------------- DDIM scoring
@pytest.mark.parametrize("cls,kwargs", [(DDPM, TINY_DDPM), (DiffusionUNet, TINY_UNET)])
@pytest.mark.parametrize("t_score,steps,clip", [(0.3, 5, True), (1.0, 3, False), (0.02, 50, True)])
def test_ddim_with_an_oracle_returns_the_clean_image(cls, kwargs, t_score, steps, clip):
    model = cls((1, 20, 24), t_score=t_score, sampler_steps=steps, clip_x0=clip, **kwargs)
    x = torch.rand(3, 1, 20, 24)
    oracle = OracleDenoiser(x * 2 - 1, model.schedule.abar)
    model.denoiser = oracle
    torch.testing.assert_close(model.reconstruct(x), x, atol=1e-4, rtol=0)
    # the sampler starts at round(t_score*T)-1 from the fixed noise and visits distinct descending steps
    first_x, first_t = oracle.calls[0]
    start = round(t_score * 1000) - 1
    assert int(first_t[0]) == start == model.start_step
    a = model.schedule.abar[start]
    noise = model.score_noise((1, 20, 24), x.device)
    torch.testing.assert_close(first_x, a.sqrt() * (x * 2 - 1) + (1 - a).sqrt() * noise, atol=1e-5, rtol=0)
    visited = [int(t[0]) for _, t in oracle.calls]
    assert visited == sorted(set(visited), reverse=True) and visited[-1] == 0
    assert len(visited) == min(steps, start + 1)


def test_ddim_without_a_good_predictor_does_not_return_the_image():
    """Negative control for the oracle test: the exactness comes from the predictor."""
    model = DDPM((1, 16, 16), t_score=0.5, **TINY_DDPM)
    model.denoiser = ZeroDenoiser()
    x = torch.rand(2, 1, 16, 16)
    assert (model.reconstruct(x) - x).abs().max() > 0.1


@pytest.mark.parametrize("cls,kwargs", [(DDPM, TINY_DDPM), (DiffusionUNet, TINY_UNET)])
def test_diffusion_scores_are_deterministic_and_independent_of_the_batch(cls, kwargs):
    torch.manual_seed(0)
    model = randomize(cls((1, 32, 32), **kwargs)).eval()
    x = torch.rand(6, 1, 32, 32)
    rng_before = torch.get_rng_state()
    maps = model.anomaly_map(x)
    assert torch.equal(torch.get_rng_state(), rng_before)  # scoring leaves the global RNG alone
    assert maps.shape == (6, 1, 32, 32) and maps.std() > 0
    torch.testing.assert_close(model.anomaly_map(x), maps, rtol=0, atol=0)
    # same images in another batch, at other positions
    shuffled = model.anomaly_map(torch.cat([torch.rand(2, 1, 32, 32), x[[4, 1]]]))
    torch.testing.assert_close(shuffled[2:], maps[[4, 1]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.anomaly_map(x[3:4]), maps[3:4], rtol=1e-5, atol=1e-6)
    # another score_seed probes with other noise
    other = cls((1, 32, 32), score_seed=1, **kwargs)
    other.load_state_dict(model.state_dict())
    assert not torch.allclose(other.anomaly_map(x), maps)


@pytest.mark.parametrize("cls,kwargs", [(DDPM, TINY_DDPM), (DiffusionUNet, TINY_UNET)])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 31, 95), (1, 17, 16)])
def test_diffusion_models_train_and_score_any_size(cls, kwargs, shape):
    torch.manual_seed(0)
    model = cls(shape, **kwargs)
    x = torch.rand(2, *shape)
    total, parts = model.training_loss(x, x, MSE)
    total.backward()
    assert torch.isfinite(total) and all(p.grad is not None for p in model.parameters())
    assert model.reconstruct(x).shape == x.shape
    assert model.anomaly_map(x).shape == (2, 1, *shape[1:])


@pytest.mark.parametrize("cls,kwargs", [(DDPM, TINY_DDPM), (DiffusionUNet, TINY_UNET)])
def test_diffusion_training_loss_under_bf16_autocast(cls, kwargs):
    torch.manual_seed(0)
    model = cls((1, 28, 28), **kwargs)
    x = torch.rand(4, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = model.training_loss(x, x, MSE)
    assert total.dtype == torch.float32 and torch.isfinite(total)


@pytest.mark.parametrize("key,options", [
    ("model.schedule", dict(schedule="quadratic")),
    ("model.timesteps", dict(timesteps=1)),
    ("model.t_score", dict(t_score=0)),
    ("model.t_score", dict(t_score=1.5)),
    ("model.sampler_steps", dict(sampler_steps=0)),
    ("model.score_seed", dict(score_seed=-1)),
    ("model.clip_x0", dict(clip_x0="yes")),
    ("model.dilations", dict(dilations=[])),
])
def test_ddpm_rejects_bad_options(key, options):
    with pytest.raises(ConfigError) as e:
        DDPM((1, 28, 28), **{**TINY_DDPM, **options})
    assert e.value.key == key


@pytest.mark.parametrize("key,shape,options", [
    ("model.channels", (1, 28, 28), dict(channels=[8])),
    ("model.channels", (1, 15, 64), dict(channels=[8, 8, 8])),  # 3 levels need >= 16 pixels a side
    ("model.heads", (1, 28, 28), dict(channels=[8, 12], heads=5)),
])
def test_unet_rejects_bad_options(key, shape, options):
    with pytest.raises(ConfigError) as e:
        DiffusionUNet(shape, **{**TINY_UNET, **options})
    assert e.value.key == key


@pytest.mark.parametrize("model_name,spec", [("ddpm", "ssim"), ("diffusion_unet", "mse+ssim"), ("ddpm", "fft")])
def test_diffusion_refuses_image_space_losses(model_name, spec):
    from freqexp.validate import make_plan
    from tests.conftest import compose_cfg

    cfg = compose_cfg([f"model={model_name}", f"loss={spec}", "dataset=synthetic", "hardware=cpu"])
    with pytest.raises(ConfigError) as e:
        make_plan(cfg)
    assert e.value.key == "loss" and "noise" in e.value.message


def test_diffusion_accepts_noise_space_losses():
    from freqexp.validate import make_plan
    from tests.conftest import compose_cfg

    plan = make_plan(compose_cfg(["model=ddpm", "loss=l1+charbonnier", "dataset=synthetic", "hardware=cpu"]))
    assert isinstance(plan.model, DDPM)


# ---------------------------------------------------------------- masked-patch transformer
def test_patch_groups_cover_every_patch_once_and_never_touch():
    for k in (4, 5, 9, 16):
        groups = patch_groups(9, 11, k).view(9, 11)
        assert sorted(groups.unique().tolist()) == list(range(k))
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                if (dr, dc) == (0, 0):
                    continue
                a = groups[max(dr, 0): 9 + min(dr, 0), max(dc, 0): 11 + min(dc, 0)]
                b = groups[max(-dr, 0): 9 + min(-dr, 0), max(-dc, 0): 11 + min(-dc, 0)]
                assert not (a == b).any(), f"K={k}: neighbours at offset {(dr, dc)} share a group"


@pytest.mark.parametrize("shape,patch", [((1, 32, 32), 4), ((3, 31, 95), 4), ((1, 29, 30), 4), ((1, 28, 28), 7)])
def test_vit_scores_every_patch_without_seeing_it(shape, patch):
    torch.manual_seed(0)
    model = TransformerAnomalyDetector(shape, patch_size=patch, **TINY_VIT).eval()
    x = torch.rand(2, *shape)
    base = model.reconstruct(x)
    assert base.shape == x.shape
    h, w = shape[1:]
    # change the last (partial, padded) patch, the one before it (whose pixels a reflect pad
    # would copy into the last patch: 29 = 7*4 + 1) and an inner patch
    for r, c in [(model.rows - 1, model.cols - 1), (model.rows - 2, model.cols - 2), (1, 2)]:
        rows = slice(r * patch, min((r + 1) * patch, h))
        cols = slice(c * patch, min((c + 1) * patch, w))
        changed = x.clone()
        changed[..., rows, cols] = torch.rand_like(changed[..., rows, cols])
        recon = model.reconstruct(changed)
        torch.testing.assert_close(recon[..., rows, cols], base[..., rows, cols], rtol=0, atol=1e-6)
        # ...while other patches, which used it as context, do change (the test can fail)
        assert (recon - base).abs().max() > 1e-4


def test_vit_scoring_is_deterministic_and_per_image():
    torch.manual_seed(0)
    model = TransformerAnomalyDetector((1, 28, 28), **TINY_VIT).eval()
    x = torch.rand(5, 1, 28, 28)
    maps = model.anomaly_map(x)
    torch.testing.assert_close(model.anomaly_map(x), maps, rtol=0, atol=0)
    torch.testing.assert_close(model.anomaly_map(x[[3, 0]]), maps[[3, 0]], rtol=1e-5, atol=1e-6)


def test_vit_training_loss_counts_the_hidden_patches_only():
    torch.manual_seed(0)
    model = TransformerAnomalyDetector((1, 32, 32), mask_ratio=0.25, **TINY_VIT)
    x = torch.rand(4, 1, 32, 32)
    seen = {}

    def spy(pred, target):
        seen["pred"], seen["target"] = pred.detach(), target
        return MSE(pred, target)

    total, parts = model.training_loss(x, x, spy)
    total.backward()
    differs = (seen["pred"] != seen["target"]).view(4, 8, 4, 8, 4).permute(0, 1, 3, 2, 4).reshape(4, 64, 16)
    hidden = differs.any(-1)
    # 25% of the 64 patches per image are predicted; the rest are the target, copied
    assert hidden.sum(1).tolist() == [16] * 4
    assert not torch.equal(hidden[0], hidden[1])  # masks are drawn per image
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_vit_trains_under_bf16_autocast_on_odd_sizes():
    torch.manual_seed(0)
    model = TransformerAnomalyDetector((3, 31, 95), **TINY_VIT)
    x = torch.rand(2, 3, 31, 95)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = model.training_loss(x, x, build_loss({"spec": "mse+ssim"}))
    total.backward()
    assert torch.isfinite(total) and model.anomaly_map(x).shape == (2, 1, 31, 95)


@pytest.mark.parametrize("key,shape,options", [
    ("model.patch_size", (1, 28, 28), dict(patch_size=29)),
    ("model.patch_size", (1, 31, 95), dict(patch_size=32)),
    ("model.dim", (1, 28, 28), dict(dim=18)),
    ("model.heads", (1, 28, 28), dict(heads=3)),
    ("model.mask_ratio", (1, 28, 28), dict(mask_ratio=0)),
    ("model.mask_ratio", (1, 28, 28), dict(mask_ratio=1.0)),
    ("model.score_groups", (1, 28, 28), dict(score_groups=1)),
    ("model.score_groups", (1, 8, 8), dict(patch_size=4, score_groups=5)),
    ("model.decoder_depth", (1, 28, 28), dict(decoder_depth=-1)),
])
def test_vit_rejects_bad_options(key, shape, options):
    with pytest.raises(ConfigError) as e:
        TransformerAnomalyDetector(shape, **{**TINY_VIT, **options})
    assert e.value.key == key
