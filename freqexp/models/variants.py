"""Autoencoder variants that change how the model is trained or wired, not what it is made of:

  denoising_ae  cae trained to map corrupted inputs (Gaussian noise, optionally salt-and-pepper
                and pixel masking) back to the clean target. The corruption is added in
                training_loss only; reconstruct/anomaly_map see the clean input, so scores are
                deterministic. Denoising makes the model pull inputs towards the normal manifold
                instead of copying them, which also helps it "repair" anomalies.
  skip_ae       U-Net-like encoder-decoder (levels 0 = full resolution .. L-1 = coarsest) with a
                linear bottleneck and skip connections at chosen levels (add or concat), each
                optionally dropped per sample during training. Trade-off: skips bypass the
                bottleneck and make the identity easy to learn, so anomalies are reconstructed
                too and detection gets worse. Coarse-only skips carry layout but not fine detail;
                skip dropout forces the bottleneck path to work on its own.
  hybrid_cae    cae whose conv features are refined by multi-head self-attention before the
                bottleneck: conv encoder -> tokens (one per feature-map position, + learned
                position embedding) -> `attn_layers` pre-norm transformer layers (MHSA + 2x MLP)
                -> flatten -> linear latent -> linear -> conv decoder. Attention lets distant
                parts of the image inform each other's encoding at a cost of O(tokens^2).
  robust_ae     cae trained on adversarially perturbed inputs (FGSM for steps=1, PGD for
                steps>1) inside an L-inf ball of radius epsilon, each perturbation maximizing the
                configured loss against the clean target. The model learns to map a
                neighbourhood of each normal image to it (a smoother, contractive mapping), so
                small perturbations cannot make an anomaly look normal or vice versa.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from freqexp.checks import choice, non_negative_number, number, positive_int, positive_int_list
from freqexp.errors import ConfigError
from freqexp.models.autoencoders import (
    _ConvBottleneckAE, check_conv_depth, encoder_sizes, up_step,
)
from freqexp.models.base import MODELS, ReconstructionModel


def input_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample bounds a corrupted input is clamped to: [0, 1] for images, widened to the
    sample's own min/max when a filter on the input (high-pass) already left [0, 1]."""
    flat = x.detach().flatten(1)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return flat.min(1).values.clamp(max=0.0).view(shape), flat.max(1).values.clamp(min=1.0).view(shape)


# -- denoising

@MODELS.register("denoising_ae")
class DenoisingAE(_ConvBottleneckAE):
    """Corruptions, applied in this order, each on if its option is > 0:
    Gaussian noise of std `noise_std` (then clamped); salt-and-pepper: a `salt_pepper` fraction
    of pixels set to black or white (half each); masking: a `mask_prob` fraction of pixels set
    to 0. Impulse corruptions hit a pixel in all channels at once."""

    def __init__(self, in_shape, channels=(32, 64), latent_dim: int = 64, noise_std: float = 0.1,
                 salt_pepper: float = 0.0, mask_prob: float = 0.0):
        super().__init__(in_shape, channels, latent_dim)
        self.noise_std = non_negative_number("model.noise_std", noise_std)
        self.salt_pepper = number("model.salt_pepper", salt_pepper, 0.0, 1.0)
        self.mask_prob = number("model.mask_prob", mask_prob, 0.0, 1.0)
        if self.noise_std == 0 and self.salt_pepper == 0 and self.mask_prob == 0:
            raise ConfigError("model.noise_std", "noise_std, salt_pepper and mask_prob are all 0, so nothing is denoised; set one > 0 or use model=cae")

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = input_range(x)
        pixel_shape = (x.shape[0], 1, *x.shape[2:])
        noisy = x
        if self.noise_std > 0:
            noisy = torch.minimum(torch.maximum(noisy + self.noise_std * torch.randn_like(x), lo), hi)
        if self.salt_pepper > 0:
            u = torch.rand(pixel_shape, device=x.device)
            noisy = torch.where(u < self.salt_pepper / 2, lo.to(noisy.dtype), torch.where(u < self.salt_pepper, hi.to(noisy.dtype), noisy))
        if self.mask_prob > 0:
            noisy = noisy * (torch.rand(pixel_shape, device=x.device) >= self.mask_prob)
        return noisy

    def training_loss(self, x_in, target, loss_fn):
        return super().training_loss(self.corrupt(x_in), target, loss_fn)


# -- U-Net-like skips

