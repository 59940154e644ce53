"""Memory-bank detectors fitted without gradients: PatchCore and our PatchCore + DWT variant.
(WEDGE-Net, which shares the bank, the coreset and the nearest-neighbour search, is in wedge.py;
the search is bank_search.py, the coresets coreset.py.)

  patchcore      Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022;
                 official code amazon-science/patchcore-inspection. Defaults are the paper's:
                 a frozen ImageNet WideResNet-50-2; every image resized to 256 and centre-cropped
                 to 224; layer2 and layer3 features; each location described by its 3x3
                 neighbourhood (unfolded, zero padded), layer3's grid bilinearly upsampled to
                 layer2's, each layer's flattened (C, 3, 3) vector adaptively average-pooled to
                 1024 values, the two layers' vectors pooled together to 1024 (the official
                 MeanMapper / Aggregator, computed as the equal map NeighbourhoodPooling); a bank
                 of 10 % of the training patches chosen by the approximate greedy coreset (a
                 random 128-d projection, 10 random starting points whose mean distance seeds the
                 k-center search). A test patch scores its Euclidean distance to the nearest bank
                 entry. Map: the patch scores bilinearly upsampled to the 224 px backbone input,
                 Gaussian-smoothed with sigma 4 (scipy's gaussian_filter: reflect borders,
                 truncated at 4 sigma), then put back on the image (the crop's border, which the
                 backbone never saw, repeats the crop's edge). Image score: the paper's eq. 7, the
                 largest patch score s* re-weighted by 1 - softmax over its b = 9 nearest bank
                 neighbours (`reweight_neighbours`; 1 = the plain max, which is what the official
                 repository computes).
  patchcore_dwt  our variant (not a published method): the PatchCore bank over CNN patch features
                 plus a frequency stream, the magnitudes of the input's one-level DWT detail
                 sub-bands (|LH|, |HL|, |HH|) averaged over each patch's cell, scaled to a share
                 `freq_weight` of the CNN stream's mean norm; an optional semantic re-weighting of
                 the CNN features by (1 + the deepest layer's normalised activation energy).

Speed and memory. `precision` (auto | fp32 | bf16 | fp16) says how the arithmetic runs:
  fp32  the backbone and features in fp32 (on CUDA, convolutions follow torch's cuDNN TF32
        setting, on by default), the nearest-neighbour search in fp32 products.
  auto  (default) fp32 features, and the search shortlists in bf16 where the device multiplies
        bf16 fast (CUDA >= sm80, CPUs with AMX / AVX512-BF16), re-ranked exactly in fp32: the
        same patch distances and image scores as fp32 (tested), several times faster.
  bf16 / fp16  also the backbone and the feature pipeline under autocast (fp16: CUDA only; a
        device without fast bf16 falls back to fp32 with a warning), and on CUDA the coreset's
        distance pass in that dtype: faster, at features rounded to 8 (bf16) / 11 (fp16)
        significant bits, so scores move slightly (docs/fidelity.md).
observe() and score() cut any batch into micro-batches sized from the free device memory (CUDA)
or a share of the host's available memory, so a trainer batch of 256 or an eval batch of 1024
never holds all its intermediates at once. Scoring stays on the device: no host round trip per
batch.

Trade-offs. The greedy coreset costs one pass over all N training patches per kept entry
(O(N * k * projection_dim)): seconds on a GPU, minutes on a CPU for a few hundred images at
224 px (784 patches an image); sampling=random is instant but covers worse. The search is
linear in the bank size, which is where small banks buy speed.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from freqexp import progress
from freqexp.checks import choice, number, positive_int
from freqexp.errors import ConfigError
from freqexp.freq.dwt import dwt2, wavelet_filters
from freqexp.models.backbone import LAYERS, FeatureExtractor, autocast_to
from freqexp.models.bank_search import BankIndex, available_host_bytes, fast_bf16, free_device_bytes, nearest_distance, nearest_k
from freqexp.models.base import MODELS, GradientFreeModel
from freqexp.models.coreset import approximate_greedy_coreset, greedy_coreset  # noqa: F401 (re-exported)

log = logging.getLogger("freqexp")

SAMPLINGS = ("approximate_greedy", "greedy", "random")
REDUCTIONS = ("patchcore", "avgpool", "projection", "none")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MICRO_BATCH_CAP = {"cuda": 256, "cpu": 16}  # images per micro-batch beyond which throughput no longer grows
_warned: set = set()


def warn_once(key: str, message: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def work_budget(device: torch.device) -> int:
    """Bytes a micro-batch's intermediates may take: half the free CUDA memory, or 1/16 of the
    host's available memory (at most 1 GiB: on a CPU larger batches are no faster)."""
    device = torch.device(device)
    if device.type == "cuda":
        return free_device_bytes(device) // 2
    return min(available_host_bytes() // 16, 1 << 30)


# ----------------------------------------------------------------------------- image score
def reweighted_max(dist: torch.Tensor, index: torch.Tensor, features: torch.Tensor, bank: torch.Tensor, b: int,
                   bank_index: Optional[BankIndex] = None) -> torch.Tensor:
    """PatchCore's image score (eq. 7) from per-patch nearest distances dist [B,P], their bank
    indices [B,P] and the patch features [B,P,D]: s* = max_p dist; m_test = the feature of that
    patch, m* = its nearest bank entry, N_b(m*) = the b bank entries nearest to m*;
    s = (1 - exp|m_test - m*| / sum_{m in N_b(m*)} exp|m_test - m|) * s*. b <= 1: s = s*."""
    s_star, worst = dist.max(1)
    if b <= 1 or bank.shape[0] < 2:
        return s_star
    rows = torch.arange(dist.shape[0], device=dist.device)
    m_test = features[rows, worst].float()            # [B, D]
    m_star = bank[index[rows, worst]].float()         # [B, D]
    _, support = nearest_k(m_star, bank, b, bank_index)  # [B, b]: m* itself first
    d_support = (m_test[:, None, :] - bank[support].float()).norm(dim=-1)
    d_star = (m_test - m_star).norm(dim=-1)
    weight = 1 - torch.exp(d_star - torch.logsumexp(d_support, dim=1))
    return weight * s_star


# ----------------------------------------------------------------------------- smoothing
def reflect_index(n: int, radius: int, device=None) -> torch.Tensor:
    """Indices of a length-n axis padded by `radius` on each side with scipy.ndimage's 'reflect'
    mode (d c b a | a b c d | d c b a), for any radius."""
    i = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def gaussian_filter(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter(map, sigma) on each [H, W] of [B,1,H,W]: separable,
    kernel radius int(truncate * sigma + 0.5), 'reflect' borders."""
    if sigma <= 0:
        return maps
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, device=maps.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = maps.float()
    x = x.index_select(-1, reflect_index(x.shape[-1], radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = x.index_select(-2, reflect_index(x.shape[-2], radius, maps.device))
    return F.conv2d(x, kernel.view(1, 1, -1, 1))


def reduce_channels(features: torch.Tensor, dim: int) -> torch.Tensor:
    """[B,C,h,w] -> [B,dim,h,w] by adaptive average pooling along the channels (neighbouring
    channels are averaged, or repeated when dim > C)."""
    b, c, h, w = features.shape
    flat = features.permute(0, 2, 3, 1).reshape(-1, 1, c)
    return F.adaptive_avg_pool1d(flat, dim).reshape(b, h, w, dim).permute(0, 3, 1, 2)


def check_sampling_ratio(value) -> float:
    return number("model.sampling_ratio", value, 0.0, 1.0, low_open=True)


def grid_side(side: int, deepest_stride_stages: int) -> int:
    """Feature-grid side of a ResNet stage: conv1 and maxpool halve (rounding up), then each
    strided stage after layer1."""
    for _ in range(2 + deepest_stride_stages):
        side = (side + 1) // 2
    return side


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 62


# ----------------------------------------------------------------------------- PatchCore's feature reduction
def adaptive_bins(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The [start, end) input ranges adaptive_avg_pool1d averages into each of n_out outputs."""
    i = np.arange(n_out)
    return (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)


class NeighbourhoodPooling(nn.Module):
    """PatchCore's feature reduction, the official pipeline's exact linear map, computed cheaply.

    The official code unfolds each layer into (C, k, k) neighbourhood vectors (zero padding),
    upsamples deeper grids bilinearly to the first, adaptive-average-pools every vector to
    pretrain_dim, concatenates the layers and pools to feature_dim. Unfolding and both poolings
    are one fixed linear map per layer from the neighbourhood to the output rows it reaches, and
    each output row reads a contiguous range of the channel-major (C, k, k) vector: a handful of
    consecutive channels (T at most, 1 or 2 with the paper's widths). So the map is T depthwise
    k x k convolutions of channel-gathered inputs (zero padding = unfold's), and because it mixes
    channels only, it commutes with the bilinear upsampling, which is done after it on
    feature_dim-wide outputs instead of before it on C * k^2-wide ones (layer3 of a
    WideResNet-50-2 at 224 px: 9216 upsampled channels become 512; ~45 MB of intermediates an
    image become ~6). Equal to the official pipeline up to fp32 summation order (tested)."""

    def __init__(self, channels: Sequence[int], patch_size: int, pretrain_dim: int, feature_dim: int):
        super().__init__()
        self.patch_size, self.feature_dim = patch_size, feature_dim
        k2 = patch_size * patch_size
        final_start, final_end = adaptive_bins(len(channels) * pretrain_dim, feature_dim)
        self.terms: List[int] = []  # per layer: the number of depthwise terms T
        all_rows = []
        for layer, c in enumerate(channels):
            pool_start, pool_end = adaptive_bins(c * k2, pretrain_dim)
            offset = layer * pretrain_dim
            weights: Dict[int, Dict[int, float]] = {}  # output row -> {unfolded index: weight}
            for row in range(feature_dim):
                lo, hi = max(final_start[row], offset), min(final_end[row], offset + pretrain_dim)
                for entry in range(lo, hi):
                    i = entry - offset
                    w = 1.0 / (final_end[row] - final_start[row]) / (pool_end[i] - pool_start[i])
                    for u in range(pool_start[i], pool_end[i]):
                        weights.setdefault(row, {})[u] = weights.get(row, {}).get(u, 0.0) + w
            rows = sorted(weights)
            first = np.array([min(weights[r]) // k2 for r in rows])
            terms = max(max(weights[r]) // k2 - f + 1 for r, f in zip(rows, first))
            kernels = np.zeros((terms, len(rows), k2))
            for j, r in enumerate(rows):
                for u, w in weights[r].items():
                    kernels[u // k2 - first[j], j, u % k2] += w
            self.register_buffer(f"rows{layer}", torch.tensor(rows), persistent=False)
            for t in range(terms):
                gather = np.minimum(first + t, c - 1)  # past the last channel the weights are 0
                self.register_buffer(f"gather{layer}_{t}", torch.from_numpy(gather).long(), persistent=False)
                self.register_buffer(f"kernel{layer}_{t}", torch.from_numpy(kernels[t]).float().view(len(rows), 1, patch_size, patch_size),
                                     persistent=False)
            self.terms.append(int(terms))
            all_rows += rows
        # the usual case: each layer's rows follow the previous layer's, so outputs concatenate
        self.concatenate = all_rows == list(range(feature_dim))
        self.identity = [[torch.equal(getattr(self, f"gather{l}_{t}"), torch.arange(c)) for t in range(n)]
                         for l, (c, n) in enumerate(zip(channels, self.terms))]

    def forward(self, maps: Sequence[torch.Tensor], grid: Sequence[int]) -> torch.Tensor:
        """[B, feature_dim, *grid] from the layers' maps [B, C_l, h_l, w_l]."""
        parts = []
        for layer, f in enumerate(maps):
            out = None
            for t in range(self.terms[layer]):
                src = f if self.identity[layer][t] else f.index_select(1, getattr(self, f"gather{layer}_{t}"))
                kernel = getattr(self, f"kernel{layer}_{t}")
                term = F.conv2d(src, kernel.to(src.dtype), padding=self.patch_size // 2, groups=kernel.shape[0])
                out = term if out is None else out + term
            if tuple(out.shape[-2:]) != tuple(grid):
                out = F.interpolate(out, size=tuple(grid), mode="bilinear", align_corners=False)
            parts.append(out)
        if self.concatenate:
            return torch.cat(parts, 1)
        total = parts[0].new_zeros(parts[0].shape[0], self.feature_dim, *grid)
        for layer, part in enumerate(parts):
            total.index_add_(1, getattr(self, f"rows{layer}"), part.to(total.dtype))
        return total


# ----------------------------------------------------------------------------- PatchCore
@MODELS.register("patchcore")
class PatchCore(GradientFreeModel):
    published_score = "max"  # of the patch scores, re-weighted (eq. 7): see score()
    scores_in_micro_batches = True  # sized from the device's memory (micro_batch)

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        backbone=None,
        input_size=256,
        center_crop=0.875,
        layers: Sequence[str] = ("layer2", "layer3"),
        patch_size: int = 3,
        feature_reduction: str = "patchcore",
        pretrain_dim: int = 1024,
        feature_dim: int = 1024,
        sampling: str = "approximate_greedy",
        sampling_ratio: float = 0.1,
        projection_dim: Optional[int] = 128,
        smooth_sigma: float = 4.0,
        reweight_neighbours: int = 9,
        precision: str = "auto",
    ):
        super().__init__()
        layers = [layers] if isinstance(layers, str) else list(layers)
        if not layers or len(set(layers)) != len(layers) or any(name not in LAYERS for name in layers):
            raise ConfigError("model.layers", f"must be a non-empty list of distinct ResNet stages out of {', '.join(LAYERS)}; got {layers!r}")
        self.layers = sorted(layers, key=LAYERS.index)  # the shallowest sets the patch grid
        self.patch_size = positive_int("model.patch_size", patch_size)
        if self.patch_size % 2 == 0:
            raise ConfigError("model.patch_size", f"must be odd (a centred neighbourhood); got {patch_size}")
        self.feature_reduction = choice("model.feature_reduction", feature_reduction, REDUCTIONS)
        self.pretrain_dim = positive_int("model.pretrain_dim", pretrain_dim)
        self.feature_dim = positive_int("model.feature_dim", feature_dim)
        if self.feature_reduction == "avgpool" and self.feature_dim < len(self.layers):
            raise ConfigError("model.feature_dim", f"must be at least one channel per layer ({len(self.layers)}); got {feature_dim}")
        self.sampling = choice("model.sampling", sampling, SAMPLINGS)
        self.sampling_ratio = check_sampling_ratio(sampling_ratio)
        self.projection_dim = None if projection_dim is None else positive_int("model.projection_dim", projection_dim)
        self.smooth_sigma = number("model.smooth_sigma", smooth_sigma, 0.0)
        self.reweight_neighbours = positive_int("model.reweight_neighbours", reweight_neighbours)
        self.precision = choice("model.precision", precision, PRECISIONS)

        self.extractor = FeatureExtractor(in_shape, self.layers, backbone, input_size, center_crop)
        channels = [self.extractor.channels(name) for name in self.layers]
        if self.feature_reduction == "projection":
            # fixed Gaussian projection (Johnson-Lindenstrauss): distances kept up to ~1/sqrt(dim)
            self.register_buffer("reduction_matrix", torch.randn(sum(channels), self.feature_dim) / math.sqrt(self.feature_dim))
        if self.feature_reduction == "patchcore":
            self.pooling = NeighbourhoodPooling(channels, self.patch_size, self.pretrain_dim, self.feature_dim)
        self.cnn_dim = sum(channels) if self.feature_reduction == "none" else self.feature_dim
        # a seed for the coreset's projection / starts / random subset, drawn from the run's RNG now
        self.sampling_seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        self.register_buffer("memory_bank", torch.zeros(0, self.feature_width()))
        self.register_buffer("stream_scales", torch.ones(len(self.stream_dims())))
        self._observed: List[torch.Tensor] = []
        self._index: Optional[BankIndex] = None  # the bank's search index (bank_index), rebuilt when the bank changes
        self._micro: Dict[tuple, int] = {}  # micro-batch sizes per (device, image shape, dtype)

    # -- precision
    def compute_dtype(self, device: torch.device) -> Optional[torch.dtype]:
        """The autocast dtype of the backbone and feature pipeline (None: fp32)."""
        device = torch.device(device)
        if self.precision == "bf16":
            if fast_bf16(device):
                return torch.bfloat16
            warn_once(f"bf16-{device.type}", "model.precision=bf16: this %s has no fast bf16 (CUDA sm80+ or a CPU with AMX / AVX512-BF16); "
                      "running in fp32", device.type.upper() if device.type == "cuda" else "CPU")
        elif self.precision == "fp16":
            if device.type == "cuda":
                return torch.float16
            warn_once("fp16-cpu", "model.precision=fp16 is a CUDA setting; running in fp32 on the CPU (model.precision=bf16 for a fast CPU path)")
        return None

    def search_mode(self, device: torch.device) -> str:
        """The nearest-neighbour search: precision=fp32 the plain fp32 product; otherwise a bf16 shortlist
        re-ranked in fp32 where bf16 is fast, else on a CPU the pruned exact search (a principal-subspace
        lower bound skips most of the product; bank_search), on CUDA the fp32 product."""
        if self.precision == "fp32":
            return "fp32"
        if fast_bf16(device):
            return "bf16"
        return "pruned" if torch.device(device).type == "cpu" else "fp32"

    def bank_index(self) -> BankIndex:
        """The bank's search index (squared norms, bf16 copy), built once per bank: rebuilt only
        when the bank is replaced, loaded, modified in place or moved."""
        bank = self.memory_bank
        search = self.search_mode(bank.device)
        if self._index is None or not self._index.matches(bank, search):
            self._index = BankIndex(bank, search)
        return self._index

    # -- patch features
    def stream_dims(self) -> List[int]:
        return [self.cnn_dim]

    def stream_weights(self) -> List[float]:
        return [1.0]

    def feature_width(self) -> int:
        return sum(self.stream_dims())

    def patches_per_image(self) -> int:
        h, w = self.extractor.backbone_size()
        stages = LAYERS.index(self.layers[0])
        return grid_side(h, stages) * grid_side(w, stages)

    def check_fit(self, n_images: int, device: torch.device) -> None:
        """Refuse, before any work, a fit whose training patch features cannot be held."""
        need = n_images * self.patches_per_image() * self.feature_width() * 4
        have = available_memory_bytes(device)
        if need > 0.6 * have:
            h, w = self.extractor.backbone_size()
            raise ConfigError("model.feature_dim", f"{n_images} training images x {self.patches_per_image()} patches ({h}x{w} px at the "
                              f"backbone) x {self.feature_width()} dims = {need / 2**30:.1f} GiB of patch features, over 60 % of the "
                              f"{have / 2**30:.0f} GiB this {'GPU' if device.type == 'cuda' else 'machine'} has; lower dataset.limit_train, "
                              "model.input_size or model.feature_dim")

    def cnn_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, D, h, w] locally aware CNN features on the grid of the shallowest layer,
        the deepest layer's raw output), in the caller's autocast context (see raw_features)."""
        maps = self.extractor.backbone(self.extractor.prepare_input(x), self.layers, fast=True)
        grid = maps[self.layers[0]].shape[-2:]
        if self.feature_reduction == "patchcore":
            return self.pooling([maps[name] for name in self.layers], grid), maps[self.layers[-1]]
        pad = self.patch_size // 2
        parts = []
        for i, name in enumerate(self.layers):
            f = maps[name]
            if self.patch_size > 1:
                f = F.avg_pool2d(f, self.patch_size, stride=1, padding=pad, count_include_pad=False)
            if f.shape[-2:] != grid:
                f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            if self.feature_reduction == "avgpool":  # every layer gets an equal share of the width
                share = self.feature_dim // len(self.layers) + (1 if i < self.feature_dim % len(self.layers) else 0)
                f = reduce_channels(f, share)
            parts.append(f)
        features = torch.cat(parts, 1)
        if self.feature_reduction == "projection":
            features = torch.einsum("bchw,cd->bdhw", features, self.reduction_matrix)
        return features, maps[self.layers[-1]]

    def streams(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Unscaled feature streams, each [B, d_i, h, w]."""
        return [self.cnn_features(x)[0]]

    def raw_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, h, w, D]: the streams side by side, fp32, before stream scaling; computed in
        `precision` (autocast off, or to bf16 / fp16)."""
        with torch.no_grad(), autocast_to(x.device.type, self.compute_dtype(x.device)):
            streams = [s.float() for s in self.streams(x.float())]
            return (streams[0] if len(streams) == 1 else torch.cat(streams, 1)).permute(0, 2, 3, 1)

    def scale_streams(self, features: torch.Tensor) -> torch.Tensor:
        if len(self.stream_dims()) == 1:
            return features
        scales = torch.repeat_interleave(self.stream_scales.to(features), torch.tensor(self.stream_dims(), device=features.device))
        return features * scales

    # -- micro-batches
    def bytes_per_image(self, image_size: Sequence[int]) -> int:
        """An upper estimate of one image's intermediates: the backbone's, the feature pipeline's
        (a few copies of its [D, h, w] output) and the map's at the backbone's size."""
        h, w = self.extractor.backbone_size(image_size)
        return self.extractor.activation_bytes(image_size) + 4 * 4 * self.feature_width() * self.patches_per_image() + 4 * 4 * h * w

    def micro_batch(self, x: torch.Tensor) -> int:
        """Images per micro-batch for inputs like x: the work budget of the device (free CUDA
        memory, or a share of the host's available memory) over bytes_per_image; measured once
        per device, image shape and dtype, so no batch pays for it."""
        key = (x.device, tuple(x.shape[1:]), self.compute_dtype(x.device))
        size = self._micro.get(key)
        if size is None:
            size = max(1, min(MICRO_BATCH_CAP.get(x.device.type, 16), work_budget(x.device) // self.bytes_per_image(x.shape[-2:])))
            self._micro[key] = size
        return size

    # -- fitting
    def observe(self, x: torch.Tensor) -> None:
        for part in x.split(self.micro_batch(x)):
            self._observed.append(self.raw_features(part).reshape(-1, self.feature_width()))
            progress.advance(part.shape[0])  # a caller's progress chunk (freqexp.progress); no device sync

    def finalize(self) -> None:
        """Build the bank from the features observed since the last finalize(); with none
        observed, keep the bank there is (finalize is idempotent; a loaded bank stays)."""
        if not self._observed:
            if self.memory_bank.shape[0] == 0:
                raise RuntimeError(f"{type(self).__name__}.finalize(): no training images were observed")
            return
        features = torch.cat(self._observed)
        self._observed = []  # the bank is built from these; release them
        with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
            self.stream_scales = self.fit_stream_scales(features)
            features = self.scale_streams(features)
            chosen = self.select(features)
            self.memory_bank = features if chosen is None else features[chosen].contiguous()
        del features
        self._index = None
        self.bank_index()  # the search's norms and bf16 copy, once per bank

    def fit_stream_scales(self, features: torch.Tensor) -> torch.Tensor:
        """Per-stream multipliers giving stream i a mean patch norm of weight_i times the first
        stream's, so that no stream dominates the distance by its units alone."""
        parts = features.split(self.stream_dims(), dim=1)
        norms = [p.norm(dim=1).mean() for p in parts]
        scales = [torch.ones((), device=features.device)]
        for weight, norm in zip(self.stream_weights()[1:], norms[1:]):
            scales.append(weight * norms[0] / norm.clamp_min(1e-12 * float(norms[0]) + 1e-30))
        return torch.stack(scales).float()

    def bank_size(self, n: int) -> int:
        return max(1, min(n, int(self.sampling_ratio * n)))  # the official int(n * ratio)

    def coreset_dtype(self, device: torch.device) -> Optional[torch.dtype]:
        """The coreset's distance pass: fp32, except bf16 / fp16 precision on CUDA (see coreset.py)."""
        return self.compute_dtype(device) if torch.device(device).type == "cuda" else None

    def select(self, features: torch.Tensor) -> Optional[torch.Tensor]:
        """The bank's rows of `features` (None: all of them)."""
        n, k = features.shape[0], self.bank_size(features.shape[0])
        if k == n:
            return None
        gen = torch.Generator().manual_seed(self.sampling_seed)  # on CPU: the same choice on any device
        if self.sampling == "random":
            return torch.randperm(n, generator=gen)[:k].sort().values.to(features.device)
        low = self.coreset_dtype(features.device)
        if self.sampling == "greedy":
            return greedy_coreset(features, k, start=0, low_precision=low)
        dim = features.shape[1]
        if self.projection_dim is not None and self.projection_dim < dim:
            # a random linear map, as the official torch.nn.Linear(dim, 128, bias=False) projection
            bound = 1 / math.sqrt(dim)
            projection = (torch.rand(dim, self.projection_dim, generator=gen) * 2 - 1).mul_(bound).to(features.device)
            with torch.no_grad():
                features = features @ projection
        return approximate_greedy_coreset(features, k, gen, low_precision=low)

    # -- scoring
    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.memory_bank.shape[0] == 0:
            raise RuntimeError(f"{type(self).__name__}: the memory bank is empty; fit (observe + finalize) or load a state dict first")
        return self.scale_streams(self.raw_features(x))

    def patch_scores(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, h, w] distances of each patch to its nearest bank entry."""
        features = self.patch_features(x)
        b, h, w, d = features.shape
        return nearest_distance(features.reshape(-1, d), self.memory_bank, self.bank_index()).view(b, 1, h, w)

    def patch_map(self, patch: torch.Tensor, image_size) -> torch.Tensor:
        """Patch scores -> the anomaly map: upsampled to the backbone input, smoothed there, put on the image."""
        size = self.extractor.backbone_size(image_size)
        maps = F.interpolate(patch.float(), size=size, mode="bilinear", align_corners=False)
        return self.extractor.to_image_frame(gaussian_filter(maps, self.smooth_sigma), image_size)

    @torch.no_grad()
    def score(self, x: torch.Tensor, target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # target is not used: the bank holds features of model inputs, so inputs are compared
        with torch.autocast(x.device.type, enabled=False):
            if self.memory_bank.shape[0] == 0:
                self.patch_features(x[:0])  # the empty-bank error
            index = self.bank_index()
            parts = []
            for part in x.split(self.micro_batch(x)):
                parts.append(self.score_micro_batch(part, index))
                progress.advance(part.shape[0])
            return torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts])

    def score_micro_batch(self, x: torch.Tensor, index: BankIndex) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.patch_features(x)
        b, h, w, d = features.shape
        dist, nearest = nearest_k(features.reshape(-1, d), self.memory_bank, 1, index)
        dist, nearest = dist.view(b, h * w), nearest.view(b, h * w)
        maps = self.patch_map(dist.view(b, 1, h, w), x.shape[-2:])
        scores = reweighted_max(dist, nearest, features.reshape(b, h * w, d), self.memory_bank, self.reweight_neighbours, index)
        return maps, scores

    @torch.no_grad()
    def anomaly_map(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return torch.cat([self.patch_map(self.patch_scores(part), x.shape[-2:]) for part in x.split(self.micro_batch(x))])

    def evaluated_region(self, image_size) -> Optional[tuple[int, int, int, int]]:
        from freqexp.models.backbone import crop_box

        height, width = int(image_size[0]), int(image_size[1])
        box = crop_box(height, width, self.extractor.center_crop)
        return None if box[2:] == (height, width) else box

    def score_description(self) -> str:
        if self.reweight_neighbours > 1:
            return f"largest patch distance re-weighted by its {self.reweight_neighbours} bank neighbours (PatchCore eq. 7)"
        return "largest patch distance (PatchCore's official code)"

    # -- the bank's size is only known after fitting: take the saved one's shape on load
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("memory_bank",):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor) and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty(saved.shape, dtype=getattr(self, name).dtype, device=getattr(self, name).device))
        self._observed = []
        self._index = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ----------------------------------------------------------------------------- PatchCore + DWT (ours)
def dwt_magnitudes(x: torch.Tensor, filters, grid: Sequence[int]) -> torch.Tensor:
    """[B, 3, h, w]: |LH|, |HL|, |HH| of a one-level periodized DWT of the grayscale image
    (channel mean of 1 channel, ITU-R 601 luma of 3), each averaged over the cells of the
    h x w grid (adaptive average pooling)."""
    x = x.float()
    if x.shape[1] == 3:
        gray = torch.tensordot(x, torch.tensor([0.299, 0.587, 0.114], device=x.device), dims=([1], [0]))
    else:
        gray = x.mean(1)
    _, details = dwt2(gray, filters)
    return F.adaptive_avg_pool2d(torch.stack(details, 1).abs(), tuple(grid))


@MODELS.register("patchcore_dwt")
class PatchCoreDWT(PatchCore):
    def __init__(
        self,
        in_shape: tuple[int, int, int],
        backbone=None,
        input_size=64,
        center_crop=None,
        layers: Sequence[str] = ("layer2", "layer3"),
        patch_size: int = 3,
        feature_reduction: str = "avgpool",
        pretrain_dim: int = 1024,
        feature_dim: int = 128,
        sampling: str = "approximate_greedy",
        sampling_ratio: float = 0.1,
        projection_dim: Optional[int] = 128,
        smooth_sigma: float = 1.0,
        reweight_neighbours: int = 1,
        wavelet: str = "haar",
        use_semantic: bool = True,
        freq_weight: float = 1.0,
        precision: str = "auto",
    ):
        wavelet = choice("model.wavelet", wavelet, ("haar", "bior2.2"))
        if not isinstance(use_semantic, bool):
            raise ConfigError("model.use_semantic", f"must be true or false; got {use_semantic!r}")
        freq_weight = number("model.freq_weight", freq_weight, 0.0)
        super().__init__(in_shape, backbone, input_size, center_crop, layers, patch_size, feature_reduction, pretrain_dim,
                         feature_dim, sampling, sampling_ratio, projection_dim, smooth_sigma, reweight_neighbours, precision)
        self.wavelet, self.use_semantic, self.freq_weight = wavelet, use_semantic, freq_weight
        for name, t in wavelet_filters(self.wavelet).items():
            self.register_buffer(name, t, persistent=False)

    def stream_dims(self) -> List[int]:
        return [self.cnn_dim, 3]

    def stream_weights(self) -> List[float]:
        return [1.0, self.freq_weight]

    def semantic_attention(self, deepest: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """[B, 1, h, w] in [0, 1]: the deepest layer's mean activation over its channels (its
        inputs are ReLU outputs, so the mean is an activation energy), upsampled to the grid
        and divided by each image's maximum."""
        energy = F.interpolate(deepest.abs().mean(1, keepdim=True), size=tuple(grid), mode="bilinear", align_corners=False)
        return energy / energy.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)

    def streams(self, x: torch.Tensor) -> List[torch.Tensor]:
        cnn, deepest = self.cnn_features(x)
        grid = cnn.shape[-2:]
        if self.use_semantic:
            cnn = cnn * (1.0 + self.semantic_attention(deepest, grid))
        filters = {k: getattr(self, k) for k in ("dec_lo", "dec_hi", "rec_lo", "rec_hi")}
        return [cnn, dwt_magnitudes(x, filters, grid)]
