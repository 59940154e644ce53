"""Protocols: the benchmark's test split stays the test by default, one-pass models are fitted on
every normal training image, pixel metrics cover what the model sees, and every run says whether
its validation was semi-supervised."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

from freqexp.data import build_dataset
from freqexp.data.base import OneClassData, Split, validation_protocol, with_all_normals
from freqexp.errors import ConfigError
from freqexp.run import execute
from freqexp.validate import check_searchable, make_plan
from tests.conftest import FAST, compose_cfg
from tests.test_image_datasets import make_mvtec, mvtec_cfg


def test_mvtec_keeps_every_test_image_in_the_test_by_default(tmp_path):
    make_mvtec(tmp_path)  # train/good 10; test: good 5, crack 5, hole 3, scuff 1
    cfg = mvtec_cfg(tmp_path)
    assert cfg.dataset.val_anomalies == "pseudo"
    d = build_dataset(cfg.dataset)
    assert (len(d.test) - d.test.n_anomalous, d.test.n_anomalous) == (5, 9)
    assert d.val.n_anomalous == 0  # the run adds pseudo-anomalies of the held-out normals
    semi = build_dataset(mvtec_cfg(tmp_path, "dataset.val_anomalies=test").dataset)
    assert len(semi.test) < 14 and semi.val.n_anomalous > 0  # the former protocol is still there by name


def test_the_protocol_is_semi_supervised_only_when_validation_sees_real_anomalies():
    assert validation_protocol("pseudo", True) == "unsupervised"
    assert validation_protocol("classes", False) == "unsupervised"  # nothing validated
    for real in ("classes", "test", "abnormal", "faults", "defects"):
        assert validation_protocol(real, True) == "semi-supervised"


def _data(n_train=6, n_val_normal=3, n_val_anom=2, n_test=4):
    img = lambda n, v: torch.full((n, 1, 4, 4), v, dtype=torch.uint8)  # noqa: E731
    train = Split(img(n_train, 1), torch.zeros(n_train, dtype=torch.long))
    val = Split(torch.cat([img(n_val_normal, 2), img(n_val_anom, 3)]),
                torch.cat([torch.zeros(n_val_normal, dtype=torch.long), torch.ones(n_val_anom, dtype=torch.long)]))
    test = Split(img(n_test, 4), torch.tensor([0, 1] * (n_test // 2)))
    return OneClassData(train, val, test, {})


def test_with_all_normals_moves_the_held_out_normals_into_the_fit_and_empties_validation():
    out = with_all_normals(_data())
    assert len(out.train) == 9 and sorted(out.train.images[:, 0, 0, 0].tolist()) == [1] * 6 + [2] * 3
    assert len(out.val) == 0 and len(out.test) == 4  # the anomalies of val are not fitted on
    assert len(with_all_normals(_data(), limit=7).train) == 7  # dataset.limit_train caps what is fitted on
    assert len(with_all_normals(_data(), limit=2).train) == 6  # a loader's own cap is never undone


@pytest.mark.parametrize("model, fit_on, val_anomalies, expected", [
    ("knn", "auto", "defects", True), ("knn", "train", "defects", False), ("pca", "all", "pseudo", True),
    ("knn", "auto", "test", False),  # validation taken from the test: the bank keeps the split
    ("cae", "auto", "defects", False),
])
def test_fit_on_resolves_per_model_and_validation(model, fit_on, val_anomalies, expected):
    from freqexp.data.base import fits_all_normals
    from freqexp.models import model_class

    assert fits_all_normals(fit_on, model_class(model).gradient_free, val_anomalies) is expected


def test_fit_on_all_is_refused_where_it_cannot_work():
    with pytest.raises(ConfigError, match="trainer.fit_on.*one-pass models"):
        make_plan(compose_cfg(["dataset=synthetic", "model=cae", "trainer.fit_on=all"]))
    with pytest.raises(ConfigError, match="trainer.fit_on: must be one of auto, train, all"):
        make_plan(compose_cfg(["dataset=synthetic", "model=knn", "trainer.fit_on=everything"]))
    with pytest.raises(ConfigError, match="trainer.fit_on.*val/auroc.*trainer.fit_on=train"):
        check_searchable(compose_cfg(["dataset=synthetic", "model=knn"]))
    check_searchable(compose_cfg(["dataset=synthetic", "model=knn", "trainer.fit_on=train"]))  # searchable
    check_searchable(compose_cfg(["dataset=synthetic", "model=cae"]))


def test_a_bank_is_fitted_on_every_normal_and_the_run_says_so(tmp_path, store):
    common = ["dataset=synthetic", "model=knn", *FAST, f"tracking.uri={store}"]
    all_run = execute(compose_cfg(common), tmp_path / "all")
    split_run = execute(compose_cfg(common + ["trainer.fit_on=train"]), tmp_path / "train")
    client = MlflowClient(store)
    a, s = client.get_run(all_run.run_id).data, client.get_run(split_run.run_id).data
    n_train, n_val_normal = int(s.params["data.train_normal"]), int(s.params["data.val_normal"])
    assert int(a.params["data.train_normal"]) == n_train + n_val_normal and int(a.params["data.val_normal"]) == 0
    assert not any(k.startswith("val/") for k in a.metrics) and "test/f1_best" in a.metrics
    assert {"val/auroc", "test/f1"} <= set(s.metrics)
    assert a.params["resolved.fit_on"].startswith("all") and s.params["resolved.fit_on"].startswith("train")
    assert a.tags["protocol"] == "unsupervised"
    assert s.tags["protocol"] == "semi-supervised"  # the synthetic set's own defects validate it


class _Boxed(torch.nn.Module):
    """A model whose maps are known: evaluated_region crops the central 4x4 of 8x8 images."""

    def __init__(self, maps):
        super().__init__()
        self.maps = maps

    def evaluated_region(self, image_size):
        return (2, 2, 4, 4)


def test_pixel_metrics_cover_only_the_region_the_model_sees(monkeypatch):
    from freqexp import evaluate as ev
    from freqexp.metrics import pro_auc

    g = torch.Generator().manual_seed(0)
    n = 6
    masks = torch.zeros(n, 1, 8, 8, dtype=torch.bool)
    masks[3:, :, 3:5, 3:5] = True  # defects inside the crop
    masks[3:, :, 0, :] = True  # and on the border the model never saw
    maps = torch.rand(n, 1, 8, 8, generator=g) + masks[:, :, :, :].float() * 0.3
    maps[:, :, 0, :] = 0.0  # the border: nothing found there
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    test = Split(torch.zeros(n, 1, 8, 8, dtype=torch.uint8), labels, masks)
    data = OneClassData(test, Split(torch.zeros(0, 1, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)), test, {})

    def fake_score(module, split, batch_size, keep_maps=False, name="split"):
        return ev.Scored(maps.flatten(1).amax(1), split.labels, maps if keep_maps else None, 1.0)

    monkeypatch.setattr(ev, "score_split", fake_score)
    module = type("M", (), {"model": _Boxed(maps), "device": torch.device("cpu")})()
    m, _ = ev.evaluate(module, data, 4)
    crop_maps, crop_masks = maps[..., 2:6, 2:6].numpy(), masks[..., 2:6, 2:6].numpy()
    expected = roc_auc_score(crop_masks.ravel(), crop_maps.ravel())
    assert m["test/pixel_auroc"] == pytest.approx(expected, abs=1e-9)
    assert abs(expected - roc_auc_score(masks.numpy().ravel(), maps.numpy().ravel())) > 0.05  # the crop matters here
    assert m["test/pro"] == pytest.approx(pro_auc(maps[..., 2:6, 2:6], masks[..., 2:6, 2:6], max_fpr=0.3))
    assert "val/auroc" not in m and "test/f1" not in m  # no validation split: no threshold


def test_patchcore_reports_the_torchvision_centre_crop_as_its_region():
    from freqexp.models import build_model

    cfg = compose_cfg(["model=patchcore", "model.backbone.arch=resnet18", "model.input_size=null"]).model
    model = build_model(cfg, (1, 256, 256))
    top = int(round((256 - 224) / 2.0))  # torchvision.transforms.CenterCrop's placement
    assert model.evaluated_region((256, 256)) == (top, top, 224, 224)
    plain = build_model(compose_cfg(["model=patchcore", "model.backbone.arch=resnet18", "model.center_crop=null"]).model, (1, 64, 64))
    assert plain.evaluated_region((64, 64)) is None
    assert build_model(compose_cfg(["model=cae"]).model, (1, 28, 28)).evaluated_region((28, 28)) is None


def test_the_leaderboard_shows_each_configurations_protocol():
    import pandas as pd

    from freqexp.report import leaderboard, seed_table, to_markdown

    df = pd.DataFrame({"params.model.name": ["knn", "knn", "cae", "cae"], "params.seed": ["0", "1", "0", "1"],
                       "metrics.test/auroc": [0.7, 0.8, 0.6, 0.65], "metrics.val/auroc": [np.nan, np.nan, 0.9, 0.8],
                       "tags.protocol": ["unsupervised", "unsupervised", "semi-supervised", "semi-supervised"],
                       "run_id": list("abcd")})
    runs, _ = seed_table(df, ["model.name"])
    board = leaderboard(df, ["model.name"], runs)
    assert dict(zip(board["model.name"], board["protocol"])) == {"knn": "unsupervised", "cae": "semi-supervised"}
    md = to_markdown(board, ["model.name"])
    assert md.splitlines()[0].split(" | ")[1:3] == ["model.name", "protocol"]
    assert any("semi-supervised" in line and "cae" in line for line in md.splitlines())
