"""Task metrics and distribution distances: the one metrics module every report uses.

Everything here is plain numpy in float64 (no scikit-learn or scipy at run time); inputs may be
numpy arrays, Python sequences or torch tensors (detached and moved to the CPU).

Task metrics
    :func:`regression_metrics` reports what MOSI/MOSEI papers report (the MMSA ``metricsTop``
    convention): Acc-2 and weighted F1 "has-0" and "non-0", Acc-5, Acc-7, MAE and Pearson
    correlation. :func:`classification_metrics` gives accuracy, macro F1 and weighted F1.

Distribution consistency of recovered features against real ones
    :func:`frechet_distance` (closed form between Gaussians fitted to the two samples),
    :func:`mmd_rbf` (squared maximum mean discrepancy with a Gaussian kernel and the median
    heuristic), and :func:`per_class` / :func:`frechet_per_class` / :func:`mmd_per_class`.

Summaries over seeds
    :func:`summarise` (mean and sample standard deviation) and :func:`format_mean_std`.

Example::

    >>> m = regression_metrics(np.array([0.4, -1.2, 2.6]), np.array([0.0, -1.0, 3.0]))
    >>> m["acc7"], m["acc2_non0"]
    (1.0, 1.0)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from flowtransfer.labels import sentiment_classes

__all__ = [
    "regression_metrics",
    "classification_metrics",
    "accuracy",
    "f1_score",
    "pearson_corr",
    "frechet_distance",
    "frechet_distance_from_moments",
    "mmd_rbf",
    "median_bandwidth",
    "per_class",
    "frechet_per_class",
    "mmd_per_class",
    "summarise",
    "format_mean_std",
]

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]


# --------------------------------------------------------------------------------------------------
# input handling


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Any array-like (torch tensors included) as a numpy array, without copying when possible."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bool:
            return x.numpy()
        if x.is_floating_point():
            return x.to(torch.float64).numpy()
        return x.numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name}: cannot be read as an array ({exc})") from exc


def _vector(x: Any, name: str) -> np.ndarray:
    """A float64 vector from shape ``(N,)`` or ``(N, 1)``; rejects other ranks, empty, NaN, inf."""
    a = _to_numpy(x, name)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ValueError(f"{name}: expected shape (N,) or (N, 1), got {tuple(a.shape)}")
    if a.size == 0:
        raise ValueError(f"{name}: empty input (N = 0)")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise TypeError(f"{name}: expected numbers, got dtype {a.dtype}")
    a = a.astype(np.float64)
    _check_finite(a, name)
    return a


def _check_finite(a: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(a)):
        n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        raise ValueError(f"{name}: contains non-finite values ({n_nan} NaN, {n_inf} inf)")


def _same_length(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{names[0]} and {names[1]} have different numbers of samples: "
            f"{a.shape[0]} vs {b.shape[0]}"
        )


def _class_ids(x: Any, name: str) -> np.ndarray:
    """An int64 vector of class ids from shape ``(N,)``; floats are accepted only if whole."""
    a = _to_numpy(x, name)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ValueError(f"{name}: expected class ids of shape (N,), got {tuple(a.shape)}")
    if a.size == 0:
        raise ValueError(f"{name}: empty input (N = 0)")
    if np.issubdtype(a.dtype, np.floating):
        _check_finite(a, name)
        if not np.all(a == np.round(a)):
            raise ValueError(
                f"{name}: expected integer class ids, got non-integral floats "
                f"(pass logits of shape (N, K) to have them arg-maxed)"
            )
    elif not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise TypeError(f"{name}: expected integer class ids, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if np.any(a < 0):
        raise ValueError(f"{name}: class ids must be >= 0, got minimum {int(a.min())}")
    return a


# --------------------------------------------------------------------------------------------------
# elementary scores


def accuracy(pred: ArrayLike, target: ArrayLike) -> float:
    """Fraction of positions where ``pred == target`` (both ``(N,)``)."""
    p, t = np.asarray(pred), np.asarray(target)
    _same_length(p, t, ("pred", "target"))
    if p.size == 0:
        raise ValueError("accuracy: empty input (N = 0)")
    return float(np.mean(p == t))


def f1_score(pred: ArrayLike, target: ArrayLike, average: str = "weighted") -> float:
    r"""F1 over the labels that occur in ``target`` or ``pred`` (scikit-learn's default label set).

    Per label :math:`k`, :math:`F_1^k = 2\,TP_k / (2\,TP_k + FP_k + FN_k)`. ``average="macro"`` is
    the plain mean over labels; ``"weighted"`` weights each label by its support in ``target``
    (labels seen only in ``pred`` then count with weight 0). Matches
    ``sklearn.metrics.f1_score(target, pred, average=...)``.
    """
    p, t = np.asarray(pred), np.asarray(target)
    _same_length(p, t, ("pred", "target"))
    if p.size == 0:
        raise ValueError("f1_score: empty input (N = 0)")
    if average not in ("weighted", "macro"):
        raise ValueError(f"f1_score: average must be 'weighted' or 'macro', got {average!r}")
    labels = np.union1d(p, t)
    # one column per label: (N, L) one-hot comparisons, no Python loop over samples
    p_hot = p[:, None] == labels[None, :]
    t_hot = t[:, None] == labels[None, :]
    tp = np.sum(p_hot & t_hot, axis=0).astype(np.float64)
    fp = np.sum(p_hot & ~t_hot, axis=0).astype(np.float64)
    fn = np.sum(~p_hot & t_hot, axis=0).astype(np.float64)
    f1 = 2.0 * tp / (2.0 * tp + fp + fn)  # the denominator is > 0 for every label in the union
    if average == "macro":
        return float(np.mean(f1))
    support = tp + fn
    return float(np.sum(f1 * support) / np.sum(support))


def pearson_corr(pred: ArrayLike, target: ArrayLike) -> float:
    r"""Pearson correlation :math:`\sum \tilde p \tilde t / \sqrt{\sum \tilde p^2 \sum \tilde t^2}`.

    Returns ``nan`` (no exception, no warning) when either side is constant or ``N < 2``: the
    correlation is undefined there. Matches ``scipy.stats.pearsonr(pred, target)[0]`` otherwise.
    """
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    _same_length(p, t, ("pred", "target"))
    if p.size < 2 or np.ptp(p) == 0 or np.ptp(t) == 0:
        return math.nan
    pc, tc = p - p.mean(), t - t.mean()
    # normalise each side first so that the product cannot overflow or underflow
    pc, tc = pc / np.linalg.norm(pc), tc / np.linalg.norm(tc)
    return float(np.clip(np.dot(pc, tc), -1.0, 1.0))


# --------------------------------------------------------------------------------------------------
# task metrics


def regression_metrics(pred: ArrayLike, target: ArrayLike) -> dict[str, float]:
    """MOSI/MOSEI regression metrics of sentiment scores (MMSA ``metricsTop`` convention).

    Args:
        pred: predicted scores, shape ``(N,)`` or ``(N, 1)``.
        target: true scores in ``[-3, 3]``, same shape rules.

    Returns:
        A dict of floats:

        - ``acc2_has0``, ``f1_has0``: negative (``< 0``) vs non-negative (``>= 0``), applied to
          both ``pred`` and ``target``; F1 is the support-weighted F1 of the two classes.
        - ``acc2_non0``, ``f1_non0``: samples whose target is exactly 0 are dropped; then
          ``pred > 0`` vs ``target > 0``. Both are ``nan`` if every target is 0.
        - ``acc5``, ``acc7``: accuracy of :func:`flowtransfer.labels.sentiment_classes` with
          ``bound=2`` / ``bound=3`` applied to both sides (round halves away from zero, then clip
          to ``[-bound, bound]``: 0.5 -> 1, -2.5 -> -3, 4.2 -> 3).
        - ``mae``: mean absolute error; ``corr``: Pearson correlation (``nan`` if a side is
          constant or ``N < 2``, see :func:`pearson_corr`).
        - ``n``: number of samples; ``n_non0``: number with a non-zero target.

    Raises:
        ValueError: shape mismatch, empty input, or NaN/inf in either argument.
    """
    p = _vector(pred, "pred")
    t = _vector(target, "target")
    if p.shape != t.shape:
        raise ValueError(
            f"pred and target have different shapes: {p.shape[0]} vs {t.shape[0]} samples"
        )

    neg_p, neg_t = p < 0, t < 0
    non0 = t != 0
    if np.any(non0):
        pos_p, pos_t = p[non0] > 0, t[non0] > 0
        acc2_non0, f1_non0 = accuracy(pos_p, pos_t), f1_score(pos_p, pos_t)
    else:
        acc2_non0 = f1_non0 = math.nan

    return {
        "acc2_has0": accuracy(neg_p, neg_t),
        "f1_has0": f1_score(neg_p, neg_t),
        "acc2_non0": acc2_non0,
        "f1_non0": f1_non0,
        "acc5": accuracy(sentiment_classes(p, bound=2), sentiment_classes(t, bound=2)),
        "acc7": accuracy(sentiment_classes(p, bound=3), sentiment_classes(t, bound=3)),
        "mae": float(np.mean(np.abs(p - t))),
        "corr": pearson_corr(p, t),
        "n": float(p.shape[0]),
        "n_non0": float(np.sum(non0)),
    }


def classification_metrics(
    pred: ArrayLike, target: ArrayLike, num_classes: int | None = None
) -> dict[str, float]:
    """Accuracy, macro F1 and weighted F1 of a classifier.

    Args:
        pred: logits or probabilities ``(N, K)`` (arg-maxed; ties go to the lowest index), or
            class ids ``(N,)`` (integers, or floats with whole values).
        target: class ids ``(N,)``.
        num_classes: if given, logits must have ``K == num_classes`` and every id must lie in
            ``[0, num_classes)``. It does not change the label set of the F1 averages, which is
            the labels occurring in ``target`` or in the predictions (scikit-learn's default).

    Returns:
        ``{"acc", "f1_macro", "f1_weighted", "n"}`` as floats.
    """
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    t = _class_ids(target, "target")
    raw = _to_numpy(pred, "pred")
    if raw.ndim == 2 and raw.shape[1] > 1:
        if not np.issubdtype(raw.dtype, np.number):
            raise TypeError(f"pred: expected numeric logits, got dtype {raw.dtype}")
        _check_finite(raw.astype(np.float64), "pred")
        if num_classes is not None and raw.shape[1] != num_classes:
            raise ValueError(
                f"pred: expected logits of shape (N, {num_classes}), got {tuple(raw.shape)}"
            )
        if raw.shape[0] == 0:
            raise ValueError("pred: empty input (N = 0)")
        p = np.argmax(raw, axis=1).astype(np.int64)
    else:
        p = _class_ids(raw, "pred")
    _same_length(p, t, ("pred", "target"))
    if num_classes is not None:
        for a, name in ((p, "pred"), (t, "target")):
            if a.max() >= num_classes:
                raise ValueError(
                    f"{name}: class id {int(a.max())} out of range for num_classes={num_classes}"
                )
    return {
        "acc": accuracy(p, t),
        "f1_macro": f1_score(p, t, average="macro"),
        "f1_weighted": f1_score(p, t, average="weighted"),
        "n": float(p.shape[0]),
    }


# --------------------------------------------------------------------------------------------------
# distribution distances


def _features(x: Any, name: str, reduce: str) -> np.ndarray:
    """``(N, D)`` float64 from ``(N, D)`` or ``(N, C, T)`` (flattened or averaged over time)."""
    a = _to_numpy(x, name)
    if not np.issubdtype(a.dtype, np.number):
        raise TypeError(f"{name}: expected numeric features, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if a.ndim == 3:
        if reduce == "flatten":
            a = a.reshape(a.shape[0], -1)
        elif reduce == "mean_time":
            a = a.mean(axis=2)
        else:
            raise ValueError(f"reduce must be 'flatten' or 'mean_time', got {reduce!r}")
    elif a.ndim != 2:
        raise ValueError(
            f"{name}: expected features of shape (N, D) or (N, C, T), got {tuple(a.shape)}"
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name}: empty features, shape {tuple(a.shape)}")
    _check_finite(a, name)
    return a


def _pair(x: Any, y: Any, reduce: str, min_n: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = _features(x, "x", reduce), _features(y, "y", reduce)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x and y have different feature sizes: {a.shape[1]} vs {b.shape[1]}")
    for arr, name in ((a, "x"), (b, "y")):
        if arr.shape[0] < min_n:
            raise ValueError(f"{name}: needs at least {min_n} samples, got {arr.shape[0]}")
    return a, b


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix by eigen-decomposition.

    Eigenvalues below ``D * eps * max|eigenvalue|`` are round-off of a singular matrix (their
    square roots would be noise of order ``sqrt(eps)``) and are set to zero.
    """
    w, v = np.linalg.eigh(s)
    tol = s.shape[0] * np.finfo(np.float64).eps * max(float(np.max(np.abs(w))), 0.0)
    w = np.where(w > tol, w, 0.0)
    return (v * np.sqrt(w)) @ v.T


def _square_moment(s: Any, name: str, d: int) -> np.ndarray:
    a = np.asarray(_to_numpy(s, name), dtype=np.float64)
    if a.shape != (d, d):
        raise ValueError(f"{name}: expected a covariance of shape ({d}, {d}), got {tuple(a.shape)}")
    _check_finite(a, name)
    scale = max(float(np.max(np.abs(a))), 1e-300)
    if np.max(np.abs(a - a.T)) > 1e-8 * scale:
        raise ValueError(f"{name}: covariance is not symmetric")
    return 0.5 * (a + a.T)


def frechet_distance_from_moments(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike
) -> float:
    r"""Fréchet distance (squared 2-Wasserstein) of two Gaussians :math:`N(\mu_i,\Sigma_i)`.

    .. math::
        d^2 = \lVert\mu_1-\mu_2\rVert^2 + \operatorname{tr}\Sigma_1 + \operatorname{tr}\Sigma_2
              - 2\operatorname{tr}\big(\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2}\big)^{1/2}

    Computed stably in float64: :math:`\Sigma_i^{1/2}` by symmetric eigen-decomposition (round-off
    eigenvalues, below ``D * eps`` times the largest, set to 0), and the last trace as the nuclear
    norm (sum of singular values) of :math:`P = \Sigma_1^{1/2}\Sigma_2^{1/2}`, since
    :math:`P P^\top = \Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2}`.
    No complex parts appear, and singular covariances are fine. The result is clipped at 0.

    Args:
        mu1, mu2: means ``(D,)``; sigma1, sigma2: symmetric PSD covariances ``(D, D)``.
    """
    m1 = np.atleast_1d(np.asarray(_to_numpy(mu1, "mu1"), dtype=np.float64))
    m2 = np.atleast_1d(np.asarray(_to_numpy(mu2, "mu2"), dtype=np.float64))
    if m1.ndim != 1 or m1.shape != m2.shape:
        raise ValueError(
            f"mu1 and mu2: expected two vectors of one size, got {m1.shape} and {m2.shape}"
        )
    _check_finite(m1, "mu1")
    _check_finite(m2, "mu2")
    d = m1.shape[0]
    s1, s2 = _square_moment(sigma1, "sigma1", d), _square_moment(sigma2, "sigma2", d)
    cross = np.linalg.svd(_psd_sqrt(s1) @ _psd_sqrt(s2), compute_uv=False).sum()
    diff = m1 - m2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * cross
    return float(max(value, 0.0))


def frechet_distance(x: ArrayLike, y: ArrayLike, reduce: str = "flatten") -> float:
    r"""Fréchet distance between Gaussians fitted to two samples (the FID formula on features).

    Means and unbiased covariances (``ddof=1``) of ``x`` and ``y`` go into
    :func:`frechet_distance_from_moments`. When :math:`D^2 > n_1 n_2` (features wider than the
    samples are many), the same value is computed without forming ``D x D`` matrices: with
    centred samples :math:`A = X_c/\sqrt{n_1-1}` and :math:`B = Y_c/\sqrt{n_2-1}`, one has
    :math:`\Sigma_1 = A^\top A`, :math:`\Sigma_2 = B^\top B` and
    :math:`\operatorname{tr}(\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2})^{1/2} = \lVert A B^\top\rVert_*`,
    the nuclear norm of an :math:`n_1\times n_2` matrix.

    Args:
        x, y: features ``(N, D)``, or ``(N, C, T)`` reduced per ``reduce``: ``"flatten"``
            (``D = C*T``, the distribution of whole sequences; the default) or ``"mean_time"``
            (``D = C``, averaged over time; steadier when ``N`` is small against ``C*T``).
            The sample sizes may differ; each needs at least 2 samples.

    Returns:
        The squared distance (>= 0), in the squared units of the features.

    Note:
        Like FID, the plug-in estimate is biased upwards when ``N`` is not large against ``D``
        (two independent samples of 700 from one standard normal in ``D = 1600`` score about
        1500, in ``D = 32`` about 0.02). Compare methods at equal sample sizes and one ``reduce``.
    """
    a, b = _pair(x, y, reduce, min_n=2)
    n1, n2, d = a.shape[0], b.shape[0], a.shape[1]
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    ac, bc = a - mu1, b - mu2
    if d * d <= n1 * n2:  # the smaller of the D x D and n1 x n2 problems
        s1 = ac.T @ ac / (n1 - 1)
        s2 = bc.T @ bc / (n2 - 1)
        return frechet_distance_from_moments(mu1, s1, mu2, s2)
    ac /= math.sqrt(n1 - 1)
    bc /= math.sqrt(n2 - 1)
    cross = np.linalg.svd(ac @ bc.T, compute_uv=False).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.sum(ac * ac) + np.sum(bc * bc) - 2.0 * cross
    return float(max(value, 0.0))


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances ``(len(a), len(b))``, clipped at 0."""
    d = np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :] - 2.0 * (a @ b.T)
    return np.clip(d, 0.0, None)


def median_bandwidth(x: ArrayLike, y: ArrayLike, reduce: str = "flatten") -> float:
    """Median heuristic: the median Euclidean distance over distinct pairs of the pooled sample.

    If that median is 0 (over half the pooled points coincide), the mean of the non-zero
    distances is used; if every point coincides, 1.0 (any bandwidth then gives MMD 0).
    """
    a, b = _pair(x, y, reduce, min_n=1)
    return _median_bandwidth(np.concatenate([a, b]))


def _median_bandwidth(z: np.ndarray) -> float:
    iu = np.triu_indices(z.shape[0], k=1)
    dist = np.sqrt(_sq_dists(z, z)[iu])
    if dist.size == 0:
        return 1.0
    med = float(np.median(dist))
    if med > 0:
        return med
    nonzero = dist[dist > 0]
    return float(nonzero.mean()) if nonzero.size else 1.0


def mmd_rbf(
    x: ArrayLike,
    y: ArrayLike,
    bandwidth: float | None = None,
    unbiased: bool = True,
    reduce: str = "flatten",
) -> float:
    r"""Squared maximum mean discrepancy with a Gaussian (RBF) kernel.

    Kernel :math:`k(a, b) = \exp(-\lVert a-b\rVert^2 / (2\sigma^2))` with :math:`\sigma` =
    ``bandwidth``, or by default the median heuristic on the pooled sample
    (:func:`median_bandwidth`).

    ``unbiased=True`` (the default) is the U-statistic of Gretton et al. (JMLR 2012, eq. 3):
    means of :math:`k(x_i,x_j)` and :math:`k(y_i,y_j)` over :math:`i\neq j`, minus twice the mean
    of :math:`k(x_i,y_j)` over all pairs. Its expectation is exactly MMD², so it is near 0 for two
    samples of one distribution and can be slightly negative. ``unbiased=False`` is the V-statistic
    (diagonal terms kept), always >= 0 and biased upwards by about :math:`1/n_1 + 1/n_2`.

    Args:
        x, y: ``(N, D)`` or ``(N, C, T)`` (see ``reduce`` in :func:`frechet_distance`); sizes may
            differ; the unbiased form needs at least 2 samples per side.
    """
    a, b = _pair(x, y, reduce, min_n=2 if unbiased else 1)
    if bandwidth is None:
        sigma = _median_bandwidth(np.concatenate([a, b]))
    else:
        sigma = float(bandwidth)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"bandwidth must be a finite positive number, got {bandwidth!r}")
    gamma = 1.0 / (2.0 * sigma * sigma)
    kxx = np.exp(-gamma * _sq_dists(a, a))
    kyy = np.exp(-gamma * _sq_dists(b, b))
    kxy = np.exp(-gamma * _sq_dists(a, b))
    n1, n2 = a.shape[0], b.shape[0]
    if unbiased:
        # the diagonal of k(x, x) is exactly 1 (distance 0): drop it from the sums
        txx = (kxx.sum() - n1) / (n1 * (n1 - 1))
        tyy = (kyy.sum() - n2) / (n2 * (n2 - 1))
    else:
        txx, tyy = kxx.mean(), kyy.mean()
    return float(txx + tyy - 2.0 * kxy.mean())


# --------------------------------------------------------------------------------------------------
# per class


def per_class(
    metric: Callable[..., float],
    x: ArrayLike,
    y: ArrayLike,
    labels_x: ArrayLike,
    labels_y: ArrayLike,
    min_count: int = 2,
    **kwargs: Any,
) -> dict[int, float]:
    """Apply a two-sample ``metric(x_k, y_k, **kwargs)`` to each class ``k`` separately.

    Args:
        metric: e.g. :func:`frechet_distance` or :func:`mmd_rbf`.
        x, y: samples with a leading sample axis (``(N, D)`` or ``(N, C, T)``).
        labels_x, labels_y: integer class ids ``(N_x,)`` and ``(N_y,)``. For sentiment scores pass
            ``flowtransfer.labels.sentiment_classes(scores)``.
        min_count: a class with fewer samples than this on either side gets ``nan`` (not
            computed), and one ``RuntimeWarning`` names every class so skipped.

    Returns:
        ``{class id: value}`` for every class occurring in ``labels_x`` or ``labels_y``, sorted.
    """
    a, b = _to_numpy(x, "x"), _to_numpy(y, "y")
    lx, ly = _class_ids(labels_x, "labels_x"), _class_ids(labels_y, "labels_y")
    for arr, lab, name in ((a, lx, "x"), (b, ly, "y")):
        n = arr.shape[0] if arr.ndim else 0
        if n != lab.shape[0]:
            raise ValueError(f"{name} has {n} samples but labels_{name} has {lab.shape[0]}")
    out: dict[int, float] = {}
    skipped: list[str] = []
    for k in np.union1d(lx, ly).tolist():
        in_x, in_y = lx == k, ly == k
        nx, ny = int(in_x.sum()), int(in_y.sum())
        if nx < min_count or ny < min_count:
            out[int(k)] = math.nan
            skipped.append(f"{k} (x: {nx}, y: {ny})")
        else:
            out[int(k)] = float(metric(a[in_x], b[in_y], **kwargs))
    if skipped:
        warnings.warn(
            f"per_class: fewer than {min_count} samples, set to nan for class "
            + ", ".join(skipped),
            RuntimeWarning,
            stacklevel=2,
        )
    return out


def frechet_per_class(
    x: ArrayLike,
    y: ArrayLike,
    labels_x: ArrayLike,
    labels_y: ArrayLike,
    reduce: str = "flatten",
    min_count: int = 2,
) -> dict[int, float]:
    """:func:`frechet_distance` per class (see :func:`per_class`)."""
    return per_class(frechet_distance, x, y, labels_x, labels_y, min_count=min_count, reduce=reduce)


def mmd_per_class(
    x: ArrayLike,
    y: ArrayLike,
    labels_x: ArrayLike,
    labels_y: ArrayLike,
    bandwidth: float | None = None,
    unbiased: bool = True,
    reduce: str = "flatten",
    min_count: int = 2,
) -> dict[int, float]:
    """:func:`mmd_rbf` per class (see :func:`per_class`); the median heuristic runs per class."""
    return per_class(
        mmd_rbf, x, y, labels_x, labels_y, min_count=min_count,
        bandwidth=bandwidth, unbiased=unbiased, reduce=reduce,
    )


# --------------------------------------------------------------------------------------------------
# summaries over seeds


def summarise(values: ArrayLike) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) of a metric over seeds.

    With one value the standard deviation is ``nan`` (undefined), not 0. NaN values propagate
    (a seed whose metric is undefined makes the summary undefined); they are not dropped.
    """
    v = _to_numpy(values, "values")
    if v.ndim == 2 and v.shape[1] == 1:
        v = v[:, 0]
    if v.ndim != 1:
        raise ValueError(f"values: expected a 1-D sequence, got shape {tuple(v.shape)}")
    if v.size == 0:
        raise ValueError("values: empty, nothing to summarise")
    v = v.astype(np.float64)
    mean = float(np.mean(v))
    std = float(np.std(v, ddof=1)) if v.size > 1 else math.nan
    return mean, std


def format_mean_std(mean: float, std: float, scale: float = 100.0, digits: int = 1) -> str:
    """``"83.1 ± 0.4"``: both numbers multiplied by ``scale`` and shown with ``digits`` decimals.

    Use ``scale=100`` for rates (accuracy, F1), ``scale=1`` for MAE or distances. A ``nan``
    standard deviation (a single seed) is left out: ``"83.1"``.
    """
    m = f"{mean * scale:.{digits}f}"
    if isinstance(std, float) and math.isnan(std):
        return m
    return f"{m} ± {std * scale:.{digits}f}"
