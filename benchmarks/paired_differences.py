"""Paired per-seed differences between methods with 95% t confidence intervals.

Two methods trained with the same seed see the same initial randomness, training order and test
masks, so their scores are paired by seed: the difference ``a - b`` per seed, its mean, and the
Student-t interval ``mean ± t_{0.975, n-1} * sd / sqrt(n)`` over the ``n`` seeds both have. A
difference is *distinguishable from zero* when that interval excludes 0. With one seed there is no
interval (``half`` is NaN and nothing is distinguishable).

Library (used by ``benchmarks/compare_methods.py``)::

    from paired_differences import paired_difference, paired_by_seed
    d = paired_difference([0.81, 0.79, 0.83], [0.75, 0.76, 0.78])   # d.mean, d.low, d.high, d.distinguishable
    d = paired_by_seed(rows, "acc", "dicmor", "zero_fill", "mr=0.5")

Command line: DiCMoR ``paper`` against ``official`` and zero filling from a results CSV, plus the
recovery health columns (largest recovered / real ratio, non-finite recovered rows)::

    python benchmarks/paired_differences.py benchmarks/results/bounded_flows/mosi_preset_mosi_results.csv acc2_non0
    python benchmarks/paired_differences.py benchmarks/results/bounded_flows/avmnist_preset_mosi_results.csv acc
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats

__all__ = ["PairedDifference", "paired_difference", "paired_by_seed", "capped_settings", "SETTINGS", "METHODS"]

SETTINGS = ("mr=0.0", "mr=0.3", "mr=0.5", "mr=0.7")
METHODS = ("dicmor", "dicmor_official", "zero_fill", "upper_bound")


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` paired by seed.

    Attributes:
        mean: mean of the per-seed differences.
        sd: their sample standard deviation (NaN for one seed).
        half: half-width of the ``confidence`` t interval (NaN for one seed).
        low, high: the interval's ends.
        n: number of seeds both methods have.
        per_seed: the differences, in seed order.
        seeds: those seeds (when known).
        confidence: the interval's level.
    """

    mean: float
    sd: float
    half: float
    n: int
    per_seed: tuple[float, ...]
    seeds: tuple[int, ...] = ()
    confidence: float = 0.95

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    @property
    def distinguishable(self) -> bool:
        """True when the interval excludes 0 (never with one seed)."""
        return math.isfinite(self.half) and abs(self.mean) > self.half

    def format(self, scale: float = 1.0, digits: int = 1) -> str:
        """``"+1.2 [-0.3, +2.7]"`` (``*`` appended when distinguishable from 0); one seed: ``"+1.2 (1 seed)"``."""
        m = self.mean * scale
        if not math.isfinite(self.half):
            return f"{m:+.{digits}f} ({self.n} seed)"
        text = f"{m:+.{digits}f} [{self.low * scale:+.{digits}f}, {self.high * scale:+.{digits}f}]"
        return text + (" *" if self.distinguishable else "")


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95,
                      seeds: Sequence[int] = ()) -> PairedDifference:
    """The paired difference ``a[i] - b[i]`` with its ``confidence`` Student-t interval.

    Raises:
        ValueError: different lengths, no pairs, a non-finite value, or ``confidence`` outside (0, 1).
    """
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} values against {len(b)}; pairs need equal lengths")
    if not a:
        raise ValueError("paired_difference: no pairs")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_difference: confidence must lie in (0, 1), got {confidence}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    if not all(math.isfinite(v) for v in d):
        raise ValueError(f"paired_difference: non-finite values in {d}")
    mean = statistics.fmean(d)
    if len(d) < 2:
        return PairedDifference(mean, math.nan, math.nan, 1, tuple(d), tuple(seeds), confidence)
    sd = statistics.stdev(d)
    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1)) * sd / math.sqrt(len(d))
    return PairedDifference(mean, sd, half, len(d), tuple(d), tuple(seeds), confidence)


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def paired_by_seed(rows: Sequence[Mapping[str, Any]], metric: str, method: str, other: str, setting: str,
                   confidence: float = 0.95) -> PairedDifference | None:
    """``method - other`` on ``metric`` at ``setting``, paired over the seeds both have a finite
    value for; None when they share no seed."""
    values: dict[tuple[str, int], float] = {}
    for r in rows:
        if r.get("setting") != setting or r.get("method") not in (method, other):
            continue
        v = _finite(r.get(metric))
        if v is not None:
            values[(str(r["method"]), int(r["seed"]))] = v
    seeds = sorted({s for m, s in values if m == method} & {s for m, s in values if m == other})
    if not seeds:
        return None
    return paired_difference([values[(method, s)] for s in seeds], [values[(other, s)] for s in seeds],
                             confidence, seeds)


