"""The leaderboard: grouping by swept keys, mean/std/n over seeds, ranking by val/auroc only,
filters, files written."""
from __future__ import annotations

import functools
import itertools

import pandas as pd
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from freqexp.report import main as report_main


def make_store(uri):
    """12 runs: 2 models x 2 losses x 3 seeds, plus a FAILED run and an analysis run to be ignored.
    val/auroc is chosen so that (cae, mse+ssim) ranks first on val but last on test."""
    client = MlflowClient(uri)
    exp = client.create_experiment("grid")
    val = {("cae", "mse+ssim"): 0.9, ("cae", "mse"): 0.8, ("ae", "mse+ssim"): 0.7, ("ae", "mse"): 0.6}
    test = {("cae", "mse+ssim"): 0.5, ("cae", "mse"): 0.6, ("ae", "mse+ssim"): 0.7, ("ae", "mse"): 0.8}
    for (model, loss), seed in itertools.product(val, range(3)):
        run = client.create_run(exp, tags={"sweep_id": "s1"})
        params = {"model.name": model, "loss.spec": loss, "seed": str(seed), "loss.weights.mse": "1.0",
                  "trainer.max_epochs": "5", "data.train_normal": "100"}
        if "ssim" in loss:
            params["loss.weights.ssim"] = "1.0"
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                         metrics=[Metric("val/auroc", val[(model, loss)] + 0.01 * seed, 0, 0),
                                  Metric("test/auroc", test[(model, loss)], 0, 0)])
        client.set_terminated(run.info.run_id, "FINISHED")
    failed = client.create_run(exp, tags={"sweep_id": "s1"})
    client.log_batch(failed.info.run_id, params=[Param("model.name", "vae")], metrics=[Metric("val/auroc", 0.99, 0, 0)])
    client.set_terminated(failed.info.run_id, "FAILED")
    other = client.create_run(exp, tags={"sweep_id": "s1", "kind": "analysis"})
    client.log_batch(other.info.run_id, params=[Param("model.name", "zzz")], metrics=[Metric("val/auroc", 0.99, 0, 0)])
    client.set_terminated(other.info.run_id, "FINISHED")
    return uri


