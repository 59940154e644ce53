"""Exact nearest-neighbour search over a memory bank, as chunked matrix products.

A bank is prepared once (`BankIndex`: its squared norms, and for the reduced-precision search a
centred bf16 copy) when it is built, loaded or moved, never per batch; `nearest_k` then runs
each block of queries against the bank as one matrix product, in blocks sized from the device
(free CUDA memory, or a share of the host's available RAM: `block_budget`).

Two searches, one answer. Both shortlist the `k + extra` best candidates of every query from
the products and re-rank the shortlist by the exact fp32 distance |q - b| (direct differences),
so the distances reported are always fp32 distances to bank rows:
  fp32  scores |b|^2 - 2 q.b in fp32 (TF32 off): today's arithmetic (torch.cdist's), 3 extra
        candidates against its rounding.
  bf16  one bf16 product of augmented rows (fp32 accumulation) gives the squared distance
        itself,  [q~, 1, 1, n(q~)_hi, n(q~)_lo] . [-2 b~, n(b~)_hi, n(b~)_lo, 1, 1] = |q~ - b~|^2,
        where q~, b~ are the rows minus the bank mean rounded to bf16 and n(.) the squared norm
        of the rounded row split into two bf16 terms (16 significant bits). Its only rounding is
        a relative 2^-9 of that squared distance (with norms in the product's output instead, as
        in |b|^2 - 2 q.b, their ~300x larger size swamps it: the true nearest fell as far as
        rank 250). On PatchCore and WEDGE-Net features (tests/test_memory_bank_speed_paths.py,
        docs/models.md) the true nearest row is within the first 3 of this order; 7 extra
        candidates are kept. Where a CPU has AMX / AVX512-BF16 this product runs ~6x faster
        than fp32; on CUDA it uses the bf16 tensor cores (compute capability >= 8.0).
  pruned  (k = 1, CPUs without fast bf16) an exact search that skips most of the product. Each
        row x is embedded as e(x) = [P^T c, |c - P P^T c|], c = x - bank mean, P the bank's
        PRUNE_DIMS leading principal directions: |e(q) - e(b)| <= |q - b| (Pythagoras, then the
        triangle inequality on the residuals). One product in PRUNE_DIMS + 1 dimensions gives
        every row's lower bound; PRUNE_SHORTLIST rows with small bounds (the 2 best of each of the
        strided groups with the smallest minima, as in _block_candidates) are re-ranked by their
        exact fp32 distances, and the best of them, d, is the answer when no row outside the
        shortlist has a bound (lowered by PRUNE_MARGIN against rounding) below d. Queries
        where one has are searched again by the fp32 product. Same answers as fp32 (tested); on
        PatchCore's features the product shrinks ~16x and nearly every query is settled. Banks
        narrower than PRUNE_MIN_DIM, shorter than PRUNE_MIN_ROWS or with fewer than
        PRUNE_MIN_WORK rows x dims are searched by the fp32 product: there the queries'
        embedding, the shortlist and the re-rank cost more than the bound saves (on PatchCore
        features, 2 CPU cores, `benchmarks/memory_bank_speed.py --search-widths`: 0.57-0.93x the
        product's speed at 128 dims, 0.57-0.67x at 1,000 rows, 0.70x at 2,000 x 256; 1.14x at
        4,000 x 256, 1.42-1.49x at 2,000 x 512 and 1,024, 4.5x at 15,680 x 1,024).
"""
from __future__ import annotations

import contextlib
import functools
import os
import weakref
from typing import Optional

import torch

