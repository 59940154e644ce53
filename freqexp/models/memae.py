"""Memory-augmented autoencoders (MemAE, Gong et al., ICCV 2019, "Memorizing Normality to Detect
Anomaly"; official code donggong1/memae-anomaly-detection): a feature is replaced by a combination
of memory slots learned from normal data, so an anomaly is reconstructed as something normal.

memae      MemAE for images as in the paper: a stride-2 conv encoder, MemAE's memory applied at
           every spatial position of the feature map ([B,C,h,w] -> B*h*w queries of width C, as
           the reference MemModule), the mirrored transposed-conv decoder (sigmoid output, our
           images are in [0,1]). Loss: the configured reconstruction loss + `mem_entropy`.
           Scored by the reconstruction error (published_score = "mean": the paper's mean
           squared error, the mean of the base squared-error map; score.reduction=auto uses it).
memae_fft  the study's FFT multi-memory AE with three views (below).

MemAE's memory (MemAEMemory; `memory: memae` in memae_fft): one trainable matrix M [N, d] that is
both keys and values, initialised U(-1/sqrt(d), 1/sqrt(d)) like the reference's MemoryUnit.
  addressing  w = softmax(z M^T) over the N slots: `dot`, the plain dot product of the reference
              code (no 1/sqrt(d)); `cosine`, softmax(cos(z, m_i) / temperature), the paper's eq. 4
              when temperature = 1.
  shrinkage   w^_i = relu(w_i - lambda) w_i / (|w_i - lambda| + 1e-12) (paper eq. 7, reference
              hard_shrink_relu), then L1 re-normalisation w^ / max(||w^||_1, 1e-12) (F.normalize,
              as the reference); lambda = `shrink_threshold`; lambda = 0: neither (plain softmax).
              With lambda >= max_i w_i a row becomes all zeros and its output the zero vector
              (lambda < 1/N can never do that), as in the reference.
  output      w^ M.
  entropy     `mem_entropy` = entropy_weight x mean over queries of -sum w^ log(w^ + 1e-12), on
              the shrunk weights (reference EntropyLoss; the paper's alpha = 0.0002).

memae_fft (encoders are each a stride-2 conv stack + linear layer to a `feature_dim` vector):
  centre     the input times a Gaussian centre mask (std `centre_sigma` x side, peak 1): texture
             of the middle of the image, where the garment is;
  structure  the whole image: global shape;
  fft        log(1 + |F(x)|) of the centred 2D FFT (fftshift, orthonormal), computed in fp32 with
             autocast off, plus cos/sin of the phase when `fft_phase` is true.
Memories:
  soft (centre and fft), `memory: study` (the default, the seed study's recipe): attention
             a = softmax(q K^T / sqrt(d)) (`addressing: dot`) or softmax(cos(q, K) / temperature)
             (`cosine`), output a V; keys frozen, values trainable (below).
             `memory: memae`: MemAE's memory above (M trainable, sparse addressing with
             `shrink_threshold`); prepare() sets M from the features like the study's keys
             (memory_init), so the U(+-1/sqrt(d)) start only stays when prepare sees no data.
  hard (structure, both settings): the value of the nearest key (Euclidean). The forward value is
             exactly that slot value; the backward pass is straight-through (the decoder's
             gradient reaches the encoder as if the feature itself had been decoded, and also
             trains the chosen value), and a commitment term ||z - sg(K[nearest])||^2 keeps the
             encoder's features near the frozen keys they are matched against.
  Study keys are buffers (frozen, never trained), values are trainable parameters initialized from
  the keys. prepare() sets the keys from at most `init_samples` training features (the first ones
  in the training order, encoded in training mode; BatchNorm statistics are left as they were):
    kmeans  Lloyd's k-means in torch (`kmeans_iters` steps, seeded by k-means++ or by random
            distinct features, `kmeans_seeding`; an empty cluster keeps its previous centre);
    mean    each slot = the mean of one chunk of a random partition of the features (a cheap,
            smoother alternative; with fewer features than slots the features are repeated);
    random  Gaussian keys with the features' per-dimension mean and std (no structure; a baseline).
Decoder: the three matched features concatenated -> linear -> transposed-conv decoder -> image.
Extra loss terms (logged as train/loss_<name>): `mem_entropy` = entropy_weight x the mean entropy
-sum a log a of the two soft attentions (sparser addressing; with `memory: memae` MemAE's entropy
of the shrunk weights), `commit` = commit_weight x the commitment term. Trade-off: the frozen
k-means keys make addressing stable and cheap but stop tracking the encoder as it trains; the
commitment term and the trainable values absorb that drift."""
from __future__ import annotations