def capped_settings(rows: Sequence[Mapping[str, Any]]) -> tuple[dict[str, str], dict[str, float]]:
    """Missing-rate settings that the data cannot realise as named.

    Every sample keeps at least one modality, so MR is capped at ``(M-1)/M`` (0.5 on AV-MNIST's two
    modalities, 0.667 on three; :func:`flowtransfer.data.missing.random_missing_mask`). Returns
    ``(same, realised)``: ``same[s]`` is the lowest other setting that realised exactly the same rate
    in every seed (the masks are nested, so equal counts mean identical masks: ``s`` is a copy of it
    and is left out of the tables); ``realised[s]`` is the mean realised rate of every remaining
    ``mr=`` setting whose realised rate is more than 0.005 from its name."""
    rates: dict[str, dict[int, float]] = {}
    for r in rows:
        name, rate = str(r["setting"]), _finite(r.get("realised_missing_rate"))
        if name.startswith("mr=") and rate is not None:
            rates.setdefault(name, {})[int(r["seed"])] = round(rate, 6)
    order = sorted(rates, key=lambda n: float(n[3:]))
    same: dict[str, str] = {}
    for i, name in enumerate(order):
        for lower in order[:i]:
            if lower not in same and rates[lower] == rates[name]:
                same[name] = lower
                break
    realised = {n: statistics.mean(rates[n].values()) for n in order
                if n not in same and abs(statistics.mean(rates[n].values()) - float(n[3:])) > 0.005}
    return same, realised


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv")
    parser.add_argument("metric")
    args = parser.parse_args()
    with open(args.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    by = {(r["method"], r["setting"], int(r["seed"])): r for r in rows}
    seeds = sorted({int(r["seed"]) for r in rows})
    print(f"{args.csv}: {args.metric} (%), seeds {seeds}; mean ± std over seeds; differences paired by seed")
    same, _ = capped_settings(rows)
    for s in SETTINGS:
        if s in same:
            print(f"{s}: realised exactly {same[s]}'s rate in every seed (the same nested masks; MR cannot exceed "
                  "(M-1)/M): not repeated")
            continue
        cells = []
        for m in METHODS:
            v = [100 * float(by[(m, s, k)][args.metric]) for k in seeds if (m, s, k) in by]
            if v:
                cells.append(f"{m} {statistics.mean(v):.1f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.1f}")
        print(f"{s}: " + " | ".join(cells))
        for other in ("dicmor_official", "zero_fill"):
            d = paired_by_seed(rows, args.metric, "dicmor", other, s)
            if d is not None and d.n > 1:
                mark = "distinguishable from 0" if d.distinguishable else "not distinguishable from 0"
                print(f"    paper - {other}: {100 * d.mean:+.1f} (95% CI {100 * d.low:+.1f} .. {100 * d.high:+.1f}; "
                      f"{mark}); per seed {[round(100 * x, 1) for x in d.per_seed]}")
    for m in ("dicmor", "dicmor_official"):
        ratios = [float(r["recovered_max_ratio"]) for r in rows if r["method"] == m and r.get("recovered_max_ratio")]
        bad = sum(float(r["recovered_nonfinite"]) for r in rows if r["method"] == m and r.get("recovered_nonfinite"))
        if ratios:
            print(f"{m}: largest recovered |value| / largest real |value| over all settings and seeds "
                  f"{max(ratios):.2f}; non-finite recovered rows {bad:.0f}")
    for m in METHODS[:3]:
        secs = [round(float(by[(m, "mr=0.0", k)]["train_seconds"])) for k in seeds if (m, "mr=0.0", k) in by]
        if secs:
            print(f"{m}: train seconds per seed {secs}")


if __name__ == "__main__":
    main()
