"""The leaderboard: grouping by swept keys, mean/std/n over seeds, ranking by val/auroc only,
filters, files written."""
from __future__ import annotations

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
