"""The main job end to end on tiny data: rows, masks, tables, plots; and the CLI subcommands."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from flowtransfer.cli import main
from flowtransfer.data.missing import load_masks
from flowtransfer.experiment import ExperimentConfig, run_experiment

TINY = dict(n_train=96, n_valid=48, n_test=60, length=6)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = ExperimentConfig(
        methods=("dicmor", "zero_fill", "upper_bound"), seeds=(0, 1), rates=(0.0, 0.5), epochs=1,
        batch_size=32, max_steps_per_epoch=2, dataset_options=TINY, out=str(out), progress=False,
    )
    rows = run_experiment(cfg, log=lambda _: None)
    return out, rows


def test_rows_cover_methods_settings_seeds(tiny_run) -> None:
    _, rows = tiny_run
    settings = {"mr=0.0", "mr=0.5"} | {f"pattern={p}" for p in ("L", "A", "V", "L+A", "L+V", "A+V")}
    for method in ("dicmor", "zero_fill"):
        for seed in (0, 1):
            got = {r["setting"] for r in rows if r["method"] == method and r["seed"] == seed}
            assert got == settings
    assert {r["setting"] for r in rows if r["method"] == "upper_bound"} == {"complete"}
    mr5 = [r for r in rows if r["setting"] == "mr=0.5"]
    assert all(abs(r["realised_missing_rate"] - 0.5) < 0.01 for r in mr5)
    assert all(0.0 <= r["acc"] <= 1.0 for r in rows)


def test_recovery_distances_reported_where_something_is_missing(tiny_run) -> None:
    _, rows = tiny_run
    for r in rows:
        if r["method"] == "dicmor" and r["setting"] != "mr=0.0":
            assert r["fd_recovered"] >= 0 and r["fd_zero_fill"] >= 0 and r["fd_mean_fill"] >= 0
        if r["setting"] in ("mr=0.0", "complete"):
            assert "fd_recovered" not in r or r["fd_recovered"] is None or np.isnan(r["fd_recovered"])


def test_outputs_written(tiny_run) -> None:
    out, rows = tiny_run
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == 2 * (8 + 8 + 1)
    assert {"method", "dataset", "setting", "seed", "acc", "f1_macro", "train_seconds"} <= set(table[0])
    assert len(json.loads((out / "results.json").read_text())) == len(rows)
    text = (out / "table.txt").read_text()
    assert "dicmor" in text and "mean ± std" in text
    assert (out / "curves.png").stat().st_size > 1000
    assert json.loads((out / "config.json").read_text())["seeds"] == [0, 1]


def test_test_masks_saved_and_seeded(tiny_run) -> None:
    out, _ = tiny_run
    m0, mods = load_masks(out / "masks" / "seed0.npz")
    m1, _ = load_masks(out / "masks" / "seed1.npz")
    assert tuple(mods) == ("L", "A", "V")
    assert m0["mr=0.5"].shape == (TINY["n_test"], 3)
    assert not np.array_equal(m0["mr=0.5"], m1["mr=0.5"])
    assert m0["pattern=L+A"][:, :2].all() and not m0["pattern=L+A"][:, 2].any()


def _write_npz(path, rng) -> None:
    arrays = {}
    for split, n in (("train", 64), ("valid", 32), ("test", 40)):
        y = rng.integers(0, 2, n)
        arrays[f"{split}.audio"] = (rng.normal(size=(n, 4, 3)) + y[:, None, None]).astype(np.float32)
        arrays[f"{split}.image"] = (rng.normal(size=(n, 2, 5)) - y[:, None, None]).astype(np.float32)
        arrays[f"{split}.labels"] = y
    np.savez(path, **arrays)


def test_cli_run_train_evaluate_check_on_npz(tmp_path, capsys) -> None:
    data = tmp_path / "mine.npz"
    _write_npz(data, np.random.default_rng(0))
    common = ["--dataset", "npz", "--data", str(data), "--task", "classification", "--epochs", "1",
              "--max-steps-per-epoch", "2", "--preset", "small", "--no-progress"]
    assert main(["run", *common, "--seeds", "0", "--rates", "0.0,0.5", "--methods", "dicmor,zero_fill",
                 "--out", str(tmp_path / "run")]) == 0
    with open(tmp_path / "run" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # two modalities: 2 rates + 2 single-modality patterns, per method
    assert len(rows) == 2 * 4 and {r["setting"] for r in rows} >= {"pattern=audio", "pattern=image"}

    model = tmp_path / "dicmor.pt"
    assert main(["train", *common, "--method", "dicmor", "--out", str(model)]) == 0
    assert model.is_file()
    assert main(["evaluate", str(model), "--dataset", "npz", "--data", str(data), "--task", "classification",
                 "--rates", "0.0,0.5", "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "results.csv").is_file()
    assert main(["check", str(model)]) == 0
    assert "all checks passed" in capsys.readouterr().out


def test_cli_transfer_with_default_model(tmp_path) -> None:
    x = np.random.default_rng(0).normal(size=(3, 8, 20)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    assert main(["transfer", "--src", "A", "--dst", "L", "--input", str(tmp_path / "a.npy"),
                 "--output", str(tmp_path / "l.npy")]) == 0
    assert np.load(tmp_path / "l.npy").shape == (3, 16, 20)


def test_cli_check_default_model(capsys) -> None:
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    # three flows x (invertibility, log-det, inverse stability)
    assert out.count("PASSED") == 9 and out.count("inverse stability PASSED") == 3 and "all checks passed" in out


def test_torchrun_two_processes_train_dicmor(tmp_path) -> None:
    """`torchrun --nproc_per_node 2 flowtransfer train ...` on CPU (gloo): DDP over DiCMoR, whose
    ActNorm layers initialise from statistics pooled over both processes; rank 0 writes the model."""
    import os
    import subprocess
    import sys

    import torch

    from flowtransfer.methods.io import load_method

    data = tmp_path / "mine.npz"
    _write_npz(data, np.random.default_rng(0))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "flowtransfer.cli", "train", "--dataset", "npz", "--data", str(data), "--task", "classification",
           "--epochs", "1", "--max-steps-per-epoch", "2", "--preset", "small", "--no-progress",
           "--out", str(tmp_path / "ddp.pt")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("saved to") == 1  # only the main process writes
    method = load_method(tmp_path / "ddp.pt")
    actnorm = [m for m in method.modules() if type(m).__name__ == "ActNorm"]
    assert actnorm and all(bool(m.initialized) for m in actnorm)
    assert all(torch.isfinite(p).all() for p in method.parameters())


def test_methods_without_recovery_get_no_distances(tmp_path) -> None:
    """Methods that recover nothing (here MMANet and the unimodal model) run through the main job;
    their rows simply carry no Fréchet distances. (Two epochs: MMANet refuses a budget that leaves
    no epoch after its warm-up.)"""
    cfg = ExperimentConfig(methods=("mmanet", "unimodal"), seeds=(0,), rates=(0.5,), patterns=False, epochs=2,
                           batch_size=32, max_steps_per_epoch=1, dataset_options=TINY, out=str(tmp_path),
                           progress=False)
    rows = run_experiment(cfg, log=lambda _: None)
    assert {r["method"] for r in rows} == {"mmanet", "unimodal"}
    assert all("fd_recovered" not in r for r in rows)


def test_upper_bound_reuses_zero_fill_training_and_equals_training_it_alone(tiny_run, tmp_path) -> None:
    _, rows = tiny_run
    shared = {r["seed"]: r for r in rows if r["method"] == "upper_bound"}
    zero = {r["seed"]: r for r in rows if r["method"] == "zero_fill" and r["setting"] == "mr=0.0"}
    assert all(shared[s]["train_seconds"] == 0.0 for s in (0, 1))
    assert all(shared[s]["acc"] == zero[s]["acc"] for s in (0, 1))
    # the reuse is exact: training the bound on its own gives the same model
    cfg = ExperimentConfig(
        methods=("upper_bound",), seeds=(0,), rates=(0.0,), patterns=False, epochs=1, batch_size=32,
        max_steps_per_epoch=2, dataset_options=TINY, out=str(tmp_path), progress=False,
    )
    alone = run_experiment(cfg, log=lambda _: None)[0]
    assert alone["train_seconds"] > 0
    for metric in ("acc", "f1_macro"):
        assert alone[metric] == shared[0][metric]


# ------------------------------------------------------------------------------ budget, device, progress

SMALL = {"n_train": 64, "n_valid": 32, "n_test": 32}


def _budget_cfg(tmp_path, **changes) -> ExperimentConfig:
    settings = dict(methods=("dicmor", "zero_fill"), seeds=(0,), rates=(0.5,), patterns=False, epochs=3,
                    batch_size=32, max_steps_per_epoch=2, max_steps=5, preset="small", dataset_options=SMALL,
                    out=str(tmp_path), progress=False)
    settings.update(changes)
    return ExperimentConfig(**settings)


def test_stage_caps_share_one_budget() -> None:
    from flowtransfer.experiment import stage_cap

    assert stage_cap(None, 2, 0, 0) is None
    assert stage_cap(10, 2, 0, 0) == 5 and stage_cap(11, 2, 0, 0) == 6  # the later stage keeps 11 // 2 = 5
    assert stage_cap(11, 2, 1, 6) == 5 and stage_cap(11, 2, 1, 2) == 9  # what the first stage left
    assert stage_cap(12, 3, 0, 0) == 4 and stage_cap(12, 3, 1, 1) == 7 and stage_cap(12, 3, 2, 5) == 7
    assert stage_cap(7, 1, 0, 0) == 7
    with pytest.raises(ValueError, match="no step left"):
        stage_cap(4, 2, 1, 4)
    with pytest.raises(ValueError, match="index"):
        stage_cap(4, 2, 2, 0)


def test_combine_budgets_over_stages() -> None:
    from flowtransfer.experiment import combine_budgets
    from flowtransfer.training import FitResult

    def fit(steps, best, reason, improving, score=0.0):
        return FitResult(best_epoch=0, best_score=score, monitor="acc", mode="max", steps=steps, best_step=best,
                         stop_reason=reason, improving_at_stop=improving)

    staged = combine_budgets([("complete", fit(30, 20, "cap", True, 0.9)),
                              ("recovery", fit(50, 10, "plateau", False, 0.7))])
    assert staged == {"steps": 80, "best_step": 40, "stop_reason": "plateau", "improving_at_stop": True,
                      "valid_score": 0.7, "valid_monitor": "acc",  # the stage that produced the final weights
                      "stage_stops": "complete=cap@30,recovery=plateau@50"}
    assert combine_budgets([(None, fit(7, 3, "epochs", False))]) == {
        "steps": 7, "best_step": 3, "stop_reason": "epochs", "improving_at_stop": False,
        "valid_score": 0.0, "valid_monitor": "acc"}


def test_rows_carry_the_budget_and_stages_share_the_cap(tmp_path) -> None:
    from flowtransfer.training import load_checkpoint

    rows = run_experiment(_budget_cfg(tmp_path), log=lambda _: None)
    by = {r["method"]: r for r in rows}
    # DiCMoR's two stages share the cap of 5: complete gets ceil(5/2) = 3, recovery the 2 left
    assert by["dicmor"]["steps"] == 5 and by["dicmor"]["stage_stops"] == "complete=cap@3,recovery=cap@2"
    assert load_checkpoint(tmp_path / "checkpoints" / "dicmor" / "seed0" / "complete" / "last.pt")["steps"] == 3
    assert load_checkpoint(tmp_path / "checkpoints" / "dicmor" / "seed0" / "recovery" / "last.pt")["steps"] == 2
    assert by["zero_fill"]["steps"] == 5 and "stage_stops" not in by["zero_fill"]
    for r in rows:
        assert r["stop_reason"] == "cap" and isinstance(r["improving_at_stop"], bool)
        assert 0 < r["best_step"] <= r["steps"]
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert {"steps", "best_step", "stop_reason", "improving_at_stop"} <= set(table[0])
    from flowtransfer.training import read_results

    back = read_results(tmp_path / "results.csv")
    assert back[0]["improving_at_stop"] is by[back[0]["method"]]["improving_at_stop"]
    text = (tmp_path / "table.txt").read_text()
    assert "stopped on" in text and "max_steps=5" in text
    flagged = [r["method"] for r in rows if r["improving_at_stop"]]
    for m in flagged:  # the table says next to the method that it was still improving
        assert f"{m} (!)" in text
    assert ("(!)" in text) == bool(flagged)


def test_without_a_cap_the_epoch_limit_is_the_stop(tmp_path) -> None:
    rows = run_experiment(_budget_cfg(tmp_path, methods=("zero_fill",), max_steps=None, epochs=2),
                          log=lambda _: None)
    assert rows[0]["steps"] == 4 and rows[0]["stop_reason"] == "epochs"


def test_resume_under_a_shared_cap_is_bit_identical(tmp_path, monkeypatch) -> None:
    import flowtransfer.training.trainer as trainer_module

    straight = run_experiment(_budget_cfg(tmp_path / "a", methods=("dicmor",), max_steps=6), log=lambda _: None)
    original = trainer_module.Trainer._checkpoint
    calls = {"n": 0}

    class Killed(Exception):
        pass

    def checkpoint_then_die(self, improved):
        original(self, improved)
        calls["n"] += 1
        if calls["n"] == 3:  # after the recovery stage's first epoch
            raise Killed

    monkeypatch.setattr(trainer_module.Trainer, "_checkpoint", checkpoint_then_die)
    with pytest.raises(Killed):
        run_experiment(_budget_cfg(tmp_path / "b", methods=("dicmor",), max_steps=6), log=lambda _: None)
    monkeypatch.setattr(trainer_module.Trainer, "_checkpoint", original)
    resumed = run_experiment(_budget_cfg(tmp_path / "b", methods=("dicmor",), max_steps=6, resume=True),
                             log=lambda _: None)
    drop = {"train_seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in straight] == \
        [{k: v for k, v in r.items() if k not in drop} for r in resumed]


def test_cuda_without_cuda_is_refused_before_any_work(tmp_path, monkeypatch) -> None:
    import torch

    import flowtransfer.experiment as experiment
    from flowtransfer.io import InputError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(experiment, "load_splits", lambda *a, **k: pytest.fail("data loaded before the check"))
    out = tmp_path / "never"
    with pytest.raises(InputError, match="device 'cuda'.*no usable CUDA"):
        run_experiment(_budget_cfg(out, device="cuda"), log=lambda _: None)
    assert not out.exists()
    with pytest.raises(InputError, match="device must be one of"):
        _budget_cfg(out, device="tpu").validate()
    with pytest.raises(InputError, match="max_steps must be an integer >= 2"):
        _budget_cfg(out, max_steps=1).validate()
    cfg = _budget_cfg(out, device="auto")
    assert cfg.resolved_device() == "cpu" and cfg.train_config("classification", 0).device == "cpu"


def test_progress_lines_with_eta_and_the_report_hook(tmp_path, monkeypatch) -> None:
    import flowtransfer.report

    calls = []
    monkeypatch.setattr(flowtransfer.report, "finish_run",
                        lambda out, cfg, splits, rows, trained, log: calls.append((out, cfg, splits, rows, trained)))
    lines: list[str] = []
    cfg = _budget_cfg(tmp_path, methods=("zero_fill", "upper_bound"), seeds=(0, 1), progress=True, max_steps=3)
    rows = run_experiment(cfg, log=lines.append)
    progress = [line for line in lines if line.startswith("progress:")]
    # one line per training: planned 3 steps for each of the 4 (seed, method) trainings; the bound
    # reuses zero_fill's weights, so its planned steps are dropped when it comes
    assert len(progress) == 2 and "ETA" in progress[0]
    assert progress[0].startswith("progress: 3/12 optimiser steps") and progress[1].startswith("progress: 6/9")
    (out, got_cfg, splits, got_rows, trained), = calls
    assert out == tmp_path and got_cfg is cfg and got_rows == rows and set(splits) == {"train", "valid", "test"}
    assert set(trained) == {"zero_fill", "upper_bound"}
    assert all(not m.training for m in trained.values())
    # progress=False: no progress lines
    lines.clear()
    run_experiment(_budget_cfg(tmp_path / "quiet", methods=("zero_fill",)), log=lines.append)
    assert not any(line.startswith("progress:") for line in lines)
