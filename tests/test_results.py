"""Result rows, results.csv/json round trips, summaries over seeds, the text table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flowtransfer.training.results import (
    ID_COLUMNS,
    format_table,
    read_results,
    result_columns,
    result_row,
    summarise,
    write_results,
)


def rows():
    out = []
    for method, base in (("dicmor", 0.80), ("zero_fill", 0.70)):
        for setting in ("0.3", "L"):
            for i, seed in enumerate((1111, 1112, 1113)):
                out.append(
                    result_row(
                        method, "mosi", setting, seed,
                        {"acc2_non0": base + 0.01 * i, "mae": 1.0 - 0.1 * i},
                        realised_missing_rate=0.3 if setting == "0.3" else 2 / 3,
                        train_seconds=10.0 + i,
                    )
                )
    return out


def test_columns_are_stable_and_united():
    a = result_row("m", "d", "0.0", 1, {"acc": 0.5}, train_seconds=1.0)
    b = result_row("m", "d", "0.1", 1, {"acc": 0.6, "frechet": 2.0})
    cols = result_columns([a, b])
    assert cols == list(ID_COLUMNS) + ["acc", "frechet", "train_seconds"]
    assert result_columns([b, a]) == cols[:5] + ["acc", "frechet", "train_seconds"]
    with pytest.raises(ValueError, match="clash"):
        result_row("m", "d", "s", 1, {"seed": 1.0})


def test_write_read_round_trip(tmp_path):
    data = rows()
    data[0]["corr"] = math.nan  # undefined metric in one row only
    csv_path, json_path = write_results(data, tmp_path)
    header = csv_path.read_text().splitlines()[0].split(",")
    assert header == list(ID_COLUMNS) + ["acc2_non0", "mae", "corr", "train_seconds"]
    assert len(csv_path.read_text().splitlines()) == len(data) + 1
    from_csv = read_results(csv_path)
    from_json = read_results(json_path)
    assert read_results(tmp_path) == from_json  # a folder reads results.json
    assert from_csv[3]["setting"] == "L" and from_csv[0]["setting"] == "0.3"  # strings stay strings
    assert from_csv[0]["seed"] == 1111 and isinstance(from_csv[0]["seed"], int)
    assert math.isnan(from_csv[0]["corr"]) and from_csv[1]["corr"] is None  # nan vs absent
    assert from_json[0]["corr"] is None  # JSON has no NaN: null
    for a, b in zip(data, from_csv):
        assert a["acc2_non0"] == b["acc2_non0"] and a["train_seconds"] == b["train_seconds"]  # exact floats
    json.loads(json_path.read_text())  # strict JSON
    assert list(from_json[0]) == header  # same key order as the CSV
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json"]  # no temp files


def test_summarise_mean_std_over_seeds():
    summary = summarise(rows())
    assert [(s["method"], s["setting"]) for s in summary] == [
        ("dicmor", "0.3"), ("dicmor", "L"), ("zero_fill", "0.3"), ("zero_fill", "L")
    ]
    s = summary[0]
    assert s["n_seeds"] == 3 and s["seeds"] == "1111,1112,1113"
    assert s["acc2_non0_mean"] == pytest.approx(0.81)
    assert s["acc2_non0_std"] == pytest.approx(np.std([0.80, 0.81, 0.82], ddof=1))  # sample std = 0.01
    assert s["acc2_non0_std"] == pytest.approx(0.01)
    assert s["mae_mean"] == pytest.approx(0.9) and s["train_seconds_mean"] == pytest.approx(11.0)
    assert s["realised_missing_rate_mean"] == pytest.approx(0.3)
    assert "seed_mean" not in s
    single = summarise(rows()[:1])[0]
    assert single["n_seeds"] == 1 and single["acc2_non0_std"] == 0.0  # one seed: std reported as 0
    with pytest.raises(ValueError, match="duplicate seed"):
        summarise(rows()[:1] * 2)
    with pytest.raises(ValueError, match="lacks grouping"):
        summarise([{"method": "m", "seed": 1, "acc": 0.5}])


def test_summarise_propagates_nan():
    data = rows()[:3]
    data[1]["acc2_non0"] = math.nan
    assert math.isnan(summarise(data)[0]["acc2_non0_mean"])


def test_format_table():
    text = format_table(summarise(rows()), metrics=["acc2_non0", "mae"])
    lines = text.splitlines()
    assert lines[0].split() == ["method", "dataset", "setting", "n", "acc2_non0", "(%)", "mae"]
    assert set(lines[1]) <= {"-", " "}
    assert "81.0 ± 1.0" in lines[2] and "0.900 ± 0.100" in lines[2]
    assert lines[2].split()[:4] == ["dicmor", "mosi", "0.3", "3"]
    assert len(lines) == 2 + 4
    one = format_table(summarise(rows()[:1]), metrics=["acc2_non0"])
    assert "80.0" in one and "±" not in one  # a single seed shows the mean alone
    raw = format_table(summarise(rows()), metrics=["acc2_non0"], scale=1.0, digits=2)
    assert "0.81 ± 0.01" in raw
    with pytest.raises(ValueError, match="unknown metric"):
        format_table(summarise(rows()), metrics=["f1"])


def budget_rows():
    from flowtransfer.training.results import result_row

    out = []
    for method, budgets in (("dicmor", [(100, 80, "cap", True), (100, 40, "plateau", False)]),
                            ("zero_fill", [(60, 30, "plateau", False), (70, 35, "plateau", False)])):
        for seed, (steps, best, reason, improving) in enumerate(budgets):
            for setting in ("mr=0.0", "mr=0.5"):
                out.append(result_row(method, "toy", setting, seed, {"acc": 0.5}, steps=steps, best_step=best,
                                      stop_reason=reason, improving_at_stop=improving))
    return out


def test_budget_table_flags_methods_still_improving(tmp_path):
    from flowtransfer.training.results import budget_records, format_budget_table, unconverged

    write_results(budget_rows(), tmp_path)
    for source in (budget_rows(), read_results(tmp_path / "results.csv"), read_results(tmp_path / "results.json")):
        assert len(budget_records(source)) == 4  # one per training, not per setting
        assert unconverged(source) == {("dicmor", "toy"): [0]}
        text = format_budget_table(source)
        lines = text.splitlines()
        assert lines[2].split()[:3] == ["dicmor", "(!)", "toy"] and "cap 1, plateau 1" in lines[2]
        assert "100 ± 0" in lines[2] and lines[2].rstrip().endswith("0")
        assert lines[3].startswith("zero_fill ") and "65 ± 7" in lines[3] and lines[3].rstrip().endswith("-")
        assert "not converged" in text
    assert read_results(tmp_path / "results.csv")[0]["improving_at_stop"] is True
    table = format_table(summarise(budget_rows()), metrics=["acc"], marks={"dicmor": " (!)"})
    assert "dicmor (!)" in table and "zero_fill (!)" not in table and "still improving" in table
    assert "(!)" not in format_table(summarise(budget_rows()), metrics=["acc"])
    assert format_budget_table([{"method": "m", "dataset": "d", "setting": "s", "seed": 0}]) == ""
