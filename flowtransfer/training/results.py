"""Result rows, results.csv / results.json, and mean ± std summaries over seeds.

A result row is a plain dict, one per (method, dataset, setting, seed)::

    {"method": "dicmor", "dataset": "mosi", "setting": "mr=0.3", "seed": 1111,
     "realised_missing_rate": 0.301, "acc2_non0": 0.78, ..., "mae": 0.91, "train_seconds": 41.2}

Identity columns come first in a fixed order (:data:`ID_COLUMNS`), then every other column in the
order it first appears across the rows (the metric keys, united over rows), then
``train_seconds``. A cell a row lacks is empty in the CSV and ``null`` in the JSON.

:func:`summarise` groups rows (by method, dataset and setting by default) and reports, for every
numeric column, ``<col>_mean`` and ``<col>_std`` over seeds. The standard deviation is the sample
one (``ddof=1``) when a group has more than one seed, and **0 for a single seed** (``n_seeds`` says
how many there were; :func:`format_table` then shows the mean alone). NaN values propagate.

Budget columns (:data:`BUDGET_COLUMNS`, written by :func:`flowtransfer.experiment.run_experiment`):
``steps`` and ``best_step`` (optimiser steps taken, and taken when the selected weights were
recorded), ``stop_reason`` (``plateau``, ``cap`` or ``epochs``) and ``improving_at_stop`` (True
when the run ended on the cap or the epoch limit while the validation score was still improving).
:func:`format_budget_table` shows them per method, :func:`unconverged` lists the methods and seeds
that stopped while still improving; ``format_table(..., marks=...)`` flags those methods.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flowtransfer.io import atomic_write_text
from flowtransfer.metrics import format_mean_std

__all__ = [
    "ID_COLUMNS",
    "PERCENT_METRICS",
    "result_row",
    "result_columns",
    "write_results",
    "read_results",
    "summarise",
    "format_table",
    "BUDGET_COLUMNS",
    "budget_records",
    "unconverged",
    "format_budget_table",
]

#: columns that identify a row, in this order, before every metric column
ID_COLUMNS: tuple[str, ...] = ("method", "dataset", "setting", "seed", "realised_missing_rate")
#: columns kept last
_TRAILING: tuple[str, ...] = ("train_seconds",)
#: columns read back as strings / ints whatever they look like
_STRING_COLUMNS = ("method", "dataset", "setting")
_INT_COLUMNS = ("seed",)
#: metrics that are rates in [0, 1] and shown as percentages by :func:`format_table`
PERCENT_METRICS: frozenset[str] = frozenset(
    {"acc", "f1_macro", "f1_weighted", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7", "acc3"}
)
#: the training-budget columns of a result row (the same in every setting row of a training)
BUDGET_COLUMNS: tuple[str, ...] = ("steps", "best_step", "stop_reason", "improving_at_stop")
#: summary columns that are not per-metric statistics
_SUMMARY_META = ("n_seeds", "seeds")


def result_row(
    method: str,
    dataset: str,
    setting: str,
    seed: int,
    metrics: Mapping[str, float],
    realised_missing_rate: float | None = None,
    train_seconds: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One result row with the identity columns first; ``metrics`` may not reuse their names."""
    clash = set(metrics) & (set(ID_COLUMNS) | set(_TRAILING))
    if clash:
        raise ValueError(f"metric names clash with result columns: {sorted(clash)}")
    row: dict[str, Any] = {
        "method": str(method),
        "dataset": str(dataset),
        "setting": str(setting),
        "seed": int(seed),
        "realised_missing_rate": None if realised_missing_rate is None else float(realised_missing_rate),
    }
    row.update({str(k): float(v) for k, v in metrics.items()})
    row.update(extra)
    row["train_seconds"] = None if train_seconds is None else float(train_seconds)
    return row


def result_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Column order: present identity columns, other keys by first appearance, then trailing ones."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(str(key), None)
    head = [c for c in ID_COLUMNS if c in seen]
    tail = [c for c in _TRAILING if c in seen]
    middle = [c for c in seen if c not in head and c not in tail]
    return head + middle + tail


def _check_rows(rows: Any) -> list[Mapping[str, Any]]:
    if isinstance(rows, Mapping) or not isinstance(rows, Iterable):
        raise TypeError("rows must be a sequence of dicts (one per method, dataset, setting, seed)")
    rows = list(rows)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"row {i} is a {type(row).__name__}, expected a dict")
    return rows


