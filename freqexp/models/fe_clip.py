"""FE-CLIP (Gong, Chu, Liu, Zhou, Yu: "FE-CLIP: Frequency Enhanced CLIP Model for Zero-Shot Anomaly
Detection and Segmentation", ICCV 2025): a frozen CLIP whose visual encoder gets two frequency
adapters after each tapped block; trained on an auxiliary dataset's labelled anomalies and tested
zero-shot on another (dataset.train_from), or, outside that protocol, on pseudo-anomalies of a
category's normal images.

As the paper defines it (section numbers of the ICCV paper):
- FFE adapter (3.3): the patch tokens of block n as a map [D, H, W], cut into non-overlapping P x P
  windows, a 2-D DCT of each window (per channel), one Linear layer + GELU on the coefficients,
  the inverse DCT of each window back to the spatial map.
- LFS adapter (3.4): a DCT of the Q x Q window around every token (stride 1), the mean over the
  Q x Q frequency responses (a map with the layout of the tokens), one convolution + GELU.
- Fusion (eq. 2): f' = lambda * (f_ffe + f_lfs) + (1 - lambda) * f, lambda = 0.1, on the patch tokens
  only; f' goes on into the next blocks.
- Scores (eq. 1, 3): P(c | f) = softmax over {normal, anomalous} of cos(g_c, f) / tau. The map of
  block n is P(anomalous) of fc(f'(i, j)) for each patch (fc learnt), the image score of block n
  P(anomalous) of CLIP's frozen projection of the class token; both are the mean over the N taps.
- Losses (eq. 4, 5): BCE of each tap's image probability + focal + dice of each tap's map
  (upsampled to the image) against the mask, averaged over taps; L = L_cls + L_mask.
- Prompts: "A photo of a normal object" / "A photo of a damaged object", one each, fixed.

Where the paper is silent (docs/fidelity.md lists each choice): the tapped blocks (default the last
four, [20, 21, 22, 23] of ViT-L/14's 24), tau = 0.07, the patch tokens pass CLIP's post_layernorm
before fc, fc is one Linear shared by the taps, initialised from CLIP's visual projection and
trained at 0.01 x the learning rate, the FFE Linear acts on the channels (shared by all
coefficients and windows), the DCT is the orthonormal DCT-II, windows are padded by replicating
the border (a grid not divisible by P is padded, then cropped), the LFS convolution is 3 x 3 with
zero padding, the map is upsampled bilinearly, the focal loss has gamma 2 and no alpha, the dice
loss is AnomalyCLIP's (per image, smoothing 1), no smoothing of the map."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from freqexp.augment.base import synthesize_share
from freqexp.checks import choice, number
from freqexp.errors import ConfigError
from freqexp.models.base import MODELS, ReconstructionModel
from freqexp.models.clip import ClipDetector, FrozenCLIP, anomalous_softmax, clip_options, layer_choice
from freqexp.training import ReconstructionModule

LFS_STATISTICS = ("signed", "abs", "power")
FC_PATCH = ("learnt", "frozen")
PROMPTS = ("fe_clip", "winclip")
FE_CLIP_PROMPTS = ("A photo of a normal object", "A photo of a damaged object")


# -- the DCT ----------------------------------------------------------------------------------

def dct_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The orthonormal DCT-II matrix C [n, n]: coefficients = C @ x, and x = C.T @ coefficients."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(device=device, dtype=dtype)


def pad_to_multiple(x: torch.Tensor, p: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % p, (-w) % p
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


class FFEAdapter(nn.Module):
    """Frequency-aware Feature Extraction: block DCT of P x P windows -> Linear(D, D) + GELU on the
    coefficients -> inverse block DCT. [B, D, H, W] -> [B, D, H, W]."""

    def __init__(self, width: int, window: int = 3):
        super().__init__()
        self.window = int(window)
        self.linear = nn.Linear(width, width)
        self.register_buffer("dct", dct_matrix(self.window), persistent=False)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        b, d, h, w = f.shape
        p = self.window
        x = pad_to_multiple(f, p)
        hp, wp = x.shape[-2] // p, x.shape[-1] // p
        blocks = x.reshape(b, d, hp, p, wp, p)
        c = self.dct.to(x.dtype)
        coef = torch.einsum("ui,bdhiwj,vj->bhwuvd", c, blocks, c)  # channels last for the Linear
        coef = F.gelu(self.linear(coef))
        back = torch.einsum("ui,bhwuvd,vj->bdhiwj", c, coef, c)  # C.T @ coef @ C per window
        return back.reshape(b, d, hp * p, wp * p)[..., :h, :w]


class LFSAdapter(nn.Module):
    """Local Frequency Statistics: the DCT of the Q x Q window around every token (stride 1, the
    border replicated), the mean over its Q x Q responses (signed, as the paper; abs and power
    are ablations), then Conv2d(D, D, 3, padding 1) + GELU. [B, D, H, W] -> [B, D, H, W]."""

    def __init__(self, width: int, window: int = 3, statistic: str = "signed"):
        super().__init__()
        self.window = int(window)
        self.statistic = statistic
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.register_buffer("dct", dct_matrix(self.window), persistent=False)

    def statistics(self, f: torch.Tensor) -> torch.Tensor:
        q = self.window
        before, after = (q - 1) // 2, q // 2
        x = F.pad(f, (before, after, before, after), mode="replicate")
        if self.statistic == "signed":
            # the mean of the DCT coefficients is linear in the window: sum_ij x_ij a_i a_j with a = the
            # column means of C; one depthwise Q x Q convolution, equal to the per-window DCT and mean
            a = self.dct.mean(0).to(f.dtype)
            kernel = torch.outer(a, a).expand(f.shape[1], 1, q, q)
            return F.conv2d(x, kernel, groups=f.shape[1])
        windows = x.unfold(2, q, 1).unfold(3, q, 1)  # [B, D, H, W, Q, Q]
        c = self.dct.to(f.dtype)
        coef = torch.einsum("ui,bdhwij,vj->bdhwuv", c, windows, c)
        if self.statistic == "abs":
            coef = coef.abs()
        elif self.statistic == "power":
            coef = coef * coef
        return coef.mean(dim=(-2, -1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.conv(self.statistics(f)))


# -- the losses -------------------------------------------------------------------------------

def binary_focal_loss(p: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """Mean over pixels of -(1 - p_t)^gamma * log p_t (Lin et al. 2017, no alpha), p the anomalous
    probability, p_t = p where the mask is set and 1 - p elsewhere."""
    p = p.float().clamp(eps, 1 - eps)
    t = target.float()
    p_t = p * t + (1 - p) * (1 - t)
    return (-(1 - p_t).pow(gamma) * p_t.log()).mean()


def dice_loss(p: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over images of (2 sum(p t) + smooth) / (sum p + sum t + smooth) (AnomalyCLIP's BinaryDiceLoss)."""
    p, t = p.float().flatten(1), target.float().flatten(1)
    return 1 - ((2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


# -- the model --------------------------------------------------------------------------------

@MODELS.register("fe_clip")
class FeClip(ClipDetector, ReconstructionModel):
    lightning_module = "freqexp.models.fe_clip:FeClipModule"
    zero_shot = "trained"
    needs_pseudo_anomalies = True  # outside the zero-shot protocol: pseudo-anomalies of the normal images, with masks
    residual_score = False
    filtered_target = False
    published_score = "mean"  # not used: the image score is the class tokens' (score)
    loss_note = "it trains on its own losses (BCE of the image score, focal + dice of the map), so the configured loss is not used"

    def __init__(self, in_shape, clip=None, taps="last4", fusion_weight: float = 0.1, dct_window: Sequence[int] = (3, 3),
                 lfs_statistic: str = "signed", temperature="0.07", fc_patch: str = "learnt", fc_patch_lr_scale: float = 0.01,
                 prompts: str = "fe_clip", w_image: float = 1.0, w_mask: float = 1.0, focal_gamma: float = 2.0,
                 map_sigma: float = 0.0, anomaly_p: float = 0.5):
        super().__init__()
        options = clip_options(clip)
        self.in_shape = tuple(in_shape)
        self.clip = FrozenCLIP(options["name"], options["image_size"])
        self.taps = layer_choice(taps, self.clip.n_layers)
        self.fusion_weight = number("model.fusion_weight", fusion_weight, 0.0, 1.0)
        try:
            p, q = (int(v) for v in dct_window)
        except (TypeError, ValueError):
            raise ConfigError("model.dct_window", f"must be [P, Q]: the FFE and LFS window sizes in tokens, e.g. [3, 3]; got {dct_window!r}") from None
        if not (1 <= p <= self.clip.grid and 1 <= q <= self.clip.grid):
            raise ConfigError("model.dct_window", f"window sizes must lie in 1..{self.clip.grid} (the token grid); got {list(dct_window)!r}")
        self.dct_window = (p, q)
        self.lfs_statistic = choice("model.lfs_statistic", lfs_statistic, LFS_STATISTICS)
        if str(temperature) == "logit_scale":
            self.temperature = 1.0 / self.clip.logit_scale_value
        else:
            try:
                self.temperature = float(temperature)
            except (TypeError, ValueError):
                raise ConfigError("model.temperature", f"must be a number > 0 (FE-CLIP: 0.07) or logit_scale (CLIP's own, 1/100); got {temperature!r}") from None
            number("model.temperature", self.temperature, 0.0, low_open=True)
        self.temperature_option = str(temperature)
        self.fc_patch_mode = choice("model.fc_patch", fc_patch, FC_PATCH)
        self.fc_patch_lr_scale = number("model.fc_patch_lr_scale", fc_patch_lr_scale, 0.0)
        self.prompts = choice("model.prompts", prompts, PROMPTS)
        self.w_image = number("model.w_image", w_image, 0.0)
        self.w_mask = number("model.w_mask", w_mask, 0.0)
        self.focal_gamma = number("model.focal_gamma", focal_gamma, 0.0)
        self.map_sigma = number("model.map_sigma", map_sigma, 0.0)
        self.anomaly_p = number("model.anomaly_p", anomaly_p, 0.0, 1.0)
        width = self.clip.width
        self.ffe = nn.ModuleList(FFEAdapter(width, p) for _ in self.taps)
        self.lfs = nn.ModuleList(LFSAdapter(width, q, self.lfs_statistic) for _ in self.taps)
        self.fc_patch = nn.Linear(width, self.clip.embed_dim, bias=False)
        with torch.no_grad():
            self.fc_patch.weight.copy_(self.clip.visual_projection.weight)
        self.fc_patch.requires_grad_(self.fc_patch_mode == "learnt")
        if self.prompts == "fe_clip":
            text = self.clip.text_embeddings(FE_CLIP_PROMPTS)
        else:
            text = self.clip.class_embeddings("object")
        self.register_buffer("text", F.normalize(text, dim=-1), persistent=False)  # unit g_c: eq. 1 is a cosine

    # -- forward
    def adapt(self, n: int, patches: torch.Tensor) -> torch.Tensor:
        """Eq. 2 on the patch tokens [B, L, D] of tap n."""
        b, length, d = patches.shape
        g = self.clip.grid
        f = patches.transpose(1, 2).reshape(b, d, g, g)
        fused = self.fusion_weight * (self.ffe[n](f) + self.lfs[n](f)) + (1 - self.fusion_weight) * f
        return fused.reshape(b, d, length).transpose(1, 2)

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(class tokens after each tap [B, D], adapted patch tokens after each tap [B, L, D])."""
        pixels = self.clip.prepare(x)
        order = {block: n for n, block in enumerate(self.taps)}
        classes, patches = [], []

        def after_block(i: int, hidden: torch.Tensor) -> torch.Tensor:
            n = order.get(i)
            if n is None:
                return hidden
            adapted = self.adapt(n, hidden[:, 1:])
            classes.append(hidden[:, 0])
            patches.append(adapted)
            return torch.cat([hidden[:, :1], adapted], dim=1)

        self.clip.encode(pixels, after_block, last=self.taps[-1])  # blocks after the last tap are not needed
        return classes, patches

    def probabilities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Eq. 1: softmax over {normal, anomalous} of cos(g_c, f) / tau; returns [..., 2]."""
        return anomalous_softmax(embeddings, self.text, self.temperature)

    def tap_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image probabilities [N, B] and maps [N, B, 1, H, W] of the anomalous class, one per tap)."""
        classes, patches = self.encode(x)
        post = self.clip.vision.post_layernorm
        g = self.clip.grid
        image = torch.stack([self.probabilities(self.clip.visual_projection(post(c)))[..., 1] for c in classes])
        maps = []
        for tokens in patches:
            p = self.probabilities(self.fc_patch(post(tokens)))[..., 1]  # [B, L]
            grid = p.view(-1, 1, g, g)
            maps.append(F.interpolate(grid, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return image, torch.stack(maps)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        image, maps = self.tap_outputs(x)
        return {"recon": x, "image": image.mean(0), "map": maps.mean(0)}

    def supervised_loss(self, x: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Eq. 4 + 5: (w_image * L_cls + w_mask * L_mask, its parts), each the mean over taps."""
        image, maps = self.tap_outputs(x)
        y = labels.float().view(1, -1).expand_as(image)
        with torch.autocast(x.device.type, enabled=False):
            cls = F.binary_cross_entropy(image.float().clamp(1e-6, 1 - 1e-6), y)
            target = masks.float()
            focal = torch.stack([binary_focal_loss(m, target, self.focal_gamma) for m in maps]).mean()
            dice = torch.stack([dice_loss(m, target) for m in maps]).mean()
        total = self.w_image * cls + self.w_mask * (focal + dice)
        return total, {"cls": cls, "focal": focal, "dice": dice}

    @torch.no_grad()
    def score(self, x: torch.Tensor, target=None) -> tuple[torch.Tensor, torch.Tensor]:
        image, maps = self.tap_outputs(x)
        m = maps.mean(0)
        if self.map_sigma > 0:  # scipy's gaussian_filter, as AnomalyCLIP smooths its maps
            from freqexp.models.memory_bank import gaussian_filter

            m = gaussian_filter(m, self.map_sigma)
        return m, image.mean(0)

    def anomaly_map(self, x: torch.Tensor, target=None) -> torch.Tensor:
        return self.score(x)[0]

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return x  # no reconstruction: figures show the input beside the map

    def score_description(self) -> str:
        return f"the class token's anomalous probability (tau {self.temperature:g}), mean over the {len(self.taps)} tapped blocks"

    def parameter_groups(self, lr: float) -> list[dict]:
        """The adapters at the configured lr, fc_patch at fc_patch_lr_scale x lr (frozen: not at all)."""
        groups = [{"params": [p for m in (self.ffe, self.lfs) for p in m.parameters()], "lr": lr}]
        if self.fc_patch_mode == "learnt" and self.fc_patch_lr_scale > 0:
            groups.append({"params": list(self.fc_patch.parameters()), "lr": lr * self.fc_patch_lr_scale})
        return groups


class FeClipModule(ReconstructionModule):
    """One training step: a batch of (images, labels, masks) from the auxiliary dataset (the
    zero-shot protocol), or of normal images given pseudo-anomalies (augment.synthesize) on a
    fraction anomaly_p of them; loss = the model's supervised_loss (eq. 4 + 5)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.placement in ("score", "both"):
            raise ConfigError("filter.apply_to", "model=fe_clip scores with CLIP similarities, not a residual; "
                                                 "a filter can act on its input only (apply_to=input)")

    def pseudo_anomalies(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images with a pseudo-anomaly in a share anomaly_p of them, their labels, their masks)."""
        images, mask = synthesize_share(self.augment, x, self.model.anomaly_p)
        return images, mask.flatten(1).any(1).long(), mask

    def training_step(self, batch, batch_idx: int):
        if isinstance(batch, (tuple, list)):
            x, labels, masks = batch
        else:
            x, labels, masks = self.pseudo_anomalies(batch)
        x_in, _ = self.model_io(x, train=False)  # an input filter sees the defect, as at test time
        total, parts = self.model.supervised_loss(x_in, labels, masks)
        self.check_and_log(total, parts, x.shape[0])
        return total
