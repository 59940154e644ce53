"""The analysis app: each analysis on synthetic data or a quick trained run, tables that mean
what they say, results in MLflow, bad input as one line."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module
from mlflow.tracking import MlflowClient

from freqexp.analyze import run_analysis
from freqexp.errors import ConfigError
from freqexp.freq.bands import BAND_NAMES, band_shares
from freqexp.run import execute
from tests.conftest import FAST, cli, compose_cfg, read_runs


def analyze_cfg(*overrides):
    with initialize_config_module(config_module="freqexp.conf", version_base="1.3"):
        return compose(config_name="analyze", overrides=["dataset=synthetic", *overrides])


def test_band_energy_table_matches_direct_computation(tmp_path, store):
    cfg = analyze_cfg("analysis=band_energy", f"tracking.uri={store}", "analysis.max_images=1000")
    out = run_analysis(cfg, tmp_path)
    table = out["tables"]["band_energy"]
    assert list(table.columns) == list(BAND_NAMES)
    assert table.loc["normal"].sum() == pytest.approx(100, abs=0.01)
    # independent: recompute the normal row from the test split
    from freqexp.data import build_dataset

    test = build_dataset(cfg.dataset).test
    direct = band_shares(test.images[test.labels == 0].float() / 255).mean(0)
    assert table.loc["normal"].tolist() == pytest.approx(direct.tolist(), abs=1e-3)
    diff = table.loc["anomalous - normal (pp)"]
    assert diff.tolist() == pytest.approx((table.loc["anomalous"] - table.loc["normal"]).tolist(), abs=2e-3)
    run = MlflowClient(store).get_run(out["run_id"])
    assert run.data.tags["kind"] == "analysis" and run.info.status == "FINISHED"
    arts = {a.path for a in MlflowClient(store).list_artifacts(out["run_id"])}
    assert {"band_energy.csv", "band_energy.png", "summary.txt"} <= arts
    assert pd.read_csv(tmp_path / "band_energy.csv", index_col=0).shape == (3, 5)


def test_cutpaste_spectrum_and_filter_effect(tmp_path, store):
    out = run_analysis(analyze_cfg("analysis=cutpaste_spectrum", f"tracking.uri={store}", "analysis.n_images=64"), tmp_path / "a")
    diff = out["tables"]["cutpaste_difference"]
    assert set(diff.index) == {"cutpaste", "scaled_cutpaste", "freq_patch_filter", "freq_image_filter", "freq_dual_path", "freq_weighted"}
    assert diff.sum(axis=1).tolist() == pytest.approx([100.0] * 6, abs=0.01)
    change = out["tables"]["cutpaste_change_pp"]
    assert change.sum(axis=1).abs().max() < 0.01  # shares move between bands, total stays 100 %
    out = run_analysis(analyze_cfg("analysis=filter_effect", f"tracking.uri={store}", "analysis.n_images=64"), tmp_path / "b")
    t = out["tables"]["filter_effect"]
    assert list(t.index) == ["no_filter", "bhpf_c0.1", "bhpf_c0.2", "bhpf_c0.3", "ghpf_c0.2", "ihpf_c0.2"]
    assert (t.loc["bhpf_c0.2"] - t.loc["no_filter"]).abs().max() > 0.5  # the filter changed the patch's spectrum


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    store = f"sqlite:///{d / 'm.db'}"
    cfg = compose_cfg(["dataset=synthetic", *FAST, "trainer.max_epochs=2", f"tracking.uri={store}", "tracking.figures=none"])
    return store, execute(cfg, d / "run")


def test_residual_spectrum_states_the_fair_verdict_with_numbers(tmp_path, trained_run):
    store, result = trained_run
    out = run_analysis(analyze_cfg("analysis=residual_spectrum", f"analysis.run_id={result.run_id}", f"tracking.uri={store}"), tmp_path)
    t = out["tables"]["residual_spectrum"]
    assert t.loc["normal"].sum() == pytest.approx(100, abs=0.01) and t.loc["anomalous"].sum() == pytest.approx(100, abs=0.01)
    hf_n = t.loc["normal", "high"] + t.loc["normal", "very_high"]
    import re

    stated = re.search(r"residual is ([0-9.]+) % for normal vs ([0-9.]+) % for anomalous", out["summary"])
    assert "FAIR hypothesis" in out["summary"] and stated
    assert float(stated.group(1)) == pytest.approx(hf_n, abs=0.06)
    hf_a = t.loc["anomalous", "high"] + t.loc["anomalous", "very_high"]
    assert float(stated.group(2)) == pytest.approx(hf_a, abs=0.06)
    assert ("not biased" in out["summary"] or "are not" in out["summary"]) == (hf_n <= hf_a)


def test_robustness_curve_zero_perturbation_reproduces_the_run(tmp_path, trained_run):
    store, result = trained_run
    out = run_analysis(analyze_cfg("analysis=robustness", f"analysis.run_id={result.run_id}", f"tracking.uri={store}",
                                   "analysis.noise_std=[0.0,0.3]", "analysis.brightness=[0.0]", "analysis.contrast=[1.0]"), tmp_path)
    t = out["tables"]["robustness"]
    clean = t[(t.perturbation == "noise_std") & (t.value == 0.0)].iloc[0]
    assert clean.test_auroc == pytest.approx(result.metrics["test/auroc"], abs=1e-4)  # same images, same model
    assert (t[t.value.isin([0.0, 1.0])].test_auroc.nunique()) == 1  # identity perturbations agree
    assert (tmp_path / "robustness.png").exists()


def test_bad_input_is_one_line_and_opens_no_run(tmp_path):
    db = tmp_path / "x.db"
    r = cli_analyze(["analysis=residual_spectrum", f"tracking.uri=sqlite:///{db}"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("freqexp.analyze: error: analysis.run_id:")
    assert not db.exists() or len(read_runs(f"sqlite:///{db}")) == 0
    with pytest.raises(ConfigError, match="analysis.band_edges"):
        run_analysis(analyze_cfg("analysis=band_energy", "analysis.band_edges=[0.3,0.1,0.5,0.6]", f"tracking.uri=sqlite:///{db}"), tmp_path)


def cli_analyze(args, cwd):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "freqexp.analyze", "dataset=synthetic", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env={**os.environ})
