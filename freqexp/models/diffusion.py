"""Denoising diffusion models for anomaly detection (ddpm, diffusion_unet).

Training (DDPM, noise prediction): the target image x0 is scaled to [-1, 1], a step
t ~ U{0..T-1} and noise eps ~ N(0, I) are drawn from torch's global RNG, and the denoiser sees
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps and predicts eps. The configured loss compares
eps_hat with eps, i.e. it acts in noise space, so only per-element terms (mse, l1,
charbonnier) are allowed. The model learns the distribution of the *targets*: augmentations
that corrupt the input (noise, CutPaste) do not change what a denoising model learns.

Scoring (partial noising + deterministic DDIM, as in AnoDDPM/SDEdit): the input is noised to
step t_start = round(t_score * T) - 1 (t_score is a fraction of the schedule, so it keeps its
meaning when T changes) and denoised back to a clean image with `sampler_steps` DDIM (eta=0)
steps. The noise erases fine content; the model fills it in as a normal image would look, so
anomalous content is not restored and shows in the squared error. Cost per image:
`sampler_steps` denoiser passes (the first estimate already lands on a clean image; more steps
refine it).

Determinism: the scoring noise is one fixed field of shape [C, H, W] drawn from a CPU
torch.Generator seeded with `score_seed` and shared by every image. An image's score therefore
depends on the image only: not on the call, the batch it is in, its position in the batch, the
device, or the global RNG (which scoring leaves untouched). The trade-off: every image is probed
with the same noise realization rather than an independent one.

Numerics: the schedule is computed in float64 and stored in float32; noising, the DDIM update
and the time embedding run in float32 with autocast off. Only the denoiser network itself runs
under autocast during training.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from freqexp.checks import choice, number, positive_int, positive_int_list
from freqexp.errors import ConfigError
from freqexp.models.base import MODELS, ReconstructionModel

SCHEDULES = ("linear", "cosine")


def beta_schedule(kind: str, timesteps: int) -> torch.Tensor:
    """betas[t] for t = 0..T-1 in float64.

    linear: Ho et al.'s 1e-4 .. 0.02 for T=1000, rescaled by 1000/T so that any T covers the same
    total amount of noise. cosine: Nichol & Dhariwal, abar(t) = f(t+1)/f(0) with
    f(u) = cos^2((u/T + s)/(1 + s) * pi/2), s = 0.008, betas clipped at 0.999 (only the last
    step hits the clip, where abar is ~0 anyway)."""
    if kind == "linear":
        scale = 1000.0 / timesteps
        return torch.linspace(scale * 1e-4, min(scale * 0.02, 0.999), timesteps, dtype=torch.float64)
    s = 0.008
    u = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos((u / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)


class NoiseSchedule(nn.Module):
    """abar[t] = prod_{s<=t} (1 - beta_s); x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""

    def __init__(self, kind: str, timesteps: int):
        super().__init__()
        self.kind, self.timesteps = kind, timesteps
        betas = beta_schedule(kind, timesteps)
        # derived from the config, so not part of the state dict
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("abar", torch.cumprod(1 - betas, 0).float(), persistent=False)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t for a batch x0 [B,...] at steps t [B] (long) with noise eps, in fp32."""
        with torch.autocast(x0.device.type, enabled=False):
            abar = self.abar[t].view(-1, *([1] * (x0.dim() - 1)))
            return abar.sqrt() * x0.float() + (1 - abar).sqrt() * eps.float()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of (float) steps t [B] -> [B, dim], in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim - 2 * half))


class TimeEmbedding(nn.Module):
    """sinusoidal(t) -> MLP; each residual block adds its own projection of the result."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim), nn.SiLU())

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(t.device.type, enabled=False):
            emb = timestep_embedding(t, self.dim)
        return self.mlp(emb)


def group_norm(ch: int) -> nn.GroupNorm:
    # per-image normalization: scores never depend on the other images of a batch
    return nn.GroupNorm(math.gcd(8, ch), ch)


class ResBlock(nn.Module):
    """GN-SiLU-conv, + time projection, GN-SiLU-conv, + skip (1x1 conv when channels change)."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, dilation: int = 1):
        super().__init__()
        self.norm1, self.norm2 = group_norm(in_ch), group_norm(out_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=dilation, dilation=dilation)
        self.time_proj = nn.Linear(time_dim, out_ch)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    """Global self-attention over the pixels of a (low-resolution) feature map, in fp32."""

    def __init__(self, ch: int, heads: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.attn = nn.MultiheadAttention(ch, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        with torch.autocast(x.device.type, enabled=False):
            tokens = self.norm(x.float()).flatten(2).transpose(1, 2)
            out, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, h, w).to(x.dtype)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad the bottom/right edges so H and W are multiples of `multiple`."""
    pad_h, pad_w = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x


