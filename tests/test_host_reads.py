"""A CPU stand-in for "no training or validation step waits for the GPU": while Lightning runs a
model's steps, every read of a tensor's value on the host (`.item()`, `float(t)`, `bool(t)`, `if t`,
`.tolist()`, `.numpy()`, `.cpu()`, `int(t)`, indexing with a tensor) made from freqexp's own code is
recorded with its file and line. On a GPU each of them is a host-device synchronisation: the
host stops queueing work until the device has caught up. Every model in conf/model is checked,
so a model added later is checked too; the CUDA test in test_training_step.py checks the same
for the default model and GANomaly with torch's own sync detector, Lightning's code included."""
from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

import pytest
import torch

import freqexp
from freqexp.data import IndexBatches, build_dataset
from freqexp.training import build_module
from freqexp.validate import make_plan
from tests.conftest import CLIP_MODELS, compose_cfg, tiny_clip_folder

ROOT = os.path.dirname(freqexp.__file__) + os.sep
READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")
MODELS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "model").glob("*.yaml"))
TRAIN_BATCHES, VAL_BATCHES, BATCH = 6, 4, 8
SMALL_BACKBONE = ("patchcore", "wedge")


@pytest.fixture
def host_reads(monkeypatch):
    """(reads, switch): reads counts (method, file, line) of freqexp's host reads while switch[0] is true."""
    reads, on = collections.Counter(), [False]

    def watch(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if on[0]:
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(ROOT):
                    reads[(name, caller[len(ROOT):], sys._getframe(1).f_lineno)] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)

    for name in READS:
        watch(name)
    return reads, on


def fit_watching(overrides, switch):
    """Fit a module on the synthetic set with Lightning for one epoch and validate it, watching
    training batches 2..5 and validation batches 2..4 (the first of each sets things up)."""
    import lightning.pytorch as L

    cfg = compose_cfg(["dataset=synthetic", "trainer.progress_bar=false", "trainer.fit_on=train",
                       f"dataset.n_train={TRAIN_BATCHES * BATCH}", *overrides])
    module = build_module(make_plan(cfg), cfg)
    data = build_dataset(cfg.dataset)

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            switch[0] = 1 <= batch_idx < TRAIN_BATCHES - 1

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            switch[0] = 1 <= batch_idx < VAL_BATCHES

        def on_train_batch_end(self, *args):
            switch[0] = False

        on_validation_batch_end = on_train_batch_end

    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Watch()])
    train = IndexBatches(data.train.images, batch_size=BATCH, shuffle=True, device="cpu")
    half = VAL_BATCHES * BATCH // 2  # normal and anomalous images, shuffled together (val/auroc needs both)
    pick = torch.cat([torch.nonzero(data.val.labels == 0)[:half, 0], torch.nonzero(data.val.labels == 1)[:half, 0]])
    pick = pick[torch.randperm(len(pick), generator=torch.Generator().manual_seed(0))]
    val = IndexBatches(data.val.images[pick], data.val.labels[pick], batch_size=BATCH)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    switch[0] = False
    return module


@pytest.mark.parametrize("model", MODELS)
def test_no_step_of_any_model_reads_a_tensor_on_the_host(model, host_reads):
    reads, switch = host_reads
    extra = [f"model.clip.name={tiny_clip_folder()}"] if model in CLIP_MODELS else []
    if model in SMALL_BACKBONE:  # the same code path at a size a test can afford (no 224 px WideResNet)
        extra += ["model.backbone.arch=resnet18", "model.input_size=null", "model.center_crop=null"]
    module = fit_watching([f"model={model}", *extra], switch)
    assert module.images_seen > 0
    assert not reads, f"model={model}: host reads in a step (each a GPU sync): " + ", ".join(
        f"{method} at {path}:{line} x{n}" for (method, path, line), n in sorted(reads.items()))


def test_the_watch_reports_a_host_read_in_a_step(host_reads, monkeypatch):
    """The watch itself: a loss read with .item() inside a step (as a guard might) is reported with its line."""
    import freqexp.models.autoencoders as ae

    reads, switch = host_reads
    original = ae.AE.training_loss

    def training_loss(self, x_in, target, loss_fn):
        total, parts = original(self, x_in, target, loss_fn)
        if total.item() < 0:  # never true: only the read matters
            raise AssertionError
        return total, parts

    monkeypatch.setattr(ae.AE, "training_loss", training_loss)
    # the monkeypatched method lives in this test file, not freqexp: count the tests folder too
    monkeypatch.setattr(sys.modules[__name__], "ROOT", os.path.dirname(os.path.dirname(__file__)) + os.sep)
    fit_watching(["model=ae"], switch)
    assert [(m, line) for (m, path, line) in reads if path.endswith("test_host_reads.py")] == [
        ("item", training_loss.__code__.co_firstlineno + 2)]
    assert sum(reads.values()) == TRAIN_BATCHES - 2

