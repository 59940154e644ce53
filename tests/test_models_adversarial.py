"""GANomaly and DRAEM: the models with their own training procedures (two optimizers with a
discriminator re-init; pseudo-anomaly segmentation with a focal loss). Tiny nets, tiny data."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from freqexp.errors import ConfigError
from tests.conftest import compose_cfg

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")

TINY_GANOMALY = ["model=ganomaly", "model.channels=[8,16]", "model.latent_dim=16", "optim=default"]  # cosine: the schedule mechanics
TINY_DRAEM = ["model=draem", "augment=cutpaste", "model.channels=[8,16]", "model.seg_channels=[8,8]"]


def fit(overrides, epochs=1, n_train=16, image_size=32, patch=None):
    """(module, data, trainer) after a Lightning fit on synthetic textures, without validation."""
    from freqexp.data import IndexBatches, build_dataset
    from freqexp.run import build_trainer, quiet_lightning
    from freqexp.training import build_module
    from freqexp.validate import make_plan

    quiet_lightning()
    cfg = compose_cfg([*overrides, "dataset=synthetic", f"dataset.image_size={image_size}", f"dataset.n_train={n_train}",
                       "dataset.n_val=16", "dataset.n_test=16", f"trainer.max_epochs={epochs}", "trainer.batch_size=16",
                       "trainer.progress_bar=false", "trainer.restore_best=false", "hardware=cpu", "seed=0"])
    plan = make_plan(cfg)
    module = build_module(plan, cfg)
    if patch:
        patch(module)
    data = build_dataset(cfg.dataset)
    trainer = build_trainer(cfg, plan, [], max_epochs=epochs)
    trainer.fit(module, IndexBatches(data.train.images, batch_size=16, shuffle=True, seed=0))
    return module, data, trainer


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


# ---------------------------------------------------------------- GANomaly


@pytest.fixture(scope="module")
def ganomaly_one_step():
    """One training batch (n_train = batch size): one generator and one discriminator step."""
    before = {}
    module, data, trainer = fit(TINY_GANOMALY, patch=lambda m: before.update(snapshot(m.model)))
    return module, data, trainer, before


def test_ganomaly_steps_both_optimizers_and_their_schedulers(ganomaly_one_step):
    module, _, trainer, before = ganomaly_one_step
    after = snapshot(module.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    gen = {k for k in before if not k.startswith("discriminator.")}
    disc = set(before) - gen
    assert gen and disc
    assert changed == gen | disc, f"not updated: {sorted(gen | disc - changed)}"
    assert trainer.global_step == 2  # manual optimization counts every optimizer step: G then D
    assert module.disc_resets == 0  # a healthy discriminator (loss ~ log 2) is kept
    assert float(trainer.callback_metrics["train/disc_resets"]) == 0.0
    # the cosine schedules (T_max = 1 epoch) were stepped by hand at the epoch's end, both of them
    opt_g, opt_d = trainer.optimizers
    for opt in (opt_g, opt_d):
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.01)
    g_ids = {id(p) for p in opt_g.param_groups[0]["params"]}
    d_ids = {id(p) for p in opt_d.param_groups[0]["params"]}
    assert not g_ids & d_ids
    assert d_ids == {id(p) for p in module.model.discriminator.parameters()}
    for key in ("train/loss", "train/loss_adv", "train/loss_con", "train/loss_lat", "train/loss_disc", "train/loss_l1"):  # l1: the recipe
        assert math.isfinite(float(trainer.callback_metrics[key])), key
    m = trainer.callback_metrics
    assert float(m["train/loss"]) == pytest.approx(float(m["train/loss_adv"] + m["train/loss_con"] + m["train/loss_lat"]), rel=1e-5)


def test_ganomaly_score_is_the_latent_distance_of_its_encoders(ganomaly_one_step):
    module, data, _, _ = ganomaly_one_step
    model = module.model
    x = data.test.images[:6].float() / 255
    model.eval()
    with torch.no_grad():
        z = model.encoder1(x)
        z_hat = model.encoder2(model.decoder(z))
    by_hand = ((z - z_hat) ** 2).mean(dim=1)
    model.set_score_range(0.0, 1.0)  # uncalibrated: raw scores
    maps = model.anomaly_map(x)
    assert maps.shape == (6, 1, 32, 32)
    torch.testing.assert_close(maps, by_hand.view(6, 1, 1, 1).expand(6, 1, 32, 32), rtol=1e-5, atol=1e-7)
    model.set_score_range(0.01, 0.5)
    torch.testing.assert_close(model.anomaly_map(x)[:, 0, 0, 0], (by_hand - 0.01) / 0.49, rtol=1e-5, atol=1e-6)


def test_ganomaly_calibrated_scores_are_in_unit_range_and_independent_of_batch(ganomaly_one_step):
    from freqexp.evaluate import score_split
    from freqexp.models.ganomaly import Ganomaly

    module, data, _, _ = ganomaly_one_step
    module.calibrate(data.val.images, batch_size=5)  # batch size unrelated to scoring's
    low, high = float(module.model.score_min), float(module.model.score_max)
    assert 0 <= low < high
    val = score_split(module, data.val, batch_size=16).scores
    assert float(val.min()) == pytest.approx(0.0, abs=1e-4) and float(val.max()) == pytest.approx(1.0, abs=1e-4)  # conv rounding differs by batch size
    # the same image in other company: batches of 3, one at a time, a reversed split
    for bs in (3, 1):
        torch.testing.assert_close(score_split(module, data.val, batch_size=bs).scores, val, rtol=0, atol=1e-4)
    rev = type(data.val)(data.val.images.flip(0), data.val.labels.flip(0), None)
    torch.testing.assert_close(score_split(module, rev, batch_size=7).scores.flip(0), val, rtol=0, atol=1e-4)
    # a module left in train mode still scores with BatchNorm's running statistics, and they stay put
    bn_stats = {k: v.clone() for k, v in module.model.state_dict().items() if "running" in k}
    module.train()
    x = data.val.images[:4].float() / 255
    scores_train_mode = module.image_scores(module.anomaly_map(x))
    assert module.training and module.model.encoder1.training
    torch.testing.assert_close(scores_train_mode, val[:4], rtol=0, atol=1e-4)
    assert all(torch.equal(v, module.model.state_dict()[k]) for k, v in bn_stats.items())
    # the scale travels with the weights (model.pt)
    fresh = Ganomaly((1, 32, 32), channels=[8, 16], latent_dim=16)
    fresh.load_state_dict(module.model.state_dict())
    torch.testing.assert_close(fresh.anomaly_map(x)[:, 0, 0, 0], val[:4], rtol=0, atol=1e-4)


def _mark_disc_weights(module, value=0.5):
    for m in module.model.discriminator.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.constant_(m.weight, value)


def test_ganomaly_reinitializes_a_collapsed_discriminator(monkeypatch):
    import freqexp.models.ganomaly as gan

    # a discriminator that is (claims to be) perfectly sure: loss 1e-7, zero gradients, so without
    # the re-init its weights would stay at the marker value (the natural-loss fit above: no re-init)
    monkeypatch.setattr(gan, "discriminator_loss", lambda real, fake: (real.sum() + fake.sum()) * 0 + 1e-7)
    module, _, _ = fit(TINY_GANOMALY, patch=_mark_disc_weights)
    assert module.disc_resets == 1
    for m in module.model.discriminator.modules():
        if isinstance(m, torch.nn.Conv2d):  # back to the DCGAN init N(0, 0.02)
            w = m.weight.detach()
            assert float(w.abs().max()) < 0.2 and 0.005 < float(w.std()) < 0.04


def test_the_device_side_reset_takes_the_fresh_draw_exactly_where_collapsed_and_nothing_elsewhere():
    """reset_discriminator_where never reads its flag on the host: with True the discriminator's
    weights and BatchNorm statistics (num_batches_tracked included) become the fresh draw's, bit for
    bit; with False they stay bit for bit as they were; the generator is untouched either way."""
    import copy

    from freqexp.models.ganomaly import Ganomaly, dcgan_init

    torch.manual_seed(0)
    model = Ganomaly((1, 32, 32), channels=[8, 16], latent_dim=16)
    model.discriminator(torch.rand(4, 1, 32, 32))  # BatchNorm statistics move away from (0, 1), count 1
    fresh = copy.deepcopy(model.discriminator)
    dcgan_init(fresh)
    # values an arithmetic blend would not carry through: inf, NaN and a negative zero
    bn = next(m for m in model.discriminator.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_var[0], bn.running_mean[0] = float("inf"), float("nan")
    conv = next(m for m in model.discriminator.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        conv.weight.view(-1)[0] = -0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(before[f"discriminator.{k}"], v) for k, v in fresh.state_dict().items())

    def same_bits(a, b):  # equal values, NaN where NaN, the same sign of zero
        return torch.equal(torch.nan_to_num(a, nan=7.0), torch.nan_to_num(b, nan=7.0)) and torch.equal(a.isnan(), b.isnan()) \
            and (not a.is_floating_point() or torch.equal(a.signbit(), b.signbit()))

    model.reset_discriminator_where(torch.tensor(False), fresh)
    assert all(same_bits(v, before[k]) for k, v in model.state_dict().items())

    model.reset_discriminator_where(torch.tensor(True), fresh)
    after = model.state_dict()
    for k, v in fresh.state_dict().items():
        assert same_bits(after[f"discriminator.{k}"], v), k
    assert all(same_bits(v, before[k]) for k, v in after.items() if not k.startswith("discriminator."))
    counts = [int(v) for k, v in after.items() if k.startswith("discriminator.") and k.endswith("num_batches_tracked")]
    assert counts and counts == [0] * len(counts)  # reset, as reset_running_stats does (they were 1)


def test_every_reset_of_a_collapsed_discriminator_starts_from_a_draw_of_its_own(monkeypatch):
    """Two collapses (one step in each of two epochs) give two different DCGAN draws, as
    re-initializing twice does in the paper's code: the fresh draw is renewed once the device says
    it was used (here at the epoch's end)."""
    import freqexp.models.ganomaly as gan

    monkeypatch.setattr(gan, "discriminator_loss", lambda real, fake: (real.sum() + fake.sum()) * 0 + 1e-7)
    drawn = []

    def keep_each_reset(module):
        _mark_disc_weights(module)
        hook = module.on_train_batch_end

        def on_train_batch_end(*args):  # after the step's reset: the draw it took
            drawn.append([p.detach().clone() for p in module.model.discriminator.parameters()])
            return hook(*args)

        module.on_train_batch_end = on_train_batch_end

    module, _, trainer = fit(TINY_GANOMALY, epochs=2, patch=keep_each_reset)
    assert module.disc_resets == 2 and len(drawn) == 2
    assert float(trainer.callback_metrics["train/disc_resets"]) == 2.0  # the count so far, logged each epoch
    drawn_at_random = [(a, b) for a, b in zip(*drawn) if a.numel() > 1 and float(a.std()) > 0]  # not the zero biases
    assert drawn_at_random and not any(torch.equal(a, b) for a, b in drawn_at_random)
    for weights in drawn:  # each a DCGAN draw: conv weights N(0, 0.02), not the 0.5 marker
        conv = torch.cat([w.flatten() for w in weights if w.dim() == 4])
        assert float(conv.abs().max()) < 0.2 and 0.005 < float(conv.std()) < 0.04


def test_drawing_the_fresh_discriminator_leaves_the_global_random_streams_alone():
    """The fresh draws come from seeds of their own (derived from the run's seed), so a run's
    augments and noise draw what they drew before; the same run seed gives the same draws."""
    from freqexp.training import build_module
    from freqexp.validate import make_plan

    def drawn(seed):
        cfg = compose_cfg([*TINY_GANOMALY, "dataset=synthetic", "dataset.image_size=32", "hardware=cpu", f"seed={seed}"])
        module = build_module(make_plan(cfg), cfg)  # make_plan seeds the run
        state = torch.get_rng_state()
        fresh = module._fresh_discriminator()
        first = [p.clone() for p in fresh.parameters()]
        module._draw_fresh()
        assert torch.equal(torch.get_rng_state(), state)
        return first, [p.clone() for p in fresh.parameters()]

    a1, a2 = drawn(3)
    b1, b2 = drawn(3)
    assert all(torch.equal(x, y) for x, y in zip(a1 + a2, b1 + b2))  # reproducible
    assert not torch.equal(a1[0], a2[0])  # each draw its own
    assert not torch.equal(drawn(4)[0][0], a1[0])


def test_a_nan_in_the_discriminator_loss_stops_the_run_naming_it(monkeypatch):
    import freqexp.models.ganomaly as gan
    from freqexp.errors import TrainingError

    monkeypatch.setattr(gan, "discriminator_loss", lambda real, fake: (real.sum() + fake.sum()) * float("nan"))
    with pytest.raises(TrainingError, match=r"^disc loss became nan in epoch 1 .*disc=nan"):
        fit(TINY_GANOMALY)


def test_ganomaly_odd_sizes_and_rgb():
    from freqexp.models.ganomaly import Ganomaly

    model = Ganomaly((3, 31, 45), channels=[8, 16, 16], latent_dim=8)
    out = model(torch.rand(2, 3, 31, 45))
    assert out["recon"].shape == (2, 3, 31, 45) and out["z_hat"].shape == (2, 8)
    assert model.anomaly_map(torch.rand(2, 3, 31, 45)).shape == (2, 1, 31, 45)


# ---------------------------------------------------------------- DRAEM


def focal_reference(logits: np.ndarray, mask: np.ndarray, gamma: float) -> float:
    """Pixel by pixel: -(1 - p_t)^gamma * log p_t with p_t the softmax probability of the true class."""
    total, count = 0.0, 0
    b, _, h, w = logits.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                e = np.exp(logits[i, :, y, x] - logits[i, :, y, x].max())
                p_t = e[int(mask[i, 0, y, x])] / e.sum()
                total += -((1 - p_t) ** gamma) * np.log(p_t)
                count += 1
    return total / count


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 4.0])
def test_draem_focal_loss_matches_reference_and_cross_entropy_at_gamma_zero(gamma):
    from freqexp.models.draem import focal_loss

    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(2, 2, 5, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 1, 5, 7, generator=g) < 0.3
    got = float(focal_loss(logits, mask, gamma))
    assert got == pytest.approx(focal_reference(logits.numpy(), mask.numpy(), gamma), rel=1e-5)
    ce = float(F.cross_entropy(logits.float(), mask[:, 0].long()))
    if gamma == 0:
        assert got == pytest.approx(ce, rel=1e-5)
    else:  # the focusing term only ever down-weights
        assert got < ce