import copy
import math
from typing import Dict, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from freqexp.checks import choice, number, positive_int, positive_int_list
from freqexp.errors import ConfigError
from freqexp.models.autoencoders import ConvDecoder, ConvEncoder, check_conv_depth, encoder_sizes
from freqexp.models.base import MODELS, ReconstructionModel

# ----------------------------------------------------------------------------- k-means


def squared_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[N, K] squared Euclidean distances, fp32, clamped at 0 against rounding."""
    x, c = x.float(), c.float()
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)[None, :]).clamp_min(0)


def kmeans_plus_plus(x: torch.Tensor, k: int) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007), torch's global RNG: each next centre is a
    feature drawn with probability proportional to its squared distance to the nearest centre.
    When every feature is already a centre (fewer features than slots) the draw is uniform."""
    first = torch.randint(len(x), (1,), device=x.device)
    centres = [x[first]]
    nearest = squared_distances(x, centres[0]).squeeze(1)
    for _ in range(1, k):
        weights = nearest if nearest.sum() > 0 else torch.ones_like(nearest)
        idx = torch.multinomial(weights, 1)
        centres.append(x[idx])
        nearest = torch.minimum(nearest, squared_distances(x, x[idx]).squeeze(1))
    return torch.cat(centres)


def random_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """k distinct rows of x in random order (with repeats only when x has fewer than k rows)."""
    order = torch.randperm(len(x), device=x.device)
    order = order.repeat(math.ceil(k / len(x)))[:k]
    return x[order]


