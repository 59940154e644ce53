"""DRAEM (Zavrtanik, Kristan and Skocaj, ICCV 2021): a discriminatively trained reconstruction
embedding for surface anomaly detection.

Two sub-networks are trained together on pseudo-anomalies:
  reconstructive   a fully convolutional encoder-decoder that learns to turn an image with a
                   synthesized defect back into the clean image (configured loss; the recipe's
                   mse+ssim uses DRAEM's SSIM: 11 px window, zero padding);
  discriminative   a small U-Net that sees concat(input, reconstruction) and predicts, per
                   pixel, 2-class logits (normal / anomalous); trained with a focal loss against
                   the pseudo-anomaly mask, with DRAEM's label smoothing (focal_smoothing).
The pseudo-anomalies come from the configured augment's `synthesize` (`perlin`, DRAEM's Perlin
masks filled with textures, by default; or the CutPaste family), applied to a fraction
`anomaly_p` of each batch; the rest stays clean with an empty mask, so the segmenter also learns
that clean images have no anomaly. The augment's own `p` is not used. Before that, a fraction
`rotate_p` of the training images is rotated by up to `rotate_degrees` (DRAEM's loader: 30 %,
+-90 degrees, the target rotated too). The defect is synthesized on the clean image and then
passed through the input filter (if any), exactly as a real defect reaches the model at test
time; the reconstruction target stays clean. `init: draem` draws conv weights from N(0, 0.02) and
BatchNorm scales from N(1, 0.02) (the official weights_init); `pytorch` keeps PyTorch's defaults.

Anomaly map: the softmax probability of the anomalous class on the (clean, test) input and its
reconstruction (the map DRAEM's pixel metrics use; `smooth` optionally mean-filters it).
Image score (score.reduction=auto), as DRAEM's test script: the map mean-pooled by a
`score_pool` x `score_pool` window (stride 1, zero padding counted in the mean: avg_pool2d's
default), then its maximum. DRAEM uses 21 px on 256 px images; `score_pool: auto` keeps that
proportion at the image size at hand (21 at 256 px, 3 at 28 px).

Trade-off: the segmenter learns what the pseudo-anomalies look like. Real defects unlike them
(blur, missing texture) are found only through the reconstruction difference the segmenter has
learned to read, so the augment choice matters more than for plain autoencoders.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from freqexp.augment.base import synthesize_share
from freqexp.augment.geometric import random_rotation
from freqexp.checks import choice, number, positive_int_list
from freqexp.errors import ConfigError
from freqexp.models.autoencoders import ConvDecoder, ConvEncoder
from freqexp.training import ReconstructionModule
from freqexp.models.base import MODELS, ReconstructionModel
from freqexp.models.ganomaly import check_stages, eval_mode


def focal_loss(logits: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0, smoothing: float = 0.0) -> torch.Tensor:
    """Mean over pixels of -(1 - p_t)^gamma * log p_t (Lin et al. 2017); logits [B,K,H,W], mask
    [B,1,H,W] (True = anomalous). Without smoothing p_t is the softmax probability of the true
    class (gamma = 0: the plain cross-entropy). With smoothing s, as DRAEM's FocalLoss: the one-hot
    target is clipped to [s / (K - 1), 1 - s] and p_t = sum_k target_k * p_k + s. fp32:
    log-probabilities of confident pixels underflow in half precision."""
    with torch.autocast(logits.device.type, enabled=False):
        logits = logits.float()
        index = mask.long().view(mask.shape[0], 1, *mask.shape[-2:])
        if smoothing > 0:
            k = logits.shape[1]
            p = logits.softmax(dim=1)
            p_true = p.gather(1, index).squeeze(1)
            p_t = (1 - smoothing) * p_true + smoothing / (k - 1) * (1 - p_true) + smoothing
            log_p_true = p_t.log()
        else:
            log_p_true = F.log_softmax(logits, dim=1).gather(1, index).squeeze(1)
            p_t = log_p_true.exp()
        # clamp: d/dp (1-p)^gamma is infinite at p = 1 when gamma < 1
        weight = (1 - p_t).clamp_min(1e-12).pow(gamma)
        return -(weight * log_p_true).mean()


def draem_init(module: nn.Module) -> None:
    """DRAEM's weights_init: every conv weight from N(0, 0.02), BatchNorm scales from N(1, 0.02)
    and shifts 0; conv biases keep PyTorch's default (the official code leaves them)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


INITS = ("draem", "pytorch")


def conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
    )


