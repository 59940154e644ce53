"""WinCLIP, zero-shot (Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and
Segmentation", CVPR 2023): a frozen CLIP and nothing learnt, the "what does CLIP do alone" row
beside FE-CLIP. As anomalib's implementation of it:

- Text: the compositional prompt ensemble (freqexp.models.clip: 7 normal and 4 anomalous state
  words x 22 templates, object word "object"), one mean embedding per class.
- Probabilities: softmax over {normal, anomalous} of cosine / 0.07.
- Image score: the anomalous probability of the class token's CLIP embedding (zero-shot WinCLIP
  uses the global embedding alone; image_score=class_token+map_max adds the map's maximum and halves).
- Map: windows of k x k patch tokens (k = 2 and 3, stride 1) are each encoded alone with the
  class token (the position-embedded tokens of the window, through the whole ViT, post_layernorm
  and the projection); each patch gets the harmonic mean of the probabilities of the windows
  covering it; the two scales and the image score (broadcast over the patches) are combined by a
  harmonic mean, and the patch grid is upsampled bilinearly to the image. No smoothing.

Training-free: under the one-class protocol it is "fitted" on nothing (the training pass only
counts images); under the zero-shot protocol (dataset.train_from) the auxiliary data is not used.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F

from freqexp.checks import choice
from freqexp.errors import ConfigError
from freqexp.models.base import MODELS, GradientFreeModel
from freqexp.models.clip import ClipDetector, FrozenCLIP, anomalous_softmax, clip_options

WINCLIP_SCORES = ("class_token", "class_token+map_max")
TEMPERATURE = 0.07


def window_index(grid: int, k: int) -> torch.Tensor:
    """[n_windows, k*k] token indices (row-major, 0-based over the patch grid) of every k x k window, stride 1."""
    rows = torch.arange(grid - k + 1)
    starts = (rows[:, None] * grid + rows[None, :]).flatten()  # top-left corner of each window
    offsets = (torch.arange(k)[:, None] * grid + torch.arange(k)[None, :]).flatten()
    return starts[:, None] + offsets[None, :]


def harmonic_patch_scores(window_scores: torch.Tensor, index: torch.Tensor, n_patches: int) -> torch.Tensor:
    """[B, n_windows] scores -> [B, n_patches]: each patch gets the harmonic mean of the scores of
    the windows covering it."""
    b = window_scores.shape[0]
    inv = (1.0 / window_scores.clamp_min(1e-12)).repeat_interleave(index.shape[1], dim=1)  # [B, n_windows*k*k]
    flat = index.flatten().to(window_scores.device).expand(b, -1)
    total = torch.zeros(b, n_patches, device=window_scores.device, dtype=inv.dtype).scatter_add_(1, flat, inv)
    count = torch.zeros(n_patches, device=window_scores.device, dtype=inv.dtype).scatter_add_(0, index.flatten().to(window_scores.device),
                                                                                            torch.ones(index.numel(), device=window_scores.device, dtype=inv.dtype))
    return count / total


@MODELS.register("winclip")
class WinClip(ClipDetector, GradientFreeModel):
    zero_shot = "training-free"
    published_score = "max"
    loss_note = "it is training-free (a frozen CLIP and prompts), so the configured loss is not used"

    def __init__(self, in_shape, clip=None, scales: Sequence[int] = (2, 3), image_score: str = "class_token",
                 object_word: str = "object", window_batch: int = 4096):
        super().__init__()
        options = clip_options(clip)
        self.in_shape = tuple(in_shape)
        self.clip = FrozenCLIP(options["name"], options["image_size"])
        grid = self.clip.grid
        try:
            self.scales = sorted({int(k) for k in scales})
        except (TypeError, ValueError):
            raise ConfigError("model.scales", f"must be a list of window sizes in patches, e.g. [2, 3]; got {scales!r}") from None
        if not self.scales or any(not 1 <= k <= grid for k in self.scales):
            raise ConfigError("model.scales", f"window sizes must lie in 1..{grid} (the CLIP's patch grid is {grid}x{grid}); got {list(scales)!r}")
        self.image_score = choice("model.image_score", image_score, WINCLIP_SCORES)
        if not isinstance(object_word, str) or not object_word.strip():
            raise ConfigError("model.object_word", f"must be a word naming the object in the prompts, e.g. object; got {object_word!r}")
        self.window_batch = int(window_batch)
        self.register_buffer("text", F.normalize(self.clip.class_embeddings(object_word), dim=-1), persistent=False)
        self.seen = 0

    # -- the (empty) fit
    def observe(self, x: torch.Tensor) -> None:
        self.seen += x.shape[0]

    def finalize(self) -> None:
        pass

    def probabilities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Anomalous-class probability of CLIP embeddings [..., D]: softmax(cosine / 0.07)."""
        return anomalous_softmax(embeddings, self.text, TEMPERATURE)[..., 1]

    @torch.no_grad()
    def window_scores(self, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, n_windows] anomalous probabilities of every k x k window encoded alone, its index),
        from the image's embedded tokens [B, 1 + grid^2, D] (FrozenCLIP.embed)."""
        index = window_index(self.clip.grid, k).to(tokens.device)
        b, n_win = tokens.shape[0], index.shape[0]
        cls, patches = tokens[:, :1], tokens[:, 1:]
        out = []
        per_chunk = max(1, self.window_batch // max(1, b))
        for start in range(0, n_win, per_chunk):
            idx = index[start : start + per_chunk]  # [w, k*k]
            seq = torch.cat([cls[:, None].expand(-1, idx.shape[0], -1, -1), patches[:, idx]], dim=2).flatten(0, 1)
            emb = self.clip.project_class_token(self.clip.blocks(seq)).view(b, idx.shape[0], -1)
            out.append(self.probabilities(emb))
        return torch.cat(out, dim=1), index

    @torch.no_grad()
    def score(self, x: torch.Tensor, target=None):
        tokens = self.clip.embed(self.clip.prepare(x))  # embedded once: the image and every window read them
        image = self.probabilities(self.clip.project_class_token(self.clip.blocks(tokens)))
        n = self.clip.grid ** 2
        layers = [image[:, None].expand(-1, n)]  # the image score, broadcast over the patches
        for k in self.scales:
            scores, index = self.window_scores(tokens, k)
            layers.append(harmonic_patch_scores(scores, index, n))
        patch = len(layers) / (1.0 / torch.stack(layers).clamp_min(1e-12)).sum(0)  # harmonic mean
        maps = F.interpolate(patch.view(-1, 1, self.clip.grid, self.clip.grid), size=x.shape[-2:], mode="bilinear", align_corners=False)
        scores = image if self.image_score == "class_token" else (image + maps.flatten(1).amax(1)) / 2
        return maps, scores

    def anomaly_map(self, x: torch.Tensor, target=None) -> torch.Tensor:
        return self.score(x)[0]

    def score_description(self) -> str:
        if self.image_score == "class_token":
            return "the class token's anomalous probability against WinCLIP's prompt ensemble (zero-shot WinCLIP)"
        return "(the class token's anomalous probability + the window map's max) / 2"
