"""The autoencoder family (freqexp/models/autoencoders.py, variants.py): shapes at odd sizes,
the KL term against torch.distributions, the denoising and adversarial training inputs, the
identity shortcut of skips, attention against torch's MultiheadAttention, and option checks."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from freqexp.errors import ConfigError
from freqexp.losses import build_loss
from freqexp.models import MODELS
from freqexp.models.autoencoders import kl_to_standard_normal
from freqexp.models.variants import HybridCAE, RobustAE, SelfAttentionLayer, SkipAE
from tests.conftest import REPO

NEW = ["deep_cae", "vae", "deep_vae", "deep_cvae", "denoising_ae", "skip_ae", "hybrid_cae", "robust_ae"]
VARIATIONAL = ["vae", "deep_vae", "cvae", "deep_cvae"]
MSE = build_loss({"spec": "mse"})
# small but structurally complete versions of every model, for the behaviour tests
TINY = {
    "deep_cae": dict(channels=[8, 16, 16], latent_dim=8),
    "vae": dict(hidden=[64], latent_dim=8),
    "deep_vae": dict(hidden=[64, 32], latent_dim=8),
    "cvae": dict(channels=[8, 16], latent_dim=8),
    "deep_cvae": dict(channels=[8, 16, 16], latent_dim=8),
    "denoising_ae": dict(channels=[8, 16], latent_dim=8),
    "skip_ae": dict(channels=[8, 16], latent_dim=8, skip_levels=[0, 1]),
    "hybrid_cae": dict(channels=[8, 16], latent_dim=8, heads=2),
    "robust_ae": dict(channels=[8, 16], latent_dim=8, steps=2),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # On a shared, loaded CPU two threads fighting over tiny convs run ~10x slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def yaml_options(name: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"))
    assert cfg.pop("name") == name
    return cfg


def build(name: str, shape=(1, 32, 32), **options):
    torch.manual_seed(0)
    return MODELS.get(name)(shape, **{**TINY.get(name, {}), **options})


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 32, 32), (3, 31, 95)])
@pytest.mark.parametrize("name", ["ae", "cae", "cvae"] + NEW)
def test_default_options_give_image_sized_outputs(name, shape):
    torch.manual_seed(0)
    model = MODELS.get(name)(shape, **yaml_options(name))
    x = torch.rand(2, *shape)
    recon = model(x)["recon"]
    assert recon.shape == x.shape and recon.min() >= 0 and recon.max() <= 1
    model.eval()
    assert model.anomaly_map(x).shape == (2, 1, *shape[1:])


@pytest.mark.parametrize("name", NEW)
def test_yaml_lists_every_option_with_the_constructor_default(name):
    params = inspect.signature(MODELS.get(name).__init__).parameters
    defaults = {k: list(p.default) if isinstance(p.default, tuple) else p.default for k, p in params.items() if k not in ("self", "in_shape")}
    assert yaml_options(name) == defaults
    lines = (REPO / "conf" / "model" / f"{name}.yaml").read_text().splitlines()
    assert lines[0].startswith("# ")
    assert all("#" in line for line in lines if ":" in line and not line.startswith(("#", "name:")))


@pytest.mark.parametrize("name", NEW)
def test_defaults_stay_small_for_cpu(name):
    model = MODELS.get(name)((1, 28, 28), **yaml_options(name))
    assert sum(p.numel() for p in model.parameters()) < 3_000_000


def test_refactor_keeps_ae_cae_cvae_sizes():
    # parameter counts of the models before variants shared their pieces
    counts = {"ae": 944176, "cae": 451745, "cvae": 351393}
    for name, expected in counts.items():
        model = MODELS.get(name)((1, 28, 28), **yaml_options(name))
        assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name", NEW)
def test_trains_under_bf16_autocast(name):
    model = build(name)
    x = torch.rand(4, 1, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = model.training_loss(x, x, MSE)
    total.backward()
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


# -- variational


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(6, 5), torch.randn(6, 5)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    reference = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
    torch.testing.assert_close(kl_to_standard_normal(mu, logvar), reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = kl_to_standard_normal(mu.bfloat16(), logvar.bfloat16())
    assert in_bf16.dtype == torch.float32


@pytest.mark.parametrize("name", VARIATIONAL)
def test_vae_logs_weighted_kl_and_scores_with_the_mean(name):
    model = build(name, kl_weight=0.25)
    x = torch.rand(8, 1, 32, 32)
    total, parts = model.training_loss(x, x, MSE)
    mu, logvar = model.posterior(x)
    q = torch.distributions.Normal(mu.detach(), torch.exp(0.5 * logvar.detach()))
    reference = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
    torch.testing.assert_close(parts["kl"].detach(), 0.25 * reference)
    torch.testing.assert_close(total, parts["mse"] + parts["kl"])
    # training samples z, scoring uses the posterior mean, also in train mode
    assert not torch.equal(model(x)["recon"], model(x)["recon"])
    with torch.no_grad():
        torch.testing.assert_close(model.reconstruct(x), model.decode(mu))
        torch.testing.assert_close(model.anomaly_map(x), model.anomaly_map(x), rtol=0, atol=0)


# -- denoising


def spy_inputs(model):
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


def spy_loss(targets):
    def loss_fn(pred, target):
        targets.append(target)
        return MSE(pred, target)
    return loss_fn


def test_denoising_trains_on_gaussian_noise_against_the_clean_target():
    model = build("denoising_ae", noise_std=0.1)
    seen, targets = spy_inputs(model), []
    x = torch.full((16, 1, 32, 32), 0.5)
    model.training_loss(x, x, spy_loss(targets))
    noise = seen[0] - x
    assert abs(float(noise.std()) - 0.1) < 0.005 and abs(float(noise.mean())) < 0.005
    assert targets[0] is x


def test_denoising_impulse_noise_hits_the_asked_fraction():
    x = torch.full((16, 1, 32, 32), 0.5)
    sp = build("denoising_ae", noise_std=0.0, salt_pepper=0.2).corrupt(x)
    assert abs(float((sp == 0).float().mean()) - 0.1) < 0.015 and abs(float((sp == 1).float().mean()) - 0.1) < 0.015
    assert torch.equal(sp[(sp != 0) & (sp != 1)], x[(sp != 0) & (sp != 1)])
    masked = build("denoising_ae", noise_std=0.0, mask_prob=0.3).corrupt(torch.rand(16, 3, 32, 32) * 0.9 + 0.1)
    zero_pixels = (masked == 0).all(dim=1)
    assert abs(float(zero_pixels.float().mean()) - 0.3) < 0.02
    assert torch.equal(zero_pixels, (masked == 0).any(dim=1))  # a masked pixel loses all its channels


def test_denoising_scores_the_clean_input_deterministically():
    model = build("denoising_ae", noise_std=0.3, salt_pepper=0.1, mask_prob=0.1)
    seen = spy_inputs(model)
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        first, second = model.reconstruct(x), model.reconstruct(x)
        maps = model.anomaly_map(x), model.anomaly_map(x)
    assert all(torch.equal(s, x) for s in seen)
    assert torch.equal(first, second) and torch.equal(*maps)


# -- adversarial


def smooth_images(n: int, generator: torch.Generator) -> torch.Tensor:
    return F.interpolate(torch.rand(n, 1, 6, 6, generator=generator), size=(32, 32), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def trained_robust_weights():
    """A small conv AE briefly fitted on smooth images: a fixed model to attack."""
    model = build("robust_ae", steps=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        x = smooth_images(16, g)
        loss = F.mse_loss(model(x)["recon"], x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict()


def attacker(weights, **options):
    model = build("robust_ae", **options)
    model.load_state_dict(weights)
    return model.eval()


def test_attack_stays_in_the_epsilon_ball_and_pixel_range(trained_robust_weights):
    x = smooth_images(8, torch.Generator().manual_seed(1))
    x[:, :, :4] = 0.0
    x[:, :, -4:] = 1.0
    for options in (dict(steps=1), dict(steps=5, alpha=0.02), dict(steps=5, alpha=0.02, random_start=True)):
        x_adv = attacker(trained_robust_weights, epsilon=0.05, **options).adversarial_input(x, x, MSE)
        assert float((x_adv - x).abs().max()) <= 0.05 + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert float((x_adv - x).abs().mean()) > 0.02  # it did move (most pixels by epsilon)


def test_pgd_beats_fgsm_beats_clean(trained_robust_weights):
    x = smooth_images(16, torch.Generator().manual_seed(2))
    fgsm = attacker(trained_robust_weights, epsilon=0.05, steps=1)
    pgd = attacker(trained_robust_weights, epsilon=0.05, steps=10, alpha=0.0125)
    with torch.no_grad():
        clean_loss = MSE(fgsm(x)["recon"], x)[0]
        fgsm_loss = MSE(fgsm(fgsm.adversarial_input(x, x, MSE))["recon"], x)[0]
        pgd_loss = MSE(fgsm(pgd.adversarial_input(x, x, MSE))["recon"], x)[0]
    assert clean_loss < fgsm_loss <= pgd_loss


def test_attack_leaves_no_gradients_or_statistics_behind(trained_robust_weights):
    model = attacker(trained_robust_weights, epsilon=0.05, steps=3).train()
    buffers = [b.clone() for b in model.buffers()]
    x = smooth_images(8, torch.Generator().manual_seed(3))
    model.adversarial_input(x, x, MSE)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = model.adversarial_input(x, x, MSE)
    assert x_adv.dtype == torch.float32 and float((x_adv - x).abs().max()) <= 0.05 + 1e-6
    assert all(p.grad is None for p in model.parameters())


def test_robust_training_mixes_clean_and_adversarial_losses(trained_robust_weights):
    model = attacker(trained_robust_weights, epsilon=0.05, steps=1, clean_weight=0.25)
    x = smooth_images(8, torch.Generator().manual_seed(4))
    with torch.no_grad():
        adversarial = MSE(model(model.adversarial_input(x, x, MSE))["recon"], x)[0]
        clean = MSE(model(x)["recon"], x)[0]
    total, parts = model.training_loss(x, x, MSE)
    torch.testing.assert_close(parts["mse"].detach(), adversarial)
    torch.testing.assert_close(parts["clean"].detach(), clean)
    torch.testing.assert_close(total.detach(), 0.75 * adversarial + 0.25 * clean)


# -- skips


def fit_on_noise_then_error_on_shapes(skip_levels) -> float:
    """Fits on i.i.d. noise images, which no 8-number bottleneck can hold, and returns the
    reconstruction error on structured patterns never seen."""
    torch.manual_seed(0)
    model = SkipAE((1, 16, 16), channels=(8, 16), latent_dim=8, skip_levels=skip_levels, skip_dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        x = torch.rand(16, 1, 16, 16, generator=g)
        loss = F.mse_loss(model(x)["recon"], x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checker, stripes, disc = (xx // 4 + yy // 4) % 2, xx % 3 == 0, (xx - 8) ** 2 + (yy - 8) ** 2 < 20
    patterns = torch.stack([checker.float(), stripes.float(), disc.float()]).unsqueeze(1) * 0.8 + 0.1
    with torch.no_grad():
        return float(model.eval().anomaly_map(patterns).mean())


def test_skips_let_unseen_patterns_through():
    no_skips, coarse, every_level = (fit_on_noise_then_error_on_shapes(levels) for levels in ([], [-1], [0, 1]))
    # the identity shortcut: with a skip at full resolution an unseen pattern is copied
    assert every_level < 0.2 * no_skips
    # a coarse skip carries less detail than full-resolution ones
    assert every_level < coarse < no_skips


@pytest.mark.parametrize("skip_type", ["add", "concat"])
def test_skip_dropout_is_random_in_training_only(skip_type):
    x = torch.rand(8, 1, 32, 32)
    model = build("skip_ae", skip_type=skip_type, skip_dropout=0.5)
    assert not torch.equal(model(x)["recon"], model(x)["recon"])
    model.eval()
    assert torch.equal(model(x)["recon"], model(x)["recon"])
    assert torch.equal(build("skip_ae", skip_type=skip_type, skip_dropout=0.0)(x)["recon"], build("skip_ae", skip_type=skip_type, skip_dropout=0.0)(x)["recon"])


# -- attention


def test_attention_layer_matches_torch_multihead_attention():
    torch.manual_seed(0)
    layer = SelfAttentionLayer(16, heads=4)
    reference = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(layer.qkv.weight)
        reference.in_proj_bias.copy_(layer.qkv.bias)
        reference.out_proj.weight.copy_(layer.proj.weight)
        reference.out_proj.bias.copy_(layer.proj.bias)
    t = torch.randn(3, 10, 16)
    h = layer.norm1(t)
    mixed = t + reference(h, h, h, need_weights=False)[0]
    torch.testing.assert_close(layer(t), mixed + layer.mlp(layer.norm2(mixed)))


def test_hybrid_tokens_are_feature_map_positions():
    model = HybridCAE((1, 28, 28), channels=[8, 16], latent_dim=8, heads=2, attn_layers=2)
    assert model.position.shape == (1, 7 * 7, 16)
    assert len([m for m in model.attention if isinstance(m, SelfAttentionLayer)]) == 2
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.eval()(x)["recon"].float()
    torch.testing.assert_close(low, model(x)["recon"], atol=0.03, rtol=0)


# -- options


@pytest.mark.parametrize(
    "name, options, key",
    [
        ("deep_cae", dict(res_blocks=-1), "model.res_blocks"),
        ("deep_cae", dict(channels=[8] * 7), "model.channels"),  # 7 halvings of a 32 px image
        ("vae", dict(kl_weight=-1.0), "model.kl_weight"),
        ("deep_vae", dict(hidden=[]), "model.hidden"),
        ("deep_cvae", dict(kl_weight="big"), "model.kl_weight"),
        ("denoising_ae", dict(noise_std=-0.1), "model.noise_std"),
        ("denoising_ae", dict(salt_pepper=1.5), "model.salt_pepper"),
        ("denoising_ae", dict(noise_std=0.0), "model.noise_std"),  # nothing to denoise
        ("skip_ae", dict(skip_type="mul"), "model.skip_type"),
        ("skip_ae", dict(skip_levels=[2]), "model.skip_levels"),
        ("skip_ae", dict(skip_levels=[0, -2]), "model.skip_levels"),  # the same level twice
        ("skip_ae", dict(skip_levels=1), "model.skip_levels"),
        ("skip_ae", dict(skip_dropout=1.0), "model.skip_dropout"),
        ("hybrid_cae", dict(heads=3), "model.heads"),
        ("hybrid_cae", dict(attn_layers=0), "model.attn_layers"),
        ("robust_ae", dict(epsilon=0.0), "model.epsilon"),
        ("robust_ae", dict(alpha=-0.01), "model.alpha"),
        ("robust_ae", dict(steps=0), "model.steps"),
        ("robust_ae", dict(random_start="yes"), "model.random_start"),
        ("robust_ae", dict(clean_weight=1.0), "model.clean_weight"),
    ],
)
def test_bad_options_name_the_key(name, options, key):
    with pytest.raises(ConfigError) as err:
        build(name, **options)
    assert err.value.key == key


def test_skip_levels_count_from_the_coarsest():
    assert SkipAE((1, 32, 32), channels=[8, 16, 32], skip_levels=[-1, 0]).skip_levels == [0, 2]
    assert SkipAE((1, 32, 32), channels=[8, 16, 32], skip_levels=[]).skip_levels == []
