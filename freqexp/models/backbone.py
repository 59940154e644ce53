"""A frozen ResNet feature extractor for the memory-bank detectors (PatchCore, WEDGE-Net).

The ResNet is written here (torchvision is not a dependency) with torchvision's parameter
names (conv1, bn1, layer1..layer4 of BasicBlock / Bottleneck blocks with downsample.0/.1, fc),
so an ImageNet state dict saved by torchvision (`torch.save(resnet18(weights=...).state_dict(),
"resnet18.pth")`) loads as is through `model.backbone.weights`. `weights=imagenet` downloads
torchvision's own IMAGENET1K_V1 checkpoint of the arch (the file torchvision's `weights=` and
PatchCore's official code use) into torch's hub cache ($TORCH_HOME/hub/checkpoints, by default
~/.cache/torch/hub/checkpoints), checking the sha256 prefix in its name; an http(s) URL is
downloaded the same way. FREQEXP_WEIGHTS_URL (a directory URL serving the same file names)
replaces download.pytorch.org, for mirrors and proxies. Bottlenecks put the stride on
the 3x3 convolution (torchvision's "v1.5"); wide_resnet50_2 doubles the bottleneck width.

Without weights the network keeps its random (kaiming) initialization, drawn from torch's
global RNG, which the run seeds: the pipeline then works, but the features are random
projections, not ImageNet features, and results are not PatchCore's.

`FeatureExtractor` wraps the ResNet as the detectors use it: grayscale repeated to 3 channels,
optional resize (`input_size`) and centre crop (`center_crop`, PatchCore's 224 of 256), ImageNet
normalization, and the outputs of the named layers.
Layers after the last one used are dropped, so they cost neither time nor space in model.pt."""
from __future__ import annotations

import copy
import http.client
import logging
import os
import socket
import sys
import urllib.error
import urllib.parse
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from freqexp.checks import choice
from freqexp.errors import ConfigError

log = logging.getLogger("freqexp")

LAYERS = ("layer1", "layer2", "layer3", "layer4")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None, width_per_group: int = 64):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None, width_per_group: int = 64):
        super().__init__()
        width = planes * width_per_group // 64
        self.conv1, self.bn1 = conv1x1(cin, width), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv3x3(width, width, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = conv1x1(width, planes * self.expansion), nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


# arch -> (block, blocks per stage, width_per_group)
ARCHS: Dict[str, tuple] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 64),
    "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), 128),
}


class ResNet(nn.Module):
    """ImageNet ResNet with torchvision's module names. `features(x, names)` returns the
    outputs of the named stages (layer1..layer4) without running the stages after them."""

    def __init__(self, arch: str = "resnet18", num_classes: int = 1000):
        super().__init__()
        choice("model.backbone.arch", arch, ARCHS)
        block, blocks, self.width_per_group = ARCHS[arch]
        self.arch = arch
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.channels: Dict[str, int] = {}
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or cin != planes * block.expansion:
                downsample = nn.Sequential(conv1x1(cin, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion))
            stage = [block(cin, planes, stride, downsample, self.width_per_group)]
            cin = planes * block.expansion
            stage += [block(cin, planes, width_per_group=self.width_per_group) for _ in range(1, n)]
            setattr(self, LAYERS[i], nn.Sequential(*stage))
            self.channels[LAYERS[i]] = cin
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():  # torchvision's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def truncate(self, last: str) -> "ResNet":
        """Drop the stages after `last` (and the classifier): features() never needs them."""
        for name in LAYERS[LAYERS.index(last) + 1:]:
            if hasattr(self, name):
                delattr(self, name)
        for name in ("avgpool", "fc"):
            if hasattr(self, name):
                delattr(self, name)
        return self

    def features(self, x: torch.Tensor, names: Sequence[str]) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in LAYERS[: max(LAYERS.index(n) for n in names) + 1]:
            x = getattr(self, name)(x)
            if name in names:
                out[name] = x
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x, ["layer4"])["layer4"]
        return self.fc(torch.flatten(self.avgpool(x), 1))


# torchvision's IMAGENET1K_V1 checkpoints (torchvision/models/resnet.py: ResNet18_Weights,
# ResNet50_Weights, Wide_ResNet50_2_Weights). The name's suffix is the first 8 hex digits of
# the file's sha256, which the download checks.
IMAGENET_URLS: Dict[str, str] = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "wide_resnet50_2": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
}
IMAGENET = "imagenet"
WEIGHTS_URL_ENV = "FREQEXP_WEIGHTS_URL"  # a directory URL serving the same file names (mirror, proxy)
WEIGHTS_TIMEOUT_ENV = "FREQEXP_WEIGHTS_TIMEOUT"  # seconds a connection or read may stall
DOWNLOAD_TIMEOUT = 20.0


