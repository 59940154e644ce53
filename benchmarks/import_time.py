"""What a run's start-up imports cost, by top-level package, in a fresh interpreter.

    .venv/bin/python benchmarks/import_time.py [--cuda] [--lightning ROUNDS [--lightning-only]]

Runs `python -X importtime` on what `python -m freqexp` imports before its first epoch (the entry
point, freqexp.run with Lightning, MLflow's client and sqlite store) and prints the seconds of each
top-level package (its modules' own import time, summed), the wall time of the whole import in
that process, and with --cuda the time torch takes to start CUDA (torch.cuda.init) after it; and
how many of the modules had no usable compiled .pyc and were compiled from source in that
process (wheels installed with --no-compile, or PYTHONDONTWRITEBYTECODE set: a cost an installed
freqexp pays once, not on every run).

--lightning ROUNDS also times importing Lightning alone, the way freqexp does
(freqexp/lightning_import.py: torchmetrics does not import transformers) against a plain
`import lightning.pytorch`, alternating the two in fresh interpreters ROUNDS times each, and prints
the medians and their ratio; --lightning-only prints only that.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from collections import Counter

CODE = """
import time
start, t0 = time.time(), time.perf_counter()
import freqexp.__main__, freqexp.run, freqexp.training, mlflow.tracking, mlflow.store.tracking.sqlalchemy_store
t1 = time.perf_counter()
{cuda}
print(f'WALL {{t1 - t0:.3f}} {{t2 - t1:.3f}}')
import collections, os, sys
fresh = collections.Counter()  # modules compiled from source in this process: no .pyc, or one written just now
for name, m in list(sys.modules.items()):
    cached, source = getattr(m, '__cached__', None), getattr(m, '__file__', None)
    if isinstance(cached, str) and isinstance(source, str) and source.endswith('.py'):
        if not os.path.exists(cached) or os.path.getmtime(cached) >= start - 1:
            fresh[name.split('.')[0]] += 1
print('FRESH', sum(fresh.values()), ' '.join(f'{{k}}={{v}}' for k, v in fresh.most_common(8)))
"""


LIGHTNING = """
import sys, time
import freqexp.lightning_import as li
t0 = time.perf_counter()
{how}
print(f'LIGHT {{time.perf_counter() - t0:.3f}} {{int("transformers" in sys.modules)}}')
"""
WAYS = {"freqexp (lightning_import)": "li.import_lightning()", "plain import lightning.pytorch": "import lightning.pytorch"}


def compare_lightning(rounds: int) -> None:
    """Median seconds of importing Lightning each way, alternated in fresh interpreters."""
    times: dict = {k: [] for k in WAYS}
    loaded: dict = {}
    for _ in range(rounds):
        for name, how in WAYS.items():
            r = subprocess.run([sys.executable, "-c", LIGHTNING.format(how=how)], capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(r.stderr[-2000:])
            seconds, has = re.search(r"LIGHT ([\d.]+) (\d)", r.stdout).groups()
            times[name].append(float(seconds))
            loaded[name] = has == "1"
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"importing Lightning (after torch-free freqexp.lightning_import), {rounds} rounds alternated, median s:")
    for name in WAYS:
        runs = " ".join(f"{t:.2f}" for t in times[name])
        print(f"  {name:32} {med[name]:6.2f}   transformers imported: {'yes' if loaded[name] else 'no '}   ({runs})")
    plain, ours = med["plain import lightning.pytorch"], med["freqexp (lightning_import)"]
    print(f"ratio freqexp / plain: {ours / plain:.3f} ({plain - ours:+.2f} s saved)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--lightning", type=int, default=0, metavar="ROUNDS",
                   help="also compare importing Lightning freqexp's way with a plain import, ROUNDS times each")
    p.add_argument("--lightning-only", action="store_true", help="only that comparison")
    args = p.parse_args()
    if args.lightning_only:
        compare_lightning(max(args.lightning, 1))
        return
    cuda = "import torch; torch.cuda.init(); t2 = time.perf_counter()" if args.cuda else "t2 = t1"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", CODE.format(cuda=cuda)], capture_output=True, text=True)
    process = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(r.stderr[-2000:])
    per_package: Counter = Counter()
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            per_package[m[2].split(".")[0]] += int(m[1]) / 1e6
    imports, cuda_s = (float(v) for v in re.search(r"WALL ([\d.]+) ([\d.]+)", r.stdout).groups())
    print(f"imports of a run: {imports:.2f} s wall (under -X importtime, which adds a little); "
          f"{'torch.cuda.init ' + format(cuda_s, '.2f') + ' s; ' if args.cuda else ''}process {process:.2f} s in all")
    fresh = re.search(r"FRESH (\d+) ?(.*)", r.stdout)
    if fresh and int(fresh[1]):
        # no usable .pyc: installed with --no-compile, or PYTHONDONTWRITEBYTECODE set; a user's
        # second run reads the bytecode its first one wrote, so these seconds are paid once, not per run
        print(f"modules compiled from source in this process (no usable .pyc): {fresh[1]} ({fresh[2]}); "
              "their import time includes compiling them")
    else:
        print("every module was loaded from its compiled .pyc")
    print("seconds by top-level package (own import time of its modules):")
    total = sum(per_package.values())
    for name, s in per_package.most_common(args.top):
        print(f"  {name:24} {s:6.2f}  {s / total:5.1%}")
    print(f"  {'(all others)':24} {total - sum(s for _, s in per_package.most_common(args.top)):6.2f}")
    if args.lightning:
        compare_lightning(args.lightning)


if __name__ == "__main__":
    main()
