"""A single run's MLflow store in a process of its own (freqexp/store_process.py): the run records
the same things, its own process never imports MLflow, a run whose process dies is ended KILLED,
a write the store refuses fails the run, and a store that cannot be opened is the same one-line
error as before any training."""
import os
import pickle
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from freqexp import store_process
from freqexp.errors import ConfigError
from freqexp.run import execute
from freqexp.store_process import StoreError, StoreProcess, wanted
from freqexp.tracking import Tracker
from tests.conftest import FAST, REPO, compose_cfg

TIMED = ("sys/", "train/seconds")  # and every */throughput: times, not results


@pytest.fixture(autouse=True)
def no_leftover_process():
    yield
    left, store_process._process = store_process._process, None
    if left is not None:
        left.kill()


def test_a_run_through_the_store_process_records_what_a_run_in_one_process_records(tmp_path, store, monkeypatch):
    overrides = ["dataset=synthetic", *FAST, f"tracking.uri={store}", "trainer.max_epochs=3", "seed=5"]
    here = execute(compose_cfg(overrides), tmp_path / "here", run_name="here")
    store_process.start()
    assert store_process._process is not None

    def not_here(*args, **kwargs):
        raise AssertionError("the run opened the store in its own process")

    monkeypatch.setattr("freqexp.tracking.Tracker.__init__", not_here)  # this process only: the store process has its own
    there = execute(compose_cfg(overrides), tmp_path / "there", run_name="there")
    monkeypatch.undo()
    assert store_process._process is None, "the run claimed the started process"
    assert there.tracking_uri == here.tracking_uri and there.info["experiment_id"] == here.info["experiment_id"]

    client = MlflowClient(store)
    a, b = client.get_run(here.run_id), client.get_run(there.run_id)
    assert a.info.status == b.info.status == "FINISHED"
    assert b.data.params == a.data.params
    assert set(b.data.metrics) == set(a.data.metrics)
    for key, value in a.data.metrics.items():
        if not key.startswith(TIMED) and not key.endswith("/throughput"):
            assert b.data.metrics[key] == pytest.approx(value, rel=1e-6), key
    for key in ("train/loss", "val_epoch/auroc"):
        curve = lambda run: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
        assert len(curve(a)) == 3 and curve(b) == curve(a), key
    skip = {"output_dir", "mlflow.runName", "freqexp.pid"}
    assert {k: v for k, v in b.data.tags.items() if k not in skip} == {k: v for k, v in a.data.tags.items() if k not in skip}
    assert b.data.tags["status"] == "finished" and b.data.tags["freqexp.pid"] == str(os.getpid())
    files = lambda run: sorted(f.path for f in client.list_artifacts(run.info.run_id))
    assert files(b) == files(a) and "model.pt" in files(b)
    contexts = lambda run: sorted(t.value for d in run.inputs.dataset_inputs for t in d.tags)
    assert contexts(b) == contexts(a) == ["testing", "training", "validation"]


def test_the_run_process_itself_never_imports_mlflow(tmp_path):
    # nor transformers, which only torchmetrics' text metrics would import (freqexp/lightning_import.py)
    store = f"sqlite:///{tmp_path / 'm.db'}"
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from freqexp import store_process\n"
        "store_process.start()\n"
        "from tests.conftest import compose_cfg\n"
        "from freqexp.run import execute\n"
        f"r = execute(compose_cfg(['dataset=synthetic', 'trainer.max_epochs=1', 'trainer.progress_bar=false', 'tracking.uri={store}']),"
        f" Path({str(tmp_path / 'run')!r}))\n"
        "print('RUN', r.run_id, 'MLFLOW', sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'sqlalchemy', 'alembic', 'transformers'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("RUN "))
    run_id, imported = line.split()[1], line.split("MLFLOW ")[1]
    assert imported == "[]"
    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "FINISHED" and "test/auroc" in run.data.metrics


def test_a_run_whose_process_dies_is_ended_killed_with_what_it_logged(tmp_path, store):
    process = StoreProcess()
    assert os.getsid(process.proc.pid) != os.getsid(0), "Ctrl-C at the terminal must reach the run, not its store"
    tracker = process.open(store, "died")
    run_id = tracker.start("r", {"purpose": "test"})
    tracker.log_params({"lr": 0.001})
    tracker.log_epoch_metrics({"train/loss": 0.25}, step=1)
    tracker.log_epoch_metrics({"train/loss": 0.125}, step=2)
    process.proc.stdin.close()  # what the run's death looks like from the store's side
    assert process.proc.wait(timeout=120) == 0
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.params["lr"] == "0.001"
    assert f"pid {os.getpid()}" in run.data.tags["killed_reason"] and run.data.tags["status"] == "killed"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(1, 0.25), (2, 0.125)]


def test_a_run_whose_process_dies_while_its_answer_is_on_the_way_is_ended_killed(tmp_path, store):
    process = StoreProcess()
    tracker = process.open(store, "gone")
    pickle.dump(("start", ("r", {}), True), process._send_to)  # its answer finds the pipe closed
    process._send_to.flush()
    process.proc.stdout.close()
    process.proc.stdin.close()
    assert process.proc.wait(timeout=120) == 0
    (run,) = MlflowClient(store).search_runs([tracker.experiment_id])
    assert run.info.status == "KILLED" and "is gone" in run.data.tags["killed_reason"]


