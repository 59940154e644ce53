"""Autoencoders of the study: fully connected (ae), convolutional (cae), convolutional
variational (cvae). Each squeezes the image through a small latent vector, so it cannot
learn the identity and reconstructs unseen (anomalous) content poorly."""
from __future__ import annotations

import math
from typing import Dict

import torch
from torch import nn

from freqexp.errors import ConfigError
from freqexp.models.base import MODELS, ReconstructionModel, positive_int, positive_int_list


def encoder_sizes(size: int, depth: int) -> list[int]:
    """Spatial sizes after each stride-2 conv (kernel 3, padding 1): ceil(s/2) each step."""
    sizes = [size]
    for _ in range(depth):
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


class ConvEncoder(nn.Module):
    def __init__(self, in_ch: int, channels: list[int]):
        super().__init__()
        layers, prev = [], in_ch
        for ch in channels:
            layers += [nn.Conv2d(prev, ch, 3, stride=2, padding=1), nn.BatchNorm2d(ch), nn.LeakyReLU(0.2, inplace=True)]
            prev = ch
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class ConvDecoder(nn.Module):
    """Mirror of ConvEncoder; output_padding is chosen per layer so odd sizes (e.g. 7 -> 14 -> 28,
    or 31) come back exactly."""

    def __init__(self, out_ch: int, channels: list[int], heights: list[int], widths: list[int]):
        super().__init__()
        layers = []
        rev = list(reversed(channels))
        for i, ch in enumerate(rev):
            nxt = rev[i + 1] if i + 1 < len(rev) else rev[-1]
            th, tw = heights[-2 - i], widths[-2 - i]  # target size of this up-step
            op = (th - 2 * heights[-1 - i] + 1, tw - 2 * widths[-1 - i] + 1)
            layers += [
                nn.ConvTranspose2d(ch, nxt, 3, stride=2, padding=1, output_padding=op),
                nn.BatchNorm2d(nxt),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers += [nn.Conv2d(rev[-1], out_ch, 3, padding=1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class _ConvBottleneckAE(ReconstructionModel):
    """Conv encoder -> linear bottleneck of `latent_dim` -> conv decoder."""

    latent_multiplier = 1  # cvae: 2 (mean and log-variance)

    def __init__(self, in_shape, channels=(32, 64), latent_dim: int = 64):
        super().__init__()
        c, h, w = in_shape
        channels = positive_int_list("model.channels", channels)
        latent_dim = positive_int("model.latent_dim", latent_dim)
        hs, ws = encoder_sizes(h, len(channels)), encoder_sizes(w, len(channels))
        if hs[-1] < 1 or ws[-1] < 1 or min(h, w) < 2 ** len(channels) // 2:
            raise ConfigError("model.channels", f"{len(channels)} stride-2 stages are too many for {h}x{w} images")
        self.feat_shape = (channels[-1], hs[-1], ws[-1])
        feat = channels[-1] * hs[-1] * ws[-1]
        self.encoder = ConvEncoder(c, channels)
        self.to_latent = nn.Linear(feat, latent_dim * self.latent_multiplier)
        self.from_latent = nn.Sequential(nn.Linear(latent_dim, feat), nn.LeakyReLU(0.2, inplace=True))
        self.decoder = ConvDecoder(c, channels, hs, ws)
        self.latent_dim = latent_dim

    def encode(self, x):
        return self.to_latent(self.encoder(x).flatten(1))

    def decode(self, z):
        return self.decoder(self.from_latent(z).view(-1, *self.feat_shape))


@MODELS.register("cae")
class CAE(_ConvBottleneckAE):
    def forward(self, x) -> Dict[str, torch.Tensor]:
        z = self.encode(x)
        return {"recon": self.decode(z), "z": z}


@MODELS.register("cvae")
class CVAE(_ConvBottleneckAE):
    """beta-VAE: adds kl_weight * KL(q(z|x) || N(0, I)) to the loss; scores with the mean."""

    latent_multiplier = 2

    def __init__(self, in_shape, channels=(32, 64), latent_dim: int = 32, kl_weight: float = 1e-3):
        super().__init__(in_shape, channels, latent_dim)
        if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)) or kl_weight < 0:
            raise ConfigError("model.kl_weight", f"must be a number >= 0; got {kl_weight!r}")
        self.kl_weight = float(kl_weight)

    def forward(self, x):
        mu, logvar = self.encode(x).chunk(2, dim=1)
        logvar = logvar.clamp(-10, 10)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return {"recon": self.decode(z), "mu": mu, "logvar": logvar}

    def extra_losses(self, out):
        mu, logvar = out["mu"].float(), out["logvar"].float()
        kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))
        return {"kl": self.kl_weight * kl}


@MODELS.register("ae")
class AE(ReconstructionModel):
    """Fully connected: flatten -> hidden layers -> latent -> mirrored layers -> image."""

    def __init__(self, in_shape, hidden=(512, 128), latent_dim: int = 32):
        super().__init__()
        self.in_shape = tuple(in_shape)
        n = int(math.prod(in_shape))
        hidden = positive_int_list("model.hidden", hidden)
        latent_dim = positive_int("model.latent_dim", latent_dim)
        dims = [n] + hidden + [latent_dim]
        enc, dec = [], []
        for a, b in zip(dims[:-1], dims[1:]):
            enc += [nn.Linear(a, b), nn.LeakyReLU(0.2, inplace=True)]
        enc.pop()  # linear latent
        rdims = list(reversed(dims))
        for a, b in zip(rdims[:-1], rdims[1:]):
            dec += [nn.Linear(a, b), nn.LeakyReLU(0.2, inplace=True)]
        dec[-1] = nn.Sigmoid()
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def forward(self, x):
        z = self.encoder(x.flatten(1))
        return {"recon": self.decoder(z).view(-1, *self.in_shape), "z": z}
