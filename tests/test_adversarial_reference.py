"""GANomaly's and DRAEM's training objectives against their references, each expected value
computed here with numpy from the formula (samet-akcay/ganomaly lib/model.py + lib/loss.py;
VitjanZ/DRAEM loss.py + train_DRAEM.py), never by calling the code under test for it."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import compose_cfg

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


def build(overrides):
    from freqexp.training import build_module
    from freqexp.validate import make_plan

    cfg = compose_cfg([*overrides, "dataset=synthetic", "dataset.image_size=16", "hardware=cpu"])
    return build_module(make_plan(cfg), cfg)


# ----------------------------------------------------------------------------- GANomaly
class Linear(nn.Module):
    """A stand-in sub-network with numpy-reproducible math: act(flatten(x) @ W), reshaped."""

    def __init__(self, w: np.ndarray, act=None, shape=None, features=False):
        super().__init__()
        self.w = nn.Parameter(torch.from_numpy(w).float())
        self.act, self.shape, self.features = act, shape, features

    def forward(self, x):
        y = x.flatten(1) @ self.w
        y = torch.tanh(y) if self.act == "tanh" else torch.sigmoid(y) if self.act == "sigmoid" else y
        if self.features:  # a discriminator: (logit, features)
            return y.sum(1), y
        return y.view(-1, *self.shape) if self.shape else y


def np_act(y, act):
    return np.tanh(y) if act == "tanh" else 1 / (1 + np.exp(-y)) if act == "sigmoid" else y


def test_ganomaly_generator_losses_are_the_references_with_their_weights():
    module = build(["model=ganomaly", "model.channels=[8,16]", "model.latent_dim=6",
                    "model.w_adv=2.0", "model.w_con=50.0", "model.w_lat=3.0"])
    assert module.loss.weights == {"l1": 1.0}  # the paper's contextual loss: L1
    rng = np.random.default_rng(0)
    d, nz, nf = 16 * 16, 6, 5
    enc1, dec, enc2, disc = rng.normal(0, 0.1, (d, nz)), rng.normal(0, 0.5, (nz, d)), rng.normal(0, 0.1, (d, nz)), rng.normal(0, 0.1, (d, nf))
    model = module.model
    model.encoder1, model.encoder2 = Linear(enc1), Linear(enc2)
    model.decoder = Linear(dec, "sigmoid", (1, 16, 16))
    model.discriminator = Linear(disc, "tanh", features=True)
    x = rng.random((4, 1, 16, 16))
    with torch.no_grad():
        out = model(torch.from_numpy(x).float())
        terms, parts = module.generator_losses(out, torch.from_numpy(x).float())

    flat = x.reshape(4, -1)
    z = flat @ enc1
    x_hat = np_act(z @ dec, "sigmoid")
    z_hat = x_hat @ enc2
    f_real, f_fake = np.tanh(flat @ disc), np.tanh(x_hat @ disc)
    adv = 2.0 * np.mean((f_real - f_fake) ** 2)  # l_adv = l2_loss(netd(x)[1], netd(x_hat)[1]), w_adv
    con = 50.0 * np.mean(np.abs(x_hat - flat))  # l_con = L1Loss(x_hat, x), w_con = 50
    lat = 3.0 * np.mean((z_hat - z) ** 2)  # l_enc = l2_loss(latent_o, latent_i), w_enc
    assert float(terms["adv"]) == pytest.approx(adv, rel=1e-5)
    assert float(terms["con"]) == pytest.approx(con, rel=1e-5)
    assert float(terms["lat"]) == pytest.approx(lat, rel=1e-5)
    assert float(parts["l1"]) == pytest.approx(con / 50.0, rel=1e-5)


def test_ganomaly_discriminator_loss_is_the_mean_of_the_two_bces():
    from freqexp.models.ganomaly import discriminator_loss

    rng = np.random.default_rng(1)
    real, fake = rng.normal(0, 2, 7), rng.normal(0, 2, 7)
    sig = lambda t: 1 / (1 + np.exp(-t))  # noqa: E731
    want = 0.5 * (-np.mean(np.log(sig(real))) - np.mean(np.log(1 - sig(fake))))  # (BCE(D(x), 1) + BCE(D(x_hat), 0)) / 2
    assert float(discriminator_loss(torch.from_numpy(real), torch.from_numpy(fake))) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("size,channels,last", [(32, [8, 16, 32], 4), (28, [8, 16, 32], 4), (64, [8, 16, 32], 8), (31, [8, 16], 8)])
def test_ganomaly_latent_is_a_convolution_to_nz_channels_over_the_last_map(size, channels, last):
    from freqexp.models.ganomaly import Ganomaly

    model = Ganomaly((1, size, size), channels=channels, latent_dim=10)
    for encoder in (model.encoder1, model.encoder2):
        conv = encoder.to_latent
        assert isinstance(conv, nn.Conv2d) and conv.out_channels == 10 and conv.kernel_size == (last, last) and conv.bias is None
    assert isinstance(model.decoder.from_latent[0], nn.ConvTranspose2d) and model.decoder.from_latent[0].kernel_size == (last, last)
    assert isinstance(model.discriminator.head, nn.Conv2d) and model.discriminator.head.out_channels == 1
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    x = torch.rand(3, 1, size, size)
    out = model(x)
    assert out["z"].shape == (3, 10) and out["z_hat"].shape == (3, 10) and out["recon"].shape == x.shape
    # z is the conv's [B, nz, 1, 1] output: the map of encoder1's conv stack against each of the nz kernels
    feats = model.encoder1.conv(x).detach().double().numpy()
    kernels = model.encoder1.to_latent.weight.detach().double().numpy()  # [nz, C, k, k]
    np.testing.assert_allclose(out["z"].detach().double().numpy(), np.einsum("bchw,nchw->bn", feats, kernels), rtol=1e-4, atol=1e-6)
    # DCGAN init: conv weights N(0, 0.02)
    w = torch.cat([m.weight.detach().flatten() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    assert 0.015 < float(w.std()) < 0.025 and abs(float(w.mean())) < 0.005


# ----------------------------------------------------------------------------- DRAEM
def draem_focal_np(logits: np.ndarray, mask: np.ndarray, gamma: float, smooth: float) -> float:
    """DRAEM's FocalLoss on softmax probabilities: one-hot target clipped to [s/(K-1), 1-s],
    pt = sum(target * p) + s, loss = mean(-(1 - pt)^gamma * log pt) (alpha = 1)."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)  # [B, K, H, W]
    k = p.shape[1]
    onehot = np.stack([(mask[:, 0] == c) for c in range(k)], 1).astype(float)
    target = np.clip(onehot, smooth / (k - 1), 1 - smooth)
    pt = (target * p).sum(1) + smooth
    return float(np.mean(-((1 - pt) ** gamma) * np.log(pt)))


