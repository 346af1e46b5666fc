"""Figures (matplotlib): each function returns a ``Figure``; the CLI saves them as PNG.

- :func:`plot_missing_rate_curves`: score against missing rate for several methods, mean over seeds
  with a band of ± one standard deviation, bounds drawn as horizontal lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = ["plot_missing_rate_curves", "METRIC_LABELS"]

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


def _rate(setting: str) -> float | None:
    return float(setting.split("=", 1)[1]) if setting.startswith("mr=") else None


def plot_missing_rate_curves(
    rows: Sequence[Mapping[str, Any]],
    metric: str,
    title: str | None = None,
    ax: plt.Axes | None = None,
) -> Figure:
    """Score against missing rate, one line per method (mean over seeds, band = ± 1 std).

    Args:
        rows: result rows (``method``, ``setting`` such as ``"mr=0.3"``, ``seed``, metric columns).
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
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(methods):
        colour = colours[i % len(colours)]
        mine = [r for r in rows if r["method"] == name and metric in r and r[metric] is not None]
        curve: dict[float, list[float]] = {}
        for r in mine:
            rate = _rate(r["setting"])
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
    ax.set_xlabel("missing rate (fraction of missing modality slots)")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig
