"""Figures (matplotlib): each function returns a ``Figure``; the CLI and the scripts save them as PNG.

- :func:`plot_missing_rate_curves`: score against missing rate for several methods, mean over seeds
  with a band of ± one standard deviation, bounds drawn as horizontal lines.
- :func:`plot_recovery_projection`: real vs recovered vs zero-filled features of one modality in a
  2-D projection (PCA fitted on the real features, or t-SNE from scikit-learn), coloured by class.
- :func:`plot_channel_densities`: per-channel densities of real and recovered features (a grid).
- :func:`plot_latent_space`: each modality's latents against the shared class-conditional prior.
- :func:`plot_frechet_per_class`: per-class Fréchet distances of several fillings, as grouped bars.
- :func:`plot_recovered_images`: recovered images next to real images of the same digit (AV-MNIST).

Helpers that gather what the figures show: :func:`recovered_features` (real, recovered and
zero-filled features of one modality from a trained method) and :func:`sequence_to_image`.

Every function takes numpy arrays or tensors, validates shapes with clear errors, and never reads
data by itself. Example::

    feats = recovered_features(model, test, dst="L")
    fig = plot_recovery_projection(feats["real"], feats["recovered"], feats["labels"],
                                   zero_filled=feats["zero_filled"], modality="L")
    fig.savefig("projection.png", dpi=120, bbox_inches="tight")
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# No ``matplotlib.use`` here: importing this module must not switch a notebook's inline backend
# away; without a display, matplotlib already falls back to the headless Agg backend by itself.
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse

__all__ = [
    "METRIC_LABELS",
    "plot_missing_rate_curves",
    "plot_recovery_projection",
    "plot_channel_densities",
    "plot_latent_space",
    "plot_frechet_per_class",
    "plot_recovered_images",
    "recovered_features",
    "sequence_to_image",
    "project_2d",
]

#: axis labels of the metrics the runs report
METRIC_LABELS: dict[str, str] = {
    "acc": "accuracy (%)",
    "f1_macro": "macro F1 (%)",
    "f1_weighted": "weighted F1 (%)",
    "acc2_non0": "Acc-2, non-0 (%)",
    "f1_non0": "weighted F1, non-0 (%)",
    "acc2_has0": "Acc-2, has-0 (%)",
    "acc7": "Acc-7 (%)",
    "acc5": "Acc-5 (%)",
    "mae": "MAE",
    "corr": "Pearson correlation",
    "fd_recovered": "Fréchet distance, recovered vs real",
}
_PERCENT = {"acc", "f1_macro", "f1_weighted", "acc2_non0", "f1_non0", "acc2_has0", "acc7", "acc5"}


#: setting-name prefix -> x-axis label of the protocols whose settings are one number
RATE_AXES = {
    "mr=": "missing rate (fraction of missing modality slots)",
    "steps=": "fraction of time steps removed inside each modality",
    "cyin_mp=": "probability that a sample is incomplete (CyIN instance level)",
    "cyin_mr=": "missing rate (CyIN dataset level)",
}


def _rate(setting: str, prefix: str = "mr=") -> float | None:
    if not setting.startswith(prefix) or "@" in setting:
        return None
    return float(setting[len(prefix):])


def _rate_prefix(rows: Sequence[Mapping[str, Any]]) -> str:
    """The protocol prefix most of ``rows``' settings share (``mr=`` by default)."""
    counts = {p: sum(str(r["setting"]).startswith(p) for r in rows) for p in RATE_AXES}
    best = max(counts, key=counts.get)
    return best if counts[best] else "mr="