class SegmentationUNet(nn.Module):
    """U-Net: a conv block per scale, stride-2 convs down, bilinear upsampling to the skip's exact
    size (so odd sizes work) then concat + conv block up; a 1x1 conv gives per-pixel logits."""

    def __init__(self, in_ch: int, channels: list[int], n_classes: int = 2):
        super().__init__()
        self.stem = conv_block(in_ch, channels[0])
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True), conv_block(b, b))
            for a, b in zip(channels[:-1], channels[1:])
        )
        self.up = nn.ModuleList(conv_block(b + a, a) for a, b in zip(channels[:-1], channels[1:]))
        self.head = nn.Conv2d(channels[0], n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in reversed(self.up):
            skip = skips.pop()
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = up(torch.cat([skip, y], dim=1))
        return self.head(y)


@MODELS.register("draem")
class Draem(ReconstructionModel):
    lightning_module = "freqexp.models.draem:DraemModule"
    residual_score = False  # scored by the segmentation network
    published_score = "max"  # of the pooled map: see image_scores
    needs_pseudo_anomalies = True

    def __init__(self, in_shape, channels=(32, 64, 128), seg_channels=(16, 32, 64), w_seg: float = 1.0,
                 focal_gamma: float = 2.0, focal_smoothing: float = 1e-5, anomaly_p: float = 0.5, rotate_p: float = 0.3,
                 rotate_degrees: float = 90.0, init: str = "draem", smooth: int = 0, score_pool="auto"):
        super().__init__()
        c = in_shape[0]
        channels = positive_int_list("model.channels", channels)
        seg_channels = positive_int_list("model.seg_channels", seg_channels)
        self.w_seg = number("model.w_seg", w_seg, 0.0)
        self.focal_gamma = number("model.focal_gamma", focal_gamma, 0.0)
        self.focal_smoothing = number("model.focal_smoothing", focal_smoothing, 0.0, 0.5)
        self.anomaly_p = number("model.anomaly_p", anomaly_p, 0.0, 1.0, low_open=True)
        self.rotate_p = number("model.rotate_p", rotate_p, 0.0, 1.0)
        self.rotate_degrees = number("model.rotate_degrees", rotate_degrees, 0.0, 180.0)
        choice("model.init", init, INITS)
        if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 0 or (smooth > 1 and smooth % 2 == 0):
            raise ConfigError("model.smooth", f"must be 0 (off) or an odd kernel size such as 3 or 5; got {smooth!r}")
        self.smooth = smooth
        self.score_pool = draem_score_pool(score_pool, in_shape[1:])
        hs, ws = check_stages(in_shape, channels)
        check_stages(in_shape, seg_channels[1:], key="model.seg_channels")
        self.reconstructive = nn.Sequential(ConvEncoder(c, channels), ConvDecoder(c, channels, hs, ws))
        self.discriminative = SegmentationUNet(2 * c, seg_channels)
        if init == "draem":
            draem_init(self)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        recon = self.reconstructive(x)
        return {"recon": recon, "seg_logits": self.discriminative(torch.cat([x, recon.to(x.dtype)], dim=1))}

    def anomaly_map(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """P(anomalous) per pixel [B,1,H,W]; `target` is not needed (the segmenter compares the
        input with its own reconstruction)."""
        with eval_mode(self), torch.autocast(x.device.type, enabled=False):
            prob = self(x.float())["seg_logits"].float().softmax(dim=1)[:, 1:]
        if self.smooth > 1:
            prob = F.avg_pool2d(prob, self.smooth, stride=1, padding=self.smooth // 2, count_include_pad=False)
        return prob


    def image_scores(self, maps: torch.Tensor) -> torch.Tensor:
        """max over pixels of the score_pool x score_pool mean-pooled map (DRAEM's image score)."""
        k = self.score_pool
        pooled = F.avg_pool2d(maps.float(), k, stride=1, padding=k // 2) if k > 1 else maps.float()
        return pooled.flatten(1).amax(1)

    def score_description(self) -> str:
        return f"max of the {self.score_pool}x{self.score_pool} mean-pooled segmentation map (DRAEM)"


DRAEM_POOL, DRAEM_SIZE = 21, 256  # the test script's window on its 256 px images


def draem_score_pool(value, image_size) -> int:
    """The image score's pooling window: an odd int, or auto = DRAEM's 21 px at 256 px scaled to
    the image (the nearest odd integer to 21 * side / 256, at least 1)."""
    if value == "auto":
        k = DRAEM_POOL * min(image_size) / DRAEM_SIZE
        return 2 * math.floor(k / 2) + 1  # the nearest odd integer (ties go up)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ConfigError("model.score_pool", f"must be auto or an odd window size >= 1 (DRAEM: 21 on 256 px images); got {value!r}")
    return value


class DraemModule(ReconstructionModule):
    """one training step = a fraction rotate_p of the images rotated, pseudo-anomalies on a
    fraction anomaly_p of the batch, reconstruction loss to the clean target + w_seg * focal loss
    of the segmentation against the pseudo-anomaly mask."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.placement == "score":
            raise ConfigError("filter.apply_to", "model=draem scores with its segmentation network, not a residual, so a filter "
                                                 "at apply_to=score would have no effect; use input or both")

    def pseudo_anomalies(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images with a defect pasted in a fraction anomaly_p of them, their masks)."""
        return synthesize_share(self.augment, x, self.model.anomaly_p)

    def training_step(self, x: torch.Tensor, batch_idx: int):
        x = random_rotation(x, self.model.rotate_p, self.model.rotate_degrees)
        _, target = self.model_io(x, train=False)
        defective, mask = self.pseudo_anomalies(x)
        x_in, _ = self.model_io(defective, train=False)  # the input filter sees the defect, as at test time
        out = self.model(x_in)
        rec_total, rec_parts = self.compare(out["recon"], target)
        seg = self.model.w_seg * focal_loss(out["seg_logits"], mask, self.model.focal_gamma, self.model.focal_smoothing)
        total = rec_total + seg
        self.check_and_log(total, {**rec_parts, "seg": seg}, x.shape[0])
        return total
