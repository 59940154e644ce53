"""The README's one-class benchmark table is generated from MLflow runs (freqexp.benchmark,
`make benchmark`)."""
from __future__ import annotations

import os
import subprocess

import pandas as pd
import pytest

from freqexp import benchmark
from tests.conftest import REPO, needs_fmnist

PNG = b"\x89PNG\r\n\x1a\n"


def run(model, cls, seed, auroc, restore_best=False, minute=0, epochs=4):
    return {"params.model.name": model, "params.dataset.name": "fashion_mnist", "params.dataset.normal_class": str(cls),
            "params.seed": str(seed), "params.trainer.restore_best": str(restore_best),
            "params.trainer.early_stopping.enabled": "False", "params.trainer.max_epochs": str(epochs),
            "params.dataset.val_fraction": "0.1", "metrics.test/auroc": auroc,
            "run_id": f"{model}-{restore_best}-{cls}-{seed}-{minute}",
            "start_time": pd.Timestamp("2026-12-01 10:00", tz="UTC") + pd.Timedelta(minutes=minute)}


def frame():
    rows = [
        # ae, last epoch: two classes x two seeds, and an earlier run of class 0 seed 0 that a rerun replaced
        run("ae", 0, 0, 0.10, minute=0), run("ae", 0, 0, 0.90, minute=5), run("ae", 0, 1, 0.84, minute=6),
        run("ae", 1, 0, 0.70, minute=7), run("ae", 1, 1, 0.58, minute=8),
        # ae, best val epoch: class 1 missing
        run("ae", 0, 0, 0.95, True, 9), run("ae", 0, 1, 0.85, True, 10),
        # knn: a one-pass fit; its restore_best=true runs repeat the false ones (counted once)
        *[run("knn", c, s, 0.75 + 0.1 * c, rb, 11 + i) for i, (c, s, rb) in
          enumerate((c, s, rb) for rb in (False, True) for c in (0, 1) for s in (0, 1))],
    ]
    return pd.DataFrame(rows)


def test_table_cells_means_stds_seeds_counted_once_and_missing_class():
    b = benchmark.build(frame())
    assert b.classes == ["0", "1"] and b.seeds == ["0", "1"] and b.epochs == ["4"]
    assert [r.label for r in b.rows] == ["GOAD", "GEOM", "raw-pixel OC-SVM", "knn (baseline)", "ae", "ae (labelled val)"]
    ae = b.row("ae")
    # the rerun of class 0 seed 0 replaced the 0.10 run: cells over seeds, by hand
    assert ae.cells["0"] == (pytest.approx(87.0), pytest.approx(100 * 0.06 / 2 ** 0.5), 2)
    assert ae.cells["1"] == (pytest.approx(64.0), pytest.approx(100 * 0.12 / 2 ** 0.5), 2)
    # mean over classes; its std: over seeds of each seed's class mean (0.80 and 0.71)
    assert ae.mean == pytest.approx(75.5) and ae.mean_std == pytest.approx(100 * 0.09 / 2 ** 0.5)
    assert (ae.protocol, ae.selection) == (benchmark.NO_LABELS, "last epoch, no labels")
    best = b.row("ae (labelled val)")
    assert best.protocol == benchmark.LABELLED and "labelled anomalies" in best.selection
    assert "1" not in best.cells and best.covered == 1 and best.mean == pytest.approx(90.0)
    knn = b.row("knn (baseline)")
    assert knn.cells["0"] == (pytest.approx(75.0), pytest.approx(0.0), 2) and knn.selection == "none (one-pass fit)"
    assert b.repeats == 1 + 4  # the replaced ae run and knn's four repeats
    assert list(b.table.index) == ["0", "1"] and set(b.table.columns) == {"ae", "ae (labelled val)", "knn (baseline)"}

    text = benchmark.to_markdown(b)
    lines = text.splitlines()
    assert lines[0] == "| method | selection | 0 T-shirt | 1 Trouser | mean | source |"
    row = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    assert "| 87.0 ± 4.2 | 64.0 ± 8.5 | 75.5 ± 6.4 | measured |" in row["ae"]
    # missing class: an empty cell and a mean marked with the classes it covers
    assert "| 90.0 ± 7.1 |  | 90.0 ± 7.1 (1/2) | measured |" in row["ae (labelled val)"]
    assert "| 75.0 ± 0.0 | 85.0 ± 0.0 | 80.0 ± 0.0 |" in row["knn (baseline)"]
    assert "|  |  | 93.5 | [Golan & El-Yaniv" in row["**GEOM**"] and "| 94.1 |" in row["**GOAD**"]
    assert "hindsight" in row["**raw-pixel OC-SVM**"]
    assert "cover 2 of the 10 classes" in text and "Regenerate: `make benchmark`" in text