def plot_missing_rate_curves(
    rows: Sequence[Mapping[str, Any]],
    metric: str,
    title: str | None = None,
    ax: plt.Axes | None = None,
) -> Figure:
    """Score against missing rate, one line per method (mean over seeds, band = ± 1 std).

    Args:
        rows: result rows (``method``, ``setting`` such as ``"mr=0.3"``, ``seed``, metric columns);
            runs under another one-number protocol (``steps=0.3``, ``cyin_mp=0.5``, ``cyin_mr=0.3``)
            are drawn against that number (:data:`RATE_AXES`).
            Methods evaluated only on complete data (``setting == "complete"``) are drawn as dashed
            horizontal lines.
        metric: the column to plot (rates are shown in percent).
    """
    scale = 100.0 if metric in _PERCENT else 1.0
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
    else:
        fig = ax.figure
    methods = list(dict.fromkeys(r["method"] for r in rows))
    prefix = _rate_prefix(rows)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(methods):
        colour = colours[i % len(colours)]
        mine = [r for r in rows if r["method"] == name and metric in r and r[metric] is not None]
        curve: dict[float, list[float]] = {}
        for r in mine:
            rate = _rate(r["setting"], prefix)
            if rate is not None:
                curve.setdefault(rate, []).append(float(r[metric]) * scale)
        if curve:
            xs = np.array(sorted(curve))
            mean = np.array([np.mean(curve[x]) for x in xs])
            std = np.array([np.std(curve[x], ddof=1) if len(curve[x]) > 1 else 0.0 for x in xs])
            n = max(len(v) for v in curve.values())
            ax.plot(xs, mean, marker="o", color=colour, label=f"{name} (n={n} seeds)")
            ax.fill_between(xs, mean - std, mean + std, color=colour, alpha=0.2, linewidth=0)
            continue
        complete = [float(r[metric]) * scale for r in mine if r["setting"] == "complete"]
        if complete:
            ax.axhline(np.mean(complete), color=colour, linestyle="--",
                       label=f"{name}, complete data (n={len(complete)} seeds)")
    ax.set_xlabel(RATE_AXES[prefix])
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # settings of other protocols give no curve to label
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# shared helpers

ArrayLike = Any

#: colour of the real features drawn as a reference behind other panels
_REFERENCE_GREY = "0.75"


