"""The MLflow store under concurrency: parallel sweep jobs write into one sqlite store and
nothing is lost."""
from __future__ import annotations

import multiprocessing as mp

import pytest
from mlflow.tracking import MlflowClient

from freqexp.errors import ConfigError
from freqexp.tracking import Tracker, flatten, resolve_uri

N_WRITERS, N_PARAMS, N_STEPS, N_KEYS = 8, 40, 15, 4


def writer(uri: str, index: int, barrier) -> None:
    barrier.wait()  # all eight open the (new) store at the same moment
    tracker = Tracker(uri, "concurrency")
    tracker.start(f"writer-{index}", {"writer": str(index)})
    tracker.log_params({f"p{i}": f"{index}-{i}" for i in range(N_PARAMS)})
    for step in range(N_STEPS):
        tracker.log_metrics({f"m{k}": index + step / 100 + k for k in range(N_KEYS)}, step=step)
    tracker.end("FINISHED")


def test_eight_concurrent_writers_lose_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'c.db'}"
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(N_WRITERS)
    procs = [ctx.Process(target=writer, args=(uri, i, barrier)) for i in range(N_WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * N_WRITERS
    client = MlflowClient(uri)
    exps = [e for e in client.search_experiments() if e.name == "concurrency"]
    assert len(exps) == 1  # created once, not raced into duplicates
    runs = client.search_runs([exps[0].experiment_id], max_results=100)
    assert len(runs) == N_WRITERS and {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:
        index = r.data.tags["writer"]
        assert len(r.data.params) == N_PARAMS and r.data.params["p7"] == f"{index}-7"
        for k in range(N_KEYS):
            history = client.get_metric_history(r.info.run_id, f"m{k}")
            assert sorted(m.step for m in history) == list(range(N_STEPS))


def test_relative_sqlite_uri_resolves_under_cwd_and_file_store_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_uri("sqlite:///outputs/x.db") == f"sqlite:///{tmp_path}/outputs/x.db"
    assert (tmp_path / "outputs").is_dir()
    for bad in ("./mlruns", "file:///tmp/mlruns", ""):
        with pytest.raises(ConfigError) as e:
            resolve_uri(bad)
        assert e.value.key == "tracking.uri"


def test_flatten_gives_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": "1", "a.c.d": "[1, 2]", "e": "x"}