SEARCHES = ("fp32", "bf16", "pruned")
SHORTLIST_EXTRA = {"fp32": 3, "bf16": 7, "pruned": 3}  # candidates re-ranked beyond the k asked for
PRUNE_DIMS = 128  # principal directions of the pruned search's lower-bound embedding
PRUNE_SHORTLIST = 16  # rows per query re-ranked exactly before the bound is checked
PRUNE_MARGIN = 3e-5  # the bound is lowered by this share of the embedded squared norms (fp32 rounding)
PRUNE_MIN_DIM = 2 * PRUNE_DIMS  # narrower banks: the pruned index searches by the fp32 product
PRUNE_MIN_ROWS = 2000  # and so do shorter ones
PRUNE_MIN_WORK = 1_000_000  # and banks of fewer rows x dims
GROUP = 16  # rows per group of the k = 1 shortlist (see _block_candidates)
ALIGN = 16  # augmented rows are padded to a multiple of this (tensor-core / AMX tile friendly)
MIN_QUERY_ROWS = 256  # below this many queries per block, the bank is split instead
CPU_BLOCK_CAP = 32 << 20  # CPU blocks stay under glibc's mmap threshold: no page faults per block
CUDA_BLOCK_CAP = 4 << 30


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AMX-BF16 or AVX512-BF16); without it a bf16
    product is emulated and slower than fp32. FREQEXP_CPU_BF16=0/1 overrides the detection."""
    forced = os.environ.get("FREQEXP_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"}) and torch.backends.mkldnn.is_available()
    except OSError:
        pass
    return False


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products are fast on `device` (CUDA: compute capability >= 8.0)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and cpu_has_fast_bf16()


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def free_device_bytes(device: torch.device) -> int:
    """Memory a new tensor can take: free CUDA memory plus what torch's allocator holds unused;
    on a CPU the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return available_host_bytes()