def test_leaderboard_groups_over_seeds_and_ranks_by_validation(tmp_path, capsys):
    uri = make_store(f"sqlite:///{tmp_path / 'r.db'}")
    assert report_main(["--uri", uri, "--out", str(tmp_path / "rep")]) == 0
    board = pd.read_csv(tmp_path / "rep" / "leaderboard.csv")
    assert list(board["model.name"]) == ["cae", "cae", "ae", "ae"]  # by val/auroc, not test
    assert list(board["loss.spec"]) == ["mse+ssim", "mse", "mse+ssim", "mse"]
    assert set(board.columns) >= {"model.name", "loss.spec", "n", "val/auroc mean", "val/auroc std", "test/auroc mean"}
    assert "loss.weights.ssim" not in board.columns and "seed" not in board.columns  # follow loss.spec / averaged over
    assert list(board["n"]) == [3, 3, 3, 3]
    assert board["val/auroc mean"].iloc[0] == pytest.approx(0.91)
    assert board["val/auroc std"].iloc[0] == pytest.approx(0.01)
    md = (tmp_path / "rep" / "leaderboard.md").read_text()
    assert "| 1 | cae | mse+ssim | 3 | 0.9100 ± 0.0100 |" in md
    # the 95 % interval follows each metric: 0.91 ± t(0.975, 2) 0.01 / sqrt(3), t = 4.3027
    assert "| 1 | cae | mse+ssim | 3 | 0.9100 ± 0.0100 | [0.8852, 0.9348] |" in md
    assert board["val/auroc ci_low"].iloc[0] == pytest.approx(0.91 - 4.3027 * 0.01 / 3 ** 0.5, abs=1e-5)
    assert board["dup_seeds"].isna().all()  # no seed ran twice
    assert (tmp_path / "rep" / "heatmap_model_loss.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "12 finished runs in 4 configurations" in out and "model.name=cae, loss.spec=mse+ssim" in out


def test_filters_by_param_and_sweep_id(tmp_path):
    uri = make_store(f"sqlite:///{tmp_path / 'r.db'}")
    assert report_main(["--uri", uri, "--out", str(tmp_path / "a"), "model.name=ae"]) == 0
    board = pd.read_csv(tmp_path / "a" / "leaderboard.csv")
    assert list(board["loss.spec"]) == ["mse+ssim", "mse"] and "model.name" not in board.columns
    assert report_main(["--uri", uri, "--out", str(tmp_path / "b"), "--sweep-id", "nope"]) == 1


def test_group_choices_stand_for_the_options_they_set():
    """filter=fair and filter=bhpf are both filter.name=fft: the logged choice tells them apart
    and the keys that follow it (name, cutoff) add no column."""
    import pandas as pd

    from freqexp.report import swept_keys

    df = pd.DataFrame({
        "params.choice.filter": ["none", "fair", "bhpf", "fair"],
        "params.filter.name": ["none", "fft", "fft", "fft"],
        "params.filter.cutoff": [None, "0.234375", "0.2", "0.234375"],
        "params.filter.apply_to": ["input", "input", "input", "score"],
    })
    assert swept_keys(df) == ["choice.filter", "filter.apply_to"]


def test_report_takes_tracking_uri_like_a_run_says_what_it_read_and_never_creates_a_store(tmp_path, capsys, monkeypatch):
    uri = make_store(f"sqlite:///{tmp_path / 'r.db'}")
    assert report_main([f"tracking.uri={uri}", "tracking.experiment=grid", "--out", str(tmp_path / "a"), "model.name=ae"]) == 0
    out = capsys.readouterr().out
    assert f"read 6 run(s) from {uri}, experiment 'grid'" in out
    board = pd.read_csv(tmp_path / "a" / "leaderboard.csv")
    assert list(board["loss.spec"]) == ["mse+ssim", "mse"]  # tracking.* were not taken as filters
    # a store that is not there: one line naming the key, exit 2, and no file left behind
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nowhere" / "typo.db"
    assert report_main([f"tracking.uri=sqlite:///{missing}", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tracking.uri" in err[0] and str(missing) in err[0]
    assert not missing.exists() and not missing.parent.exists()
    assert report_main(["--out", str(tmp_path / "c")]) == 2  # the default store, relative to here, is absent
    assert not (tmp_path / "outputs").exists()
    # an experiment that is not there: a did-you-mean, exit 2
    assert report_main(["--uri", uri, "--experiment", "gird", "--out", str(tmp_path / "d")]) == 2
    assert "did you mean grid" in capsys.readouterr().err


# -- what defines a configuration: run-control keys never split a row (issue 20) ---------------

@functools.lru_cache(maxsize=None)
def composed_params(overrides: tuple) -> dict:
    from omegaconf import OmegaConf

    from freqexp.tracking import flatten
    from tests.conftest import compose_cfg

    return flatten(OmegaConf.to_container(compose_cfg(list(overrides)), resolve=True))


def realistic_params(model: str, seed: int, *overrides: str) -> dict:
    """The params a run of `python -m freqexp dataset=synthetic model=<model> seed=<seed>` logs:
    the flattened composed config plus what freqexp.run.execute adds (choices, resolved, data)."""
    params = dict(composed_params(("dataset=synthetic", f"model={model}", f"seed={seed}", *overrides)))
    params.update({f"choice.{g}": v for g, v in {"model": model, "loss": "mse+ssim", "filter": "none", "augment": "none",
                                                  "dataset": "synthetic", "optim": "default", "hardware": "auto"}.items()})
    params.update({"resolved.score": "mean of the anomaly map", "resolved.accelerator": "cpu", "resolved.precision": "32-true",
                   "resolved.cpu_threads": "2", "model.n_params": {"ae": "1190176", "cae": "575585"}[model],
                   "data.train_normal": "216", "data.val_normal": "24", "data.val_anomalous": "24"})
    return params


def log_run(client, exp, params: dict, val: float, sweep_id: str) -> None:
    run = client.create_run(exp, tags={"sweep_id": sweep_id})
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    client.log_batch(run.info.run_id, metrics=[Metric("val/auroc", val, 0, 0), Metric("test/auroc", val - 0.05, 0, 0)])
    client.set_terminated(run.info.run_id, "FINISHED")


def test_run_control_keys_never_split_a_configuration(tmp_path, capsys):
    """A grid (model=ae,cae seed=0,1) run twice, the second time with sweep.resume=false and every
    run-control key changed (another store path, figures, progress bar, GPU placement, precision,
    thread count, data location, image cache): two rows of two seeds, each seed counted once and
    flagged. Before, sweep.resume alone split it into four rows."""
    from freqexp.tracking import is_run_control

    # the keys the issue names are run control (a typo in RUN_CONTROL would make this test vacuous)
    named = ["sweep.resume", "sweep.workers", "tracking.uri", "tracking.experiment", "tracking.figures", "tracking.figures_best",
             "trainer.progress_bar", "hardware.device_index", "hardware.precision", "hardware.accelerator", "choice.hardware",
             "resolved.cpu_threads", "resolved.accelerator", "resolved.precision", "data.root", "dataset.cache_dir",
             "trainer.steps_per_call", "resolved.steps_per_call"]
    assert all(is_run_control(k) for k in named)
    assert not any(is_run_control(k) for k in ("seed", "model.name", "trainer.max_epochs", "dataset.root", "datasets.x", "trackings"))

    uri = f"sqlite:///{tmp_path / 'r.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("grid")
    val = {"ae": 0.78, "cae": 0.76}
    for model, seed in itertools.product(("ae", "cae"), (0, 1)):
        log_run(client, exp, realistic_params(model, seed, "tracking.uri=sqlite:///outputs/mlflow.db"), val[model] + 0.01 * seed, "first")
    for model, seed in itertools.product(("ae", "cae"), (0, 1)):
        rerun = realistic_params(model, seed, "sweep.resume=false", "tracking.figures=best", "trainer.progress_bar=false",
                                 "hardware=gpu", "hardware.device_index=1", "tracking.uri=sqlite:////elsewhere/mlflow.db",
                                 "dataset.cache_dir=/scratch/cache", "sweep.workers=4")
        changed = sorted(k for k in rerun if is_run_control(k) and rerun[k] != realistic_params(model, seed)[k])
        rerun.update({"choice.hardware": "gpu", "resolved.accelerator": "gpu", "resolved.precision": "16-mixed",
                      "data.root": "/scratch/synthetic"})
        if seed == 1:
            del rerun["resolved.cpu_threads"]  # a run logged before the param existed
        else:
            rerun["resolved.cpu_threads"] = "16"
        log_run(client, exp, rerun, val[model] + 0.01 * seed + 0.002, "second")
    assert len(changed) >= 8  # the rerun really differs in run-control params

    assert report_main(["--uri", uri, "--out", str(tmp_path / "rep")]) == 0
    captured = capsys.readouterr()
    board = pd.read_csv(tmp_path / "rep" / "leaderboard.csv", dtype={"dup_seeds": str})
    assert list(board["choice.model"]) == ["ae", "cae"]
    assert [c for c in board.columns if not c.startswith(("val/", "test/"))] == ["choice.model", "n", "dup_seeds"]
    assert list(board["n"]) == [2, 2]  # each seed once
    assert list(board["dup_seeds"]) == ["0,1", "0,1"]  # the repeated seeds are still flagged
    assert board["val/auroc mean"].iloc[0] == pytest.approx(0.787)  # the latest run of each seed: (0.782 + 0.792) / 2
    assert "8 finished runs in 2 configurations (swept: choice.model)" in captured.out
    assert captured.err.count("has 2 finished runs; counted once") == 4
    assert "different hardware" not in captured.err  # what is counted (the latest run of each seed) all ran on the GPU


def test_keys_that_define_the_experiment_still_split(tmp_path, capsys):
    """Controls: the budget (trainer.max_epochs) is the experiment and splits; a rerun with other
    run-control keys does not; seeds of one configuration made on different hardware are counted
    together, and the report says so in one note."""
    uri = f"sqlite:///{tmp_path / 'r.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("grid")
    for seed in (0, 1):
        log_run(client, exp, realistic_params("ae", seed), 0.7, "a")
        log_run(client, exp, realistic_params("ae", seed, "trainer.max_epochs=2"), 0.8, "a")
        log_run(client, exp, realistic_params("ae", seed, "hardware=cpu", "tracking.figures=none"), 0.7, "b")
    on_gpu = realistic_params("ae", 2, "trainer.max_epochs=2", "hardware=gpu")
    on_gpu.update({"choice.hardware": "gpu", "resolved.accelerator": "gpu", "resolved.precision": "16-mixed"})
    log_run(client, exp, on_gpu, 0.8, "c")
    assert report_main(["--uri", uri, "--out", str(tmp_path / "rep")]) == 0
    board = pd.read_csv(tmp_path / "rep" / "leaderboard.csv", dtype={"dup_seeds": str})
    assert list(board["trainer.max_epochs"]) == [2, 20] and list(board["n"]) == [3, 2]
    assert list(board["dup_seeds"].fillna("")) == ["", "0,1"]
    notes = [line for line in capsys.readouterr().err.splitlines() if "different hardware" in line]
    assert len(notes) == 1 and "1 configuration(s)" in notes[0] and "cpu 32-true, gpu 16-mixed" in notes[0], notes
    assert "resolved.precision=" in notes[0]
