"""model=fe_clip and model=winclip through the normal run path (Hydra config, Lightning, MLflow) on
a tiny random CLIP saved in the test (no download anywhere), the weight loader, CLIP's image
normalisation and the one-line errors. The adapters' and scores' formulas are checked in
tests/test_fe_clip_fidelity.py."""
from __future__ import annotations

import json

import numpy as np

import pytest
import torch
from mlflow.tracking import MlflowClient

from freqexp.errors import ConfigError
from freqexp.run import execute
from tests.conftest import FAST, cli, compose_cfg, read_runs
from tests.tiny_clip import save_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny")


def clip_args(folder, model="fe_clip"):
    return [f"model={model}", f"model.clip.name={folder}", "trainer.batch_size=32", "trainer.eval_batch_size=64"]


def test_fe_clip_trains_on_pseudo_anomalies_and_logs_a_finished_run(tiny_clip, tmp_path, store):
    cfg = compose_cfg(["dataset=synthetic", "dataset.n_train=64", *clip_args(tiny_clip), *FAST, "trainer.max_epochs=2",
                       f"tracking.uri={store}"])
    result = execute(cfg, tmp_path / "run")
    run = MlflowClient(store).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["model"] == "fe_clip"
    metrics = run.data.metrics
    # its own losses, each logged per epoch: the image BCE and the map's focal + dice
    assert {"train/loss_cls", "train/loss_focal", "train/loss_dice", "val/auroc", "test/auroc", "test/pixel_auroc"} <= set(metrics)
    assert 0.0 <= metrics["test/auroc"] <= 1.0
    assert run.data.params["model.taps"] == "last4" and run.data.params["optim.name"] == "adam"
    assert "class token" in run.data.params["resolved.score"]
    # model.pt holds what was learnt (adapters, fc_patch), not the frozen CLIP
    state = torch.load(result.output_dir / "model.pt", weights_only=True)
    assert state and not any(k.startswith("clip.") for k in state)
    assert {k.split(".")[0] for k in state} == {"ffe", "lfs", "fc_patch"}


def test_only_the_adapters_and_fc_patch_are_trained(tiny_clip):
    from freqexp.models import build_model
    from omegaconf import OmegaConf

    model = build_model(OmegaConf.create({"name": "fe_clip", "clip": {"name": str(tiny_clip)}}), (3, 32, 32))
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"ffe", "lfs", "fc_patch"}
    clip_before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    groups = model.parameter_groups(5e-4)
    assert [g["lr"] for g in groups] == [5e-4, pytest.approx(5e-6)]  # fc_patch at 0.01 x lr
    opt = torch.optim.Adam(groups)
    loss, _ = model.supervised_loss(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]), torch.rand(4, 1, 32, 32) > 0.7)
    loss.backward()
    opt.step()
    assert all(torch.equal(clip_before[k], v) for k, v in model.clip.state_dict().items())
    frozen = build_model(OmegaConf.create({"name": "fe_clip", "clip": {"name": str(tiny_clip)}, "fc_patch": "frozen"}), (3, 32, 32))
    assert len(frozen.parameter_groups(5e-4)) == 1 and not frozen.fc_patch.weight.requires_grad


def test_winclip_is_training_free_and_scores_every_test_image(tiny_clip, tmp_path, store):
    cfg = compose_cfg(["dataset=synthetic", "dataset.n_train=32", *clip_args(tiny_clip, "winclip"), *FAST, f"tracking.uri={store}"])
    result = execute(cfg, tmp_path / "run")
    run = MlflowClient(store).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert not any(k.startswith("val/") for k in run.data.metrics)  # nothing fitted, nothing validated
    n_test = int(run.data.params["data.test_normal"]) + int(run.data.params["data.test_anomalous"])
    assert n_test == 128 and "test/pixel_auroc" in run.data.metrics
    state = torch.load(result.output_dir / "model.pt", weights_only=True)
    assert state == {}  # nothing learnt


def test_clip_input_is_three_channels_at_its_size_normalised_with_clips_statistics(tiny_clip):
    from freqexp.models.clip import FrozenCLIP

    clip = FrozenCLIP(str(tiny_clip))
    gray = torch.rand(2, 1, 32, 32)
    out = clip.prepare(gray)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (gray.repeat(1, 3, 1, 1) - mean) / std)
    big = FrozenCLIP(str(tiny_clip)).prepare(torch.rand(1, 3, 64, 48))
    assert big.shape == (1, 3, 32, 32)  # resized to the CLIP's own input size
    sized = FrozenCLIP(str(tiny_clip), image_size=48)
    assert sized.grid == 6 and sized.prepare(torch.rand(1, 3, 32, 32)).shape[-1] == 48
    with pytest.raises(ConfigError, match="model.clip.image_size"):
        FrozenCLIP(str(tiny_clip), image_size=36)  # not a multiple of the 8 px patches