def test_options_that_differ_name_the_method_but_not_for_one_pass_fits():
    df = pd.concat([frame(), pd.DataFrame([run("ae", 0, 0, 0.5, minute=30, epochs=9),
                                           run("knn", 0, 0, 0.75, minute=31, epochs=9)])], ignore_index=True)
    b = benchmark.build(df)
    labels = [r.label for r in b.rows]
    assert "ae (trainer.max_epochs=9)" in labels and "ae (trainer.max_epochs=4)" in labels
    assert labels.count("knn (baseline)") == 1  # epochs mean nothing to a one-pass fit: a rerun, counted once

    early = run("ae", 0, 0, 0.5, True, minute=40)
    early["params.trainer.early_stopping.enabled"] = "True"
    labels = [r.label for r in benchmark.build(pd.concat([frame(), pd.DataFrame([early])])).rows]
    # two selections on labelled anomalies stay two rows, named by their selection
    assert {"ae (best val AUROC epoch, labelled anomalies)",
            "ae (early stopping + best val AUROC epoch, labelled anomalies)"} <= set(labels)


def test_significance_over_classes_draws_the_diagram(tmp_path):
    rows = [run(m, c, s, 0.5 + 0.1 * i + 0.01 * c + 0.001 * s, rb, minute=c * 10 + s)
            for i, (m, rb) in enumerate((("pca", False), ("ae", False), ("ae", True), ("knn", False)))
            for c in range(4) for s in range(2)]
    rows += [run("vae", 0, s, 0.99, minute=50 + s) for s in range(2)]  # one class only: left out, not the blocks
    b = benchmark.build(pd.DataFrame(rows))
    text, result = benchmark.significance(b, tmp_path / "img" / "cd.png")
    assert result.n_blocks == 4 and list(result.avg_ranks.index)[0] == "knn (baseline)"
    assert "vae" not in result.avg_ranks and "Left out of the test for missing classes: vae." in text
    assert "over 4 classes (seeds averaged within a class)" in text and "CD = " in text
    assert (tmp_path / "img" / "cd.png").read_bytes()[:8] == PNG


def log_runs(uri, df):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment(benchmark.EXPERIMENT)
    for r in df.to_dict("records"):
        run_ = client.create_run(exp)
        for k, v in r.items():
            if k.startswith("params."):
                client.log_param(run_.info.run_id, k[len("params."):], v)
        client.log_metric(run_.info.run_id, "test/auroc", r["metrics.test/auroc"])
        client.set_terminated(run_.info.run_id, "FINISHED")


def test_cli_writes_between_the_markers_and_refuses_a_readme_without_them(store, tmp_path, capsys):
    df = pd.concat([frame(), pd.DataFrame([run("ae", 1, 0, 0.72, True, 40), run("ae", 1, 1, 0.60, True, 41)])])
    log_runs(store, df[df["run_id"] != "ae-False-0-0-0"])
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\nbefore\n{benchmark.START}\nold table\n{benchmark.END}\nafter\n")
    diagram = tmp_path / "docs" / "img" / "cd.png"
    assert benchmark.main(["--uri", store, "--readme", str(readme), "--diagram", str(diagram)]) == 0
    text = readme.read_text()
    assert text.startswith("# title\nbefore\n") and text.endswith("after\n") and "old table" not in text
    assert "| ae (labelled val) |" in text and "](docs/img/cd.png)" in text  # linked relative to the README
    assert diagram.read_bytes()[:8] == PNG

    bare = tmp_path / "BARE.md"
    bare.write_text("no markers\n")
    with pytest.raises(SystemExit, match="benchmark:start"):
        benchmark.main(["--uri", store, "--readme", str(bare), "--diagram", str(tmp_path / "other.png")])
    assert bare.read_text() == "no markers\n" and not (tmp_path / "other.png").exists()
    assert benchmark.main(["--uri", store, "--experiment", "model_zoo", "--diagram", "none"]) == 2  # no such experiment


