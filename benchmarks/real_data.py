"""DiCMoR (``paper`` and ``official``) against zero-fill and the full-modality bound on real data.

Issue 4, "Results on real data". Two datasets, each through :func:`flowtransfer.experiment.run_experiment`
(one model per method and seed, selected on the validation split only, evaluated on the test split
under every setting with the same masks for every method):

* ``mosi``: the utterance-level CMU-MOSI pickle ``<shared>/mosi_utterance/mosi_utterance_poria.pkl``
  (dataset ``mmsa``, regression; modalities L/A/V, T = 1), settings MR 0.0 ... 0.7 and the six fixed
  patterns; metrics Acc-2 (non-0), F1 (non-0), MAE, Corr, Acc-7.
* ``avmnist``: AV-MNIST built from ``<shared>/avmnist_sources`` (dataset ``avmnist``, 10 classes;
  modalities V = degraded image rows, A = MFCC of a noisy spoken digit), settings MR 0.0 ... 0.7 and
  the two fixed patterns; metrics accuracy and macro F1.

For DiCMoR rows the table also shows the Fréchet distance (in DiCMoR's own feature space, averaged
over time, pooled over the recovered modalities) between recovered and real features of the test
samples whose modality is missing, next to the same distance for zero filling and for filling with
the mean real feature (lower is closer).

Outputs (``--out``, default ``benchmarks/results``): ``real_<dataset>_results.csv`` (one row per
method, setting and seed, as ``results.csv`` of a run), ``real_<dataset>_table.txt`` (run_experiment's
own table) and ``real_data_table.md`` / ``.txt``: the combined table with, per missing rate, the
difference ``dicmor - zero_fill`` and whether it wins. Checkpoints and masks go to ``--runs``
(default ``runs/real_data``, ignored by git). Nothing derived from the data other than these
result tables is written into the repository.

Run (the command behind benchmarks/README.md)::

    .venv/bin/python benchmarks/real_data.py --datasets mosi --seeds 5 --epochs 12 --threads 1
    .venv/bin/python benchmarks/real_data.py --datasets avmnist --seeds 5 --epochs 8 --max-steps-per-epoch 25 --threads 1
    .venv/bin/python benchmarks/real_data.py --report-only        # rebuild the combined table

``--merge`` keeps rows of other seeds already in ``real_<dataset>_results.csv`` (to add seeds later).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: dataset key -> (run_experiment dataset name, path under the shared data folder, task)
DATASETS: dict[str, tuple[str, str, str]] = {
    "mosi": ("mmsa", "mosi_utterance/mosi_utterance_poria.pkl", "regression"),
    "avmnist": ("avmnist", "avmnist_sources", "classification"),
}
METHODS = ("dicmor", "dicmor_official", "zero_fill", "upper_bound")
#: metric columns of the combined table, per task (``*`` marks percentages)
TABLE_METRICS = {
    "regression": ["acc2_non0", "f1_non0", "mae", "corr", "acc7"],
    "classification": ["acc", "f1_macro"],
}
PERCENT = {"acc2_non0", "f1_non0", "acc7", "acc", "f1_macro"}
HEADLINE = {"regression": "acc2_non0", "classification": "acc"}
FD = ("fd_recovered", "fd_zero_fill", "fd_mean_fill")


def shared_data_dir() -> Path:
    from flowtransfer.data.paths import shared_data_dir as find

    return Path(find())


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"5"`` -> seeds 0..4; ``"0,3,7"`` -> those seeds."""
    text = text.strip()
    if "," in text or text.startswith("="):
        return tuple(int(s) for s in text.lstrip("=").split(",") if s.strip())
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"--seeds needs at least one seed, got {n}")
    return tuple(range(n))


# --------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------


def run_dataset(key: str, args: argparse.Namespace) -> Path:
    """Run every method on one dataset; copy its result files to ``args.out``; return the CSV path."""
    from flowtransfer.experiment import ExperimentConfig, run_experiment
    from flowtransfer.training.results import read_results, write_results

    name, rel, _ = DATASETS[key]
    data = Path(args.data_root) / rel
    if not data.exists():
        raise FileNotFoundError(f"{key}: data not found at {data} (set --data-root)")
    preset = args.preset_mosi if key == "mosi" else args.preset_avmnist
    runs = Path(args.runs) / key
    cfg = ExperimentConfig(
        dataset=name, data=str(data), methods=tuple(args.methods), seeds=args.seeds, preset=preset,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, max_steps_per_epoch=args.max_steps_per_epoch,
        early_stop_patience=args.patience, out=str(runs), progress=args.progress,
    )
    start = time.perf_counter()
    run_experiment(cfg)
    print(f"[{key}] finished in {time.perf_counter() - start:.0f} s", flush=True)
    return collect(key, args, preset=preset, data=data)


