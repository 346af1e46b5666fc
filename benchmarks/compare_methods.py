"""Every method on the same footing, as a resumable suite of cells: tables, paired differences and plots per dataset.

Issues 5 and 11. A **cell** is one (dataset key, method, seed): one call of
:func:`flowtransfer.experiment.run_experiment` (the toolkit's one training/evaluation loop) into its
own folder ``<runs>/<key>/<method>/seed<k>/``, holding that cell's ``results.csv``/``results.json``,
``config.json``, checkpoints and, written atomically **last**, the finished marker ``DONE.json``
(the cell's settings, seconds and budget). A cell without the marker is unfinished: the next run
resumes it from its checkpoints (bit-identical to an uninterrupted run); a cell with it is skipped.
One model per method and seed, selected on the validation split only, evaluated on the test split
under every setting; test masks depend only on the seed, so every method sees the same masks. A
cell that raises is recorded as ``failed: <error>`` (traceback in its folder's ``error.txt``) and
the others go on.

**The budget rule** (issue 11): every method trains until its validation score plateaus (early
stopping with ``--patience``, learning rate halved after ``--lr-patience`` epochs without
improvement) under **one cap of optimiser steps**, ``--max-steps``, the same for every method; a
two-stage method (DiCMoR) shares it between its stages (:func:`flowtransfer.experiment.stage_cap`).
``--epochs`` is only a safety limit. Each row records ``steps``, ``best_step``, ``stop_reason``
(``plateau``/``cap``/``epochs``) and ``improving_at_stop``; the tables mark ``(!)`` a method that
stopped on the cap or the epoch limit while still improving.

Datasets (``--datasets``, comma-separated keys):

* ``synthetic``: the embedded default (L/A/V, 4 classes, T = 20), MR 0.0 ... 0.7 and the 6 patterns.
* ``mosi``: the utterance-level CMU-MOSI pickle ``<shared>/mosi_utterance/mosi_utterance_poria.pkl``
  (dataset ``mmsa``, regression, L/A/V with T = 1), MR 0.0 ... 0.7 and the 6 patterns.
  Utterance-level features and the Poria split: the numbers are not comparable to papers' tables.
* ``mosi_fold0`` ... ``mosi_fold4`` (alias ``mosi_folds``): the fully held-out 5-fold version
  (``<shared>/mosi_utterance/heldout_cv/fold<k>.pkl``: only the videos the feature learner never
  saw; test = fold k, valid = fold k+1); the report pools the five test folds.
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

Outputs in ``--out`` (default ``benchmarks/results/compare``), per dataset key, rebuilt from every
finished cell (``--report-only`` does only this): ``compare_<key>_results.csv`` (one row per
method, setting and seed), ``compare_<key>_table.txt`` (every metric, mean ± std over seeds, the
budget table, failures, missing cells), ``compare_<key>_headline.md`` (methods as columns,
settings as rows, the headline metric, the best method per setting, the steps and stop rows, and
the paired per-seed differences of every method against zero filling and against the best other
method with 95% t intervals; ``*`` marks a difference distinguishable from zero),
``compare_<key>_curves.png`` (score against missing rate). Checkpoints, masks and the cells go to
``--runs`` (default ``runs/compare``, ignored by git); each finished cell's results and marker are
also copied into the **ledger** ``--ledger`` (default ``<out>/cells<tag>``, committed with the tables), and
a cell finished there counts as finished: a new checkout, which has no ``runs/``, rebuilds every
table and runs only the cells still missing. ``--import-results compare_<key>_results.csv`` writes
ledger cells from an older results file (each marker says ``restored_from``).

Run::

    .venv/bin/python benchmarks/compare_methods.py --quick                  # smoke test, < 2 min
    .venv/bin/python benchmarks/compare_methods.py --datasets avmnist --methods zero_fill,dicmor --seeds 5 \
        --max-steps 2000 --plan                                             # the cells and their cost
    .venv/bin/python benchmarks/compare_methods.py --datasets avmnist --methods zero_fill --seeds 0,3,4 \
        --max-steps 2000 --device auto                                      # run (or resume) those cells
    .venv/bin/python benchmarks/compare_methods.py --report-only            # rebuild tables from runs/

``--plan`` measures a few optimiser steps of every planned method (its first unfinished seed) and
one validation pass, then prints each unfinished cell with an estimate of its wall time: planned
steps (``min(max_steps, epochs x steps per epoch)``, no early stop assumed) over the measured
steps per second plus the validation and test evaluation passes. It estimates time only, never
results.
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
if str(Path(__file__).resolve().parent) not in sys.path:  # paired_differences beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))

ALL_METHODS: tuple[str, ...] = (
    "dicmor", "dicmor_official", "smil", "smil_official", "mmanet", "cyin", "zero_fill", "mean_fill",
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
    dataset_options: dict[str, Any] = field(default_factory=dict)


#: SMIL's reconstructed modality m* follows its paper's rule (text where there is text, else audio:
#: :func:`flowtransfer.methods.smil.paper_missing_modality`), so no dataset overrides it here.
SPECS: dict[str, Spec] = {
    "synthetic": Spec("synthetic", None, "classification"),
    "mosi": Spec("mmsa", "mosi_utterance/mosi_utterance_poria.pkl", "regression"),
    **{f"mosi_fold{k}": Spec("mmsa", "mosi_utterance", "regression", dataset_options={"fold": k}) for k in range(5)},
    "avmnist": Spec("avmnist", "avmnist_sources", "classification"),
    "avmnist_smil_eta10": Spec("avmnist", "avmnist_sources", "classification",
                               train_eta=0.1, train_eta_modality="A", rates=(0.0,), smil_setting=True),
    "avmnist_smil_eta20": Spec("avmnist", "avmnist_sources", "classification",
                               train_eta=0.2, train_eta_modality="A", rates=(0.0,), smil_setting=True),
}
ALIASES = {"avmnist_smil": ("avmnist_smil_eta10", "avmnist_smil_eta20"),
           "mosi_folds": tuple(f"mosi_fold{k}" for k in range(5))}
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
# cells
# --------------------------------------------------------------------------------------------------

#: the finished marker of a cell, written atomically after everything else
DONE = "DONE.json"
#: ExperimentConfig fields that do not change a cell's result (or only where it runs)
_NOT_SETTINGS = frozenset({"out", "progress", "resume", "device", "data"})


@dataclass(frozen=True)
class Cell:
    """One (dataset key, method, seed)."""

    key: str
    method: str
    seed: int

    def folder(self, runs: str | Path) -> Path:
        return Path(runs) / self.key / self.method / f"seed{self.seed}"

    def __str__(self) -> str:
        return f"{self.key}/{self.method}/seed{self.seed}"


def _methods_for(spec: Spec, args: argparse.Namespace) -> tuple[str, ...]:
    methods = args.methods or ALL_METHODS
    return tuple(m for m in methods if not spec.smil_setting or m in args.smil_methods)


def requested_cells(keys: Sequence[str], args: argparse.Namespace) -> list[Cell]:
    """The cells the command names: keys x methods x seeds (seeds outside: every method gets seed 0 first)."""
    seeds = args.seeds if args.seeds is not None else tuple(range(5))
    return [Cell(k, m, s) for k in keys for s in seeds for m in _methods_for(SPECS[k], args)]


def cell_config(cell: Cell, args: argparse.Namespace, **changes: Any) -> Any:
    """The :class:`~flowtransfer.experiment.ExperimentConfig` of one cell."""
    from flowtransfer.experiment import ExperimentConfig

    spec = SPECS[cell.key]
    dataset_options: dict[str, Any] = dict(spec.dataset_options)
    if spec.dataset == "avmnist" and args.max_per_split:
        dataset_options["max_per_split"] = args.max_per_split
    if spec.dataset == "synthetic" and args.quick:
        dataset_options.update(n_train=96, n_valid=48, n_test=64)
    dataset_options.update(args.dataset_options or {})
    settings: dict[str, Any] = dict(
        dataset=spec.dataset, data=_data_path(spec, args), methods=(cell.method,), seeds=(cell.seed,),
        rates=spec.rates, patterns=True, preset=args.preset, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, early_stop_patience=args.patience, lr_plateau_patience=args.lr_patience,
        max_steps=args.max_steps, max_steps_per_epoch=args.max_steps_per_epoch, device=args.device,
        method_options={cell.method: dict(spec.method_options.get(cell.method, {}))},
        dataset_options=dataset_options, train_eta=spec.train_eta, train_eta_modality=spec.train_eta_modality,
        out=str(cell.folder(args.runs)), progress=args.progress, resume=True,
    )
    settings.update(changes)
    return ExperimentConfig(**settings)


def cell_settings(cfg: Any) -> dict[str, Any]:
    """What determines a cell's result: its config as plain data, less where it runs and writes."""
    from dataclasses import asdict

    plain = json.loads(json.dumps(asdict(cfg), default=str))
    return {k: v for k, v in plain.items() if k not in _NOT_SETTINGS}


