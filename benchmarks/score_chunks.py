"""Scoring on a CPU in cache-sized chunks against whole batches: the same module, images and
batches (trainer.eval_batch_size), alternating, in one process.

    .venv/bin/python benchmarks/score_chunks.py [--models cae,cvae,...] [--images 4096] [--repeats 3] [OVERRIDES...]

For each model: the chunk ReconstructionModule.score_chunk picks (images whose largest layer
output fits CPU_SCORE_CHUNK_BYTES), images per second scored both ways, their ratio, and the
largest difference between the two ways' image scores. Evaluation and every epoch's validation
score this way. Default data: the synthetic dataset at 28 px, Fashion-MNIST's shape.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from freqexp.data import Split, build_dataset
from freqexp.evaluate import score_split
from freqexp.overrides import compose_config
from freqexp.training import CPU_SCORE_CHUNK_BYTES, build_module
from freqexp.validate import make_plan

DEFAULT_MODELS = "ae,cae,cvae,deep_cae,memae_fft,skip_ae,robust_ae,draem,vit_ad"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every model (default: dataset=synthetic dataset.image_size=28)")
    args = p.parse_args()
    base = args.overrides or ["dataset=synthetic", "dataset.image_size=28"]
    print(f"scoring {args.images:,} images on the CPU ({torch.get_num_threads()} threads), whole batches vs chunks of at most "
          f"{CPU_SCORE_CHUNK_BYTES / 2**20:.0f} MiB of largest layer output; median of {args.repeats}, alternating")
    print(f"{'model':12s} {'batch':>6s} {'chunk':>6s} {'whole img/s':>12s} {'chunked img/s':>14s} {'ratio':>6s} {'max |score diff|':>17s}")
    for name in args.models.split(","):
        cfg = compose_config([*base, f"model={name}", "trainer.progress_bar=false", "hardware=cpu"])
        plan = make_plan(cfg)
        module = build_module(plan, cfg).eval()
        shape = tuple(build_dataset(cfg.dataset).test.images.shape[1:])
        images = torch.rand(args.images, *shape, generator=torch.Generator().manual_seed(0))
        split = Split(images, torch.zeros(args.images, dtype=torch.long))
        batch = int(cfg.trainer.eval_batch_size)
        chunk = module.score_chunk(module.as_input(images[:batch]).float())
        key = next(iter(module._chunk_images), None)
        times = {"whole": [], "chunked": []}
        scores = {}
        score_split(module, split.subset(torch.arange(min(2 * batch, args.images))), batch)  # warm-up: allocator, kernels' first calls
        for r in range(args.repeats):
            for way in (("whole", "chunked") if r % 2 == 0 else ("chunked", "whole")):
                if key is not None:
                    module._chunk_images[key] = chunk if way == "chunked" else args.images  # whole: one chunk per batch
                scored = score_split(module, split, batch)  # as evaluation scores a split
                scores[way] = scored.scores
                times[way].append(scored.seconds)
        whole, chunked = (args.images / statistics.median(times[w]) for w in ("whole", "chunked"))
        diff = (scores["whole"] - scores["chunked"]).abs().max().item()
        print(f"{name:12s} {batch:6d} {chunk:6d} {whole:12,.0f} {chunked:14,.0f} {chunked / whole:6.2f} {diff:17.2e}", flush=True)


if __name__ == "__main__":
    main()
