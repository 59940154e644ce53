"""Honest aggregation and significance in the report: each seed counted once, 95 % intervals over
seeds, the per-class pivot (missing classes marked, best bold, LaTeX escaped), pruned and failed
runs left out, and the Wilcoxon / Friedman / Nemenyi results against published reference values."""
from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from freqexp.report import leaderboard, main as report_main, seed_table, to_markdown
from freqexp.stats import critical_difference, friedman_nemenyi, paired_wilcoxon, t_interval

# Student t quantiles t_{0.975, dof}, from a printed table
T_975 = {2: 4.3027, 4: 2.7764}

# test/auroc of each (model, class) averaged over seeds 0, 1, 2 (seed s adds (s - 1) * 0.01).
# ae has no finished run of class 2 (only pruned, failed and killed ones); class 1 is a tie.
CELLS = {("ae", 0): 0.70, ("ae", 1): 0.95,
         ("cae", 0): 0.80, ("cae", 1): 0.95, ("cae", 2): 0.85,
         ("patch_core", 0): 0.90, ("patch_core", 1): 0.85, ("patch_core", 2): 0.80}
PRUNED_FINISHED = 0.60  # ae, class 2, seed 0: FINISHED, tag pruned=true
PRUNED_KILLED = 0.61    # ae, class 2, seed 1: KILLED, tag pruned=true
EARLIER_RERUN = 0.50    # cae, class 0, seed 1: a first run of a seed that was run again later


def make_class_store(uri, models=("ae", "cae", "patch_core")):
    """Models x Fashion-MNIST classes x 3 seeds, plus: a repeated seed (cae, class 0, seed 1: the
    earlier run 0.50, the later one the regular value), pruned runs (one FINISHED, one KILLED), a
    FAILED run and a KILLED run without the pruned tag, the last three all for ae on class 2."""
    client = MlflowClient(uri)
    exp = client.create_experiment("classes")
    clock = iter(range(1_700_000_000_000, 1_800_000_000_000, 1000))

    def log(model, cls, seed, value, status="FINISHED", tags=None):
        run = client.create_run(exp, start_time=next(clock), tags={"sweep_id": "s", **(tags or {})})
        params = {"model.name": model, "dataset.name": "fashion_mnist", "dataset.normal_class": str(cls),
                  "seed": str(seed), "trainer.max_epochs": "5"}
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                         metrics=[Metric("test/auroc", value, 0, 0), Metric("val/auroc", value - 0.05, 0, 0)])
        client.set_terminated(run.info.run_id, status)

    log("cae", 0, 1, EARLIER_RERUN)
    for (model, cls), value in CELLS.items():
        if model in models:
            for seed in range(3):
                log(model, cls, seed, value + (seed - 1) * 0.01)
    if "ae" in models:
        log("ae", 2, 0, PRUNED_FINISHED, tags={"pruned": "true"})
        log("ae", 2, 1, PRUNED_KILLED, status="KILLED", tags={"pruned": "true"})
        log("ae", 2, 2, 0.99, status="FAILED")
        log("ae", 2, 2, 0.98, status="KILLED")
    return uri


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_class_store(f"sqlite:///{tmp_path_factory.mktemp('store') / 'r.db'}")