def test_the_weight_loader_reads_a_saved_folder_and_names_what_is_missing(tiny_clip, tmp_path):
    from transformers import CLIPModel

    from freqexp.models.clip import load_clip

    model, tokenizer = load_clip(str(tiny_clip))
    reference = CLIPModel.from_pretrained(str(tiny_clip))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer("a photo")["input_ids"][0] == tokenizer.bos_token_id
    with pytest.raises(ConfigError, match=r"model.clip.name: .*no such folder"):
        load_clip(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"model.clip.name: .*not a CLIP folder"):
        load_clip(str(tmp_path / "empty"))
    # a hub id that is neither cached nor reachable: tests/test_fe_clip.py::test_an_offline_machine_... (a fresh process,
    # since huggingface_hub reads HF_HUB_OFFLINE when imported)


def test_an_offline_machine_without_the_weights_gets_one_line_and_no_run(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = cli(["model=fe_clip", "dataset=synthetic", f"tracking.uri={store}", "trainer.progress_bar=false"], cwd=tmp_path,
              env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert out.returncode != 0
    error = [line for line in out.stderr.splitlines() if line.startswith("freqexp: error")]
    assert len(error) == 1 and "model.clip.name" in error[0] and "local folder" in error[0]
    assert not (tmp_path / "mlflow.db").exists() or read_runs(store).empty


@pytest.mark.parametrize("override, key", [
    ("model.taps=[0,9]", "model.taps"),
    ("model.taps=first", "model.taps"),
    ("model.lfs_statistic=log", "model.lfs_statistic"),
    ("model.temperature=-1", "model.temperature"),
    ("model.fc_patch=sometimes", "model.fc_patch"),
    ("model.dct_window=[3,9]", "model.dct_window"),
    ("model.fusion_weight=2", "model.fusion_weight"),
    ("+model.prompt_depth=4", "model.prompt_depth"),
])
def test_bad_fe_clip_options_fail_before_any_run(tiny_clip, override, key):
    from freqexp.validate import make_plan

    cfg = compose_cfg(["dataset=synthetic", *clip_args(tiny_clip), override])
    with pytest.raises(ConfigError) as e:
        make_plan(cfg)
    assert e.value.key == key


def test_a_filter_on_the_score_is_refused_for_fe_clip(tiny_clip, tmp_path, store):
    cfg = compose_cfg(["dataset=synthetic", "dataset.n_train=32", *clip_args(tiny_clip), *FAST, "filter=bhpf",
                       "filter.apply_to=score", f"tracking.uri={store}"])
    with pytest.raises(ConfigError, match="filter.apply_to"):
        execute(cfg, tmp_path / "run")


def test_the_ablation_sweep_lists_the_reproductions_choices():
    from pathlib import Path

    import yaml

    preset = yaml.safe_load((Path(__file__).resolve().parent.parent / "sweeps" / "fe_clip_ablation.yaml").read_text())
    params = preset["hydra"]["sweeper"]["params"]
    assert params["model.taps"].split(",") == ["last4", "even", "late"]
    assert params["model.lfs_statistic"].split(",") == ["signed", "abs", "power"]
    assert str(params["model.temperature"]).split(",") == ["0.07", "logit_scale"]
    assert params["model.fc_patch"].split(",") == ["learnt", "frozen"]
    assert json.dumps(params)  # plain values, usable on the command line


def test_map_sigma_smooths_the_map_as_scipys_gaussian_filter(tiny_clip):
    from omegaconf import OmegaConf
    from scipy.ndimage import gaussian_filter

    from freqexp.models import build_model

    model = build_model(OmegaConf.create({"name": "fe_clip", "clip": {"name": str(tiny_clip)}, "map_sigma": 2.0}), (3, 32, 32))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    smoothed, scores = model.score(x)
    model.map_sigma = 0.0
    raw, raw_scores = model.score(x)
    want = np.stack([gaussian_filter(m, 2.0, mode="reflect") for m in raw[:, 0].double().numpy()])
    np.testing.assert_allclose(smoothed[:, 0].numpy(), want, atol=1e-5)
    assert torch.equal(scores, raw_scores)  # the image score is the class token's, not the map's
