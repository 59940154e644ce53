"""Memory-bank detectors fitted without gradients: PatchCore and our PatchCore + DWT variant.
(WEDGE-Net, which shares the bank, the coreset and the nearest-neighbour search, is in wedge.py.)

  patchcore      Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022;
                 official code amazon-science/patchcore-inspection. Defaults are the paper's:
                 a frozen ImageNet WideResNet-50-2; every image resized to 256 and centre-cropped
                 to 224; layer2 and layer3 features; each location described by its 3x3
                 neighbourhood (unfolded, zero padded), layer3's grid bilinearly upsampled to
                 layer2's, each layer's flattened (C, 3, 3) vector adaptively average-pooled to
                 1024 values, the two layers' vectors pooled together to 1024 (the official
                 MeanMapper / Aggregator); a bank of 10 % of the training patches chosen by the
                 approximate greedy coreset (a random 128-d projection, 10 random starting
                 points whose mean distance seeds the k-center search). A test patch scores its
                 Euclidean distance to the nearest bank entry. Map: the patch scores bilinearly
                 upsampled to the 224 px backbone input, Gaussian-smoothed with sigma 4 (scipy's
                 gaussian_filter: reflect borders, truncated at 4 sigma), then put back on the
                 image (the crop's border, which the backbone never saw, repeats the crop's edge).
                 Image score: the paper's eq. 7, the largest patch score s* re-weighted by
                 1 - softmax over its b = 9 nearest bank neighbours (`reweight_neighbours`; 1 =
                 the plain max, which is what the official repository computes).
  patchcore_dwt  our variant (not a published method): the PatchCore bank over CNN patch features
                 plus a frequency stream, the magnitudes of the input's one-level DWT detail
                 sub-bands (|LH|, |HL|, |HH|) averaged over each patch's cell, scaled to a share
                 `freq_weight` of the CNN stream's mean norm; an optional semantic re-weighting of
                 the CNN features by (1 + the deepest layer's normalised activation energy).

Trade-offs. The greedy coreset costs one pass over all N training patches per kept entry
(O(N * k * projection_dim)): seconds on a GPU, minutes to hours on a CPU for a whole
Fashion-MNIST class at 224 px (784 patches an image); sampling=random is instant but covers
worse. Scoring is exact nearest-neighbour search (chunked torch.cdist in fp32), linear in the
bank size, which is where small banks buy speed.
"""
from __future__ import annotations

import logging
import math
import os
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from freqexp.errors import ConfigError
from freqexp.freq.dwt import dwt2, wavelet_filters
from freqexp.models.backbone import LAYERS, FeatureExtractor
from freqexp.models.base import MODELS, GradientFreeModel, choice, number, positive_int

log = logging.getLogger("freqexp")

QUERY_CHUNK = 2048  # test patches per cdist block
BANK_CHUNK = 8192   # bank entries per cdist block: 2048 x 8192 fp32 = 64 MiB per block
SAMPLINGS = ("approximate_greedy", "greedy", "random")
REDUCTIONS = ("patchcore", "avgpool", "projection", "none")


# ----------------------------------------------------------------------------- coresets
def greedy_coreset(features: torch.Tensor, k: int, start: int = 0) -> torch.Tensor:
    """Indices of k rows chosen by exact greedy k-center: begin at `start`, then repeatedly add
    the row farthest from everything chosen so far. [k] int64 on features' device."""
    features = features.float()
    n = features.shape[0]
    sq_norms = features.pow(2).sum(1)
    min_dist = torch.full((n,), float("inf"), device=features.device)
    chosen = torch.empty(k, dtype=torch.long, device=features.device)
    idx = torch.tensor([start], device=features.device)
    for i in range(k):  # idx stays a tensor: no device sync per step on a GPU
        chosen[i : i + 1] = idx
        _cover(features, sq_norms, idx, min_dist)
        idx = torch.argmax(min_dist).view(1)
    return chosen


def _cover(features: torch.Tensor, sq_norms: torch.Tensor, idx: torch.Tensor, min_dist: torch.Tensor) -> None:
    """min_dist = min(min_dist, squared distance of every row to row idx), in place."""
    center = features.index_select(0, idx).squeeze(0)
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2 in one matrix-vector pass (memory-bound: few passes)
    dist = torch.addmv(sq_norms, features, center, alpha=-2.0).add_(sq_norms.index_select(0, idx)).clamp_min_(0)
    torch.minimum(min_dist, dist, out=min_dist)
    min_dist.index_fill_(0, idx, 0.0)  # rounding must not make a chosen row look uncovered


