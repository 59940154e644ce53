"""Autoencoders of the study. Each squeezes the image through a small latent vector, so it
cannot learn the identity and reconstructs unseen (anomalous) content poorly.

  ae         fully connected: flatten -> MLP -> latent -> MLP -> image
  vae        the same MLP as a variational autoencoder (beta-VAE: + kl_weight * KL)
  deep_vae   deeper fully connected VAE: LayerNorm'd MLP stages with residual MLP blocks
  cae        stride-2 conv encoder -> linear latent -> transposed-conv decoder
  cvae       cae as a variational autoencoder
  deep_cae   cae with residual conv blocks after every stride-2 stage (and mirrored in the
             decoder); default three stages
  deep_cvae  deep_cae as a variational autoencoder

Variational models are trained with a sampled latent z = mu + sigma * eps and the KL term is
logged as its own loss term (`kl`, already multiplied by kl_weight); they are always scored
with the posterior mean (no sampling), so anomaly maps are deterministic.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
from torch import nn

from freqexp.checks import non_negative_int, non_negative_number, positive_int, positive_int_list
from freqexp.errors import ConfigError
from freqexp.models.base import MODELS, ReconstructionModel


def encoder_sizes(size: int, depth: int) -> list[int]:
    """Spatial sizes after each stride-2 conv (kernel 3, padding 1): ceil(s/2) each step."""
    sizes = [size]
    for _ in range(depth):
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


def check_conv_depth(h: int, w: int, stages: int, key: str = "model.channels") -> None:
    """Every stride-2 stage halves the image; refuse depths that leave less than ~1 pixel."""
    if min(h, w) < 2**stages // 2:
        raise ConfigError(key, f"{stages} stride-2 stages are too many for {h}x{w} images (need a side >= {2**stages // 2})")


class ResidualBlock(nn.Module):
    """conv3x3-BN-LReLU-conv3x3-BN plus the identity: adds depth without losing the signal path."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch),
        )
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x):
        return self.act(x + self.body(x))


class ConvEncoder(nn.Module):
    """Stride-2 conv stages; `res_blocks` residual blocks follow each stage (0 = plain cae)."""

    def __init__(self, in_ch: int, channels: list[int], res_blocks: int = 0):
        super().__init__()
        layers, prev = [], in_ch
        for ch in channels:
            layers += [nn.Conv2d(prev, ch, 3, stride=2, padding=1), nn.BatchNorm2d(ch), nn.LeakyReLU(0.2, inplace=True)]
            layers += [ResidualBlock(ch) for _ in range(res_blocks)]
            prev = ch
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def up_step(in_ch: int, out_ch: int, low: tuple[int, int], high: tuple[int, int]) -> nn.ConvTranspose2d:
    """Stride-2 transposed conv from size `low` to exactly `high`: output_padding absorbs the
    rounding of ceil(s/2) in the encoder, so odd sizes (7 -> 14 -> 28, or 31) come back exactly."""
    op = (high[0] - 2 * low[0] + 1, high[1] - 2 * low[1] + 1)
    return nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=op)


