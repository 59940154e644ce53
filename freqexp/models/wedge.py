"""WEDGE-Net (Park et al., "Wavelet-Driven Memory-Efficient Anomaly Detection for Industrial Edge
Computing"; official code aura1999jmpark/WEDGE-Net, model.py / train.py / evaluation.py), as
published. A PatchCore-style memory bank over features built by two streams:

  frequency stream  the ImageNet-normalised 224 px crop, as ITU-R 601 luma, through a stride-1
                    one-level DWT (haar 2x2 kernels, zero-padded back to the input size; or
                    bior2.2 5x5 kernels with reflect padding); the guidance map is the total
                    energy sqrt(LL^2 + LH^2 + HL^2 + HH^2) (LL included), min-max normalised,
                    resized to layer2's grid and encoded by a small conv net (1 -> 64 -> C2
                    channels, ReLU after each, random and frozen as in the reference, which never
                    trains it). It gates the context features: f2 * (1 + sigmoid(enc)) and
                    upsampled f3 * (1 + sigmoid(proj(enc))), proj a 1x1 conv C2 -> C3.
  input             resized to 256 and centre-cropped to 224 (the reference's dataset.py).
  context stream    a frozen ImageNet ResNet-50's layer2 (C2) and layer3 (C3, bilinearly
                    upsampled to layer2's grid); each gated map L2-normalised over channels.
  semantic stream   (use_semantic) layer2's mean |activation| over channels, min-max
                    normalised, times layer2 L2-normalised, times 2: an extra C2 block.
The blocks are concatenated and 3x3 average-pooled (stride 1, zero padding counted). The bank
keeps `sampling_ratio` (10 %) of the training patches by exact greedy k-center search starting
from the first patch; a test patch scores its Euclidean distance to the nearest bank entry.
Map: patch scores bilinearly upsampled to the 224 px crop, Gaussian-smoothed (sigma 4, scipy's
gaussian_filter); image score: the maximum of that smoothed map (at 224 px, before it is put
back on the image's own size, the border outside the crop repeating the crop's edge).

Deviations: the reference min-max normalises the guidance and semantic maps over the whole
batch it is given (32 images when the bank is built, 1 at test time); here every image is
normalised on its own, which is the reference's test-time behaviour and keeps a patch's
feature independent of the other images of its batch. The reference builds its random
frequency encoder anew (unseeded) in training and in evaluation, so its bank and its test
features pass through different gates; here one encoder, drawn under the run's seed and saved
with the bank, serves both.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from freqexp.checks import choice
from freqexp.errors import ConfigError
from freqexp.models.base import MODELS
from freqexp.models.bank_search import BankIndex, nearest_distance
from freqexp.models.memory_bank import PatchCore, gaussian_filter

LUMA = (0.299, 0.587, 0.114)


def wedge_dwt_kernels(wavelet: str) -> torch.Tensor:
    """[4, 1, k, k] LL, LH, HL, HH analysis kernels of WEDGE-Net's stride-1 DWT."""
    if wavelet == "haar":
        ll = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
        lh = torch.tensor([[-0.5, -0.5], [0.5, 0.5]])
        hl = torch.tensor([[-0.5, 0.5], [-0.5, 0.5]])
        hh = torch.tensor([[0.5, -0.5], [-0.5, 0.5]])
        return torch.stack([ll, lh, hl, hh]).unsqueeze(1)
    lo = torch.tensor([-0.125, 0.25, 0.75, 0.25, -0.125])  # bior2.2 as the reference spells it
    hi = torch.tensor([0.0, -0.5, 1.0, -0.5, 0.0])
    return torch.stack([torch.outer(lo, lo), torch.outer(lo, hi), torch.outer(hi, lo), torch.outer(hi, hi)]).unsqueeze(1)


def minmax_per_image(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo + eps)


def guidance_map(normalised: torch.Tensor, kernels: torch.Tensor, wavelet: str) -> torch.Tensor:
    """[B,1,H,W]: min-max normalised total DWT energy of the luma of a normalised [B,3,H,W] input."""
    gray = torch.tensordot(normalised, torch.tensor(LUMA, device=normalised.device), dims=([1], [0])).unsqueeze(1)
    if wavelet == "haar":
        bands = F.pad(F.conv2d(gray, kernels), (0, 1, 0, 1))
    else:
        bands = F.conv2d(F.pad(gray, (2, 2, 2, 2), mode="reflect"), kernels)
    return minmax_per_image(bands.pow(2).sum(1, keepdim=True).sqrt())


