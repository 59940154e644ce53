"""End-to-end runs: in-process on synthetic and real FMNIST, read back from MLflow; a sweep in
which one job fails; the CLI from another directory and as a console script."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from freqexp.errors import TrainingError
from freqexp.run import execute
from tests.conftest import FAST, REPO, cli, compose_cfg, needs_fmnist, read_runs

METRICS = ["val/auroc", "val/ap", "test/auroc", "test/ap", "test/f1", "test/acc", "test/balanced_acc",
           "train/throughput", "test/throughput", "sys/peak_memory_mb"]
ARTIFACTS = {"config.yaml", "metrics.json", "model.pt", "reconstructions.png", "roc.png", "pr.png", "score_hist.png"}


def run_synthetic(tmp_path, store, *overrides, name="run"):
    cfg = compose_cfg(["dataset=synthetic", *FAST, f"tracking.uri={store}", *overrides])
    return execute(cfg, tmp_path / name, run_name=name, tags={"purpose": "test"})


def test_synthetic_run_is_logged_to_mlflow_completely(tmp_path, store):
    result = run_synthetic(tmp_path, store, "trainer.max_epochs=2", "loss=mse+ssim+gradient")
    client = MlflowClient(store)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    # params: the flattened composed config
    p = run.data.params
    assert p["model.name"] == "cae" and p["loss.spec"] == "mse+ssim+gradient" and p["loss.weights.gradient"] == "1.0"
    assert p["dataset.name"] == "synthetic" and p["trainer.max_epochs"] == "2" and int(p["model.n_params"]) > 0
    # final metrics, identical to metrics.json
    saved = json.loads((result.output_dir / "metrics.json").read_text())
    for key in METRICS + ["test/pixel_auroc"]:
        assert key in run.data.metrics, key
        assert math.isclose(run.data.metrics[key], saved[key], rel_tol=1e-9)
    for key in ("val/auroc", "test/auroc", "test/ap", "test/pixel_auroc", "test/f1", "test/acc"):
        assert 0.0 <= saved[key] <= 1.0
    # per-epoch history: total and per-term train loss and the validation curve, exactly one
    # point per epoch at steps 1, 2; val/* itself is one value, the model evaluated on test
    for key in ("train/loss", "train/loss_mse", "train/loss_ssim", "train/loss_gradient", "val_epoch/auroc", "val_epoch/ap"):
        steps = sorted(m.step for m in client.get_metric_history(result.run_id, key))
        assert steps == [1, 2], (key, steps)
    for key in ("val/auroc", "val/ap", "test/auroc"):
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == [2], key
    curve = {m.step: m.value for m in client.get_metric_history(result.run_id, "val_epoch/auroc")}
    best = int(run.data.metrics["val/best_epoch"])
    assert run.data.metrics["val/auroc"] == pytest.approx(curve[best], abs=1e-6) and curve[best] == max(curve.values())
    losses = [m.value for m in sorted(client.get_metric_history(result.run_id, "train/loss"), key=lambda m: m.step)]
    assert losses[1] < losses[0]  # it learns
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert ARTIFACTS <= artifacts
    assert run.data.tags["purpose"] == "test" and run.data.tags["model"] == "cae"
    # where the run's time went: every phase timed once, the fit's the training time, and the
    # phases fit inside the run's own span (timing.json's instants), no phase counted twice
    timing = json.loads((result.output_dir / "timing.json").read_text())
    phases = timing["phases"]
    assert list(phases) == ["plan", "store", "data", "run_start", "setup", "fit", "evaluate", "artifacts", "figures", "run_end"]
    assert run.data.metrics["sys/seconds_fit"] == pytest.approx(saved["train/seconds"]) == pytest.approx(phases["fit"])
    # MLflow has every phase but the last (the final metrics are logged in it)
    assert run.data.metrics["sys/seconds_outside_fit"] == pytest.approx(sum(phases.values()) - phases["fit"] - phases["run_end"], abs=1e-6)
    span = timing["marks"]["run_end"] - timing["marks"]["run_start"]
    assert 0.9 * span <= sum(phases.values()) <= span


def test_run_names_say_what_ran_and_the_dataset_is_an_input(tmp_path, store):
    from freqexp.run import run_label

    cfg = compose_cfg(["dataset=synthetic", *FAST, f"tracking.uri={store}", "seed=3"])
    assert run_label(cfg) == f"cae · {cfg.loss.spec} · none · synthetic · s3"
    fm = compose_cfg(["dataset=fashion_mnist", "dataset.normal_class=[0,6]", "model=vae", "loss=mse"])
    assert run_label(fm, ["model=vae", "loss=mse", "dataset.normal_class=[0,6]", "trainer.max_epochs=3", "tracking.uri=x"]) \
        == "vae · mse · none · fashion_mnist[0,6] · s0 · trainer.max_epochs=3"
    assert len(run_label(fm, ["optim.lr=0.001"] * 40)) == 120
    result = execute(cfg, tmp_path / "named")  # no run_name given: the label
    run = MlflowClient(store).get_run(result.run_id)
    assert run.info.run_name == run_label(cfg)
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "testing"}
    assert {d.name for d in inputs.values()} == {"synthetic"}
    profile = json.loads(inputs["testing"].profile)
    assert profile["images"] == int(run.data.params["data.test_normal"]) + int(run.data.params["data.test_anomalous"])
    assert profile["anomalous"] == int(run.data.params["data.test_anomalous"])


def test_lr_is_logged_for_the_epoch_it_trained(tmp_path, store):
    result = run_synthetic(tmp_path, store, "trainer.max_epochs=3", "optim.lr=0.002", "tracking.figures=none")
    lrs = {m.step: m.value for m in MlflowClient(store).get_metric_history(result.run_id, "train/lr")}
    # cosine annealing over T = 3 epochs down to eta_min = lr * optim.min_lr_ratio, stepped once after
    # each epoch: epoch e trains at eta_min + (lr - eta_min) (1 + cos(pi (e - 1) / T)) / 2
    eta_min = 0.002 * compose_cfg([]).optim.min_lr_ratio
    expected = [eta_min + (0.002 - eta_min) * (1 + math.cos(math.pi * (e - 1) / 3)) / 2 for e in (1, 2, 3)]
    assert [lrs[e] for e in (1, 2, 3)] == pytest.approx(expected)


@needs_fmnist
def test_a_validation_split_without_anomalies_fails_before_a_run_opens(tmp_path, store):
    from freqexp.errors import FreqexpError

    # 6000 normals x 0.0002 = 1 held-out normal, x 0.5 = 0 anomalies
    cfg = compose_cfg([*FAST, f"tracking.uri={store}", "dataset.val_fraction=0.0002", "dataset.val_anomaly_ratio=0.5",
                       "dataset.limit_train=100", "dataset.limit_test=100"])
    with pytest.raises(FreqexpError, match="dataset.val_fraction"):
        execute(cfg, tmp_path / "one-class-val")
    assert not (tmp_path / "mlflow.db").exists() or len(read_runs(store)) == 0


@pytest.mark.parametrize("store_too", [False, True], ids=["run", "run-and-its-store-process"])
def test_sigterm_ends_the_run_killed_not_running(tmp_path, store_too):
    """Also when a scheduler (SLURM's scancel, systemd) signals every process of the job: the run's
    and its store process (freqexp.store_process), which leaves the signal to the run."""
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    db = tmp_path / "k.db"
    proc = subprocess.Popen([sys.executable, "-m", "freqexp", "dataset=synthetic", "dataset.n_train=4000", "trainer.batch_size=16",
                             "trainer.max_epochs=1000", "trainer.progress_bar=false", f"tracking.uri=sqlite:///{db}"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def statuses():
        try:
            with sqlite3.connect(db) as con:
                return [row[0] for row in con.execute("select status from runs")]
        except sqlite3.Error:  # not created yet
            return []

    try:
        deadline = time.time() + 180
        while time.time() < deadline and statuses() != ["RUNNING"]:
            time.sleep(0.5)
        assert statuses() == ["RUNNING"], "the run never started"
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            children = [int(pid) for pid in f.read().split()]
        assert len(children) == 1, "the run and one store process"
        time.sleep(3)  # inside training
        proc.send_signal(signal.SIGTERM)
        if store_too:
            os.kill(children[0], signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert statuses() == ["KILLED"]


def test_same_seed_same_result_and_other_seed_differs(tmp_path, store):
    a = run_synthetic(tmp_path, store, "seed=3", name="a").metrics
    b = run_synthetic(tmp_path, store, "seed=3", name="b").metrics
    c = run_synthetic(tmp_path, store, "seed=4", name="c").metrics
    assert a["val/auroc"] == b["val/auroc"] and a["test/auroc"] == b["test/auroc"]
    assert (a["val/auroc"], a["test/auroc"]) != (c["val/auroc"], c["test/auroc"])


@pytest.mark.parametrize("model", ["ae", "cvae"])
def test_other_models_and_noise_augment_train(tmp_path, store, model):
    result = run_synthetic(tmp_path, store, f"model={model}", "augment=noise", "trainer.max_epochs=2")
    run = MlflowClient(store).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    if model == "cvae":  # the model's own KL term is logged beside the configured terms
        assert "train/loss_kl" in run.data.metrics


def test_nan_loss_ends_the_run_failed_with_the_error(tmp_path, store):
    with pytest.raises(TrainingError, match="loss became nan"):
        run_synthetic(tmp_path, store, "model.name=tests.nan_model:NaNCAE")
    runs = read_runs(store)
    assert list(runs["status"]) == ["FAILED"]
    assert "loss became nan" in runs["tags.error"].iloc[0]


@needs_fmnist
def test_real_fmnist_subset_run(tmp_path, store):
    cfg = compose_cfg([*FAST, f"tracking.uri={store}", "dataset.limit_train=1000", "dataset.limit_test=1000",
                       "dataset.normal_class=1", "trainer.batch_size=64", "trainer.max_epochs=2"])
    result = execute(cfg, tmp_path / "fm")
    m = result.metrics
    run = MlflowClient(store).get_run(result.run_id)
    assert run.data.params["data.train_normal"] == "1000"
    assert run.data.params["data.test_normal"] == "100" and run.data.params["data.test_anomalous"] == "900"
    assert run.data.params["data.val_normal"] == "600" and run.data.params["data.val_anomalous"] == "600"
    # trousers (class 1) are easy to tell apart even after two short epochs (0.98 seen)
    assert m["test/auroc"] > 0.85 and m["val/auroc"] > 0.85
    assert "test/pixel_auroc" not in m  # FMNIST has no pixel masks


def test_multirun_isolates_a_failing_job(tmp_path):
    """3 jobs, the middle one raises (NaN loss): the others finish, the failed one is FAILED
    with its error, all share a sweep id and are named by their overrides."""
    db = tmp_path / "sweep.db"
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = cli(["--multirun", "dataset=synthetic", "trainer.max_epochs=1", "trainer.progress_bar=false",
             "model.name=cae,tests.nan_model:NaNCAE,cvae", "tracking.figures_best=1", f"tracking.uri=sqlite:///{db}"],
            cwd=tmp_path, env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = read_runs(f"sqlite:///{db}")
    by_name = {row["tags.mlflow.runName"]: row for _, row in runs.iterrows()}
    assert len(by_name) == 3
    statuses = {name: row["status"] for name, row in by_name.items()}
    failed = [n for n, s in statuses.items() if s == "FAILED"]
    assert sorted(statuses.values()) == ["FAILED", "FINISHED", "FINISHED"]
    assert len(failed) == 1 and "NaNCAE" in failed[0]
    assert "loss became nan" in by_name[failed[0]]["tags.error"]
    assert all(" · synthetic · s0" in n for n in by_name)  # named by what ran: model first, then loss, filter, data, seed
    assert runs["tags.sweep_id"].nunique() == 1 and runs["experiment_id"].nunique() == 1
    out = r.stdout + r.stderr
    assert "2 finished, 1 failed" in out and "FAILED  dataset=synthetic,model.name=tests.nan_model" in out
    summary = json.loads(next(tmp_path.glob("outputs/multiruns/*/*/sweep_summary.json")).read_text())
    assert sorted(j["status"] for j in summary) == ["failed", "finished", "finished"]
    # each finished job's test AUROC is reported beside its objective (and never ordered by)
    assert all(0 <= j["test_auroc"] <= 1 for j in summary if j["status"] == "finished")
    assert sum(f"test/auroc {j['test_auroc']:.4f}" in out for j in summary if j["status"] == "finished") == 2
    # figures (tracking.figures=auto is best in a sweep, figures_best=1): every finished run saved
    # figures.npz, the best by val/auroc got its figures drawn and logged, the other draws on demand
    finished = sorted((j for j in summary if j["status"] == "finished"), key=lambda j: -j["objective"])
    client = MlflowClient(f"sqlite:///{db}")
    pngs = {"reconstructions.png", "roc.png", "pr.png", "score_hist.png", "anomaly_overlays.png"}
    best, other = (tmp_path / j["job_dir"] for j in finished)
    assert (best / "figures.npz").exists() and (other / "figures.npz").exists()
    assert pngs <= {p.name for p in best.iterdir()} and not pngs & {p.name for p in other.iterdir()}
    assert pngs | {"figures.npz"} <= {a.path for a in client.list_artifacts(finished[0]["run_id"])}
    assert not pngs & {a.path for a in client.list_artifacts(finished[1]["run_id"])}
    assert "figures: drawn for the best 1 of 2 run(s)" in out
    from freqexp.multirun.figures import main as figures_main

    assert figures_main([str(other)]) == 0  # its store from the run's own config.yaml
    assert pngs <= {a.path for a in client.list_artifacts(finished[1]["run_id"])}


def test_sweep_with_an_invalid_job_runs_the_rest(tmp_path):
    db = tmp_path / "s.db"
    r = cli(["--multirun", "dataset=synthetic", "trainer.max_epochs=1", "trainer.progress_bar=false",
             "loss=mse,mse+nosuchterm", f"tracking.uri=sqlite:///{db}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = read_runs(f"sqlite:///{db}")
    assert list(runs["status"]) == ["FINISHED"]  # the invalid job never opened a run
    assert "FAILED  dataset=synthetic,loss=mse+nosuchterm" in r.stdout
    assert "unknown loss term 'nosuchterm'" in r.stdout


def test_a_sweep_where_every_job_fails_exits_nonzero(tmp_path):
    r = cli(["--multirun", "dataset=synthetic", "loss=foo,bar", f"tracking.uri=sqlite:///{tmp_path / 'x.db'}"], cwd=tmp_path, timeout=300)
    assert r.returncode == 1
    assert "0 finished, 2 failed" in r.stdout


def test_cli_from_another_directory_and_console_script(tmp_path):
    """`python -m freqexp` and `freqexp` work outside the repo; outputs land where they run."""
    r = cli(["dataset=synthetic", "filter=fair", *FAST], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    mlflow_exe = str(Path(sys.executable).parent / "mlflow")  # by absolute path: works outside the venv
    assert "test  AUROC" in r.stdout and f"open UI  {mlflow_exe} server --backend-store-uri sqlite:///" in r.stdout
    assert "/#/experiments/1/runs?workflowType=machine_learning" in r.stdout  # lands on the runs table
    assert (tmp_path / "outputs" / "mlflow.db").exists()
    run = read_runs(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}").iloc[0]  # the presets chosen, beside their keys
    assert (run["params.choice.filter"], run["params.choice.model"], run["params.filter.name"]) == ("fair", "cae", "fft")
    assert run["params.resolved.score"] == "mean of the anomaly map"
    assert len(list(tmp_path.glob("outputs/runs/*/*/metrics.json"))) == 1
    script = shutil.which("freqexp") or os.path.join(os.path.dirname(os.sys.executable), "freqexp")
    import subprocess

    other = tmp_path / "elsewhere"
    other.mkdir()
    r2 = subprocess.run([script, "--cfg", "job", "model=cvae", "loss=mse+ssim"], cwd=other, capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0, r2.stderr
    assert "name: cvae" in r2.stdout and "spec: mse+ssim" in r2.stdout


def test_wheel_install_finds_packaged_config(tmp_path):
    """A non-editable install (a wheel) carries conf/ inside the package."""
    import subprocess
    import sys
    import zipfile

    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
                           check=True, capture_output=True, text=True)
    assert "Warning" not in built.stdout + built.stderr  # no setuptools "package would be ignored" pages
    wheel = next(tmp_path.glob("freqexp-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n for n in names if n.endswith(".yaml")}
    assert len(shipped) == len(list((REPO / "conf").rglob("*.yaml"))) + len(list((REPO / "sweeps").glob("*.yaml")))
    for f in ["freqexp/conf/config.yaml", "freqexp/conf/model/cae.yaml", "freqexp/conf/hydra/help/freqexp.yaml",
              "freqexp/conf/analyze.yaml", "freqexp/conf/analysis/band_energy.yaml", "freqexp/sweeps/optuna.yaml",
              "freqexp/analysis/spectra.py", "freqexp/data/fashion_mnist.py"]:
        assert f in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-c", "import freqexp; print(freqexp.__file__)"], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert str(site) in r.stdout
    r = subprocess.run([sys.executable, "-m", "freqexp", "--cfg", "job", "loss=l1+tv"], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "spec: l1+tv" in r.stdout, r.stderr


def test_grid_preset_composes_its_search_space():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="freqexp.conf", version_base="1.3"):
        full = compose(config_name="config", overrides=["+sweep=loss_model_grid"], return_hydra_config=True)
    params = full.hydra.sweeper.params
    assert params.model == "ae,cae,cvae" and "mse+ssim" in params.loss.split(",")
    assert full.trainer.max_epochs == 10


def test_optuna_preset_runs_trials_and_resumes_its_study(tmp_path):
    import optuna

    args = ["--multirun", "+sweep=optuna", "dataset=synthetic", "trainer.max_epochs=1", "trainer.progress_bar=false",
            "hydra.sweeper.n_trials=2", "tracking.figures=none", f"tracking.uri=sqlite:///{tmp_path / 'o.db'}"]
    for expected in (2, 4):  # the second invocation continues the same study
        r = cli(args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        study = optuna.load_study(study_name="freqexp_cae_synthetic", storage=f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}")
        states = [t.state.name for t in study.trials]
        assert states == ["COMPLETE"] * expected
    runs = read_runs(f"sqlite:///{tmp_path / 'o.db'}")
    assert len(runs) == 4 and set(runs["status"]) == {"FINISHED"}
    best = max(t.value for t in study.trials)
    assert best == pytest.approx(runs["metrics.val/auroc"].max())  # the objective is val/auroc, not a test metric


def test_a_failed_optuna_trial_is_recorded_failed_and_the_study_goes_on(tmp_path):
    import optuna

    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = cli(["--multirun", "+sweep=optuna", "dataset=synthetic", "trainer.max_epochs=1", "trainer.progress_bar=false",
             "hydra.sweeper.n_trials=2", "model.name=tests.nan_model:NaNCAE", "hydra.sweeper.study_name=nan",
             f"tracking.uri=sqlite:///{tmp_path / 'o.db'}"], cwd=tmp_path, env_extra=env)
    study = optuna.load_study(study_name="nan", storage=f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    assert set(read_runs(f"sqlite:///{tmp_path / 'o.db'}")["status"]) == {"FAILED"}
    assert r.returncode != 0  # every trial failed


@pytest.mark.slow  # the default launcher's worker processes share a store in tests/test_search.py
def test_parallel_jobs_with_the_joblib_launcher_share_one_store(tmp_path):
    db = f"sqlite:///{tmp_path / 'p.db'}"
    r = cli(["--multirun", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "dataset=synthetic", "trainer.max_epochs=1",
             "trainer.progress_bar=false", "model=cae,ae", "loss=mse,mse+ssim", f"tracking.uri={db}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "4 finished, 0 failed" in r.stdout
    runs = read_runs(db)
    assert len(runs) == 4 and set(runs["status"]) == {"FINISHED"} and runs["tags.sweep_id"].nunique() == 1
    assert all(len(pd_params) > 30 for pd_params in [runs.filter(like="params.").iloc[i].dropna() for i in range(4)])


def test_resume_skips_finished_configs_and_summary_run_holds_the_leaderboard(tmp_path):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    args = ["--multirun", "dataset=synthetic", "trainer.max_epochs=1", "trainer.progress_bar=false", "model=cae,ae",
            "tracking.figures=none", f"tracking.uri={db}"]
    first = cli(args + ["sweep.summary_run=true"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    runs = read_runs(db)
    jobs = runs[runs["tags.kind"].isna()]
    assert len(jobs) == 2 and set(jobs["tags.config_hash"].str.len()) == {16}
    summary = runs[runs["tags.kind"] == "sweep_summary"]
    assert len(summary) == 1
    arts = {a.path for a in MlflowClient(db).list_artifacts(summary["run_id"].iloc[0])}
    assert {"leaderboard.csv", "leaderboard.md", "sweep_summary.json"} <= arts

    again = cli(args, cwd=tmp_path)  # same sweep: nothing new runs
    assert again.returncode == 0
    assert "0 finished, 0 failed, 2 skipped" in again.stdout
    assert len(read_runs(db)) == 3

    forced = cli(args + ["sweep.resume=false"], cwd=tmp_path)
    assert forced.returncode == 0 and "2 finished, 0 failed, 0 skipped" in forced.stdout
    assert len(read_runs(db)) == 5


def test_multi_objective_preset_returns_both_objectives(tmp_path):
    import optuna

    r = cli(["--multirun", "+sweep=optuna_multi", "dataset=synthetic", "trainer.max_epochs=1", "trainer.progress_bar=false",
             "hydra.sweeper.n_trials=2", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    study = optuna.load_study(study_name="freqexp_multi_synthetic", storage=f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}")
    runs = read_runs(f"sqlite:///{tmp_path / 'm.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for t in study.trials:
        auroc, speed = t.values
        assert 0 <= auroc <= 1 and speed > 10  # images/s
        assert auroc in set(runs["metrics.val/auroc"])


def test_an_unreachable_study_database_stops_the_sweep_in_one_line(tmp_path):
    r = cli(["--multirun", "+sweep=optuna", "dataset=synthetic", "hydra.sweeper.storage=postgresql://u@127.0.0.1:1/x",
             f"tracking.uri=sqlite:///{tmp_path / 'x.db'}"], cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("freqexp: error: hydra.sweeper.storage: cannot reach postgresql server at 127.0.0.1:1")


def test_a_test_metric_objective_stops_the_sweep_before_any_job(tmp_path):
    r = cli(["--multirun", "dataset=synthetic", "model=ae,cae", "sweep.objective=test/auroc",
             f"tracking.uri=sqlite:///{tmp_path / 'x.db'}"], cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "freqexp: error: sweep.objective: test/auroc is a test metric" in r.stderr
    assert not list(tmp_path.glob("outputs/multiruns/*/*/0/job_status.json"))


@pytest.mark.slow  # an alternative launcher; the Slurm preset's composition is checked below
def test_submitit_local_launcher_runs_each_job_in_its_own_process(tmp_path):
    db = f"sqlite:///{tmp_path / 's.db'}"
    r = cli(["--multirun", "hydra/launcher=local", "dataset=synthetic", "trainer.max_epochs=1", "trainer.progress_bar=false",
             "model=cae,ae", f"tracking.uri={db}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 finished, 0 failed" in r.stdout
    runs = read_runs(db)
    assert len(runs) == 2 and set(runs["status"]) == {"FINISHED"}
    assert list(tmp_path.glob("outputs/multiruns/*/*/.submitit/*"))  # submitit's own job folders


def test_slurm_launcher_preset_composes_with_cluster_settings():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="freqexp.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.array_parallelism, launcher.timeout_min) == ("gpu", 1, 16, 120)


def test_output_that_is_not_a_terminal_gets_one_plain_line_per_epoch(tmp_path, store, capsys):
    """nohup and SLURM logs: no progress-bar redraws (\\r, escape codes), one line an epoch."""
    run_synthetic(tmp_path, store, "trainer.max_epochs=3", "trainer.progress_bar=true")
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("train/loss" in line and "val/auroc" in line for line in lines)
    assert "\r" not in out.out + out.err and "\x1b[" not in out.out + out.err


def test_a_single_run_reports_the_seconds_its_process_ran_before_the_run(tmp_path):
    import time

    store = f"sqlite:///{tmp_path / 'b.db'}"
    t0 = time.time()
    proc = cli(["dataset=synthetic", *FAST, f"tracking.uri={store}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("  time "))
    printed = float(re.search(r"; ([\d.]+) s before the run", line)[1])
    timing = json.loads(next(tmp_path.glob("outputs/runs/*/*/timing.json")).read_text())
    run_start, main = timing["marks"]["run_start"], timing["marks"]["main"]
    (before,) = read_runs(store)["metrics.sys/seconds_before_run"]
    assert printed == pytest.approx(before, abs=0.051)
    # the process started after this test launched it and before its entry point was reached
    assert run_start - main - 0.011 <= before <= run_start - t0 + 0.011


def test_a_run_outside_the_command_line_logs_no_seconds_before_it(tmp_path, store):
    result = run_synthetic(tmp_path, store)  # a test's process, like a sweep's worker, is older than any one run
    assert "sys/seconds_before_run" not in MlflowClient(store).get_run(result.run_id).data.metrics
    assert result.info["before_run"] is None
