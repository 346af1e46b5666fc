"""Every method on the same footing: one table and one plot of score against missing rate per dataset.

Issue 5, "Comparison". Each (dataset, method) pair is one call of
:func:`flowtransfer.experiment.run_experiment` (the one training/evaluation loop of the toolkit): one
model per method and seed, selected on the validation split only, evaluated on the test split under
every setting. Test masks depend only on the seed, so every method sees the same masks. A method
that raises is recorded as ``failed: <error>`` (traceback in ``<runs>/<key>/<method>/error.txt``)
and the others go on.

Datasets (``--datasets``, comma-separated keys):

* ``synthetic``: the embedded default (L/A/V, 4 classes, T = 20), MR 0.0 ... 0.7 and the 6 patterns.
* ``mosi``: the utterance-level CMU-MOSI pickle ``<shared>/mosi_utterance/mosi_utterance_poria.pkl``
  (dataset ``mmsa``, regression, L/A/V with T = 1), MR 0.0 ... 0.7 and the 6 patterns.
  Utterance-level features and the Poria split: the numbers are not comparable to papers' tables.
* ``avmnist``: AV-MNIST built from ``<shared>/avmnist_sources`` (V = degraded image rows, A = MFCC
  of a noisy spoken digit, 10 classes), MR 0.0 ... 0.7 and the 2 patterns.
* ``avmnist_smil``: SMIL's setting on AV-MNIST: only eta = 10% / 20% of the training (and
  validation) samples have the audio (``train_eta_modality="A"``; the image is always there);
  tested with both modalities (``mr=0.0``) and with the image only (``pattern=V``); methods
  ``smil, zero_fill, modality_dropout, specialists, upper_bound`` (``--smil-methods``). One run per
  eta, under the keys ``avmnist_smil_eta10`` and ``avmnist_smil_eta20``.

SMIL's often-missing modality ``m*`` (the one its priors reconstruct; the other modalities are
zero-filled when absent): ``A`` on AV-MNIST (SMIL's own choice: audio scarce, image always there),
``L`` on MOSI (text carries nearly all the signal there, so text is the modality whose absence
costs most and is worth reconstructing), and ``L`` on the synthetic data for the same reason.

Outputs in ``--out`` (default ``benchmarks/results``), per dataset key:
``compare_<key>_results.csv`` (one row per method, setting and seed), ``compare_<key>_table.txt``
(every metric, mean ± std over seeds, with training seconds, plus failures),
``compare_<key>_headline.md`` (methods as columns, settings as rows, the headline metric, and the
best method per setting), ``compare_<key>_curves.png`` (score against missing rate). Checkpoints,
masks and per-method run folders go to ``--runs`` (default ``runs/compare``, ignored by git).

Run (the commands behind benchmarks/COMPARISON.md are listed there)::

    .venv/bin/python benchmarks/compare_methods.py --quick                  # smoke test, < 2 min
    .venv/bin/python benchmarks/compare_methods.py --datasets synthetic --seeds 2 --epochs 8
    .venv/bin/python benchmarks/compare_methods.py --report-only            # rebuild tables from runs/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

ALL_METHODS: tuple[str, ...] = (
    "dicmor", "dicmor_official", "smil", "mmanet", "cyin", "zero_fill", "mean_fill",
    "modality_dropout", "ae_impute", "specialists", "upper_bound", "unimodal",
)
SMIL_METHODS: tuple[str, ...] = ("smil", "zero_fill", "modality_dropout", "specialists", "upper_bound")
RATES: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
#: methods that are ceilings rather than competitors (shown, never counted as "best")
BOUNDS = frozenset({"upper_bound", "specialists"})


@dataclass
class Spec:
    """One dataset key: how to load it and what runs on it."""

    dataset: str
    data: str | None  # path under the shared data folder, or None
    task: str
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    train_eta: float | None = None
    train_eta_modality: str | None = None
    rates: tuple[float, ...] = RATES
    smil_setting: bool = False


SPECS: dict[str, Spec] = {
    "synthetic": Spec("synthetic", None, "classification", {"smil": {"missing_modality": "L"}}),
    "mosi": Spec("mmsa", "mosi_utterance/mosi_utterance_poria.pkl", "regression", {"smil": {"missing_modality": "L"}}),
    "avmnist": Spec("avmnist", "avmnist_sources", "classification", {"smil": {"missing_modality": "A"}}),
    "avmnist_smil_eta10": Spec("avmnist", "avmnist_sources", "classification", {"smil": {"missing_modality": "A"}},
                               train_eta=0.1, train_eta_modality="A", rates=(0.0,), smil_setting=True),
    "avmnist_smil_eta20": Spec("avmnist", "avmnist_sources", "classification", {"smil": {"missing_modality": "A"}},
                               train_eta=0.2, train_eta_modality="A", rates=(0.0,), smil_setting=True),
}
ALIASES = {"avmnist_smil": ("avmnist_smil_eta10", "avmnist_smil_eta20")}
#: headline metric(s) of the per-setting table, with the direction of "better"
HEADLINE: dict[str, tuple[tuple[str, bool], ...]] = {
    "classification": (("acc", True),),
    "regression": (("acc2_non0", True), ("mae", False)),
}


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"3"`` -> seeds 0, 1, 2; ``"0,5"`` -> those seeds."""
    text = text.strip()
    if "," in text:
        return tuple(int(s) for s in text.split(",") if s.strip())
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"--seeds needs at least one seed, got {n}")
    return tuple(range(n))


