"""Coresets of a memory bank on the device: exact greedy k-center (WEDGE-Net's) and PatchCore's
approximate greedy (the k-center search started from the mean distance to a few random rows).

Both add, k times, the row farthest from everything chosen so far: one pass over all N rows per
step (O(N * k * dim)), with no host-device synchronisation (the chosen row stays a tensor).
On CUDA the steps run as CUDA graphs of GRAPH_BLOCK steps each (one launch instead of ~8 per
step; FREQEXP_CUDA_GRAPHS=0 turns them off), with the same kernels and so the same selection as
the step-by-step loop, which any CPU, and CUDA when a capture fails, runs instead.

`low_precision` (bf16 / fp16: the memory banks' `precision: bf16 | fp16` on CUDA) halves the
bytes each step reads: the distance pass is one product of augmented rows
  [-2 x~, n(x~)_hi, n(x~)_lo, 1, 1] . [c~, 1, 1, n(c~)_hi, n(c~)_lo] = |x~ - c~|^2
(x~ the rows minus their mean, rounded; n the squared norm of the rounded row, split into two
terms), rounded once to a relative 2^-9 (bf16) / 2^-11 (fp16) of the distance itself. Rows whose
distances agree to that precision can then be taken in another order than by fp32, so the
selection may differ from the fp32 one: every step still takes a row within 2^-7 (bf16) / 2^-9
(fp16) of the farthest one's squared distance, and covers about as well (tested: the covering
radius within 5 % of fp32's, as two exact greedy runs from other starts differ)."""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

import torch

from freqexp.progress import Progress

log = logging.getLogger("freqexp")

GRAPH_BLOCK = 256  # greedy steps per CUDA graph
GRAPH_MIN_STEPS = 1024  # fewer steps run step by step (capturing costs more than it saves)
GRAPH_WARMUP = 3  # eager steps on a side stream before capture (cuBLAS handles, allocator)
PROGRESS_STEPS = 256  # step-by-step loop: progress is updated once per this many steps


def graphs_enabled() -> bool:
    return os.environ.get("FREQEXP_CUDA_GRAPHS", "1").strip() != "0"


class _Distances:
    """Squared distances of every row to one chosen row, as the greedy steps need them."""

    def __init__(self, features: torch.Tensor, low_precision: Optional[torch.dtype] = None):
        self.low = low_precision
        features = features.float()
        if low_precision is None:
            self.features = features
            self.sq_norms = features.pow(2).sum(1)
            return
        n, dim = features.shape
        centred = (features - features.mean(0)).to(low_precision)
        norms = centred.float().pow(2).sum(1)
        hi = norms.to(low_precision)
        lo = (norms - hi.float()).to(low_precision)
        self.rows = torch.empty(n, dim + 4, dtype=low_precision, device=features.device)
        self.rows[:, :dim] = centred * -2  # exact: a power of two
        self.rows[:, dim], self.rows[:, dim + 1] = hi, lo
        self.rows[:, dim + 2 :] = 1
        # a row's centre form [x~, 1, 1, hi, lo] from its stored form: reorder, and undo the -2
        self.order = torch.cat([torch.arange(dim), torch.tensor([dim + 2, dim + 3, dim, dim + 1])]).to(features.device)
        self.factor = torch.cat([torch.full((dim,), -0.5), torch.ones(4)]).to(features.device, low_precision)

    def cover(self, idx: torch.Tensor, min_dist: torch.Tensor) -> None:
        """min_dist = min(min_dist, squared distance of every row to row idx), in place."""
        if self.low is None:
            center = self.features.index_select(0, idx).squeeze(0)
            # |x - c|^2 = |x|^2 - 2 x.c + |c|^2 in one matrix-vector pass (memory-bound: few passes)
            dist = torch.addmv(self.sq_norms, self.features, center, alpha=-2.0).add_(self.sq_norms.index_select(0, idx)).clamp_min_(0)
        else:
            center = self.rows.index_select(0, idx).squeeze(0).index_select(0, self.order) * self.factor
            dist = torch.mv(self.rows, center)
        torch.minimum(min_dist, dist, out=min_dist)
        min_dist.index_fill_(0, idx, 0.0)  # rounding must not make a chosen row look uncovered


