"""hardware.channels_last: the same model, weights and images in NCHW and in NHWC, in this one
process, alternating. Times (1) scoring the test images as the evaluation does (freqexp.evaluate
.score_split, eval batch) and (2) training steps (forward, loss, backward, AdamW step; under the run's
precision, e.g. 16-mixed on a GPU) at the training batch, and prints NHWC / NCHW speed ratios and the largest score difference.

    .venv/bin/python benchmarks/channels_last.py [--images 4096] [--steps 20] [--repeats 2] [ARGS...]

Extra ARGS are config overrides (e.g. model=deep_cae hardware=gpu).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import freqexp  # noqa: F401
from freqexp.data import build_dataset
from freqexp.evaluate import score_split
from freqexp.overrides import compose_config
from freqexp.run import quiet_lightning
from freqexp.timing import wait_for_device
from freqexp.training import ReconstructionModule
from freqexp.validate import make_plan


def score_seconds(module, split, batch_size: int) -> tuple[float, torch.Tensor]:
    scored = score_split(module, split, batch_size)
    return scored.seconds, scored.scores


def train_seconds(module, images: torch.Tensor, batch_size: int, steps: int) -> float:
    """Seconds per training step of the module's model and loss (a plain loop: the layout's
    effect on the step itself, not on Lightning's path)."""
    model = module.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    precision = module.trainer_precision
    amp = precision in ("16-mixed", "bf16-mixed")
    scaler = torch.amp.GradScaler(enabled=precision == "16-mixed")
    n = len(images)
    for i in range(steps + 2):  # 2 warm-up steps
        if i == 2:
            wait_for_device(images.device)
            t0 = time.perf_counter()
        start = (i * batch_size) % max(1, n - batch_size)
        x = module.as_input(images[start : start + batch_size])
        with torch.autocast(images.device.type, dtype=torch.float16 if precision == "16-mixed" else torch.bfloat16, enabled=amp):
            total, _ = module.loss(model(x)["recon"], x)
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()
    wait_for_device(images.device)
    return (time.perf_counter() - t0) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4096, help="test images scored per timing")
    ap.add_argument("--steps", type=int, default=20, help="training steps per timing")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    quiet_lightning()
    cfg = compose_config(["trainer.progress_bar=false", *args.overrides])
    plan = make_plan(cfg)
    device = plan.hardware.device
    data = build_dataset(cfg.dataset).to(device)
    test = data.test.subset(torch.arange(min(args.images, len(data.test))))
    state = copy.deepcopy(plan.model.state_dict())
    modules = {}
    for layout in ("NCHW", "NHWC"):
        p = make_plan(cfg)
        p.hardware.channels_last = layout == "NHWC"
        p.model.load_state_dict(state)
        modules[layout] = ReconstructionModule.from_plan(p, cfg).to(device)
        modules[layout].trainer_precision = p.hardware.precision
    score_s = {k: [] for k in modules}
    step_s = {k: [] for k in modules}
    scores = {}
    for _ in range(args.repeats):  # alternate, so drift in machine load hits both
        for layout, module in modules.items():
            score_split(module, test.subset(torch.arange(min(256, len(test)))), cfg.trainer.eval_batch_size)  # warm-up
            seconds, scores[layout] = score_seconds(module, test, cfg.trainer.eval_batch_size)
            score_s[layout].append(seconds)
    for _ in range(args.repeats):  # training last: it changes the weights
        for layout, module in modules.items():
            step_s[layout].append(train_seconds(module, data.train.images, cfg.trainer.batch_size, args.steps))
    s = {k: statistics.median(v) for k, v in score_s.items()}
    t = {k: statistics.median(v) for k, v in step_s.items()}
    print(f"device {device.type} ({plan.hardware.precision} training, fp32 scoring), {torch.get_num_threads()} threads, "
          f"model {cfg.model.name}, loss {cfg.loss.spec}, hardware.channels_last=auto gives {plan.hardware.channels_last}")
    for layout in modules:
        print(f"{layout}: scoring {len(test) / s[layout]:9,.0f} img/s (eval batch {cfg.trainer.eval_batch_size}; "
              f"runs {', '.join(f'{len(test) / v:,.0f}' for v in score_s[layout])})   "
              f"training {t[layout] * 1e3:7.1f} ms/step (batch {cfg.trainer.batch_size}; "
              f"runs {', '.join(f'{v * 1e3:.1f}' for v in step_s[layout])})")
    diff = (scores["NHWC"] - scores["NCHW"]).abs().max().item()
    scale = scores["NCHW"].abs().max().item()
    print(f"ratio NHWC / NCHW: scoring {s['NCHW'] / s['NHWC']:.2f}x, training step {t['NCHW'] / t['NHWC']:.2f}x; "
          f"largest image-score difference {diff:.2e} (largest score {scale:.2e})")


if __name__ == "__main__":
    main()