class DilatedConvDenoiser(nn.Module):
    """Residual conv stack at half resolution: pixel_unshuffle packs each 2x2 block of pixels
    into channels (lossless, so every pixel's noise stays visible) and pixel_shuffle unpacks the
    prediction. That costs a quarter of a full-resolution stack, and growing dilations widen the
    receptive field without further downsampling. Odd sizes are replicate-padded to even and
    cropped back."""

    def __init__(self, in_ch: int, channels: int, dilations: Sequence[int], time_dim: int):
        super().__init__()
        self.time = TimeEmbedding(time_dim)
        self.stem = nn.Conv2d(4 * in_ch, channels, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(channels, channels, time_dim, d) for d in dilations)
        self.head = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, 4 * in_ch, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        emb = self.time(t)
        h = self.stem(F.pixel_unshuffle(pad_to_multiple(x, 2), 2))
        for block in self.blocks:
            h = block(h, emb)
        return F.pixel_shuffle(self.head(h), 2)[..., :height, :width]


class UNetDenoiser(nn.Module):
    """U-Net over a space-to-depth stem (as in DilatedConvDenoiser, so level 0 runs at half
    resolution): one residual block per level on the way down and up, skip connections by
    concatenation, stride-2 conv down, stride-2 transposed conv up, optional self-attention in
    the middle (lowest resolution). Inputs are replicate-padded to a multiple of 2^levels and
    the output cropped back, so odd and non-square sizes work."""

    def __init__(self, in_ch: int, channels: Sequence[int], time_dim: int, attention: bool, heads: int):
        super().__init__()
        self.multiple = 2 ** len(channels)
        self.time = TimeEmbedding(time_dim)
        self.stem = nn.Conv2d(4 * in_ch, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        prev = channels[0]
        for ch in channels:
            self.down.append(ResBlock(prev, ch, time_dim))
            prev = ch
        self.downsample = nn.ModuleList(nn.Conv2d(ch, ch, 3, stride=2, padding=1) for ch in channels[:-1])
        low = channels[-1]
        self.mid1 = ResBlock(low, low, time_dim)
        self.mid_attn = SelfAttention2d(low, heads) if attention else None
        self.mid2 = ResBlock(low, low, time_dim)
        # up path, lowest level first: the block of level i takes [h, skip_i] and outputs channels[i]
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        prev = low
        for i in reversed(range(len(channels))):
            self.up.append(ResBlock(prev + channels[i], channels[i], time_dim))
            prev = channels[i]
            if i > 0:
                self.upsample.append(nn.ConvTranspose2d(prev, prev, 2, stride=2))
        self.head = nn.Sequential(group_norm(channels[0]), nn.SiLU(), nn.Conv2d(channels[0], 4 * in_ch, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        emb = self.time(t)
        h = self.stem(F.pixel_unshuffle(pad_to_multiple(x, self.multiple), 2))
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid1(h, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid2(h, emb)
        for j, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if j < len(self.upsample):
                h = self.upsample[j](h)
        return F.pixel_shuffle(self.head(h), 2)[..., :height, :width]


class DiffusionModel(ReconstructionModel):
    """The shared diffusion procedure; subclasses build `self.denoiser(x_t, t) -> eps_hat`."""

    filtered_target = False  # it learns the distribution of the targets themselves (noise prediction)
    loss_terms = ("mse", "l1", "charbonnier")
    loss_note = ("a diffusion model is trained to predict the Gaussian noise added to the image, so the loss "
                 "compares noise fields, where only per-element terms make sense (structural and frequency "
                 "terms assume images in [0,1])")

    def __init__(self, in_shape, timesteps: int, schedule: str, t_score: float, sampler_steps: int,
                 score_seed: int, clip_x0: bool):
        super().__init__()
        self.in_shape = tuple(in_shape)
        timesteps = positive_int("model.timesteps", timesteps)
        if timesteps < 2:
            raise ConfigError("model.timesteps", f"must be an integer >= 2; got {timesteps}")
        self.schedule = NoiseSchedule(choice("model.schedule", schedule, SCHEDULES), timesteps)
        self.t_score = number("model.t_score", t_score, 0.0, 1.0, low_open=True)
        self.sampler_steps = positive_int("model.sampler_steps", sampler_steps)
        if isinstance(score_seed, bool) or not isinstance(score_seed, int) or score_seed < 0:
            raise ConfigError("model.score_seed", f"must be an integer >= 0; got {score_seed!r}")
        self.score_seed = score_seed
        if not isinstance(clip_x0, bool):
            raise ConfigError("model.clip_x0", f"must be true or false; got {clip_x0!r}")
        self.clip_x0 = clip_x0

    # -- training: predict the noise
    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x_t, t.float()).float()

    def training_loss(self, x_in, target, loss_fn):
        with torch.autocast(target.device.type, enabled=False):
            x0 = target.float() * 2 - 1
            t = torch.randint(0, self.schedule.timesteps, (x0.shape[0],), device=x0.device)
            eps = torch.randn_like(x0)
            x_t = self.schedule.q_sample(x0, t, eps)
        return loss_fn(self.predict_noise(x_t, t), eps)

    # -- scoring: partial noising + DDIM back to a clean image
    @property
    def start_step(self) -> int:
        return min(self.schedule.timesteps, max(1, round(self.t_score * self.schedule.timesteps))) - 1

    def sampler_timesteps(self) -> list[int]:
        """The DDIM steps, descending from start_step to 0 (fewer when start_step is small);
        computed once per (start_step, sampler_steps), not on every scored batch."""
        key = (self.start_step, self.sampler_steps)
        if getattr(self, "_timesteps", (None,))[0] != key:
            evenly = torch.linspace(self.start_step, 0, self.sampler_steps, dtype=torch.float64).round().long()
            self._timesteps = (key, sorted(set(evenly.tolist()), reverse=True))
        return self._timesteps[1]

    def score_noise(self, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """The fixed noise field [1, C, H, W] of every scored image (see the module docstring),
        drawn on the CPU (the same field on every device) once per seed, shape and device."""
        key = (self.score_seed, tuple(shape), torch.device(device))
        if getattr(self, "_noise", (None,))[0] != key:
            gen = torch.Generator().manual_seed(self.score_seed)
            self._noise = (key, torch.randn((1, *shape), generator=gen).to(device))
        return self._noise[1]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x0 = x.float() * 2 - 1
            steps = self.sampler_timesteps()
            b = x0.shape[0]
            noise = self.score_noise(x0.shape[1:], x0.device).expand_as(x0)
            x_t = self.schedule.q_sample(x0, torch.full((b,), steps[0], device=x0.device, dtype=torch.long), noise)
            abar = self.schedule.abar
            for i, t in enumerate(steps):
                a = abar[t]
                a_prev = abar[steps[i + 1]] if i + 1 < len(steps) else torch.ones_like(a)
                eps = self.predict_noise(x_t, torch.full((b,), t, device=x0.device, dtype=torch.long))
                x0_hat = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
                if self.clip_x0:
                    # keep the estimate in the image range and the noise consistent with it
                    x0_hat = x0_hat.clamp(-1, 1)
                    eps = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()
                x_t = a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps
            return (x_t + 1) / 2

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"recon": self.reconstruct(x)}


@MODELS.register("ddpm")
class DDPM(DiffusionModel):
    """Simplified DDPM: a small full-resolution dilated conv denoiser."""

    def __init__(self, in_shape, channels: int = 32, dilations=(1, 2, 4, 8), time_dim: int = 64,
                 timesteps: int = 1000, schedule: str = "cosine", t_score: float = 0.3, sampler_steps: int = 5,
                 score_seed: int = 0, clip_x0: bool = True):
        super().__init__(in_shape, timesteps, schedule, t_score, sampler_steps, score_seed, clip_x0)
        channels = positive_int("model.channels", channels)
        dilations = positive_int_list("model.dilations", dilations)
        time_dim = positive_int("model.time_dim", time_dim)
        self.denoiser = DilatedConvDenoiser(self.in_shape[0], channels, dilations, time_dim)


@MODELS.register("diffusion_unet")
class DiffusionUNet(DiffusionModel):
    """DDPM with a U-Net denoiser: `channels` gives the width of each resolution level."""

    def __init__(self, in_shape, channels=(32, 64, 64), attention: bool = True, heads: int = 4, time_dim: int = 64,
                 timesteps: int = 1000, schedule: str = "cosine", t_score: float = 0.3, sampler_steps: int = 5,
                 score_seed: int = 0, clip_x0: bool = True):
        super().__init__(in_shape, timesteps, schedule, t_score, sampler_steps, score_seed, clip_x0)
        channels = positive_int_list("model.channels", channels)
        if len(channels) < 2:
            raise ConfigError("model.channels", f"a U-Net needs at least 2 resolution levels, e.g. [32,64,64]; got {channels}")
        h, w = self.in_shape[1:]
        need = 2 ** (len(channels) + 1)  # the stem halves, each further level halves; keep >= 2 pixels
        if min(h, w) < need:
            raise ConfigError("model.channels", f"{len(channels)} resolution levels need images of at least {need}x{need}; got {h}x{w}")
        if not isinstance(attention, bool):
            raise ConfigError("model.attention", f"must be true or false; got {attention!r}")
        heads = positive_int("model.heads", heads)
        if attention and channels[-1] % heads:
            raise ConfigError("model.heads", f"must divide the lowest level's width {channels[-1]}; got {heads}")
        time_dim = positive_int("model.time_dim", time_dim)
        self.denoiser = UNetDenoiser(self.in_shape[0], channels, time_dim, attention, heads)
