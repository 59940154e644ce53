"""Reading IDX files in a thread while a run starts (freqexp.data.idx.prefetch, freqexp.data.prefetch).

What is checked: a file is decompressed once, also when the run asks for it while the thread is
still at it; a file the thread could not read is reported by the run as before; the one-call gzip
reader gives what Python's gzip module gives (several members, padding) and refuses what it
refuses; a dataset config names the files it prefetches, and a bad config prefetches nothing
and raises nothing."""
from __future__ import annotations

import gzip
import threading
import zlib
from collections import OrderedDict
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import freqexp.data as data
from freqexp.data import idx
from freqexp.data.fashion_mnist import FILES
from freqexp.errors import DataError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def fresh(monkeypatch):
    """An empty per-process cache, and a count of the files decompressed."""
    monkeypatch.setattr(idx, "_DECODED", OrderedDict())
    calls = []
    real = idx.gunzip
    monkeypatch.setattr(idx, "gunzip", lambda raw: calls.append(len(raw)) or real(raw))
    monkeypatch.delenv("FREQEXP_PREFETCH", raising=False)
    return calls


def test_a_file_asked_for_while_the_thread_decompresses_it_is_decompressed_once(fresh, monkeypatch, tmp_path):
    path = tmp_path / "x.gz"
    payload = bytes(range(256)) * 4000
    path.write_bytes(gzip.compress(payload))
    started, release = threading.Event(), threading.Event()
    counting = idx.gunzip

    def slow(raw):
        started.set()
        assert release.wait(30)
        return counting(raw)

    monkeypatch.setattr(idx, "gunzip", slow)
    thread = idx.prefetch([path])
    assert started.wait(30)  # the thread is inside the decompression now
    got = []
    reader = threading.Thread(target=lambda: got.append(idx.read_bytes(path)))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive()  # waiting for the thread's bytes, not decompressing them again
    release.set()
    reader.join(30)
    thread.join(30)
    assert got == [payload] and len(fresh) == 1
    assert idx.read_bytes(path) is got[0]  # kept for the rest of the process
    assert len(fresh) == 1


def test_a_file_the_thread_cannot_read_is_reported_by_the_run_as_before(fresh, tmp_path):
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(bytes(range(256)) * 40)[:60])
    idx.prefetch([bad, tmp_path / "missing.gz"]).join(30)  # ends quietly
    with pytest.raises(DataError, match=r"cannot read .*bad\.gz: Compressed file ended"):
        idx.read_bytes(bad)
    with pytest.raises(DataError, match="cannot read .*missing.gz"):
        idx.read_bytes(tmp_path / "missing.gz")
    assert not idx._DECODING


def test_the_switch_turns_prefetching_off(fresh, monkeypatch, tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"abc"))
    monkeypatch.setenv("FREQEXP_PREFETCH", "0")
    assert idx.prefetch([path]) is None and fresh == []
    assert idx.prefetch([]) is None


@pytest.mark.parametrize("blob", [
    gzip.compress(b"one member " * 1000),
    gzip.compress(b"first ") + gzip.compress(b"second"),
    gzip.compress(b"padded") + b"\0" * 7,
    gzip.compress(b""),
])
def test_the_one_call_reader_gives_what_gzip_gives(blob):
    assert idx.gunzip(blob) == gzip.decompress(blob)


@pytest.mark.parametrize("damage", ["crc", "length", "cut", "magic"])
def test_the_one_call_reader_refuses_what_gzip_refuses(damage):
    blob = bytearray(gzip.compress(b"hello world " * 100))
    if damage == "crc":
        blob[-6] ^= 1
    elif damage == "length":
        blob[-2] ^= 1
    elif damage == "cut":
        blob = blob[: len(blob) // 2]
    else:
        blob[0] = 0
    with pytest.raises((OSError, EOFError, zlib.error)):
        gzip.decompress(bytes(blob))
    with pytest.raises((EOFError, zlib.error)):
        idx.gunzip(bytes(blob))


@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="needs dataset-fashion-mnist (make install)")
def test_fashion_mnist_prefetches_its_four_files_and_loads_them_unchanged(fresh, monkeypatch):
    threads = []
    real = idx.prefetch
    monkeypatch.setattr(idx, "prefetch", lambda paths: threads.append(real(paths)) or threads[-1])
    cfg = OmegaConf.create({"name": "fashion_mnist", "root": str(FMNIST_DIR)})
    data.prefetch(cfg)
    assert len(threads) == 1
    threads[0].join(120)
    decoded = {Path(k[0]).name: v for k, v in idx._DECODED.items()}
    assert sorted(decoded) == sorted(f"{stem}.gz" for stem, _, _ in FILES.values())
    for stem, size, _ in FILES.values():  # what Python's gzip gives, read here on its own
        with gzip.open(FMNIST_DIR / f"{stem}.gz", "rb") as f:
            assert decoded[f"{stem}.gz"] == f.read() and len(decoded[f"{stem}.gz"]) == size
    assert len(fresh) == 4


@pytest.mark.parametrize("cfg", [
    {"name": "no_such_dataset"},
    {"name": "fashion_mnist", "root": "/no/such/folder"},
    {"name": "mnist_idx", "root": "???"},
    {"name": "synthetic"},
])
def test_a_config_that_names_no_files_prefetches_nothing_and_raises_nothing(fresh, cfg):
    data.prefetch(OmegaConf.create(cfg))
    data.prefetch(None)
    assert fresh == [] and not idx._DECODING


def test_a_run_starts_reading_its_data_before_it_imports_the_run(monkeypatch):
    import freqexp.__main__ as entry
    import freqexp.run

    order = []
    monkeypatch.setattr(data, "prefetch", lambda cfg: order.append(("prefetch", cfg.name)))
    monkeypatch.setattr(freqexp.run, "task", lambda cfg: order.append(("task", cfg.dataset.name)) or 0.5)
    cfg = OmegaConf.create({"dataset": {"name": "fashion_mnist", "root": None}})
    assert entry.start_run(cfg) == 0.5
    assert order == [("prefetch", "fashion_mnist"), ("task", "fashion_mnist")]