def md_table(text):
    """The first markdown table of text as a list of rows of cells."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in r.strip("|").split(" | ")] for r in rows if not r.startswith("|---")]


# --- confidence intervals ----------------------------------------------------------------------

@pytest.mark.parametrize("values", [[0.81, 0.84, 0.80], [0.70, 0.74, 0.69, 0.77, 0.72]])
def test_t_interval_against_hand_computation(values):
    n = len(values)
    mean, s = statistics.fmean(values), statistics.stdev(values)
    half = T_975[n - 1] * s / math.sqrt(n)
    lo, hi = t_interval(values)
    assert lo == pytest.approx(mean - half, abs=1e-5) and hi == pytest.approx(mean + half, abs=1e-5)


def test_one_seed_gives_no_interval_and_says_so():
    assert all(math.isnan(v) for v in t_interval([0.9]))
    df = pd.DataFrame({"params.model.name": ["ae", "cae", "cae"], "params.seed": ["0", "0", "1"],
                       "metrics.val/auroc": [0.9, 0.8, 0.7]})
    board = leaderboard(df, ["model.name"])
    one = board[board["model.name"] == "ae"].iloc[0]
    assert one["n"] == 1 and math.isnan(one["val/auroc ci_low"]) and math.isnan(one["val/auroc ci_high"])
    md = to_markdown(board, ["model.name"])
    assert "| ae | 1 | 0.9000 | none (n=1) |" in md
    two = board[board["model.name"] == "cae"].iloc[0]
    half = 12.7062 * statistics.stdev([0.8, 0.7]) / math.sqrt(2)  # t_{0.975, 1}
    assert two["val/auroc ci_low"] == pytest.approx(0.75 - half, abs=1e-4)


def test_repeated_seed_keeps_the_latest_run():
    df = pd.DataFrame({"params.model.name": ["ae"] * 4, "params.seed": ["0", "1", "1", "2"],
                       "start_time": pd.to_datetime([1, 2, 5, 3], unit="s", utc=True),
                       "metrics.val/auroc": [0.80, 0.10, 0.90, 1.00], "run_id": ["a", "old", "new", "c"]})
    runs, repeats = seed_table(df, ["model.name"])
    assert sorted(runs["_run"]) == ["a", "c", "new"]
    assert len(repeats) == 1 and repeats[0].seed == "1" and repeats[0].runs == 2 and repeats[0].kept_run == "new"
    board = leaderboard(df, ["model.name"])
    assert board["n"].iloc[0] == 3 and board["val/auroc mean"].iloc[0] == pytest.approx(0.9)
    assert board["dup_seeds"].iloc[0] == "1"


# --- the report on a store with classes ----------------------------------------------------------

def test_aggregation_counts_each_seed_once_and_leaves_out_failed_and_pruned(store, tmp_path, capsys):
    out = tmp_path / "rep"
    assert report_main(["--uri", store, "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed 1" in err[0] and "model.name=cae, dataset.normal_class=0" in err[0]

    board = pd.read_csv(out / "leaderboard.csv", dtype={"dataset.normal_class": str, "dup_seeds": str})
    row = board[(board["model.name"] == "cae") & (board["dataset.normal_class"] == "0")].iloc[0]
    assert row["n"] == 3 and row["dup_seeds"] == "1"
    assert row["test/auroc mean"] == pytest.approx(0.80)  # the later run of seed 1 (0.80), not 0.50
    assert board["dup_seeds"].isna().sum() == len(board) - 1
    # ae has no class-2 row: its pruned, failed and killed runs are all left out
    assert set(board[board["model.name"] == "ae"]["dataset.normal_class"]) == {"0", "1"}
    lo, hi = row["test/auroc ci_low"], row["test/auroc ci_high"]
    half = T_975[2] * statistics.stdev([0.79, 0.80, 0.81]) / math.sqrt(3)
    assert lo == pytest.approx(0.80 - half, abs=1e-4) and hi == pytest.approx(0.80 + half, abs=1e-4)
    assert "dup seeds" in (out / "leaderboard.md").read_text()


def test_pivot_marks_missing_classes_and_bolds_the_best(store, tmp_path):
    out = tmp_path / "rep"
    assert report_main(["--uri", store, "--out", str(out)]) == 0
    rows = md_table((out / "pivot.md").read_text())
    assert rows[0] == ["method (model.name)", "0", "1", "2", "mean"]
    body = {r[0]: r[1:] for r in rows[1:]}
    assert body["ae"] == ["0.7000", "**0.9500**", "", f"{(0.70 + 0.95) / 2:.4f} (2/3)"]   # missing class: marked
    assert body["cae"] == ["0.8000", "**0.9500**", "**0.8500**", f"**{(0.80 + 0.95 + 0.85) / 3:.4f}**"]  # tie: both bold
    assert body["patch_core"] == ["**0.9000**", "0.8500", "0.8000", f"{(0.90 + 0.85 + 0.80) / 3:.4f}"]

    tex = (out / "pivot.tex").read_text()
    table = tex[tex.index("\\begin{tabular}"):]
    assert "patch\\_core & \\textbf{0.9000} & 0.8500 & 0.8000" in table
    assert "patch_core" not in table.replace("patch\\_core", "")   # every underscore escaped
    assert "ae & 0.7000 & \\textbf{0.9500} &  & 0.8250 (2/3) \\\\" in table
    assert "\\toprule" in table and table.rstrip().endswith("\\end{tabular}")


def test_include_pruned_counts_pruned_runs_but_never_failed_ones(store, tmp_path):
    out = tmp_path / "rep"
    assert report_main(["--uri", store, "--out", str(out), "--include-pruned"]) == 0
    board = pd.read_csv(out / "leaderboard.csv", dtype={"dataset.normal_class": str})
    row = board[(board["model.name"] == "ae") & (board["dataset.normal_class"] == "2")].iloc[0]
    assert row["n"] == 2  # the FINISHED and the KILLED pruned run; the FAILED and unpruned KILLED ones stay out
    assert row["test/auroc mean"] == pytest.approx((PRUNED_FINISHED + PRUNED_KILLED) / 2)
    body = {r[0]: r[1:] for r in md_table((out / "pivot.md").read_text())[1:]}
    assert body["ae"][2] == f"{(PRUNED_FINISHED + PRUNED_KILLED) / 2:.4f}"
    assert "(" not in body["ae"][3]  # complete now: no (k/K) mark


def test_significance_of_three_methods_over_shared_cells(store, tmp_path):
    from scipy import stats

    out = tmp_path / "rep"
    assert report_main(["--uri", store, "--out", str(out), "--significance"]) == 0
    assert (out / "cd_diagram.png").stat().st_size > 1000
    sig = pd.read_csv(out / "significance.csv")
    # blocks: classes 0 and 1 x seeds 0-2 (ae has no class 2); values typed above
    blocks = [(c, s) for c in (0, 1) for s in range(3)]
    cols = [[CELLS[(m, c)] + (s - 1) * 0.01 for c, s in blocks] for m in ("ae", "cae", "patch_core")]
    ref = stats.friedmanchisquare(*cols)
    assert set(sig["n_blocks"]) == {6}
    assert sig["friedman_statistic"].iloc[0] == pytest.approx(ref.statistic)
    assert sig["friedman_pvalue"].iloc[0] == pytest.approx(ref.pvalue)
    assert list(sig["configuration"]) == list(sig.sort_values("avg_rank")["configuration"])
    assert sig.set_index("configuration").loc["cae", "p vs patch_core"] == \
        sig.set_index("configuration").loc["patch_core", "p vs cae"]
    md = (out / "significance.md").read_text()
    assert "Friedman" in md and "Nemenyi" in md and "cd_diagram.png" in md


def test_significance_of_two_methods_is_a_paired_wilcoxon(tmp_path):
    from scipy import stats

    uri = make_class_store(f"sqlite:///{tmp_path / 'two.db'}", models=("cae", "patch_core"))
    out = tmp_path / "rep"
    assert report_main(["--uri", uri, "--out", str(out), "--significance"]) == 0
    sig = pd.read_csv(out / "significance.csv").iloc[0]
    a = [CELLS[("cae", c)] + (s - 1) * 0.01 for c in range(3) for s in range(3)]
    b = [CELLS[("patch_core", c)] + (s - 1) * 0.01 for c in range(3) for s in range(3)]
    ref = stats.wilcoxon(a, b)
    assert (sig["configuration_a"], sig["configuration_b"], sig["n_pairs"]) == ("cae", "patch_core", 9)
    assert sig["pvalue"] == pytest.approx(ref.pvalue) and sig["statistic"] == pytest.approx(ref.statistic)
    assert sig["median_diff"] == pytest.approx(float(np.median(np.subtract(a, b))))
    assert not (out / "cd_diagram.png").exists()


@pytest.mark.parametrize("args, option", [(["--metric", "test/nope"], "--metric"),
                                          (["--significance", "model.name=cae"], "--significance")])
def test_bad_input_is_one_line_and_exit_2(store, tmp_path, capsys, args, option):
    assert report_main(["--uri", store, "--out", str(tmp_path / "rep")] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option in err[0]
    assert not (tmp_path / "rep").exists()  # nothing written


# --- the tests against the libraries' documented examples -------------------------------------

def test_wilcoxon_matches_scipy_docstring_example():
    """scipy.stats.wilcoxon's example (Wilcoxon 1945, corn heights): two-sided statistic 24,
    p = 0.041259765625 (exact)."""
    d = [6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75]
    r = paired_wilcoxon(pd.Series(d, dtype=float), pd.Series([0.0] * len(d)), "cross", "self")
    assert r.n == 15 and r.statistic == 24 and r.pvalue == pytest.approx(0.0413, abs=5e-5)
    assert r.median_diff == 24


def test_friedman_matches_scipy_examples():
    """scipy's Friedman example (Sprent & Smeeton 2000, pulse rates of 7 students on 3 occasions):
    statistic 10.5714, p 0.0050634; and the docstring's example on rng(18) data: 11.4286, 0.043515."""
    table = pd.DataFrame({"before": [72, 96, 88, 92, 74, 76, 82],
                          "immediately_after": [120, 120, 132, 120, 101, 96, 112],
                          "five_min_after": [76, 95, 104, 96, 84, 72, 76]})
    r = friedman_nemenyi(table)
    assert r.statistic == pytest.approx(10.57142857142857) and r.pvalue == pytest.approx(0.005063414171757498)
    assert r.n_blocks == 7
    # rank sums, smallest value = 1: 10, 21, 11 (Sprent & Smeeton); here 1 = largest: 4 - mean
    assert r.avg_ranks.to_dict() == pytest.approx({"before": 4 - 10 / 7, "immediately_after": 4 - 21 / 7,
                                                   "five_min_after": 4 - 11 / 7})
    x = np.random.default_rng(seed=18).random((6, 10))
    r = friedman_nemenyi(pd.DataFrame(x.T))
    assert r.statistic == pytest.approx(11.428571428571416) and r.pvalue == pytest.approx(0.043514520866727614)