def _numpy(x: ArrayLike, name: str) -> np.ndarray:
    """Float64 numpy copy of an array or tensor; raises on non-finite values."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf (select the rows that exist before plotting)")
    return a


def _labels(y: ArrayLike | None, n: int, name: str = "labels") -> np.ndarray:
    if y is None:
        return np.zeros(n, dtype=np.int64)
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    a = np.asarray(y)
    if a.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {a.shape}")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ValueError(f"{name} must be integer class ids (round sentiment scores first)")
        a = a.astype(np.int64)
    return a


def _flat(x: np.ndarray, name: str, reduce: str) -> np.ndarray:
    """``(N, D)``, ``(N, C, T)`` -> ``(N, D')``: ``"flatten"`` keeps every (channel, time) value,
    ``"mean_time"`` averages over time."""
    if x.ndim == 2:
        return x
    if x.ndim != 3:
        raise ValueError(f"{name}: expected (N, D) or (N, C, T), got shape {x.shape}")
    if reduce == "flatten":
        return x.reshape(len(x), -1)
    if reduce == "mean_time":
        return x.mean(axis=2)
    raise ValueError(f"unknown reduce {reduce!r}; expected 'flatten' or 'mean_time'")


def _class_colours(classes: Sequence[int]) -> dict[int, Any]:
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    return {c: cmap(i % cmap.N) for i, c in enumerate(classes)}


def _subsample(n: int, max_points: int | None, seed: int) -> np.ndarray:
    if max_points is None or n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def project_2d(
    groups: Mapping[str, np.ndarray],
    method: str = "pca",
    reference: str | None = None,
    seed: int = 0,
    labels: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], tuple[str, str]]:
    """Project ``(N_g, D)`` arrays to 2-D; return the projections and the two axis labels.

    ``"pca"``: principal axes of the ``reference`` group (default: the first), applied to every
    group, so that one picture compares all groups in the real features' own coordinates.
    ``"lda"``: the two linear discriminant axes of the ``reference`` group given its class
    ``labels`` (the directions that separate the classes best), applied to every group; needs
    scikit-learn and at least 3 classes.
    ``"tsne"``: one joint t-SNE of all groups (t-SNE cannot embed new points afterwards); needs
    scikit-learn.
    """
    names = list(groups)
    if not names:
        raise ValueError("project_2d needs at least one group")
    widths = {k: v.shape[1] for k, v in groups.items()}
    if len(set(widths.values())) != 1:
        raise ValueError(f"every group must have the same feature width, got {widths}")
    if method == "pca":
        ref = groups[reference or names[0]]
        if len(ref) < 2:
            raise ValueError(f"PCA needs at least 2 reference samples, got {len(ref)}")
        mean = ref.mean(axis=0)
        _, s, vt = np.linalg.svd(ref - mean, full_matrices=False)
        k = min(2, vt.shape[0])
        axes = vt[:k]
        var = s**2 / max(float(np.sum(s**2)), 1e-300)
        out = {}
        for g, x in groups.items():
            p = (x - mean) @ axes.T
            out[g] = p if k == 2 else np.concatenate([p, np.zeros((len(p), 1))], axis=1)
        labels = tuple(f"PC {i + 1} ({100 * var[i]:.0f}% of real variance)" if i < k else f"PC {i + 1}"
                       for i in range(2))
        return out, labels  # type: ignore[return-value]
    if method == "lda":
        try:
            from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
        except ImportError as err:  # pragma: no cover - scikit-learn is a soft dependency
            raise ImportError("method='lda' needs scikit-learn (pip install scikit-learn); use method='pca'") from err
        ref = groups[reference or names[0]]
        if labels is None or len(labels) != len(ref):
            raise ValueError("method='lda' needs one class label per reference sample")
        if len(np.unique(labels)) < 3:
            raise ValueError("method='lda' needs at least 3 classes for two discriminant axes; use method='pca'")
        lda = LinearDiscriminantAnalysis(n_components=2, solver="eigen", shrinkage="auto").fit(ref, labels)
        return {g: lda.transform(x) for g, x in groups.items()}, ("discriminant axis 1", "discriminant axis 2")
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError as err:  # pragma: no cover - scikit-learn is a soft dependency
            raise ImportError("method='tsne' needs scikit-learn (pip install scikit-learn); use method='pca'") from err
        stacked = np.concatenate([groups[g] for g in names])
        perplexity = float(min(30.0, max(2.0, (len(stacked) - 1) / 3)))
        tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed)
        try:  # one thread: OpenMP spinning makes Barnes-Hut t-SNE 10x slower on a busy machine
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - ships with scikit-learn
            emb = tsne.fit_transform(stacked)
        else:
            with threadpool_limits(1):
                emb = tsne.fit_transform(stacked)
        out, start = {}, 0
        for g in names:
            out[g] = emb[start : start + len(groups[g])]
            start += len(groups[g])
        return out, ("t-SNE 1", "t-SNE 2")
    raise ValueError(f"unknown projection {method!r}; expected 'pca', 'lda' or 'tsne'")


# --------------------------------------------------------------------------------------------------
# real vs recovered vs zero-filled


def plot_recovery_projection(
    real: ArrayLike,
    recovered: ArrayLike,
    labels: ArrayLike,
    zero_filled: ArrayLike | None = None,
    *,
    others: Mapping[str, ArrayLike] | None = None,
    method: str = "pca",
    reduce: str = "flatten",
    modality: str | None = None,
    title: str | None = None,
    max_points: int | None = 1500,
    seed: int = 0,
    recovered_name: str = "recovered",
) -> Figure:
    """Real vs recovered (vs zero-filled, vs ``others``) features of one modality in 2-D.

    One panel per group, in the same coordinates: PCA axes fitted on the **real** features, the
    real features' linear discriminant axes (``method="lda"``: the view that separates the classes
    best), or one joint t-SNE (``method="tsne"``). Points are coloured by class; every panel but the
    first repeats the real points in light grey, so a recovery that matches the real
    distribution covers the grey cloud class by class. Zero filling puts every sample on one
    point (the projection of the zero vector).

    Args:
        real, recovered: ``(N, C, T)`` or ``(N, D)`` features of the same samples (rows match
            ``labels``).
        labels: ``(N,)`` integer class ids.
        zero_filled: the zero-filled features, drawn as a third panel (optional).
        others: more named groups of the same shape (e.g. ``{"mean-filled": ...}``).
        method: ``"pca"``, ``"lda"`` or ``"tsne"`` (the last two need scikit-learn).
        reduce: ``"flatten"`` (every channel and time step) or ``"mean_time"``.
        modality: named in the title. max_points: subsample each group to this many points.
        recovered_name: the second panel's name (e.g. ``"sampled"`` for draws from a flow).
    """
    if recovered_name in ("real", "zero-filled"):
        raise ValueError(f"recovered_name {recovered_name!r} is reserved")
    groups_in: dict[str, ArrayLike] = {"real": real, recovered_name: recovered}
    if zero_filled is not None:
        groups_in["zero-filled"] = zero_filled
    for name, value in (others or {}).items():
        if name in groups_in:
            raise ValueError(f"group name {name!r} is already used")
        groups_in[name] = value
    arrays = {g: _numpy(v, g) for g, v in groups_in.items()}
    n = len(arrays["real"])
    for g, a in arrays.items():
        if a.shape != arrays["real"].shape:
            raise ValueError(f"{g}: expected the shape of the real features {arrays['real'].shape}, got {a.shape}")
    y = _labels(labels, n)
    keep = _subsample(n, max_points, seed)
    flat = {g: _flat(a, g, reduce)[keep] for g, a in arrays.items()}
    y = y[keep]
    proj, (xlab, ylab) = project_2d(flat, method=method, reference="real", seed=seed, labels=y)
    classes = sorted(np.unique(y).tolist())
    colours = _class_colours(classes)
    k = len(proj)
    fig, axes = plt.subplots(1, k, figsize=(3.6 * k, 3.7), sharex=True, sharey=True, squeeze=False)
    for ax, (g, p) in zip(axes[0], proj.items()):
        if g != "real":
            ax.scatter(proj["real"][:, 0], proj["real"][:, 1], s=6, color=_REFERENCE_GREY, alpha=0.5,
                       linewidths=0, label="real (all classes)")
        for c in classes:
            sel = y == c
            ax.scatter(p[sel, 0], p[sel, 1], s=8, color=colours[c], alpha=0.75, linewidths=0, label=f"class {c}")
        ax.set_title(g)
        ax.set_xlabel(xlab)
        ax.grid(alpha=0.2)
    axes[0][0].set_ylabel(ylab)
    handles, names = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6), fontsize=8, frameon=False,
               markerscale=2.0, bbox_to_anchor=(0.5, 0.0))
    what = f"modality {modality}: " if modality else ""
    how = {"pca": "PCA of the real features", "lda": "discriminant axes of the real features"}.get(method, "t-SNE")
    fig.suptitle(title or f"{what}real vs {recovered_name} features ({how})", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def plot_channel_densities(
    real: ArrayLike,
    recovered: ArrayLike,
    channels: Sequence[int] | None = None,
    *,
    n_channels: int = 6,
    zero_filled: bool = False,
    others: Mapping[str, ArrayLike] | None = None,
    modality: str | None = None,
    ncols: int = 3,
    title: str | None = None,
    recovered_name: str = "recovered",
) -> Figure:
    """Per-channel densities of real vs recovered features (values pooled over samples and time).

    One panel per channel: the real density filled in grey, the recovered one as a line (Gaussian
    kernel density estimate, Scott's bandwidth); in the corner, in each line's colour, the 1-D
    Wasserstein distance ``W1`` between that group's values and the real ones. ``zero_filled=True`` marks zero filling, a point mass at 0, with a dashed
    vertical line. Read it as: the closer the line follows the grey area, the better the marginal
    of that channel is recovered (marginals only; the projections show the joint structure).

    Args:
        real, recovered: ``(N, C, T)`` or ``(N, C)`` features (the sample counts may differ).
        channels: channel indices to show; default: the ``n_channels`` real channels of largest
            variance.
        others: more named groups, drawn as further lines.
        recovered_name: the legend name of ``recovered`` (e.g. ``"sampled"``).
    """
    from scipy.stats import gaussian_kde, wasserstein_distance

    r = _numpy(real, "real")
    groups = {recovered_name: _numpy(recovered, recovered_name)}
    for name, value in (others or {}).items():
        groups[name] = _numpy(value, name)
    if r.ndim not in (2, 3):
        raise ValueError(f"real: expected (N, C) or (N, C, T), got shape {r.shape}")
    for g, a in groups.items():
        if a.ndim != r.ndim or a.shape[1] != r.shape[1] or (r.ndim == 3 and a.shape[2] != r.shape[2]):
            raise ValueError(f"{g}: expected (N, {', '.join(map(str, r.shape[1:]))}), got shape {a.shape}")

    def per_channel(a: np.ndarray) -> np.ndarray:  # (C, N) or (C, N*T): every value of a channel
        return np.swapaxes(a, 1, 2).reshape(-1, a.shape[1]).T if a.ndim == 3 else a.T

    rc = per_channel(r)
    gc = {g: per_channel(a) for g, a in groups.items()}
    c_total = rc.shape[0]
    if channels is None:
        channels = np.argsort(-rc.var(axis=1), kind="stable")[: max(1, min(n_channels, c_total))].tolist()
    channels = [int(c) for c in channels]
    bad = [c for c in channels if not 0 <= c < c_total]
    if bad or not channels:
        raise ValueError(f"channels must be non-empty indices in [0, {c_total}), got {channels}")
    ncols = max(1, min(ncols, len(channels)))
    nrows = math.ceil(len(channels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.6 * nrows), squeeze=False)
    line_colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ax in enumerate(axes.flat):
        if i >= len(channels):
            ax.set_visible(False)
            continue
        c = channels[i]
        everything = np.concatenate([rc[c]] + [v[c] for v in gc.values()])
        lo, hi = np.percentile(everything, [0.5, 99.5])
        pad = 0.1 * max(hi - lo, 1e-6)
        grid = np.linspace(lo - pad, hi + pad, 200)

        def density(v: np.ndarray) -> np.ndarray:
            if np.ptp(v) == 0:  # a point mass has no density to estimate
                return np.zeros_like(grid)
            return gaussian_kde(v)(grid)

        ax.fill_between(grid, density(rc[c]), color=_REFERENCE_GREY, label="real")
        for j, (g, v) in enumerate(gc.items()):
            colour = line_colours[j % len(line_colours)]
            ax.plot(grid, density(v[c]), color=colour, lw=1.6, label=g)
            ax.text(0.03, 0.95 - 0.11 * j, f"W1 {wasserstein_distance(rc[c], v[c]):.2f}", color=colour,
                    transform=ax.transAxes, fontsize=8, va="top")
        if zero_filled:
            ax.axvline(0.0, color="k", ls="--", lw=1.0, label="zero-filled (all at 0)")
        ax.set_title(f"channel {c}", fontsize=9)
        ax.set_xlabel("feature value")
        ax.set_ylabel("density")
        ax.tick_params(labelsize=8)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    what = f"modality {modality}: " if modality else ""
    fig.suptitle(title or f"{what}per-channel densities, real vs {recovered_name} "
                 "(W1: Wasserstein distance to the real values)", fontsize=11)
    fig.tight_layout(rect=(0, 0.07 if nrows == 1 else 0.04, 1, 1))
    return fig


# --------------------------------------------------------------------------------------------------
# latent space against the prior


def _prior_arrays(prior: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(K, C)`` means and stds of a :class:`~flowtransfer.flows.ClassConditionalGaussian` or a
    ``(means, stds)`` pair."""
    if hasattr(prior, "loc") and hasattr(prior, "log_std"):
        mean = prior.loc.detach().cpu().double().numpy()
        std = np.exp(prior.log_std.detach().cpu().double().numpy())
    else:
        try:
            mean, std = prior
        except (TypeError, ValueError) as err:
            raise TypeError("prior must be a ClassConditionalGaussian or a (means, stds) pair of (K, C) arrays") from err
        mean, std = _numpy(mean, "prior means"), _numpy(std, "prior stds")
    if mean.ndim != 2 or mean.shape != std.shape:
        raise ValueError(f"prior means and stds must both be (K, C), got {mean.shape} and {std.shape}")
    if np.any(std <= 0):
        raise ValueError("prior stds must be positive")
    return mean, std


def plot_latent_space(
    latents: Mapping[str, ArrayLike],
    labels: ArrayLike | Mapping[str, ArrayLike],
    prior: Any,
    dims: tuple[int, int] | None = None,
    *,
    max_points: int | None = 1500,
    title: str | None = None,
    seed: int = 0,
) -> Figure:
    """Latents of each modality, two channels at a time, against the class-conditional prior.

    The prior is shared over time, so each ``(sample, time step)`` of ``z = F_m(h_m)`` is one point
    that, after training, should fall in its class's Gaussian. One panel per modality: points
    coloured by class, the prior's class means as black-edged markers and their 1- and 2-std
    ellipses (axis-aligned: the prior is diagonal). A modality whose cloud sits in the same
    ellipses as the others can be carried to them through the shared latent space.

    Args:
        latents: modality -> ``(N_m, C, T)`` or ``(N_m, C)`` latents.
        labels: ``(N,)`` class ids for every modality, or one array per modality.
        prior: a ``ClassConditionalGaussian`` or ``(means, stds)``, each ``(K, C)``.
        dims: the two latent channels to show; default: the two whose prior means differ most
            between classes (largest variance of the means over classes).
    """
    if not latents:
        raise ValueError("plot_latent_space needs at least one modality")
    mean, std = _prior_arrays(prior)
    k, c = mean.shape
    if dims is None:
        spread = mean.var(axis=0) / np.mean(std**2, axis=0)
        dims = tuple(int(i) for i in np.argsort(-spread, kind="stable")[:2]) if c >= 2 else (0, 0)
    d0, d1 = int(dims[0]), int(dims[1])
    if not (0 <= d0 < c and 0 <= d1 < c):
        raise ValueError(f"dims must index the {c} latent channels, got {dims}")
    colours = _class_colours(list(range(k)))
    mods = list(latents)
    fig, axes = plt.subplots(1, len(mods), figsize=(3.7 * len(mods), 3.8), squeeze=False, sharex=True, sharey=True)
    for ax, m in zip(axes[0], mods):
        z = _numpy(latents[m], f"latents[{m!r}]")
        if z.ndim == 2:
            z = z[:, :, None]
        if z.ndim != 3 or z.shape[1] != c:
            raise ValueError(f"latents[{m!r}]: expected (N, {c}, T) to match the prior's {c} channels, got {z.shape}")
        y = _labels(labels[m] if isinstance(labels, Mapping) else labels, len(z), f"labels for {m!r}")
        if y.size and (y.min() < 0 or y.max() >= k):
            raise ValueError(f"labels for {m!r} must lie in [0, {k}) (the prior's classes)")
        t = z.shape[2]
        pts = np.stack([z[:, d0, :].reshape(-1), z[:, d1, :].reshape(-1)], axis=1)
        yy = np.repeat(y, t)
        keep = _subsample(len(pts), max_points, seed)
        pts, yy = pts[keep], yy[keep]
        for cls in range(k):
            sel = yy == cls
            if sel.any():
                ax.scatter(pts[sel, 0], pts[sel, 1], s=5, alpha=0.45, color=colours[cls], linewidths=0,
                           label=f"class {cls}")
        for cls in range(k):
            for n_std, ls in ((1, "-"), (2, "--")):
                ax.add_patch(Ellipse((mean[cls, d0], mean[cls, d1]), 2 * n_std * std[cls, d0], 2 * n_std * std[cls, d1],
                                     fill=False, edgecolor=colours[cls], lw=1.4, ls=ls))
        ax.scatter(mean[:, d0], mean[:, d1], s=60, marker="X", c=[colours[i] for i in range(k)], edgecolors="k",
                   linewidths=1.0, zorder=5, label="prior means")
        ax.set_title(f"modality {m}")
        ax.set_xlabel(f"latent channel {d0}")
        ax.grid(alpha=0.2)
    axes[0][0].set_ylabel(f"latent channel {d1}")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6), fontsize=8, frameon=False,
               markerscale=1.5, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(title or "latents vs the shared class-conditional prior (ellipses: 1 and 2 prior std)", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


# --------------------------------------------------------------------------------------------------
# per-class distances


def plot_frechet_per_class(
    distances: Mapping[str, Mapping[int, float]],
    *,
    modality: str | None = None,
    ylabel: str = "Fréchet distance to the real features",
    title: str | None = None,
    log: bool | None = None,
) -> Figure:
    """Grouped bars: one group per class, one bar per filling (e.g. recovered, zero, mean).

    Args:
        distances: filling name -> ``{class id: distance}`` (as returned by
            :func:`flowtransfer.metrics.frechet_per_class`); NaN classes are left empty.
        log: log-scale y axis (zero filling is often far above the rest); ``None`` (default) uses
            it when the largest bar is more than 20 times the smallest.
    """
    if not distances:
        raise ValueError("plot_frechet_per_class needs at least one named set of distances")
    classes = sorted({int(c) for d in distances.values() for c in d})
    if not classes:
        raise ValueError("no classes in distances")
    names = list(distances)
    width = 0.8 / len(names)
    x = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(classes) + 2.5), 3.6))
    for i, name in enumerate(names):
        vals = [float(distances[name].get(c, math.nan)) for c in classes]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=name)
    ax.set_xticks(x, [f"class {c}" for c in classes])
    ax.set_xlabel("class")
    ax.set_ylabel(ylabel)
    heights = np.array([float(v) for d in distances.values() for v in d.values()], dtype=float)
    heights = heights[np.isfinite(heights) & (heights > 0)]
    if log is None:
        log = bool(heights.size) and heights.max() > 20 * heights.min()
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    what = f"modality {modality}: " if modality else ""
    ax.set_title(title or f"{what}per-class Fréchet distance (lower is closer)", fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# images


def sequence_to_image(x: ArrayLike) -> np.ndarray:
    """AV-MNIST image sequences ``(N, C=columns, T=rows)`` to images ``(N, rows, columns)``."""
    a = _numpy(x, "x")
    if a.ndim != 3:
        raise ValueError(f"expected image sequences (N, columns, rows), got shape {a.shape}")
    return np.swapaxes(a, 1, 2)


def plot_recovered_images(
    real: ArrayLike,
    recovered: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    extra_rows: Mapping[str, ArrayLike] | None = None,
    n: int = 8,
    real_name: str = "real image",
    recovered_name: str = "recovered from audio",
    title: str | None = None,
    cmap: str = "gray",
) -> Figure:
    """Recovered images next to the real images of the same samples (hence the same digit).

    A grid with one column per sample and one row per kind: the real image, the recovered one,
    then any ``extra_rows`` (e.g. the clean MNIST digit). Each row uses its own grey scale
    (1st-99th percentile of that row), so a recovery with a different overall scale stays
    readable; columns are titled with the class.

    Args:
        real, recovered: ``(N, H, W)`` images (use :func:`sequence_to_image` for AV-MNIST's
            ``(N, columns, rows)`` sequences).
        labels: ``(N,)`` class ids, shown as column titles.
        n: how many samples (the first ``n``).
    """
    rows: dict[str, np.ndarray] = {real_name: _numpy(real, "real"), recovered_name: _numpy(recovered, "recovered")}
    for name, value in (extra_rows or {}).items():
        if name in rows:
            raise ValueError(f"row name {name!r} is already used")
        rows[name] = _numpy(value, name)
    shape = rows[real_name].shape
    if len(shape) != 3:
        raise ValueError(f"real: expected images (N, H, W), got shape {shape}")
    for name, a in rows.items():
        if a.ndim != 3 or len(a) != shape[0]:
            raise ValueError(f"{name}: expected {shape[0]} images (N, H, W), got shape {a.shape}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    n = min(n, shape[0])
    y = None if labels is None else _labels(labels, shape[0])
    fig, axes = plt.subplots(len(rows), n, figsize=(1.25 * n + 1.3, 1.35 * len(rows) + 0.5), squeeze=False)
    for r, (name, imgs) in enumerate(rows.items()):
        lo, hi = np.percentile(imgs[:n], [1, 99])
        for j in range(n):
            ax = axes[r][j]
            ax.imshow(imgs[j], cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and y is not None:
                ax.set_title(f"digit {y[j]}", fontsize=9)
        axes[r][0].set_ylabel(name, fontsize=9, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# gathering what the figures show


def recovered_features(
    method: Any,
    dataset: Any,
    dst: str,
    sources: Sequence[str] | None = None,
    max_samples: int | None = None,
    batch_size: int = 256,
    refine: bool = True,
) -> dict[str, np.ndarray]:
    """Real, recovered and zero-filled features of modality ``dst`` from a trained method.

    ``refine=False`` asks the method for its recovery before refinement (DiCMoR: the flow transfer
    alone, ``recover(batch, refine=False)``); methods without that option raise ``TypeError``.

    Every sample of ``dataset`` loses ``dst``; ``sources`` (default: every other modality) stay
    present, the rest are dropped too. Uses the method's ``encode`` (real features with all
    modalities present) and ``recover``; both live in the method's own feature space. Zero
    filling there is the extractor's output for an all-zero input.

    Returns:
        ``{"real", "recovered", "zero_filled"}`` ``(N, d, T)`` float arrays and ``"labels"``
        ``(N,)`` (the dataset's labels; regression scores are mapped to the 7 sentiment classes).
    """
    import torch

    mods = list(dataset.modalities)
    if dst not in mods:
        raise KeyError(f"unknown modality {dst!r}; known: {mods}")
    srcs = [m for m in mods if m != dst] if sources is None else list(sources)
    bad = [m for m in srcs if m not in mods or m == dst]
    if bad or not srcs:
        raise ValueError(f"sources must be other modalities of {mods} than {dst!r}, got {srcs}")
    if not (hasattr(method, "encode") and hasattr(method, "recover")):
        raise TypeError(f"{type(method).__name__} does not recover features (needs encode and recover)")
    n = len(dataset) if max_samples is None else min(len(dataset), int(max_samples))
    partial_mask = np.zeros((len(dataset), len(mods)), dtype=bool)
    for m in srcs:
        partial_mask[:, mods.index(m)] = True
    complete_ds = dataset.with_mask(np.ones_like(partial_mask))
    partial_ds = dataset.with_mask(partial_mask)
    out: dict[str, list[np.ndarray]] = {"real": [], "recovered": [], "zero_filled": [], "labels": []}
    was = method.training
    method.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                idx = np.arange(start, min(n, start + batch_size))
                complete = complete_ds.batch(idx)
                real = method.encode(complete)[dst]
                part = partial_ds.batch(idx)
                rec = (method.recover(part) if refine else method.recover(part, refine=False))[dst]
                if hasattr(method, "extractors"):
                    zeros = {m: torch.zeros_like(x) for m, x in complete.features.items()}
                    zero_feat = method.extractors(zeros, complete.mask)[dst]
                else:
                    zero_feat = torch.zeros_like(real)
                out["real"].append(real.cpu().numpy())
                out["recovered"].append(rec.cpu().numpy())
                out["zero_filled"].append(zero_feat.cpu().numpy())
                out["labels"].append(complete.labels.cpu().numpy())
    finally:
        method.train(was)
    result = {k: np.concatenate(v) for k, v in out.items()}
    labels = result["labels"]
    if labels.dtype.kind == "f":
        from flowtransfer.labels import sentiment_classes

        labels = np.asarray(sentiment_classes(labels))
    result["labels"] = labels.astype(np.int64)
    return result