class ConvDecoder(nn.Module):
    """Mirror of ConvEncoder (residual blocks before each up-step, at the coarser size, as the
    encoder has them after its down-step); ends in a 3x3 conv and a sigmoid."""

    def __init__(self, out_ch: int, channels: list[int], heights: list[int], widths: list[int], res_blocks: int = 0):
        super().__init__()
        layers = []
        rev = list(reversed(channels))
        for i, ch in enumerate(rev):
            nxt = rev[i + 1] if i + 1 < len(rev) else rev[-1]
            layers += [ResidualBlock(ch) for _ in range(res_blocks)]
            low, high = (heights[-1 - i], widths[-1 - i]), (heights[-2 - i], widths[-2 - i])
            layers += [up_step(ch, nxt, low, high), nn.BatchNorm2d(nxt), nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.Conv2d(rev[-1], out_ch, 3, padding=1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)): summed over latent dimensions, mean over the
    batch; fp32 because exp() of a half-precision log-variance overflows early."""
    with torch.autocast(mu.device.type, enabled=False):
        mu, logvar = mu.float(), logvar.float()
        return -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))


class GaussianLatent:
    """Mixin making an autoencoder variational. The host's encode(x) returns [mu, logvar]
    side by side (latent_multiplier = 2) and decode(z) maps a latent to an image."""

    latent_multiplier = 2

    def set_kl_weight(self, kl_weight) -> None:
        self.kl_weight = non_negative_number("model.kl_weight", kl_weight)

    def posterior(self, x):
        mu, logvar = self.encode(x).chunk(2, dim=1)
        return mu, logvar.clamp(-10, 10)  # keeps exp(logvar) finite early in training

    def forward(self, x) -> Dict[str, torch.Tensor]:
        mu, logvar = self.posterior(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return {"recon": self.decode(z), "mu": mu, "logvar": logvar}

    def reconstruct(self, x) -> torch.Tensor:
        # the posterior mean, also when called in train mode: scores never depend on a sample
        return self.decode(self.posterior(x)[0])

    def extra_losses(self, out):
        return {"kl": self.kl_weight * kl_to_standard_normal(out["mu"], out["logvar"])}


class _ConvBottleneckAE(ReconstructionModel):
    """Conv encoder -> linear bottleneck of `latent_dim` -> conv decoder."""

    latent_multiplier = 1  # variational: 2 (mean and log-variance)

    def __init__(self, in_shape, channels=(32, 64), latent_dim: int = 64, res_blocks: int = 0):
        super().__init__()
        c, h, w = in_shape
        channels = positive_int_list("model.channels", channels)
        latent_dim = positive_int("model.latent_dim", latent_dim)
        res_blocks = non_negative_int("model.res_blocks", res_blocks)
        check_conv_depth(h, w, len(channels))
        hs, ws = encoder_sizes(h, len(channels)), encoder_sizes(w, len(channels))
        self.feat_shape = (channels[-1], hs[-1], ws[-1])
        feat = channels[-1] * hs[-1] * ws[-1]
        self.encoder = ConvEncoder(c, channels, res_blocks)
        self.to_latent = nn.Linear(feat, latent_dim * self.latent_multiplier)
        self.from_latent = nn.Sequential(nn.Linear(latent_dim, feat), nn.LeakyReLU(0.2, inplace=True))
        self.decoder = ConvDecoder(c, channels, hs, ws, res_blocks)
        self.latent_dim = latent_dim

    def encode(self, x):
        return self.to_latent(self.encoder(x).flatten(1))

    def decode(self, z):
        return self.decoder(self.from_latent(z).view(-1, *self.feat_shape))

    def forward(self, x) -> Dict[str, torch.Tensor]:
        z = self.encode(x)
        return {"recon": self.decode(z), "z": z}


@MODELS.register("cae")
class CAE(_ConvBottleneckAE):
    def __init__(self, in_shape, channels=(32, 64), latent_dim: int = 64):
        super().__init__(in_shape, channels, latent_dim)


@MODELS.register("cvae")
class CVAE(GaussianLatent, _ConvBottleneckAE):
    """beta-VAE: adds kl_weight * KL(q(z|x) || N(0, I)) to the loss; scores with the mean."""

    def __init__(self, in_shape, channels=(32, 64), latent_dim: int = 32, kl_weight: float = 1e-3):
        super().__init__(in_shape, channels, latent_dim)
        self.set_kl_weight(kl_weight)


@MODELS.register("deep_cae")
class DeepCAE(_ConvBottleneckAE):
    """cae with `res_blocks` residual conv blocks per stage: more capacity to model normal
    texture at the same bottleneck size (the bottleneck, not the depth, keeps it from copying)."""

    def __init__(self, in_shape, channels=(32, 64, 128), latent_dim: int = 64, res_blocks: int = 1):
        super().__init__(in_shape, channels, latent_dim, res_blocks)


@MODELS.register("deep_cvae")
class DeepCVAE(GaussianLatent, _ConvBottleneckAE):
    """deep_cae as a beta-VAE; scores with the posterior mean."""

    def __init__(self, in_shape, channels=(32, 64, 128), latent_dim: int = 32, kl_weight: float = 1e-3, res_blocks: int = 1):
        super().__init__(in_shape, channels, latent_dim, res_blocks)
        self.set_kl_weight(kl_weight)


# -- fully connected

def plain_mlp(dims: list[int]) -> list[nn.Module]:
    """Linear + LeakyReLU between consecutive widths (the caller decides the last activation)."""
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.LeakyReLU(0.2, inplace=True)]
    return layers


class _MLPAutoencoder(ReconstructionModel):
    """flatten -> hidden widths -> latent (x latent_multiplier) | latent -> mirrored widths -> image."""

    latent_multiplier = 1

    def __init__(self, in_shape, hidden=(512, 128), latent_dim: int = 32):
        super().__init__()
        self.in_shape = tuple(in_shape)
        hidden = positive_int_list("model.hidden", hidden)
        latent_dim = positive_int("model.latent_dim", latent_dim)
        n = int(math.prod(in_shape))
        enc = plain_mlp([n] + hidden) + [nn.Linear(hidden[-1], latent_dim * self.latent_multiplier)]
        dec = plain_mlp([latent_dim] + hidden[::-1] + [n])
        dec[-1] = nn.Sigmoid()
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def encode(self, x):
        return self.encoder(x.flatten(1))

    def decode(self, z):
        return self.decoder(z).view(-1, *self.in_shape)

    def forward(self, x):
        z = self.encode(x)
        return {"recon": self.decode(z), "z": z}


@MODELS.register("ae")
class AE(_MLPAutoencoder):
    """Fully connected: flatten -> hidden layers -> latent -> mirrored layers -> image."""

    def __init__(self, in_shape, hidden=(512, 128), latent_dim: int = 32):
        super().__init__(in_shape, hidden, latent_dim)


@MODELS.register("vae")
class VAE(GaussianLatent, _MLPAutoencoder):
    """The ae MLP as a beta-VAE; scores with the posterior mean."""

    def __init__(self, in_shape, hidden=(512, 128), latent_dim: int = 32, kl_weight: float = 1e-3):
        super().__init__(in_shape, hidden, latent_dim)
        self.set_kl_weight(kl_weight)


class ResidualMLP(nn.Module):
    """Pre-norm residual block x + W2 act(W1 LN(x)): stacks of these train stably where a plain
    deep MLP of LeakyReLUs would not."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.LeakyReLU(0.2, inplace=True), nn.Linear(width, width))

    def forward(self, x):
        return x + self.body(x)


