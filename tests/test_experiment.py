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
    their rows simply carry no Fréchet distances."""
    cfg = ExperimentConfig(methods=("mmanet", "unimodal"), seeds=(0,), rates=(0.5,), patterns=False, epochs=1,
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
