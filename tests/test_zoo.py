"""The README's model table is generated from MLflow runs (freqexp.zoo)."""
from __future__ import annotations

import subprocess

import pytest

from freqexp import zoo
from tests.conftest import CLIP_MODELS, REPO, needs_fmnist


def log_runs(uri, runs):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment("model_zoo")
    for params, metrics in runs:
        run = client.create_run(exp, tags={"model": params["model.name"]})
        for k, v in params.items():
            client.log_param(run.info.run_id, k, v)
        for k, v in metrics.items():
            client.log_metric(run.info.run_id, k, v)
        client.set_terminated(run.info.run_id, "FINISHED")
    failed = client.create_run(exp, tags={"model": "ddpm"})
    client.log_param(failed.info.run_id, "model.name", "ddpm")
    client.set_terminated(failed.info.run_id, "FAILED")


def m(auroc, ap=0.5, tput=100.0):
    return {"test/auroc": auroc, "test/ap": ap, "val/auroc": auroc - 0.01, "train/throughput": tput,
            "test/throughput": 2 * tput, "train/epochs": 5}


RUNS = [
    ({"model.name": "knn", "loss.spec": "mse", "model.n_params": "0", "model.k": "1"}, m(0.80)),
    ({"model.name": "cae", "loss.spec": "mse", "model.n_params": "1000"}, m(0.85)),
    ({"model.name": "ae", "loss.spec": "mse", "model.n_params": "500"}, m(0.70)),
    ({"model.name": "pca", "loss.spec": "mse", "model.n_params": "0"}, m(0.60)),
    ({"model.name": "patchcore", "loss.spec": "mse", "model.n_params": "9", "model.sampling_ratio": "1.0"}, m(0.90, tput=10)),
    ({"model.name": "patchcore", "loss.spec": "mse", "model.n_params": "9", "model.sampling_ratio": "0.1"}, m(0.80, tput=50)),
]


@pytest.fixture
def zoo_store(store):
    log_runs(store, RUNS)
    return store


def test_table_rows_order_labels_and_baseline_note(zoo_store, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\nbefore\n{zoo.START}\nold table\n{zoo.END}\nafter\n")
    assert zoo.main(["--uri", zoo_store, "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# title\nbefore\n") and text.endswith("after\n") and "old table" not in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    names = [r.split("|")[2].strip() for r in rows]
    # FINISHED runs only, by test AUROC; patchcore's two bank sizes are told apart
    assert names == ["patchcore (sampling_ratio=1.0)", "cae", "**knn** (baseline)", "patchcore (sampling_ratio=0.1)", "ae",
                     "**pca** (baseline)"]
    assert "| 0.9000 |" in rows[0] and "| 20 |" in rows[0]  # test AUROC and inference img/s
    # honest about models that do not beat the raw-pixel baseline (a tie does not beat it); the
    # other baseline is a row, not a candidate
    assert "at this budget: patchcore (sampling_ratio=0.1), ae." in text
    assert "Regenerate: `make zoo`" in text


def test_missing_markers_and_empty_experiment(zoo_store, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="zoo:start"):
        zoo.main(["--uri", zoo_store, "--readme", str(readme)])
    assert readme.read_text() == "no markers\n"
    assert zoo.main(["--uri", zoo_store, "--experiment", "nothing_here"]) == 2  # no such experiment: one line
    assert "no experiment 'nothing_here'" in capsys.readouterr().err


@needs_fmnist
def test_make_zoo_runs_every_model_and_writes_the_table(tmp_path):
    """`make zoo` end to end on a tiny Fashion-MNIST budget: every model option runs through the
    three sweeps and lands as a row of the generated table (the README's table comes from this)."""
    readme = tmp_path / "README.md"
    readme.write_text(f"{zoo.START}\n{zoo.END}\n")
    store = f"sqlite:///{tmp_path / 'zoo.db'}"
    tiny = ["dataset.limit_train=64", "dataset.limit_test=100", "dataset.val_fraction=0.01", "trainer.max_epochs=1",
            "trainer.batch_size=32", "trainer.eval_batch_size=100", "tracking.figures=none", f"'hydra.sweep.dir={tmp_path}/m/$${{now:%H-%M-%S-%f}}'"]
    r = subprocess.run(["make", "-s", "-C", str(REPO), "zoo", f"ZOO_STORE={store}", f"ZOO_README={readme}", "ARGS=" + " ".join(tiny),
                        "ZOO_BANK_ARGS=++model.backbone.arch=resnet18"],  # a ResNet-18 keeps the banks quick
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line for line in readme.read_text().splitlines() if line.startswith("| ") and not line.startswith("| #")]
    names = {row.split("|")[2].strip().replace("**", "").removesuffix(" (baseline)").split(" (")[0] for row in rows}
    # the CLIP models need CLIP's weights and a dataset with masks: their rows are the README's zero-shot table
    assert names == {p.stem for p in (REPO / "conf" / "model").glob("*.yaml")} - set(CLIP_MODELS)
    assert len(rows) == len(names) - 4 + 2 + 3 * 2  # draem with 2 augments, 3 memory banks at 2 bank sizes each
    assert "Regenerate: `make zoo`" in readme.read_text()
