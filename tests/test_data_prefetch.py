"""Reading IDX files in a thread while a run starts (freqexp.data.idx.prefetch, freqexp.data.prefetch).

What is checked: a file is decompressed once, also when the run asks for it while the thread is
still at it; a file the thread could not read is reported by the run as before; the one-call gzip
reader gives what Python's gzip module gives (several members, padding) and refuses what it
refuses; a dataset config names the files it prefetches, and a bad config prefetches nothing
and raises nothing."""
from __future__ import annotations

import gzip
import io
import sys
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
from tests.conftest import compose_cfg

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


def held_in_the_thread(monkeypatch, fail=False):
    """gunzip that, in the prefetch thread only, waits for `release` (and then fails with `fail`)."""
    started, release = threading.Event(), threading.Event()
    counting = idx.gunzip

    def gunzip(raw):
        if threading.current_thread().name == "freqexp-prefetch":
            started.set()
            assert release.wait(30)
            if fail:
                raise zlib.error("damaged on purpose")
        return counting(raw)

    monkeypatch.setattr(idx, "gunzip", gunzip)
    return started, release


def read_in_a_thread(path):
    got = []

    def read():
        try:
            got.append(idx.read_bytes(path))
        except DataError as e:
            got.append(e)

    reader = threading.Thread(target=read, daemon=True)  # a hung reader must not hang pytest
    reader.start()
    return reader, got


def test_a_file_asked_for_while_the_thread_decompresses_it_is_decompressed_once(fresh, monkeypatch, tmp_path):
    path = tmp_path / "x.gz"
    payload = bytes(range(256)) * 4000
    path.write_bytes(gzip.compress(payload))
    started, release = held_in_the_thread(monkeypatch)
    thread = idx.prefetch([path])
    assert started.wait(30)  # the thread is inside the decompression now
    reader, got = read_in_a_thread(path)
    reader.join(0.5)
    assert reader.is_alive() and got == []  # waiting for the thread's bytes (decompressing them itself would not wait)
    release.set()
    reader.join(30)
    thread.join(30)
    assert got == [payload] and len(fresh) == 1
    assert idx.read_bytes(path) is got[0]  # kept for the rest of the process
    assert len(fresh) == 1 and not idx._DECODING


def test_a_reader_waiting_on_a_thread_that_fails_reads_the_file_itself(fresh, monkeypatch, tmp_path):
    path = tmp_path / "x.gz"
    payload = b"abc" * 1000
    path.write_bytes(gzip.compress(payload))
    started, release = held_in_the_thread(monkeypatch, fail=True)
    thread = idx.prefetch([path])
    assert started.wait(30)
    reader, got = read_in_a_thread(path)
    reader.join(0.5)
    assert reader.is_alive()
    release.set()  # the thread's decompression fails now
    reader.join(30)
    thread.join(30)
    assert not reader.is_alive() and got == [payload]  # no hang, and the reader's own decompression counts
    assert not idx._DECODING


def test_an_ended_decompression_left_behind_is_never_waited_on(fresh, tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"xyz"))
    st = path.stat()
    ended = threading.Event()
    ended.set()  # what an interrupted reader could leave between its end and its clean-up
    idx._DECODING[(str(path.resolve()), st.st_size, st.st_mtime_ns)] = ended
    try:
        reader, got = read_in_a_thread(path)
        reader.join(30)
        assert got == [b"xyz"]
    finally:
        idx._DECODING.clear()


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


@pytest.mark.parametrize("damage", ["crc", "length", "cut", "magic", "garbage after"])
def test_the_one_call_reader_refuses_what_gzip_refuses_with_gzip_s_words(damage):
    blob = bytearray(gzip.compress(b"hello world " * 100))
    if damage == "crc":
        blob[-6] ^= 1
    elif damage == "length":
        blob[-2] ^= 1
    elif damage == "cut":
        blob = blob[: len(blob) // 2]
    elif damage == "magic":
        blob[0] = 0
    else:
        blob += b"not gzip"
    with pytest.raises((OSError, EOFError, zlib.error)) as theirs:  # how the loader read it before: gzip.open
        gzip.GzipFile(fileobj=io.BytesIO(bytes(blob))).read()
    with pytest.raises((OSError, EOFError, zlib.error)) as ours:
        idx.gunzip(bytes(blob))
    assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)


@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="needs dataset-fashion-mnist (make install)")
def test_fashion_mnist_prefetches_its_four_files_and_loads_them_unchanged(fresh, monkeypatch):
    threads = []
    real = idx.prefetch
    monkeypatch.setattr(idx, "prefetch", lambda paths: threads.append(real(paths)) or threads[-1])
    cfg = compose_cfg([f"dataset.root={FMNIST_DIR}"]).dataset
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
    {"name": "fashion_mnist", "root": "/no/such/folder", "normal_class": 0, "val_fraction": 0.1, "val_anomalies": "classes",
     "val_anomaly_ratio": 1.0, "limit_train": None, "limit_test": None},  # not a fallback to the default folders
    {"name": "fashion_mnist", "root": None, "normal_class": 12},  # a value the dataset's check refuses
    {"name": "mnist_idx", "root": "???"},
    {"name": "mnist_idx", "root": "/no/such/folder"},
    {"name": "synthetic"},
])
def test_a_config_that_names_no_files_prefetches_nothing_and_raises_nothing(monkeypatch, cfg):
    asked = []
    monkeypatch.setattr(idx, "prefetch", lambda paths: asked.append(list(paths)))
    data.prefetch(OmegaConf.create(cfg))
    data.prefetch(None)
    assert asked == []


def test_prefetched_paths_are_made_absolute_where_the_run_is(fresh, monkeypatch, tmp_path):
    (tmp_path / "x.gz").write_bytes(gzip.compress(b"here"))
    monkeypatch.chdir(tmp_path)
    idx.prefetch([Path("x.gz")]).join(30)
    assert [k[0] for k in idx._DECODED] == [str(tmp_path / "x.gz")]


def test_a_run_starts_reading_its_data_before_it_imports_the_run(monkeypatch):
    import types

    import freqexp.__main__ as entry

    order = []

    def run_module_attribute(name):  # `from freqexp.run import task` reads this
        if name.startswith("__"):
            raise AttributeError(name)
        order.append(("import", name))
        return lambda cfg: order.append(("task",)) or 0.5

    fake = types.ModuleType("freqexp.run")
    fake.__getattr__ = run_module_attribute
    monkeypatch.setitem(sys.modules, "freqexp.run", fake)
    monkeypatch.setattr(data, "prefetch", lambda cfg: order.append(("prefetch", cfg.name)))
    cfg = OmegaConf.create({"dataset": {"name": "fashion_mnist", "root": None}})
    assert entry.start_run(cfg) == 0.5
    assert order == [("prefetch", "fashion_mnist"), ("import", "task"), ("task",)]
    # a config whose dataset cannot be read is left to the run, which reports it
    order.clear()
    assert entry.start_run(OmegaConf.create({"dataset": "${oops}"})) == 0.5
    assert order == [("import", "task"), ("task",)]
