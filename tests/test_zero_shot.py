"""The zero-shot protocol (dataset.train_from): per-category metrics and their mean, the run path
over two small fixture datasets in their real layouts (trained on one, tested on every category of
the other, nothing of the target seen before testing), and the refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from freqexp.errors import ConfigError
from freqexp.evaluate import Scored, category_metrics


def test_category_metrics_are_each_categorys_and_their_mean():
    rng = np.random.default_rng(0)
    categories = ["a"] * 30 + ["b"] * 20 + ["c"] * 10
    labels = np.r_[rng.integers(0, 2, 30), rng.integers(0, 2, 20), np.zeros(10, int)]  # c: only normals
    labels[0], labels[1], labels[30], labels[31] = 0, 1, 0, 1
    scores = rng.random(60) + labels * 0.3
    scored = Scored(torch.tensor(scores), torch.tensor(labels), None, 1.0)
    m = category_metrics(scored, None, None, categories)
    expected = {}
    for name, rows in (("a", slice(0, 30)), ("b", slice(30, 50))):
        expected[name] = (roc_auc_score(labels[rows], scores[rows]), average_precision_score(labels[rows], scores[rows]))
        assert m[f"test/category/{name}/auroc"] == pytest.approx(expected[name][0])
        assert m[f"test/category/{name}/ap"] == pytest.approx(expected[name][1])
    assert "test/category/c/auroc" not in m  # no anomalous test image: no AUROC to average
    assert m["test/auroc"] == pytest.approx((expected["a"][0] + expected["b"][0]) / 2)
    assert m["test/ap"] == pytest.approx((expected["a"][1] + expected["b"][1]) / 2)
    assert m["test/categories"] == 3


def test_pixel_metrics_per_category_are_averaged_too():
    rng = np.random.default_rng(1)
    masks = np.zeros((8, 1, 6, 6), bool)
    masks[1, 0, 1:3, 1:3] = masks[3, 0, 2:5, 2:4] = masks[5, 0, 0:2, 3:6] = masks[7, 0, 4:6, 0:2] = True
    maps = rng.random((8, 1, 6, 6)) + masks * 0.5
    labels = masks.reshape(8, -1).any(1).astype(int)
    scored = Scored(torch.tensor(maps.reshape(8, -1).max(1)), torch.tensor(labels), torch.tensor(maps), 1.0)
    categories = ["x"] * 4 + ["y"] * 4
    m = category_metrics(scored, torch.tensor(masks), None, categories)
    per = [roc_auc_score(masks[i:i + 4].ravel(), maps[i:i + 4].ravel()) for i in (0, 4)]
    assert m["test/category/x/pixel_auroc"] == pytest.approx(per[0])
    assert m["test/pixel_auroc"] == pytest.approx(np.mean(per))
    assert 0 <= m["test/pro"] <= 1


# -- the run path over two fixture datasets -----------------------------------------------------

from mlflow.tracking import MlflowClient  # noqa: E402

from freqexp.run import execute  # noqa: E402
from tests.conftest import FAST, compose_cfg, tiny_clip_folder  # noqa: E402
from tests.test_zero_shot_data import make_mpdd, make_visa  # noqa: E402


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return make_visa(root / "visa", size=(32, 32)), make_mpdd(root / "mpdd", size=(32, 32))


def zero_shot(model, sets, store, *extra):
    visa, mpdd = sets
    clip = [f"model.clip.name={tiny_clip_folder()}"] if model in ("fe_clip", "winclip") else []
    return compose_cfg([f"model={model}", *clip, "dataset=mpdd", f"dataset.root={mpdd}",
                        "dataset.train_from=visa", f"dataset.train_root={visa}", "dataset.image_size=32",
                        "trainer.batch_size=8", "trainer.eval_batch_size=8", *FAST, "trainer.max_epochs=2",
                        f"tracking.uri={store}", *extra])


def test_fe_clip_zero_shot_trains_on_the_auxiliary_set_and_reports_every_target_category(two_sets, tmp_path, store):
    visa, mpdd = two_sets
    result = execute(zero_shot("fe_clip", two_sets, store), tmp_path / "run")
    run = MlflowClient(store).get_run(result.run_id)
    data, metrics = run.data, run.data.metrics
    assert run.info.status == "FINISHED" and data.tags["protocol"] == "zero-shot"
    # trained on every VisA test image (normals and anomalies, with masks), none of MPDD's
    n_visa_test = sum(1 for line in (visa / "split_csv" / "1cls.csv").read_text().splitlines()[1:] if ",test," in line)
    assert int(data.params["data.train_normal"]) + int(data.params["data.train_anomalous"]) == n_visa_test
    assert int(data.params["data.train_anomalous"]) > 0 and int(data.params["data.val_normal"]) == 0
    assert data.params["resolved.fit_on"].startswith("train_from") and "visa" in data.params["resolved.protocol"]
    # no validation, a fixed number of epochs: no val metrics, no threshold
    assert not any(k.startswith("val/") for k in metrics) and metrics["train/epochs"] == 2
    # every MPDD category, and test/* their mean
    categories = sorted(d.name for d in mpdd.iterdir() if d.is_dir())
    per = [metrics[f"test/category/{c}/auroc"] for c in categories]
    assert metrics["test/auroc"] == pytest.approx(np.mean(per)) and metrics["test/categories"] == len(categories)
    assert "test/pooled_auroc" in metrics and "test/pixel_auroc" in metrics
    assert "train/loss_focal" in metrics and "train/loss_dice" in metrics
    assert "<-visa" in run.info.run_name
    # the per-category figure in the run's artifacts
    assert "categories.png" in {a.path for a in MlflowClient(store).list_artifacts(result.run_id)}


def test_winclip_runs_the_same_protocol_without_training(two_sets, tmp_path, store):
    result = execute(zero_shot("winclip", two_sets, store), tmp_path / "run")
    run = MlflowClient(store).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["protocol"] == "zero-shot"
    assert run.data.params["resolved.fit_on"].startswith("nothing")
    assert "test/category/connector/auroc" in run.data.metrics


def test_a_model_of_the_targets_normals_cannot_run_zero_shot(two_sets, store):
    from freqexp.validate import make_plan

    with pytest.raises(ConfigError) as e:
        make_plan(zero_shot("cae", two_sets, store))
    assert e.value.key == "dataset.train_from" and "fe_clip" in str(e.value) and "winclip" in str(e.value)


def test_a_search_on_a_zero_shot_run_is_refused(two_sets, store):
    from freqexp.validate import check_searchable

    with pytest.raises(ConfigError, match="no validation split"):
        check_searchable(zero_shot("fe_clip", two_sets, store))
