"""freqexp.metrics against scikit-learn and numpy on many random cases, including heavy ties
and strongly imbalanced labels."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from freqexp import metrics


def make_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (scores, labels) with a mix of sizes, tie levels and class balances."""
    rs = np.random.RandomState(seed)
    n = int(rs.choice([7, 20, 100, 333, 1000]))
    kind = seed % 4
    if kind == 0:  # balanced, continuous
        labels = rs.rand(n) < 0.5
    elif kind == 1:  # 1 normal : 9 anomalous
        labels = rs.rand(n) < 0.9
    elif kind == 2:  # rare anomalies
        labels = rs.rand(n) < 0.1
    else:
        labels = rs.rand(n) < rs.uniform(0.2, 0.8)
    labels[0], labels[1] = True, False  # both classes always present
    labels = labels.astype(np.int64)
    scores = rs.randn(n) + labels * rs.uniform(0, 2)
    ties = seed % 3
    if ties == 1:
        scores = np.round(scores, 1)  # heavy ties
    elif ties == 2:
        scores = np.round(scores)  # very heavy ties: a handful of distinct values
    return scores, labels


SEEDS = list(range(40))


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a))


def test_cases_really_have_ties_and_imbalance():
    # guard: the generator above must produce the hard cases this file claims to cover
    heavy_ties = [s for s in SEEDS if len(np.unique(make_case(s)[0])) < len(make_case(s)[0]) / 4]
    imbalanced = [s for s in SEEDS if make_case(s)[1].mean() > 0.85]
    assert len(heavy_ties) >= 8 and len(imbalanced) >= 5


@pytest.mark.parametrize("seed", SEEDS)
def test_roc_auc_and_ap_match_sklearn(seed):
    scores, labels = make_case(seed)
    assert metrics.roc_auc(t(scores), t(labels)) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.average_precision(t(scores), t(labels)) == pytest.approx(
        skm.average_precision_score(labels, scores), abs=1e-12
    )


@pytest.mark.parametrize("seed", SEEDS[:16])
def test_curves_match_sklearn(seed):
    scores, labels = make_case(seed)
    fpr, tpr, thr = (x.numpy() for x in metrics.roc_curve(t(scores), t(labels)))
    efpr, etpr, ethr = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, efpr, atol=1e-12)
    np.testing.assert_allclose(tpr, etpr, atol=1e-12)
    assert np.isinf(thr[0]) and np.isinf(ethr[0])
    np.testing.assert_allclose(thr[1:], ethr[1:])

    precision, recall, pthr = (x.numpy() for x in metrics.precision_recall_curve(t(scores), t(labels)))
    ep, er, ethr = skm.precision_recall_curve(labels, scores)
    # sklearn: increasing thresholds plus a final (precision 1, recall 0) point
    np.testing.assert_allclose(pthr, ethr[::-1])
    np.testing.assert_allclose(precision, ep[:-1][::-1], atol=1e-12)
    np.testing.assert_allclose(recall, er[:-1][::-1], atol=1e-12)


def test_precision_recall_curve_by_hand():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.8])
    labels = torch.tensor([0, 0, 1, 1, 0])
    precision, recall, thr = metrics.precision_recall_curve(scores, labels)
    np.testing.assert_allclose(thr.numpy(), [0.8, 0.4, 0.35, 0.1], rtol=1e-6)
    np.testing.assert_allclose(precision.numpy(), [1 / 2, 1 / 3, 2 / 4, 2 / 5])
    np.testing.assert_allclose(recall.numpy(), [1 / 2, 1 / 2, 1, 1])
    # AP = 0.5 * 1/2 + 0 * 1/3 + 0.5 * 2/4
    assert metrics.average_precision(scores, labels) == pytest.approx(0.5)
    # AUC: positives 0.8 and 0.35; negatives 0.1, 0.4, 0.8 -> pairs won: (0.8: 2 + tie 0.5) + (0.35: 1) = 3.5 of 6
    assert metrics.roc_auc(scores, labels) == pytest.approx(3.5 / 6)


def test_perfect_and_inverted_ranking():
    labels = torch.tensor([0, 0, 0, 1, 1])
    scores = torch.tensor([0.1, 0.2, 0.3, 0.8, 0.9])
    assert metrics.roc_auc(scores, labels) == pytest.approx(1.0)
    assert metrics.average_precision(scores, labels) == pytest.approx(1.0)
    assert metrics.roc_auc(-scores, labels) == pytest.approx(0.0)
    # all scores tied -> chance AUC, AP = prevalence
    assert metrics.roc_auc(torch.zeros(5), labels) == pytest.approx(0.5)
    assert metrics.average_precision(torch.zeros(5), labels) == pytest.approx(0.4)


@pytest.mark.parametrize("seed", SEEDS[:24])
def test_best_f1_is_the_max_over_all_thresholds(seed):
    scores, labels = make_case(seed)
    thr, f1 = metrics.best_f1_threshold(t(scores), t(labels))
    cuts = np.unique(scores)
    if len(cuts) <= 400:
        all_f1 = [skm.f1_score(labels, scores >= s, zero_division=0) for s in cuts]
    else:  # many distinct scores: vectorized numpy F1 at every cut (sklearn per cut is slow)
        pred = scores[None, :] >= cuts[:, None]
        tp = (pred & (labels[None, :] == 1)).sum(1)
        all_f1 = 2 * tp / (pred.sum(1) + labels.sum())
        # and sklearn agrees at the best cut
        best = cuts[int(np.argmax(all_f1))]
        assert skm.f1_score(labels, scores >= best) == pytest.approx(max(all_f1), abs=1e-12)
    assert f1 == pytest.approx(max(all_f1), abs=1e-12)
    # the returned threshold achieves it
    assert skm.f1_score(labels, scores >= thr, zero_division=0) == pytest.approx(f1, abs=1e-12)
    assert thr in set(scores.tolist())