def kmeans(x: torch.Tensor, k: int, iters: int = 10, init="kmeans++") -> torch.Tensor:
    """Lloyd's algorithm on the rows of x, [K, D] centres. `init` is kmeans++, random, or a
    [K, D] tensor of starting centres. Stops early once no centre moves."""
    x = x.float()
    if isinstance(init, torch.Tensor):
        centres = init.float().clone()
    elif init == "kmeans++":
        centres = kmeans_plus_plus(x, k)
    else:
        centres = random_rows(x, k)
    for _ in range(iters):
        assign = squared_distances(x, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        updated = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
        if torch.equal(updated, centres):
            break
        centres = updated
    return centres


def chunk_means(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each slot = the mean of one of k near-equal chunks of a random permutation of x."""
    order = torch.randperm(len(x), device=x.device)
    if len(x) < k:
        order = order.repeat(math.ceil(k / len(x)))
    return torch.stack([x[idx].mean(0) for idx in torch.tensor_split(order, k)])


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j a_j log a_j (0 log 0 = 0)."""
    attn = attn.float()
    return -(attn * attn.clamp_min(1e-12).log()).sum(-1).mean()


# ----------------------------------------------------------------------------- MemAE's sparse addressing

MEMAE_EPS = 1e-12  # the reference's epsilon, in the shrinkage and in the entropy


def hard_shrink(w: torch.Tensor, threshold: float, eps: float = MEMAE_EPS) -> torch.Tensor:
    """MemAE's ReLU hard shrinkage (paper eq. 7, reference hard_shrink_relu):
    relu(w - threshold) w / (|w - threshold| + eps): exactly 0 at or below the threshold, about w
    above it, and differentiable."""
    return F.relu(w - threshold) * w / ((w - threshold).abs() + eps)


def sparse_weights(w: torch.Tensor, threshold: float) -> torch.Tensor:
    """Hard shrinkage then L1 re-normalisation over the last axis (w / max(||w||_1, 1e-12), as the
    reference's F.normalize(p=1)); threshold 0 returns w unchanged (the reference skips both)."""
    if threshold <= 0:
        return w
    return F.normalize(hard_shrink(w, threshold), p=1, dim=-1)


def memae_entropy(w: torch.Tensor, eps: float = MEMAE_EPS) -> torch.Tensor:
    """The reference's EntropyLoss: mean over rows of -sum_j w_j log(w_j + eps)."""
    w = w.float()
    return -(w * (w + eps).log()).sum(-1).mean()


def shrink_threshold_option(key: str, value) -> float:
    """lambda in [0, 1): 0 switches shrinkage off; 1 or more would zero every weight."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(key, f"must be a number >= 0 and < 1 (the paper recommends 1/N to 3/N); got {value!r}")
    return float(value)


def addressing_scores(q: torch.Tensor, keys: torch.Tensor, addressing: str, temperature: float, dot_scale: float) -> torch.Tensor:
    """[Q, N] attention logits: cos(q, k) / temperature (`cosine`) or dot_scale * q.k (`dot`)."""
    if addressing == "cosine":
        return F.normalize(q, dim=-1) @ F.normalize(keys, dim=-1).T / temperature
    return q @ keys.T * dot_scale


class MemAEMemory(nn.Module):
    """MemAE's memory unit: one trainable matrix M [size, dim] (keys = values), initialised
    U(-1/sqrt(dim), 1/sqrt(dim)) as the reference. forward(query [T, dim]) -> (w^ M, w^), the
    shrunk, re-normalised addressing weights w^ [T, size]; fp32 with autocast off."""

    def __init__(self, size: int, dim: int, shrink_threshold: float = 0.0025, addressing: str = "dot",
                 temperature: float = 1.0):
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.slots = nn.Parameter(torch.empty(size, dim).uniform_(-bound, bound))
        self.shrink_threshold, self.addressing, self.temperature = shrink_threshold, addressing, temperature

    @property
    def size(self) -> int:
        return len(self.slots)

    def forward(self, query: torch.Tensor):
        with torch.autocast(query.device.type, enabled=False):
            q, m = query.float(), self.slots.float()
            scores = addressing_scores(q, m, self.addressing, self.temperature, dot_scale=1.0)  # MemAE: plain z.m
            attn = sparse_weights(scores.softmax(dim=-1), self.shrink_threshold)
            return attn @ m, attn

    @torch.no_grad()
    def set_keys(self, keys: torch.Tensor) -> None:
        self.slots.copy_(keys)  # in place: the optimizer already holds `slots`


# ----------------------------------------------------------------------------- memories


class SlotMemory(nn.Module):
    """`size` slots of frozen keys (a buffer) and trainable values."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", torch.randn(size, dim))
        self.values = nn.Parameter(self.keys.clone())

    @property
    def size(self) -> int:
        return len(self.keys)

    @torch.no_grad()
    def set_keys(self, keys: torch.Tensor) -> None:
        # in place: the optimizer already holds `values`
        self.keys.copy_(keys)
        self.values.copy_(keys)


class SoftMemory(SlotMemory):
    """Key/query/value attention over the slots; returns (a V, a)."""

    def __init__(self, size: int, dim: int, addressing: str = "dot", temperature: float = 0.1):
        super().__init__(size, dim)
        self.addressing, self.temperature = addressing, temperature

    def forward(self, query: torch.Tensor):
        with torch.autocast(query.device.type, enabled=False):
            q, keys = query.float(), self.keys.float()
            attn = addressing_scores(q, keys, self.addressing, self.temperature, dot_scale=1 / math.sqrt(q.shape[-1])).softmax(dim=-1)
            return attn @ self.values.float(), attn


class HardMemory(SlotMemory):
    """Nearest-key lookup; returns (value of the nearest slot, straight-through; slot index;
    commitment ||z - sg(key)||^2 averaged over the batch and dimensions)."""

    def forward(self, z: torch.Tensor):
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            index = squared_distances(z.detach(), self.keys).argmin(1)
            # value forward (exactly: z - z.detach() is 0), identity gradient to the encoder
            out = self.values[index].float() + (z - z.detach())
            commit = (z - self.keys[index].float()).pow(2).mean()
            return out, index, commit


# ----------------------------------------------------------------------------- model


def centre_mask(height: int, width: int, sigma: float) -> torch.Tensor:
    """exp(-d^2/2), d the distance from the centre in units of sigma x side (per axis), peak 1."""
    ys = (torch.arange(height, dtype=torch.float32) - (height - 1) / 2) / (sigma * height)
    xs = (torch.arange(width, dtype=torch.float32) - (width - 1) / 2) / (sigma * width)
    return torch.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))


def log_spectrum(x: torch.Tensor, with_phase: bool) -> torch.Tensor:
    """log(1 + |fftshift(F(x))|) per channel (and cos/sin of the phase), fp32, autocast off."""
    with torch.autocast(x.device.type, enabled=False):
        spec = torch.fft.fftshift(torch.fft.fft2(x.float(), norm="ortho"), dim=(-2, -1))
        parts = [torch.log1p(spec.abs())]
        if with_phase:
            phase = spec.angle()
            parts += [phase.cos(), phase.sin()]
        return torch.cat(parts, dim=1)


