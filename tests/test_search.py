"""Optuna searches that stop losers early (pruning), run trials asynchronously on several worker
processes, pin jobs to GPUs, and leave no orphans: read back from the study and from MLflow."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from freqexp.multirun import pruning
from freqexp.errors import ConfigError
from freqexp.multirun.parallel import DeviceSlots, plan_workers, with_device
from tests.conftest import PYTHON, cli, read_runs

SEARCH = ["--multirun", "+sweep=optuna", "dataset=synthetic", "trainer.progress_bar=false", "tracking.figures=none",
          "hydra.sweeper.sampler.seed=0"]


def study_of(tmp_path, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}")


# ---------------------------------------------------------------- pruning


def test_a_pruned_trial_stops_early_is_pruned_in_the_study_and_tagged_in_mlflow(tmp_path):
    """threshold pruner with a floor no AUROC reaches: every trial stops after its warm-up epoch."""
    db = f"sqlite:///{tmp_path / 'p.db'}"
    r = cli([*SEARCH, "trainer.max_epochs=4", "hydra.sweeper.n_trials=2", "hydra.sweeper.study_name=pruned",
             "sweep.pruner.name=threshold", "sweep.pruner.lower=1.01", "sweep.pruner.n_warmup_steps=2", f"tracking.uri={db}"],
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    study = study_of(tmp_path, "pruned")
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    for t in study.trials:  # reported after epochs 1 and 2 (steps = epochs trained), stopped once the warm-up is over
        assert sorted(t.intermediate_values) == [1, 2]
    runs = read_runs(db)
    assert list(runs["status"]) == ["KILLED", "KILLED"]
    assert set(runs["tags.pruned"]) == {"true"} and set(runs["tags.pruned_epoch"]) == {"2"}
    client = MlflowClient(db)
    for run_id, t in zip(runs.sort_values("start_time")["run_id"], study.trials):
        curve = {m.step: m.value for m in client.get_metric_history(run_id, "val_epoch/auroc")}
        assert sorted(curve) == [1, 2]  # 2 of 4 epochs trained
        # what Optuna saw: the objective the run would end with, i.e. (restore_best) its best epoch so far
        assert t.intermediate_values[1] == pytest.approx(curve[1])
        assert t.intermediate_values[2] == pytest.approx(max(curve[1], curve[2]))
        assert "test/auroc" not in client.get_run(run_id).data.metrics  # a pruned run is not evaluated on test
    assert "2 pruned" in r.stdout + r.stderr and "pruned  after epoch 2" in r.stdout
    # the leaderboard leaves pruned runs out by default, and shows them on request
    from freqexp.report import main as report_main

    assert report_main(["--uri", db, "--out", str(tmp_path / "rep")]) == 1
    assert report_main(["--uri", db, "--out", str(tmp_path / "rep"), "--include-pruned"]) == 0


def test_a_trial_reports_the_objective_it_would_end_with_at_step_epochs_trained():
    """With restore_best the run is evaluated at its best val/auroc epoch, so a trial that peaked
    early is judged by that peak (not the later, worse epoch); without, by the epoch just done.
    Steps are epochs trained, so min_resource=1 is a rung after the first epoch."""
    import torch

    from freqexp.training import BestWeights

    class Trial:  # what the callback calls on an Optuna trial
        def __init__(self):
            self.reports = []

        def report(self, value, step):
            self.reports.append((step, round(value, 6)))

        def should_prune(self):
            return False

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(2, 2)
            self.current_epoch = 0

    class Trainer:
        sanity_checking = False
        is_global_zero = True
        max_epochs = 10
        callback_metrics: dict = {}

    epochs = [(0.70, 0.50), (0.90, 0.40), (0.80, 0.60), (0.95, 0.30)]  # (val/auroc, val/ap) per epoch
    for restore_best, expected_auroc, expected_ap in [(True, [0.7, 0.9, 0.9, 0.95], [0.5, 0.4, 0.4, 0.3]),
                                                      (False, [0.7, 0.9, 0.8, 0.95], [0.5, 0.4, 0.6, 0.3])]:
        for monitor, expected in (("val/auroc", expected_auroc), ("val/ap", expected_ap)):
            trial, module, trainer = Trial(), Module(), Trainer()
            best = BestWeights() if restore_best else None
            chain = ([best] if best else []) + [pruning.objective_so_far(monitor, best), pruning.callback(trial)]
            for epoch, (auroc, ap) in enumerate(epochs):
                module.current_epoch = trainer.current_epoch = epoch
                trainer.callback_metrics = {"val/auroc": torch.tensor(auroc), "val/ap": torch.tensor(ap)}
                for cb in chain:
                    cb.on_validation_end(trainer, module)
            assert trial.reports == [(e + 1, v) for e, v in enumerate(expected)], (restore_best, monitor)
    # a pruner that always says stop: it stops a trial before its last epoch, never after it
    trial, module, trainer = Trial(), Module(), Trainer()
    trial.should_prune = lambda: True
    trainer.max_epochs, trainer.callback_metrics = 4, {"val/auroc": torch.tensor(0.6)}
    chain = [pruning.objective_so_far("val/auroc"), pruning.callback(trial)]
    for epoch, stops in ((2, True), (3, False)):
        module.current_epoch = trainer.current_epoch = epoch
        if stops:
            with pytest.raises(optuna.TrialPruned):
                [cb.on_validation_end(trainer, module) for cb in chain]
        else:
            [cb.on_validation_end(trainer, module) for cb in chain]
    assert trial.reports == [(3, 0.6), (4, 0.6)]  # both reported; the finished trial is not pruned


@pytest.mark.parametrize("name, kind", [("median", optuna.pruners.MedianPruner), ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
                                        ("hyperband", optuna.pruners.HyperbandPruner), ("threshold", optuna.pruners.ThresholdPruner)])
def test_each_pruner_is_optunas_own_with_its_settings(name, kind):
    cfg = {"name": name, "n_startup_trials": 2, "n_warmup_steps": 3, "min_resource": 2, "reduction_factor": 4,
           "max_resource": "auto", "lower": 0.7}
    p = pruning.build(cfg, max_epochs=27)
    assert isinstance(p, kind)
    if name == "median":
        assert (p._n_startup_trials, p._n_warmup_steps) == (2, 3)
    if name == "successive_halving":
        assert (p._min_resource, p._reduction_factor) == (2, 4)
    if name == "hyperband":
        assert (p._min_resource, p._max_resource, p._reduction_factor) == (2, 27, 4)  # auto: trainer.max_epochs
    if name == "threshold":
        assert (p._lower, p._n_warmup_steps) == (0.7, 3)
    # none is Optuna's NopPruner: a study made without a pruner would get a MedianPruner
    assert isinstance(pruning.build({"name": "none"}, 5), optuna.pruners.NopPruner)
    assert isinstance(pruning.build(None, 5), optuna.pruners.NopPruner)


def test_pruning_uses_optunas_lightning_callback_on_the_sweep_objective():
    from optuna_integration.pytorch_lightning import PyTorchLightningPruningCallback

    study = optuna.create_study(direction="maximize")
    cb = pruning.callback(study.ask())  # watching what objective_so_far puts in the callback metrics
    assert isinstance(cb, PyTorchLightningPruningCallback) and cb.monitor == pruning.OBJECTIVE_SO_FAR


# ---------------------------------------------------------------- bad input, before any job


@pytest.mark.parametrize("args, key, words", [
    (["+sweep=optuna", "sweep.pruner.name=medain"], "sweep.pruner.name", "did you mean median"),
    (["model=ae,cae", "sweep.pruner.name=median"], "sweep.pruner.name", "+sweep=optuna"),
    (["+sweep=optuna_multi", "sweep.pruner.name=median"], "sweep.pruner.name", "multi-objective"),
    (["+sweep=optuna", "sweep.workers=2", "hydra.sweeper.storage=null"], "sweep.workers", "hydra.sweeper.storage"),
])
def test_bad_search_settings_are_one_line_before_any_job(tmp_path, args, key, words):
    r = cli(["--multirun", "dataset=synthetic", "trainer.max_epochs=1", *args, f"tracking.uri=sqlite:///{tmp_path / 'x.db'}"],
            cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"freqexp: error: {key}:") and words in last and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("outputs/multiruns/*/*/*/job_status.json"))  # no job ran


def test_bad_settings_name_their_key_in_process():
    cfg = OmegaConf.create({"sweep": {"workers": 2, "jobs_per_device": 0}, "hardware": {"accelerator": "auto"}})
    with pytest.raises(ConfigError, match="sweep.jobs_per_device: must be an integer >= 1"):
        plan_workers(cfg, n_gpus=1)
    with pytest.raises(ConfigError, match="sweep.pruner.n_warmup_steps: must be an integer >= 0"):
        pruning.build({"name": "median", "n_warmup_steps": -1}, 5)
    with pytest.raises(ConfigError, match="sweep.pruner.lower"):
        pruning.build({"name": "threshold", "lower": "high"}, 5)


def test_a_pruner_on_a_single_run_is_refused(tmp_path):
    r = cli(["dataset=synthetic", "sweep.pruner.name=hyperband", f"tracking.uri=sqlite:///{tmp_path / 'x.db'}"], cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("freqexp: error: sweep.pruner.name:")
    assert not (tmp_path / "x.db").exists()


# ---------------------------------------------------------------- asynchronous workers


def test_two_workers_on_one_sqlite_study_finish_every_trial_once_and_overlap(tmp_path):
    db = f"sqlite:///{tmp_path / 'w.db'}"
    r = cli([*SEARCH, "trainer.max_epochs=2", "hydra.sweeper.n_trials=3", "hydra.sweeper.study_name=async", "sweep.workers=2",
             f"tracking.uri={db}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    study = study_of(tmp_path, "async")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert sorted(t.number for t in study.trials) == [0, 1, 2]  # none lost, none twice
    assert all(sorted(t.intermediate_values) == [1, 2] for t in study.trials)  # each epoch reported from the worker process
    runs = read_runs(db)
    assert len(runs) == 3 and set(runs["status"]) == {"FINISHED"}
    assert sorted(t.value for t in study.trials) == pytest.approx(sorted(runs["metrics.val/auroc"]))
    assert len({json.loads(p.read_text())["run_id"] for p in tmp_path.glob("outputs/multiruns/*/*/*/job_status.json")}) == 3
    spans = sorted(zip(runs["start_time"], runs["end_time"]))
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))  # two trials were in flight at once


def test_a_grid_on_two_workers_runs_every_job_once_through_the_default_launcher(tmp_path):
    db = f"sqlite:///{tmp_path / 'g.db'}"
    r = cli(["--multirun", "dataset=synthetic", "trainer.max_epochs=1", "trainer.progress_bar=false", "tracking.figures=none",
             "model=ae,cae,cvae", "sweep.workers=2", f"tracking.uri={db}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 jobs in flight at once" in r.stdout + r.stderr and "3 finished, 0 failed" in r.stdout
    runs = read_runs(db)
    assert sorted(runs["params.model.name"]) == ["ae", "cae", "cvae"] and set(runs["status"]) == {"FINISHED"}
    statuses = [json.loads(p.read_text()) for p in tmp_path.glob("outputs/multiruns/*/*/*/job_status.json")]
    assert sorted(s["run_id"] for s in statuses) == sorted(runs["run_id"])  # each job in its own dir, once
    # two worker processes ran the three jobs: one of them ran two (its imports and data served both),
    # and each took half of the cores
    from freqexp.multirun.orphans import PID_TAG

    pids = runs[f"tags.{PID_TAG}"].astype(int)
    assert pids.nunique() == 2 and pids.value_counts().max() == 2
    assert set(runs["params.resolved.cpu_threads"].astype(int)) == {max(1, (os.cpu_count() or 1) // 2)}


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize("gpus, per_device", [(1, 1), (1, 3), (2, 1), (2, 2), (8, 1), (8, 2)])
def test_device_slots_spread_jobs_over_every_gpu_k_at_a_time(gpus, per_device):
    slots = DeviceSlots(gpus, per_device)
    taken = [slots.acquire() for _ in range(gpus * per_device)]
    assert sorted(taken) == sorted(list(range(gpus)) * per_device)  # every device used, none over k
    assert taken[:gpus] == list(range(gpus))  # the first G jobs go to G different devices
    with pytest.raises(RuntimeError):
        slots.acquire()
    slots.release(taken[-1])
    assert slots.acquire() == taken[-1]  # a freed slot is reused at once
    assert slots.capacity == gpus * per_device


@pytest.mark.parametrize("gpus, setting, per_device, accelerator, expected", [
    (0, "auto", 1, "auto", (1, 0)), (1, "auto", 1, "auto", (1, 1)), (2, "auto", 1, "auto", (2, 2)),
    (8, "auto", 2, "auto", (16, 8)), (8, "auto", 1, "cpu", (1, 0)), (2, 3, 1, "gpu", (3, 2)), (0, 4, 1, "auto", (4, 0)),
])
def test_worker_count(gpus, setting, per_device, accelerator, expected):
    cfg = OmegaConf.create({"sweep": {"workers": setting, "jobs_per_device": per_device}, "hardware": {"accelerator": accelerator}})
    workers, used, k = plan_workers(cfg, n_gpus=gpus)
    assert (workers, used) == expected and k == per_device
    with pytest.raises(ConfigError, match="sweep.workers"):
        plan_workers(OmegaConf.create({"sweep": {"workers": 0}}), n_gpus=gpus)


def test_each_job_is_pinned_by_an_override_that_replaces_any_earlier_one():
    assert with_device(["model=cae", "hardware.device_index=3"], 1) == ["model=cae", "hardware.device_index=1"]
    assert with_device(["model=cae"], None) == ["model=cae"]


# ---------------------------------------------------------------- no orphans


def test_a_sweep_killed_hard_leaves_no_running_trial_or_run_behind(tmp_path):
    """kill -9 mid-trial; the next sweep fails the silent trial, marks its MLflow run KILLED, and
    runs its own trials: the killed one is neither a result nor in the way."""
    db = f"sqlite:///{tmp_path / 'k.db'}"
    storage = f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}"
    args = [*SEARCH, "hydra.sweeper.study_name=killed", "sweep.heartbeat=1", f"tracking.uri={db}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([PYTHON, "-m", "freqexp", *args, "trainer.max_epochs=200", "hydra.sweeper.n_trials=1"], cwd=tmp_path,
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # wait until the trial trains: it has reported an epoch
            time.sleep(1)
            try:
                trials = optuna.load_study(study_name="killed", storage=storage).trials
            except Exception:  # noqa: BLE001 - not created yet
                continue
            if trials and trials[0].intermediate_values:
                break
        else:
            pytest.fail("the trial never started")
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert optuna.load_study(study_name="killed", storage=storage).trials[0].state.name == "RUNNING"
    assert set(read_runs(db)["status"]) == {"RUNNING"}
    time.sleep(3)  # past the grace period (2 heartbeats)
    r = cli([*args, "trainer.max_epochs=1", "hydra.sweeper.n_trials=1"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    states = [t.state.name for t in optuna.load_study(study_name="killed", storage=storage).trials]
    assert states == ["FAIL", "COMPLETE"]
    assert "left RUNNING by a worker that stopped sending heartbeats are now FAIL" in r.stdout + r.stderr
    runs = read_runs(db).sort_values("start_time")
    assert list(runs["status"]) == ["KILLED", "FINISHED"]
    assert "is gone" in runs["tags.killed_reason"].iloc[0]
    assert "were left RUNNING by a process that is gone; now KILLED" in r.stderr


def test_the_orphan_command_marks_only_runs_whose_process_is_gone(tmp_path):
    from freqexp.multirun.orphans import HOST_TAG, PID_TAG, main, where_tags

    uri = f"sqlite:///{tmp_path / 'o.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("e")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = client.create_run(exp, run_name="dead", tags={HOST_TAG: where_tags()[HOST_TAG], PID_TAG: str(gone.pid)})
    alive = client.create_run(exp, run_name="alive", tags=where_tags())
    other = client.create_run(exp, run_name="elsewhere", tags={HOST_TAG: "another-host", PID_TAG: str(gone.pid)})
    assert main([f"tracking.uri={uri}"]) == 0
    status = {r: client.get_run(r.info.run_id).info.status for r in (dead, alive, other)}
    assert [status[dead], status[alive], status[other]] == ["KILLED", "RUNNING", "RUNNING"]
    assert "is gone" in client.get_run(dead.info.run_id).data.tags["killed_reason"]
    assert main([f"tracking.uri=sqlite:///{tmp_path / 'nope.db'}"]) == 2 and not (tmp_path / "nope.db").exists()


def test_a_job_config_composed_to_check_the_batch_is_the_one_the_job_runs_with():
    """Hydra's basic sweeper composes every job's config before launching; the launcher runs each
    job on that composition (once per job, not twice), and nothing else is ever kept or reused."""
    import pickle

    from freqexp.multirun.parallel import ComposedConfigs, checked_config, compose_job

    class Loader:
        def __init__(self):
            self.calls = 0

        def load_sweep_config(self, master_config, sweep_overrides):
            self.calls += 1
            return OmegaConf.create({"overrides": list(sweep_overrides), "n": self.calls})

    class Context:
        def __init__(self, loader):
            self.config_loader = loader

    master, other_master = OmegaConf.create({}), OmegaConf.create({})
    loader = Loader()
    context = Context(ComposedConfigs(loader))
    checked = [context.config_loader.load_sweep_config(master, [f"model={m}"]) for m in ("ae", "cae", "vae")]  # the sweeper's check
    assert loader.calls == 3
    assert checked_config(context, master, ["model=cae"], None) is checked[1]
    assert checked_config(context, master, ["model=ae"], None) is checked[0]
    assert loader.calls == 3  # both jobs run on the checked compositions
    assert checked_config(context, master, ["model=ae"], None) is None  # taken once: never handed to a second job
    assert checked_config(context, master, ["model=vae"], device=1) is None and not context.config_loader.kept  # a GPU job: dropped
    fresh = compose_job(context, master, ["model=ae"])  # composed now, by the plain loader, and not kept
    assert fresh.n == 4 and not context.config_loader.kept
    context.config_loader.load_sweep_config(master, ["model=vae"])
    assert checked_config(context, other_master, ["model=vae"], None) is None  # another sweep's config is never reused
    assert compose_job(Context(loader), master, ["x=1"]).n == 6  # a plain loader (a worker process) composes
    context.config_loader.load_sweep_config(master, ["model=vae"])
    rebuild, args = context.config_loader.__reduce__()  # what pickling sends a worker: the plain loader, not the kept configs
    assert rebuild(*args) is loader and pickle.loads(pickle.dumps(ComposedConfigs([1]))) == [1]
    ComposedConfigs.LIMIT, limit = 1, ComposedConfigs.LIMIT
    try:
        small = ComposedConfigs(Loader())
        small.load_sweep_config(master, ["a=1"]), small.load_sweep_config(master, ["a=2"])
        assert list(small.kept) == [("a=1",)]  # at most LIMIT kept
    finally:
        ComposedConfigs.LIMIT = limit
