"""Memory-bank detectors fitted without gradients: PatchCore and WEDGE-Net.

  patchcore  Roth et al. 2022. A frozen ImageNet ResNet describes every patch of a training
             image by its layer2 and layer3 features (layer3 upsampled to layer2's grid), each
             averaged over its 3x3 neighbourhood ("locally aware" features) and reduced to a
             fixed width. All training patches form the memory bank, optionally thinned to a
             `sampling_ratio` by a greedy k-center coreset, which keeps the bank's coverage of
             the normal features (every feature stays close to some kept one) while a random
             subset leaves rare normal patterns uncovered. A test patch scores its distance to
             the nearest bank entry; the patch scores, upsampled to the image, are the map.
  wedge      WEDGE-Net (Park et al.): the same bank over richer patch features. A frequency
             stream appends the magnitudes of the input's one-level DWT detail sub-bands (LH,
             HL, HH; haar or bior2.2) averaged over each patch's cell of the feature grid, so
             fine texture and edge energy counts directly in the distance. An optional semantic
             stream re-weights the CNN features by a spatial attention map taken from the
             deepest features (their channel-mean activation, divided by its per-image maximum):
             features * (1 + attention), which stresses salient (object) regions over flat
             background. The streams are put on one scale when the bank is built: the
             frequency stream is multiplied by freq_weight * mean|cnn| / mean|freq| (mean patch
             norms over the training features), stored with the bank.

Trade-offs. The greedy coreset costs one pass over all N training patches per kept entry
(O(N * k * projection_dim)): seconds on a GPU, minutes on a CPU for a full Fashion-MNIST class
at 10 %; sampling=random is instant but covers worse. Scoring is exact nearest-neighbour search
(chunked torch.cdist in fp32), linear in the bank size, which is where small banks buy speed.
The original's image-score re-weighting (softmax over the neighbours of the worst patch) is
left out: the image score is the configured reduction of the map (score.reduction=max is
PatchCore's choice).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from freqexp.errors import ConfigError
from freqexp.freq.dwt import dwt2, wavelet_filters
from freqexp.models.backbone import LAYERS, FeatureExtractor
from freqexp.models.base import MODELS, GradientFreeModel, choice, number, positive_int

QUERY_CHUNK = 2048  # test patches per cdist block
BANK_CHUNK = 8192   # bank entries per cdist block: 2048 x 8192 fp32 = 64 MiB per block


def greedy_coreset(features: torch.Tensor, k: int, start: int = 0) -> torch.Tensor:
    """Indices of k rows chosen by greedy k-center: begin at `start`, then repeatedly add the
    row farthest from everything chosen so far. [k] int64 on features' device."""
    features = features.float()
    n = features.shape[0]
    sq_norms = features.pow(2).sum(1)
    min_dist = torch.full((n,), float("inf"), device=features.device)
    chosen = torch.empty(k, dtype=torch.long, device=features.device)
    idx = torch.tensor([start], device=features.device)
    for i in range(k):  # idx stays a tensor: no device sync per step on a GPU
        chosen[i : i + 1] = idx
        center = features.index_select(0, idx).squeeze(0)
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2 in one matrix-vector pass (memory-bound: few passes)
        dist = torch.addmv(sq_norms, features, center, alpha=-2.0).add_(sq_norms.index_select(0, idx))
        torch.minimum(min_dist, dist, out=min_dist)
        min_dist.index_fill_(0, idx, 0.0)  # rounding must not make a chosen row look uncovered
        idx = torch.argmax(min_dist).view(1)
    return chosen


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every query row to its nearest bank row, [Q], in fp32, chunked
    so that no more than QUERY_CHUNK x BANK_CHUNK distances exist at once."""
    with torch.autocast(queries.device.type, enabled=False):
        queries, bank = queries.float(), bank.float()
        out = []
        for q in queries.split(QUERY_CHUNK):
            best = torch.full((q.shape[0],), float("inf"), device=q.device)
            for b in bank.split(BANK_CHUNK):
                best = torch.minimum(best, torch.cdist(q, b).amin(1))
            out.append(best)
        return torch.cat(out) if out else queries.new_zeros(0)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable gaussian smoothing of [B,1,H,W] (edges replicated), radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=maps.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.pad(maps, (radius, radius, 0, 0), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(x, kernel.view(1, 1, -1, 1))


def reduce_channels(features: torch.Tensor, dim: int) -> torch.Tensor:
    """[B,C,h,w] -> [B,dim,h,w] by adaptive average pooling along the channels (PatchCore's
    per-layer reduction: neighbouring channels are averaged, or repeated when dim > C)."""
    b, c, h, w = features.shape
    flat = features.permute(0, 2, 3, 1).reshape(-1, 1, c)
    return F.adaptive_avg_pool1d(flat, dim).reshape(b, h, w, dim).permute(0, 3, 1, 2)


def check_sampling_ratio(value) -> float:
    return number("model.sampling_ratio", value, 0.0, 1.0, low_open=True)


@MODELS.register("patchcore")
class PatchCore(GradientFreeModel):
    def __init__(
        self,
        in_shape: tuple[int, int, int],
        backbone=None,
        input_size=64,
        layers: Sequence[str] = ("layer2", "layer3"),
        patch_size: int = 3,
        feature_reduction: str = "avgpool",
        feature_dim: int = 128,
        sampling: str = "greedy",
        sampling_ratio: float = 0.1,
        projection_dim: Optional[int] = 128,
        smooth_sigma: float = 1.0,
    ):
        super().__init__()
        layers = [layers] if isinstance(layers, str) else list(layers)
        if not layers or len(set(layers)) != len(layers) or any(name not in LAYERS for name in layers):
            raise ConfigError("model.layers", f"must be a non-empty list of distinct ResNet stages out of {', '.join(LAYERS)}; got {layers!r}")
        self.layers = sorted(layers, key=LAYERS.index)  # the shallowest sets the patch grid
        self.patch_size = positive_int("model.patch_size", patch_size)
        if self.patch_size % 2 == 0:
            raise ConfigError("model.patch_size", f"must be odd (a centred neighbourhood); got {patch_size}")
        self.feature_reduction = choice("model.feature_reduction", feature_reduction, ("avgpool", "projection", "none"))
        self.feature_dim = positive_int("model.feature_dim", feature_dim)
        if self.feature_reduction == "avgpool" and self.feature_dim < len(self.layers):
            raise ConfigError("model.feature_dim", f"must be at least one channel per layer ({len(self.layers)}); got {feature_dim}")
        self.sampling = choice("model.sampling", sampling, ("greedy", "random"))
        self.sampling_ratio = check_sampling_ratio(sampling_ratio)
        self.projection_dim = None if projection_dim is None else positive_int("model.projection_dim", projection_dim)
        self.smooth_sigma = number("model.smooth_sigma", smooth_sigma, 0.0)

        self.extractor = FeatureExtractor(in_shape, self.layers, backbone, input_size)
        channels = [self.extractor.channels(name) for name in self.layers]
        if self.feature_reduction == "projection":
            # fixed Gaussian projection (Johnson-Lindenstrauss): distances kept up to ~1/sqrt(dim)
            self.register_buffer("reduction_matrix", torch.randn(sum(channels), self.feature_dim) / math.sqrt(self.feature_dim))
        self.cnn_dim = sum(channels) if self.feature_reduction == "none" else self.feature_dim
        # a seed for the coreset's projection / start / random subset, drawn from the run's RNG now
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

    def cnn_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, D, h, w] locally aware CNN features on the grid of the shallowest layer,
        the deepest layer's raw output)."""
        maps = self.extractor(x)
        grid = maps[self.layers[0]].shape[-2:]
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
        return max(1, min(n, int(round(self.sampling_ratio * n))))

    def select(self, features: torch.Tensor) -> torch.Tensor:
        n, k = features.shape[0], self.bank_size(features.shape[0])
        if k == n:
            return torch.arange(n, device=features.device)
        gen = torch.Generator().manual_seed(self.sampling_seed)  # on CPU: the same choice on any device
        if self.sampling == "random":
            return torch.randperm(n, generator=gen)[:k].sort().values.to(features.device)
        start = int(torch.randint(0, n, (1,), generator=gen))
        dim = features.shape[1]
        if self.projection_dim is not None and self.projection_dim < dim:
            projection = torch.randn(dim, self.projection_dim, generator=gen).to(features.device)
            features = features @ projection
        return greedy_coreset(features, k, start)

    # -- scoring
    def patch_scores(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, h, w] distances of each patch to its nearest bank entry."""
        if self.memory_bank.shape[0] == 0:
            raise RuntimeError(f"{type(self).__name__}: the memory bank is empty; fit (observe + finalize) or load a state dict first")
        features = self.scale_streams(self.raw_features(x))
        b, h, w, d = features.shape
        return nearest_distance(features.reshape(-1, d), self.memory_bank).view(b, 1, h, w)

    @torch.no_grad()
    def anomaly_map(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        # target is not used: the bank holds features of model inputs, so inputs are compared
        with torch.autocast(x.device.type, enabled=False):
            maps = F.interpolate(self.patch_scores(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
            return gaussian_blur(maps, self.smooth_sigma) if self.smooth_sigma > 0 else maps

    # -- the bank's size is only known after fitting: take the saved one's shape on load
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("memory_bank",):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor) and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty(saved.shape, dtype=getattr(self, name).dtype, device=getattr(self, name).device))
        self._observed = []
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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


@MODELS.register("wedge")
class WedgeNet(PatchCore):
    def __init__(
        self,
        in_shape: tuple[int, int, int],
        backbone=None,
        input_size=64,
        layers: Sequence[str] = ("layer2", "layer3"),
        patch_size: int = 3,
        feature_reduction: str = "avgpool",
        feature_dim: int = 128,
        sampling: str = "greedy",
        sampling_ratio: float = 0.1,
        projection_dim: Optional[int] = 128,
        smooth_sigma: float = 1.0,
        wavelet: str = "haar",
        use_semantic: bool = True,
        freq_weight: float = 1.0,
    ):
        wavelet = choice("model.wavelet", wavelet, ("haar", "bior2.2"))
        if not isinstance(use_semantic, bool):
            raise ConfigError("model.use_semantic", f"must be true or false; got {use_semantic!r}")
        freq_weight = number("model.freq_weight", freq_weight, 0.0)
        super().__init__(in_shape, backbone, input_size, layers, patch_size, feature_reduction, feature_dim,
                         sampling, sampling_ratio, projection_dim, smooth_sigma)
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
