"""Paired per-seed differences of DiCMoR ``paper`` against ``official`` and zero filling, from a
``real_data.py`` results CSV, with 95% t confidence intervals, plus the recovery health columns
(largest recovered / real ratio, non-finite recovered rows).

    python benchmarks/paired_differences.py benchmarks/results/bounded_flows/mosi_preset_mosi_results.csv acc2_non0
    python benchmarks/paired_differences.py benchmarks/results/bounded_flows/avmnist_preset_mosi_results.csv acc
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics

from scipy import stats

SETTINGS = ("mr=0.0", "mr=0.3", "mr=0.5", "mr=0.7")
METHODS = ("dicmor", "dicmor_official", "zero_fill", "upper_bound")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv")
    parser.add_argument("metric")
    args = parser.parse_args()
    rows = list(csv.DictReader(open(args.csv)))
    by = {(r["method"], r["setting"], int(r["seed"])): r for r in rows}
    seeds = sorted({int(r["seed"]) for r in rows})
    print(f"{args.csv}: {args.metric} (%), seeds {seeds}; mean ± std over seeds; differences paired by seed")
    for s in SETTINGS:
        cells = []
        for m in METHODS:
            v = [100 * float(by[(m, s, k)][args.metric]) for k in seeds if (m, s, k) in by]
            if v:
                cells.append(f"{m} {statistics.mean(v):.1f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.1f}")
        print(f"{s}: " + " | ".join(cells))
        for other in ("dicmor_official", "zero_fill"):
            d = [100 * (float(by[("dicmor", s, k)][args.metric]) - float(by[(other, s, k)][args.metric]))
                 for k in seeds if ("dicmor", s, k) in by and (other, s, k) in by]
            if len(d) > 1:
                mean, sd = statistics.mean(d), statistics.stdev(d)
                half = stats.t.ppf(0.975, len(d) - 1) * sd / math.sqrt(len(d))
                mark = "distinguishable from 0" if abs(mean) > half else "not distinguishable from 0"
                print(f"    paper - {other}: {mean:+.1f} (95% CI {mean - half:+.1f} .. {mean + half:+.1f}; {mark}); "
                      f"per seed {[round(x, 1) for x in d]}")
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
