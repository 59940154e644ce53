"""GANomaly (Akcay, Atapour-Abarghouei and Breckon, ACCV 2018): an adversarially trained
encoder-decoder-encoder.

Generator: encoder1 maps x to a latent z, a decoder maps z to x_hat, encoder2 maps x_hat back
to z_hat. As in the reference (samet-akcay/ganomaly, lib/networks.py), each encoder ends in a
convolution to `latent_dim` (nz) channels whose kernel covers the whole last feature map (4x4 at
28 and 32 px, the reference's final 4x4 conv), so z is [B, nz, 1, 1] flattened to [B, nz]; the
decoder starts with the transposed convolution back (+ BatchNorm + ReLU), and the discriminator
is the same conv stack with a final full-map conv to one logit, its features the last map
before that conv. The generator minimises
    w_adv * ||f(x) - f(x_hat)||^2   feature matching on the discriminator's penultimate features
  + w_con * loss(x_hat, x)          "contextual": the configured loss (mse, l1, mse+ssim, ...)
  + w_lat * ||z - z_hat||^2         latent consistency
(defaults 1, 50, 1 as in the paper); the discriminator minimises the usual BCE. When the
discriminator's loss collapses (< disc_reset_threshold, 1e-5 in the paper's code) it is
re-initialized, since a saturated discriminator gives the generator no useful features.

Score: the latent distance mean((z - z_hat)^2), one number per image; `anomaly_map` broadcasts
it to [B,1,H,W], so the map is constant per image and pixel metrics (test/pixel_auroc) mean
nothing for this model. The reconstruction x_hat is only used for the figures.

Score scale. anomalib min-max normalizes GANomaly scores within each batch, which makes an
image's score depend on which other images share its batch. Here the scale is fixed once:
after fitting, GanomalyModule.calibrate scores the whole validation split and stores the raw
minimum and maximum in model buffers (so they are saved in model.pt); scores are then
(raw - min) / (max - min), in [0, 1] on validation (test images may fall outside). Before
calibration the buffers are (0, 1), i.e. scores are raw. Scoring always runs with BatchNorm in
eval mode (running statistics), so a score never depends on its batch companions.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Dict, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from freqexp.checks import number, positive_int, positive_int_list
from freqexp.errors import ConfigError
from freqexp.models.autoencoders import ConvDecoder, ConvEncoder, encoder_sizes
from freqexp.training import NAN_CHECK_EVERY, ReconstructionModule
from freqexp.models.base import MODELS, ReconstructionModel


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run `module` with every submodule in eval mode (BatchNorm on running statistics),
    restoring each submodule's own mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, was_training in modes:
            m.training = was_training


def check_stages(in_shape, channels, key: str = "model.channels") -> tuple[list[int], list[int]]:
    """Spatial sizes after each stride-2 stage; every stage needs at least 2 pixels to halve."""
    _, h, w = in_shape
    if min(h, w) < 2 ** len(channels):
        raise ConfigError(key, f"{len(channels)} stride-2 stages need images of at least {2 ** len(channels)} px a side; got {h}x{w}")
    return encoder_sizes(h, len(channels)), encoder_sizes(w, len(channels))


def dcgan_init(module: nn.Module) -> None:
    """The DCGAN initialization the GANomaly paper uses: conv weights N(0, 0.02), BatchNorm
    scales N(1, 0.02); conv biases 0; linear layers keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
            m.reset_running_stats()
        elif isinstance(m, nn.Linear):
            m.reset_parameters()


class LatentEncoder(nn.Module):
    """Stride-2 conv stack, then a convolution to `latent_dim` channels over the whole last
    feature map (the reference's final conv to nz): z = [B, latent_dim]."""

    def __init__(self, in_ch: int, channels: list[int], feat_hw: tuple[int, int], latent_dim: int):
        super().__init__()
        self.conv = ConvEncoder(in_ch, channels)
        self.to_latent = nn.Conv2d(channels[-1], latent_dim, kernel_size=feat_hw, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_latent(self.conv(x)).flatten(1)


class LatentDecoder(nn.Module):
    """z [B, latent_dim] as a 1x1 map, a transposed convolution to the last feature map's size
    (+ BatchNorm + ReLU, as the reference's first decoder layer), then the mirrored conv stack."""

    def __init__(self, out_ch: int, channels: list[int], heights: list[int], widths: list[int], latent_dim: int):
        super().__init__()
        self.from_latent = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, channels[-1], kernel_size=(heights[-1], widths[-1]), bias=False),
            nn.BatchNorm2d(channels[-1]), nn.ReLU(inplace=True))
        self.conv = ConvDecoder(out_ch, channels, heights, widths)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv(self.from_latent(z.view(z.shape[0], -1, 1, 1)))