def test_nemenyi_matches_scikit_posthocs_reference_values():
    """scikit-posthocs' own reference for posthoc_nemenyi_friedman (3 blocks x 7 groups, values
    from R PMCMRplus::frdAllPairsNemenyiTest), lower triangle."""
    x = pd.DataFrame([[4, 3, 4, 4, 5, 6, 3], [1, 2, 3, 5, 6, 7, 7], [1, 2, 6, 4, 1, 5, 1]])
    lower = [[],
             [0.9999999],
             [0.8414506, 0.8833015],
             [0.9177741, 0.9449086, 0.9999962],
             [0.9177741, 0.9449086, 0.9999962, 1.0000000],
             [0.2147827, 0.2597539, 0.9449086, 0.8833015, 0.8833015],
             [0.9976902, 0.9991770, 0.9888953, 0.9976902, 0.9976902, 0.5511935]]
    r = friedman_nemenyi(x)
    for i, row in enumerate(lower):
        for j, p in enumerate(row):
            assert r.pvalues.loc[i, j] == pytest.approx(p, abs=1e-6) and r.pvalues.loc[j, i] == pytest.approx(p, abs=1e-6)


@pytest.mark.parametrize("k, q", [(3, 2.343), (4, 2.569), (5, 2.728), (7, 2.949), (10, 3.164)])
def test_critical_difference_matches_demsar_table(k, q):
    """Demšar (2006), Table 5(a): q_0.05 of the Nemenyi test; CD = q sqrt(k(k+1) / 6N)."""
    assert critical_difference(k, 12) == pytest.approx(q * math.sqrt(k * (k + 1) / (6 * 12)), abs=1e-3)