def test_preset_composes_every_class_seeds_and_both_protocols():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="freqexp.conf", version_base="1.3"):
        full = compose(config_name="config", overrides=["+sweep=one_class_benchmark"], return_hydra_config=True)
    params = full.hydra.sweeper.params
    assert params["dataset.normal_class"] == "0,1,2,3,4,5,6,7,8,9" and params.seed == "0,1,2"
    assert params["trainer.restore_best"] == "false,true" and {"knn", "pca"} <= set(params.model.split(","))
    assert list(params)[0] == "dataset.normal_class"  # classes vary slowest: a sweep cut short compares on whole classes
    assert full.trainer.early_stopping.enabled is False and "restore_best" in full.trainer
    assert full.tracking.uri == "sqlite:///outputs/benchmark.db" and full.tracking.experiment == benchmark.EXPERIMENT


def test_make_benchmark_defaults_and_overrides():
    def commands(*extra):
        r = subprocess.run(["make", "-n", "-C", str(REPO), "benchmark", *extra], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return [line for line in r.stdout.splitlines() if "freqexp" in line]

    trained, baselines, table = commands()[-3:]
    for line in (trained, baselines):
        assert "+sweep=one_class_benchmark" in line and "dataset.normal_class=0,1,2,3,4,5,6,7,8,9" in line
        assert "seed=0,1,2" in line and "tracking.uri=sqlite:///outputs/benchmark.db" in line
    assert "model=ae,vae,cae" in trained and "trainer.restore_best=false,true" in trained
    assert "model=knn,pca" in baselines and "trainer.restore_best=false " in baselines + " "
    assert "freqexp.benchmark" in table and "--readme README.md" in table
    gpu = commands("ARGS=hardware=gpu", "BENCH_EPOCHS=20", "BENCH_MODELS=cae", "BENCH_BASELINES=")
    assert len([c for c in gpu if "--multirun" in c]) == 1 and "trainer.max_epochs=20" in gpu[-2]
    assert "hardware=gpu" in gpu[-2] and "model=cae " in gpu[-2]


@needs_fmnist
def test_make_benchmark_end_to_end_on_a_tiny_budget(tmp_path):
    """`make benchmark` on 2 classes x ae and the raw-pixel baselines x 2 seeds, 1 epoch on a subset:
    both sweeps run, and the table and the diagram land in a copy of the README."""
    text = (REPO / "README.md").read_text()
    if benchmark.START not in text:
        text += f"\n{benchmark.START}\n{benchmark.END}\n"
    readme = tmp_path / "README.md"
    readme.write_text(text)
    store = f"sqlite:///{tmp_path / 'benchmark.db'}"
    tiny = ["dataset.limit_train=64", "dataset.limit_test=200", "dataset.val_fraction=0.05", "trainer.batch_size=32",
            "trainer.eval_batch_size=200", f"'hydra.sweep.dir={tmp_path}/m/$${{now:%H-%M-%S-%f}}'"]
    r = subprocess.run(["make", "-s", "-C", str(REPO), "benchmark", f"BENCH_STORE={store}", f"BENCH_README={readme}",
                        f"BENCH_DIAGRAM={tmp_path / 'img' / 'cd.png'}", "BENCH_CLASSES=0,1", "BENCH_SEEDS=0,1",
                        "BENCH_MODELS=ae", "BENCH_EPOCHS=1", "ARGS=" + " ".join(tiny)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = readme.read_text()
    head, rest = out.split(benchmark.START, 1)
    table, tail = rest.split(benchmark.END, 1)
    assert text.startswith(head) and text.endswith(tail)  # the README outside the markers is untouched
    lines = table.splitlines()
    assert lines[1] == "| method | selection | 0 T-shirt | 1 Trouser | mean | source |"
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in lines if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"method", "**GOAD**", "**GEOM**", "**raw-pixel OC-SVM**", "knn (baseline)", "pca (baseline)",
                         "ae", "ae (labelled val)"}
    assert "last epoch, no labels" in rows["ae"][0] and "labelled anomalies" in rows["ae (labelled val)"][0]
    for name in ("knn (baseline)", "pca (baseline)", "ae", "ae (labelled val)"):
        cells = [c.strip() for c in rows[name][1:4]]  # class 0, class 1, mean
        assert all(" ± " in c for c in cells), (name, cells)
    assert rows["**GEOM**"][3].strip() == "93.5"
    assert "Friedman test over 2 classes" in table and "![critical-difference diagram](img/cd.png)" in table
    assert (tmp_path / "img" / "cd.png").read_bytes()[:8] == PNG
