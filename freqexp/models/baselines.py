"""Pixel-space baselines fitted without gradients: what a learned model has to beat.

  knn  The bank is every training image, flattened. A test image's distance is the mean
       Euclidean distance to its k nearest training images; its map is the per-pixel squared
       difference to those k images (channel mean, averaged over the k), so map.mean() is the
       mean squared distance to them, monotone in the distance for k=1. reconstruct(x) is the
       nearest training image (the figures show which normal image explains the input best).
  pca  Principal components of the training images (SVD of the centred data, fp32): the top
       n_components, or (0 < n_components < 1) the fewest components explaining that fraction
       of the variance, as scikit-learn counts it. reconstruct(x) = the projection onto them
       (plus the mean), the map the squared residual: anomalies leave the normal subspace.

Both keep the training images (N x C*H*W floats) until fitted; knn keeps them as its bank,
so it suits small images (Fashion-MNIST: 5,400 x 784 floats = 17 MB). Distances and the SVD
run in fp32 with autocast off (knn: bank_search.nearest_k, chunked to the device's memory). The `target` of anomaly_map is what the input is compared with
(the input itself unless a filter acts on the target)."""
from __future__ import annotations

from typing import List

import torch

from freqexp.checks import positive_int
from freqexp.errors import ConfigError
from freqexp.models.bank_search import BankIndex, nearest_k
from freqexp.models.base import MODELS, GradientFreeModel

class FlatImageFit(GradientFreeModel):
    """Collects the flattened training inputs; subclasses turn them into their state in fit()
    and keep that state in buffers whose size is only known after fitting (resized on load)."""

    resizable_buffers: tuple = ()
    residual_score = True  # maps are squared residuals of reconstruct(x), so filter.apply_to=score applies

    def __init__(self, in_shape: tuple[int, int, int]):
        super().__init__()
        self.in_shape = tuple(in_shape)
        self.dim = in_shape[0] * in_shape[1] * in_shape[2]
        self._observed: List[torch.Tensor] = []

    def observe(self, x: torch.Tensor) -> None:
        self._observed.append(x.detach().float().reshape(x.shape[0], -1))

    def finalize(self) -> None:
        """Fit on the images observed since the last finalize(); none observed: keep the fit."""
        if not self._observed:
            if not self.fitted():
                raise RuntimeError(f"{type(self).__name__}.finalize(): no training images were observed")
            return
        data = torch.cat(self._observed)
        self._observed = []
        with torch.autocast(data.device.type, enabled=False):
            self.fit(data)

    def fit(self, data: torch.Tensor) -> None:
        raise NotImplementedError

    def fitted(self) -> bool:
        raise NotImplementedError

    def check_fitted(self) -> None:
        if not self.fitted():
            raise RuntimeError(f"{type(self).__name__} is not fitted; observe training batches and finalize() (or load a state dict) first")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self.resizable_buffers:
            saved, own = state_dict.get(prefix + name), getattr(self, name)
            if isinstance(saved, torch.Tensor) and saved.shape != own.shape:
                setattr(self, name, torch.empty(saved.shape, dtype=own.dtype, device=own.device))
        self._observed = []
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@MODELS.register("knn")
class NearestImage(FlatImageFit):
    resizable_buffers = ("bank",)

    def __init__(self, in_shape: tuple[int, int, int], k: int = 1):
        super().__init__(in_shape)
        self.k = positive_int("model.k", k)
        self.register_buffer("bank", torch.zeros(0, self.dim))
        self._index = None  # the bank's cached search index (norms), rebuilt when the bank changes

    def fit(self, data: torch.Tensor) -> None:
        if data.shape[0] < self.k:
            raise ConfigError("model.k", f"must be at most the number of training images ({data.shape[0]}); got {self.k}")
        self.bank = data.contiguous()

    def fitted(self) -> bool:
        return self.bank.shape[0] > 0

    @torch.no_grad()
    def neighbours(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Euclidean distances [B, k] ascending, bank indices [B, k]) of the k nearest images:
        an exact fp32 search (bank_search.nearest_k) with the bank's norms cached once per bank."""
        self.check_fitted()
        if self._index is None or not self._index.matches(self.bank, "fp32"):
            self._index = BankIndex(self.bank, "fp32")
        return nearest_k(x.float().reshape(x.shape[0], -1), self.bank, self.k, self._index)

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """[B] image distance: mean over the k nearest training images."""
        return self.neighbours(x)[0].mean(1)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        index = self.neighbours(x)[1][:, 0]
        return self.bank[index].view(-1, *self.in_shape).to(x.dtype)

    @torch.no_grad()
    def anomaly_map(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        target = (x if target is None else target).float()
        index = self.neighbours(x)[1]  # [B, k]
        nearest = self.bank[index].view(x.shape[0], self.k, *self.in_shape).float()
        return (nearest - target.unsqueeze(1)).pow(2).mean(dim=(1, 2)).unsqueeze(1)


@MODELS.register("pca")
class PCAReconstruction(FlatImageFit):
    resizable_buffers = ("components",)

    def __init__(self, in_shape: tuple[int, int, int], n_components: float = 0.95):
        super().__init__(in_shape)
        ok = isinstance(n_components, (int, float)) and not isinstance(n_components, bool)
        if ok and isinstance(n_components, int):
            ok = 1 <= n_components <= self.dim
        elif ok:
            ok = 0.0 < n_components < 1.0
        if not ok:
            raise ConfigError("model.n_components", f"must be an integer in [1, {self.dim}] (C*H*W) or a variance fraction in (0, 1); got {n_components!r}")
        self.n_components = n_components
        self.register_buffer("mean", torch.zeros(self.dim))
        self.register_buffer("components", torch.zeros(0, self.dim))  # [k, D], orthonormal rows

    def fit(self, data: torch.Tensor) -> None:
        import logging

        mean = data.mean(0)
        _, singular, vh = torch.linalg.svd(data - mean, full_matrices=False)
        if isinstance(self.n_components, int):
            k = self.n_components
            if k > vh.shape[0]:
                logging.getLogger("freqexp").warning("model.n_components=%d but %d training images give only %d components; using %d",
                                                     k, data.shape[0], vh.shape[0], vh.shape[0])
                k = vh.shape[0]
        else:  # fewest components whose explained variance reaches the fraction (scikit-learn's rule)
            variance = singular.pow(2)
            ratio = torch.cumsum(variance / variance.sum(), 0)
            k = int(torch.searchsorted(ratio, torch.tensor([self.n_components], device=ratio.device), right=True)) + 1
            k = min(k, vh.shape[0])
        self.mean = mean
        self.components = vh[:k].contiguous()

    def fitted(self) -> bool:
        return self.components.shape[0] > 0

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        self.check_fitted()
        with torch.autocast(x.device.type, enabled=False):
            centred = x.float().reshape(x.shape[0], -1) - self.mean
            projection = centred @ self.components.T @ self.components + self.mean
            return projection.view_as(x)