def approximate_greedy_coreset(features: torch.Tensor, k: int, generator: torch.Generator, n_starts: int = 10) -> torch.Tensor:
    """PatchCore's approximate greedy coreset: the k-center search starts from every row's mean
    distance to `n_starts` random rows (which are not themselves selected), then adds the
    farthest row k times. (Distances are compared squared: the same order as Euclidean.)"""
    features = features.float()
    n = features.shape[0]
    starts = torch.randperm(n, generator=generator)[: min(n_starts, n)].to(features.device)
    min_dist = torch.cdist(features, features.index_select(0, starts)).mean(1).pow(2)
    sq_norms = features.pow(2).sum(1)
    chosen = torch.empty(k, dtype=torch.long, device=features.device)
    for i in range(k):
        idx = torch.argmax(min_dist).view(1)
        chosen[i : i + 1] = idx
        _cover(features, sq_norms, idx, min_dist)
    return chosen


# ----------------------------------------------------------------------------- nearest neighbours
def nearest_k(queries: torch.Tensor, bank: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances [Q, k] (ascending) and indices [Q, k] of each query's k nearest bank
    rows, fp32, chunked so that no more than QUERY_CHUNK x BANK_CHUNK distances exist at once."""
    with torch.autocast(queries.device.type, enabled=False):
        queries, bank = queries.float(), bank.float()
        k = min(k, bank.shape[0])
        dists, idxs = [], []
        for q in queries.split(QUERY_CHUNK):
            best_d = torch.full((q.shape[0], 0), float("inf"), device=q.device)
            best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
            for offset in range(0, bank.shape[0], BANK_CHUNK):
                b = bank[offset : offset + BANK_CHUNK]
                d, i = torch.cdist(q, b).topk(min(k, b.shape[0]), dim=1, largest=False)
                keep = min(k, best_d.shape[1] + d.shape[1])
                best_d, order = torch.cat([best_d, d], 1).topk(keep, dim=1, largest=False)
                best_i = torch.cat([best_i, i + offset], 1).gather(1, order)
            dists.append(best_d)
            idxs.append(best_i)
        if not dists:
            return queries.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=queries.device)
        return torch.cat(dists), torch.cat(idxs)


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every query row to its nearest bank row, [Q]."""
    return nearest_k(queries, bank, 1)[0][:, 0]


def reweighted_max(dist: torch.Tensor, index: torch.Tensor, features: torch.Tensor, bank: torch.Tensor, b: int) -> torch.Tensor:
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
    _, support = nearest_k(m_star, bank, b)           # [B, b]: m* itself first
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


# ----------------------------------------------------------------------------- PatchCore
@MODELS.register("patchcore")
class PatchCore(GradientFreeModel):
    published_score = "max"  # of the patch scores, re-weighted (eq. 7): see score()

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

        self.extractor = FeatureExtractor(in_shape, self.layers, backbone, input_size, center_crop)
        channels = [self.extractor.channels(name) for name in self.layers]
        if self.feature_reduction == "projection":
            # fixed Gaussian projection (Johnson-Lindenstrauss): distances kept up to ~1/sqrt(dim)
            self.register_buffer("reduction_matrix", torch.randn(sum(channels), self.feature_dim) / math.sqrt(self.feature_dim))
        self.cnn_dim = sum(channels) if self.feature_reduction == "none" else self.feature_dim
        # a seed for the coreset's projection / starts / random subset, drawn from the run's RNG now
        self.sampling_seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        self.register_buffer("memory_bank", torch.zeros(0, self.feature_width()))
        self.register_buffer("stream_scales", torch.ones(len(self.stream_dims())))
        self._observed: List[torch.Tensor] = []

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
        the deepest layer's raw output)."""
        maps = self.extractor(x)
        grid = maps[self.layers[0]].shape[-2:]
        if self.feature_reduction == "patchcore":
            return self.patchcore_features(maps, grid), maps[self.layers[-1]]
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

    def patchcore_features(self, maps, grid) -> torch.Tensor:
        """The official pipeline: each layer unfolded into (C, k, k) neighbourhood vectors (zero
        padding), deeper grids upsampled bilinearly to the first, each vector adaptively
        average-pooled to pretrain_dim, the layers' vectors concatenated and pooled to feature_dim."""
        k, pad = self.patch_size, self.patch_size // 2
        per_layer = []
        for name in self.layers:
            f = maps[name]
            b, c, h, w = f.shape
            u = F.unfold(f, k, padding=pad).view(b, c * k * k, h, w)
            if (h, w) != tuple(grid):
                u = F.interpolate(u, size=tuple(grid), mode="bilinear", align_corners=False)
            flat = u.permute(0, 2, 3, 1).reshape(-1, 1, c * k * k)
            per_layer.append(F.adaptive_avg_pool1d(flat, self.pretrain_dim))
        stacked = torch.cat(per_layer, dim=2)  # [N, 1, L * pretrain_dim]
        out = F.adaptive_avg_pool1d(stacked, self.feature_dim).squeeze(1)
        b = maps[self.layers[0]].shape[0]
        return out.view(b, grid[0], grid[1], self.feature_dim).permute(0, 3, 1, 2)

    def streams(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Unscaled feature streams, each [B, d_i, h, w]."""
        return [self.cnn_features(x)[0]]

    def raw_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, h, w, D]: the streams side by side, fp32, before stream scaling."""
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            return torch.cat([s.float() for s in self.streams(x.float())], 1).permute(0, 2, 3, 1)

    def scale_streams(self, features: torch.Tensor) -> torch.Tensor:
        if len(self.stream_dims()) == 1:
            return features
        scales = torch.repeat_interleave(self.stream_scales.to(features), torch.tensor(self.stream_dims(), device=features.device))
        return features * scales

    # -- fitting
    def observe(self, x: torch.Tensor) -> None:
        self._observed.append(self.raw_features(x).reshape(-1, self.feature_width()))

    def finalize(self) -> None:
        """Build the bank from the features observed since the last finalize(); with none
        observed, keep the bank there is (finalize is idempotent; a loaded bank stays)."""
        if not self._observed:
            if self.memory_bank.shape[0] == 0:
                raise RuntimeError(f"{type(self).__name__}.finalize(): no training images were observed")
            return
        features = torch.cat(self._observed)
        self._observed = []  # the bank is built from these; release them
        self.stream_scales = self.fit_stream_scales(features)
        features = self.scale_streams(features)
        self.memory_bank = features[self.select(features)].contiguous()

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

    def select(self, features: torch.Tensor) -> torch.Tensor:
        n, k = features.shape[0], self.bank_size(features.shape[0])
        if k == n:
            return torch.arange(n, device=features.device)
        gen = torch.Generator().manual_seed(self.sampling_seed)  # on CPU: the same choice on any device
        if self.sampling == "random":
            return torch.randperm(n, generator=gen)[:k].sort().values.to(features.device)
        if self.sampling == "greedy":
            return greedy_coreset(features, k, start=0)
        dim = features.shape[1]
        if self.projection_dim is not None and self.projection_dim < dim:
            # a random linear map, as the official torch.nn.Linear(dim, 128, bias=False) projection
            bound = 1 / math.sqrt(dim)
            projection = (torch.rand(dim, self.projection_dim, generator=gen) * 2 - 1).mul_(bound).to(features.device)
            features = features @ projection
        return approximate_greedy_coreset(features, k, gen)

    # -- scoring
    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.memory_bank.shape[0] == 0:
            raise RuntimeError(f"{type(self).__name__}: the memory bank is empty; fit (observe + finalize) or load a state dict first")
        return self.scale_streams(self.raw_features(x))

    def patch_scores(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, h, w] distances of each patch to its nearest bank entry."""
        features = self.patch_features(x)
        b, h, w, d = features.shape
        return nearest_distance(features.reshape(-1, d), self.memory_bank).view(b, 1, h, w)

    def patch_map(self, patch: torch.Tensor, image_size) -> torch.Tensor:
        """Patch scores -> the anomaly map: upsampled to the backbone input, smoothed there, put on the image."""
        size = self.extractor.backbone_size(image_size)
        maps = F.interpolate(patch.float(), size=size, mode="bilinear", align_corners=False)
        return self.extractor.to_image_frame(gaussian_filter(maps, self.smooth_sigma), image_size)

    @torch.no_grad()
    def score(self, x: torch.Tensor, target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # target is not used: the bank holds features of model inputs, so inputs are compared
        with torch.autocast(x.device.type, enabled=False):
            features = self.patch_features(x)
            b, h, w, d = features.shape
            dist, index = nearest_k(features.reshape(-1, d), self.memory_bank, 1)
            dist, index = dist.view(b, h * w), index.view(b, h * w)
            maps = self.patch_map(dist.view(b, 1, h, w), x.shape[-2:])
            scores = reweighted_max(dist, index, features.reshape(b, h * w, d), self.memory_bank, self.reweight_neighbours)
            return maps, scores

    @torch.no_grad()
    def anomaly_map(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.patch_map(self.patch_scores(x), x.shape[-2:])

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
    ):
        wavelet = choice("model.wavelet", wavelet, ("haar", "bior2.2"))
        if not isinstance(use_semantic, bool):
            raise ConfigError("model.use_semantic", f"must be true or false; got {use_semantic!r}")
        freq_weight = number("model.freq_weight", freq_weight, 0.0)
        super().__init__(in_shape, backbone, input_size, center_crop, layers, patch_size, feature_reduction, pretrain_dim,
                         feature_dim, sampling, sampling_ratio, projection_dim, smooth_sigma, reweight_neighbours)
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
