"""A frozen CLIP for the vision-language detectors (FE-CLIP, WinCLIP): weights by name, CLIP's own
image normalisation on the device, the prompt ensemble and its text embeddings, and the visual
encoder run block by block so that a detector can read (and adapt) the tokens after any block.

Weights come from transformers' `CLIPModel` (torchvision and open_clip are not needed):
`model.clip.name` is a Hugging Face hub id (openai/clip-vit-large-patch14-336, downloaded once
into the hub cache, $HF_HOME/hub, by default ~/.cache/huggingface/hub) or a local folder written by
`save_pretrained` (model and tokenizer files), for offline machines. A name that is neither a
folder nor in the cache, on a machine that cannot reach the hub, is a one-line ConfigError before
any run opens.

The prompt ensemble is WinCLIP's compositional one (Jeong et al., CVPR 2023; the list anomalib's
WinCLIP uses): 7 normal and 4 anomalous state words, each put into 22 photo templates; a class's
embedding is the mean of its prompts' embeddings. The object word is "object" (object-agnostic,
as AnomalyCLIP's prompts, so one text pair serves every category of a zero-shot test)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from freqexp.errors import ConfigError, one_line

log = logging.getLogger("freqexp")

DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation (its preprocessor config)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# WinCLIP's compositional prompt ensemble: state words ({} is the object) and templates ({} is the state)
NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect", "{} without damage")
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.", "a cropped photo of a {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.", "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.",
    "a blurry photo of a {}.", "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.", "a photo of the small {}.",
    "a photo of a large {}.", "a photo of the large {}.", "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.", "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)


def prompt_texts(object_word: str = "object") -> tuple[list[str], list[str]]:
    """(normal prompts, anomalous prompts): every state word in every template."""
    normal = [t.format(s.format(object_word)) for s in NORMAL_STATES for t in TEMPLATES]
    anomalous = [t.format(s.format(object_word)) for s in ANOMALOUS_STATES for t in TEMPLATES]
    return normal, anomalous


def clip_options(value: Any, key: str = "model.clip") -> Dict[str, Any]:
    """model.clip: {name: hub id or folder, image_size: null (CLIP's own) or an int}."""
    if value is None:
        value = {}
    if hasattr(value, "items"):
        value = dict(value.items())
    else:
        raise ConfigError(key, f"must be a mapping like {{name: {DEFAULT_CLIP}, image_size: null}}; got {value!r}")
    unknown = sorted(set(value) - {"name", "image_size"})
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", "not an option; model.clip has name (hub id or local folder) and image_size")
    name = value.get("name", DEFAULT_CLIP)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{key}.name", f"must be a Hugging Face hub id (e.g. {DEFAULT_CLIP}) or a local folder; got {name!r}")
    size = value.get("image_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 8):
        raise ConfigError(f"{key}.image_size", f"must be null (the CLIP's own input size) or an int >= 8 (a multiple of its patch size); got {size!r}")
    return {"name": name, "image_size": size}


def looks_local(name: str) -> bool:
    """A path (./x, /x, ~/x, or an existing folder) rather than a hub id (owner/name)."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def load_clip(name: str, key: str = "model.clip.name"):
    """(CLIPModel, tokenizer) from a local folder or the hub (cache first: no network call when
    the weights are there). Frozen: no parameter requires a gradient."""
    try:
        from transformers import AutoTokenizer, CLIPModel
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise ConfigError(key, f"needs the transformers package ({e}); `pip install transformers`") from None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # freqexp reports its own progress
    path = Path(name).expanduser()
    if looks_local(name):
        if not path.is_dir():
            raise ConfigError(key, f"{path}: no such folder (a local CLIP is a folder written by save_pretrained, "
                                   f"with config.json, the weights and the tokenizer files)")
        try:
            return _frozen(CLIPModel.from_pretrained(str(path), local_files_only=True)), AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(key, f"{path}: not a CLIP folder readable by transformers ({one_line(e)})") from None
    try:  # the hub cache first: no network call when the weights are there
        return _frozen(CLIPModel.from_pretrained(name, local_files_only=True)), AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        pass
    try:
        log.info("downloading %s into the Hugging Face hub cache (once)", name)
        return _frozen(CLIPModel.from_pretrained(name)), AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        offline = "offline mode (HF_HUB_OFFLINE)" if os.environ.get("HF_HUB_OFFLINE") else type(e).__name__
        raise ConfigError(key, f"{name!r} is not in the Hugging Face cache and could not be downloaded ({offline}); on a machine "
                               f"with internet save it once (CLIPModel.from_pretrained({name!r}).save_pretrained(DIR), and the same "
                               f"for AutoTokenizer) and give that local folder: model.clip.name=DIR") from None


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


class FrozenCLIP(nn.Module):
    """The CLIP towers, frozen, kept in eval mode whatever the owning model's mode. Excluded from
    the owner's state dict (see ClipDetector.state_dict): model.pt holds the learnt parts only."""

    def __init__(self, name: str, image_size: Optional[int] = None):
        super().__init__()
        model, self.tokenizer = load_clip(name)
        self.name = name
        self.vision = model.vision_model
        self.visual_projection = model.visual_projection
        self.text_model = model.text_model
        self.text_projection = model.text_projection
        self.logit_scale_value = float(model.logit_scale.exp())
        vc = model.config.vision_config
        self.patch_size = int(vc.patch_size)
        self.native_size = int(vc.image_size)
        self.image_size = int(image_size or vc.image_size)
        if self.image_size % self.patch_size:
            raise ConfigError("model.clip.image_size", f"must be a multiple of the CLIP's patch size {self.patch_size}; got {self.image_size}")
        self.width = int(vc.hidden_size)
        self.n_layers = int(vc.num_hidden_layers)
        self.embed_dim = int(model.config.projection_dim)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "FrozenCLIP":
        return super().train(False)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] ([B,1|3,H,W]) -> CLIP's input: 3 channels, resized (bilinear) to its
        input size, normalised with CLIP's mean and std; on the device, batched."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected text features [len(texts), embed_dim] (not normalised)."""
        device = self.text_projection.weight.device
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        out = self.text_model(input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device))
        return self.text_projection(out.pooler_output).float()

    @torch.no_grad()
    def class_embeddings(self, object_word: str = "object") -> torch.Tensor:
        """[2, embed_dim]: the normal and the anomalous prompt ensembles, each the mean of its
        prompts' raw embeddings (as anomalib's WinCLIP; the cosine normalises afterwards)."""
        return torch.stack([self.text_embeddings(texts).mean(0) for texts in prompt_texts(object_word)])

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """The position-embedded tokens [B, 1 + grid^2, width] of CLIP-ready pixels (class token
        first), before pre_layrnorm; positions interpolated when image_size is not the CLIP's own."""
        return self.vision.embeddings(pixels, interpolate_pos_encoding=self.image_size != self.native_size)

    def blocks(self, tokens: torch.Tensor, after_block: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
               last: Optional[int] = None) -> torch.Tensor:
        """The transformer on embedded tokens (any subset of them, with the class token first):
        pre_layrnorm, then block by block; `after_block(i, tokens)` may replace the tokens after
        block i (0-based). Returns the tokens after block `last` (default: the final block), before
        post_layernorm; later blocks are not run."""
        v = self.vision
        hidden = v.pre_layrnorm(tokens)
        layers = v.encoder.layers if last is None else v.encoder.layers[: last + 1]
        for i, layer in enumerate(layers):
            out = layer(hidden, None)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            if after_block is not None:
                hidden = after_block(i, hidden)
        return hidden

    def encode(self, pixels: torch.Tensor, after_block: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
               last: Optional[int] = None) -> torch.Tensor:
        """The visual encoder on CLIP-ready pixels: blocks(embed(pixels), after_block, last)."""
        return self.blocks(self.embed(pixels), after_block, last)

    def project_class_token(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP's own image embedding: post_layernorm of the class token, then the frozen visual projection."""
        return self.visual_projection(self.vision.post_layernorm(tokens[:, 0]))


def anomalous_softmax(embeddings: torch.Tensor, unit_text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax over {normal, anomalous} of cos(g_c, f) / temperature (FE-CLIP's eq. 1, WinCLIP's
    scores): embeddings [..., D], unit-length class embeddings unit_text [2, D]; returns [..., 2]."""
    cos = F.normalize(embeddings.float(), dim=-1) @ unit_text.t()
    return (cos / temperature).softmax(-1)


def layer_choice(value: Any, n_layers: int, key: str = "model.taps") -> list[int]:
    """Blocks tapped (0-based): last4 (the last four), even (four evenly spaced, first to last),
    late (at 1/2, 2/3, 5/6 of the depth and the last), or a list of block indices."""
    if isinstance(value, str):
        if value == "last4":
            idx = list(range(max(0, n_layers - 4), n_layers))
        elif value == "even":
            idx = [int(round(i * (n_layers - 1) / 3)) for i in range(4)]
        elif value == "late":
            idx = [n_layers // 2, (2 * n_layers) // 3, (5 * n_layers) // 6, n_layers - 1]
        else:
            raise ConfigError(key, f"must be last4 | even | late or a list of block indices 0..{n_layers - 1}; got {value!r}")
        return sorted(set(idx))
    try:
        items = list(value)
    except TypeError:
        items = None
    if items is None or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ConfigError(key, f"must be last4 | even | late or a list of integer block indices 0..{n_layers - 1}; got {value!r}")
    idx = items
    bad = [i for i in idx if not 0 <= i < n_layers]
    if not idx or bad:
        raise ConfigError(key, f"block indices must lie in 0..{n_layers - 1} (the CLIP has {n_layers} blocks); got {list(value)!r}")
    return sorted(set(idx))


class ClipDetector(nn.Module):
    """Mixin for models holding a FrozenCLIP at `self.clip`: the frozen weights stay out of the
    state dict (model.pt, best-epoch copies), so a saved run holds only what was learnt."""

    FROZEN_PREFIX = "clip."
    scores_in_micro_batches = True  # its configs score 224 px images 16-32 at a time (trainer.eval_batch_size)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for k in [k for k in out if k.startswith(prefix + self.FROZEN_PREFIX)]:
            del out[k]
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith(self.FROZEN_PREFIX)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"state dict mismatch: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
        return result