def _plain(value: Any) -> Any:
    """JSON-ready scalar: numpy scalars to Python, NaN/inf floats to None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return repr(value)  # shortest round-tripping form; nan -> "nan"
    return str(value)


def write_results(
    rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, name: str = "results"
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.csv`` and ``<out_dir>/<name>.json`` atomically.

    The CSV has one header line and one line per row (columns from :func:`result_columns`); the
    JSON is a list of row objects with the same key order (non-finite floats become ``null``).

    Returns:
        ``(csv_path, json_path)``.
    """
    rows = _check_rows(rows)
    columns = result_columns(rows)
    out_dir = Path(out_dir)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row.get(c)) for c in columns])
    csv_path = atomic_write_text(out_dir / f"{name}.csv", buffer.getvalue())
    ordered = [{c: _plain(row.get(c)) for c in columns} for row in rows]
    json_path = atomic_write_text(
        out_dir / f"{name}.json", json.dumps(ordered, indent=2, allow_nan=False) + "\n"
    )
    return csv_path, json_path


def _parse_cell(column: str, text: str) -> Any:
    if text == "":
        return None
    if column in _STRING_COLUMNS:
        return text
    if text in ("True", "False"):  # written from Python bools (improving_at_stop)
        return text == "True"
    if column in _INT_COLUMNS:
        try:
            return int(text)
        except ValueError:
            return text
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read rows written by :func:`write_results`.

    ``path`` is a ``.csv`` or ``.json`` file, or a folder holding ``results.json`` (preferred) or
    ``results.csv``. CSV cells are parsed back to int/float where they look numeric, except
    ``method``, ``dataset`` and ``setting`` (always strings); empty cells become ``None``.
    """
    path = Path(path)
    if path.is_dir():
        for candidate in ("results.json", "results.csv"):
            if (path / candidate).is_file():
                path = path / candidate
                break
        else:
            raise FileNotFoundError(f"no results.json or results.csv in {path}")
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{path}: expected a JSON list of row objects")
        return data
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return [{k: _parse_cell(k, v) for k, v in row.items()} for row in reader]
    raise ValueError(f"{path}: unknown results format {path.suffix!r} (expected .csv or .json)")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def summarise(
    rows: Sequence[Mapping[str, Any]],
    by: Sequence[str] = ("method", "dataset", "setting"),
) -> list[dict[str, Any]]:
    """Mean and standard deviation of every numeric column over the seeds of each group.

    Args:
        rows: result rows (each with a ``seed`` column unless ``"seed"`` is in ``by``).
        by: grouping columns; groups appear in the order of their first row.

    Returns:
        One dict per group: the ``by`` values, ``n_seeds``, ``seeds`` (comma-separated), and for
        every numeric column ``c`` (``seed`` and ``by`` excluded) ``c_mean`` and ``c_std``. ``c_std``
        uses ``ddof=1`` when the group has more than one row and is 0 for a single row. A value
        missing from a row counts as NaN, and NaN propagates to the group's mean and std.

    Raises:
        ValueError: a grouping column is missing from a row, or two rows of one group share a seed.
    """
    rows = _check_rows(rows)
    by = tuple(by)
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for i, row in enumerate(rows):
        missing = [c for c in by if c not in row]
        if missing:
            raise ValueError(f"row {i} lacks grouping column(s) {missing}")
        groups.setdefault(tuple(row[c] for c in by), []).append(row)
    numeric: list[str] = []
    for column in result_columns(rows):
        if column in by or column == "seed":
            continue
        if any(_is_number(r.get(column)) for r in rows):
            numeric.append(column)
    out: list[dict[str, Any]] = []
    for key, members in groups.items():
        seeds = [r.get("seed") for r in members]
        if "seed" not in by:
            dup = {s for s in seeds if s is not None and seeds.count(s) > 1}
            if dup:
                raise ValueError(f"group {dict(zip(by, key))} has duplicate seed(s) {sorted(dup)}")
        summary: dict[str, Any] = dict(zip(by, key))
        summary["n_seeds"] = len(members)
        summary["seeds"] = ",".join(str(s) for s in seeds)
        for column in numeric:
            values = np.array(
                [float(r[column]) if _is_number(r.get(column)) else math.nan for r in members],
                dtype=np.float64,
            )
            summary[f"{column}_mean"] = float(np.mean(values))
            summary[f"{column}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        out.append(summary)
    return out


def _summary_metrics(summary_rows: Sequence[Mapping[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for row in summary_rows:
        for key in row:
            if key.endswith("_mean"):
                names.setdefault(key[: -len("_mean")], None)
    return list(names)


def format_table(
    summary_rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] | None = None,
    by: Sequence[str] = ("method", "dataset", "setting"),
    scale: float = 100.0,
    percent_metrics: Iterable[str] = PERCENT_METRICS,
    digits: int | None = None,
    marks: Mapping[str, str] | None = None,
) -> str:
    """A plain-text table with one line per group and ``"mean ± std"`` cells.

    Args:
        summary_rows: output of :func:`summarise`.
        metrics: metric columns to show, in order (default: every summarised column).
        by: grouping columns shown first (those present in the rows).
        scale: multiplier for ``percent_metrics`` (100 shows rates as percentages); other metrics
            (MAE, correlation, distances, seconds) are shown unscaled.
        digits: decimals; default 1 for scaled metrics and 3 for the others.
        marks: text appended to the ``method`` cell of the methods it names (for example
            ``{"dicmor": " (!)"}`` for a method stopped on the cap while still improving); a
            footnote line explains ``" (!)"`` when it is used.

    A group with one seed shows the mean alone. Missing cells show ``-``.
    """
    summary_rows = list(summary_rows)
    if not summary_rows:
        raise ValueError("format_table: no summary rows")
    available = _summary_metrics(summary_rows)
    if metrics is None:
        metrics = available
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; the summary has {available}")
    percent = set(percent_metrics)
    keys = [c for c in by if any(c in r for r in summary_rows)]
    header = keys + ["n"] + [f"{m} (%)" if m in percent and scale == 100.0 else m for m in metrics]
    lines: list[list[str]] = []
    for row in summary_rows:
        cells = [str(row.get(c, "-")) + (marks.get(str(row.get(c)), "") if marks and c == "method" else "")
                 for c in keys]
        n = int(row.get("n_seeds", 1))
        cells.append(str(n))
        for m in metrics:
            mean = row.get(f"{m}_mean")
            std = row.get(f"{m}_std")
            if mean is None:
                cells.append("-")
                continue
            factor = scale if m in percent else 1.0
            d = digits if digits is not None else (1 if m in percent and scale != 1.0 else 3)
            shown_std = math.nan if n <= 1 or std is None else float(std)
            cells.append(format_mean_std(float(mean), shown_std, scale=factor, digits=d))
        lines.append(cells)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    numeric_from = len(keys)

    def render(cells: list[str]) -> str:
        parts = [
            c.ljust(w) if i < numeric_from else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    text = "\n".join([render(header), rule, *(render(line) for line in lines)]) + "\n"
    if marks and any(v == UNCONVERGED_MARK for v in marks.values()):
        text += f"{UNCONVERGED_MARK.strip()} stopped on the step cap or the epoch limit while still improving in some seed (not converged)\n"
    return text


#: the mark :func:`format_table` footnotes: a method that stopped while still improving
UNCONVERGED_MARK = " (!)"


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return bool(value) if value is not None else False


def budget_records(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per (method, dataset, seed) with the budget columns (the first row of each
    training; every setting row of one training carries the same values). Rows without a
    ``steps`` column (runs older than the budget rule) are left out."""
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in _check_rows(rows):
        if row.get("steps") is None:
            continue
        key = (row.get("method"), row.get("dataset"), row.get("seed"))
        if key not in seen:
            record = {"method": row.get("method"), "dataset": row.get("dataset"), "seed": row.get("seed")}
            record.update({c: row.get(c) for c in BUDGET_COLUMNS})
            record["improving_at_stop"] = _as_bool(record["improving_at_stop"])
            seen[key] = record
    return list(seen.values())


