"""Every model option (conf/model/*.yaml) through the real run path: a short fit on synthetic
textures with a Lightning Trainer, scoring, and a full `execute` into MLflow. Per-model
behaviour (the math of each family) is tested in test_models_*.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import CLIP_MODELS, REPO, compose_cfg, tiny_clip_folder

MODEL_OPTIONS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
SMALL = ["dataset=synthetic", "dataset.n_train=48", "dataset.n_val=16", "dataset.n_test=16", "trainer.max_epochs=1",
         "trainer.batch_size=16", "trainer.eval_batch_size=16", "trainer.progress_bar=false"]


def overrides_for(name: str, tmp_path: Path, seed: int = 0, hardware: str = "cpu") -> list[str]:
    from freqexp.models import model_class

    cfg = compose_cfg([f"model={name}"])
    cls = model_class(cfg.model.name)
    extra = []
    if cls.needs_pseudo_anomalies:
        extra.append("augment=cutpaste")
    if cls.loss_terms is not None:
        extra.append(f"loss={cls.loss_terms[0]}")
    if name in CLIP_MODELS:  # a tiny random CLIP instead of the published weights (no download in tests)
        extra.append(f"model.clip.name={tiny_clip_folder()}")
    if hasattr(cls, "patch_features"):  # memory banks: a ResNet-18 at 64 px keeps the smoke test short on a CPU
        extra += ["model.backbone.arch=resnet18", "model.input_size=64"]
    return [f"model={name}", *SMALL, *extra, f"seed={seed}", f"hardware={hardware}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]


def fit_and_score(name: str, tmp_path: Path, seed: int = 0, hardware: str = "cpu"):
    """(train loss or None, anomaly maps of 4 test images) after one short fit."""
    from freqexp.data import IndexBatches, build_dataset
    from freqexp.run import build_trainer, quiet_lightning
    from freqexp.training import build_module, to_unit_float
    from freqexp.validate import make_plan

    quiet_lightning()
    cfg = compose_cfg(overrides_for(name, tmp_path, seed, hardware))
    plan = make_plan(cfg)
    module = build_module(plan, cfg)
    data = build_dataset(cfg.dataset)
    trainer = build_trainer(cfg, plan, [], max_epochs=module.max_epochs)
    device = plan.hardware.device
    data = data.to(device)
    trainer.fit(module, IndexBatches(data.train.images, batch_size=16, shuffle=True, seed=seed),
                IndexBatches(data.val.images, data.val.labels, batch_size=16))
    module.to(device)
    module.calibrate(data.val.images, 16)
    loss = trainer.callback_metrics.get("train/loss")
    return (None if loss is None else float(loss)), module.anomaly_map(to_unit_float(data.test.images[:4])).cpu()


@pytest.mark.parametrize("name", MODEL_OPTIONS)
def test_model_trains_scores_and_repeats(name, tmp_path):
    loss, maps = fit_and_score(name, tmp_path, seed=3)
    from freqexp.models import model_class

    if not model_class(compose_cfg([f"model={name}"]).model.name).gradient_free:
        assert loss is not None and torch.isfinite(torch.tensor(loss)), f"{name}: train loss {loss}"
    assert maps.shape == (4, 1, 32, 32)
    assert torch.isfinite(maps).all()
    loss2, maps2 = fit_and_score(name, tmp_path, seed=3)
    assert loss2 == loss
    torch.testing.assert_close(maps2, maps, rtol=1e-5, atol=1e-6)


# one model per training procedure (LightningModule or training objective); every other option runs
# end to end into MLflow in tests/test_zoo.py (`make zoo` on real Fashion-MNIST)
END_TO_END = ["cae", "vae", "ganomaly", "draem", "ddpm", "vit_ad", "memae", "patchcore", "wedge", "knn", "fe_clip"]


@pytest.mark.parametrize("name", END_TO_END)
def test_model_runs_end_to_end_into_mlflow(name, tmp_path):
    from freqexp.run import execute
    from tests.conftest import read_runs

    cfg = compose_cfg(overrides_for(name, tmp_path) + ["tracking.figures=all"])
    result = execute(cfg, tmp_path / "run")
    from freqexp.models import model_class

    # one-pass models are fitted on every normal training image (trainer.fit_on=auto): no validation
    validated = not model_class(name).gradient_free
    assert ("val/auroc" in result.metrics) == validated
    for key in ("val/auroc",) * validated + ("test/auroc", "test/ap", "train/throughput", "test/throughput"):
        assert torch.isfinite(torch.tensor(result.metrics[key])), f"{name}: {key}={result.metrics[key]}"
    runs = read_runs(result.tracking_uri)
    assert list(runs["status"]) == ["FINISHED"]
    assert int(runs["params.model.n_params"][0]) >= 0
    assert (tmp_path / "run" / "reconstructions.png").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine: pytest -k cuda)")
@pytest.mark.parametrize("name", MODEL_OPTIONS)
def test_model_trains_on_cuda_with_16_mixed(name, tmp_path):
    """hardware=gpu: CUDA + 16-mixed training, fp32 scoring; finite loss and maps of the right shape."""
    from freqexp.models import model_class

    if name in CLIP_MODELS:
        pytest.importorskip("transformers")  # scripts/gpu-wheels.sh leaves it behind (size)

    loss, maps = fit_and_score(name, tmp_path, seed=3, hardware="gpu")
    if not model_class(compose_cfg([f"model={name}"]).model.name).gradient_free:
        assert loss is not None and torch.isfinite(torch.tensor(loss)), f"{name}: train loss {loss}"
    assert maps.shape == (4, 1, 32, 32) and torch.isfinite(maps).all()