def ledger_dir(args: argparse.Namespace) -> Path:
    """The committed record of finished cells: ``--ledger``, default ``<out>/cells<tag>`` (one
    ledger per tag, so that a ``--tag _long`` budget never mixes with the default one)."""
    return Path(args.ledger) if args.ledger else Path(args.out) / f"cells{args.tag}"


def _marker_settings(marker: Path) -> dict[str, Any] | None:
    """The settings a finished marker records; ``None`` if it cannot be read."""
    try:
        settings = json.loads(marker.read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        return None
    return settings if isinstance(settings, dict) else None


def _current_settings(cell: Cell, args: argparse.Namespace) -> dict[str, Any] | None:
    """:func:`cell_settings` of the cell under this command's arguments (``None`` when its data is
    absent here, e.g. a report rebuilt on a machine without the shared folder)."""
    try:
        return cell_settings(cell_config(cell, args))
    except FileNotFoundError:
        return None


def finished_marker(cell: Cell, args: argparse.Namespace, settings: dict[str, Any] | None = None) -> Path | None:
    """The cell's finished marker: in ``--runs`` (where it ran), else in the ledger, else ``None``.
    Given ``settings``, a ledger marker counts only if it records those settings (a ledger cell of
    another budget must not block or shadow this one); a run folder's marker always counts."""
    marker = cell.folder(args.runs) / DONE
    if marker.is_file():
        return marker
    kept = cell.folder(ledger_dir(args)) / DONE
    if kept.is_file() and (settings is None or _marker_settings(kept) == settings):
        return kept
    return None


def finished_markers(key: str, args: argparse.Namespace) -> dict[tuple[str, int], Path]:
    """``(method, seed) -> marker`` of every finished cell of ``key``, the ledger's overridden by
    ``--runs``'s (the same cell in both is the same result; the run folder is the newer copy)."""
    found: dict[tuple[str, int], Path] = {}
    for root in (ledger_dir(args), Path(args.runs)):
        for marker in (root / key).glob(f"*/seed*/{DONE}"):
            found[(marker.parent.parent.name, int(marker.parent.name[4:]))] = marker
    return dict(sorted(found.items()))


#: the files of a finished cell kept in the ledger (checkpoints and masks stay in ``--runs``)
LEDGER_FILES = ("results.csv", "config.json")


def archive_cell(cell: Cell, args: argparse.Namespace) -> Path:
    """Copy a finished cell's results and marker from ``--runs`` into the ledger, the marker last,
    so that a new checkout (which has no ``runs/``) still knows the cell is finished and can rebuild
    every table from it."""
    from flowtransfer.io import atomic_write_text

    src, dst = cell.folder(args.runs), cell.folder(ledger_dir(args))
    for name in (*LEDGER_FILES, DONE):
        if (src / name).is_file():
            atomic_write_text(dst / name, (src / name).read_text())
    return dst


def sync_ledger(key: str, args: argparse.Namespace) -> list[Cell]:
    """Archive the cells of ``key`` finished in ``--runs`` that the ledger lacks, or holds under
    other settings than this command's while the run folder holds this command's (an old local
    ``runs/`` never overwrites a current ledger cell)."""
    synced = []
    for marker in (Path(args.runs) / key).glob(f"*/seed*/{DONE}"):
        cell = Cell(key, marker.parent.parent.name, int(marker.parent.name[4:]))
        kept = cell.folder(ledger_dir(args)) / DONE
        if kept.is_file():
            current = _current_settings(cell, args)
            if current is None or _marker_settings(kept) == current or _marker_settings(marker) != current:
                continue
        archive_cell(cell, args)
        synced.append(cell)
    return synced


def import_results(path: str | Path, key: str, args: argparse.Namespace) -> list[Cell]:
    """Write one ledger cell per (method, seed) of a ``compare_<key>_results.csv`` built by this
    script, under the *current* arguments' settings (so call it with the arguments that produced the
    file; its budget line says which). Each marker records ``restored_from``: the rows are the file's,
    unchanged; nothing is rerun. For recovering the cells of a checkout whose ``runs/`` was lost."""
    from flowtransfer.io import atomic_write_json
    from flowtransfer.training.results import budget_records, read_results, write_results

    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in read_results(path):
        if r.get("dataset") != key:
            raise ValueError(f"{path}: a row of dataset {r.get('dataset')!r}, expected {key!r}")
        groups.setdefault((str(r["method"]), int(r["seed"])), []).append(r)
    cells = []
    for (method, seed), rows in sorted(groups.items()):
        cell = Cell(key, method, seed)
        folder = cell.folder(ledger_dir(args))
        if (folder / DONE).is_file() and not args.force:
            raise FileExistsError(f"{cell} is in the ledger already ({folder}); --force replaces it")
        write_results(rows, folder, name="results")
        (folder / "results.json").unlink()
        budget = budget_records(rows)
        atomic_write_json(folder / DONE, {
            "cell": str(cell), "restored_from": str(path), "seconds": rows[0].get("train_seconds"),
            "rows": len(rows), "settings": cell_settings(cell_config(cell, args)),
            "budget": {k: budget[0][k] for k in ("steps", "best_step", "stop_reason", "improving_at_stop")}
            if budget else None,
        })
        cells.append(cell)
    return cells


def cell_state(cell: Cell, args: argparse.Namespace, cfg: Any | None = None) -> str:
    """``"done"`` (finished under this command's settings, in ``--runs`` or the ledger), ``"stale"``
    (finished in ``--runs`` under other settings), ``"partial"`` (started, not finished) or
    ``"new"``. ``cfg`` defaults to the cell's config under ``args``; where the cell's data is absent
    (a report rebuilt elsewhere) any finished marker counts as done."""
    folder = cell.folder(args.runs)
    settings = cell_settings(cfg) if cfg is not None else _current_settings(cell, args)
    marker = finished_marker(cell, args, settings)
    if marker is None:
        return "partial" if folder.exists() else "new"
    if settings is None:
        return "done"
    saved = _marker_settings(marker)
    if saved is None:
        return "partial" if folder.exists() else "new"  # an unreadable marker: not finished
    return "done" if saved == settings else "stale"


def _data_path(spec: Spec, args: argparse.Namespace) -> str | None:
    if spec.data is None:
        return None
    path = Path(args.data_root) / spec.data
    if not path.exists():
        raise FileNotFoundError(f"data not found at {path} (set --data-root)")
    return str(path)


def run_cell(cell: Cell, args: argparse.Namespace, failures: dict[str, str]) -> str:
    """Run (or resume) one cell unless it is finished; return what happened."""
    import shutil

    from flowtransfer.experiment import run_experiment
    from flowtransfer.io import atomic_write_json
    from flowtransfer.training.results import budget_records

    cfg = cell_config(cell, args)
    folder = cell.folder(args.runs)
    state = cell_state(cell, args, cfg)
    if state == "done" and not args.force:
        return "finished before: skipped"
    if state == "stale" and not args.force:
        return "finished under other settings: skipped (--force reruns it)"
    if state == "partial":
        saved = folder / "config.json"
        try:
            same = saved.is_file() and cell_settings(cfg) == {
                k: v for k, v in json.loads(saved.read_text()).items() if k not in _NOT_SETTINGS | {"data_report"}}
        except (OSError, ValueError):
            same = False
        if not same and folder.exists():  # an unfinished cell of other settings: never resume its checkpoints
            shutil.rmtree(folder)
    if args.force and folder.exists():
        shutil.rmtree(folder)
    start = time.perf_counter()
    try:
        rows = run_experiment(cfg, log=(print if args.verbose else lambda s: None))
    except Exception as err:  # noqa: BLE001 - one cell's failure must not stop the others
        message = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        failures[f"{cell.method}/seed{cell.seed}"] = message
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "error.txt").write_text(traceback.format_exc())
        return f"FAILED after {time.perf_counter() - start:.0f} s: {message}"
    failures.pop(f"{cell.method}/seed{cell.seed}", None)
    seconds = time.perf_counter() - start
    budget = budget_records(rows)
    atomic_write_json(folder / DONE, {
        "cell": str(cell), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": seconds,
        "device": cfg.resolved_device(), "rows": len(rows), "settings": cell_settings(cfg),
        "budget": {k: budget[0][k] for k in ("steps", "best_step", "stop_reason", "improving_at_stop")} if budget else None,
    })
    archive_cell(cell, args)
    stop = f", {budget[0]['steps']} steps, stopped on {budget[0]['stop_reason']}" if budget else ""
    flag = " while still improving (!)" if budget and budget[0]["improving_at_stop"] else ""
    return f"done in {seconds:.0f} s{stop}{flag}"