@pytest.mark.parametrize("seed", SEEDS[:24])
def test_binary_metrics_match_sklearn(seed):
    scores, labels = make_case(seed)
    rs = np.random.RandomState(1000 + seed)
    # a score (ties matter for ">="), a random cut, and cuts predicting everything / nothing
    cuts = [scores[rs.randint(len(scores))], rs.uniform(scores.min(), scores.max()), scores.min(), scores.max() + 1]
    for cut in cuts:
        got = metrics.binary_metrics(t(scores), t(labels), float(cut))
        pred = (scores >= cut).astype(np.int64)
        assert got["f1"] == pytest.approx(skm.f1_score(labels, pred, zero_division=0), abs=1e-12)
        assert got["acc"] == pytest.approx(skm.accuracy_score(labels, pred), abs=1e-12)
        assert got["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(labels, pred), abs=1e-12)
        assert got["precision"] == pytest.approx(skm.precision_score(labels, pred, zero_division=0), abs=1e-12)
        assert got["recall"] == pytest.approx(skm.recall_score(labels, pred, zero_division=0), abs=1e-12)


def test_binary_metrics_threshold_is_inclusive():
    scores = torch.tensor([0.2, 0.5, 0.5, 0.9])
    labels = torch.tensor([0, 1, 0, 1])
    got = metrics.binary_metrics(scores, labels, 0.5)
    # predicted anomalous: 0.5, 0.5, 0.9 -> tp 2, fp 1, fn 0, tn 1
    assert got["precision"] == pytest.approx(2 / 3)
    assert got["recall"] == pytest.approx(1.0)
    assert got["acc"] == pytest.approx(3 / 4)
    assert got["balanced_acc"] == pytest.approx(0.5 * (1.0 + 0.5))
    assert got["f1"] == pytest.approx(0.8)


def test_accepts_float_labels_and_2d_inputs():
    scores, labels = make_case(3)
    n = len(scores) // 2 * 2
    s2 = t(scores[:n]).reshape(2, -1).float()
    l2 = t(labels[:n]).reshape(2, -1).float()
    assert metrics.roc_auc(s2, l2) == pytest.approx(
        skm.roc_auc_score(labels[:n], scores[:n].astype(np.float32)), abs=1e-9
    )


# --------------------------------------------------------------------------- reduce_map


def test_reduce_map_matches_numpy():
    rs = np.random.RandomState(7)
    maps = rs.rand(6, 1, 17, 13).astype(np.float32)
    flat = maps.reshape(6, -1).astype(np.float64)
    got_mean = metrics.reduce_map(t(maps), "mean").numpy()
    got_max = metrics.reduce_map(t(maps), "max").numpy()
    np.testing.assert_allclose(got_mean, flat.mean(1), rtol=1e-5)
    np.testing.assert_allclose(got_max, flat.max(1), rtol=1e-6)
    assert got_mean.shape == (6,)
    n = flat.shape[1]  # 221
    for frac in (0.05, 0.1, 0.25, 0.5, 1.0, 1e-6):
        k = max(1, int(round(frac * n)))
        expected = np.sort(flat, axis=1)[:, ::-1][:, :k].mean(1)
        got = metrics.reduce_map(t(maps), "topk", topk=frac).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    # topk is between mean and max
    got = metrics.reduce_map(t(maps), "topk", topk=0.05).numpy()
    assert np.all(got <= got_max + 1e-7) and np.all(got >= got_mean)


def test_reduce_map_default_topk_is_five_percent():
    maps = torch.arange(100, dtype=torch.float32).reshape(1, 1, 10, 10)
    # top 5 of 0..99 -> mean(95..99) = 97
    assert metrics.reduce_map(maps, "topk").item() == pytest.approx(97.0)
    assert metrics.reduce_map(maps).item() == pytest.approx(49.5)  # default reduction: mean


def test_reduce_map_unknown_reduction():
    with pytest.raises(ValueError):
        metrics.reduce_map(torch.zeros(2, 1, 4, 4), "median")


# --------------------------------------------------------------------------- errors


SCORE_FUNCS = [
    metrics.roc_auc,
    metrics.average_precision,
    metrics.roc_curve,
    metrics.precision_recall_curve,
    metrics.best_f1_threshold,
]


@pytest.mark.parametrize("fn", SCORE_FUNCS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("label", [0, 1])
def test_single_class_raises(fn, label):
    scores = torch.tensor([0.1, 0.5, 0.3, 0.9])
    with pytest.raises(ValueError):
        fn(scores, torch.full((4,), label))


@pytest.mark.parametrize("fn", SCORE_FUNCS + [lambda s, l: metrics.binary_metrics(s, l, 0.5)], ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_raise(fn, bad):
    scores = torch.tensor([0.1, bad, 0.3, 0.9])
    labels = torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="NaN|inf"):
        fn(scores, labels)


@pytest.mark.parametrize("fn", SCORE_FUNCS + [lambda s, l: metrics.binary_metrics(s, l, 0.5)], ids=str)
def test_length_mismatch_raises(fn):
    with pytest.raises(ValueError):
        fn(torch.tensor([0.1, 0.2, 0.3, 0.9]), torch.tensor([0, 1, 0, 1, 1]))
