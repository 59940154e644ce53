"""score.reduction=auto: every model outside the memory banks (whose re-weighted and smoothed
scores are checked in test_fidelity.py) and the CLIP models (whose image score is the class
token's, not a reduction of the map: test_fe_clip_fidelity.py) turns its anomaly maps into the image score its method
publishes. The expected score is computed here with numpy from the maps the model returns, by
the rule written in this file, never by calling the model's reduction."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.conftest import CLIP_MODELS, REPO, compose_cfg

MEMORY_BANKS = {"patchcore", "wedge", "patchcore_dwt"}
MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml") if p.stem not in MEMORY_BANKS | set(CLIP_MODELS))
SIZE = 32


def mean_score(maps: np.ndarray) -> np.ndarray:
    """The mean of the map: the mean squared reconstruction error of the autoencoder family,
    MemAE, the diffusion models and the ViT; the kNN/PCA residual; GANomaly's latent distance
    (its map is that one value everywhere)."""
    return maps.reshape(len(maps), -1).mean(1)


def draem_score(maps: np.ndarray) -> np.ndarray:
    """DRAEM's test script at our size: the window is 21 px at 256 px scaled to the image (the
    nearest odd size), the map mean-pooled with zero padding counted, then the maximum."""
    k = 2 * math.floor(21 * SIZE / 256 / 2) + 1  # 2.6 -> 3 at 32 px
    out = []
    for m in maps[:, 0]:
        p = np.pad(m, k // 2)
        pooled = np.array([[p[y:y + k, x:x + k].sum() / k**2 for x in range(SIZE)] for y in range(SIZE)])
        out.append(pooled.max())
    return np.array(out)


EXPECTED = {name: mean_score for name in MODELS}
EXPECTED["draem"] = draem_score


def test_every_non_memory_bank_model_has_an_expected_score():
    assert {"cae", "vae", "ganomaly", "draem", "ddpm", "memae", "vit_ad", "knn", "pca"} <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_default_image_score_is_the_papers_reduction_of_the_map(name):
    from freqexp.models import model_class
    from freqexp.training import build_module
    from freqexp.validate import make_plan

    overrides = [f"model={name}", "dataset=synthetic", f"dataset.image_size={SIZE}", "hardware=cpu"]
    cls = model_class(compose_cfg([f"model={name}"]).model.name)
    if cls.loss_terms is not None:
        overrides.append(f"loss={cls.loss_terms[0]}")
    if name == "draem":  # PyTorch's wider initialization gives an untrained segmenter a map that varies
        overrides.append("model.init=pytorch")
    cfg = compose_cfg(overrides)
    assert cfg.score.reduction == "auto"
    torch.manual_seed(0)
    module = build_module(make_plan(cfg), cfg)
    x = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    if cls.gradient_free:  # the raw-pixel baselines: fit on a few images first
        module.model.observe(torch.rand(8, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2)))
        module.model.finalize()
    module.eval()
    with torch.no_grad():
        maps, scores = module.score(x)
    maps = maps.double().numpy()
    assert maps.shape == (3, 1, SIZE, SIZE) and np.isfinite(maps).all()
    spread = np.ptp(maps.reshape(3, -1), axis=1)
    tol = 1e-3 * spread  # far below the gap between mean, max and pooled max of a map that varies
    np.testing.assert_allclose(scores.double().numpy(), EXPECTED[name](maps), rtol=1e-6, atol=float(tol.min()) + 1e-12)
    if name == "ganomaly":  # one latent distance per image, spread over the map
        assert spread.max() == 0
    else:
        assert spread.min() > 0
    # maps alone (what evaluation reduces): a map with a corner blob tells mean, max and pooled max apart
    designed = np.random.default_rng(3).random((2, 1, SIZE, SIZE)) * 0.2
    designed[0, 0, :4, :4] = 1.0
    designed[1, 0, 10, 20] = 1.0
    got = module.image_scores(torch.from_numpy(designed).float()).double().numpy()
    np.testing.assert_allclose(got, EXPECTED[name](designed), rtol=1e-5)