@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("smooth", [1e-5, 0.1])
def test_draem_focal_loss_with_label_smoothing_is_the_references(gamma, smooth):
    from freqexp.models.draem import focal_loss

    g = torch.Generator().manual_seed(3)
    logits = 4 * torch.randn(2, 2, 6, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 1, 6, 5, generator=g) < 0.4
    got = float(focal_loss(logits, mask, gamma, smooth))
    assert got == pytest.approx(draem_focal_np(logits.numpy(), mask.numpy(), gamma, smooth), rel=1e-5)


def test_draem_recipe_uses_the_references_focal_smoothing_and_gamma(monkeypatch):
    import freqexp.models.draem as draem

    module = build(["model=draem", "model.channels=[8,16]", "model.seg_channels=[8,8]"])
    assert (module.model.focal_gamma, module.model.focal_smoothing) == (2.0, 1e-5)  # FocalLoss() defaults in train_DRAEM.py
    seen = {}
    real = draem.focal_loss
    monkeypatch.setattr(draem, "focal_loss", lambda *a: seen.setdefault("args", a[2:]) and real(*a))
    module.training_step(torch.rand(4, 1, 16, 16), 0)
    assert seen["args"] == (2.0, 1e-5)


def gaussian_np(size: int, sigma: float = 1.5) -> np.ndarray:
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma**2))
    return g / g.sum()


