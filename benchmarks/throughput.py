"""Training throughput: freqexp's training path (Lightning Trainer + ReconstructionModule +
device-resident index batches + per-epoch validation) against a plain PyTorch loop training
the same CAE, same loss, same optimizer, scheduler, precision, memory layout (hardware.channels_last) and batches, in this one process.

    .venv/bin/python benchmarks/throughput.py [--epochs 3] [--batch-size 256] [--limit 5400] [ARGS...]
    .venv/bin/python benchmarks/throughput.py --proxy      # the per-step overhead, on any machine
    .venv/bin/python benchmarks/throughput.py --proxy --steps-per-call 8   # and with 8 steps per loop pass

Extra ARGS are config overrides (e.g. model=cvae loss=mse hardware=gpu). Prints images/s and
microseconds per step for each and the ratio freqexp / plain (goal >= 0.95). Epoch 1 of each is
a warm-up and not timed. The timed part is the training batches of each later epoch on both
sides: freqexp's per-epoch validation runs but is outside the clock (the plain loop validates
nothing), the per-epoch logging, NaN guard and scheduler step are inside it.

--proxy is the CPU stand-in for a GPU measurement: a model so small (a 2-layer MLP autoencoder on
8x8 images, batch 32) that a step costs almost nothing, so the difference per step between the
two paths is the training path's own per-step overhead (Python, hooks, logging, syncs), in
microseconds. On a GPU that overhead is what a step waits for when the kernels are short.

--steps-per-call K adds freqexp's path with trainer.steps_per_call=K (Lightning's loop runs once
per K batches; the same batches and optimizer steps), timed the same way, beside the setting the
config resolves to on this device (auto: 8 on a GPU, 1 on a CPU).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import freqexp  # noqa: F401
from freqexp.data import IndexBatches, StepGroups, build_dataset
from freqexp.overrides import compose_config
from freqexp.run import build_trainer, quiet_lightning
from freqexp.timing import wait_for_device
from freqexp.training import ReconstructionModule, TrainTimer, steps_per_call, to_unit_float
from freqexp.validate import make_plan


PROXY = ["model=ae", "model.hidden=[16]", "model.latent_dim=4", "loss=mse", "dataset=synthetic", "dataset.image_size=8",
         "dataset.n_train=4096", "dataset.n_val=64", "dataset.n_test=64", "trainer.eval_batch_size=64"]


def plain_loop(plan, cfg, images, epochs: int, fused: bool) -> tuple[float, float]:
    """(images/s, seconds per step) of a hand-written loop over the same batches (epochs after the
    first), with torch's default AdamW or the fused one (the optimizer freqexp builds)."""
    layout = torch.channels_last if plan.hardware.channels_last else torch.contiguous_format  # the layout freqexp trains in
    model, loss = plan.model.to(images.device, memory_format=layout), plan.loss
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=fused or None)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    batches = IndexBatches(images, batch_size=cfg.trainer.batch_size, shuffle=True, seed=cfg.seed)
    use_amp = plan.hardware.precision in ("16-mixed", "bf16-mixed")
    amp_dtype = torch.float16 if plan.hardware.precision == "16-mixed" else torch.bfloat16
    scaler = torch.amp.GradScaler(enabled=plan.hardware.precision == "16-mixed")
    seen, seconds, steps = 0, 0.0, 0
    model.train()
    for epoch in range(epochs):
        wait_for_device(images.device)
        t0 = time.perf_counter()
        for xb in batches:
            x = to_unit_float(xb).contiguous(memory_format=layout)
            with torch.autocast(images.device.type, dtype=amp_dtype, enabled=use_amp):
                total, _ = loss(model(x)["recon"], x)
            opt.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(opt)
            scaler.update()
        sched.step()
        wait_for_device(images.device)
        if epoch > 0:
            seconds += time.perf_counter() - t0
            seen += len(images)
            steps += len(batches)
    return seen / seconds, seconds / steps


def freqexp_path(plan, cfg, data, epochs: int, group="auto") -> tuple[float, float, int]:
    """(images/s, seconds per step, batches per pass of the loop) of freqexp's training path, epochs
    after the first; `group` is trainer.steps_per_call (auto: what a run on this device resolves it to)."""
    module = ReconstructionModule.from_plan(plan, cfg, max_epochs=epochs)
    warm = TrainTimer()
    trainer = build_trainer(cfg, plan, [warm])
    train = IndexBatches(data.train.images, batch_size=cfg.trainer.batch_size, shuffle=True, seed=cfg.seed)
    k = steps_per_call(group, module, data.train.images.device, (data.train.images,))
    steps = len(train) * (epochs - 1)
    if k > 1:
        train = StepGroups(train, k)
    val = IndexBatches(data.val.images, data.val.labels, batch_size=cfg.trainer.eval_batch_size)
    per_epoch: list[float] = []

    class EpochClock(TrainTimer):
        def on_train_epoch_end(self, trainer, pl_module):
            super().on_train_epoch_end(trainer, pl_module)
            per_epoch.append(self.seconds)
            self.seconds = 0.0

    trainer.callbacks.append(EpochClock())
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    return len(data.train) * (epochs - 1) / sum(per_epoch[1:]), sum(per_epoch[1:]) / steps, k


