"""hardware.channels_last: which runs train and score in NHWC, and that the layout changes
speed only: the same weights give the same image scores (and so the same AUROC, by
scikit-learn) in NCHW and NHWC."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from sklearn.metrics import roc_auc_score

import freqexp  # noqa: F401
from freqexp.data import build_dataset
from freqexp.errors import ConfigError
from freqexp.evaluate import score_split
from freqexp.training import ReconstructionModule
from freqexp.validate import Hardware, make_plan, resolve_channels_last

SYNTH = ["dataset=synthetic", "dataset.n_train=64", "dataset.n_val=32", "dataset.n_test=96", "hardware=cpu", "trainer.progress_bar=false"]


def cfg_of(*overrides):
    with initialize_config_module(config_module="freqexp.conf", version_base="1.3"):
        return compose(config_name="config", overrides=[*SYNTH, *overrides])


@pytest.mark.parametrize("model, expected", [("cae", True), ("deep_cvae", True), ("ae", False), ("pca", False)])
def test_auto_is_nhwc_for_trained_conv_models_on_a_cpu(model, expected):
    # ae and pca have no 4-D weight: nothing to lay out
    assert make_plan(cfg_of(f"model={model}")).hardware.channels_last is expected


def test_auto_leaves_one_pass_memory_banks_and_gpus_alone():
    plan = make_plan(cfg_of("model=patchcore", "model.backbone.arch=resnet18", "model.input_size=32", "model.center_crop=null"))
    assert any(p.dim() == 4 for p in plan.model.parameters()) and plan.hardware.channels_last is False
    cae = make_plan(cfg_of()).model
    gpu = Hardware("gpu", "16-mixed", torch.device("cuda", 0))
    assert resolve_channels_last({"channels_last": "auto"}, gpu, cae) is False
    assert resolve_channels_last({"channels_last": True}, gpu, cae) is True


def test_explicit_values_win_and_bad_ones_name_the_key():
    assert make_plan(cfg_of("hardware.channels_last=false")).hardware.channels_last is False
    assert make_plan(cfg_of("model=ae", "hardware.channels_last=true")).hardware.channels_last is True
    with pytest.raises(ConfigError, match=r"hardware\.channels_last.*auto, true or false.*'sometimes'"):
        make_plan(cfg_of("hardware.channels_last=sometimes"))


def test_nhwc_module_lays_out_weights_and_batches():
    cfg = cfg_of("dataset.channels=3")
    plan = make_plan(cfg)
    module = ReconstructionModule.from_plan(plan, cfg)
    convs = [p for p in module.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    batch = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    x = module.as_input(batch)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    torch.testing.assert_close(x, batch.float() / 255.0)
    batch_copy = batch.clone()
    x.add_(1.0)  # a copy: never a view of the dataset
    assert torch.equal(batch, batch_copy)


@pytest.mark.parametrize("model", ["cae", "deep_cvae"])
def test_nhwc_scores_equal_nchw_scores(model):
    cfg = cfg_of(f"model={model}", "dataset.channels=3")
    data = build_dataset(cfg.dataset)
    torch.manual_seed(0)
    nchw_plan = make_plan(cfg)
    nchw_plan.hardware.channels_last = False
    state = copy.deepcopy(nchw_plan.model.state_dict())
    nhwc_plan = make_plan(cfg)
    assert nhwc_plan.hardware.channels_last
    nhwc_plan.model.load_state_dict(state)
    scored = {}
    for name, plan in (("nchw", nchw_plan), ("nhwc", nhwc_plan)):
        module = ReconstructionModule.from_plan(plan, cfg)
        scored[name] = score_split(module, data.test, batch_size=40, keep_maps=True)
    a, b = scored["nchw"], scored["nhwc"]
    np.testing.assert_allclose(b.scores.numpy(), a.scores.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b.maps.numpy(), a.maps.numpy(), rtol=1e-4, atol=1e-6)
    labels = a.labels.numpy()
    assert 0 < labels.sum() < len(labels)
    assert abs(roc_auc_score(labels, b.scores.numpy()) - roc_auc_score(labels, a.scores.numpy())) <= 1e-4