class FeatureEncoder(nn.Module):
    """Stride-2 conv stack -> flatten -> linear to a feature vector."""

    def __init__(self, in_ch: int, channels: list[int], flat: int, feature_dim: int):
        super().__init__()
        self.conv = ConvEncoder(in_ch, channels)
        self.to_feature = nn.Linear(flat, feature_dim)

    def forward(self, x):
        return self.to_feature(self.conv(x).flatten(1))


@MODELS.register("memae_fft")
class FFTMultiMemoryAE(ReconstructionModel):
    def __init__(
        self,
        in_shape,
        channels=(32, 64),
        feature_dim: int = 64,
        memory_size: int = 100,
        memory_init: str = "kmeans",
        kmeans_seeding: str = "kmeans++",
        kmeans_iters: int = 10,
        init_samples: int = 2048,
        addressing: str = "dot",
        temperature: float = 0.1,
        centre_sigma: float = 0.25,
        fft_phase: bool = False,
        entropy_weight: float = 2e-4,
        commit_weight: float = 0.25,
        memory: str = "study",
        shrink_threshold: float = 0.0025,
    ):
        super().__init__()
        c, h, w = in_shape
        channels = positive_int_list("model.channels", channels)
        self.feature_dim = positive_int("model.feature_dim", feature_dim)
        memory_size = positive_int("model.memory_size", memory_size)
        self.memory_init = choice("model.memory_init", memory_init, ("kmeans", "mean", "random"))
        self.kmeans_seeding = choice("model.kmeans_seeding", kmeans_seeding, ("kmeans++", "random"))
        self.kmeans_iters = positive_int("model.kmeans_iters", kmeans_iters)
        self.init_samples = positive_int("model.init_samples", init_samples)
        addressing = choice("model.addressing", addressing, ("dot", "cosine"))
        temperature = number("model.temperature", temperature, 0, low_open=True)
        centre_sigma = number("model.centre_sigma", centre_sigma, 0, low_open=True)
        if not isinstance(fft_phase, bool):
            raise ConfigError("model.fft_phase", f"must be true or false; got {fft_phase!r}")
        self.fft_phase = fft_phase
        self.entropy_weight = number("model.entropy_weight", entropy_weight, 0)
        self.commit_weight = number("model.commit_weight", commit_weight, 0)
        self.memory = choice("model.memory", memory, ("study", "memae"))
        shrink_threshold = shrink_threshold_option("model.shrink_threshold", shrink_threshold)

        hs, ws = encoder_sizes(h, len(channels)), encoder_sizes(w, len(channels))
        if min(h, w) < 2 ** len(channels):
            raise ConfigError("model.channels", f"{len(channels)} stride-2 stages need images of at least "
                              f"{2 ** len(channels)} px; got {h}x{w}")
        self.feat_shape = (channels[-1], hs[-1], ws[-1])
        flat = channels[-1] * hs[-1] * ws[-1]
        d = self.feature_dim
        self.register_buffer("mask", centre_mask(h, w, centre_sigma), persistent=False)
        self.centre_encoder = FeatureEncoder(c, channels, flat, d)
        self.structure_encoder = FeatureEncoder(c, channels, flat, d)
        self.fft_encoder = FeatureEncoder(c * (3 if fft_phase else 1), channels, flat, d)
        if self.memory == "memae":  # MemAE's sparse addressing on one trainable matrix per memory
            self.centre_memory = MemAEMemory(memory_size, d, shrink_threshold, addressing, temperature)
        else:  # the study's: frozen keys, trainable values
            self.centre_memory = SoftMemory(memory_size, d, addressing, temperature)
        self.structure_memory = HardMemory(memory_size, d)
        if self.memory == "memae":
            self.fft_memory = MemAEMemory(memory_size, d, shrink_threshold, addressing, temperature)
        else:
            self.fft_memory = SoftMemory(memory_size, d, addressing, temperature)
        self.from_features = nn.Sequential(nn.Linear(3 * d, flat), nn.LeakyReLU(0.2, inplace=True))
        self.decoder = ConvDecoder(c, channels, hs, ws)

    def encode(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {
            "centre": self.centre_encoder(x * self.mask),
            "structure": self.structure_encoder(x),
            "fft": self.fft_encoder(log_spectrum(x, self.fft_phase)),
        }

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        z = self.encode(x)
        centre, centre_attn = self.centre_memory(z["centre"])
        structure, structure_index, commit = self.structure_memory(z["structure"])
        fft, fft_attn = self.fft_memory(z["fft"])
        matched = torch.cat([centre, structure, fft], dim=1)
        recon = self.decoder(self.from_features(matched).view(-1, *self.feat_shape))
        return {"recon": recon, "centre_attn": centre_attn, "fft_attn": fft_attn,
                "structure_index": structure_index, "commit": commit, **{f"z_{k}": v for k, v in z.items()}}

    def extra_losses(self, out):
        h = memae_entropy if self.memory == "memae" else attention_entropy  # memae: on the shrunk weights
        entropy = 0.5 * (h(out["centre_attn"]) + h(out["fft_attn"]))
        return {"mem_entropy": self.entropy_weight * entropy, "commit": self.commit_weight * out["commit"]}

    @torch.no_grad()
    def prepare(self, batches: Iterable[torch.Tensor]) -> None:
        """Set the memory keys (and values; with memory=memae the soft memories' matrices M) from
        the features of the training inputs."""
        encoders = [self.centre_encoder, self.structure_encoder, self.fft_encoder]
        saved = [copy.deepcopy(e.state_dict()) for e in encoders]  # BN running stats stay as they were
        was_training = self.training
        self.train()  # features as training sees them (BatchNorm on batch statistics)
        collected: Dict[str, list] = {"centre": [], "structure": [], "fft": []}
        seen = 0
        for batch in batches:
            for k, v in self.encode(batch.float()).items():
                collected[k].append(v.float())
            seen += len(batch)
            if seen >= self.init_samples:
                break
        for e, state in zip(encoders, saved):
            e.load_state_dict(state)
        self.train(was_training)
        if seen == 0:
            return
        for name, memory in (("centre", self.centre_memory), ("structure", self.structure_memory), ("fft", self.fft_memory)):
            features = torch.cat(collected[name])[: self.init_samples]
            memory.set_keys(self.initial_keys(features, memory.size))

    def initial_keys(self, features: torch.Tensor, k: int) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            features = features.float()
            if self.memory_init == "kmeans":
                return kmeans(features, k, self.kmeans_iters, self.kmeans_seeding)
            if self.memory_init == "mean":
                return chunk_means(features, k)
            std = features.std(0) if len(features) > 1 else torch.ones_like(features[0])
            return features.mean(0) + std * torch.randn(k, features.shape[1], device=features.device)


# ----------------------------------------------------------------------------- MemAE for images


@MODELS.register("memae")
class MemAE(ReconstructionModel):
    """MemAE (Gong et al. 2019) for images: conv encoder -> MemAE's memory at every position of
    the feature map (the reference MemModule) -> conv decoder. Extra loss `mem_entropy`
    (entropy_weight x the entropy of the shrunk addressing weights); scored by the squared
    reconstruction error, averaged over the image in the paper (published_score)."""

    published_score = "mean"  # the paper's image score: the mean squared reconstruction error

    def __init__(
        self,
        in_shape,
        channels=(16, 32, 64),
        memory_size: int = 100,
        shrink_threshold: float = 0.0025,
        entropy_weight: float = 2e-4,
        addressing: str = "dot",
        temperature: float = 1.0,
    ):
        super().__init__()
        c, h, w = in_shape
        channels = positive_int_list("model.channels", channels)
        memory_size = positive_int("model.memory_size", memory_size)
        shrink_threshold = shrink_threshold_option("model.shrink_threshold", shrink_threshold)
        self.entropy_weight = number("model.entropy_weight", entropy_weight, 0)
        addressing = choice("model.addressing", addressing, ("dot", "cosine"))
        temperature = number("model.temperature", temperature, 0, low_open=True)
        check_conv_depth(h, w, len(channels))
        hs, ws = encoder_sizes(h, len(channels)), encoder_sizes(w, len(channels))
        self.encoder = ConvEncoder(c, channels)
        self.memory = MemAEMemory(memory_size, channels[-1], shrink_threshold, addressing, temperature)
        self.decoder = ConvDecoder(c, channels, hs, ws)

    def address(self, z: torch.Tensor):
        """[B,C,h,w] -> the memory's output at every position [B,C,h,w] and the weights [B*h*w, N]
        (rows in (b, i, j) order, as the reference's permute(0,2,3,1).view(-1, C))."""
        b, ch, h, w = z.shape
        out, attn = self.memory(z.permute(0, 2, 3, 1).reshape(-1, ch))
        return out.view(b, h, w, ch).permute(0, 3, 1, 2), attn

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        z = self.encoder(x)
        z_hat, attn = self.address(z)
        return {"recon": self.decoder(z_hat), "attn": attn, "z": z, "z_hat": z_hat}

    def extra_losses(self, out):
        return {"mem_entropy": self.entropy_weight * memae_entropy(out["attn"])}