class ConvStage(nn.Module):
    """Two 3x3 conv-BN-LeakyReLU layers, the first with the given stride."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1), nn.BatchNorm2d(out_ch), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.LeakyReLU(0.2, inplace=True),
        )

    def forward(self, x):
        return self.net(x)


def skip_level_list(value, levels: int) -> list[int]:
    """skip_levels as sorted non-negative level indices; negative ones count from the coarsest."""
    key = "model.skip_levels"
    allowed = f"a list of distinct level indices in [{-levels}, {levels - 1}] (0 = full resolution, -1 = coarsest; [] = no skips)"
    if isinstance(value, (str, int, float)) or value is None:
        raise ConfigError(key, f"must be {allowed}; got {value!r}")
    out = []
    for v in list(value):
        if isinstance(v, bool) or not isinstance(v, int) or not -levels <= v < levels:
            raise ConfigError(key, f"must be {allowed}; got {list(value)!r}")
        out.append(v % levels)
    if len(set(out)) != len(out):
        raise ConfigError(key, f"must be {allowed}; {list(value)!r} names a level twice")
    return sorted(out)


@MODELS.register("skip_ae")
class SkipAE(ReconstructionModel):
    """Encoder level i has channels[i] features at size ceil(H / 2^i) (level 0: full resolution).
    The coarsest level goes through a linear bottleneck of `latent_dim`; the decoder climbs back
    level by level, merging the encoder's features at the levels in `skip_levels`:
    add (y + skip) or concat (1x1 conv over [y, skip]). During training each skip is dropped
    (zeroed) for a whole sample with probability `skip_dropout`, without rescaling, so at test
    time (skips always on) the decoder sees a case it was trained on."""

    def __init__(self, in_shape, channels=(16, 32, 64), latent_dim: int = 64, skip_type: str = "add",
                 skip_levels=(-1,), skip_dropout: float = 0.25):
        super().__init__()
        c, h, w = in_shape
        channels = positive_int_list("model.channels", channels)
        latent_dim = positive_int("model.latent_dim", latent_dim)
        self.skip_type = choice("model.skip_type", skip_type, ("add", "concat"))
        self.skip_levels = skip_level_list(skip_levels, len(channels))
        self.skip_dropout = number("model.skip_dropout", skip_dropout, 0.0, None)
        if self.skip_dropout >= 1:
            raise ConfigError("model.skip_dropout", f"must be a number >= 0 and < 1; got {skip_dropout!r}")
        depth = len(channels) - 1  # stride-2 steps; level 0 keeps the full resolution
        check_conv_depth(h, w, depth)
        self.heights, self.widths = encoder_sizes(h, depth), encoder_sizes(w, depth)
        self.feat_shape = (channels[-1], self.heights[-1], self.widths[-1])
        feat = channels[-1] * self.heights[-1] * self.widths[-1]

        self.down = nn.ModuleList(ConvStage(channels[i - 1] if i else c, ch, stride=2 if i else 1) for i, ch in enumerate(channels))
        self.to_latent = nn.Linear(feat, latent_dim)
        self.from_latent = nn.Sequential(nn.Linear(latent_dim, feat), nn.LeakyReLU(0.2, inplace=True))
        self.merge = nn.ModuleDict({
            str(i): nn.Conv2d(2 * channels[i], channels[i], 1) for i in self.skip_levels if self.skip_type == "concat"
        })
        self.refine = nn.ModuleList(ConvStage(ch, ch) for ch in channels)
        self.up = nn.ModuleList(
            nn.Sequential(up_step(channels[i], channels[i - 1], (self.heights[i], self.widths[i]), (self.heights[i - 1], self.widths[i - 1])),
                          nn.BatchNorm2d(channels[i - 1]), nn.LeakyReLU(0.2, inplace=True))
            for i in range(1, len(channels))
        )
        self.out = nn.Sequential(nn.Conv2d(channels[0], c, 3, padding=1), nn.Sigmoid())

    def _skip(self, level: int, y: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.training and self.skip_dropout > 0:
            keep = torch.rand(skip.shape[0], 1, 1, 1, device=skip.device) >= self.skip_dropout
            skip = skip * keep
        if self.skip_type == "add":
            return y + skip
        return self.merge[str(level)](torch.cat([y, skip], dim=1))

    def forward(self, x) -> Dict[str, torch.Tensor]:
        features = []
        for stage in self.down:
            x = stage(x)
            features.append(x)
        z = self.to_latent(x.flatten(1))
        y = self.from_latent(z).view(-1, *self.feat_shape)
        for level in reversed(range(len(features))):
            if level in self.skip_levels:
                y = self._skip(level, y, features[level])
            y = self.refine[level](y)
            if level > 0:
                y = self.up[level - 1](y)
        return {"recon": self.out(y), "z": z}


# -- conv + self-attention

class SelfAttentionLayer(nn.Module):
    """Pre-norm transformer encoder layer: t + MHSA(LN(t)), then t + MLP(LN(t)) (MLP 2x wide).
    The attention weights are computed in fp32: softmax over many tokens in half precision
    loses the small weights."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        q, k, v = self.qkv(self.norm1(t)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        with torch.autocast(t.device.type, enabled=False):
            mixed = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        t = t + self.proj(mixed.transpose(1, 2).reshape(b, n, d))
        return t + self.mlp(self.norm2(t))


