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