def run_keys(keys: Sequence[str], args: argparse.Namespace) -> None:
    """Run every requested cell that is not finished, key by key; rebuild each key's report after it."""
    cells = requested_cells(keys, args)
    todo = [c for c in cells if cell_state(c, args) != "done" or args.force]
    print(f"{len(cells)} cells requested, {len(cells) - len(todo)} finished, {len(todo)} to run", flush=True)
    for key in keys:
        mine = [c for c in cells if c.key == key]
        if not mine:
            continue
        try:
            _data_path(SPECS[key], args)
        except FileNotFoundError as err:
            print(f"[{key}] skipped: {err}", file=sys.stderr, flush=True)
            continue
        runs, ledger = Path(args.runs) / key, ledger_dir(args) / key
        failures = _read_failures(runs, ledger)
        for cell in mine:
            outcome = run_cell(cell, args, failures)
            print(f"[{cell}] {outcome}", flush=True)
            _write_failures(runs, failures, ledger)
        report_key(key, args)


def _read_failures(runs: Path, ledger: Path | None = None) -> dict[str, str]:
    """``{"<method>/seed<k>": message}`` of the cells that failed: the ledger's, then the run folder's."""
    merged: dict[str, str] = {}
    for path in ((ledger / "failures.json",) if ledger else ()) + (runs / "failures.json",):
        if path.is_file():
            try:
                merged.update(json.loads(path.read_text()))
            except ValueError:
                pass  # a damaged file loses its entries, never the suite
    return merged


def _write_failures(runs: Path, failures: dict[str, str], ledger: Path | None = None) -> None:
    from flowtransfer.io import atomic_write_json

    for folder in (runs, *((ledger,) if ledger else ())):
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "failures.json", failures)


def live_failures(key: str, args: argparse.Namespace) -> dict[str, str]:
    """The recorded failures of ``key`` less those of cells finished since (here or elsewhere)."""
    failures = _read_failures(Path(args.runs) / key, ledger_dir(args) / key)
    out = {}
    for name, message in failures.items():
        method, _, seed = name.partition("/seed")
        if not seed.isdigit() or cell_state(Cell(key, method, int(seed)), args) != "done":
            out[name] = message
    return out


def missing_cells(keys: Sequence[str], args: argparse.Namespace) -> list[Cell]:
    """Requested cells without a finished marker."""
    return [c for c in requested_cells(keys, args) if cell_state(c, args) != "done"]


def format_missing(cells: Sequence[Cell]) -> str:
    """``missing: avmnist/dicmor seeds 3,4; ...`` grouped by key and method, or ``missing: none``."""
    if not cells:
        return "missing: none"
    groups: dict[tuple[str, str], list[int]] = {}
    for c in cells:
        groups.setdefault((c.key, c.method), []).append(c.seed)
    parts = [f"{k}/{m} seed{'s' if len(s) > 1 else ''} {','.join(map(str, s))}" for (k, m), s in groups.items()]
    return f"missing ({len(cells)} cells): " + "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# planning: measured steps per second, never extrapolated results