def parse_keys(text: str) -> list[str]:
    keys: list[str] = []
    for k in (s.strip() for s in text.split(",") if s.strip()):
        expanded = ALIASES.get(k, (k,))
        for e in expanded:
            if e not in SPECS:
                raise argparse.ArgumentTypeError(f"unknown dataset key {k!r}; known: {sorted(SPECS) + sorted(ALIASES)}")
            keys.append(e)
    return keys


def parse_methods(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [n for n in names if n not in ALL_METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; known: {list(ALL_METHODS)}")
    return names


# --------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------


def _data_path(spec: Spec, args: argparse.Namespace) -> str | None:
    if spec.data is None:
        return None
    path = Path(args.data_root) / spec.data
    if not path.exists():
        raise FileNotFoundError(f"data not found at {path} (set --data-root)")
    return str(path)


def _tolerate_methods_without_recovery() -> None:
    """Work around a runner bug (reported): ``flowtransfer.experiment.recovery_distances`` checks
    ``hasattr(method, "recover")``, which is always true because the ``Method`` base class defines
    ``recover``/``encode`` to raise ``NotImplementedError``; so ``mmanet``, ``specialists`` and
    ``unimodal`` crash at evaluation after training. Here that error means "no recovered features":
    no Fréchet distance for the row, as the runner intends. A no-op once the runner catches it."""
    import flowtransfer.experiment as experiment

    original = experiment.recovery_distances
    if getattr(original, "_tolerates_not_implemented", False):
        return

    def recovery_distances(method: Any, test: Any, mask: Any) -> dict[str, float]:
        try:
            return original(method, test, mask)
        except NotImplementedError:
            return {}

    recovery_distances._tolerates_not_implemented = True  # type: ignore[attr-defined]
    experiment.recovery_distances = recovery_distances


def run_key(key: str, args: argparse.Namespace) -> None:
    """Run every requested method on one dataset key, one ``run_experiment`` call per method and seed."""
    from flowtransfer.experiment import ExperimentConfig, run_experiment

    _tolerate_methods_without_recovery()

    spec = SPECS[key]
    methods = [m for m in args.methods if not spec.smil_setting or m in args.smil_methods]
    data = _data_path(spec, args)
    dataset_options: dict[str, Any] = {}
    if spec.dataset == "avmnist" and args.max_per_split:
        dataset_options["max_per_split"] = args.max_per_split
    if spec.dataset == "synthetic" and args.quick:
        dataset_options.update(n_train=96, n_valid=48, n_test=64)
    runs = Path(args.runs) / key
    failures = _read_failures(runs)
    for seed in args.seeds:  # seeds outside, methods inside: every method gets seed 0 first
        for name in methods:
            run_dir = runs / name / f"seed{seed}"
            if args.skip_done and (run_dir / "results.csv").is_file():
                print(f"[{key}] {name} seed {seed}: already done, skipped", flush=True)
                continue
            cfg = ExperimentConfig(
                dataset=spec.dataset, data=data, methods=(name,), seeds=(seed,), rates=spec.rates,
                patterns=True, preset=args.preset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                early_stop_patience=args.patience, max_steps_per_epoch=args.max_steps_per_epoch,
                method_options={name: dict(spec.method_options.get(name, {}))},
                dataset_options=dict(dataset_options), train_eta=spec.train_eta,
                train_eta_modality=spec.train_eta_modality, out=str(run_dir), progress=args.progress,
            )
            start = time.perf_counter()
            try:
                run_experiment(cfg, log=(print if args.verbose else lambda s: None))
                failures.pop(f"{name}/seed{seed}", None)
                print(f"[{key}] {name} seed {seed}: done in {time.perf_counter() - start:.0f} s", flush=True)
            except Exception as err:  # noqa: BLE001 - one method's failure must not stop the others
                message = f"{type(err).__name__}: {err}".splitlines()[0][:300]
                failures[f"{name}/seed{seed}"] = message
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "error.txt").write_text(traceback.format_exc())
                print(f"[{key}] {name} seed {seed}: FAILED after {time.perf_counter() - start:.0f} s: {message}",
                      flush=True)
            _write_failures(runs, failures)
        report_key(key, args)


def _read_failures(runs: Path) -> dict[str, str]:
    path = runs / "failures.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_failures(runs: Path, failures: dict[str, str]) -> None:
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "failures.json").write_text(json.dumps(failures, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------------


def _fmt(values: Sequence[float], percent: bool) -> str:
    import numpy as np

    scale = 100.0 if percent else 1.0
    v = np.asarray(values, dtype=float) * scale
    if v.size == 0:
        return "-"
    digits = 1 if percent else 3
    if v.size == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def _setting_order(settings: list[str]) -> list[str]:
    def key(s: str) -> tuple[int, float, str]:
        if s.startswith("mr="):
            return (0, float(s[3:]), s)
        if s == "complete":
            return (2, 0.0, s)
        return (1, -len(s), s)

    return sorted(settings, key=key)


def headline_markdown(key: str, rows: list[dict[str, Any]], failures: dict[str, str], task: str) -> str:
    """Methods as columns, settings as rows (headline metric, mean ± std over seeds), the best
    non-bound method per setting, and the mean training time per method."""
    from flowtransfer.training.results import PERCENT_METRICS

    methods = list(dict.fromkeys(r["method"] for r in rows))
    settings = _setting_order(list(dict.fromkeys(r["setting"] for r in rows)))
    blocks = []
    for metric, higher in HEADLINE[task]:
        percent = metric in PERCENT_METRICS
        lines = [f"**{metric}**{' (%)' if percent else ''}, {'higher' if higher else 'lower'} is better; "
                 f"best = best mean among non-bound methods (bounds: {', '.join(sorted(BOUNDS))})", "",
                 "| setting | " + " | ".join(methods) + " | best |",
                 "|---|" + "---|" * (len(methods) + 1)]
        for s in settings:
            cells, means = [], {}
            for m in methods:
                vals = [float(r[metric]) for r in rows if r["method"] == m and r["setting"] == s
                        and r.get(metric) is not None and math.isfinite(float(r[metric]))]
                cells.append(_fmt(vals, percent))
                if vals and m not in BOUNDS:
                    means[m] = sum(vals) / len(vals)
            best = (max if higher else min)(means, key=means.get) if means else "-"
            lines.append(f"| {s} | " + " | ".join(cells) + f" | {best} |")
        secs = []
        for m in methods:
            t = {int(r["seed"]): float(r["train_seconds"]) for r in rows if r["method"] == m and r.get("train_seconds") is not None}
            v = list(t.values())
            secs.append("-" if not v else f"{v[0]:.0f}" if len(v) == 1 else
                        f"{statistics.mean(v):.0f} ± {statistics.stdev(v):.0f}")
        lines.append("| train s | " + " | ".join(secs) + " | |")
        blocks.append("\n".join(lines))
    if failures:
        blocks.append("\n".join(f"- `{m}`: failed: {e}" for m, e in failures.items()))
    return f"### {key}\n\n" + "\n\n".join(blocks) + "\n"


def report_key(key: str, args: argparse.Namespace) -> None:
    """Gather the per-method run folders of ``key`` into the result files in ``args.out``."""
    from flowtransfer.experiment import main_metrics
    from flowtransfer.training import format_table, summarise
    from flowtransfer.training.results import read_results, write_results

    spec = SPECS[key]
    runs = Path(args.runs) / key
    rows: list[dict[str, Any]] = []
    for name in ALL_METHODS:
        for path in sorted((runs / name).glob("seed*/results.csv"), key=lambda p: int(p.parent.name[4:])):
            for r in read_results(path):
                if int(r["seed"]) in args.seeds:  # --report-only --seeds 0 keeps seeds every method has
                    r["dataset"] = key
                    rows.append(r)
    failures = _read_failures(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not rows:
        print(f"[{key}] no results yet", flush=True)
        if failures:
            (out / f"compare_{key}{args.tag}_table.txt").write_text(
                "".join(f"{m}: failed: {e}\n" for m, e in failures.items()))
        return
    write_results(rows, out, name=f"compare_{key}{args.tag}_results")
    (out / f"compare_{key}{args.tag}_results.json").unlink(missing_ok=True)
    metrics = main_metrics(spec.task) + ["fd_recovered", "fd_zero_fill", "fd_mean_fill", "train_seconds"]
    metrics = [m for m in metrics if any(r.get(m) is not None for r in rows)]
    seeds = sorted({int(r["seed"]) for r in rows})
    cfg = _run_config(runs)
    header = (f"compare_methods: {key} (dataset={spec.dataset}, task={spec.task}"
              + (f", train_eta={spec.train_eta} on {spec.train_eta_modality}" if spec.train_eta else "")
              + f") seeds {seeds}; mean ± std over seeds; percentages x100; fd_* Fréchet distances (lower closer); "
              f"train_seconds = wall time of training on a shared 2-core CPU\nbudget: {cfg}\n")
    fail_text = "".join(f"{m}: failed: {e}\n" for m, e in failures.items())
    table = format_table(summarise(rows), metrics=metrics)
    (out / f"compare_{key}{args.tag}_table.txt").write_text(header + table + "\n" + fail_text)
    (out / f"compare_{key}{args.tag}_headline.md").write_text(headline_markdown(key, rows, failures, spec.task))
    if not spec.smil_setting:
        from flowtransfer.plots import plot_missing_rate_curves
        import matplotlib.pyplot as plt

        metric = HEADLINE[spec.task][0][0]
        # 12 methods: a 12-colour cycle (the default has 10) and the legend outside the axes
        colours = [plt.get_cmap("tab20")(i) for i in range(0, 20, 2)] + ["#000000", "#000080"]
        with plt.rc_context({"axes.prop_cycle": plt.cycler(color=colours)}):
            fig, ax = plt.subplots(figsize=(8.5, 4.6))
            plot_missing_rate_curves(rows, metric=metric, title=f"{key}: {metric} vs missing rate (test)", ax=ax)
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
        fig.savefig(out / f"compare_{key}{args.tag}_curves.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
    print(f"[{key}] report written ({len(rows)} rows, seeds {seeds}, failures {sorted(failures)})", flush=True)


def _run_config(runs: Path) -> str:
    """The training budget, read back from one method's config.json."""
    for path in sorted(runs.glob("*/seed*/config.json")):
        c = json.loads(path.read_text())
        keep = ("preset", "epochs", "batch_size", "lr", "max_steps_per_epoch", "early_stop_patience",
                "dataset_options", "train_eta", "train_eta_modality")
        return ", ".join(f"{k}={c.get(k)}" for k in keep)
    return "-"


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", type=parse_keys, default=None,
                   help="comma-separated keys: synthetic, mosi, avmnist, avmnist_smil (= avmnist_smil_eta10,"
                        "avmnist_smil_eta20) (default: all; --quick: synthetic)")
    p.add_argument("--methods", type=parse_methods, default=ALL_METHODS, help="comma-separated method names (default: all)")
    p.add_argument("--smil-methods", type=parse_methods, default=SMIL_METHODS,
                   help="methods run in SMIL's setting (default: smil,zero_fill,modality_dropout,specialists,upper_bound)")
    p.add_argument("--seeds", type=parse_seeds, default=(0, 1), help="a count (0..n-1) or a comma-separated list (default 2)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--preset", default="small", help="model preset for every method (small, mosi, mosei)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--patience", type=int, default=4, help="early stopping patience (epochs)")
    p.add_argument("--max-steps-per-epoch", type=int, default=None)
    p.add_argument("--max-per-split", type=int, default=None, help="AV-MNIST: keep only the first k images per split")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--data-root", default=None, help="the shared data folder (default: flowtransfer's lookup)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--runs", default=str(ROOT / "runs" / "compare"))
    p.add_argument("--tag", default="", help="suffix of the result file names (e.g. _long for another budget)")
    p.add_argument("--skip-done", action="store_true", help="skip methods whose run folder has every seed")
    p.add_argument("--report-only", action="store_true", help="only rebuild the result files from --runs")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke test: synthetic data (96/48/64 samples), 1 seed, 1 epoch of 2 steps, "
                        "MR 0.0/0.5 only; writes to runs/compare_quick")
    p.add_argument("--progress", action="store_true", help="tqdm bars")
    p.add_argument("--verbose", action="store_true", help="run_experiment's log lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.datasets = args.datasets or ["synthetic"]
        args.seeds, args.epochs, args.max_steps_per_epoch = (0,), 1, 2
        args.runs = str(ROOT / "runs" / "compare_quick" / "runs")
        args.out = str(ROOT / "runs" / "compare_quick" / "results")
        if "avmnist" in " ".join(args.datasets) and not args.max_per_split:
            args.max_per_split = 200
        for k in args.datasets:
            if not SPECS[k].smil_setting:
                SPECS[k].rates = (0.0, 0.5)
    args.datasets = args.datasets or list(SPECS)
    if args.data_root is None:
        from flowtransfer.data.paths import shared_data_dir

        args.data_root = str(shared_data_dir())
    start = time.perf_counter()
    for key in args.datasets:
        if args.report_only:
            report_key(key, args)
            continue
        try:
            run_key(key, args)
        except FileNotFoundError as err:
            print(f"[{key}] skipped: {err}", file=sys.stderr, flush=True)
    print(f"total {time.perf_counter() - start:.0f} s; results in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