def block_budget(device: torch.device) -> int:
    """Bytes one search block may take: a quarter of the free CUDA memory (at most 4 GiB), or
    1/64 of the host's available memory (at most 32 MiB: on a CPU, blocks that fit the caches and
    the allocator's reuse are faster than large ones)."""
    device = torch.device(device)
    if device.type == "cuda":
        return max(64 << 20, min(CUDA_BLOCK_CAP, free_device_bytes(device) // 4))
    return max(4 << 20, min(CPU_BLOCK_CAP, available_host_bytes() // 64))


@contextlib.contextmanager
def fp32_matmul():
    """fp32 products in full fp32 (no TF32, no bf16 passes), whatever the process set globally."""
    previous = torch.get_float32_matmul_precision()
    if previous != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if previous != "highest":
            torch.set_float32_matmul_precision(previous)


def _split(values: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """values ~ hi + lo, both in dtype (twice its significant bits)."""
    hi = values.to(dtype)
    return hi, (values - hi.float()).to(dtype)


def _padded_width(dim: int) -> int:
    return -(-(dim + 4) // ALIGN) * ALIGN


class BankIndex:
    """What the search needs of one bank, computed once: fp32 squared norms, and for `bf16` the
    augmented bank rows [-2 b~, n_hi, n_lo, 1, 1, 0...] (b~ = bank row - bank mean, in bf16).
    Valid while it is the same tensor with the same version counter (`matches`): a new bank, a
    load_state_dict (which copies in place: the version moves) or a move to another device all
    make a new index. Not saved: pickling or deep-copying it gives None."""

    def __init__(self, bank: torch.Tensor, search: str = "fp32"):
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}; got {search!r}")
        self._ref = weakref.ref(bank)
        self._version = bank._version
        self.search = search
        self.device = bank.device
        self.rows, self.dim = bank.shape
        self.budget = block_budget(bank.device)
        with torch.no_grad(), torch.autocast(bank.device.type, enabled=False):
            b = bank.float()
            self.sq_norms = b.pow(2).sum(1)
            self.mean = self.augmented = self.basis = self.embedded = None
            if search == "pruned" and self.dim >= PRUNE_MIN_DIM and self.rows >= PRUNE_MIN_ROWS and self.rows * self.dim >= PRUNE_MIN_WORK:
                self._build_embedding(b)
            if search == "bf16":
                self.mean = b.mean(0)
                self.augmented = torch.zeros(self.rows, _padded_width(self.dim), dtype=torch.bfloat16, device=bank.device)
                step = max(1, self.budget // max(1, 8 * self.dim))
                for start in range(0, self.rows, step):  # chunked: no full fp32 centred copy
                    low = (b[start : start + step] - self.mean).to(torch.bfloat16)
                    hi, lo = _split(low.float().pow(2).sum(1), torch.bfloat16)
                    rows = self.augmented[start : start + step]
                    rows[:, : self.dim] = low * -2  # exact: a power of two
                    rows[:, self.dim], rows[:, self.dim + 1] = hi, lo
                    rows[:, self.dim + 2 : self.dim + 4] = 1

    def _build_embedding(self, b: torch.Tensor) -> None:
        """The pruned search's mean, basis P [D, PRUNE_DIMS] (eigenvectors of the bank's scatter
        matrix, fp64 eigh) and embedded bank rows [N, PRUNE_DIMS + 1] with their squared norms."""
        self.mean = b.mean(0)
        step = max(1, self.budget // max(1, 8 * self.dim))
        scatter = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=b.device)
        for start in range(0, self.rows, step):
            c = b[start : start + step] - self.mean
            scatter += (c.T @ c).double()
        _, vectors = torch.linalg.eigh(scatter)
        self.basis = vectors[:, -min(PRUNE_DIMS, self.dim):].flip(1).float().contiguous()
        self.embedded = torch.cat([self.embed(b[start : start + step]) for start in range(0, self.rows, step)])
        self.embedded_sq = self.embedded.pow(2).sum(1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[N, PRUNE_DIMS + 1]: each row's coordinates on the basis and the norm of what is left."""
        c = x.float() - self.mean
        p = c @ self.basis
        residual = torch.linalg.vector_norm(torch.addmm(c, p, self.basis.T, alpha=-1.0), dim=1, keepdim=True)
        return torch.cat([p, residual], 1)

    def as_fp32(self) -> "BankIndex":
        """This index searching by the plain fp32 product (shares the cached norms)."""
        plain = BankIndex.__new__(BankIndex)
        plain.__dict__.update(self.__dict__)
        plain.search = "fp32"
        return plain

    def matches(self, bank: torch.Tensor, search: str) -> bool:
        return self._ref() is bank and self._version == bank._version and self.search == search

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        """Queries in the form `scores` multiplies: fp32 as they are, or augmented bf16 rows."""
        if self.search != "bf16":
            return q
        low = (q - self.mean).to(torch.bfloat16)
        hi, lo = _split(low.float().pow(2).sum(1), torch.bfloat16)
        out = torch.zeros(q.shape[0], self.augmented.shape[1], dtype=torch.bfloat16, device=q.device)
        out[:, : self.dim] = low
        out[:, self.dim : self.dim + 2] = 1
        out[:, self.dim + 2], out[:, self.dim + 3] = hi, lo
        return out

    def scores(self, bank: torch.Tensor, prepared: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """[Q, stop - start] scores ordering bank rows start..stop by distance to each query
        (fp32: |b|^2 - 2 q.b; bf16: the approximate squared distance)."""
        if self.search != "bf16":
            return torch.addmm(self.sq_norms[start:stop], prepared, bank[start:stop].float().T, alpha=-2.0)
        return prepared @ self.augmented[start:stop].T

    def score_bytes(self) -> int:
        return 2 if self.search == "bf16" else 4

    def __reduce__(self):
        return (_no_index, ())

    def __deepcopy__(self, memo):
        return None


def _no_index():
    return None


def chunk_sizes(index: BankIndex, n_queries: int) -> tuple[int, int]:
    """(query rows, bank rows) per block within the index's memory budget: the whole bank per
    block when that leaves at least MIN_QUERY_ROWS queries, else bank slices (a multiple of
    GROUP rows)."""
    per_pair = 2 * index.score_bytes()  # the scores and the group minima / gathers made from them
    rows = index.budget // (index.rows * per_pair)
    if rows >= min(MIN_QUERY_ROWS, n_queries):
        return max(1, min(rows, n_queries)), index.rows
    bank_rows = index.budget // (MIN_QUERY_ROWS * per_pair) // GROUP * GROUP
    return MIN_QUERY_ROWS, max(GROUP, min(index.rows, bank_rows))


def _block_candidates(s: torch.Tensor, start: int, shortlist: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """About `shortlist` best (score, bank row) pairs of each query in a score block [Q, L] whose
    columns are bank rows start..start+L. For k = 1 and L a multiple of GROUP, without a topk over
    all L columns (on a CPU that costs more than the product itself): the L rows are dealt into
    L / GROUP strided groups (rows g, g + L/GROUP, ...: neighbouring rows, often near-duplicate
    patches of one image, never share a group), each group's minimum is taken in one vectorised
    pass, and each of the shortlist / 2 best groups gives its 2 best rows (2, not 1: bf16 scores
    tie where distances agree to 2^-9, and the nearest row must not lose such a tie inside its
    group). The true nearest row is lost only if two rows within rounding of it share its group;
    what is reported then is the exact distance of one of those."""
    q, width = s.shape
    if width <= shortlist:
        return s, torch.arange(start, start + width, device=s.device).expand(q, -1)
    take = -(-shortlist // 2)
    if k > 1 or width % GROUP or width // GROUP <= take:
        v, i = s.topk(shortlist, dim=1, largest=False, sorted=False)
        return v, i + start
    groups = width // GROUP
    dealt = s.view(q, GROUP, groups)
    _, g = dealt.amin(1).topk(take, dim=1, largest=False, sorted=False)  # [Q, take] best groups
    v, within = dealt.gather(2, g.unsqueeze(1).expand(-1, GROUP, -1)).topk(2, dim=1, largest=False, sorted=False)  # [Q, 2, take]
    return v.reshape(q, -1), (start + within * groups + g.unsqueeze(1)).reshape(q, -1)


def _rerank(q: torch.Tensor, cand: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest of each query's candidate rows [Q, m] by their exact fp32 distances |q - b|
    (direct differences: |q|^2 + |b|^2 - 2 q.b cancels too much to order near ties)."""
    r, m = cand.shape
    diff = bank.index_select(0, cand.reshape(-1)).view(r, m, -1).sub_(q.unsqueeze(1))
    d, order = torch.linalg.vector_norm(diff, dim=-1).topk(k, dim=1, largest=False, sorted=True)
    return d, cand.gather(1, order)


def nearest_k(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, index: Optional[BankIndex] = None,
              query_chunk: Optional[int] = None, bank_chunk: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 Euclidean distances [Q, k] (ascending) and indices [Q, k] of each query's k nearest
    bank rows. `index` (a BankIndex of this bank) chooses the search and carries the cached
    norms; without one (or a stale one) an exact fp32 index is built for this call.
    query_chunk / bank_chunk override the block sizes (tests). No host-device synchronisation (but the
    pruned search, a CPU one, which reads back which queries its bound did not settle)."""
    if index is None or not index.matches(bank, index.search):
        index = BankIndex(bank, "fp32")
    n = bank.shape[0]
    k = min(k, n)
    if queries.shape[0] == 0 or k == 0:
        return (queries.new_zeros(queries.shape[0], k, dtype=torch.float32),
                torch.zeros(queries.shape[0], k, dtype=torch.long, device=queries.device))
    if index.search == "pruned" and index.embedded is not None and k == 1 and n > PRUNE_SHORTLIST:
        return _pruned_nearest(queries, bank, index)
    shortlist = min(n, k + SHORTLIST_EXTRA[index.search])
    rows, bank_rows = chunk_sizes(index, queries.shape[0])
    # k = 1 groups GROUP rows: blocks of whole groups, and the last n % GROUP rows a block of their own
    main = n - n % GROUP if k == 1 else n
    rows, bank_rows = query_chunk or rows, bank_chunk or max(GROUP, bank_rows // GROUP * GROUP)
    blocks = [(start, min(main, start + bank_rows)) for start in range(0, main, bank_rows)] + ([(main, n)] if main < n else [])
    rerank_rows = max(1, index.budget // (2 * shortlist * index.dim * 4))
    dists, idxs = [], []
    with torch.no_grad(), torch.autocast(queries.device.type, enabled=False), fp32_matmul():
        bank32 = bank.float()
        for q in queries.float().split(rows):
            prepared = index.queries(q)
            cand_s, cand_i = [], []
            for start, stop in blocks:
                v, i = _block_candidates(index.scores(bank32, prepared, start, stop), start, shortlist, k)
                cand_s.append(v)
                cand_i.append(i)
            best_s, best_i = torch.cat(cand_s, 1), torch.cat(cand_i, 1)
            if best_s.shape[1] > shortlist:
                best_s, keep = best_s.topk(shortlist, dim=1, largest=False, sorted=False)
                best_i = best_i.gather(1, keep)
            for part, cand in zip(q.split(rerank_rows), best_i.split(rerank_rows)):
                d, i = _rerank(part, cand, bank32, k)
                dists.append(d)
                idxs.append(i)
    return torch.cat(dists), torch.cat(idxs)


def _pruned_nearest(queries: torch.Tensor, bank: torch.Tensor, index: BankIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """nearest_k's k = 1 by the pruned search (module docstring): [Q, 1] fp32 distances and indices.
    Per block of queries, the lowered bounds L = (1 - m)(|e(q)|^2 + |e(b)|^2) - 2 e(q).e(b) of every
    bank row, less the query's own term (1 - m)|e(q)|^2, which orders nothing: one product, one
    pass. The shortlist is the 2 best rows of the PRUNE_SHORTLIST / 2 strided groups of GROUP rows
    with the smallest minima (as _block_candidates deals them), plus the last n % GROUP rows; the
    smallest bound outside it is the smallest minimum of the other groups or the third best row of
    a chosen one. A query is settled when that bound exceeds the square of its shortlist's best
    exact distance d; the others go through the fp32 product."""
    n = bank.shape[0]
    main = n - n % GROUP
    # per block: the bounds [rows, n] and the re-rank's differences [rows, shortlist + tail, D] within the budget
    per_row = max(n * 4 * 2, (PRUNE_SHORTLIST + n - main) * index.dim * 4)
    rows = max(1, min(queries.shape[0], index.budget // per_row))
    groups, take = main // GROUP, PRUNE_SHORTLIST // 2
    keep = 1.0 - PRUNE_MARGIN
    inf = float("inf")
    dists = torch.empty(queries.shape[0], 1, dtype=torch.float32, device=queries.device)
    idxs = torch.empty(queries.shape[0], 1, dtype=torch.long, device=queries.device)
    unsettled = []
    with torch.no_grad(), torch.autocast(queries.device.type, enabled=False), fp32_matmul():
        bank32 = bank.float()
        lowered_bank = index.embedded_sq * keep
        for start in range(0, queries.shape[0], rows):
            q = queries[start : start + rows].float()
            r = q.shape[0]
            e = index.embed(q)
            bound = torch.addmm(lowered_bank, e, index.embedded.T, alpha=-2.0)  # L less the query's term
            if groups > take:
                dealt = bound[:, :main].view(r, GROUP, groups)  # row g + j * groups is dealt to group g
                minima = dealt.amin(1)
                _, g = minima.topk(take, dim=1, largest=False, sorted=False)
                best, within = dealt.gather(2, g.unsqueeze(1).expand(-1, GROUP, -1)).topk(3, dim=1, largest=False, sorted=True)
                cand = (within[:, :2] * groups + g.unsqueeze(1)).reshape(r, -1)
                outside = torch.minimum(minima.scatter_(1, g, inf).amin(1), best[:, 2].amin(1))
                if main < n:  # the last n % GROUP rows are always candidates
                    cand = torch.cat([cand, torch.arange(main, n, device=q.device).expand(r, -1)], 1)
            else:  # a bank of a few groups: the shortlist's smallest bounds, then the next one
                v, order = bound.topk(min(n, PRUNE_SHORTLIST + 1), dim=1, largest=False, sorted=True)
                cand = order[:, :PRUNE_SHORTLIST]
                outside = v[:, PRUNE_SHORTLIST] if n > PRUNE_SHORTLIST else torch.full((r,), inf, device=q.device)
            d, i = _rerank(q, cand, bank32, 1)
            dists[start : start + r], idxs[start : start + r] = d, i
            limit = d[:, 0].square() - keep * e.pow(2).sum(1)
            unsettled.append(torch.nonzero(outside <= limit).flatten() + start)
        redo = torch.cat(unsettled)
    if redo.numel():  # a sync; nearly always an empty set on PatchCore features
        d, i = nearest_k(queries[redo], bank, 1, index.as_fp32())
        dists[redo], idxs[redo] = d, i
    return dists, idxs


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, index: Optional[BankIndex] = None) -> torch.Tensor:
    """Euclidean distance of every query row to its nearest bank row, [Q]."""
    return nearest_k(queries, bank, 1, index)[0][:, 0]