@MODELS.register("hybrid_cae")
class HybridCAE(_ConvBottleneckAE):
    """conv encoder (channels, stride 2 each) -> one token per position of the last feature map
    (dim channels[-1], + learned position embedding) -> attn_layers x [MHSA with `heads` heads,
    MLP] -> LayerNorm -> flatten -> linear latent -> linear -> conv decoder (as cae)."""

    def __init__(self, in_shape, channels=(32, 64), latent_dim: int = 64, heads: int = 4, attn_layers: int = 1):
        super().__init__(in_shape, channels, latent_dim)
        heads = positive_int("model.heads", heads)
        attn_layers = positive_int("model.attn_layers", attn_layers)
        dim, fh, fw = self.feat_shape
        if dim % heads:
            raise ConfigError("model.heads", f"must divide the token width channels[-1]={dim}; got {heads}")
        self.position = nn.Parameter(torch.randn(1, fh * fw, dim) * 0.02)
        self.attention = nn.Sequential(*(SelfAttentionLayer(dim, heads) for _ in range(attn_layers)), nn.LayerNorm(dim))

    def encode(self, x):
        tokens = self.encoder(x).flatten(2).transpose(1, 2) + self.position  # [B, h*w, C]
        return self.to_latent(self.attention(tokens).flatten(1))


# -- adversarial training

@contextmanager
def buffers_kept(module: nn.Module):
    """Restores every buffer (BatchNorm running statistics) on exit: the attack's forward passes
    must not move the statistics the model is evaluated with."""
    saved = [b.detach().clone() for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, old in zip(module.buffers(), saved):
                buf.copy_(old)


@MODELS.register("robust_ae")
class RobustAE(_ConvBottleneckAE):
    """Attack: start at the input (or a uniform random point of the epsilon ball with
    random_start), take `steps` signed-gradient ascent steps on the configured loss against the
    clean target (step size epsilon for FGSM, steps=1; alpha for PGD, steps>1), projecting onto
    the L-inf ball and the valid pixel range after each. Gradients are taken w.r.t. the input
    only (torch.autograd.grad), so no .grad lands on the weights. Training loss:
    (1 - clean_weight) * loss(adversarial) + clean_weight * loss(clean), the latter logged as
    `clean`."""

    def __init__(self, in_shape, channels=(32, 64), latent_dim: int = 64, epsilon: float = 0.03, alpha: float = 0.01,
                 steps: int = 1, random_start: bool = False, clean_weight: float = 0.0):
        super().__init__(in_shape, channels, latent_dim)
        self.epsilon = number("model.epsilon", epsilon, 0.0, 1.0, low_open=True)
        self.alpha = number("model.alpha", alpha, 0.0, 1.0, low_open=True)
        self.steps = positive_int("model.steps", steps)
        if not isinstance(random_start, bool):
            raise ConfigError("model.random_start", f"must be true or false; got {random_start!r}")
        self.random_start = random_start
        self.clean_weight = number("model.clean_weight", clean_weight, 0.0, 1.0)
        if self.clean_weight == 1.0:
            raise ConfigError("model.clean_weight", "must be < 1 (1 trains on clean inputs only: use model=cae)")

    def adversarial_input(self, x: torch.Tensor, target: torch.Tensor, loss_fn) -> torch.Tensor:
        x = x.detach()
        lo, hi = input_range(x)
        lo, hi = torch.maximum(x - self.epsilon, lo), torch.minimum(x + self.epsilon, hi)
        step = self.epsilon if self.steps == 1 else self.alpha
        x_adv = x
        if self.random_start:
            x_adv = torch.minimum(torch.maximum(x + torch.empty_like(x).uniform_(-self.epsilon, self.epsilon), lo), hi)
        with buffers_kept(self), torch.enable_grad():
            for _ in range(self.steps):
                x_adv = x_adv.detach().requires_grad_(True)
                loss, _ = loss_fn(self(x_adv)["recon"], target)
                # Only the sign is used: scaling the mean loss to a sum keeps fp16 gradients
                # from underflowing to 0 under 16-mixed autocast.
                (grad,) = torch.autograd.grad(loss * x.numel(), x_adv)
                x_adv = x_adv.detach() + step * torch.nan_to_num(grad.float()).sign()
                x_adv = torch.minimum(torch.maximum(x_adv, lo), hi)
        return x_adv.detach()

    def training_loss(self, x_in, target, loss_fn):
        adversarial = self.adversarial_input(x_in, target, loss_fn)
        total, parts = super().training_loss(adversarial, target, loss_fn)
        if self.clean_weight > 0:
            clean, _ = super().training_loss(x_in, target, loss_fn)
            total = (1 - self.clean_weight) * total + self.clean_weight * clean
            parts = {**parts, "clean": clean}
        return total, parts