# --------------------------------------------------------------------------------------------------


def measure_method(cell: Cell, args: argparse.Namespace, splits: dict[str, Any]) -> dict[str, Any]:
    """Train ``cell``'s method for 2 short epochs of ``--plan-steps`` steps per stage (the first
    epoch of each stage is the warm-up) and time a validation pass.

    Returns ``{"rates": {stage: steps per second}, "valid_seconds": s}``; the rate of a stage is
    its second epoch's steps over that epoch's seconds less one validation pass.
    """
    import tempfile

    from flowtransfer.experiment import train_method
    from flowtransfer.training import evaluate

    epochs: list[tuple[str, int, int, float]] = []

    def record(trainer: Any, rec: dict[str, Any]) -> None:
        previous = trainer.history[-2]["steps"] if len(trainer.history) > 1 else 0
        stage = str(getattr(trainer.method, "stage", None) or "single")
        epochs.append((stage, int(rec["epoch"]), int(rec["steps"]) - int(previous), float(rec["seconds"])))

    with tempfile.TemporaryDirectory() as tmp:
        cfg = cell_config(cell, args, epochs=2, max_steps_per_epoch=args.plan_steps, max_steps=None,
                          early_stop_patience=None, out=tmp, progress=False, resume=False)
        cfg.validate()
        method, _ = train_method(cell.method, splits["train"], splits["valid"], cfg, cell.seed, Path(tmp) / "ckpt",
                                 on_epoch_end=record)
    start = time.perf_counter()
    evaluate(method, splits["valid"])
    valid_seconds = time.perf_counter() - start
    rates: dict[str, float] = {}
    for stage, epoch, steps, seconds in epochs:
        if epoch == 1 and steps:
            rates[stage] = steps / max(seconds - valid_seconds, 1e-6)
    return {"rates": rates, "valid_seconds": valid_seconds}