def imagenet_url(arch: str, key: str = "model.backbone.weights") -> str:
    """The URL of `arch`'s torchvision ImageNet checkpoint, under $FREQEXP_WEIGHTS_URL when set."""
    if arch not in IMAGENET_URLS:
        raise ConfigError(key, f"no torchvision ImageNet checkpoint known for arch {arch!r} (known: {', '.join(IMAGENET_URLS)}); "
                               "give a .pth path or an http(s) URL instead")
    url = IMAGENET_URLS[arch]
    base = os.environ.get(WEIGHTS_URL_ENV, "").strip()
    return f"{base.rstrip('/')}/{url.rsplit('/', 1)[1]}" if base else url


def is_url(value: Any) -> bool:
    return isinstance(value, str) and value.lower().startswith(("http://", "https://"))


def download_timeout() -> float:
    raw = os.environ.get(WEIGHTS_TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else DOWNLOAD_TIMEOUT
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(WEIGHTS_TIMEOUT_ENV, f"must be a number of seconds > 0; got {raw!r}")
    return value


def fetch_weights(url: str, key: str = "model.backbone.weights") -> Path:
    """The local file of `url` in torch's hub cache (<torch.hub.get_dir()>/checkpoints), downloaded
    first when it is not there. torch.hub.download_url_to_file writes a temporary file, checks the
    sha256 prefix in the file name (name-<hex>.pth) and only then moves it into place, so a failed
    or corrupt download leaves nothing in the cache."""
    name = Path(urllib.parse.urlparse(url).path).name
    if not name:
        raise ConfigError(key, f"{url!r} does not end in a file name")
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    file = cache / name
    if file.is_file():
        return file
    match = torch.hub.HASH_REGEX.search(name)
    hash_prefix = match.group(1) if match else None
    timeout = download_timeout()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(key, f"cannot write torch's hub cache {str(cache)!r} ({e.strerror or e}); set TORCH_HOME to a writable folder") from None
    log.info("downloading %s to %s", url, file)
    advice = f"download it elsewhere and pass its path, or set {WEIGHTS_URL_ENV}"
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # torch.hub's urlopen takes no timeout: it reads the default
    try:
        torch.hub.download_url_to_file(url, str(file), hash_prefix, progress=sys.stderr.isatty())
    except RuntimeError as e:
        if "invalid hash value" not in str(e):
            raise
        raise ConfigError(key, f"{url} is not the expected file: its sha256 does not start with {hash_prefix} (the hash in its name); "
                               f"nothing was kept; retry, or {advice}") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} {e.reason}"
        else:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
        if isinstance(reason, (TimeoutError, socket.timeout)):
            reason = f"no answer within {timeout:g} s"
        reason = " ".join(str(reason).split()) or type(reason).__name__
        raise ConfigError(key, f"cannot download {url} ({reason}); {advice}") from None
    finally:
        socket.setdefaulttimeout(previous)
    return file


def resolve_weights(weights: Any, arch: str, key: str = "model.backbone.weights") -> Any:
    """`weights` as a local file: `imagenet` and http(s) URLs are fetched into torch's hub cache."""
    if isinstance(weights, str) and weights.strip().lower() == IMAGENET:
        return fetch_weights(imagenet_url(arch, key), key)
    if is_url(weights):
        return fetch_weights(weights.strip(), key)
    return weights