def diagnose(cfg, data, us_per_step: dict) -> None:
    """For the fused plain loop and freqexp's path, 2 epochs each, (1) the host-device
    synchronisations torch reports (torch.cuda.set_sync_debug_mode), by the line that caused them,
    and (2) the GPU kernel time per step under torch.profiler, against the wall time per step
    measured above: the GPU's busy share of a step (low = the step waits for the host). On a CPU
    both read 0 (a rehearsal of the code path)."""
    import warnings
    from collections import Counter
    from pathlib import Path

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    steps = len(IndexBatches(data.train.images, batch_size=cfg.trainer.batch_size, shuffle=True)) * 2
    paths = {"fused": lambda: plain_loop(make_plan(cfg), cfg, data.train.images, 2, fused=True),
             "ours": lambda: freqexp_path(make_plan(cfg), cfg, data, 2)}
    cuda = data.train.images.device.type == "cuda"
    for key, run in paths.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        sites = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            run()
        kernel_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA)
        busy = kernel_us / steps
        print(f"{key:6} syncs in 2 epochs of {steps // 2} steps (set-up and validation included): {sum(sites.values())}; "
              f"top sites: {', '.join(f'{s} x{n}' for s, n in sites.most_common(4)) or '-'}")
        print(f"{key:6} GPU kernel time {busy:7.0f} us/step (profiled, validation included) vs {us_per_step[key]:7.0f} us/step wall "
              f"(timed above): GPU busy ~{min(1.0, busy / us_per_step[key]):.0%} of a step")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--limit", type=int, default=None, help="cap on training images (default: all 5400 of class 0)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--proxy", action="store_true", help="per-step overhead with a negligible model (see above)")
    ap.add_argument("--diagnose", action="store_true", help="CUDA: also count host-device syncs and the GPU's busy share of a step")
    ap.add_argument("--steps-per-call", type=int, default=None, metavar="K",
                    help="also time freqexp's path with trainer.steps_per_call=K (K batches per pass of Lightning's loop)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    quiet_lightning()
    batch_size = 32 if args.proxy and args.batch_size == 256 else args.batch_size
    overrides = [*(PROXY if args.proxy else []), f"trainer.max_epochs={args.epochs}", f"trainer.batch_size={batch_size}",
                 "trainer.progress_bar=false", *([f"dataset.limit_train={args.limit}"] if args.limit else []), *args.overrides]
    cfg = compose_config(overrides)
    data = build_dataset(cfg.dataset).to(make_plan(cfg).hardware.device)
    runs = {"plain": [], "fused": [], "ours": [], **({"group": []} if args.steps_per_call else {})}
    for _ in range(args.repeats):  # alternate, so drift in machine load hits all paths
        runs["plain"].append(plain_loop(make_plan(cfg), cfg, data.train.images, args.epochs, fused=False))
        runs["fused"].append(plain_loop(make_plan(cfg), cfg, data.train.images, args.epochs, fused=True))
        runs["ours"].append(freqexp_path(make_plan(cfg), cfg, data, args.epochs, cfg.trainer.steps_per_call))
        if args.steps_per_call:
            runs["group"].append(freqexp_path(make_plan(cfg), cfg, data, args.epochs, args.steps_per_call))
    ips = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    us = {k: statistics.median(r[1] for r in v) * 1e6 for k, v in runs.items()}
    hw = make_plan(cfg).hardware
    print(f"device {hw.device.type} ({hw.precision}, {'NHWC' if hw.channels_last else 'NCHW'} on both sides), model {cfg.model.name}, loss {cfg.loss.spec}, batch {batch_size}, "
          f"{len(data.train)} train images, {args.epochs - 1} timed epochs x {args.repeats}; timed: training batches "
          f"(freqexp's per-epoch validation runs outside the clock){' [proxy: negligible model]' if args.proxy else ''}")
    resolved = runs["ours"][0][2]
    labels = {"plain": "plain loop, torch's default AdamW", "fused": "plain loop, fused AdamW",
              "ours": f"freqexp (Lightning), steps_per_call={cfg.trainer.steps_per_call} -> {resolved}",
              "group": f"freqexp (Lightning), steps_per_call={args.steps_per_call}"}
    for key in runs:
        print(f"{labels[key]:48}: {ips[key]:10,.0f} img/s  {us[key]:8.0f} us/step   (runs: {', '.join(f'{v:,.0f}' for v, *_ in runs[key])})")
    for key in [k for k in ("ours", "group") if k in runs]:
        print(f"{labels[key]}:")
        print(f"  per-step overhead over the same loop (fused AdamW): {us[key] - us['fused']:+.0f} us")
        print(f"  ratio freqexp / plain loop with the same optimizer (fused AdamW): {ips[key] / ips['fused']:.3f}   (goal >= 0.95)")
        print(f"  ratio freqexp / plain loop with torch's default AdamW          : {ips[key] / ips['plain']:.3f}")
    if args.diagnose:
        diagnose(cfg, data, us)


if __name__ == "__main__":
    main()
