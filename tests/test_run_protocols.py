"""`run --protocol`: every registered protocol reaches the main job, with realised rates in the rows."""

from __future__ import annotations

import pytest

from flowtransfer.experiment import ExperimentConfig, run_experiment
from flowtransfer.io import InputError

TINY = dict(seeds=(0,), preset="small", epochs=1, max_steps_per_epoch=2, progress=False,
            dataset_options={"n_train": 48, "n_valid": 24, "n_test": 400})


def test_per_modality_rows_carry_exact_realised_rates(tmp_path):
    cfg = ExperimentConfig(methods=("zero_fill",), protocol="per_modality",
                           protocol_rates=("L0.1+A0.5+V0.3",), out=str(tmp_path / "r"), **TINY)
    rows = run_experiment(cfg, log=lambda _m: None)
    (row,) = rows
    assert row["setting"] == "mod=L0.1+A0.5+V0.3"
    for m, want in (("L", 0.1), ("A", 0.5), ("V", 0.3)):
        assert abs(row[f"realised_rate_{m}"] - want) <= 0.005
    assert abs(row["realised_missing_rate"] - 0.3) <= 0.005


def test_step_protocol_rows_carry_the_step_rate_and_refuse_dicmor_before_training(tmp_path):
    cfg = ExperimentConfig(methods=("zero_fill",), protocol="steps", protocol_rates=(0.0, 0.4),
                           out=str(tmp_path / "r"), **TINY)
    rows = {r["setting"]: r for r in run_experiment(cfg, log=lambda _m: None)}
    assert abs(rows["steps=0.4"]["realised_step_rate"] - 0.4) <= 0.005
    assert rows["steps=0.4"]["realised_missing_rate"] == 0.0  # every modality still present
    refused = ExperimentConfig(methods=("zero_fill", "dicmor"), protocol="steps", out=str(tmp_path / "d"), **TINY)
    with pytest.raises(InputError, match="dicmor"):
        run_experiment(refused, log=lambda _m: None)
    assert not (tmp_path / "d" / "checkpoints").exists()


def test_protocol_settings_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(InputError, match="unknown missing protocol"):
        ExperimentConfig(protocol="nope", out=str(tmp_path / "a")).validate()
    with pytest.raises(InputError, match="protocol_rates"):
        ExperimentConfig(protocol="random", protocol_rates=(0.1,), out=str(tmp_path / "b")).validate()
    cfg = ExperimentConfig(methods=("zero_fill",), protocol="cyin_instance", protocol_rates=(1.5,),
                           out=str(tmp_path / "c"), **TINY)
    with pytest.raises(InputError, match="cyin_instance"):
        run_experiment(cfg, log=lambda _m: None)


def test_cli_reads_per_modality_specifications_and_step_rates():
    from flowtransfer.cli import build_parser

    args = build_parser().parse_args(["run", "--protocol", "per_modality", "--rates", "L0.1+A0.5+V0.3;L0.5+A0.1+V0.1",
                                      "--device", "cpu", "--max-steps", "100"])
    assert args.protocol == "per_modality" and args.max_steps == 100 and args.device == "cpu"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--max-steps", "1"])