def collect(key: str, args: argparse.Namespace, preset: str | None = None, data: Path | None = None) -> Path:
    """Copy the rows of ``<runs>/<key>/results.csv`` (complete or partial: a run writes it after every
    method) into ``<out>/real_<key>_results.csv`` with a per-dataset table; return the CSV path."""
    from flowtransfer.experiment import main_metrics
    from flowtransfer.training import format_table, summarise
    from flowtransfer.training.results import read_results, write_results

    runs = Path(args.runs) / key
    rows = read_results(runs / "results.csv")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"real_{key}_results.csv"
    if args.merge and target.is_file():
        new_keys = {(r["method"], r["setting"], int(r["seed"])) for r in rows}
        old = [r for r in read_results(target) if (r["method"], r["setting"], int(r["seed"])) not in new_keys]
        rows = old + list(rows)
    write_results(rows, out, name=f"real_{key}_results")
    (out / f"real_{key}_results.json").unlink(missing_ok=True)  # the CSV is enough
    task = DATASETS[key][2]
    metrics = [m for m in main_metrics(task) + list(FD) if any(r.get(m) is not None for r in rows)]
    seeds = sorted({int(r["seed"]) for r in rows})
    (out / f"real_{key}_table.txt").write_text(
        f"{key}: seeds {seeds} (mean ± std over seeds; percentages x100; fd_* Fréchet distances)\n"
        + format_table(summarise(rows), metrics=metrics))
    cfg_path = runs / "config.json"
    if cfg_path.is_file():
        import json

        c = json.loads(cfg_path.read_text())
        settings = dict(preset=c.get("preset"), epochs=c.get("epochs"), batch_size=c.get("batch_size"),
                        lr=c.get("lr"), max_steps_per_epoch=c.get("max_steps_per_epoch"),
                        early_stop_patience=c.get("early_stop_patience"), seeds_done=seeds,
                        methods=c.get("methods"), data=c.get("data"))
        (out / f"real_{key}_config.txt").write_text("".join(f"{k}: {v}\n" for k, v in settings.items()))
    return target


# --------------------------------------------------------------------------------------------------
# the combined table
# --------------------------------------------------------------------------------------------------


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(float(x))], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def _cell(mean: float, std: float, percent: bool) -> str:
    if not math.isfinite(mean):
        return "-"
    f, d = (100.0, 1) if percent else (1.0, 3)
    return f"{mean * f:.{d}f}" if not math.isfinite(std) else f"{mean * f:.{d}f} ± {std * f:.{d}f}"


def _setting_order(setting: str) -> tuple[int, float, str]:
    if setting == "complete":
        return (0, 0.0, setting)
    if setting.startswith("mr="):
        return (1, float(setting[3:]), setting)
    return (2, 0.0, setting)


