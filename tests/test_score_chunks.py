"""Scoring on a CPU in cache-sized chunks (ReconstructionModule.score_chunk): the chunk follows
from the model's largest layer output, and chunked scoring gives the whole batch's maps and
scores, so evaluation and validation report the same numbers faster."""
from __future__ import annotations

import pytest
import torch

import freqexp.training as training
from freqexp.training import CPU_SCORE_CHUNK_BYTES, build_module
from freqexp.validate import make_plan
from tests.conftest import compose_cfg


def _module(overrides=()):
    cfg = compose_cfg(["dataset=synthetic", "dataset.image_size=28", "trainer.progress_bar=false", *overrides])
    return cfg, build_module(make_plan(cfg), cfg).eval()


def test_the_chunk_holds_as_many_images_as_the_largest_layer_output_allows():
    cfg, cae = _module(["model=cae"])
    # The CAE's largest output is the decoder's last up-step: channels[0] feature maps at full size,
    # fp32, larger than any encoder output (half size) or the 1-channel reconstruction.
    per_image = cfg.model.channels[0] * 28 * 28 * 4
    x = torch.rand(1024, 1, 28, 28)
    assert cae.score_chunk(x) == CPU_SCORE_CHUNK_BYTES // per_image == 125
    assert cae.score_chunk(x[:40]) == 40  # a batch smaller than a chunk stays whole
    wide, wide_cae = _module(["model=cae", "model.channels=[64,128]"])
    assert wide_cae.score_chunk(x) == CPU_SCORE_CHUNK_BYTES // (64 * 28 * 28 * 4) == 62


def test_batches_stay_whole_on_a_gpu_and_for_models_with_their_own_micro_batches():
    _, cae = _module(["model=cae"])
    assert cae.score_chunk(torch.empty(1024, 1, 28, 28, device="meta")) == 1024  # not a CPU: whole batches
    _, patchcore = _module(["model=patchcore", "model.input_size=32", "model.center_crop=null"])
    assert patchcore.model.scores_in_micro_batches
    assert patchcore.score_chunk(torch.rand(300, 1, 28, 28)) == 300


@pytest.mark.parametrize("model,extra", [
    ("cae", []),
    ("cvae", ["score.reduction=topk"]),  # a reduction of the concatenated maps
    ("memae_fft", ["filter=ghpf", "filter.apply_to=both"]),
    ("draem", []),  # its own score: pooled max of the segmentation map
    ("vit_ad", []),
    ("ganomaly", []),
])
def test_chunked_scores_equal_the_whole_batch(monkeypatch, model, extra):
    torch.manual_seed(0)
    _, module = _module([f"model={model}", *extra])
    x = module.as_input(torch.rand(300, 1, 28, 28))
    monkeypatch.setattr(training, "CPU_SCORE_CHUNK_BYTES", 2**40)
    whole_maps, whole_scores = module.score(x)
    module._chunk_images.clear()
    per_image = training.largest_output_bytes(module.modules(), lambda: module._score(x[:1]))
    monkeypatch.setattr(training, "CPU_SCORE_CHUNK_BYTES", 7 * per_image)  # 300 = 42 chunks of 7 and one of 6
    assert module.score_chunk(x) == 7
    calls = []
    original = module._score
    monkeypatch.setattr(module, "_score", lambda part: calls.append(len(part)) or original(part))
    maps, scores = module.score(x)
    assert calls == [7] * 42 + [6]
    assert maps.shape == whole_maps.shape and scores.shape == whole_scores.shape == (300,)
    torch.testing.assert_close(maps, whole_maps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores, whole_scores, rtol=1e-5, atol=1e-6)
    assert not module.model.training  # score() leaves the train/eval mode as it found it


def test_largest_output_bytes_sees_every_leaf_module_and_no_container():
    net = torch.nn.Sequential(torch.nn.Linear(3, 50), torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(50, 2)))
    seen = training.largest_output_bytes(net.modules(), lambda: net(torch.zeros(4, 3)))
    assert seen == 4 * 50 * 4  # the first Linear's [4, 50] fp32 output
    assert all(not m._forward_hooks for m in net.modules())  # the hooks are gone afterwards