def test_draem_learns_to_segment_pseudo_anomalies():
    from freqexp.metrics import roc_auc

    # PyTorch's initialization: from DRAEM's N(0, 0.02) the segmenter needs about 3x these 40 steps to
    # leave its constant start (30 epochs here reach a pixel AUROC of 0.92); the procedure is what is tested
    module, data, trainer = fit(TINY_DRAEM + ["loss=mse", "optim.lr=3e-3", "optim.scheduler=none", "model.anomaly_p=1.0",
                                              "model.init=pytorch"], epochs=10, n_train=64, image_size=16)
    assert math.isfinite(float(trainer.callback_metrics["train/loss_seg"]))
    x = data.test.images[data.test.labels == 0].float() / 255
    torch.manual_seed(5)
    defective, mask = module.augment.synthesize(x)
    maps = module.anomaly_map(defective)
    assert maps.shape == (len(x), 1, 16, 16) and 0 <= float(maps.min()) and float(maps.max()) <= 1
    assert float(maps[mask].mean()) > float(maps[~mask].mean()) + 0.05
    assert roc_auc(maps.flatten(), mask.flatten()) > 0.7


def test_draem_map_smoothing_is_a_mean_filter_on_odd_sizes():
    from freqexp.models.draem import Draem

    torch.manual_seed(0)
    plain = Draem((3, 17, 23), channels=[8, 16], seg_channels=[4, 8, 8])
    smooth = Draem((3, 17, 23), channels=[8, 16], seg_channels=[4, 8, 8], smooth=3)
    smooth.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 17, 23)
    p, s = plain.anomaly_map(x), smooth.anomaly_map(x)
    assert p.shape == s.shape == (2, 1, 17, 23)
    for y, xx in [(0, 0), (5, 9), (16, 22), (0, 11)]:  # corners and edges average only the pixels that exist
        window = p[:, 0, max(0, y - 1) : y + 2, max(0, xx - 1) : xx + 2]
        torch.testing.assert_close(s[:, 0, y, xx], window.mean(dim=(-2, -1)))


