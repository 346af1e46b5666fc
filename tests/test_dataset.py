"""MultimodalDataset, Batch and from_arrays: layouts, validation, masks (NaN in absent slots), loaders."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from flowtransfer.data import Batch, MultimodalDataset, from_arrays, random_missing_mask, shared_data_dir
from flowtransfer.data.paths import require_data


def _arrays(n=12, seed=0):
    rng = np.random.default_rng(seed)
    feats = {"A": rng.standard_normal((n, 5, 3)), "L": rng.standard_normal((n, 5, 7)), "S": rng.standard_normal((n, 2, 4))}
    return feats, rng.uniform(-3, 3, n)


def test_from_arrays_layouts():
    feats, y = _arrays()
    ds = from_arrays(feats, y, "regression", layout="NTC")
    assert ds.modalities == ("A", "L", "S")
    assert ds.input_dims == {"A": 3, "L": 7, "S": 4}
    assert ds.seq_lens == {"A": 5, "L": 5, "S": 2}
    assert len(ds) == 12
    np.testing.assert_allclose(ds.features["L"], feats["L"].transpose(0, 2, 1).astype(np.float32))
    assert ds.features["L"].dtype == np.float32 and ds.features["L"].flags.c_contiguous
    nct = from_arrays({"A": feats["A"]}, y, "regression", layout="NCT")
    assert nct.input_dims == {"A": 5} and nct.seq_lens == {"A": 3}
    np.testing.assert_array_equal(nct.features["A"], feats["A"].astype(np.float32))
    assert ds.labels.dtype == np.float32 and ds.num_classes is None
    assert ds.mask.all() and ds.missing_rate() == 0.0
    # torch tensors are accepted too
    t = from_arrays({"A": torch.from_numpy(feats["A"])}, torch.from_numpy(y), "regression")
    np.testing.assert_array_equal(t.features["A"], ds.features["A"])


def test_classification_labels_and_classes():
    feats, _ = _arrays()
    y = np.array([0, 1, 2] * 4)
    ds = from_arrays(feats, y, "classification")
    assert ds.num_classes == 3 and ds.labels.dtype == np.int64
    assert ds.class_balance() == {0: 4, 1: 4, 2: 4}
    np.testing.assert_array_equal(ds.class_labels(), y)
    ds5 = from_arrays(feats, y, "classification", num_classes=5)
    assert ds5.class_balance() == {0: 4, 1: 4, 2: 4, 3: 0, 4: 0}
    # regression -> the 7-class sentiment rule (halves away from zero, clipped)
    r = np.array([-3.4, -2.5, -0.5, -0.49, 0.0, 0.5, 1.5, 2.5, 3.0, 4.0, 0.2, -1.2])
    reg = from_arrays(feats, r, "regression")
    np.testing.assert_array_equal(reg.class_labels(), [0, 0, 2, 3, 3, 4, 5, 6, 6, 6, 3, 2])
    assert reg.prior_classes == 7 and sum(reg.class_balance().values()) == 12


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(task="ranking"), "unknown task 'ranking'"),
        (dict(layout="TNC"), "unknown layout 'TNC'"),
        (dict(labels=np.zeros(11)), r"labels: expected shape \(12,\)"),
        (dict(labels=np.zeros((12, 2))), r"labels: expected shape \(12,\)"),
        (dict(nonfinite="drop"), "nonfinite must be"),
        (dict(mask=np.ones((12, 2), bool)), r"mask: expected shape \(12, 3\)"),
        (dict(lengths={"A": np.full(12, 9)}), r"lengths\['A'\] must lie in \[0, 5\]"),
        (dict(lengths={"Q": np.ones(12)}), "unknown modality 'Q'"),
        (dict(ids=np.arange(3)), r"ids: expected shape \(12,\)"),
    ],
)
def test_from_arrays_validation(kwargs, message):
    feats, y = _arrays()
    args = dict(features=feats, labels=y, task="regression")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        from_arrays(**args)


def test_structural_errors():
    feats, y = _arrays()
    with pytest.raises(ValueError, match=r"mismatched sample counts.*'A': 12.*'L': 11"):
        from_arrays({"A": feats["A"], "L": feats["L"][:11]}, y, "regression")
    with pytest.raises(ValueError, match=r"modality 'A': expected a rank-3 array.*\(12, 5\)"):
        from_arrays({"A": feats["A"][:, :, 0]}, y, "regression")
    with pytest.raises(ValueError, match="rank-3"):
        from_arrays({"A": np.zeros((12, 1, 1, 1))}, y, "regression")
    with pytest.raises(ValueError, match="empty dataset"):
        from_arrays({"A": np.zeros((0, 2, 3))}, np.zeros(0), "regression")
    with pytest.raises(ValueError, match="non-empty mapping"):
        from_arrays({}, y, "regression")
    with pytest.raises(ValueError, match="integers"):
        from_arrays(feats, y, "classification")
    with pytest.raises(ValueError, match="out of range"):
        from_arrays(feats, np.arange(12) % 4, "classification", num_classes=3)
    with pytest.raises(ValueError, match="labels contain 1 non-finite"):
        from_arrays(feats, np.r_[y[:-1], np.nan], "regression")
    mask = np.ones((12, 3), bool)
    mask[4] = False
    with pytest.raises(ValueError, match=r"1 samples have every modality missing \(first rows \[4\]\)"):
        from_arrays(feats, y, "regression", mask=mask)


def test_nonfinite_error_and_explicit_cleaning():
    feats, y = _arrays()
    feats["A"][0, 0, 0] = -np.inf
    feats["A"][1, 2, 1] = np.nan
    feats["L"][3, 1, 1] = np.inf
    with pytest.raises(ValueError, match=r"modality 'A' holds 2 non-finite values \(1 NaN, 1 inf\)"):
        from_arrays(feats, y, "regression")
    with pytest.warns(UserWarning, match="replaced non-finite.*A: 2 of 180.*L: 1 of 420"):
        ds = from_arrays(feats, y, "regression", nonfinite="zero")
    assert ds.cleaning == {"A": 2, "L": 1}
    assert ds.summary()["cleaning"] == {"A": 2, "L": 1}
    assert np.isfinite(ds.features["A"]).all() and ds.features["A"][0, 0, 0] == 0.0
    assert np.isinf(feats["A"][0, 0, 0]), "the caller's array is not modified"
    # the constructor refuses non-finite data in present slots, naming the modality
    with pytest.raises(ValueError, match="modality 'L' holds 1 non-finite"):
        MultimodalDataset({"L": feats["L"].transpose(0, 2, 1)}, y, "regression")


def test_nonfinite_in_absent_slots_is_allowed():
    feats, y = _arrays()
    feats["S"][2] = np.nan  # sample 2 has no S: its values are irrelevant
    mask = np.ones((12, 3), bool)
    mask[2, 2] = False
    ds = from_arrays({k: v.transpose(0, 2, 1) for k, v in feats.items()}, y, "regression", layout="NCT", mask=mask)
    assert np.isfinite(ds.features["S"]).all()
    with pytest.raises(ValueError, match="data is absent"):
        ds.with_mask(np.ones((12, 3), bool))


def test_batches_hold_nan_in_absent_slots():
    feats, y = _arrays(n=40)
    ds = from_arrays(feats, y, "regression")
    mask = random_missing_mask(40, ds.modalities, 0.4, seed=0)
    dm = ds.with_mask(mask)
    assert dm.missing_rate() == pytest.approx(0.4, abs=0.5 / 120)
    assert ds.mask.all(), "with_mask leaves the original alone"
    assert dm.features["A"] is ds.features["A"], "with_mask shares the arrays"
    b = dm.batch(np.arange(40))
    assert isinstance(b, Batch) and len(b) == 40 and b.modalities == ("A", "L", "S")
    for j, m in enumerate(ds.modalities):
        x = b.features[m]
        assert x.dtype == torch.float32 and x.shape == (40, *ds.features[m].shape[1:])
        absent = ~b.mask[:, j]
        assert torch.isnan(x[absent]).all()
        assert torch.isfinite(x[~absent]).all()
        torch.testing.assert_close(x[~absent], torch.from_numpy(ds.features[m][mask[:, j]]))
        assert torch.equal(b.present(m), torch.from_numpy(mask[:, j]))
    filled = b.filled(0.0)
    for m in ds.modalities:
        assert torch.isfinite(filled.features[m]).all()
        assert (filled[m][~filled.present(m)] == 0).all()
    assert torch.isnan(b.features["A"][~b.present("A")]).all(), "filled() copies"
    means = {m: torch.from_numpy(ds.features[m].mean(axis=(0, 2))[:, None]) for m in ds.modalities}
    mf = b.filled(means)
    j = int(torch.nonzero(~b.present("L"))[0])
    torch.testing.assert_close(mf["L"][j], means["L"].expand(7, 5))
    with pytest.raises(KeyError, match="unknown modality 'Q'"):
        b.present("Q")
    # per-item access and collate agree with the vectorised batch
    items = [dm[i] for i in range(40)]
    c = MultimodalDataset.collate(items)
    for m in ds.modalities:
        torch.testing.assert_close(c.features[m], b.features[m], equal_nan=True)
    assert torch.equal(c.mask, b.mask) and torch.equal(c.labels, b.labels) and torch.equal(c.classes, b.classes)
    assert b.to("cpu").features["A"].device.type == "cpu"


def test_with_mask_validation():
    feats, y = _arrays()
    ds = from_arrays(feats, y, "regression")
    bad = np.ones((12, 3), bool)
    bad[7] = False
    with pytest.raises(ValueError, match=r"every modality missing \(first rows \[7\]\)"):
        ds.with_mask(bad)
    with pytest.raises(ValueError, match=r"mask: expected shape \(12, 3\)"):
        ds.with_mask(np.ones((12, 2), bool))
    half = ds.with_mask(np.c_[np.ones(12, bool), np.zeros(12, bool), np.ones(12, bool)])
    both = half.with_mask(np.c_[np.zeros(12, bool), np.ones(12, bool), np.ones(12, bool)], intersect=True)
    assert both.mask.tolist() == [[False, False, True]] * 12


def test_loader_deterministic_and_complete():
    feats, y = _arrays(n=23)
    ds = from_arrays(feats, y, "regression", ids=[f"s{i}" for i in range(23)])
    seq = list(ds.loader(5))
    assert [len(b) for b in seq] == [5, 5, 5, 5, 3]
    assert torch.cat([b.index for b in seq]).tolist() == list(range(23))
    assert [len(b) for b in ds.loader(5, drop_last=True)] == [5, 5, 5, 5]

    def order(loader):
        return torch.cat([b.index for b in loader]).tolist()

    l1, l2 = ds.loader(5, shuffle=True, seed=3), ds.loader(5, shuffle=True, seed=3)
    e1, e2 = order(l1), order(l2)
    assert e1 == e2 and sorted(e1) == list(range(23)) and e1 != list(range(23))
    assert order(l1) != e1, "each epoch reshuffles"
    assert order(ds.loader(5, shuffle=True, seed=4)) != e1
    b = next(iter(ds.loader(4, shuffle=True, seed=0)))
    np.testing.assert_array_equal(ds.ids[b.index.numpy()], [f"s{i}" for i in b.index.tolist()])
    with pytest.raises(ValueError, match="batch_size"):
        ds.loader(0)


def test_subset_lengths_ids_extras_summary():
    feats, y = _arrays()
    lengths = {"A": np.arange(12) % 6}
    ds = from_arrays(feats, y, "regression", lengths=lengths, ids=np.arange(12), extras={"raw_text": np.array(list("abcdefghijkl"))})
    sub = ds.subset([3, 1, 10])
    assert len(sub) == 3 and sub.ids.tolist() == ["3", "1", "10"]
    assert sub.lengths["A"].tolist() == [3, 1, 4] and sub.extras["raw_text"].tolist() == ["d", "b", "k"]
    np.testing.assert_array_equal(sub.features["L"], ds.features["L"][[3, 1, 10]])
    assert len(ds.subset(np.arange(12) < 4)) == 4
    with pytest.raises(ValueError, match="empty"):
        ds.subset([])
    with pytest.raises(IndexError):
        ds.subset([12])
    b = ds.batch([0, 5])
    assert b.lengths["A"].tolist() == [0, 5]
    s = ds.summary()
    assert s["n"] == 12 and s["shapes"] == {"A": [3, 5], "L": [7, 5], "S": [4, 2]}
    assert s["lengths"] == {"A": [0, 5]} and s["missing_rate"] == 0.0 and "labels" in s
    assert "MultimodalDataset(n=12" in repr(ds)


def test_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWTRANSFER_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    monkeypatch.delenv("FLOWTRANSFER_DATA")
    assert shared_data_dir().parts[-2:] == ("shared", "data")
    assert require_data(tmp_path, "x") == tmp_path
    with pytest.raises(FileNotFoundError, match="the MOSI pickle not found at .*nope.pkl"):
        require_data(tmp_path / "nope.pkl", "the MOSI pickle")


def test_load_npz_and_summary_cli(tmp_path, capsys):
    from flowtransfer.data import load_npz
    from flowtransfer.data.summary import load_dataset, main

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 30), ("valid", 10), ("test", 12)):
        arrays[f"{split}.acc"] = rng.standard_normal((n, 25, 3))
        arrays[f"{split}.gyro"] = rng.standard_normal((n, 25, 6))
        arrays[f"{split}.labels"] = rng.integers(0, 4, n)
    arrays["test.mask"] = np.c_[np.ones(12, bool), np.arange(12) % 2 == 0]
    arrays["train.lengths.acc"] = np.full(30, 20)
    path = tmp_path / "sensors.npz"
    np.savez(path, **arrays)
    data = load_npz(path)
    assert list(data) == ["train", "valid", "test"]
    tr = data["train"]
    assert tr.task == "classification" and tr.modalities == ("acc", "gyro")
    assert tr.input_dims == {"acc": 3, "gyro": 6} and tr.seq_lens == {"acc": 25, "gyro": 25}
    assert tr.lengths["acc"].tolist() == [20] * 30
    assert data["test"].missing_rate() == pytest.approx(0.25)
    assert load_npz(path, task="regression")["valid"].task == "regression"
    bad = dict(arrays)
    del bad["valid.labels"]
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(ValueError, match="'valid.labels'"):
        load_npz(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="npz data file not found"):
        load_npz(tmp_path / "none.npz")
    with pytest.raises(ValueError, match=r"unknown dataset 'x'; known: \["):
        load_dataset("x")

    assert main(["--dataset", "npz", "--data", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[test] n=12" in out and "acc: C=3 T=25" in out and "0.7->0.5000" in out and "missing in the data: 0.2500" in out
    assert main(["--dataset", "npz"]) == 2
    assert "needs --data" in capsys.readouterr().err


def test_splits_are_checked_against_each_other(tmp_path):
    from flowtransfer.data import load_npz
    from flowtransfer.data.dataset import check_splits
    from flowtransfer.io import InputError

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 20), ("valid", 8), ("test", 8)):
        arrays[f"{split}.acc"] = rng.standard_normal((n, 5, 3))
        arrays[f"{split}.gyro"] = rng.standard_normal((n, 5, 6))
        arrays[f"{split}.labels"] = np.arange(n) % 2
    arrays["test.gyro"] = rng.standard_normal((8, 5, 7))
    np.savez(tmp_path / "widths.npz", **arrays)
    with pytest.raises(InputError, match=r"split 'test' has channels \{'acc': 3, 'gyro': 7\}, split 'train' has"):
        load_npz(tmp_path / "widths.npz")
    arrays["test.gyro"] = rng.standard_normal((8, 5, 6))
    np.savez(tmp_path / "ok.npz", **arrays)
    data = load_npz(tmp_path / "ok.npz")
    with pytest.raises(InputError, match=r"has no 'valid' split \(it has \['train', 'test'\]\)"):
        check_splits({"train": data["train"], "test": data["test"]}, required=("train", "valid", "test"))
    regression = load_npz(tmp_path / "ok.npz", task="regression")["test"]
    with pytest.raises(InputError, match="split 'test' is a regression task, split 'train' a classification task"):
        check_splits({"train": data["train"], "test": regression})
