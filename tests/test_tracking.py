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


def test_one_rule_for_what_defines_an_experiment_resume_hash_and_report_agree():
    """freqexp.tracking.RUN_CONTROL is the one list: the config less those keys hashes exactly as
    resume's config_hash does (so stored hashes stay valid), run-control overrides leave it alone,
    and an experiment key changes it."""
    import hashlib
    import json

    from omegaconf import OmegaConf

    from freqexp.run import config_hash
    from freqexp.tracking import defines_experiment, is_run_control, without_run_control
    from tests.conftest import compose_cfg

    def rule_hash(cfg):
        container = without_run_control(OmegaConf.to_container(cfg, resolve=True))
        return hashlib.sha1(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()[:16]

    base = compose_cfg(["dataset=synthetic", "model=ae"])
    rerun = compose_cfg(["dataset=synthetic", "model=ae", "sweep.resume=false", "sweep.workers=4", "tracking.figures=none",
                         "tracking.uri=sqlite:////elsewhere.db", "tracking.experiment=other", "trainer.progress_bar=false",
                         "hardware=gpu", "hardware.device_index=3", "dataset.cache=memmap", "dataset.cache_dir=/scratch"])
    other = compose_cfg(["dataset=synthetic", "model=ae", "trainer.max_epochs=3"])
    for cfg in (base, rerun, other, compose_cfg([]), compose_cfg(["model=draem", "filter=fair"])):
        assert rule_hash(cfg) == config_hash(cfg)
    assert config_hash(base) == config_hash(rerun) != config_hash(other)
    params = flatten(OmegaConf.to_container(rerun, resolve=True))
    assert {k for k in params if is_run_control(k)} >= {"sweep.resume", "tracking.figures", "hardware.device_index", "dataset.cache_dir"}
    assert not defines_experiment("seed") and defines_experiment("trainer.max_epochs") and defines_experiment("dataset.root")


def test_job_directories_leave_out_only_run_control_keys():
    """A sweep job's directory name (Hydra's override_dirname) skips the keys that change nothing
    computed: every key it skips is run control by the one rule reports and resume use."""
    from hydra import compose, initialize_config_module

    from freqexp.tracking import is_run_control

    with initialize_config_module(config_module="freqexp.conf", version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    skipped = list(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert skipped and all(is_run_control(k) for k in skipped), [k for k in skipped if not is_run_control(k)]
    assert not any(is_run_control(k) for k in ("model", "loss", "dataset.normal_class", "trainer.max_epochs", "seed"))


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_epoch_curves_are_written_together_and_nothing_pending_is_lost(tmp_path, monkeypatch):
    import freqexp.tracking as tracking

    uri = f"sqlite:///{tmp_path / 'e.db'}"
    client = MlflowClient(uri)
    tracker = Tracker(uri, "curves")
    run_id = tracker.start("run", {})
    monkeypatch.setattr(tracking, "EPOCH_FLUSH_SECONDS", 3600.0)
    for epoch in (1, 2, 3):
        tracker.log_epoch_metrics({"train/loss": 1.0 / epoch, "val_epoch/auroc": 0.5 + epoch / 10}, epoch)
    assert _history(client, run_id, "train/loss") == []  # kept: no store write per epoch
    tracker.log_metrics({"test/auroc": 0.9}, step=3)  # the run's final metrics carry what was pending
    assert _history(client, run_id, "train/loss") == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert _history(client, run_id, "val_epoch/auroc") == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert _history(client, run_id, "test/auroc") == [(3, 0.9)]
    monkeypatch.setattr(tracking, "EPOCH_FLUSH_SECONDS", 0.0)  # an epoch longer than the interval is written at once
    tracker.log_epoch_metrics({"train/loss": 0.2}, 4)
    assert _history(client, run_id, "train/loss")[-1] == (4, pytest.approx(0.2))
    monkeypatch.setattr(tracking, "EPOCH_FLUSH_SECONDS", 3600.0)
    tracker.log_epoch_metrics({"train/loss": 0.1}, 5)
    tracker.flush()
    assert _history(client, run_id, "train/loss")[-1] == (5, pytest.approx(0.1))
    tracker.end("FINISHED")


def test_a_run_that_fails_after_training_keeps_every_epoch_of_its_curves(tmp_path, monkeypatch):
    import freqexp.evaluate
    import freqexp.tracking as tracking
    from tests.conftest import read_runs
    from tests.test_run import run_synthetic

    monkeypatch.setattr(tracking, "EPOCH_FLUSH_SECONDS", 3600.0)  # nothing written before the failure

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(freqexp.evaluate, "evaluate", broken)
    store = f"sqlite:///{tmp_path / 'f.db'}"
    with pytest.raises(RuntimeError, match="evaluation broke"):
        run_synthetic(tmp_path, store, "trainer.max_epochs=3")
    runs = read_runs(store)
    assert list(runs["status"]) == ["FAILED"]
    client = MlflowClient(store)
    for key in ("train/loss", "val_epoch/auroc"):
        assert [step for step, _ in _history(client, runs["run_id"].iloc[0], key)] == [1, 2, 3], key
