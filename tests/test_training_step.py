"""The training step's bookkeeping: epoch loss means summed on the device, the NaN guard that
reads them every NAN_CHECK_EVERY steps (one host sync each) and at each epoch's end, the fused
optimizer, and (on a GPU) a step that never waits for the device."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from freqexp.errors import TrainingError
from freqexp.training import NAN_CHECK_EVERY, ReconstructionModule, make_optimizer
from freqexp.validate import make_plan
from tests.conftest import compose_cfg


def module(overrides=()):
    cfg = compose_cfg(["dataset=synthetic", "trainer.progress_bar=false", *overrides])
    return ReconstructionModule.from_plan(make_plan(cfg), cfg), cfg


def test_epoch_losses_are_the_image_weighted_means_of_every_step():
    m, _ = module()
    rng = np.random.default_rng(0)
    totals, mses, ssims, sizes = rng.random(7), rng.random(7), rng.random(7), rng.integers(1, 64, 7)
    for t, a, b, n in zip(totals, mses, ssims, sizes):
        m.check_and_log(torch.tensor(t), {"mse": torch.tensor(a, dtype=torch.float64), "ssim": torch.tensor(b)}, int(n))
    means = (m._loss_sum / m._loss_images).numpy()
    expected = [np.sum(v * sizes) / np.sum(sizes) for v in (totals, mses, ssims)]
    assert m._loss_names == ["loss", "loss_mse", "loss_ssim"]
    np.testing.assert_allclose(means, expected, rtol=1e-6)
    assert m.images_seen == int(sizes.sum())
    m.on_train_epoch_start()  # a new epoch starts new sums
    m.check_and_log(torch.tensor(2.0), {"mse": torch.tensor(1.0), "ssim": torch.tensor(1.0)}, 4)
    assert m._loss_images == 4 and m._loss_sum.tolist() == [8.0, 4.0, 4.0]


def test_the_nan_guard_reads_the_sums_every_k_steps_and_names_the_bad_term():
    m, _ = module()
    good = {"mse": torch.tensor(0.1), "ssim": torch.tensor(0.2)}
    m.check_and_log(torch.tensor(0.3), good, 8)
    # a NaN in the second step: nothing is read back until the k-th step, which raises
    m.check_and_log(torch.tensor(float("nan")), {"mse": torch.tensor(float("nan")), "ssim": torch.tensor(0.2)}, 8)
    for _ in range(NAN_CHECK_EVERY - 3):
        m.check_and_log(torch.tensor(0.3), good, 8)
    with pytest.raises(TrainingError, match=r"loss became nan in epoch 1 .*mse=nan, ssim=0\.2\b"):
        m.check_and_log(torch.tensor(0.3), good, 8)


def test_an_inf_in_a_short_epoch_is_caught_at_the_epoch_end_and_the_guard_can_be_off():
    m, _ = module()
    m.check_and_log(torch.tensor(float("inf")), {"mse": torch.tensor(float("inf")), "ssim": torch.tensor(0.0)}, 2)
    with pytest.raises(TrainingError, match="loss became inf"):
        m.log_epoch_losses()
    off, _ = module(["trainer.nan_guard=false"])
    for _ in range(NAN_CHECK_EVERY + 1):
        off.check_and_log(torch.tensor(float("nan")), {"mse": torch.tensor(float("nan")), "ssim": torch.tensor(0.0)}, 2)
    assert not torch.isfinite(off._loss_sum).all()  # nothing raised: the user chose to go on


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_the_optimizer_is_fused_and_steps_as_torchs_reference_implementation(name):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)
    b.load_state_dict(a.state_dict())
    cfg = {"name": name, "lr": 1e-2, "weight_decay": 1e-2, "betas": [0.9, 0.99]}
    fused = make_optimizer(cfg, a.parameters())
    assert fused.defaults.get("fused") is True
    reference = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name]
    extra = {"momentum": 0.9} if name == "sgd" else {"betas": (0.9, 0.99)}
    ref = reference(b.parameters(), lr=1e-2, weight_decay=1e-2, foreach=False, **extra)
    x = torch.randn(32, 16)
    for _ in range(3):
        for net, opt in ((a, fused), (b, ref)):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model, steps", [("cae", 1), ("cae", 4), ("ganomaly", 1)])  # 4: trainer.steps_per_call, a group of
def test_cuda_training_steps_never_wait_for_the_device(model, steps):                   # batches per pass of the loop
    """16-mixed on CUDA: the fused optimizer takes the gradient scaler's inf check on the device and
    the NaN guard reads nothing back between checks, so no step synchronises with the host; nor do
    GANomaly's two optimizer steps and its discriminator re-init check."""
    import lightning.pytorch as L

    from freqexp.data import IndexBatches, StepGroups, build_dataset
    from freqexp.training import build_module

    cfg = compose_cfg(["dataset=synthetic", "trainer.progress_bar=false", f"model={model}", "hardware=gpu",
                       "trainer.batch_size=16", "dataset.n_train=256"])
    m = build_module(make_plan(cfg), cfg)
    data = build_dataset(cfg.dataset).to("cuda")
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="16-mixed", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    batches = IndexBatches(data.train.images, batch_size=16, shuffle=True, device="cuda")
    if steps > 1:
        batches = StepGroups(batches, steps)
    seen = []

    class Watch(L.Callback):  # steps 2 .. k-1: after set-up, before the guard's own check
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            last = min(NAN_CHECK_EVERY // steps, len(batches)) - 2
            torch.cuda.set_sync_debug_mode("error" if 1 <= batch_idx < last else "default")
            seen.append(batch_idx)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.set_sync_debug_mode("default")

    trainer.callbacks.append(Watch())
    try:
        trainer.fit(m, train_dataloaders=batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(seen) == len(batches) and m.images_seen == len(data.train)
