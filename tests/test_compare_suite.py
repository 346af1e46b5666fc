"""The resumable comparison suite (benchmarks/compare_methods.py) on tiny synthetic cells: exactly
the named cells, finished cells skipped, missing cells listed, tables rebuilt from partial results."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_suite_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


suite = _load("compare_methods")
paired = _load("paired_differences")

TINY = json.dumps({"n_train": 64, "n_valid": 32, "n_test": 32})


def _argv(tmp: Path, methods: str, seeds: str, *extra: str) -> list[str]:
    return ["--datasets", "synthetic", "--methods", methods, "--seeds", seeds, "--runs", str(tmp / "runs"),
            "--out", str(tmp / "out"), "--dataset-options", TINY, "--max-steps-per-epoch", "2", "--epochs", "2",
            "--max-steps", "4", "--batch-size", "32", "--preset", "small", "--device", "cpu", *extra]


def test_seeds_keep_their_meaning() -> None:
    assert suite.parse_seeds("5") == (0, 1, 2, 3, 4)
    assert suite.parse_seeds("0,") == (0,) and suite.parse_seeds("0,3,4") == (0, 3, 4)
    args = suite.build_parser().parse_args(["--seeds", "0,"])
    assert args.seeds == (0,) and args.max_steps == 2000 and args.device == "auto"
    assert suite.build_parser().parse_args(["--max-steps", "none"]).max_steps is None


def test_paired_difference_interval() -> None:
    from scipy import stats

    d = paired.paired_difference([0.8, 0.9, 0.7], [0.55, 0.66, 0.44])
    assert d.n == 3 and d.mean == pytest.approx(0.25)
    sd = stats.tstd([0.25, 0.24, 0.26])
    assert d.half == pytest.approx(stats.t.ppf(0.975, 2) * sd / 3 ** 0.5)
    assert d.distinguishable and d.format(scale=100).endswith("*")
    wide = paired.paired_difference([0.8, 0.9, 0.7], [0.5, 0.6, 0.6])  # t(2) = 4.30: the interval covers 0
    assert wide.low < 0 < wide.high and not wide.distinguishable and not wide.format().endswith("*")
    one = paired.paired_difference([0.5], [0.4])
    assert one.n == 1 and not one.distinguishable and "1 seed" in one.format()
    rows = [{"method": m, "setting": "mr=0.5", "seed": s, "acc": v}
            for m, s, v in (("a", 0, 0.9), ("a", 1, 0.8), ("b", 0, 0.7), ("b", 2, 0.1))]
    got = paired.paired_by_seed(rows, "acc", "a", "b", "mr=0.5")
    assert got.seeds == (0,) and got.mean == pytest.approx(0.2)  # only the shared seed is paired
    with pytest.raises(ValueError, match="equal lengths"):
        paired.paired_difference([1.0], [1.0, 2.0])


@pytest.fixture(scope="module")
def partial_suite(tmp_path_factory):
    """One finished cell of the two seeds x two methods named below."""
    tmp = tmp_path_factory.mktemp("suite")
    assert suite.main(_argv(tmp, "zero_fill", "0,")) == 0
    return tmp


def test_a_cell_folder_holds_its_results_and_a_finished_marker(partial_suite) -> None:
    cell = partial_suite / "runs" / "synthetic" / "zero_fill" / "seed0"
    assert {"results.csv", "config.json", "DONE.json"} <= {p.name for p in cell.iterdir()}
    done = json.loads((cell / "DONE.json").read_text())
    assert done["cell"] == "synthetic/zero_fill/seed0" and done["settings"]["max_steps"] == 4
    assert done["budget"]["steps"] == 4 and done["budget"]["stop_reason"] == "cap"
    assert not (partial_suite / "runs" / "synthetic" / "zero_fill" / "seed1").exists()  # exactly the named cells


def test_report_from_partial_results_lists_what_is_missing(partial_suite, capsys) -> None:
    assert suite.main(_argv(partial_suite, "zero_fill,mean_fill", "0,1", "--report-only")) == 0
    out = capsys.readouterr().out
    assert "missing (3 cells): synthetic/mean_fill seeds 0,1; synthetic/zero_fill seed 1" in out
    table = (partial_suite / "out" / "compare_synthetic_table.txt").read_text()
    assert "seeds [0]" in table and "stopped on" in table and "missing (3 cells)" in table
    assert "max_steps=4" in table
    headline = (partial_suite / "out" / "compare_synthetic_headline.md").read_text()
    assert "| steps |" in headline and "| stopped on |" in headline and "Paired differences" in headline


def test_finished_cells_are_skipped_and_tables_rebuilt(partial_suite, capsys) -> None:
    tmp = partial_suite
    marker = tmp / "runs" / "synthetic" / "zero_fill" / "seed0" / "DONE.json"
    before = marker.read_text()
    capsys.readouterr()
    assert suite.main(_argv(tmp, "zero_fill,mean_fill", "0,1")) == 0
    out = capsys.readouterr().out
    assert "4 cells requested, 1 finished, 3 to run" in out
    assert "[synthetic/zero_fill/seed0] finished before: skipped" in out
    assert marker.read_text() == before
    assert "missing: none" in out
    headline = (tmp / "out" / "compare_synthetic_headline.md").read_text()
    assert "*against zero_fill*" in headline and "vs zero_fill" in headline
    rows = suite.collect_rows("synthetic", suite.build_parser().parse_args(_argv(tmp, "zero_fill,mean_fill", "0,1")))
    assert {(r["method"], r["seed"]) for r in rows} == {(m, s) for m in ("zero_fill", "mean_fill") for s in (0, 1)}
    # a cell killed before its marker was written is unfinished: run again (resumed), same numbers
    cell = tmp / "runs" / "synthetic" / "mean_fill" / "seed1"
    first = (cell / "results.csv").read_text()
    (cell / "DONE.json").unlink()
    (tmp / "out" / "cells" / "synthetic" / "mean_fill" / "seed1" / "DONE.json").unlink()  # and its ledger copy
    assert suite.main(_argv(tmp, "mean_fill", "1,")) == 0
    assert (cell / "DONE.json").is_file()
    strip = lambda text: [line.rsplit(",", 1)[0] for line in text.splitlines()]  # noqa: E731 - train_seconds last
    assert strip((cell / "results.csv").read_text()) == strip(first)
    # other settings: the finished cell is not silently mixed in or overwritten
    capsys.readouterr()
    assert suite.main([*_argv(tmp, "mean_fill", "1,"), "--max-steps", "6"]) == 0  # the last --max-steps wins
    assert "finished under other settings" in capsys.readouterr().out


def test_the_ledger_survives_the_loss_of_the_runs_folder(partial_suite, tmp_path, capsys) -> None:
    """A new checkout has the committed ledger (``<out>/cells``) and no ``runs/``: it rebuilds the
    same tables, skips the finished cell and runs only the missing ones."""
    import shutil

    kept = partial_suite / "out" / "cells" / "synthetic" / "zero_fill" / "seed0"
    assert {p.name for p in kept.iterdir()} == {"results.csv", "config.json", "DONE.json"}  # no checkpoints
    fresh = tmp_path / "checkout"
    shutil.copytree(partial_suite / "out", fresh / "out")  # what git holds; no runs/
    argv = _argv(fresh, "zero_fill", "0,")
    args = suite.build_parser().parse_args(argv)
    ran = suite.collect_rows("synthetic", suite.build_parser().parse_args(_argv(partial_suite, "zero_fill", "0,")))
    assert suite.collect_rows("synthetic", args) == ran and ran
    capsys.readouterr()
    assert suite.main(argv) == 0
    assert "[synthetic/zero_fill/seed0] finished before: skipped" in capsys.readouterr().out
    assert not (fresh / "runs" / "synthetic" / "zero_fill").exists()  # nothing ran
    # a results file imported into an empty ledger gives the same rows, each marker saying where from
    other = tmp_path / "imported"
    imported = [*argv[:argv.index("--out")], "--out", str(other), *argv[argv.index("--out") + 2:],
                "--import-results", str(fresh / "out" / "compare_synthetic_results.csv")]
    assert suite.main(imported) == 0
    marker = json.loads((other / "cells" / "synthetic" / "zero_fill" / "seed0" / "DONE.json").read_text())
    assert marker["restored_from"].endswith("compare_synthetic_results.csv")
    assert marker["settings"] == json.loads((kept / "DONE.json").read_text())["settings"]
    again = suite.collect_rows("synthetic", suite.build_parser().parse_args(imported))
    assert [{k: r[k] for k in ("method", "setting", "seed", "acc")} for r in again] == \
        [{k: r[k] for k in ("method", "setting", "seed", "acc")} for r in ran]
    with pytest.raises(FileExistsError, match="in the ledger already"):
        suite.main(imported)  # never silently replaced
    # a ledger cell of another budget neither blocks nor shadows a run under this one
    capsys.readouterr()
    assert suite.main([*argv, "--max-steps", "6"]) == 0
    assert "[synthetic/zero_fill/seed0] done" in capsys.readouterr().out
    assert json.loads((fresh / "out" / "cells" / "synthetic" / "zero_fill" / "seed0" / "DONE.json").read_text()
                      )["settings"]["max_steps"] == 6
    # and an old run folder never overwrites the ledger's current cell in a report
    shutil.copytree(partial_suite / "runs", fresh / "old_runs")
    report = [*argv, "--max-steps", "6", "--runs", str(fresh / "old_runs"), "--report-only"]
    assert suite.main(report) == 0
    assert json.loads((fresh / "out" / "cells" / "synthetic" / "zero_fill" / "seed0" / "DONE.json").read_text()
                      )["settings"]["max_steps"] == 6


def test_plan_measures_time_and_lists_cells(tmp_path, capsys) -> None:
    assert suite.main(_argv(tmp_path, "zero_fill", "0,1", "--plan", "--plan-steps", "2")) == 0
    out = capsys.readouterr().out
    assert "zero_fill: single" in out and "steps/s" in out
    assert "synthetic/zero_fill/seed0: <= 4 steps" in out and "synthetic/zero_fill/seed1" in out
    assert not (tmp_path / "runs" / "synthetic" / "zero_fill" / "seed0" / "DONE.json").exists()  # ran nothing


def test_pool_folds_weights_each_fold_by_its_test_size():
    fold_a = [{"method": "m", "setting": "mr=0.0", "seed": 0, "n": 100.0, "acc2_non0": 0.8, "mae": 1.0, "corr": 0.5,
               "realised_missing_rate": 0.2}]
    fold_b = [{"method": "m", "setting": "mr=0.0", "seed": 0, "n": 300.0, "acc2_non0": 0.6, "mae": 2.0, "corr": 0.1,
               "realised_missing_rate": 0.6},
              {"method": "m", "setting": "mr=0.5", "seed": 0, "n": 300.0, "acc2_non0": 0.5}]
    (row,) = suite.pool_folds([fold_a, fold_b])  # mr=0.5 is missing from fold a: not pooled
    assert row["n"] == 400.0 and row["setting"] == "mr=0.0"
    assert abs(row["acc2_non0"] - 0.65) < 1e-12 and abs(row["mae"] - 1.75) < 1e-12
    assert "corr" not in row  # a correlation does not pool as a mean
    assert abs(row["realised_missing_rate"] - 0.5) < 1e-12  # the pooled test set's rate


def test_dicmor_vs_best_pairs_dicmor_with_the_best_other_non_bound_method():
    rows = []
    for seed, (d, md, zf, ub) in enumerate([(0.70, 0.72, 0.50, 0.95), (0.71, 0.74, 0.52, 0.96), (0.69, 0.73, 0.49, 0.94)]):
        for method, acc in (("dicmor", d), ("modality_dropout", md), ("zero_fill", zf), ("upper_bound", ub)):
            rows.append({"method": method, "setting": "mr=0.5", "seed": seed, "acc": acc})
    (c,) = suite.dicmor_vs_best(rows, "acc", True, settings=("mr=0.5",))
    assert c["best"] == "modality_dropout"  # the bound is never "best"
    assert abs(c["diff"].mean - (-0.03)) < 1e-12 and c["diff"].n == 3 and c["diff"].distinguishable
    assert suite.dicmor_vs_best([r for r in rows if r["method"] != "dicmor"], "acc", True) == []


def test_settings_beyond_the_missing_rate_cap_are_named_not_repeated():
    """On two modalities MR is capped at 0.5: mr=0.6 and mr=0.7 copy mr=0.5's masks, so the tables
    leave them out and say so; on three modalities mr=0.7 realises 0.667 and is labelled."""
    two = [{"method": "m", "setting": f"mr={r}", "seed": s, "realised_missing_rate": min(r, 0.5), "acc": 0.9 - r}
           for r in (0.3, 0.5, 0.6, 0.7) for s in (0, 1)]
    same, realised = paired.capped_settings(two)
    assert same == {"mr=0.6": "mr=0.5", "mr=0.7": "mr=0.5"} and realised == {}
    assert {r["setting"] for r in suite.drop_capped(two)} == {"mr=0.3", "mr=0.5"}
    assert "mr=0.7 realised exactly mr=0.5's rate in every seed" in suite.capped_note(two)
    three = [{"method": "m", "setting": f"mr={r}", "seed": 0, "realised_missing_rate": min(r, 2 / 3), "acc": 0.5}
             for r in (0.5, 0.7)]
    same, realised = paired.capped_settings(three)
    assert same == {} and realised == {"mr=0.7": pytest.approx(2 / 3, abs=1e-6)}
    assert "mr=0.7 realises MR 0.667" in suite.capped_note(three)
    headline = suite.headline_markdown("x", two, {}, "classification")
    assert "| mr=0.5 |" in headline and "| mr=0.7 |" not in headline and "not shown" in headline


def test_verdicts_follow_the_intervals_and_the_metric_direction():
    win = paired.paired_difference([0.80, 0.82, 0.81], [0.70, 0.71, 0.72])
    tie = paired.paired_difference([0.8, 0.9, 0.7], [0.5, 0.6, 0.6])
    one = paired.paired_difference([0.8], [0.7])
    rows = [("a", {"setting": "mr=0.3", "best": "x", "diff": win}), ("a", {"setting": "mr=0.5", "best": "x", "diff": tie}),
            ("b", {"setting": "mr=0.3", "best": "y", "diff": win}), ("c", {"setting": "mr=0.3", "best": "z", "diff": one})]
    lines = suite.verdict_lines(rows, {"a": True, "b": False, "c": True})
    assert lines[0] == "- **a**: DiCMoR wins at mr=0.3 (vs x); is within noise at mr=0.5 (vs x)."
    assert lines[1] == "- **b**: DiCMoR loses at mr=0.3 (vs y)."  # lower is better there (MAE)
    assert "one seed only" in lines[2]


def test_the_comparison_names_the_command_that_rebuilds_it(partial_suite) -> None:
    """Another cap or tag reads other cells: the comparison's first line says which, so it can be rebuilt."""
    path = partial_suite / "COMPARISON_cap4.md"
    assert suite.main(_argv(partial_suite, "zero_fill", "0,", "--report-only", "--comparison", str(path))) == 0
    text = path.read_text()
    runs = str(partial_suite / "runs")
    assert (f"Built by `python benchmarks/compare_methods.py --datasets synthetic --report-only --max-steps 4 "
            f"--runs {runs} --comparison {path}`") in text
    assert "under one cap of 4 optimiser steps" in text
    default = suite.build_parser().parse_args(["--datasets", "avmnist"])
    assert suite.comparison_command(["avmnist", "mosi_folds"], default, suite.ROOT / "benchmarks" / "C.md") == (
        "python benchmarks/compare_methods.py --datasets avmnist,mosi_folds --report-only "
        "--comparison benchmarks/C.md")