def estimate_seconds(cell: Cell, args: argparse.Namespace, splits: dict[str, Any], measured: dict[str, Any]) -> tuple[int, float]:
    """``(planned steps, estimated seconds)`` of one cell: each stage's planned steps (the shared
    cap split by :func:`flowtransfer.experiment.stage_cap`, no early stop) at its measured rate, one
    validation pass per planned epoch, and the test evaluation (one pass per setting)."""
    from flowtransfer.data import evaluation_settings
    from flowtransfer.experiment import stage_cap

    cfg = cell_config(cell, args)
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    tc = cfg.train_config(train.task, cell.seed)
    per_epoch = max(1, tc.steps_per_epoch(len(train)))
    stages = list(measured["rates"])
    total_steps, seconds, used = 0, 0.0, 0
    for i, stage in enumerate(stages):
        cap = stage_cap(cfg.max_steps, len(stages), i, used)
        steps = tc.epochs * per_epoch if cap is None else min(cap, tc.epochs * per_epoch)
        used += steps
        total_steps += steps
        seconds += steps / measured["rates"][stage] + -(-steps // per_epoch) * measured["valid_seconds"]
    n_settings = len(evaluation_settings(train.modalities, cfg.rates, patterns=cfg.patterns))
    seconds += n_settings * measured["valid_seconds"] * len(test) / max(1, len(valid))
    return total_steps, seconds


def plan(keys: Sequence[str], args: argparse.Namespace) -> None:
    """Print every unfinished requested cell with its planned steps and estimated wall time."""
    from flowtransfer.experiment import _clock, load_splits

    grand = 0.0
    for key in keys:
        todo = [c for c in requested_cells([key], args) if cell_state(c, args) != "done" or args.force]
        if not todo:
            print(f"[{key}] every requested cell is finished")
            continue
        try:
            cfg = cell_config(todo[0], args)
        except FileNotFoundError as err:
            print(f"[{key}] skipped: {err}")
            continue
        splits = load_splits(cfg.dataset, cfg.data, cfg.task, cfg.dataset_options)
        measured: dict[str, dict[str, Any]] = {}
        print(f"[{key}] {len(todo)} cells to run; measuring {args.plan_steps} steps per stage of each method "
              f"on {cfg.resolved_device()} ...", flush=True)
        for cell in todo:
            if cell.method not in measured:
                measured[cell.method] = measure_method(cell, args, splits)
                rates = ", ".join(f"{s} {r:.1f} steps/s" for s, r in measured[cell.method]["rates"].items())
                print(f"  {cell.method}: {rates}; validation pass {measured[cell.method]['valid_seconds']:.2f} s",
                      flush=True)
        key_total = 0.0
        for cell in todo:
            steps, seconds = estimate_seconds(cell, args, splits, measured[cell.method])
            key_total += seconds
            print(f"  {cell}: <= {steps} steps, about {_clock(seconds)}")
        grand += key_total
        print(f"[{key}] about {_clock(key_total)} in one process (an upper bound: no early stop assumed)")
    print(f"total about {_clock(grand)} in one process; estimated from measured time only, no result is extrapolated")


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


def _values(rows: Sequence[dict[str, Any]], method: str, setting: str, metric: str) -> list[float]:
    return [float(r[metric]) for r in rows if r["method"] == method and r["setting"] == setting
            and r.get(metric) is not None and math.isfinite(float(r[metric]))]


def _best(rows: Sequence[dict[str, Any]], methods: Sequence[str], setting: str, metric: str, higher: bool,
          exclude: str | None = None) -> str | None:
    means = {m: statistics.fmean(v) for m in methods if m not in BOUNDS and m != exclude
             for v in [_values(rows, m, setting, metric)] if v}
    return (max if higher else min)(means, key=means.get) if means else None


def paired_markdown(rows: Sequence[dict[str, Any]], metric: str, higher: bool, reference: str = "zero_fill") -> str:
    """Paired per-seed differences of every method against ``reference`` and against the best
    other (non-bound) method at each setting, 95% t intervals; ``*``: distinguishable from zero."""
    from paired_differences import paired_by_seed

    from flowtransfer.training.results import PERCENT_METRICS

    scale = 100.0 if metric in PERCENT_METRICS else 1.0
    digits = 1 if scale == 100.0 else 3
    methods = list(dict.fromkeys(r["method"] for r in rows))
    settings = [s for s in _setting_order(list(dict.fromkeys(r["setting"] for r in rows))) if s != "complete"]
    unit = " points" if scale == 100.0 else ""
    lines = [f"Paired differences on **{metric}** (method minus the other, per seed{unit}; mean "
             f"[95% t interval]; `*` = the interval excludes 0; {'higher' if higher else 'lower'} is better)", ""]
    for title, pick in ((f"against {reference}", lambda m, s: reference),
                        ("against the best other method (by mean, bounds excluded)",
                         lambda m, s: _best(rows, methods, s, metric, higher, exclude=m))):
        others = [m for m in methods if m != reference] if "best" not in title else methods
        if "best" not in title and reference not in methods:
            lines += [f"*{title}*: {reference} has no finished cell", ""]
            continue
        lines += [f"*{title}*", "", "| setting | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
        for s in settings:
            cells = []
            for m in others:
                other = pick(m, s)
                d = None if other is None else paired_by_seed(rows, metric, m, other, s)
                text = "-" if d is None else d.format(scale=scale, digits=digits)
                cells.append(text if "best" not in title or d is None else f"{text} vs {other}")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def capped_note(rows: Sequence[dict[str, Any]]) -> str:
    """One line saying which settings :func:`paired_differences.capped_settings` leaves out or
    relabels ('' if none)."""
    from paired_differences import capped_settings

    same, realised = capped_settings(rows)
    bits = [f"{s} realised exactly {t}'s rate in every seed, so the same (nested) masks: not shown"
            for s, t in same.items()]
    bits += [f"{s} realises MR {v:.3f}" for s, v in realised.items()]
    if bits:
        bits.append("every sample keeps at least one modality, so MR cannot exceed (M-1)/M "
                    "(0.5 with two modalities, 0.667 with three); small splits also round")
    return "; ".join(bits) + "." if bits else ""


def drop_capped(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` less the settings that copy a lower setting's masks
    (:func:`paired_differences.capped_settings`)."""
    from paired_differences import capped_settings

    same, _ = capped_settings(rows)
    return [r for r in rows if r["setting"] not in same]


def headline_markdown(key: str, rows: list[dict[str, Any]], failures: dict[str, str], task: str,
                      missing: Sequence[Cell] = ()) -> str:
    """Methods as columns, settings as rows (headline metric, mean ± std over seeds), the best
    non-bound method per setting, training steps and how runs stopped, mean training time, the
    paired differences, failures and missing cells. ``(!)`` marks a method that stopped on the cap
    or the epoch limit while still improving in some seed."""
    from flowtransfer.training.results import PERCENT_METRICS, budget_records, unconverged

    note = capped_note(rows)
    rows = drop_capped(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    flagged = {m for m, _ in unconverged(rows)}
    names = [m + (" (!)" if m in flagged else "") for m in methods]
    settings = _setting_order(list(dict.fromkeys(r["setting"] for r in rows)))
    budgets = budget_records(rows)
    blocks = []
    for metric, higher in HEADLINE[task]:
        percent = metric in PERCENT_METRICS
        lines = [f"**{metric}**{' (%)' if percent else ''}, {'higher' if higher else 'lower'} is better; "
                 f"best = best mean among non-bound methods (bounds: {', '.join(sorted(BOUNDS))})", "",
                 "| setting | " + " | ".join(names) + " | best |",
                 "|---|" + "---|" * (len(methods) + 1)]
        for s in settings:
            cells = [_fmt(_values(rows, m, s, metric), percent) for m in methods]
            lines.append(f"| {s} | " + " | ".join(cells) + f" | {_best(rows, methods, s, metric, higher) or '-'} |")
        steps, stops, secs = [], [], []
        for m in methods:
            mine = [b for b in budgets if b["method"] == m]
            v = [float(b["steps"]) for b in mine]
            steps.append("-" if not v else f"{v[0]:.0f}" if len(v) == 1 else f"{statistics.mean(v):.0f} ± {statistics.stdev(v):.0f}")
            counts: dict[str, int] = {}
            for b in mine:
                counts[str(b["stop_reason"])] = counts.get(str(b["stop_reason"]), 0) + 1
            stops.append(", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "-")
            t = list({int(r["seed"]): float(r["train_seconds"]) for r in rows
                      if r["method"] == m and r.get("train_seconds") is not None}.values())
            secs.append("-" if not t else f"{t[0]:.0f}" if len(t) == 1 else f"{statistics.mean(t):.0f} ± {statistics.stdev(t):.0f}")
        lines.append("| steps | " + " | ".join(steps) + " | |")
        lines.append("| stopped on | " + " | ".join(stops) + " | |")
        lines.append("| train s | " + " | ".join(secs) + " | |")
        lines += validation_lines(rows, methods)
        if flagged:
            lines += ["", "(!) stopped on the step cap or the epoch limit while still improving in some seed: "
                      "not converged at this budget"]
        if note:
            lines += ["", note]
        blocks.append("\n".join(lines))
        blocks.append(paired_markdown(rows, metric, higher))
    if failures:
        blocks.append("\n".join(f"- `{m}`: failed: {e}" for m, e in failures.items()))
    if missing:
        blocks.append(format_missing(missing))
    return f"### {key}\n\n" + "\n\n".join(blocks) + "\n"


def validation_lines(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[str]:
    """Two table rows: each method's selected validation score (``valid_score``, the trainer's
    monitor) and the same metric on the test split under the setting it was selected on (complete
    data for methods trained on complete data, ``mr=0.3`` for the others: the runner's validation
    mask), so the gap between the split that chose the model and the one that scores it shows."""
    from flowtransfer.experiment import COMPLETE_DATA_METHODS
    from flowtransfer.training.results import PERCENT_METRICS

    monitors = {str(r.get("valid_monitor")) for r in rows if r.get("valid_monitor")}
    if len(monitors) != 1:
        return []
    monitor = monitors.pop()
    percent = monitor in PERCENT_METRICS
    valid, test = [], []
    for m in methods:
        v = list({int(r["seed"]): float(r["valid_score"]) for r in rows
                  if r["method"] == m and isinstance(r.get("valid_score"), (int, float))}.values())
        valid.append(_fmt(v, percent) if v else "-")
        setting = "complete" if m == "upper_bound" else ("mr=0.0" if m in COMPLETE_DATA_METHODS else "mr=0.3")
        test.append(_fmt(_values(rows, m, setting, monitor), percent) + f" ({setting})")
    return [f"| valid {monitor} (selection) | " + " | ".join(valid) + " | |",
            f"| test {monitor}, same setting | " + " | ".join(test) + " | |"]


def collect_rows(key: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows of every finished cell of ``key`` (restricted to ``--methods``/``--seeds`` when given)."""
    from flowtransfer.training.results import read_results

    rows: list[dict[str, Any]] = []
    for (method, seed), marker in finished_markers(key, args).items():
        if args.methods and method not in args.methods:
            continue
        if args.seeds is not None and seed not in args.seeds:
            continue
        for r in read_results(marker.parent):
            r["dataset"] = key
            rows.append(r)
    return rows


def _budget_line(key: str, args: argparse.Namespace) -> str:
    """The training budgets of the finished cells of ``key`` (one line per distinct budget)."""
    keep = ("preset", "epochs", "max_steps", "early_stop_patience", "lr_plateau_patience", "batch_size", "lr",
            "max_steps_per_epoch", "dataset_options", "train_eta", "train_eta_modality")
    seen: dict[str, None] = {}
    for marker in finished_markers(key, args).values():
        s = json.loads(marker.read_text()).get("settings", {})
        seen.setdefault(", ".join(f"{k}={s.get(k)}" for k in keep), None)
    if not seen:
        return "budget: -"
    lines = list(seen)
    return "budget: " + lines[0] if len(lines) == 1 else "budgets differ between cells:\n" + "\n".join(lines)


def report_key(key: str, args: argparse.Namespace) -> None:
    """Rebuild every file of ``key`` in ``args.out`` from its finished cells; print what is missing."""
    from flowtransfer.experiment import main_metrics
    from flowtransfer.training import format_table, summarise
    from flowtransfer.training.results import UNCONVERGED_MARK, format_budget_table, unconverged, write_results

    spec = SPECS[key]
    sync_ledger(key, args)
    rows = collect_rows(key, args)
    failures = live_failures(key, args)
    missing = missing_cells([key], args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not rows:
        print(f"[{key}] no finished cell yet; {format_missing(missing)}", flush=True)
        return
    write_results(rows, out, name=f"compare_{key}{args.tag}_results")
    (out / f"compare_{key}{args.tag}_results.json").unlink(missing_ok=True)
    metrics = main_metrics(spec.task) + ["fd_recovered", "fd_zero_fill", "fd_mean_fill", "train_seconds"]
    metrics = [m for m in metrics if any(r.get(m) is not None for r in rows)]
    seeds = sorted({int(r["seed"]) for r in rows})
    header = (f"compare_methods: {key} (dataset={spec.dataset}, task={spec.task}"
              + (f", train_eta={spec.train_eta} on {spec.train_eta_modality}" if spec.train_eta else "")
              + f") seeds {seeds}; mean ± std over seeds; percentages x100; fd_* Fréchet distances (lower closer); "
              f"train_seconds = wall time of training\n{_budget_line(key, args)}\n")
    fail_text = "".join(f"{m}: failed: {e}\n" for m, e in failures.items())
    marks = {m: UNCONVERGED_MARK for m, _ in unconverged(rows)}
    shown = drop_capped(rows)  # the CSV keeps every row; tables and curves leave out copied settings
    table = (format_table(summarise(shown), metrics=metrics, marks=marks) + "\n" + format_budget_table(rows)
             + (capped_note(rows) + "\n" if capped_note(rows) else ""))
    (out / f"compare_{key}{args.tag}_table.txt").write_text(
        header + table + "\n" + fail_text + format_missing(missing) + "\n")
    (out / f"compare_{key}{args.tag}_headline.md").write_text(
        headline_markdown(key, rows, failures, spec.task, missing))
    if not spec.smil_setting:
        import matplotlib.pyplot as plt

        from flowtransfer.plots import plot_missing_rate_curves

        metric = HEADLINE[spec.task][0][0]
        # 12 methods: a 12-colour cycle (the default has 10) and the legend outside the axes
        colours = [plt.get_cmap("tab20")(i) for i in range(0, 20, 2)] + ["#000000", "#000080"]
        with plt.rc_context({"axes.prop_cycle": plt.cycler(color=colours)}):
            fig, ax = plt.subplots(figsize=(8.5, 4.6))
            plot_missing_rate_curves(shown, metric=metric, title=f"{key}: {metric} vs missing rate (test)", ax=ax)
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
        fig.savefig(out / f"compare_{key}{args.tag}_curves.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
    print(f"[{key}] report written ({len(rows)} rows, seeds {seeds}, failures {sorted(failures)}); "
          f"{format_missing(missing)}", flush=True)


#: metrics that pool over disjoint test folds as sample-weighted means (counts over samples)
POOLABLE = ("acc", "f1_weighted", "acc2_non0", "acc2_has0", "acc7", "acc5", "mae")


def pool_folds(rows_by_fold: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (method, setting, seed) over disjoint test folds: each metric of :data:`POOLABLE`
    as the mean over folds weighted by each fold's test-sample count ``n`` (exactly the metric on the
    pooled test samples for accuracies and MAE; ``acc2_non0`` weights by ``n`` too, so it is exact up
    to the folds' shares of zero labels). Other metrics (correlations, F1 macro) do not pool and are
    left out. Only (method, setting, seed) present in every fold are pooled. ``steps`` is the mean
    over the folds' trainings; ``stop_reason`` the folds' common reason, or ``"mixed"``."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for rows in rows_by_fold:
        for r in rows:
            groups.setdefault((r["method"], r["setting"], int(r["seed"])), []).append(r)
    pooled = []
    for (method, setting, seed), group in groups.items():
        if len(group) != len(rows_by_fold):
            continue
        n = [float(r.get("n") or 0) for r in group]
        total = sum(n)
        row: dict[str, Any] = {"method": method, "dataset": "mosi_folds", "setting": setting, "seed": seed, "n": total}
        for metric in POOLABLE:
            values = [r.get(metric) for r in group]
            if total and all(isinstance(v, (int, float)) for v in values):
                row[metric] = sum(w * v for w, v in zip(n, values)) / total
        rates = [r.get("realised_missing_rate") for r in group]
        if total and all(isinstance(v, (int, float)) for v in rates):  # the pooled test set's rate
            row["realised_missing_rate"] = sum(w * v for w, v in zip(n, rates)) / total
        # budgets: the mean steps over the folds' trainings, "plateau" only if every fold stopped there
        steps = [float(r["steps"]) for r in group if isinstance(r.get("steps"), (int, float))]
        row["steps"] = sum(steps) / len(steps) if steps else None
        reasons = {str(r.get("stop_reason")) for r in group}
        row["stop_reason"] = reasons.pop() if len(reasons) == 1 else "mixed"
        row["improving_at_stop"] = any(bool(r.get("improving_at_stop")) for r in group)
        pooled.append(row)
    return pooled


def report_pooled_folds(args: argparse.Namespace) -> None:
    """``compare_mosi_folds_pooled_*``: the five held-out folds' test sets pooled (see :func:`pool_folds`)."""
    from flowtransfer.training import format_table, summarise
    from flowtransfer.training.results import write_results

    keys = ALIASES["mosi_folds"]
    per_fold = [collect_rows(k, args) for k in keys]
    if not all(per_fold):
        print("[mosi_folds] pooled report needs every fold finished for some cell; "
              f"folds with results: {[k for k, r in zip(keys, per_fold) if r]}", flush=True)
        return
    rows = pool_folds(per_fold)
    out = Path(args.out)
    write_results(rows, out, name=f"compare_mosi_folds_pooled{args.tag}_results")
    (out / f"compare_mosi_folds_pooled{args.tag}_results.json").unlink(missing_ok=True)
    metrics = [m for m in POOLABLE if any(m in r for r in rows)]
    (out / f"compare_mosi_folds_pooled{args.tag}_table.txt").write_text(
        "compare_methods: the 5 held-out MOSI folds, test folds pooled (sample-weighted over folds); "
        "mean ± std over seeds\n" + format_table(summarise(rows), metrics=metrics) + "\n")
    (out / f"compare_mosi_folds_pooled{args.tag}_headline.md").write_text(
        headline_markdown("mosi_folds (pooled)", rows, {}, "regression", []))
    print(f"[mosi_folds] pooled report written ({len(rows)} rows)", flush=True)


#: the settings the comparison's summary reads DiCMoR against the best baseline at
SUMMARY_SETTINGS = ("mr=0.3", "mr=0.5", "mr=0.7")


def dicmor_vs_best(rows: Sequence[dict[str, Any]], metric: str, higher: bool,
                   settings: Sequence[str] = SUMMARY_SETTINGS) -> list[dict[str, Any]]:
    """Per setting: DiCMoR's mean, the best other non-bound method by mean among those with at least
    DiCMoR's number of seeds, and DiCMoR minus it paired by seed
    (:func:`paired_differences.paired_by_seed`); empty without a finished DiCMoR."""
    from paired_differences import paired_by_seed

    methods = list(dict.fromkeys(r["method"] for r in rows))
    if "dicmor" not in methods:
        return []
    out = []
    for s in settings:
        mine = _values(rows, "dicmor", s, metric)
        # candidates: methods with at least DiCMoR's seeds here (a mean over fewer seeds is not comparable)
        full = [m for m in methods if m == "dicmor" or len(_values(rows, m, s, metric)) >= len(mine)]
        best = _best(rows, full, s, metric, higher, exclude="dicmor")
        if best is None or not mine:
            continue
        out.append({"setting": s, "dicmor": statistics.mean(mine), "best": best,
                    "best_mean": statistics.mean(_values(rows, best, s, metric)),
                    "diff": paired_by_seed(rows, metric, "dicmor", best, s)})
    return out


def verdict_lines(summary: Sequence[tuple[str, dict[str, Any]]], higher: dict[str, bool]) -> list[str]:
    """Plain statements from :func:`dicmor_vs_best` rows ``(dataset, row)``: per dataset, the
    settings where DiCMoR wins (interval above 0 in the better direction), loses (below) or cannot
    be told apart from the best other method, and to what. One seed decides nothing."""
    lines = []
    for key in dict.fromkeys(k for k, _ in summary):
        won, lost, tied, single = [], [], [], []
        for k, c in summary:
            if k != key:
                continue
            d = c["diff"]
            where = f"{c['setting']} (vs {c['best']})"
            if d is None or d.n < 2:
                single.append(where)
            elif not d.distinguishable:
                tied.append(where)
            elif (d.mean > 0) == higher[key]:
                won.append(where)
            else:
                lost.append(where)
        bits = [f"wins at {', '.join(won)}" if won else "", f"loses at {', '.join(lost)}" if lost else "",
                f"is within noise at {', '.join(tied)}" if tied else "",
                f"has one seed only at {', '.join(single)}" if single else ""]
        lines.append(f"- **{key}**: DiCMoR " + "; ".join(b for b in bits if b) + ".")
    return lines


def comparison_command(keys: Sequence[str], args: argparse.Namespace, path: Path) -> str:
    """The command that rebuilds this comparison: the datasets (folds as ``mosi_folds``) and every
    option that selects which cells it reads (cap, tag, runs folder) when not the default."""
    default = build_parser().get_default
    parts = ["python benchmarks/compare_methods.py", f"--datasets {','.join(keys)}", "--report-only"]
    if args.max_steps != default("max_steps"):
        parts.append(f"--max-steps {_cap_text(args.max_steps)}")
    if args.tag:
        parts.append(f"--tag {args.tag}")
    if Path(args.runs).resolve() != Path(default("runs")).resolve():
        parts.append(f"--runs {_relative(Path(args.runs))}")
    parts.append(f"--comparison {_relative(path)}")
    return " ".join(parts)


def _cap_text(max_steps: int | None) -> str:
    """``--max-steps`` as the command line spells it (``none`` = no cap)."""
    return "none" if max_steps is None else str(max_steps)


def _relative(path: Path) -> str:
    """``path`` relative to the repository root where it lies inside it, else as given."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def write_comparison(keys: Sequence[str], args: argparse.Namespace, path: Path) -> None:
    """``COMPARISON.md``: what was run (budgets, seeds), DiCMoR against the best baseline at MR 0.3 /
    0.5 / 0.7 per dataset with paired 95% intervals, every cell still missing, then each dataset's
    headline tables (rebuilt from the finished cells, never extrapolated)."""
    from flowtransfer.training.results import PERCENT_METRICS

    parts = ["# Every method on the same footing (issue 11)", "",
             f"Built by `{comparison_command(keys, args, path)}` "
             "from the finished cells only (one folder per dataset, method and seed). Budget rule: every method "
             "trains to the validation plateau (early stopping, LR on plateau) under one cap of "
             f"{_cap_text(args.max_steps)} optimiser steps; "
             "DiCMoR's two stages share that cap. `(!)` marks a method that hit the cap while still improving.", "",
             "## DiCMoR against the best other method (bounds excluded), paired by seed", "",
             "Best other = the best mean among methods with at least DiCMoR's seeds in that cell.", "",
             "| dataset | setting | dicmor | best other | its score | dicmor - best [95% t] |", "|---|---|---|---|---|---|"]
    blocks, missing_all, capped, summary, against_zero, higher_of = [], [], [], [], [], {}
    for key in keys:
        rows = pool_folds([collect_rows(k, args) for k in ALIASES["mosi_folds"]]) if key == "mosi_folds" \
            else collect_rows(key, args)
        if not rows:
            continue
        task = "regression" if key == "mosi_folds" else SPECS[key].task
        metric, higher = HEADLINE[task][0]
        scale = 100.0 if metric in PERCENT_METRICS else 1.0
        from paired_differences import capped_settings

        same, realised = capped_settings(rows)
        capped += [f"{key}: {s} = {t}" for s, t in same.items() if s in SUMMARY_SETTINGS]
        capped += [f"{key}: {s} realises {v:.3f}" for s, v in realised.items() if s in SUMMARY_SETTINGS]
        higher_of[key] = higher
        for c in dicmor_vs_best(drop_capped(rows), metric, higher):
            summary.append((key, c))
            if any(r["method"] == "zero_fill" and r["setting"] == c["setting"] for r in rows):
                from paired_differences import paired_by_seed

                against_zero.append((key, {"setting": c["setting"], "best": "zero_fill",
                                           "diff": paired_by_seed(rows, metric, "dicmor", "zero_fill", c["setting"])}))
            d = c["diff"]
            parts.append(f"| {key} | {c['setting']} | {scale * c['dicmor']:.1f} | {c['best']} | "
                         f"{scale * c['best_mean']:.1f} | {'-' if d is None else d.format(scale=scale, digits=1)} |")
        name = "mosi_folds_pooled" if key == "mosi_folds" else key
        head = Path(args.out) / f"compare_{name}{args.tag}_headline.md"
        if head.exists():
            budget = "" if key == "mosi_folds" else _budget_line(key, args) + "\n\n"
            blocks.append(budget + head.read_text())
        missing_all += missing_cells(list(ALIASES["mosi_folds"]) if key == "mosi_folds" else [key], args)
    if capped:
        parts += ["", "Every sample keeps at least one modality, so MR is capped at (M-1)/M: "
                  + "; ".join(capped) + " (a setting equal to a lower one has the same masks and is not repeated)."]
    parts += ["", "`*`: the interval excludes 0. With one seed there is no interval.", "",
              "In words (from the intervals above; 'within noise' = the 95% interval covers 0):", "",
              *verdict_lines(summary, higher_of), "", "Against zero filling (the floor every method must clear):", "",
              *verdict_lines(against_zero, higher_of), "",
              "## Missing cells (not run; nothing here is extrapolated)", "", format_missing(missing_all), ""]
    parts += ["## Per dataset", ""] + blocks
    path.write_text("\n".join(parts) + "\n")
    print(f"comparison written to {path}", flush=True)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def _device(text: str) -> str:
    if text not in ("auto", "cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"--device must be auto, cpu or cuda, got {text!r}")
    return text


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "") else int(text)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--dataset-options must be a JSON object: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--dataset-options must be a JSON object, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", type=parse_keys, default=None,
                   help="comma-separated keys: synthetic, mosi, mosi_fold0..4 (mosi_folds), avmnist, avmnist_smil "
                        "(= avmnist_smil_eta10,avmnist_smil_eta20) (default: all; --quick: synthetic)")
    p.add_argument("--methods", type=parse_methods, default=None,
                   help="comma-separated method names (default: all; the report: every finished method)")
    p.add_argument("--smil-methods", type=parse_methods, default=SMIL_METHODS,
                   help="methods run in SMIL's setting (default: smil,zero_fill,modality_dropout,specialists,upper_bound)")
    p.add_argument("--seeds", type=parse_seeds, default=None,
                   help="a count (0..n-1) or a comma-separated list such as 0, or 0,3,4 (default: 5 seeds; "
                        "the report: every finished seed)")
    p.add_argument("--max-steps", type=_optional_int, default=2000,
                   help="the one cap of optimiser steps for every method; a two-stage method shares it between "
                        "its stages (default 2000; 'none' = no cap)")
    p.add_argument("--epochs", type=int, default=200, help="safety limit on epochs per stage (default 200)")
    p.add_argument("--patience", type=int, default=6, help="early stopping patience in epochs (default 6)")
    p.add_argument("--lr-patience", type=int, default=2,
                   help="epochs without improvement before the learning rate is halved (default 2)")
    p.add_argument("--device", type=_device, default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--comparison", default=None,
                   help="also write this COMPARISON.md from the finished cells (e.g. benchmarks/COMPARISON.md)")
    p.add_argument("--preset", default=None,
                   help="model preset for every method (small, avmnist, mosi, mosei; default: the dataset's, "
                        "see flowtransfer.methods.preset_for_dataset)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-steps-per-epoch", type=int, default=None)
    p.add_argument("--max-per-split", type=int, default=None, help="AV-MNIST: keep only the first k images per split")
    p.add_argument("--dataset-options", type=_json_object, default=None,
                   help='loader options for every dataset, as JSON (e.g. \'{"n_train": 64}\' for the synthetic data)')
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--data-root", default=None, help="the shared data folder (default: flowtransfer's lookup)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compare"),
                   help="tables, plots and (in cells/) the ledger (default benchmarks/results/compare)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "compare"))
    p.add_argument("--ledger", default=None,
                   help="the committed record of finished cells (results and markers, no checkpoints; default "
                        "<out>/cells<tag>): a cell finished there under this command's settings counts as finished, "
                        "so a new checkout resumes the suite")
    p.add_argument("--import-results", default=None, metavar="CSV",
                   help="write ledger cells from a compare_<key>_results.csv of the one key given in --datasets, "
                        "under this command's settings (recovering cells whose runs folder was lost); runs nothing")
    p.add_argument("--tag", default="", help="suffix of the result file names (e.g. _long for another budget)")
    p.add_argument("--force", action="store_true", help="rerun the named cells even when finished")
    p.add_argument("--skip-done", action="store_true", help=argparse.SUPPRESS)  # finished cells are always skipped
    p.add_argument("--report-only", action="store_true", help="only rebuild the result files from the finished cells")
    p.add_argument("--plan", action="store_true",
                   help="print the unfinished cells and their estimated cost from measured steps per second; run nothing")
    p.add_argument("--plan-steps", type=int, default=5, help="steps per stage timed by --plan (default 5)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke test: synthetic data (96/48/64 samples), 1 seed, 2 epochs of 2 steps, a cap "
                        "of 4 steps, MR 0.0/0.5 only; writes to runs/compare_quick")
    p.add_argument("--progress", action="store_true", help="progress bars / lines")
    p.add_argument("--verbose", action="store_true", help="run_experiment's log lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.datasets = args.datasets or ["synthetic"]
        args.seeds = args.seeds or (0,)
        args.epochs, args.max_steps_per_epoch, args.max_steps = 2, 2, 4
        args.runs = str(ROOT / "runs" / "compare_quick" / "runs")
        args.out = str(ROOT / "runs" / "compare_quick" / "results")
        if "avmnist" in " ".join(args.datasets) and not args.max_per_split:
            args.max_per_split = 200
        for k in args.datasets:
            if not SPECS[k].smil_setting:
                SPECS[k].rates = (0.0, 0.5)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda was asked for but this machine has no usable CUDA device; use cpu or auto",
              file=sys.stderr)
        return 2
    args.datasets = args.datasets or list(SPECS)
    if args.data_root is None:
        from flowtransfer.data.paths import shared_data_dir

        args.data_root = str(shared_data_dir())
    start = time.perf_counter()
    if args.import_results:
        if len(args.datasets) != 1:
            print("error: --import-results needs exactly one key in --datasets", file=sys.stderr)
            return 2
        cells = import_results(args.import_results, args.datasets[0], args)
        print(f"imported {len(cells)} cells into {ledger_dir(args) / args.datasets[0]}", flush=True)
        return 0
    if args.plan:
        plan(args.datasets, args)
    elif args.report_only:
        for key in args.datasets:
            report_key(key, args)
    else:
        run_keys(args.datasets, args)
        print(format_missing(missing_cells(args.datasets, args)), flush=True)
    if not args.plan and all(k in args.datasets for k in ALIASES["mosi_folds"]):
        report_pooled_folds(args)
    if args.comparison and not args.plan:
        keys = [k for k in args.datasets if not k.startswith("mosi_fold")]
        if all(k in args.datasets for k in ALIASES["mosi_folds"]):
            keys.append("mosi_folds")
        write_comparison(keys, args, Path(args.comparison))
    print(f"total {time.perf_counter() - start:.0f} s; results in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
