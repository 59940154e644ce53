"""Where a dataset's images live during a run (dataset.cache = auto | memory | memmap).

- memory: every split is a tensor on the training device, batches are index slices there
  (the fast path, and the only one before image sets outgrew device memory).
- memmap: each split's images are a .npy file under dataset.cache_dir (default outputs/cache),
  memory-mapped copy-on-write: pages are read from disk as batches touch them and the OS page
  cache keeps the hot ones, so the set may be larger than RAM. IndexBatches gathers each batch
  on the host and copies it to the training device.
- auto: memmap when the images would not fit where they are headed, else memory. "Fit" means
  below SAFETY_FRACTION of the memory free there: CUDA's free memory (torch.cuda.mem_get_info)
  when placing on a GPU, MemAvailable from /proc/meminfo when a loader decides whether it can
  decode into RAM at all. The fraction leaves room for the model, activations and the optimizer.
  On a CPU training device, splits a loader already holds in RAM stay there: writing them out
  would not lower the peak that loading already reached.

A cache file is named by what it was built from: loaders that read files (tiff_domains) key it
by their config and the list of source files with sizes and mtimes, so a later run with the same
data opens it without decoding anything, and a changed source file gives a new key (the stale
file of the same split is deleted). Splits that arrive in RAM (IDX sets, synthetic) are keyed by
a digest of their bytes. Files are written under a temporary name and renamed, so a run that
dies mid-write never leaves a half file that a later run would trust.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from freqexp.checks import choice
from freqexp.data.base import OneClassData, Split
from freqexp.errors import ConfigError

log = logging.getLogger("freqexp")

MODES = ("auto", "memory", "memmap")
DEFAULT_CACHE_DIR = "outputs/cache"
SAFETY_FRACTION = 0.5


def check_cache_options(cfg) -> None:
    """dataset.cache and dataset.cache_dir, for any dataset's check(); absent keys mean the defaults."""
    mode = cfg.get("cache", "auto")
    choice("dataset.cache", mode, MODES, sep=" | ")
    cache_dir = cfg.get("cache_dir", DEFAULT_CACHE_DIR)
    if not isinstance(cache_dir, str) or not cache_dir.strip():
        raise ConfigError("dataset.cache_dir", f"must be a folder path for memory-mapped image caches; got {cache_dir!r}")


def cache_dir_of(cfg) -> Path:
    return Path(os.path.expanduser(str(cfg.get("cache_dir", DEFAULT_CACHE_DIR))))


# -- how much memory there is -----------------------------------------------------------------

def host_available_bytes() -> int:
    """MemAvailable (what can be allocated without swapping), else total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget(device) -> int:
    """Bytes of images that may live on `device` at once."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * SAFETY_FRACTION)
    return int(host_available_bytes() * SAFETY_FRACTION)


def resolve_mode(mode: str, nbytes: int, device) -> str:
    """memory or memmap for `nbytes` of images headed to `device`."""
    if mode != "auto":
        return mode
    budget = memory_budget(device)
    chosen = "memmap" if nbytes > budget else "memory"
    if chosen == "memmap":
        log.info("images need %.2f GiB, more than the %.2f GiB budget on %s: memory-mapping them (dataset.cache=memmap)",
                 nbytes / 2**30, budget / 2**30, torch.device(device).type)
    return chosen


# -- cache files ------------------------------------------------------------------------------

def digest(value) -> str:
    """A short stable hash of anything JSON can write (config values, file lists)."""
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


def source_fingerprint(paths: Sequence[Path]) -> list:
    """What identifies a list of source files for a cache key: path, size, mtime (ns)."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return out


def open_memmap_tensor(path: Path) -> torch.Tensor:
    """A tensor over a .npy file, mapped copy-on-write: in-place changes stay in this process
    and never reach the file, and nothing is read until it is indexed."""
    array = np.load(path, mmap_mode="c")
    if array.size == 0:  # mmap cannot map zero bytes; an empty split costs nothing in RAM
        return torch.from_numpy(np.asarray(array).copy())
    return torch.from_numpy(array)


def cached_array(cache_dir: Path, name: str, key: str, shape: tuple, dtype, fill: Callable[[np.ndarray], None],
                 replace_stale: bool = True) -> tuple[torch.Tensor, Path]:
    """The memory-mapped array `cache_dir/<name>-<key>.npy`, built by `fill(out)` (which writes
    every row of `out`, a writable memmap of `shape`) when no valid file exists yet. With
    `replace_stale`, other files of the same name and another key are older versions of this
    array (their sources changed) and are removed once the new one is in place."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{name}-{key}.npy"
    if path.is_file():
        try:
            header = np.load(path, mmap_mode="r")
            if header.shape == tuple(shape) and header.dtype == np.dtype(dtype):
                return open_memmap_tensor(path), path
        except (ValueError, OSError):
            pass  # unreadable or another layout: rebuilt below
        log.warning("cache file %s does not hold what it should; rebuilding it", path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")  # writers never share one
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
        fill(out)
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if replace_stale:
        for other in cache_dir.glob(f"{name}-*.npy"):
            if other != path and other.name[len(name) + 1 : -len(".npy")].isalnum():  # <name>-<key> only
                other.unlink(missing_ok=True)  # a run still mapping it keeps its pages (POSIX)
    return open_memmap_tensor(path), path


def memmapped(split: Split, cache_dir: Path, name: str) -> Split:
    """The split with its images in a cache file keyed by their bytes (labels and masks stay in
    RAM: they are small and read whole). A split already memory-mapped is returned as it is."""
    if split.cache_file is not None:
        return split
    array = split.images.detach().cpu().contiguous().numpy()
    h = hashlib.blake2b(digest_size=10)
    h.update(json.dumps([str(array.dtype), list(array.shape)]).encode())
    h.update(memoryview(array.reshape(-1).view(np.uint8)))
    tensor, path = cached_array(cache_dir, name, h.hexdigest(), array.shape, array.dtype,
                                lambda out: out.__setitem__(Ellipsis, array), replace_stale=False)
    masks = None if split.masks is None else split.masks.cpu()
    return Split(tensor, split.labels.cpu(), masks, str(path))


def resident(split: Split, device) -> Split:
    """The split as tensors in `device` memory (a memory-mapped split is read in whole)."""
    moved = split.to(device)
    if moved.cache_file is None:
        return moved
    return Split(moved.images.clone(), moved.labels, moved.masks)


def place(data: OneClassData, device, mode: str = "auto", cache_dir: Path | str = DEFAULT_CACHE_DIR) -> OneClassData:
    """The data where the run will use it: in `device` memory, or memory-mapped on the host
    (pass the same `device` to IndexBatches so that each batch is copied there)."""
    device = torch.device(device)
    splits = {"train": data.train, "val": data.val, "test": data.test}
    if mode == "auto" and device.type == "cpu":
        return data  # see the module docstring: each split stays as its loader left it
    chosen = resolve_mode(mode, sum(s.nbytes for s in splits.values()), device)
    if chosen == "memory":
        return OneClassData(*(resident(s, device) for s in splits.values()), data.info)
    placed = [memmapped(s, Path(cache_dir), f"ram-{name}") for name, s in splits.items()]
    return OneClassData(*placed, {**data.info, "cache": "memmap"})
