"""Training throughput: freqexp's training path (Lightning Trainer + ReconstructionModule +
device-resident index batches + per-epoch validation) against a plain PyTorch loop training
the same CAE, same loss, same optimizer and batch size, in this one process.

    .venv/bin/python benchmarks/throughput.py [--epochs 3] [--batch-size 256] [--limit 5400] [ARGS...]

Extra ARGS are config overrides (e.g. model=cvae loss=mse hardware=gpu). Prints images/s for
each and the ratio freqexp / plain (goal >= 0.95). Epoch 1 of each is a warm-up and not timed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import freqexp  # noqa: F401
from freqexp.data import IndexBatches, build_dataset
from freqexp.run import build_trainer, quiet_lightning
from freqexp.training import ReconstructionModule, TrainTimer, to_unit_float
from freqexp.validate import make_plan


def compose(overrides):
    from hydra import compose as hcompose, initialize_config_module

    with initialize_config_module(config_module="freqexp.conf", version_base="1.3"):
        return hcompose(config_name="config", overrides=overrides)


def plain_loop(plan, cfg, images, epochs: int) -> float:
    """Images/s of a hand-written loop over the same batches (epochs after the first)."""
    model, loss = plan.model.to(images.device), plan.loss
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    batches = IndexBatches(images, batch_size=cfg.trainer.batch_size, shuffle=True, seed=cfg.seed)
    use_amp = plan.hardware.precision in ("16-mixed", "bf16-mixed")
    amp_dtype = torch.float16 if plan.hardware.precision == "16-mixed" else torch.bfloat16
    scaler = torch.amp.GradScaler(enabled=plan.hardware.precision == "16-mixed")
    seen, seconds = 0, 0.0
    model.train()
    for epoch in range(epochs):
        sync(images.device)
        t0 = time.perf_counter()
        for xb in batches:
            x = to_unit_float(xb)
            with torch.autocast(images.device.type, dtype=amp_dtype, enabled=use_amp):
                total, _ = loss(model(x)["recon"], x)
            opt.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(opt)
            scaler.update()
        sched.step()
        sync(images.device)
        if epoch > 0:
            seconds += time.perf_counter() - t0
            seen += len(images)
    return seen / seconds


def freqexp_path(plan, cfg, data, epochs: int) -> float:
    module = ReconstructionModule.from_plan(plan, cfg, max_epochs=epochs)
    warm = TrainTimer()
    trainer = build_trainer(cfg, plan, [warm])
    train = IndexBatches(data.train.images, batch_size=cfg.trainer.batch_size, shuffle=True, seed=cfg.seed)
    val = IndexBatches(data.val.images, data.val.labels, batch_size=cfg.trainer.eval_batch_size)
    per_epoch: list[float] = []

    class EpochClock(TrainTimer):
        def on_train_epoch_end(self, trainer, pl_module):
            super().on_train_epoch_end(trainer, pl_module)
            per_epoch.append(self.seconds)
            self.seconds = 0.0

    trainer.callbacks.append(EpochClock())
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    return len(data.train) * (epochs - 1) / sum(per_epoch[1:])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--limit", type=int, default=None, help="cap on training images (default: all 5400 of class 0)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    quiet_lightning()
    overrides = [f"trainer.max_epochs={args.epochs}", f"trainer.batch_size={args.batch_size}", "trainer.progress_bar=false",
                 *([f"dataset.limit_train={args.limit}"] if args.limit else []), *args.overrides]
    cfg = compose(overrides)
    data = build_dataset(cfg.dataset).to(make_plan(cfg).hardware.device)
    ours, plain = [], []
    for _ in range(args.repeats):  # alternate, so drift in machine load hits both
        plan = make_plan(cfg)
        plain.append(plain_loop(plan, cfg, data.train.images, args.epochs))
        plan = make_plan(cfg)
        ours.append(freqexp_path(plan, cfg, data, args.epochs))
    o, p = statistics.median(ours), statistics.median(plain)
    hw = make_plan(cfg).hardware
    print(f"device {hw.device.type} ({hw.precision}), model {cfg.model.name}, loss {cfg.loss.spec}, "
          f"batch {args.batch_size}, {len(data.train)} train images, {args.epochs - 1} timed epochs x {args.repeats}")
    print(f"plain PyTorch loop : {p:10,.0f} img/s   (runs: {', '.join(f'{v:,.0f}' for v in plain)})")
    print(f"freqexp (Lightning): {o:10,.0f} img/s   (runs: {', '.join(f'{v:,.0f}' for v in ours)})")
    print(f"ratio freqexp/plain: {o / p:.3f}   (goal >= 0.95)")


if __name__ == "__main__":
    main()