@MODELS.register("wedge")
class WedgeNet(PatchCore):
    published_score = "max"  # of the smoothed map at the backbone's resolution: see score()

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        backbone=None,
        input_size=256,
        center_crop=0.875,
        wavelet: str = "haar",
        use_semantic: bool = True,
        sampling: str = "greedy",
        sampling_ratio: float = 0.1,
        projection_dim: Optional[int] = None,
        smooth_sigma: float = 4.0,
        precision: str = "auto",
    ):
        self.wavelet = choice("model.wavelet", wavelet, ("haar", "bior2.2"))
        if not isinstance(use_semantic, bool):
            raise ConfigError("model.use_semantic", f"must be true or false; got {use_semantic!r}")
        self.use_semantic = use_semantic
        super().__init__(in_shape, backbone, input_size, center_crop, ("layer2", "layer3"), 1, "none", 1, 1,
                         sampling, sampling_ratio, projection_dim, smooth_sigma, 1, precision)
        c2, c3 = self.extractor.channels("layer2"), self.extractor.channels("layer3")
        # random, frozen: the reference builds these at random and never trains them
        self.freq_encoder = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, c2, 3, padding=1), nn.ReLU())
        self.proj_to_f3 = nn.Conv2d(c2, c3, 1, bias=False)
        self.freq_encoder.requires_grad_(False)
        self.proj_to_f3.requires_grad_(False)
        self.register_buffer("dwt_kernels", wedge_dwt_kernels(self.wavelet), persistent=False)

    def stream_dims(self) -> List[int]:
        c2, c3 = self.extractor.channels("layer2"), self.extractor.channels("layer3")
        return [c2 + c3 + (c2 if self.use_semantic else 0)]

    def streams(self, x: torch.Tensor) -> List[torch.Tensor]:
        normalised = self.extractor.prepare_input(x)
        maps = self.extractor.backbone(normalised, ["layer2", "layer3"], fast=True)
        f2, f3 = maps["layer2"], maps["layer3"]
        grid = tuple(f2.shape[-2:])
        f3 = F.interpolate(f3, size=grid, mode="bilinear", align_corners=False)
        guide = F.interpolate(guidance_map(normalised, self.dwt_kernels, self.wavelet), size=grid, mode="bilinear", align_corners=False)
        freq = self.freq_encoder(guide)
        parts = [F.normalize(f2 * (1 + torch.sigmoid(freq)), dim=1),
                 F.normalize(f3 * (1 + torch.sigmoid(self.proj_to_f3(freq))), dim=1)]
        if self.use_semantic:
            semantic = minmax_per_image(f2.abs().mean(1, keepdim=True))
            parts.append(F.normalize(f2, dim=1) * semantic * 2.0)
        return [F.avg_pool2d(torch.cat(parts, 1), 3, stride=1, padding=1)]

    def train(self, mode: bool = True) -> "WedgeNet":
        return super().train(False)  # nothing here trains: keep every module in eval mode

    def bytes_per_image(self, image_size) -> int:
        # the gated, normalised and pooled blocks: about 8 copies of the [D, h, w] features at once
        h, w = self.extractor.backbone_size(image_size)
        return self.extractor.activation_bytes(image_size) + 8 * 4 * self.feature_width() * self.patches_per_image() + 4 * 4 * h * w

    def score_micro_batch(self, x: torch.Tensor, index: BankIndex) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.patch_features(x)
        b, h, w, d = features.shape
        patch = nearest_distance(features.reshape(-1, d), self.memory_bank, index).view(b, 1, h, w)
        size = self.extractor.backbone_size(x.shape[-2:])
        smoothed = gaussian_filter(F.interpolate(patch, size=size, mode="bilinear", align_corners=False), self.smooth_sigma)
        return self.extractor.to_image_frame(smoothed, x.shape[-2:]), smoothed.flatten(1).amax(1)

    @torch.no_grad()
    def anomaly_map(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        return self.score(x)[0]

    def score_description(self) -> str:
        return f"max of the sigma-{self.smooth_sigma:g} smoothed patch-distance map at the backbone's resolution (WEDGE-Net)"