def residual_mlp(dims: list[int], res_blocks: int) -> list[nn.Module]:
    """Per width change: Linear -> LayerNorm -> LeakyReLU, then `res_blocks` ResidualMLPs."""
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.LayerNorm(b), nn.LeakyReLU(0.2, inplace=True)]
        layers += [ResidualMLP(b) for _ in range(res_blocks)]
    return layers


@MODELS.register("deep_vae")
class DeepVAE(GaussianLatent, ReconstructionModel):
    """Deeper fully connected beta-VAE: every hidden width is a LayerNorm'd stage followed by
    `res_blocks` residual MLP blocks (mirrored in the decoder); scores with the posterior mean."""

    def __init__(self, in_shape, hidden=(512, 256, 128), latent_dim: int = 32, kl_weight: float = 1e-3, res_blocks: int = 1):
        super().__init__()
        self.in_shape = tuple(in_shape)
        hidden = positive_int_list("model.hidden", hidden)
        latent_dim = positive_int("model.latent_dim", latent_dim)
        res_blocks = non_negative_int("model.res_blocks", res_blocks)
        self.set_kl_weight(kl_weight)
        n = int(math.prod(in_shape))
        enc = residual_mlp([n] + hidden, res_blocks) + [nn.Linear(hidden[-1], 2 * latent_dim)]
        dec = residual_mlp([latent_dim] + hidden[::-1], res_blocks) + [nn.Linear(hidden[0], n), nn.Sigmoid()]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def encode(self, x):
        return self.encoder(x.flatten(1))

    def decode(self, z):
        return self.decoder(z).view(-1, *self.in_shape)
