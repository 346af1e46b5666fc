"""What a run leaves for a person: exact references, the verdict, and report.md whose numbers match results.csv."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from flowtransfer.data import make_synthetic
from flowtransfer.experiment import ExperimentConfig, run_experiment
from flowtransfer.report import exact_references, gap_closed, reproduce_command, verdict_lines
from flowtransfer.training.results import read_results


def _summary(scores: dict[tuple[str, str], float]) -> list[dict]:
    return [{"method": m, "setting": s, "acc_mean": v, "acc_std": 0.0} for (m, s), v in scores.items()]


def test_gap_closed_reads_each_method_against_zero_fill_and_the_bound():
    summary = _summary({("upper_bound", "complete"): 0.9, ("zero_fill", "mr=0.5"): 0.5,
                        ("dicmor", "mr=0.5"): 0.7, ("other", "mr=0.5"): 0.4})
    gaps = gap_closed(summary, "acc")
    assert gaps["mr=0.5"]["dicmor"] == pytest.approx(0.5)
    assert gaps["mr=0.5"]["other"] == pytest.approx(-0.25)  # worse than zero filling: negative
    # lower is better: MAE is negated, so a smaller MAE closes a positive share
    mae = [{"method": m, "setting": s, "mae_mean": v} for (m, s), v in
           {("upper_bound", "complete"): 0.6, ("zero_fill", "mr=0.5"): 1.0, ("dicmor", "mr=0.5"): 0.9}.items()]
    assert gap_closed(mae, "mae")["mr=0.5"]["dicmor"] == pytest.approx(0.25)
    # without the bound there is no gap to read
    assert gap_closed(summary[1:], "acc") == {}
    lines = verdict_lines(summary, "acc", {"bayes_acc": {"mr=0.5": 0.8, "complete": 0.95}})
    assert "closes 50%" in lines[1] and "Bayes 80.0" in lines[1] and "Bayes 95.0" in lines[0]


def test_exact_references_use_the_runs_own_masks():
    test = make_synthetic(seed=0, n_train=4, n_valid=4, n_test=200)["test"]
    gen = test.generator
    rng = np.random.default_rng(0)
    mask = rng.random((200, 3)) > 0.4
    mask[~mask.any(1), 0] = True
    ref = exact_references(test, {0: {"mr=0.4": mask}, 1: {"mr=0.4": np.ones((200, 3), bool)}})
    assert ref["bayes_acc_per_seed"]["0"]["mr=0.4"] == gen.bayes_accuracy_masked(test, mask)
    full = gen.bayes_accuracy_masked(test)
    assert ref["bayes_acc"]["mr=0.4"] == pytest.approx((gen.bayes_accuracy_masked(test, mask) + full) / 2)
    assert ref["bayes_acc"]["complete"] == full
    assert set(ref["bayes_acc_pattern"]) == {"L", "A", "V", "L+A", "L+V", "A+V", "L+A+V"}
    # real data (no generator): no reference
    test.generator = None
    assert exact_references(test, {0: {"mr=0.4": mask}}) is None


def test_reproduce_command_round_trips_through_the_cli_parser():
    from flowtransfer.cli import build_parser

    cfg = ExperimentConfig(methods=("dicmor", "zero_fill"), seeds=(3, 4), epochs=2, out="runs/x y")
    argv = reproduce_command(cfg).split(" ", 1)[1]
    import shlex

    args = build_parser().parse_args(shlex.split(argv))
    assert args.methods == ("dicmor", "zero_fill") and args.seeds == (3, 4) and args.epochs == 2
    assert args.out == "runs/x y"


@pytest.mark.slow
def test_a_run_writes_references_and_a_report_whose_numbers_match_results_csv(tmp_path):
    out = tmp_path / "run"
    cfg = ExperimentConfig(
        methods=("dicmor", "zero_fill", "upper_bound"), seeds=(0,), rates=(0.0, 0.5), patterns=False,
        preset="small", epochs=1, max_steps_per_epoch=2, progress=False, out=str(out),
        dataset_options={"n_train": 64, "n_valid": 32, "n_test": 48},
    )
    rows = run_experiment(cfg, log=lambda _m: None)
    refs = json.loads((out / "references.json").read_text())
    assert set(refs["bayes_acc"]) == {"complete", "mr=0.0", "mr=0.5"}
    assert 0.0 < refs["bayes_acc"]["mr=0.5"] < refs["bayes_acc"]["complete"] <= 1.0
    report = (out / "report.md").read_text()
    # every figure the report links exists
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / link).is_file(), link
    assert "figures/transfer_dicmor_" in report
    # the table's numbers are results.csv's (one seed: the mean is the row's value)
    stored = {(r["method"], r["setting"]): r["acc"] for r in read_results(out / "results.csv")}
    assert len(stored) == len(rows)
    for (method, setting), acc in stored.items():
        line = next(l for l in report.splitlines() if l.startswith(f"| {setting} |"))
        assert f"{100 * acc:.1f} ± 0.0" in line, (method, setting, line)
    assert "flowtransfer run --dataset synthetic" in report


def test_the_report_figure_uses_a_modality_the_method_recovers(tmp_path):
    """SMIL reconstructs only its m* (text on the embedded data): the figure shows L, the run does not fail."""
    out = tmp_path / "run"
    cfg = ExperimentConfig(methods=("smil",), seeds=(0,), rates=(0.5,), patterns=False, preset="small", epochs=1,
                           max_steps_per_epoch=2, progress=False, out=str(out),
                           dataset_options={"n_train": 64, "n_valid": 32, "n_test": 48})
    run_experiment(cfg, log=lambda _m: None)
    assert (out / "figures" / "transfer_smil_L.png").is_file()
    assert "figures/transfer_smil_L.png" in (out / "report.md").read_text()
