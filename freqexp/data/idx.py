"""Reader for the IDX format of (Fashion-)MNIST, gzip-compressed or not."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import zlib

import numpy as np

from freqexp.errors import DataError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# Decompressed files kept by this process, keyed by (path, size, mtime): a sweep's worker runs many
# jobs on the same data and decompresses it once (Fashion-MNIST: 0.3 s a job on 2 CPU cores).
_DECODED: "OrderedDict[tuple, bytes]" = OrderedDict()
DECODED_CACHE_BYTES = 256 * 2**20
_LOCK = threading.Lock()
_DECODING: "dict[tuple, threading.Event]" = {}  # files a thread is decompressing now; others wait for it


def gunzip(raw: bytes) -> bytes:
    """A gzip file's content. A file of one member (the usual) is inflated in one zlib call,
    which lets go of the interpreter's lock for all of it (gzip.open reads in small pieces, each
    taking the lock back) and checks the trailer's CRC and length; anything else (several
    members, a damaged or truncated file) goes to Python's gzip reader, as before, with its errors."""
    d = zlib.decompressobj(wbits=31)
    try:
        data = d.decompress(raw)
    except zlib.error:
        data = None
    if data is not None and d.eof and not d.unused_data.strip(b"\x00"):
        return data
    with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
        return f.read()


def _decode(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gunzip(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {e}") from None


def read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed; each file is decompressed once per process, also when a
    prefetch (below) is still at work on it (this waits for it rather than doing it twice)."""
    try:
        stat = path.stat()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    mine = None
    try:
        while mine is None:
            with _LOCK:
                if key in _DECODED:
                    _DECODED.move_to_end(key)
                    return _DECODED[key]
                pending = _DECODING.get(key)
                if pending is None or pending.is_set():  # a set one is a decompression that ended: never wait on it
                    mine = _DECODING[key] = threading.Event()
                    continue
            pending.wait()  # the other thread kept the bytes, or failed and this one tries itself
        data = _decode(path)
        with _LOCK:
            _DECODED[key] = data
            while sum(len(v) for v in _DECODED.values()) > DECODED_CACHE_BYTES and len(_DECODED) > 1:
                _DECODED.popitem(last=False)
        return data
    finally:
        if mine is not None:
            mine.set()  # first: whatever happens next, nobody waits on it any more
            with _LOCK:
                if _DECODING.get(key) is mine:
                    del _DECODING[key]


def prefetch(paths) -> Optional[threading.Thread]:
    """Start decompressing these files in a thread and return it (None when there is nothing to
    do). zlib lets go of the interpreter's lock while it inflates, so this runs on another core
    beside a run's import of Lightning; read_bytes then finds the bytes ready, or waits for them.
    A file that cannot be read is left to read_bytes in the loader, which says why."""
    paths = [Path(p).absolute() for p in paths if p is not None]  # resolved here: the cwd may change later
    if not paths or os.environ.get("FREQEXP_PREFETCH", "1") == "0":
        return None

    def work():
        for p in paths:
            try:
                read_bytes(p)
            except Exception:  # noqa: BLE001 - the loader reads it again and reports it in one line
                pass

    thread = threading.Thread(target=work, name="freqexp-prefetch", daemon=True)
    thread.start()
    return thread


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode an IDX byte string: 2 zero bytes, a dtype code, the number of dims, then
    big-endian uint32 sizes and the data. Returns a writable array."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise DataError(f"{source} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[data[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(f"{source} is truncated or corrupt: {len(data)} bytes, header promises {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).copy()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