def unconverged(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[int]]:
    """``(method, dataset) -> seeds`` whose training stopped on the cap or the epoch limit while the
    validation score was still improving (``improving_at_stop``); only methods with such a seed."""
    out: dict[tuple[str, str], list[int]] = {}
    for r in budget_records(rows):
        if r["improving_at_stop"]:
            out.setdefault((str(r["method"]), str(r["dataset"])), []).append(int(r["seed"]))
    return out


def format_budget_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per method and dataset: optimiser steps (mean ± std over seeds), best step, how the seeds
    stopped (``plateau 3, cap 2``) and which seeds were still improving when the cap or the epoch
    limit cut them (``-`` when none). Empty string when no row carries budget columns."""
    records = budget_records(rows)
    if not records:
        return ""
    groups: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["method"], r["dataset"]), []).append(r)
    header = ["method", "dataset", "n", "steps", "best_step", "stopped on", "still improving (seeds)"]
    lines = []
    for (method, dataset), members in groups.items():
        steps = [float(m["steps"]) for m in members]
        best = [float(m["best_step"]) for m in members if m["best_step"] is not None]
        reasons: dict[str, int] = {}
        for m in members:
            reasons[str(m["stop_reason"])] = reasons.get(str(m["stop_reason"]), 0) + 1
        improving = [str(m["seed"]) for m in members if m["improving_at_stop"]]
        lines.append([
            str(method) + (UNCONVERGED_MARK if improving else ""), str(dataset), str(len(members)),
            format_mean_std(float(np.mean(steps)), float(np.std(steps, ddof=1)) if len(steps) > 1 else math.nan,
                            scale=1.0, digits=0),
            format_mean_std(float(np.mean(best)), float(np.std(best, ddof=1)) if len(best) > 1 else math.nan,
                            scale=1.0, digits=0) if best else "-",
            ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())),
            ",".join(improving) if improving else "-",
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    render = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    text = "\n".join([render(header), "  ".join("-" * w for w in widths), *(render(line) for line in lines)]) + "\n"
    if any(line[-1] != "-" for line in lines):
        text += (f"{UNCONVERGED_MARK.strip()} still improving when the step cap or the epoch limit ended training: "
                 "not converged at this budget\n")
    return text
