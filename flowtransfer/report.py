r"""What a finished ``run`` leaves for a person to read: ``references.json`` and ``report.md``.

:func:`finish_run` is called by :func:`flowtransfer.experiment.run_experiment` at the end of every
run (main process only), after ``results.csv``, ``table.txt`` and ``curves.png`` are written. It adds:

- ``references.json`` (data whose true distribution is known, i.e. the embedded synthetic data): the
  exact Bayes accuracy of every setting, on the very test masks the methods were scored under
  (each test sample classified by ``argmax_c p(c | its available modalities)``), per seed and
  averaged; plus the Bayes accuracy of every pattern. Real data has no such reference and gets
  none (the file says so).
- ``report.md``: the verdict (how much of the gap between zero filling and the full-modality bound
  each method closes, per setting), the headline table with the Bayes accuracy beside it, the
  curves, real against recovered features for one transfer, the configuration, and the command
  that reproduces the run. Figures are PNG files in ``out/figures/`` that the report links.

The *gap closed* by method ``m`` in a setting is

.. math::

    g_m = \frac{s_m - s_{\mathrm{zero}}}{s_{\mathrm{bound}} - s_{\mathrm{zero}}}

with ``s`` the mean score over seeds (the task's headline metric; lower-is-better metrics are
negated first), ``s_zero`` that of ``zero_fill`` in the same setting and ``s_bound`` that of
``upper_bound`` on complete data: 0 % is no better than zero filling, 100 % reaches the bound.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flowtransfer.io import atomic_write_json, atomic_write_text

__all__ = [
    "finish_run",
    "exact_references",
    "gap_closed",
    "verdict_lines",
    "reproduce_command",
    "write_report",
    "LOWER_IS_BETTER",
]

#: headline metrics where a smaller value is better
LOWER_IS_BETTER = frozenset({"mae", "loss"})
#: the methods the verdict is read against
ZERO, BOUND = "zero_fill", "upper_bound"


# ------------------------------------------------------------------------------------ references


def exact_references(test: Any, masks_by_seed: Mapping[int, Mapping[str, np.ndarray]]) -> dict[str, Any] | None:
    """Exact Bayes accuracies of a test split whose generator is known, or None.

    Args:
        test: the test :class:`~flowtransfer.data.MultimodalDataset`; it has references when it
            carries ``.generator`` with ``bayes_accuracy_masked`` (the embedded data does).
        masks_by_seed: seed -> setting name -> ``(N, M)`` presence mask, as the run evaluated.

    Returns:
        ``{"bayes_acc": {setting: mean over seeds}, "bayes_acc_per_seed": {seed: {setting: acc}},
        "bayes_acc_pattern": {"L": ..., "L+A": ...}, "n_test": N}``; the setting ``complete`` is
        included. The mask is intersected with the data's own presence mask, as the run does.
    """
    gen = getattr(test, "generator", None)
    if gen is None or not hasattr(gen, "bayes_accuracy_masked"):
        return None
    per_seed: dict[str, dict[str, float]] = {}
    for seed, masks in masks_by_seed.items():
        accs = {"complete": gen.bayes_accuracy_masked(test, test.mask)}
        for name, mask in masks.items():
            accs[name] = gen.bayes_accuracy_masked(test, np.asarray(mask, dtype=bool) & test.mask)
        per_seed[str(seed)] = accs
    names = list(next(iter(per_seed.values()))) if per_seed else []
    mean = {n: float(np.mean([acc[n] for acc in per_seed.values()])) for n in names}
    return {
        "what": "exact Bayes accuracy argmax_c p(c | available modalities) on the run's own test masks",
        "bayes_acc": mean,
        "bayes_acc_per_seed": per_seed,
        "bayes_acc_pattern": gen.difficulty(test),
        "n_test": len(test),
    }


# ------------------------------------------------------------------------------------ verdict


def _means(summary: Sequence[Mapping[str, Any]], metric: str) -> dict[tuple[str, str], float]:
    """(method, setting) -> mean of ``metric`` over seeds."""
    out = {}
    for row in summary:
        value = row.get(f"{metric}_mean")
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[(row["method"], row["setting"])] = float(value)
    return out


def gap_closed(summary: Sequence[Mapping[str, Any]], metric: str) -> dict[str, dict[str, float]]:
    """Setting -> method -> gap closed ``g_m`` (a fraction; see the module docstring).

    Settings without a ``zero_fill`` score, or runs without an ``upper_bound`` score on complete
    data, give nothing; so does a setting where zero filling is already at the bound."""
    means = _means(summary, metric)
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    bound = means.get((BOUND, "complete"))
    if bound is None:
        return {}
    out: dict[str, dict[str, float]] = {}
    settings = [s for (m, s) in means if m == ZERO]
    for setting in settings:
        zero = means[(ZERO, setting)]
        span = sign * (bound - zero)
        if span <= 1e-12:
            continue
        out[setting] = {
            m: sign * (v - zero) / span for (m, s), v in means.items() if s == setting and m not in (ZERO, BOUND)
        }
    return out


def verdict_lines(summary: Sequence[Mapping[str, Any]], metric: str, references: Mapping[str, Any] | None = None,
                  settings: Sequence[str] | None = None) -> list[str]:
    """A few lines a person reads in a minute: per setting, each method's score, the share of the
    zero-fill-to-bound gap it closes, and the exact Bayes accuracy where known.

    ``settings`` picks which to show (default: ``mr=0.3``, ``mr=0.5``, ``mr=0.7`` where the run has
    them, else every rate above 0; the single-modality patterns; every setting of other protocols)."""
    gaps = gap_closed(summary, metric)
    means = _means(summary, metric)
    bayes = (references or {}).get("bayes_acc", {})
    bound = means.get((BOUND, "complete"))
    lines: list[str] = []
    if bound is None or not gaps:
        return ["verdict: needs zero_fill and upper_bound in the run to measure the gap a method closes"]
    scale = 100.0 if metric not in LOWER_IS_BETTER else 1.0
    head = f"verdict ({metric}; bound = upper_bound on complete data = {scale * bound:.1f}"
    if "complete" in bayes:
        head += f", Bayes {scale * bayes['complete']:.1f}"
    lines.append(head + "): share of the gap between zero filling and the bound that each method closes")
    if settings is None:
        rates = [s for s in gaps if s.startswith("mr=") and s != "mr=0.0"]
        headline = [s for s in ("mr=0.3", "mr=0.5", "mr=0.7") if s in rates]
        settings = (headline or rates) + [s for s in gaps if s.startswith("pattern=") and "+" not in s]
        settings += [s for s in gaps if not s.startswith(("mr=", "pattern="))]  # other protocols
    chosen = list(settings)
    for setting in chosen:
        if setting not in gaps:
            continue
        parts = [f"zero_fill {scale * means[(ZERO, setting)]:.1f}"]
        for m, g in sorted(gaps[setting].items(), key=lambda kv: -kv[1]):
            parts.append(f"{m} {scale * means[(m, setting)]:.1f} (closes {100 * g:.0f}%)")
        ref = f", Bayes {scale * bayes[setting]:.1f}" if setting in bayes else ""
        lines.append(f"  {setting:12s} " + ", ".join(parts) + ref)
    return lines


# ------------------------------------------------------------------------------------ report


def reproduce_command(cfg: Any) -> str:
    """A ``flowtransfer run`` command line for ``cfg`` (the settings the CLI can express; the
    complete configuration is in ``config.json``)."""
    args = ["flowtransfer", "run", "--dataset", cfg.dataset]
    if cfg.data:
        args += ["--data", str(cfg.data)]
    if cfg.task:
        args += ["--task", cfg.task]
    args += ["--methods", ",".join(cfg.methods), "--seeds", ",".join(str(s) for s in cfg.seeds)]
    if cfg.preset:
        args += ["--preset", cfg.preset]
    args += ["--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size), "--lr", f"{cfg.lr:g}"]
    for flag, attr in (("--max-steps", "max_steps"), ("--max-steps-per-epoch", "max_steps_per_epoch")):
        value = getattr(cfg, attr, None)
        if value is not None:
            args += [flag, str(value)]
    protocol = getattr(cfg, "protocol", None)
    if protocol and protocol != "random":
        args += ["--protocol", protocol]
    device = getattr(cfg, "device", None)
    if device and device != "auto":
        args += ["--device", str(device)]
    args += ["--out", str(cfg.out)]
    return " ".join(shlex.quote(a) for a in args)


def _markdown_table(summary: Sequence[Mapping[str, Any]], metric: str, references: Mapping[str, Any] | None) -> str:
    """Settings as rows, methods as columns (mean ± std over seeds), the Bayes accuracy last."""
    methods: list[str] = []
    settings: list[str] = []
    for row in summary:
        if row["method"] not in methods:
            methods.append(row["method"])
        if row["setting"] not in settings:
            settings.append(row["setting"])
    if "complete" in settings:
        settings = ["complete"] + [s for s in settings if s != "complete"]
    cells = {(r["method"], r["setting"]): r for r in summary}
    scale = 100.0 if metric not in LOWER_IS_BETTER else 1.0
    bayes = (references or {}).get("bayes_acc", {})
    header = ["setting", *methods] + (["Bayes"] if bayes else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in settings:
        row = [s]
        for m in methods:
            r = cells.get((m, s))
            mean = r.get(f"{metric}_mean") if r else None
            if not isinstance(mean, (int, float)) or not math.isfinite(mean):
                row.append("")
                continue
            std = r.get(f"{metric}_std", 0.0)
            row.append(f"{scale * mean:.1f} ± {scale * std:.1f}")
        if bayes:
            row.append(f"{scale * bayes[s]:.1f}" if s in bayes else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _transfer_figure(trained: Mapping[str, Any], test: Any, figures: Path) -> tuple[str, str] | None:
    """Real against recovered features for one transfer by the first method that recovers: the last
    modality it recovers, every other one present; ``(file name, caption)`` or None."""
    from flowtransfer.experiment import _recovers

    for name, method in trained.items():
        if not _recovers(method):
            continue
        mods = list(test.modalities)
        keep = np.flatnonzero(test.mask.all(axis=1))[:600]
        if len(keep) < 10:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt

            from flowtransfer.plots import plot_recovery_projection, recovered_features

            view = test.subset(keep)
            # the last modality the method recovers (SMIL reconstructs only its m*)
            for dst in reversed(mods):
                try:
                    feats = recovered_features(method, view, dst)
                    break
                except KeyError:
                    continue
            else:
                continue
            others = {}
            try:  # a method that refines its recovery (DiCMoR): show the transfer before refinement too
                others["before refinement"] = recovered_features(method, view, dst, refine=False)["recovered"]
            except TypeError:
                pass
            fig = plot_recovery_projection(feats["real"], feats["recovered"], feats["labels"], feats["zero_filled"],
                                           others=others, modality=dst, reduce="mean_time",
                                           title=f"{name}: {dst} recovered from {'+'.join(m for m in mods if m != dst)}")
            file = f"transfer_{name}_{dst}.png"
            fig.savefig(figures / file, dpi=110, bbox_inches="tight")
            plt.close(fig)
        except ImportError:
            return None
        caption = (f"{name} (first seed), {len(keep)} test samples: {dst} features recovered from the other "
                   f"modalities against the real ones, in {name}'s own feature space (time-averaged, PCA axes of "
                   f"the real features; colours are classes; grey = real)"
                   + (", and the transfer before refinement." if others else ".")
                   + " A recovery that matches the real distribution covers the grey cloud class by class; one "
                   "that gathers near the centre is close to a conditional mean (what a squared-error "
                   "refinement is trained to give), not a sample.")
        return file, caption
    return None


def write_report(out: Path, cfg: Any, rows: Sequence[Mapping[str, Any]], references: Mapping[str, Any] | None,
                 trained: Mapping[str, Any], test: Any, task: str, seconds: float | None = None) -> Path:
    """Write ``out/report.md`` (and its figures in ``out/figures/``); return its path."""
    from flowtransfer.experiment import main_metrics
    from flowtransfer.training import summarise

    out = Path(out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    metric = main_metrics(task)[0]
    summary = summarise(rows)
    seeds = sorted({int(r["seed"]) for r in rows})
    parts = [f"# flowtransfer run: {cfg.dataset}", ""]
    parts.append(f"Methods {', '.join(cfg.methods)}; seeds {seeds}; test split of {len(test)} samples; "
                 f"headline metric `{metric}` (mean ± std over seeds"
                 + (", x100" if metric not in LOWER_IS_BETTER else "") + "). Selection on the validation split only.")
    if seconds is not None:
        parts.append(f"Wall time {seconds:.0f} s.")
    parts += ["", "## Verdict", "", "```", *verdict_lines(summary, metric, references), "```", ""]
    parts += ["## Results", "", _markdown_table(summary, metric, references), ""]
    if references:
        parts.append("`Bayes` is the exact Bayes accuracy of each setting on the same test masks (the data's "
                     "true distribution is known): no method can beat it except by chance. Every metric and "
                     "seed is in `results.csv`; `table.txt` has all columns.")
    else:
        parts.append("Real data: no exact reference is known. Every metric and seed is in `results.csv`.")
    parts.append("")
    if (out / "curves.png").exists():
        parts += ["## Score against missing rate", "", "![curves](curves.png)", ""]
    fig = _transfer_figure(trained, test, figures)
    if fig is not None:
        file, caption = fig
        parts += ["## Real against recovered features", "", f"![transfer](figures/{file})", "", caption, ""]
    parts += ["## Reproduce", "", "```", reproduce_command(cfg), "```", "",
              "The complete configuration (every setting and what the loader found in the data) is in "
              "`config.json`; the test masks of each seed are in `masks/`.", ""]
    if references:
        parts += ["## Exact references", "", "Bayes accuracy by pattern of available modalities (test split):", "",
                  "| pattern | Bayes acc |", "|---|---|",
                  *[f"| {p} | {100 * a:.1f} |" for p, a in references["bayes_acc_pattern"].items()], ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return path


def _masks_by_seed(out: Path, seeds: Sequence[int]) -> dict[int, dict[str, np.ndarray]]:
    from flowtransfer.data.missing import load_masks

    found = {}
    for seed in seeds:
        path = out / "masks" / f"seed{seed}.npz"
        if path.exists():
            masks, _, steps = load_masks(path, steps=True)
            # settings that remove time steps have no modality-level reference: left out
            found[int(seed)] = {name: mask for name, mask in masks.items() if name not in steps}
    return found


def finish_run(out: Path, cfg: Any, splits: Mapping[str, Any], rows: Sequence[dict[str, Any]],
               trained: Mapping[str, Any], log: Callable[[str], None] = print,
               seconds: float | None = None) -> dict[str, Any] | None:
    """Write ``references.json`` and ``report.md`` into ``out`` and log the verdict; return the
    references (None for real data). Called once, on the main process, by ``run_experiment``."""
    out = Path(out)
    test = splits["test"]
    if not rows:
        return None
    references = exact_references(test, _masks_by_seed(out, cfg.seeds))
    atomic_write_json(out / "references.json", references if references is not None else
                      {"what": "no exact reference: the data's true distribution is unknown"})
    from flowtransfer.experiment import main_metrics
    from flowtransfer.training import summarise

    task = test.task
    metric = main_metrics(task)[0]
    summary = summarise(rows)
    if references is not None:
        bayes = references["bayes_acc"]
        log("exact references (Bayes accuracy on the same test masks): "
            + ", ".join(f"{s} {100 * a:.1f}" for s, a in bayes.items()))
    for line in verdict_lines(summary, metric, references):
        log(line)
    path = write_report(out, cfg, rows, references, trained, test, task, seconds=seconds)
    log(f"report: {path}")
    return references
