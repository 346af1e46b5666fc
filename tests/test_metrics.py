"""Tests of flowtransfer.metrics against hand-computed values, scikit-learn, scipy and closed forms."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from flowtransfer import metrics as M
from flowtransfer.labels import sentiment_classes

sklearn_metrics = pytest.importorskip("sklearn.metrics")
scipy_stats = pytest.importorskip("scipy.stats")
scipy_linalg = pytest.importorskip("scipy.linalg")

# --------------------------------------------------------------------------------------------------
# regression

# a small case worked out by hand (see the comments in test_regression_hand_computed)
PRED = np.array([-0.5, 0.5, 1.4, -2.6, 3.7, 0.0, -0.2, 2.5])
TARGET = np.array([-1.0, 0.0, 2.0, -3.0, 3.0, 0.0, 0.3, 2.4])


def test_regression_hand_computed():
    m = M.regression_metrics(PRED, TARGET)
    # has-0: pred >= 0 [F T T F T T F T], target >= 0 [F T T F T T T T]: only sample 6 differs
    assert m["acc2_has0"] == pytest.approx(7 / 8)
    # class "negative": tp 2, fp 1, fn 0 -> F1 4/5 (support 2);
    # class "non-negative": tp 5, fp 0, fn 1 -> F1 10/11 (support 6)
    assert m["f1_has0"] == pytest.approx((2 * 0.8 + 6 * 10 / 11) / 8, abs=1e-12)
    # non-0: samples 1 and 5 dropped; pred > 0 [F T F T F T] vs target > 0 [F T F T T T]
    assert m["acc2_non0"] == pytest.approx(5 / 6)
    assert m["n_non0"] == 6 and m["n"] == 8
    # 7 classes: pred -> [-1, 1, 1, -3, 3, 0, 0, 3], target -> [-1, 0, 2, -3, 3, 0, 0, 2]
    assert m["acc7"] == pytest.approx(5 / 8)
    # 5 classes: pred -> [-1, 1, 1, -2, 2, 0, 0, 2], target -> [-1, 0, 2, -2, 2, 0, 0, 2]
    assert m["acc5"] == pytest.approx(6 / 8)
    assert m["mae"] == pytest.approx(3.3 / 8, abs=1e-12)
    assert m["corr"] == pytest.approx(scipy_stats.pearsonr(PRED, TARGET)[0], abs=1e-12)
    assert set(m) >= {"acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7", "mae", "corr"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regression_against_sklearn_and_scipy(seed):
    rng = np.random.default_rng(seed)
    n = 200
    target = np.round(rng.uniform(-3, 3, n) * 3) / 3  # MOSI-like thirds, many exact zeros
    target[:20] = 0.0
    pred = target + rng.normal(0, 1.0, n)
    pred[20:25] = 0.0  # predictions exactly 0 count as non-negative (has-0) and non-positive (non-0)
    m = M.regression_metrics(pred, target)

    acc, f1 = sklearn_metrics.accuracy_score, sklearn_metrics.f1_score
    assert m["acc2_has0"] == pytest.approx(acc(target >= 0, pred >= 0), abs=1e-12)
    assert m["f1_has0"] == pytest.approx(f1(target >= 0, pred >= 0, average="weighted"), abs=1e-12)
    keep = target != 0
    assert m["acc2_non0"] == pytest.approx(acc(target[keep] > 0, pred[keep] > 0), abs=1e-12)
    assert m["f1_non0"] == pytest.approx(
        f1(target[keep] > 0, pred[keep] > 0, average="weighted"), abs=1e-12
    )
    for key, bound in (("acc7", 3), ("acc5", 2)):
        expected = acc(sentiment_classes(target, bound), sentiment_classes(pred, bound))
        assert m[key] == pytest.approx(expected, abs=1e-12)
    assert m["mae"] == pytest.approx(np.mean(np.abs(pred - target)), abs=1e-12)
    assert m["corr"] == pytest.approx(scipy_stats.pearsonr(pred, target)[0], abs=1e-12)


def test_regression_halves_round_away_from_zero_and_clip():
    # 0.5 -> +1, -0.5 -> -1, 2.5 -> +3, -1.5 -> -2; beyond +-3 clips to the end classes
    pred = np.array([0.5, -0.5, 2.5, -1.5, 7.0, -10.0])
    target = np.array([1.0, -1.0, 3.0, -2.0, 3.0, -3.0])
    m = M.regression_metrics(pred, target)
    assert m["acc7"] == 1.0
    # Acc-5 clips at +-2: 2.5 and 3 both become +2, 7 and 3 too, -10 and -3 become -2
    assert m["acc5"] == 1.0
    # a half-to-even rule (np.round) would put 0.5 in class 0 and miss the first sample
    assert M.regression_metrics([0.5], [0.0])["acc7"] == 0.0
    assert M.regression_metrics([0.49], [0.0])["acc7"] == 1.0


def test_regression_zero_targets_excluded_from_non0():
    # samples with target 0 would all be wrong under "pred > 0 vs target > 0"; non-0 drops them
    pred = np.array([-0.5, 1.0, 1.0, -1.0])
    target = np.array([0.0, 0.0, 2.0, -2.0])
    m = M.regression_metrics(pred, target)
    assert m["acc2_non0"] == 1.0 and m["f1_non0"] == 1.0 and m["n_non0"] == 2
    assert m["acc2_has0"] == pytest.approx(3 / 4)  # has-0 keeps them: -0.5 vs 0 is wrong
    all_zero = M.regression_metrics(np.array([0.3, -0.2]), np.zeros(2))
    assert math.isnan(all_zero["acc2_non0"]) and math.isnan(all_zero["f1_non0"])
    assert all_zero["acc2_has0"] == 0.5


def test_regression_accepts_tensors_and_column_vectors():
    ref = M.regression_metrics(PRED, TARGET)
    got = M.regression_metrics(
        torch.tensor(PRED, dtype=torch.float64).unsqueeze(1).requires_grad_(), torch.tensor(TARGET)
    )
    assert got == ref
    got32 = M.regression_metrics(torch.tensor(PRED, dtype=torch.float32), list(TARGET))
    assert got32["acc7"] == ref["acc7"] and got32["mae"] == pytest.approx(ref["mae"], abs=1e-6)


def test_corr_constant_side_is_nan_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = M.regression_metrics(np.full(5, 0.1), np.array([0.0, 1.0, -1.0, 2.0, 0.5]))
        assert math.isnan(m["corr"])
        assert math.isnan(M.pearson_corr(np.array([1.0, 2.0]), np.array([3.0, 3.0])))
        assert math.isnan(M.regression_metrics([1.0], [2.0])["corr"])  # N = 1
    # perfectly (anti-)correlated
    assert M.pearson_corr(np.arange(5.0), 2 * np.arange(5.0) + 1) == pytest.approx(1.0, abs=1e-15)
    assert M.pearson_corr(np.arange(5.0), -np.arange(5.0)) == pytest.approx(-1.0, abs=1e-15)


@pytest.mark.parametrize(
    "pred, target, match",
    [
        (np.zeros(3), np.zeros(4), "different shapes"),
        (np.zeros(0), np.zeros(0), "empty"),
        (np.array([0.1, np.nan]), np.zeros(2), "NaN"),
        (np.array([0.1, np.inf]), np.zeros(2), "inf"),
        (np.zeros(2), np.array([0.0, np.nan]), "target: contains non-finite"),
        (np.zeros((3, 2)), np.zeros(3), r"expected shape \(N,\) or \(N, 1\), got \(3, 2\)"),
    ],
)
def test_regression_errors(pred, target, match):
    with pytest.raises(ValueError, match=match):
        M.regression_metrics(pred, target)


# --------------------------------------------------------------------------------------------------
# classification


def test_classification_hand_computed():
    pred = np.array([0, 1, 1, 2])
    target = np.array([0, 1, 2, 2])
    m = M.classification_metrics(pred, target)
    # per-class F1: class 0 -> 1, class 1 (tp 1, fp 1) -> 2/3, class 2 (tp 1, fn 1) -> 2/3
    assert m["acc"] == 0.75
    assert m["f1_macro"] == pytest.approx(7 / 9, abs=1e-12)
    assert m["f1_weighted"] == pytest.approx((1 + 2 / 3 + 2 * 2 / 3) / 4, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_classification_against_sklearn(seed):
    rng = np.random.default_rng(seed)
    k, n = 10, 300
    target = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), target] += 1.5
    ids = logits.argmax(1)
    m = M.classification_metrics(torch.tensor(logits, dtype=torch.float32), target, num_classes=k)
    assert m == M.classification_metrics(ids, torch.tensor(target))
    assert m["acc"] == pytest.approx(sklearn_metrics.accuracy_score(target, ids), abs=1e-12)
    for avg in ("macro", "weighted"):
        ref = sklearn_metrics.f1_score(target, ids, average=avg)
        assert m[f"f1_{avg}"] == pytest.approx(ref, abs=1e-12)


def test_classification_label_set_matches_sklearn():
    # class 3 only predicted, class 1 only in the target: both count in macro F1 as in scikit-learn
    pred, target = np.array([0, 3, 0, 2]), np.array([0, 1, 0, 2])
    m = M.classification_metrics(pred, target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for avg in ("macro", "weighted"):
            ref = sklearn_metrics.f1_score(target, pred, average=avg)
            assert m[f"f1_{avg}"] == pytest.approx(ref, abs=1e-12)
    assert m["f1_macro"] == pytest.approx(0.5)  # (1 + 0 + 1 + 0) / 4


def test_classification_float_ids_and_errors():
    assert M.classification_metrics(np.array([1.0, 0.0]), [1, 0])["acc"] == 1.0
    with pytest.raises(ValueError, match="non-integral"):
        M.classification_metrics(np.array([0.2, 0.9]), [1, 0])
    with pytest.raises(ValueError, match=r"logits of shape \(N, 3\), got \(2, 4\)"):
        M.classification_metrics(np.zeros((2, 4)), [1, 0], num_classes=3)
    with pytest.raises(ValueError, match="out of range"):
        M.classification_metrics([0, 5], [1, 0], num_classes=3)
    with pytest.raises(ValueError, match=">= 0"):
        M.classification_metrics([0, -1], [1, 0])
    with pytest.raises(ValueError, match="NaN"):
        M.classification_metrics(np.array([[0.0, np.nan], [1.0, 0.0]]), [1, 0])
    with pytest.raises(ValueError, match="different numbers of samples"):
        M.classification_metrics([0, 1, 1], [1, 0])
    with pytest.raises(ValueError, match="empty"):
        M.classification_metrics([], [])


# --------------------------------------------------------------------------------------------------
# Fréchet distance


def _random_orthogonal(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def test_frechet_from_moments_diagonal_and_commuting():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    # for commuting covariances the trace term is sum sqrt(a_i b_i), so d^2 = |dmu|^2 + |sqrt a - sqrt b|^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = M.frechet_distance_from_moments(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)
    q = _random_orthogonal(rng, d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    assert M.frechet_distance_from_moments(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert M.frechet_distance_from_moments([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)


def test_frechet_from_moments_general_against_scipy_sqrtm():
    rng = np.random.default_rng(1)
    d = 5
    x1, x2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = x1 @ x1.T + 0.5 * np.eye(d), x2 @ x2.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    got = M.frechet_distance_from_moments(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=1e-9)
    assert got == pytest.approx(M.frechet_distance_from_moments(mu2, s2, mu1, s1), rel=1e-10)
    assert M.frechet_distance_from_moments(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-10)


def test_frechet_singular_covariance_is_fine():
    # rank-1 covariances on different axes: sqrt terms are orthogonal, cross term 0
    s1, s2 = np.diag([2.0, 0.0]), np.diag([0.0, 3.0])
    got = M.frechet_distance_from_moments(np.zeros(2), s1, np.zeros(2), s2)
    assert got == pytest.approx(5.0, rel=1e-12)
    with pytest.raises(ValueError, match="not symmetric"):
        M.frechet_distance_from_moments(np.zeros(2), [[1.0, 0.5], [0.0, 1.0]], np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        M.frechet_distance_from_moments(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


def test_frechet_samples_equal_moments_on_both_paths():
    rng = np.random.default_rng(2)
    # D^2 <= n1 n2: covariance path
    x, y = rng.normal(size=(50, 4)), rng.normal(1.0, 2.0, size=(40, 4))
    ref = M.frechet_distance_from_moments(x.mean(0), np.cov(x.T), y.mean(0), np.cov(y.T))
    assert M.frechet_distance(x, y) == pytest.approx(ref, rel=1e-12)
    # D^2 > n1 n2: Gram path (nuclear norm of an n1 x n2 matrix), same value
    x, y = rng.normal(size=(9, 30)), rng.normal(0.5, 1.5, size=(12, 30))
    ref = M.frechet_distance_from_moments(x.mean(0), np.cov(x.T), y.mean(0), np.cov(y.T))
    assert M.frechet_distance(x, y) == pytest.approx(ref, rel=1e-10)
    assert M.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-10)


def test_frechet_large_samples_converge_to_closed_form():
    rng = np.random.default_rng(3)
    n = 20000
    mu1, mu2 = np.array([0.0, 0.0, 0.0]), np.array([1.0, -0.5, 0.0])
    s1, s2 = np.diag([1.0, 2.0, 0.5]), np.diag([2.0, 1.0, 0.5])
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    expected = 1.25 + 2 * (math.sqrt(2) - 1) ** 2  # |dmu|^2 + sum (sqrt a - sqrt b)^2
    assert M.frechet_distance(x, y) == pytest.approx(expected, abs=0.05)


def test_frechet_reduce_and_tensors():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(20, 3, 5)), rng.normal(size=(25, 3, 5)) + 0.3
    flat = M.frechet_distance(torch.tensor(x), torch.tensor(y))
    assert flat == pytest.approx(M.frechet_distance(x.reshape(20, 15), y.reshape(25, 15)), rel=1e-12)
    pooled = M.frechet_distance(x, y, reduce="mean_time")
    assert pooled == pytest.approx(M.frechet_distance(x.mean(2), y.mean(2)), rel=1e-12)
    with pytest.raises(ValueError, match="reduce must be"):
        M.frechet_distance(x, y, reduce="max")
    with pytest.raises(ValueError, match="different feature sizes: 15 vs 10"):
        M.frechet_distance(x, y[:, :2])
    with pytest.raises(ValueError, match="at least 2 samples"):
        M.frechet_distance(x[:1], y)
    with pytest.raises(ValueError, match="non-finite"):
        M.frechet_distance(np.full((3, 2), np.inf), y[:, :, 0][:, :2])


# --------------------------------------------------------------------------------------------------
# MMD


def _mmd_loops(x, y, sigma, unbiased):
    """Reference: the definition, term by term."""
    k = lambda a, b: math.exp(-np.sum((a - b) ** 2) / (2 * sigma**2))  # noqa: E731
    n, m = len(x), len(y)
    pairs = lambda s, t, same: [  # noqa: E731
        k(s[i], t[j]) for i in range(len(s)) for j in range(len(t)) if not (same and unbiased and i == j)
    ]
    return np.mean(pairs(x, x, True)) + np.mean(pairs(y, y, True)) - 2 * np.mean(pairs(x, y, False))


def test_mmd_hand_computed():
    x, y = np.array([[0.0], [1.0]]), np.array([[0.0], [2.0]])
    e = math.exp
    unbiased = e(-0.5) + e(-2.0) - 2 * (1 + e(-2.0) + 2 * e(-0.5)) / 4
    biased = (2 + 2 * e(-0.5)) / 4 + (2 + 2 * e(-2.0)) / 4 - 2 * (1 + e(-2.0) + 2 * e(-0.5)) / 4
    assert M.mmd_rbf(x, y, bandwidth=1.0) == pytest.approx(unbiased, abs=1e-14)
    assert M.mmd_rbf(x, y, bandwidth=1.0, unbiased=False) == pytest.approx(biased, abs=1e-14)
    # pooled distances: 1, 0, 2, 1, 1, 2 -> median 1, so the default equals bandwidth 1
    assert M.median_bandwidth(x, y) == 1.0
    assert M.mmd_rbf(x, y) == pytest.approx(unbiased, abs=1e-14)


@pytest.mark.parametrize("unbiased", [True, False])
def test_mmd_matches_definition(unbiased):
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(7, 3)), rng.normal(0.5, 1.0, size=(5, 3))
    sigma = M.median_bandwidth(x, y)
    z = np.concatenate([x, y])
    dists = [np.linalg.norm(z[i] - z[j]) for i in range(12) for j in range(i + 1, 12)]
    assert sigma == pytest.approx(np.median(dists), rel=1e-12)
    got = M.mmd_rbf(x, y, unbiased=unbiased)
    assert got == pytest.approx(_mmd_loops(x, y, sigma, unbiased), abs=1e-12)


def test_mmd_same_distribution_near_zero_shift_larger():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    same = M.mmd_rbf(x, y)
    small = M.mmd_rbf(x, y + 0.5)
    large = M.mmd_rbf(x, y + 2.0)
    assert abs(same) < 0.01
    assert small > 0.05 and large > small
    assert M.mmd_rbf(x, y, unbiased=False) > same  # the V-statistic is biased upwards
    assert M.mmd_rbf(torch.tensor(x).reshape(300, 2, 2), y.reshape(300, 2, 2)) == pytest.approx(same)


def test_mmd_degenerate_and_errors():
    z = np.zeros((4, 2))
    assert M.mmd_rbf(z, z) == pytest.approx(0.0, abs=1e-15)  # all points coincide: bandwidth 1
    with pytest.raises(ValueError, match="bandwidth must be"):
        M.mmd_rbf(z, z, bandwidth=0.0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        M.mmd_rbf(z[:1], z)
    assert M.mmd_rbf(z[:1], z + 1, unbiased=False, bandwidth=1.0) > 0


# --------------------------------------------------------------------------------------------------
# per class


def test_per_class_values_and_too_few_samples():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(30, 2, 3)), rng.normal(size=(20, 2, 3))
    lx = np.array([0] * 10 + [1] * 19 + [2])  # class 2 has one sample in x
    ly = np.array([0] * 8 + [1] * 10 + [3] * 2)  # class 3 absent in x
    with pytest.warns(RuntimeWarning, match=r"class 2 \(x: 1, y: 0\), 3 \(x: 0, y: 2\)"):
        fd = M.frechet_per_class(x, y, lx, ly, reduce="mean_time")
    assert list(fd) == [0, 1, 2, 3]
    assert math.isnan(fd[2]) and math.isnan(fd[3])
    assert fd[0] == pytest.approx(M.frechet_distance(x[:10], y[:8], reduce="mean_time"), rel=1e-12)
    assert fd[1] == pytest.approx(M.frechet_distance(x[10:29], y[8:18], reduce="mean_time"), rel=1e-12)
    with pytest.warns(RuntimeWarning):
        mm = M.mmd_per_class(torch.tensor(x), y, torch.tensor(lx), ly, bandwidth=2.0)
    assert mm[1] == pytest.approx(M.mmd_rbf(x[10:29], y[8:18], bandwidth=2.0), abs=1e-14)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generic = M.per_class(M.mmd_rbf, x[:29], y[:18], lx[:29], ly[:18], unbiased=False)
    assert generic[0] == pytest.approx(M.mmd_rbf(x[:10], y[:8], unbiased=False), abs=1e-14)
    with pytest.raises(ValueError, match="x has 30 samples but labels_x has 29"):
        M.frechet_per_class(x, y, lx[:29], ly)


# --------------------------------------------------------------------------------------------------
# summaries


def test_summarise_and_format():
    mean, std = M.summarise([0.80, 0.82, 0.84])
    assert mean == pytest.approx(0.82, abs=1e-15)
    assert std == pytest.approx(0.02, abs=1e-15)  # ddof = 1: sqrt((0.02^2 + 0 + 0.02^2) / 2)
    assert std == pytest.approx(np.std([0.80, 0.82, 0.84], ddof=1), abs=1e-15)
    assert M.format_mean_std(mean, std) == "82.0 ± 2.0"
    assert M.format_mean_std(0.8314, 0.0042) == "83.1 ± 0.4"
    assert M.format_mean_std(0.71234, 0.0151, scale=1, digits=3) == "0.712 ± 0.015"
    one = M.summarise(torch.tensor([0.5]))
    assert one[0] == 0.5 and math.isnan(one[1])
    assert M.format_mean_std(*one) == "50.0"
    assert math.isnan(M.summarise([0.5, math.nan])[0])
    with pytest.raises(ValueError, match="empty"):
        M.summarise([])
    with pytest.raises(ValueError, match="1-D"):
        M.summarise(np.zeros((2, 2)))