def draem_ssim_np(x: np.ndarray, y: np.ndarray, window: int = 11) -> float:
    """DRAEM's ssim(): an 11x11 Gaussian (sigma 1.5) window, conv2d with zero padding window // 2
    per channel, C1 = 0.01^2, C2 = 0.03^2 for images in [0, 1], the mean of the full-size map."""
    from scipy import ndimage

    w2 = np.outer(gaussian_np(window), gaussian_np(window))
    blur = lambda t: ndimage.correlate(t, w2, mode="constant", cval=0.0)  # noqa: E731
    values = []
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            a, o = x[b, c], y[b, c]
            mu1, mu2 = blur(a), blur(o)
            s1, s2, s12 = blur(a * a) - mu1**2, blur(o * o) - mu2**2, blur(a * o) - mu1 * mu2
            c1, c2 = 0.01**2, 0.03**2
            values.append(((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s1 + s2 + c2)))
    return float(np.mean(values))


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (1, 3, 9, 13), (2, 1, 28, 28)])
def test_draem_ssim_term_is_11_px_with_zero_padding(shape):
    module = build(["model=draem", "model.channels=[8,16]", "model.seg_channels=[8,8]"])
    assert module.loss.weights == {"mse": 1.0, "ssim": 1.0}  # loss = l2 + ssim (+ segment) in train_DRAEM.py
    rng = np.random.default_rng(sum(shape))
    x = rng.random(shape)
    y = np.clip(x + rng.normal(0, 0.2, shape), 0, 1)
    term = module.loss.terms["ssim"]
    got = float(term(torch.from_numpy(x).float(), torch.from_numpy(y).float()))
    assert got == pytest.approx(1 - draem_ssim_np(x, y), rel=1e-4, abs=1e-6)
    total, parts = module.loss(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    assert float(total) == pytest.approx(np.mean((x - y) ** 2) + 1 - draem_ssim_np(x, y), rel=1e-4)


def test_draem_initialization_is_normal_0_02():
    from freqexp.models.draem import Draem

    torch.manual_seed(0)
    model = Draem((1, 32, 32))
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    w = torch.cat([m.weight.detach().flatten() for m in convs])
    assert 0.018 < float(w.std()) < 0.022 and abs(float(w.mean())) < 0.002
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    scale = torch.cat([m.weight.detach() for m in bn])
    assert abs(float(scale.mean()) - 1) < 0.01 and 0.01 < float(scale.std()) < 0.03
    assert all(float(m.bias.detach().abs().max()) == 0 for m in bn)
    default = Draem((1, 32, 32), init="pytorch")
    first = next(m for m in default.modules() if isinstance(m, nn.Conv2d))  # fan-in 9: PyTorch's init is far wider
    assert float(first.weight.detach().std()) > 0.1


def test_draem_rotates_a_fraction_of_the_training_images_with_their_target(monkeypatch):
    import freqexp.models.draem as draem

    module = build(["model=draem", "model.channels=[8,16]", "model.seg_channels=[8,8]", "model.rotate_p=1.0"])
    seen = {}
    real_compare = module.compare
    module.compare = lambda pred, target: seen.setdefault("target", target) is not None and real_compare(pred, target)
    x = torch.rand(3, 1, 16, 16)
    torch.manual_seed(0)
    module.training_step(x, 0)
    torch.manual_seed(0)
    degrees = (2 * torch.rand(3) - 1) * 90  # the draw random_rotation makes first
    from freqexp.augment.geometric import rotate

    torch.testing.assert_close(seen["target"], rotate(x, degrees))
    assert draem.Draem((1, 16, 16)).rotate_p == 0.3 and math.isclose(draem.Draem((1, 16, 16)).rotate_degrees, 90)
