"""Masked-patch transformer anomaly detector (vit_ad).

The image is cut into patch_size x patch_size patches (a stride-p conv embeds each one), fixed
2D sine-cosine positions are added, and a pre-norm transformer encoder (norm_first) mixes the
tokens; a light decoder (`decoder_depth` more transformer layers, 0 = none, then a linear head)
predicts the pixels of every patch. Images whose sides are not multiples of patch_size are
replicate-padded at the bottom/right and cropped back; replicate (not reflect) keeps every
padded pixel a copy of a pixel of its own patch, so hiding a patch hides all of its content.

Training (SimMIM-style masked patch reconstruction): a random `mask_ratio` of the patches of
each image have their tokens replaced by a learned mask token (positions kept). The loss is the
configured loss on the full image in which the masked patches are the prediction and the
visible patches are copied from the target: only masked patches produce gradients (the model is
never rewarded for copying what it sees), while image-level terms (ssim, fft, ...) still see a
whole image. Per-pixel terms are therefore scaled by about mask_ratio.

Scoring (deterministic, `score_groups` = K forward passes): patch (row, col) belongs to group
(row * c + col) mod K with c = ceil(sqrt(K)) for K >= 4 (c = 1 for K < 4); each pass masks one
group and keeps the prediction of its masked patches, so every patch is predicted from its
context without seeing itself. For K >= 4 no two patches of a group touch (not even at a
corner), so each hidden patch sees all 8 neighbours. map = squared error, channel mean.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from freqexp.checks import number, positive_int
from freqexp.errors import ConfigError
from freqexp.models.base import MODELS, ReconstructionModel


def sincos_positions(rows: int, cols: int, dim: int) -> torch.Tensor:
    """[rows*cols, dim] fixed 2D positions: half the channels encode the row, half the column."""
    quarter = dim // 4
    freqs = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))

    def encode(coord: torch.Tensor) -> torch.Tensor:
        args = coord[:, None].double() * freqs[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([encode(r.flatten()), encode(c.flatten())], dim=1).float()


def patch_groups(rows: int, cols: int, groups: int) -> torch.Tensor:
    """[rows*cols] group index of each patch (row-major) for the K scoring passes."""
    stride = math.ceil(math.sqrt(groups)) if groups >= 4 else 1
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return ((r * stride + c) % groups).flatten()


def transformer_stack(dim: int, heads: int, mlp_ratio: float, depth: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=int(round(dim * mlp_ratio)), dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


@MODELS.register("vit_ad")
class TransformerAnomalyDetector(ReconstructionModel):
    filtered_target = False  # masked patches are filled in from the target, visible ones copied from it
    def __init__(self, in_shape, patch_size: int = 4, dim: int = 128, depth: int = 4, heads: int = 4,
                 mlp_ratio: float = 2.0, decoder_depth: int = 0, mask_ratio: float = 0.25, score_groups: int = 4):
        super().__init__()
        c, h, w = in_shape
        self.in_shape = tuple(in_shape)
        p = self.patch_size = positive_int("model.patch_size", patch_size)
        if p > min(h, w):
            raise ConfigError("model.patch_size", f"must be at most the image's shorter side ({min(h, w)} for {h}x{w}); got {p}")
        dim = positive_int("model.dim", dim)
        if dim % 4:
            raise ConfigError("model.dim", f"must be a multiple of 4 (2D sine-cosine positions); got {dim}")
        heads = positive_int("model.heads", heads)
        if dim % heads:
            raise ConfigError("model.heads", f"must divide model.dim={dim}; got {heads}")
        depth = positive_int("model.depth", depth)
        if isinstance(decoder_depth, bool) or not isinstance(decoder_depth, int) or decoder_depth < 0:
            raise ConfigError("model.decoder_depth", f"must be an integer >= 0 (0: linear head only); got {decoder_depth!r}")
        mlp_ratio = number("model.mlp_ratio", mlp_ratio, 0.0, low_open=True)
        self.rows, self.cols = math.ceil(h / p), math.ceil(w / p)
        n_patches = self.rows * self.cols
        self.mask_ratio = number("model.mask_ratio", mask_ratio, 0.0, 1.0, low_open=True)
        if round(self.mask_ratio * n_patches) >= n_patches:
            raise ConfigError("model.mask_ratio", f"must leave at least one of the {n_patches} patches visible; got {mask_ratio}")
        self.score_groups = positive_int("model.score_groups", score_groups)
        if not 2 <= self.score_groups <= n_patches:
            raise ConfigError("model.score_groups", f"must be between 2 and the number of patches ({n_patches}); got {score_groups}")

        self.embed = nn.Conv2d(c, dim, p, stride=p)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("positions", sincos_positions(self.rows, self.cols, dim)[None], persistent=False)
        self.register_buffer("groups", patch_groups(self.rows, self.cols, self.score_groups), persistent=False)
        self.encoder = transformer_stack(dim, heads, mlp_ratio, depth)
        self.decoder = transformer_stack(dim, heads, mlp_ratio, decoder_depth) if decoder_depth else None
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, c * p * p)

    # -- patches <-> pixels
    def pad(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        pad_h, pad_w = self.rows * p - x.shape[-2], self.cols * p - x.shape[-1]
        return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x

    def unpatchify(self, patches: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[B, N, C*p*p] -> [B, C, H, W] (cropped back from the padded size)."""
        b, p, c = patches.shape[0], self.patch_size, self.in_shape[0]
        img = patches.view(b, self.rows, self.cols, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return img.reshape(b, c, self.rows * p, self.cols * p)[..., :height, :width]

    def patch_mask_to_pixels(self, mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[B, N] bool -> [B, 1, H, W] bool."""
        grid = mask.view(-1, 1, self.rows, self.cols)
        p = self.patch_size
        return grid.repeat_interleave(p, 2).repeat_interleave(p, 3)[..., :height, :width]

    def predict(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pixels of every patch predicted with the patches in `mask` [B, N] (True = hidden)
        replaced by the mask token; [B, C, H, W] in [0, 1]."""
        height, width = x.shape[-2:]
        tokens = self.embed(self.pad(x)).flatten(2).transpose(1, 2)
        tokens = torch.where(mask[..., None], self.mask_token.to(tokens.dtype), tokens)
        h = self.encoder(tokens + self.positions.to(tokens.dtype))
        if self.decoder is not None:
            h = self.decoder(h)
        patches = self.head(self.norm(h))
        return torch.sigmoid(self.unpatchify(patches.float(), height, width))

    # -- training: random masks
    def random_mask(self, batch: int, device: torch.device) -> torch.Tensor:
        """[B, N] bool with exactly round(mask_ratio * N) (at least 1) hidden patches per image."""
        n = self.rows * self.cols
        k = max(1, round(self.mask_ratio * n))
        order = torch.rand(batch, n, device=device).argsort(dim=1)
        return order < k  # a uniform random permutation; where it holds 0..k-1 is a uniform k-subset

    def training_loss(self, x_in, target, loss_fn):
        mask = self.random_mask(x_in.shape[0], x_in.device)
        pred = self.predict(x_in, mask)
        hidden = self.patch_mask_to_pixels(mask, *x_in.shape[-2:])
        return loss_fn(torch.where(hidden, pred, target.float()), target)

    # -- scoring: K deterministic passes, each patch predicted while hidden
    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        recon = None
        for g in range(self.score_groups):
            mask = (self.groups == g).expand(x.shape[0], -1)
            pred = self.predict(x, mask)
            hidden = self.patch_mask_to_pixels(mask, *x.shape[-2:])
            recon = pred if recon is None else torch.where(hidden, pred, recon)
        return recon

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"recon": self.reconstruct(x)}