class Discriminator(nn.Module):
    """Conv classifier; forward returns (real/fake logit [B], features [B, F]: the last conv map,
    flattened). The logit comes from a convolution over the whole last map, as the reference's."""

    def __init__(self, in_ch: int, channels: list[int], feat_hw: tuple[int, int]):
        super().__init__()
        self.features = ConvEncoder(in_ch, channels)
        self.head = nn.Conv2d(channels[-1], 1, kernel_size=feat_hw, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.head(f).flatten(), f.flatten(1)


@MODELS.register("ganomaly")
class Ganomaly(ReconstructionModel):
    lightning_module = "freqexp.models.ganomaly:GanomalyModule"
    residual_score = False  # scored by latent distance
    filtered_target = False  # its discriminator compares the targets with the reconstructions

    def __init__(self, in_shape, channels=(32, 64, 128), latent_dim: int = 100, w_adv: float = 1.0, w_con: float = 50.0,
                 w_lat: float = 1.0, disc_reset_threshold: float = 1e-5):
        super().__init__()
        c = in_shape[0]
        channels = positive_int_list("model.channels", channels)
        latent_dim = positive_int("model.latent_dim", latent_dim)
        self.w_adv = number("model.w_adv", w_adv, 0.0)
        self.w_con = number("model.w_con", w_con, 0.0)
        self.w_lat = number("model.w_lat", w_lat, 0.0)
        self.disc_reset_threshold = number("model.disc_reset_threshold", disc_reset_threshold, 0.0)
        hs, ws = check_stages(in_shape, channels)
        feat_hw = (hs[-1], ws[-1])
        self.encoder1 = LatentEncoder(c, channels, feat_hw, latent_dim)
        self.decoder = LatentDecoder(c, channels, hs, ws, latent_dim)
        self.encoder2 = LatentEncoder(c, channels, feat_hw, latent_dim)
        self.discriminator = Discriminator(c, channels, feat_hw)
        dcgan_init(self)
        # the validation score range (see module docstring); (0, 1) = raw scores until calibrated
        self.register_buffer("score_min", torch.tensor(0.0))
        self.register_buffer("score_max", torch.tensor(1.0))

    def generator_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("discriminator.")]

    @torch.no_grad()
    def reset_discriminator_where(self, collapsed: torch.Tensor, fresh: nn.Module) -> None:
        """The discriminator's weights and BatchNorm statistics become `fresh`'s (a copy of the
        discriminator re-drawn by dcgan_init) where `collapsed` (a 0-d bool on the device) is true,
        and stay as they are where it is false, without reading `collapsed` on the host: a
        selection in place (torch.where into the tensor itself), exact for any value: inf, NaN and -0.0
        included."""
        own = [*self.discriminator.parameters(), *self.discriminator.buffers()]
        new = [*fresh.parameters(), *fresh.buffers()]
        for a, b in zip(own, new):
            torch.where(collapsed, b, a, out=a)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        z = self.encoder1(x)
        x_hat = self.decoder(z)
        return {"recon": x_hat, "z": z, "z_hat": self.encoder2(x_hat)}

    def raw_score(self, x: torch.Tensor) -> torch.Tensor:
        """Uncalibrated latent distance mean((z - z_hat)^2) per image [B], in fp32, BatchNorm in eval."""
        with eval_mode(self), torch.autocast(x.device.type, enabled=False):
            out = self(x.float())
            return (out["z"].float() - out["z_hat"].float()).pow(2).mean(1)

    def set_score_range(self, low: float, high: float) -> None:
        self.score_min.fill_(low)
        self.score_max.fill_(high)

    def anomaly_map(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        span = (self.score_max - self.score_min).clamp_min(1e-12)
        score = (self.raw_score(x) - self.score_min) / span
        return score.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:]).contiguous()


def feature_matching(fake_features: torch.Tensor, real_features: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(fake_features.float(), real_features.float())


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    with torch.autocast(real_logits.device.type, enabled=False):
        real, fake = real_logits.float(), fake_logits.float()
        return 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                      + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))