def test_an_answer_an_interrupted_wait_left_unread_never_goes_to_the_next_call(tmp_path, store, monkeypatch):
    process = StoreProcess()
    tracker = process.open(store, "interrupted")
    run_id = tracker.start("r", {})
    real_load = store_process.pickle.load

    def interrupted(stream):
        raise KeyboardInterrupt  # Ctrl-C while the run waits for its end to be written

    monkeypatch.setattr(store_process.pickle, "load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tracker.end("FINISHED")
    monkeypatch.setattr(store_process.pickle, "load", real_load)
    second = tracker.start("second", {})  # reads the end's answer first, then its own: the new run's id
    client = MlflowClient(store)
    assert second is not None and second != run_id and client.get_run(second).info.run_name == "second"
    assert client.get_run(run_id).info.status == "FINISHED"
    tracker.end("KILLED")
    assert client.get_run(second).info.status == "KILLED"
    process.proc.stdin.close()
    assert process.proc.wait(timeout=120) == 0


def test_the_store_opens_with_the_run_environment_as_it_is_when_the_store_opens(tmp_path, store, monkeypatch):
    """Hydra applies hydra.job.env_set (MLflow credentials, ...) after the store process started."""
    monkeypatch.setenv("FREQEXP_TEST_SET", "before")
    monkeypatch.setenv("FREQEXP_TEST_UNSET", "before")
    environ = {k: v for k, v in os.environ.items() if k != "FREQEXP_TEST_UNSET"}
    environ["FREQEXP_TEST_SET"] = "after"
    server = store_process._Server(os.getpid())
    server.open(store, "env", environ)
    assert os.environ["FREQEXP_TEST_SET"] == "after" and "FREQEXP_TEST_UNSET" not in os.environ
    assert server.tracker.experiment_id


def test_a_write_the_store_refused_fails_the_run_at_its_end(tmp_path, store):
    process = StoreProcess()
    tracker = process.open(store, "refused")
    run_id = tracker.start("r", {})
    tracker.log_artifacts([tmp_path / "never-written.txt"])  # sent; the store process cannot copy it
    tracker.log_metrics({"test/auroc": 0.9})
    with pytest.raises(StoreError, match="refused log_artifacts: .*never-written.txt"):
        tracker.end("FINISHED")
    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "FAILED" and "log_artifacts" in run.data.tags["error"]
    assert run.data.metrics["test/auroc"] == 0.9  # the writes after the refused one still happened
    tracker.end("FAILED")  # a run's failure path ends it again: no second error
    assert MlflowClient(store).get_run(run_id).info.status == "FAILED"
    process.proc.stdin.close()
    assert process.proc.wait(timeout=120) == 0


def test_a_store_that_cannot_be_opened_is_the_same_one_line_config_error(tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    uri = f"sqlite:///{garbage}"
    with pytest.raises(ConfigError) as here:
        Tracker(uri, "x")
    store_process.start()
    with pytest.raises(ConfigError) as there:
        store_process.claim(uri, "x")
    assert there.value.key == "tracking.uri" and str(there.value) == str(here.value)
    assert "cannot be opened" in str(there.value)
    assert store_process.claim(uri, "x") is None, "a process serves one run"


@pytest.mark.parametrize("argv, env, expected", [
    (["model=ae", "trainer.max_epochs=1"], None, True),
    ([], None, True),
    (["-m", "model=ae,cae"], None, False),
    (["--multirun", "model=ae,cae"], None, False),
    (["hydra.mode=MULTIRUN"], None, False),
    (["--cfg", "job"], None, False),
    (["--help"], None, False),
    (["--info=plugins"], None, False),
    (["--multi", "model=ae,cae"], None, False),  # Hydra's parser takes abbreviations
    (["--cf", "job"], None, False),
    (["-cn", "config", "model=ae"], None, True),
    (["++hydra.mode=MULTIRUN"], None, False),
    (["hydra.mode='MULTIRUN'"], None, False),
    (["model=ae"], "0", False),
    (["model=ae"], "1", True),
])
def test_only_a_single_run_gets_a_store_process(monkeypatch, argv, env, expected):
    if env is None:
        monkeypatch.delenv(store_process.ENV, raising=False)
    else:
        monkeypatch.setenv(store_process.ENV, env)
    assert wanted(argv) is expected


def test_a_store_process_that_died_before_the_run_asked_leaves_the_store_to_the_run(tmp_path, store, caplog):
    store_process.start()
    store_process._process.proc.kill()
    store_process._process.proc.wait(timeout=30)
    with caplog.at_level("WARNING", logger="freqexp"):
        assert store_process.claim(store, "x") is None
    assert "store process ended" in caplog.text and "opens the store itself" in caplog.text
    store_process.start()
    store_process._process.owner = -1  # as a forked child of the process that started it sees it
    assert store_process.claim(store, "x") is None


def test_a_run_that_fails_before_opening_the_store_leaves_no_store_process_behind(tmp_path):
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        # a list without --multirun passes the command-line check (the store process starts) and Hydra refuses it at once
        proc = subprocess.run([sys.executable, "-m", "freqexp", "dataset=synthetic", "model=ae,cae"], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=f, timeout=300)
    assert proc.returncode != 0 and "model" in err.read_text()
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd") == str(tmp_path) and b"store_process" in open(f"/proc/{pid}/cmdline", "rb").read():
                left.append(pid)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    assert left == [], "the store process no run claimed outlived the run's process"
