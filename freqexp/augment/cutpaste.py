"""CutPaste (Li et al., CVPR 2021) and its scaled and frequency-aware variants, batched on the
device: every image of a batch gets its own patch size, aspect, scale and positions, drawn at
once, and the paste is one grid_sample. Each returns the pseudo-anomalous image and a pixel
mask of the pasted region.

freq_cutpaste integration strategies (the frequency-aware scaled CutPaste study):
    patch_filter   filter the patch source (high pass -> structural edges, low pass -> blur-like
                   stains), then scale and paste
    image_filter   CutPaste, then filter the whole image
    dual_path      high- and low-passed versions of the patch, mixed with a random weight
                   (dual_mode=mix) or one chosen at random (dual_mode=random)
    freq_weighted  per-band weights applied in the FFT domain to the patch source, then paste
High-passed sources get the image's mean added back so the patch stays in the image's range.

Two things each generator declares for its users (freqexp.data.pseudo):
    synthesis_key()      what determines the pseudo-anomalies synthesize() draws (kind and the
                         options that matter; not p, which only mixes them into training batches):
                         equal keys = the same generator, e.g. scaled_cutpaste with scale [1, 1]
                         and cutpaste with the same area and aspect
    mask_covers_change   False when pixels outside the mask change too (freq_cutpaste with
                         strategy=image_filter filters the whole image): such masks are no target
                         for a segmenter (DRAEM) and no fair pseudo-validation set
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from freqexp.augment.base import AUGMENTS, check_probability
from freqexp.checks import choice
from freqexp.errors import ConfigError
from freqexp.freq.bands import BAND_NAMES, DEFAULT_EDGES, band_weight_map, check_edges

STRATEGIES = ("patch_filter", "image_filter", "dual_path", "freq_weighted")


def _range(key: str, value, low: float, high: float) -> Tuple[float, float]:
    ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok or not (low <= value[0] <= value[1] <= high):
        raise ConfigError(key, f"must be [min, max] with {low} <= min <= max <= {high}; got {value!r}")
    return float(value[0]), float(value[1])


class CutPaste(nn.Module):
    """Cut a rectangle (area fraction in `area`, aspect ratio log-uniform in `aspect`), scale it
    by a factor in `scale` (1 = plain CutPaste), paste it at a random place of the same image."""

    def __init__(self, p: float = 0.5, area=(0.02, 0.15), aspect=(0.3, 3.3), scale=(1.0, 1.0)):
        super().__init__()
        self.p = check_probability(p)
        self.area = _range("augment.area", area, 1e-4, 1.0)
        self.aspect = _range("augment.aspect", aspect, 0.01, 100.0)
        self.scale = _range("augment.scale", scale, 0.05, 10.0)

    # -- the patch source: the image itself here; frequency variants override
    def patch_source(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def finish(self, pasted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return pasted

    def boxes(self, b: int, height: int, width: int, device) -> Dict[str, torch.Tensor]:
        u = lambda lo, hi: lo + (hi - lo) * torch.rand(b, device=device)  # noqa: E731
        area = u(*self.area) * height * width
        aspect = torch.exp(u(math.log(self.aspect[0]), math.log(self.aspect[1])))
        ph = torch.sqrt(area * aspect).clamp(1, height)
        pw = torch.sqrt(area / aspect).clamp(1, width)
        s = u(*self.scale)
        dh = (ph * s).round().clamp(1, height)
        dw = (pw * s).round().clamp(1, width)
        ph, pw = ph.round(), pw.round()
        sy = torch.floor(torch.rand(b, device=device) * (height - ph + 1))
        sx = torch.floor(torch.rand(b, device=device) * (width - pw + 1))
        dy = torch.floor(torch.rand(b, device=device) * (height - dh + 1))
        dx = torch.floor(torch.rand(b, device=device) * (width - dw + 1))
        return {"ph": ph, "pw": pw, "sy": sy, "sx": sx, "dh": dh, "dw": dw, "dy": dy, "dx": dx}

    def paste(self, x: torch.Tensor, source: torch.Tensor, box: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        v = {k: t.view(b, 1, 1) for k, t in box.items()}
        ys = torch.arange(h, device=x.device, dtype=torch.float32).view(1, h, 1)
        xs = torch.arange(w, device=x.device, dtype=torch.float32).view(1, 1, w)
        inside = (ys >= v["dy"]) & (ys < v["dy"] + v["dh"]) & (xs >= v["dx"]) & (xs < v["dx"] + v["dw"])
        # destination pixel centre -> source pixel coordinate (nearest sampling keeps edges crisp)
        src_y = v["sy"] + (ys - v["dy"] + 0.5) * v["ph"] / v["dh"] - 0.5
        src_x = v["sx"] + (xs - v["dx"] + 0.5) * v["pw"] / v["dw"] - 0.5
        grid = torch.stack([(2 * src_x + 1) / w - 1 + 0 * src_y, (2 * src_y + 1) / h - 1 + 0 * src_x], dim=-1)
        sampled = F.grid_sample(source.float(), grid, mode="nearest", padding_mode="border", align_corners=False)
        mask = inside.unsqueeze(1)
        return torch.where(mask, sampled.to(x.dtype), x), mask

    def synthesize(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-anomalies for every image: (augmented [B,C,H,W] in [0,1], mask [B,1,H,W] bool)."""
        box = self.boxes(x.shape[0], x.shape[-2], x.shape[-1], x.device)
        pasted, mask = self.paste(x, self.patch_source(x), box)
        out = self.finish(pasted, mask).clamp(0, 1)
        changed = (out - x).abs().amax(1, keepdim=True) > 1e-6
        return out, mask & changed if self.exact_mask else mask

    exact_mask = True  # mask only pixels that really changed (a patch pasted onto its own copy changes nothing)
    mask_covers_change = True  # every pixel synthesize() changes lies inside its mask

    def synthesis_key(self) -> tuple:
        """What the pseudo-anomalies depend on; equal keys = the same generator (p is left out)."""
        return ("cutpaste", self.area, self.aspect, self.scale)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Training: the model sees a fraction p of the batch with a pasted patch; target stays clean."""
        out, _ = self.synthesize(x)
        if self.p < 1:
            keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < self.p
            out = torch.where(keep, out, x)
        return out, x


@AUGMENTS.register("cutpaste")
class PlainCutPaste(CutPaste):
    def __init__(self, p: float = 0.5, area=(0.02, 0.15), aspect=(0.3, 3.3)):
        super().__init__(p=p, area=area, aspect=aspect, scale=(1.0, 1.0))


@AUGMENTS.register("scaled_cutpaste")
class ScaledCutPaste(CutPaste):
    def __init__(self, p: float = 0.5, area=(0.02, 0.15), aspect=(0.3, 3.3), scale=(0.5, 2.0)):
        super().__init__(p=p, area=area, aspect=aspect, scale=scale)


def _filter(cfg: Optional[Dict[str, Any]], key: str) -> nn.Module:
    from omegaconf import OmegaConf

    from freqexp.freq import build_filter_module

    if not isinstance(cfg, dict) or "name" not in cfg:
        raise ConfigError(key, f"must be a filter spec such as {{name: fft, kind: butterworth, pass: high, cutoff: 0.2, order: 2}}; got {cfg!r}")
    return build_filter_module(OmegaConf.create(cfg), prefix=key)


def _keeps_dc(module: nn.Module) -> bool:
    """Low-pass-like filters keep the mean; high-pass ones remove it (checked on a flat image)."""
    flat = torch.full((1, 1, 8, 8), 0.5)
    return abs(float(module(flat).mean()) - 0.5) < 0.05


@AUGMENTS.register("freq_cutpaste")
class FrequencyCutPaste(CutPaste):
    def __init__(
        self,
        p: float = 0.5,
        area=(0.02, 0.15),
        aspect=(0.3, 3.3),
        scale=(0.5, 2.0),
        strategy: str = "patch_filter",
        patch_filter: Optional[Dict[str, Any]] = None,
        low_filter: Optional[Dict[str, Any]] = None,
        dual_mode: str = "mix",
        band_weights=(0.5, 1.0, 1.0, 1.5, 2.0),
        band_edges=DEFAULT_EDGES,
    ):
        super().__init__(p=p, area=area, aspect=aspect, scale=scale)
        choice("augment.strategy", strategy, STRATEGIES)
        if dual_mode not in ("mix", "random"):
            raise ConfigError("augment.dual_mode", f"must be mix or random; got {dual_mode!r}")
        self.strategy, self.dual_mode = strategy, dual_mode
        self.patch_filter_spec = patch_filter or {"name": "fft", "kind": "butterworth", "pass": "high", "cutoff": 0.2, "order": 2}
        self.low_filter_spec = low_filter or {"name": "fft", "kind": "butterworth", "pass": "low", "cutoff": 0.2, "order": 2}
        self.filter = _filter(self.patch_filter_spec, "augment.patch_filter")
        self.low = _filter(self.low_filter_spec, "augment.low_filter")
        self.restore_mean = not _keeps_dc(self.filter)
        w = list(band_weights) if not isinstance(band_weights, (str, int, float)) else []
        if len(w) != len(BAND_NAMES) or not all(isinstance(v, (int, float)) and v >= 0 for v in w):
            raise ConfigError("augment.band_weights", f"must be {len(BAND_NAMES)} weights >= 0 for {', '.join(BAND_NAMES)}; got {band_weights!r}")
        self.band_weights = [float(v) for v in w]
        self.band_edges = check_edges(band_edges, "augment.band_edges")

    def _high(self, x):
        y = self.filter(x)
        return y + x.mean(dim=(-2, -1), keepdim=True) if self.restore_mean else y

    def patch_source(self, x):
        if self.strategy == "patch_filter":
            return self._high(x)
        if self.strategy == "dual_path":
            hp, lp = self._high(x), self.low(x)
            b = x.shape[0]
            if self.dual_mode == "mix":
                a = torch.rand(b, 1, 1, 1, device=x.device)
            else:
                a = (torch.rand(b, 1, 1, 1, device=x.device) < 0.5).to(x.dtype)
            return a * hp + (1 - a) * lp
        if self.strategy == "freq_weighted":
            weights = band_weight_map(x.shape[-2], x.shape[-1], self.band_weights, self.band_edges, x.device)
            return torch.fft.ifft2(torch.fft.fft2(x.float()) * weights).real.to(x.dtype)
        return x  # image_filter: plain paste, filtered afterwards

    def finish(self, pasted, mask):
        if self.strategy == "image_filter":
            return self._high(pasted)
        return pasted

    @property
    def exact_mask(self):  # image_filter changes every pixel; the anomaly is where the patch went
        return self.strategy != "image_filter"

    @property
    def mask_covers_change(self) -> bool:  # image_filter changes every pixel, its mask marks the patch only
        return self.strategy != "image_filter"

    def synthesis_key(self) -> tuple:
        spec = lambda d: json.dumps(d, sort_keys=True, default=str)  # noqa: E731
        used = {  # the options each strategy reads
            "patch_filter": (spec(self.patch_filter_spec),),
            "image_filter": (spec(self.patch_filter_spec),),
            "dual_path": (spec(self.patch_filter_spec), spec(self.low_filter_spec), self.dual_mode),
            "freq_weighted": (tuple(self.band_weights), tuple(self.band_edges)),
        }[self.strategy]
        return ("freq_cutpaste", self.area, self.aspect, self.scale, self.strategy, *used)