class GanomalyModule(ReconstructionModule):
    """alternating generator / discriminator
    updates with two optimizers (manual optimization); the discriminator's "real" images are the
    loss targets (the clean images when an augment or a filter changes the generator's input)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.placement == "score":
            raise ConfigError("filter.apply_to", "model=ganomaly scores by latent distance, not by a residual, so a filter at "
                                                 "apply_to=score would have no effect; use input or both")
        self.automatic_optimization = False
        # The paper's code re-initializes the discriminator when its loss drops below the threshold,
        # an `if` on the loss that would make every step wait for the device. Here each step selects
        # a fresh draw (_fresh_disc, kept beside the model, not in its state) where the loss,
        # on the device, is below it, and counts the resets on the device (_resets). The fresh draw
        # is renewed after a reset, read at the NaN guard's cadence (every NAN_CHECK_EVERY steps and
        # at each epoch's end, where the host reads the device anyway).
        self._fresh_disc: list[nn.Module] = []  # a list: not registered as a submodule
        self._resets: torch.Tensor | None = None
        self._resets_seen = 0
        self._steps_since_reset_check = 0

    @property
    def disc_resets(self) -> int:
        """How often the discriminator collapsed and was re-initialized (reads the device)."""
        return 0 if self._resets is None else int(self._resets)

    def _fresh_discriminator(self) -> nn.Module:
        if not self._fresh_disc:
            fresh = copy.deepcopy(self.model.discriminator)
            fresh.requires_grad_(False)
            self._fresh_disc.append(fresh)
            self._resets = torch.zeros((), dtype=torch.long, device=self.model.score_min.device)
            # the draws' own seeds, from the run's seed: drawing never moves the global random streams
            # (augments, noise), so a run draws what it drew before, resets or not
            self._draw_seeds = torch.Generator().manual_seed(torch.initial_seed() + 0x5EED)
            self._draw_fresh()
        return self._fresh_disc[0]

    def _draw_fresh(self) -> None:
        """A new DCGAN draw into the fresh copy, from its own seed, leaving the global generators as they were."""
        fresh = self._fresh_disc[0]
        device = next(fresh.parameters()).device
        seed = int(torch.randint(0, 2**62, (1,), generator=self._draw_seeds))
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(cuda[0]):
                    torch.cuda.manual_seed(seed)
            dcgan_init(fresh)

    def check_resets(self) -> None:
        """Renew the fresh draw once it has been used, so that every reset starts from a draw of its own."""
        self._steps_since_reset_check = 0
        resets = self.disc_resets  # one read of the device
        if resets != self._resets_seen:
            self._resets_seen = resets
            self._draw_fresh()

    def configure_optimizers(self):
        opt_g = self.make_optimizer(self.model.generator_parameters())
        opt_d = self.make_optimizer(list(self.model.discriminator.parameters()))
        schedulers = [s for s in (self.make_scheduler(opt_g), self.make_scheduler(opt_d)) if s is not None]
        return [opt_g, opt_d], schedulers

    def generator_losses(self, out: Dict[str, torch.Tensor], target: torch.Tensor):
        """({adv, con, lat}, the contextual loss's own terms) for a generator output: the weighted
        w_adv * mean((f(x_hat) - f(x))^2) on the discriminator's features, w_con * the configured
        (contextual) loss between x_hat and x, and w_lat * mean((z - z_hat)^2)."""
        model = self.model
        with torch.no_grad():
            _, real_features = model.discriminator(target)
        _, fake_features = model.discriminator(out["recon"])
        adv = model.w_adv * feature_matching(fake_features, real_features)
        con_total, con_parts = self.loss(out["recon"], target)
        with torch.autocast(target.device.type, enabled=False):
            lat = model.w_lat * F.mse_loss(out["z"].float(), out["z_hat"].float())
        return {"adv": adv, "con": model.w_con * con_total, "lat": lat}, con_parts

    def training_step(self, x: torch.Tensor, batch_idx: int):
        model, bs = self.model, x.shape[0]
        opt_g, opt_d = self.optimizers()
        x_in, target = self.model_io(x, train=True)

        # generator: the discriminator's weights are frozen (toggle), gradients still flow through it
        self.toggle_optimizer(opt_g)
        out = model(x_in)
        x_hat = out["recon"]
        terms, con_parts = self.generator_losses(out, target)
        g_loss = terms["adv"] + terms["con"] + terms["lat"]
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        # discriminator: real targets vs the (detached) reconstructions
        self.toggle_optimizer(opt_d)
        real_logits, _ = model.discriminator(target)
        fake_logits, _ = model.discriminator(x_hat.detach())
        d_loss = discriminator_loss(real_logits, fake_logits)
        # the epoch's sums (train/loss = the generator's; train/loss_disc beside its terms), which
        # the NaN guard reads every NAN_CHECK_EVERY steps: a NaN in either network's loss stops the run
        self.check_and_log(g_loss, {**con_parts, **terms, "disc": d_loss}, bs)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        self.untoggle_optimizer(opt_d)

        # the paper's code: after the discriminator's step, re-initialize it if its loss (before the step) < 1e-5
        collapsed = d_loss.detach() < model.disc_reset_threshold
        model.reset_discriminator_where(collapsed, self._fresh_discriminator())
        self._resets.add_(collapsed)
        self._steps_since_reset_check += 1
        if self._steps_since_reset_check >= NAN_CHECK_EVERY:
            self.check_resets()
        return g_loss.detach()

    def log_epoch_losses(self) -> None:
        """The epoch's losses (the base class), and how often the discriminator has collapsed so far
        (train/disc_resets, read with the NaN guard's epoch-end check: a curve in MLflow)."""
        self.check_resets()
        super().log_epoch_losses()
        self.log("train/disc_resets", float(self._resets_seen), on_step=False, on_epoch=True, batch_size=1)

    def on_train_epoch_end(self):
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            scheduler.step()

    @torch.no_grad()
    def calibrate(self, val_images: torch.Tensor, batch_size: int) -> None:
        """Fix the score scale on the whole validation split (raw min and max into model buffers)."""
        raw = []
        with eval_mode(self):
            for start in range(0, len(val_images), batch_size):
                x = self.as_input(val_images[start : start + batch_size].to(self.device))
                x_in, _ = self.model_io(x, train=False)
                raw.append(self.model.raw_score(x_in))
        raw = torch.cat(raw)
        self.model.set_score_range(float(raw.min()), float(raw.max()))