def load_weights(module: nn.Module, path: Any, key: str = "model.backbone.weights") -> None:
    """Load a torchvision-format state dict from `path` into `module`. Every tensor the module
    has must be there with the same shape (extra entries, e.g. fc or layer4 of a truncated
    network, are ignored; BatchNorm's num_batches_tracked may be absent, as in old files)."""
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise ConfigError(key, f"no weights file {str(file)!r}; give a torchvision-format ResNet state dict (.pth) or null for random weights")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(key, f"cannot read {str(file)!r} as a torch state dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # checkpoints that wrap the state dict
    if not isinstance(state, dict):
        raise ConfigError(key, f"{str(file)!r} holds a {type(state).__name__}, not a state dict (name -> tensor)")
    own = module.state_dict()
    for name, tensor in own.items():
        if name not in state:
            if name.endswith("num_batches_tracked"):
                state[name] = tensor
                continue
            raise ConfigError(key, f"{str(file)!r} has no {name!r}: not a torchvision {getattr(module, 'arch', 'ResNet')} state dict")
        value = state[name]
        if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ConfigError(key, f"{str(file)!r}: {name!r} has shape {got}, the {getattr(module, 'arch', 'ResNet')} needs {tuple(tensor.shape)} (wrong model.backbone.arch?)")
    module.load_state_dict({name: state[name] for name in own})


BACKBONE_KEYS = ("arch", "weights")


def backbone_options(backbone: Any) -> Dict[str, Any]:
    """The `model.backbone` node (a DictConfig, dict or None) as a checked plain dict."""
    if backbone is None:
        backbone = {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(backbone, DictConfig):
            backbone = OmegaConf.to_container(backbone, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    if not isinstance(backbone, dict):
        raise ConfigError("model.backbone", f"must be a mapping with keys {', '.join(BACKBONE_KEYS)}; got {backbone!r}")
    unknown = sorted(set(backbone) - set(BACKBONE_KEYS))
    if unknown:
        raise ConfigError(f"model.backbone.{unknown[0]}", f"not a backbone option; its options: {', '.join(BACKBONE_KEYS)}")
    return {"arch": backbone.get("arch", "resnet18"), "weights": backbone.get("weights")}


def parse_input_size(value: Any, key: str = "model.input_size") -> Optional[tuple[int, int]]:
    """null (keep the image size), an int (square side) or [height, width]."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    try:
        size = [int(v) for v in value] if all(isinstance(v, int) and not isinstance(v, bool) for v in value) else None
    except TypeError:
        size = None
    if not size or len(size) != 2 or min(size) < 16:
        raise ConfigError(key, f"must be null, an integer >= 16 or [height, width] (each >= 16); got {value!r}")
    return size[0], size[1]


def parse_center_crop(value: Any, key: str = "model.center_crop") -> Optional[float]:
    """null / 1.0 (no crop) or the fraction of each side a centre crop keeps, in (0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(key, f"must be null or the fraction of each side kept by a centre crop, in (0, 1] (PatchCore: 224/256 = 0.875); got {value!r}")
    return None if value == 1 else float(value)


def crop_box(height: int, width: int, fraction: Optional[float]) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of a centre crop keeping `fraction` of each side,
    placed as torchvision's CenterCrop places it."""
    if fraction is None:
        return 0, 0, height, width
    ch, cw = max(1, int(round(height * fraction))), max(1, int(round(width * fraction)))
    return int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0)), ch, cw


def fold_batch_norm(net: ResNet) -> ResNet:
    """An inference copy of `net` with every BatchNorm folded into the convolution before it. In
    eval mode a BatchNorm is the affine map y = (x - mean) / sqrt(var + eps) * gamma + beta, so
    conv then BN is one convolution with weights w * s and bias beta - mean * s (s = gamma /
    sqrt(var + eps), folded in fp64): the same features without a pass over every activation
    (equal up to fp32 rounding, tested)."""
    fused = copy.deepcopy(net).eval()

    def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        conv.weight = nn.Parameter((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype), requires_grad=False)
        shift = bn.bias.double() - bn.running_mean.double() * scale
        conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)

    fold(fused.conv1, fused.bn1)
    fused.bn1 = nn.Identity()
    for name in LAYERS:
        for block in getattr(fused, name, ()):
            for i in (1, 2, 3):
                if hasattr(block, f"bn{i}"):
                    fold(getattr(block, f"conv{i}"), getattr(block, f"bn{i}"))
                    setattr(block, f"bn{i}", nn.Identity())
            if block.downsample is not None:
                fold(block.downsample[0], block.downsample[1])
                block.downsample[1] = nn.Identity()
    return fused.requires_grad_(False)


def autocast_to(device_type: str, dtype: Optional[torch.dtype]):
    """Autocast to `dtype` (bf16 / fp16), or autocast off (fp32) when dtype is None, whatever
    context the caller runs in (Lightning's 16-mixed included)."""
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


class FeatureExtractor(nn.Module):
    """Images in [0, 1] -> {layer name: feature map}, through a frozen ResNet in eval mode.
    Runs in fp32 with autocast off unless given a dtype to autocast to (the memory banks'
    `precision: bf16 | fp16`), so the bank (built under the trainer's mixed precision) and the
    test features are computed the same way. `fast=True` runs an inference copy of the network
    (BatchNorm folded into the convolutions; NHWC, the layout cuDNN's tensor-core and oneDNN's
    kernels prefer), which rounds differently only in the last bits."""

    def __init__(self, in_shape: tuple[int, int, int], layers: Sequence[str], backbone: Any = None, input_size: Any = None,
                 center_crop: Any = None):
        super().__init__()
        opts = backbone_options(backbone)
        channels, height, width = in_shape
        if channels not in (1, 3):
            raise ConfigError("model.backbone", f"an ImageNet ResNet needs 1 (repeated) or 3 channel images; got {channels}")
        self.input_size = parse_input_size(input_size)
        self.center_crop = parse_center_crop(center_crop)
        self.image_size = (height, width)
        side = min(self.backbone_size())
        if side < 16:
            raise ConfigError("model.input_size", f"{height}x{width} images are too small for the ResNet's stride-16 layer3; set model.input_size (e.g. 64) to upsample them")
        self.layers = list(layers)
        self.net = ResNet(opts["arch"]).truncate(max(self.layers, key=LAYERS.index))
        self.weights = opts["weights"]
        if self.weights is not None:
            load_weights(self.net, resolve_weights(self.weights, opts["arch"]))
        else:
            log.warning("model.backbone.weights is not set: the %s has random weights, so its features are random and results are not "
                        "the published method's (model.backbone.weights=imagenet for real features)", opts["arch"])
        self.net.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def channels(self, name: str) -> int:
        return self.net.channels[name]

    def train(self, mode: bool = True) -> "FeatureExtractor":
        # frozen: BatchNorm keeps its running statistics even while Lightning trains the module
        return super().train(False)

    def backbone_size(self, image_size: Optional[Sequence[int]] = None) -> tuple[int, int]:
        """(height, width) the ResNet sees: the image resized to input_size, then centre-cropped."""
        h, w = self.input_size or tuple(image_size or self.image_size)
        return crop_box(h, w, self.center_crop)[2:]

    def activation_bytes(self, image_size: Optional[Sequence[int]] = None, dtype_bytes: int = 4) -> int:
        """An upper estimate of the memory one image takes while the ResNet runs without
        gradients: four of its largest activations alive at once plus the kept stage outputs."""
        h, w = self.backbone_size(image_size)
        h, w = (h + 1) // 2, (w + 1) // 2  # conv1
        largest, kept = 64 * h * w, 0
        h, w = (h + 1) // 2, (w + 1) // 2  # the max pool
        for i, name in enumerate(LAYERS[: LAYERS.index(max(self.layers, key=LAYERS.index)) + 1]):
            widest = max(m.out_channels for m in getattr(self.net, name).modules() if isinstance(m, nn.Conv2d))
            largest = max(largest, widest * h * w)  # at the stage's input resolution: an upper bound
            if i > 0:
                h, w = (h + 1) // 2, (w + 1) // 2
            if name in self.layers:
                kept += self.net.channels[name] * h * w
        return dtype_bytes * (4 * largest + kept)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        if self.center_crop is not None:
            top, left, ch, cw = crop_box(x.shape[-2], x.shape[-1], self.center_crop)
            x = x[..., top : top + ch, left : left + cw]
        return (x - self.mean) / self.std

    def to_image_frame(self, maps: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        """Maps over the backbone's input [B,1,h,w] -> the image's [B,1,H,W]: resized onto the
        region the centre crop took from the image, the border outside it replicated from the
        crop's edge (the crop never saw it)."""
        height, width = int(image_size[0]), int(image_size[1])
        top, left, ch, cw = crop_box(height, width, self.center_crop)
        if tuple(maps.shape[-2:]) != (ch, cw):
            maps = F.interpolate(maps, size=(ch, cw), mode="bilinear", align_corners=False)
        if (ch, cw) != (height, width):
            maps = F.pad(maps, (left, width - cw - left, top, height - ch - top), mode="replicate")
        return maps

    def backbone(self, normalised: torch.Tensor, names: Optional[Sequence[str]] = None, fast: bool = False) -> Dict[str, torch.Tensor]:
        """The named stages' outputs for an already prepared input, in the caller's autocast
        context. fast: through the inference copy of the network (BatchNorm folded into the
        convolutions, channels-last), which rounds differently only in the last bits."""
        if not fast:
            return self.net.features(normalised, list(names or self.layers))
        return self.inference_net().features(normalised.contiguous(memory_format=torch.channels_last), list(names or self.layers))

    def inference_net(self) -> ResNet:
        """fold_batch_norm(net) in channels-last, made once and again only when the network's
        weights change (a load, an in-place update) or move (another device or dtype)."""
        tensors = list(self.net.parameters()) + list(self.net.buffers())
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
        cached = self.__dict__.get("_inference")  # a plain attribute: not a submodule, not saved
        if cached is None or cached[0] != key:
            fused = fold_batch_norm(self.net).to(memory_format=torch.channels_last)
            self.__dict__["_inference"] = cached = (key, fused)
        return cached[1]

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_inference", None)
        return state

    @torch.no_grad()
    def forward(self, x: torch.Tensor, dtype: Optional[torch.dtype] = None, fast: bool = False) -> Dict[str, torch.Tensor]:
        with autocast_to(x.device.type, dtype):
            return self.backbone(self.prepare_input(x), self.layers, fast)