def combined_table(key: str, rows: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """Markdown table for one dataset and the verdict lines (paper vs zero-fill per MR)."""
    task = DATASETS[key][2]
    metrics = TABLE_METRICS[task]
    head = HEADLINE[task]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    seeds = sorted({int(r["seed"]) for r in rows})
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["method"], r["setting"]), []).append(r)
    settings = sorted({r["setting"] for r in rows}, key=_setting_order)

    cols = ["setting", "method"] + [m + (" (%)" if m in PERCENT else "") for m in metrics] + [
        "FD recovered", "FD zero-fill", "FD mean-fill"]
    lines = [f"### {key} (seeds {seeds}; mean ± std over seeds)", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for s in settings:
        for m in methods:
            group = by.get((m, s))
            if not group:
                continue
            cells = [s, m]
            for met in metrics:
                mean, std, _ = _stats([g.get(met) for g in group])
                if met == "mae" and math.isfinite(mean):
                    pass
                cells.append(_cell(mean, std, met in PERCENT))
            for fd in FD:
                mean, std, _ = _stats([g.get(fd) for g in group])
                cells.append(_cell(mean, std, False))
            lines.append("| " + " | ".join(cells) + " |")

    verdict = [f"{key}: `dicmor` (paper) minus `zero_fill`, {head}, per setting (mean over seeds; "
               f"paired by seed, std of the per-seed difference):"]
    for s in settings:
        if s == "complete":
            continue
        a = {int(r["seed"]): r.get(head) for r in by.get(("dicmor", s), [])}
        z = {int(r["seed"]): r.get(head) for r in by.get(("zero_fill", s), [])}
        common = sorted(set(a) & set(z))
        if not common:
            continue
        diff = [float(a[k]) - float(z[k]) for k in common]
        mean, std, n = _stats(diff)
        wins = sum(d > 0 for d in diff)
        tag = "WIN" if mean > 0 else ("tie" if mean == 0 else "LOSS")
        fd = {f: _stats([g.get(f) for g in by.get(("dicmor", s), [])])[0] for f in FD}
        closer = ""
        if math.isfinite(fd["fd_recovered"]):
            closer = (f"; FD rec {fd['fd_recovered']:.3f} vs zero {fd['fd_zero_fill']:.3f} / mean "
                      f"{fd['fd_mean_fill']:.3f} -> "
                      + ("closer than both" if fd["fd_recovered"] < min(fd["fd_zero_fill"], fd["fd_mean_fill"])
                         else "NOT closer than both"))
        verdict.append(f"  {s:>12}: {100 * mean:+.1f} ± {100 * std if math.isfinite(std) else 0:.1f} pts "
                       f"({wins}/{n} seeds better) {tag}{closer}")
    return "\n".join(lines), verdict


def report(keys: Sequence[str], out: Path) -> str:
    from flowtransfer.training.results import read_results

    parts, verdicts = [], []
    for key in keys:
        path = out / f"real_{key}_results.csv"
        if not path.is_file():
            print(f"[{key}] no results at {path}; skipped in the table", file=sys.stderr)
            continue
        rows = read_results(path)
        table, verdict = combined_table(key, rows)
        cfg = out / f"real_{key}_config.txt"
        note = ("Settings: " + "; ".join(cfg.read_text().strip().splitlines())) if cfg.is_file() else ""
        parts += [table, "", note, ""]
        verdicts += verdict + [""]
    text = "\n".join(parts + ["```", *verdicts, "```", ""])
    (out / "real_data_table.md").write_text(text)
    return text


# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="mosi,avmnist", help="comma list of mosi, avmnist")
    p.add_argument("--seeds", type=parse_seeds, default=parse_seeds("5"), help="N (seeds 0..N-1) or a comma list")
    p.add_argument("--epochs", type=int, default=20, help="epochs per training stage")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cut epochs short (AV-MNIST budget)")
    p.add_argument("--patience", type=int, default=6, help="early-stopping patience (validation only)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--preset-mosi", default="small", help="DiCMoR/fusion preset on MOSI (paper's: mosi)")
    p.add_argument("--preset-avmnist", default="small", help="DiCMoR/fusion preset on AV-MNIST")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--data-root", default=None, help="the shared data folder (default: flowtransfer's lookup)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "real_data"), help="checkpoints, masks, full run outputs")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="result tables")
    p.add_argument("--merge", action="store_true", help="keep rows of other seeds already in the result CSV")
    p.add_argument("--report-only", action="store_true", help="only rebuild the combined table")
    p.add_argument("--collect-only", action="store_true",
                   help="copy the (possibly partial) results of <runs>/<dataset> to --out, then report")
    p.add_argument("--progress", action="store_true", help="tqdm bars")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    keys = [k for k in args.datasets.split(",") if k]
    unknown = [k for k in keys if k not in DATASETS]
    if unknown:
        p.error(f"unknown dataset(s) {unknown}; known: {sorted(DATASETS)}")
    out = Path(args.out)
    if args.collect_only:
        for key in keys:
            collect(key, args)
    elif not args.report_only:
        import torch

        torch.set_num_threads(args.threads)
        args.data_root = args.data_root or str(shared_data_dir())
        for key in keys:
            run_dataset(key, args)
    print(report(keys, out))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    raise SystemExit(main())