def _farthest_first(distances: _Distances, min_dist: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """k steps of: record idx, cover it, move idx to the row farthest from everything covered.
    Returns the k recorded rows, [k] int64 on the device. Progress is counted per
    PROGRESS_STEPS steps (per graph replay on CUDA), never by synchronising the device."""
    device = min_dist.device
    graphs = device.type == "cuda" and k >= GRAPH_MIN_STEPS and graphs_enabled()
    chosen = torch.empty(k + (GRAPH_BLOCK if graphs else 0), dtype=torch.long, device=device)
    idx = idx.reshape(1).clone()
    with Progress("coreset selection", k, "rows") as progress:
        done = _graph_steps(distances, min_dist, idx, chosen, k, progress) if graphs else 0
        for i in range(done, k):  # idx stays a tensor: no device sync per step
            chosen[i : i + 1] = idx
            distances.cover(idx, min_dist)
            idx = torch.argmax(min_dist).view(1)
            if (i + 1) % PROGRESS_STEPS == 0 or i + 1 == k:
                progress.update(i + 1 - progress.done)
    return chosen[:k]


def _graph_steps(distances: _Distances, min_dist: torch.Tensor, idx: torch.Tensor, chosen: torch.Tensor, k: int,
                 progress: Optional[Progress] = None) -> int:
    """Run the greedy steps as replays of one captured CUDA graph of GRAPH_BLOCK steps; returns
    the number of steps done (k, or fewer when capturing failed: the caller goes on step by step).
    Steps past k write into chosen's spare tail and are discarded. With `progress` shown, an
    event after each replay tells, without a synchronisation, how many blocks the device has run."""
    step = torch.zeros(1, dtype=torch.long, device=min_dist.device)

    def body():
        chosen.index_copy_(0, step, idx)
        distances.cover(idx, min_dist)
        idx.copy_(torch.argmax(min_dist).view(1))
        step.add_(1)

    current = torch.cuda.current_stream(min_dist.device)
    side = torch.cuda.Stream(min_dist.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP):
            body()
    current.wait_stream(side)
    done = GRAPH_WARMUP
    graph = torch.cuda.CUDAGraph()
    try:
        try:
            capture = torch.cuda.graph(graph, capture_error_mode="thread_local")
        except TypeError:  # torch without capture_error_mode
            capture = torch.cuda.graph(graph)
        with capture:
            for _ in range(GRAPH_BLOCK):
                body()
    except RuntimeError as e:  # pragma: no cover - depends on the driver
        log.warning("coreset: CUDA graph capture failed (%s); continuing step by step", e)
        return done
    events = []
    while done < k:
        graph.replay()
        done += GRAPH_BLOCK
        if progress is not None and progress.active:
            events.append(torch.cuda.Event())
            events[-1].record(current)
    _follow_events(events, progress, GRAPH_WARMUP, k)
    return k


def _follow_events(events: list, progress: Optional[Progress], first: int, k: int) -> None:
    """Report the replays the device has finished as their events complete (polling, no sync;
    the host would wait for the coreset next anyway)."""
    finished = 0
    while finished < len(events):
        while finished < len(events) and events[finished].query():
            finished += 1
        progress.update(min(k, first + finished * GRAPH_BLOCK) - progress.done)
        if finished < len(events):
            time.sleep(0.05)


def greedy_coreset(features: torch.Tensor, k: int, start: int = 0, low_precision: Optional[torch.dtype] = None) -> torch.Tensor:
    """Indices of k rows chosen by exact greedy k-center: begin at `start`, then repeatedly add
    the row farthest from everything chosen so far. [k] int64 on features' device."""
    n = features.shape[0]
    with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
        min_dist = torch.full((n,), float("inf"), device=features.device)
        idx = torch.tensor([start], device=features.device)
        return _farthest_first(_Distances(features, low_precision), min_dist, idx, k)


def approximate_greedy_coreset(features: torch.Tensor, k: int, generator: torch.Generator, n_starts: int = 10,
                               low_precision: Optional[torch.dtype] = None) -> torch.Tensor:
    """PatchCore's approximate greedy coreset: the k-center search starts from every row's mean
    distance to `n_starts` random rows (which are not themselves selected), then adds the
    farthest row k times. (Distances are compared squared: the same order as Euclidean.)"""
    with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
        features = features.float()
        n = features.shape[0]
        starts = torch.randperm(n, generator=generator)[: min(n_starts, n)].to(features.device)
        min_dist = torch.cdist(features, features.index_select(0, starts)).mean(1).pow(2)
        return _farthest_first(_Distances(features, low_precision), min_dist, torch.argmax(min_dist).view(1), k)