def test_draem_needs_a_pseudo_anomaly_augment():
    from freqexp.validate import make_plan

    with pytest.raises(ConfigError) as e:
        make_plan(compose_cfg(["model=draem", "augment=none", "dataset=synthetic", "hardware=cpu"]))
    assert e.value.key == "augment" and "cutpaste" in e.value.message


@pytest.mark.parametrize("name", ["ganomaly", "draem"])
def test_a_score_placed_filter_is_refused(name):
    from freqexp.training import build_module
    from freqexp.validate import make_plan

    cfg = compose_cfg([f"model={name}", "augment=cutpaste", "filter=fft", "filter.apply_to=score", "dataset=synthetic", "hardware=cpu"])
    with pytest.raises(ConfigError) as e:
        build_module(make_plan(cfg), cfg)
    assert e.value.key == "filter.apply_to"


@pytest.mark.parametrize(
    "name, options, key",
    [
        ("ganomaly", {"latent_dim": 0}, "model.latent_dim"),
        ("ganomaly", {"channels": []}, "model.channels"),
        ("ganomaly", {"w_con": -1}, "model.w_con"),
        ("ganomaly", {"w_adv": "big"}, "model.w_adv"),
        ("ganomaly", {"disc_reset_threshold": -1e-5}, "model.disc_reset_threshold"),
        ("ganomaly", {"channels": [8, 8, 8, 8, 8, 8]}, "model.channels"),  # 6 halvings of 32 px
        ("ganomaly", {"discriminator": 3}, "model.discriminator"),
        ("draem", {"anomaly_p": 0.0}, "model.anomaly_p"),
        ("draem", {"anomaly_p": 1.5}, "model.anomaly_p"),
        ("draem", {"focal_gamma": -1}, "model.focal_gamma"),
        ("draem", {"w_seg": True}, "model.w_seg"),
        ("draem", {"smooth": 4}, "model.smooth"),
        ("draem", {"smooth": -1}, "model.smooth"),
        ("draem", {"seg_channels": [0, 8]}, "model.seg_channels"),
        ("draem", {"seg_channels": [4, 4, 4, 4, 4, 4, 4]}, "model.seg_channels"),
        ("draem", {"channels": [8, 8, 8, 8, 8, 8]}, "model.channels"),
        ("draem", {"focal_smoothing": -0.1}, "model.focal_smoothing"),
        ("draem", {"init": "xavier"}, "model.init"),
        ("draem", {"rotate_p": 1.5}, "model.rotate_p"),
        ("draem", {"rotate_degrees": 200}, "model.rotate_degrees"),
    ],
)
def test_bad_options_are_config_errors(name, options, key):
    from freqexp.models import model_class

    with pytest.raises(ConfigError) as e:
        model_class(name).from_config((1, 32, 32), options)
    assert e.value.key == key
