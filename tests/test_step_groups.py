"""trainer.steps_per_call: the training batches in groups, one pass of Lightning's loop per group
and one optimizer step per batch, which must be the very same training as one batch per pass."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

from freqexp.data import IndexBatches, StepGroups
from freqexp.errors import TrainingError
from freqexp.training import STEPS_PER_CALL_GPU, ReconstructionModule, build_module, steps_per_call
from freqexp.validate import make_plan
from tests.conftest import compose_cfg
from tests.test_run import run_synthetic


def test_groups_hold_the_loaders_batches_in_their_order_every_epoch():
    ids = torch.arange(300)
    plain = IndexBatches(ids, batch_size=32, shuffle=True, seed=5)
    grouped = StepGroups(IndexBatches(ids, batch_size=32, shuffle=True, seed=5), 3)
    assert len(grouped) == 4 and len(grouped.loader) == len(plain) == 10
    epochs = []
    for _ in range(2):
        expected = [b.tolist() for b in plain]
        groups = list(grouped)
        assert [len(g) for g in groups] == [3, 3, 3, 1]  # the last group is short, no batch is lost
        assert [b.tolist() for g in groups for b in g] == expected
        epochs.append(expected)
    assert epochs[0] != epochs[1]  # reshuffled each epoch, the same way on both sides
    assert sorted(i for b in epochs[1] for i in b) == list(range(300))


def test_a_group_is_not_a_collection_lightning_would_walk_into():
    """Lightning moves tensors inside lists, tuples, dicts and dataclasses; a group must pass
    through its batch transfer untouched (its batches are on the device already)."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    group = next(iter(StepGroups(IndexBatches(torch.arange(10), batch_size=4), 2)))
    assert move_data_to_device(group, torch.device("cpu")) is group


def _module(overrides=()):
    cfg = compose_cfg(["dataset=synthetic", "trainer.progress_bar=false", *overrides])
    return build_module(make_plan(cfg), cfg)


def test_auto_groups_on_a_gpu_only_for_the_shared_step_on_device_resident_images():
    cae, cpu, gpu = _module(), torch.device("cpu"), torch.device("cuda", 0)
    on_host, on_gpu = torch.zeros(4, 1, 8, 8, dtype=torch.uint8), SimpleNamespace(device=gpu)
    assert steps_per_call("auto", cae, cpu, (on_host,)) == 1  # a CPU step dwarfs the loop's overhead
    assert steps_per_call("auto", cae, gpu, (on_gpu,)) == STEPS_PER_CALL_GPU > 1
    assert steps_per_call("auto", cae, gpu, (on_host,)) == 1  # memory-mapped on the host: no k-batch copies
    assert steps_per_call(5, cae, cpu, (on_host,)) == 5  # asked for: also on a CPU
    assert steps_per_call(5, cae, cpu, (on_host, torch.zeros(4))) == 1  # a supervised loader's batches are tuples
    for model in ("ganomaly", "draem", "patchcore"):  # procedures with their own training_step
        other = _module([f"model={model}"])
        assert type(other).training_step is not ReconstructionModule.training_step
        assert steps_per_call(5, other, gpu, (on_gpu,)) == 1


def _state(result):
    return torch.load(result.output_dir / "model.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("model", ["cae", "cvae", "memae_fft"])  # cvae: a random draw each step; memae_fft: memory set up from the loader (prepare)
def test_training_in_groups_is_the_same_training_as_batch_by_batch(tmp_path, store, model):
    # 256 images in batches of 24: 11 batches an epoch, groups of 3, 3, 3 and 2
    common = [f"model={model}", "trainer.max_epochs=2", "trainer.batch_size=24", "seed=7", "tracking.figures=none"]
    one = run_synthetic(tmp_path, store, *common, "trainer.steps_per_call=1", name="one")
    grouped = run_synthetic(tmp_path, store, *common, "trainer.steps_per_call=3", name="grouped")
    a, b = _state(one), _state(grouped)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key in ("val/auroc", "test/auroc", "train/epochs"):
        assert one.metrics[key] == grouped.metrics[key], key
    client = MlflowClient(store)
    runs = {name: client.get_run(r.run_id).data for name, r in (("one", one), ("grouped", grouped))}
    assert runs["one"].params["resolved.steps_per_call"] == "1" and runs["grouped"].params["resolved.steps_per_call"] == "3"
    history = {name: [m.value for m in client.get_metric_history(r.run_id, "train/loss")] for name, r in (("one", one), ("grouped", grouped))}
    assert len(history["one"]) == 2 and history["one"] == history["grouped"]


def test_the_nan_guard_stops_a_run_trained_in_groups(tmp_path, store):
    with pytest.raises(TrainingError, match="loss became nan in epoch 1"):
        run_synthetic(tmp_path, store, "model.name=tests.nan_model:NaNCAE", "trainer.steps_per_call=4")
