"""MMSA pickles: the restricted unpickler, small files written here, and the real MOSI file."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest

from flowtransfer.data import UnsafePickleError, load_mmsa, restricted_load
from flowtransfer.data.mmsa import MMSAFormatError, heldout_fold_path, standardize_splits

SIZES = {"train": 9, "valid": 4, "test": 5}


def _split(n, rng, t=(50, 50, 50), dims=(768, 5, 20), lengths=False):
    tl, ta, tv = t
    d = {
        "text": rng.standard_normal((n, tl, dims[0])).astype(np.float32),
        "text_bert": np.stack(
            [rng.integers(100, 30000, (n, tl)), (np.arange(tl)[None] < rng.integers(3, tl + 1, (n, 1))), np.zeros((n, tl))],
            axis=1,
        ).astype(np.float32),
        "audio": rng.standard_normal((n, ta, dims[1])).astype(np.float32),
        "vision": rng.standard_normal((n, tv, dims[2])).astype(np.float32),
        "regression_labels": rng.uniform(-3, 3, n).astype(np.float32),
        "classification_labels": rng.integers(0, 3, n),
        "id": np.array([f"vid{i}$_${i}" for i in range(n)], dtype=object),
        "raw_text": np.array([f"words {i}" for i in range(n)], dtype=object),
    }
    if lengths:
        d["audio_lengths"] = rng.integers(1, ta + 1, n)
        d["vision_lengths"] = rng.integers(1, tv + 1, n)
    return d


def _write(path: Path, obj) -> Path:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=4)
    return path


@pytest.fixture
def aligned(tmp_path):
    rng = np.random.default_rng(0)
    data = {s: _split(n, rng) for s, n in SIZES.items()}
    data["train"]["audio"][0, 3, 1] = -np.inf
    data["train"]["audio"][2, 0, :] = -np.inf
    return _write(tmp_path / "aligned_50.pkl", data), data


def test_aligned_file(aligned):
    path, raw = aligned
    with pytest.warns(UserWarning, match=r"aligned_50.pkl \[train\].*A: 6 of"):
        data = load_mmsa(path, standardize=False)
    assert list(data) == ["train", "valid", "test"]
    for s, n in SIZES.items():
        ds = data[s]
        assert len(ds) == n and ds.modalities == ("L", "A", "V")
        assert ds.input_dims == {"L": 768, "A": 5, "V": 20}
        assert ds.seq_lens == {"L": 50, "A": 50, "V": 50}
        assert ds.task == "regression"
        np.testing.assert_array_equal(ds.features["V"], raw[s]["vision"].transpose(0, 2, 1))
        np.testing.assert_array_equal(ds.labels, raw[s]["regression_labels"])
        assert ds.ids.tolist() == list(raw[s]["id"])
        assert ds.extras["raw_text"].tolist() == list(raw[s]["raw_text"])
        np.testing.assert_array_equal(ds.extras["classification_labels"], raw[s]["classification_labels"])
        # L's lengths come from the BERT attention mask
        np.testing.assert_array_equal(ds.lengths["L"], raw[s]["text_bert"][:, 1].sum(1))
    tr = data["train"]
    assert tr.cleaning == {"A": 6} and data["valid"].cleaning == {}
    assert tr.preprocessing == {"standardize": False}
    assert np.isfinite(tr.features["A"]).all() and tr.features["A"][0, 1, 3] == 0.0
    with pytest.raises(MMSAFormatError, match=r"\[train\].*modality 'A' holds 6 non-finite values \(0 NaN, 6 inf\)"):
        load_mmsa(path, nonfinite="error")


def test_options(aligned):
    path, raw = aligned
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls = load_mmsa(path, task="classification", splits=["valid"])
        bert = load_mmsa(path, text_key="text_bert", splits=("test",), modalities=("L", "V"))
    assert list(cls) == ["valid"]
    assert cls["valid"].task == "classification" and cls["valid"].num_classes <= 3
    np.testing.assert_array_equal(cls["valid"].labels, raw["valid"]["classification_labels"])
    ds = bert["test"]
    assert ds.modalities == ("L", "V") and ds.input_dims == {"L": 3, "V": 20} and ds.seq_lens["L"] == 50
    np.testing.assert_array_equal(ds.features["L"], raw["test"]["text_bert"])  # ids/mask/segments as channels
    with pytest.raises(KeyError, match=r"unknown split 'dev'.*available splits: \['train', 'valid', 'test'\]"):
        load_mmsa(path, splits=["dev"])
    with pytest.raises(ValueError, match="text_key"):
        load_mmsa(path, text_key="words")
    with pytest.raises(ValueError, match="unknown task"):
        load_mmsa(path, task="ranking")
    with pytest.raises(ValueError, match="subset of"):
        load_mmsa(path, modalities=("L", "X"))


def test_unaligned_lengths(tmp_path):
    rng = np.random.default_rng(1)
    data = {s: _split(n, rng, t=(50, 375, 500), dims=(768, 5, 20), lengths=True) for s, n in SIZES.items()}
    data["test"]["audio_lengths"][0] = 400  # longer than the stored sequence: clipped, with a warning
    path = _write(tmp_path / "unaligned_50.pkl", data)
    with pytest.warns(UserWarning, match=r"\[test\].*1 values of 'audio_lengths' lie outside \[0, 375\]"):
        out = load_mmsa(path)
    tr = out["train"]
    assert tr.seq_lens == {"L": 50, "A": 375, "V": 500}
    np.testing.assert_array_equal(tr.lengths["A"], data["train"]["audio_lengths"])
    np.testing.assert_array_equal(tr.lengths["V"], data["train"]["vision_lengths"])
    assert out["test"].lengths["A"][0] == 375
    b = tr.batch([0, 1])
    assert b.features["V"].shape == (2, 20, 500) and b.lengths["A"].tolist() == data["train"]["audio_lengths"][:2].tolist()


def test_bad_files(tmp_path, aligned):
    path, raw = aligned
    blob = path.read_bytes()
    cut = tmp_path / "truncated.pkl"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(MMSAFormatError, match="truncated.pkl"):
        load_mmsa(cut)
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"this is not a pickle at all")
    with pytest.raises(MMSAFormatError, match="junk.pkl"):
        load_mmsa(junk)
    with pytest.raises(FileNotFoundError, match="absent.pkl"):
        load_mmsa(tmp_path / "absent.pkl")
    with pytest.raises(MMSAFormatError, match="is a folder"):
        load_mmsa(tmp_path)
    del raw["valid"]["audio"]
    with pytest.raises(MMSAFormatError, match=r"\[valid\]: missing key 'audio'"):
        load_mmsa(_write(tmp_path / "nokey.pkl", raw), splits=["valid"])
    with pytest.raises(MMSAFormatError, match="dict of splits"):
        load_mmsa(_write(tmp_path / "list.pkl", [1, 2]))
    raw["test"]["vision"] = raw["test"]["vision"][:3]
    with pytest.raises(MMSAFormatError, match=r"\[test\].*mismatched sample counts"):
        load_mmsa(_write(tmp_path / "counts.pkl", raw), splits=["test"])


class _RunsCode:
    """Unpickling this would call os.system and create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evals:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_restricted_unpickler_refuses_code(tmp_path, protocol):
    marker = tmp_path / "marker"
    evil = {"train": {"audio": np.zeros((2, 1, 1)), "payload": _RunsCode(marker)}}
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(evil, protocol=protocol))
    with pytest.raises(UnsafePickleError, match=r"evil.pkl.*'(posix|nt)\.system'"):
        load_mmsa(path)
    assert not marker.exists(), "nothing from the file may run"
    with pytest.raises(UnsafePickleError, match=r"'(builtins|__builtin__)\.eval'"):
        restricted_load(pickle.dumps([_Evals()], protocol=protocol))
    # a plain pickle would have run it: the test payload is real
    pickle.loads(pickle.dumps(_RunsCode(marker), protocol=protocol))
    assert marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, 5])
def test_restricted_unpickler_reads_numpy_and_containers(protocol):
    obj = {
        "f": np.arange(6, dtype=np.float32).reshape(2, 3),
        "i": np.arange(3),
        "o": np.array(["a", "bc"], dtype=object),
        "u": np.array(["x", "yz"]),
        "s": np.float32(1.5),
        "t": (1, 2.0, "x", b"by", None, True),
        "set": {1, 2},
        "l": [np.int64(3)],
    }
    back = restricted_load(pickle.dumps(obj, protocol=protocol))
    assert back.keys() == obj.keys()
    for k in ("f", "i", "o", "u"):
        np.testing.assert_array_equal(back[k], obj[k])
        assert back[k].dtype == obj[k].dtype
    assert back["s"] == obj["s"] and back["t"] == obj["t"] and back["set"] == obj["set"] and back["l"] == [3]


def test_real_mosi_file(shared_data):
    path = shared_data / "mosi_utterance" / "mosi_utterance_poria.pkl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    data = load_mmsa(path)
    # the re-split file (2026-12-01): validation and test both come from Poria's test videos
    assert {s: len(d) for s, d in data.items()} == {"train": 1447, "valid": 265, "test": 487}
    for ds in data.values():
        assert ds.modalities == ("L", "A", "V")
        assert ds.input_dims == {"L": 100, "A": 73, "V": 100}
        assert ds.seq_lens == {"L": 1, "A": 1, "V": 1}
        assert ds.labels.dtype == np.float32 and ds.labels.min() >= -3 and ds.labels.max() <= 3
        assert all("$_$" in i for i in ds.ids[:5])
    # no video crosses splits
    videos = {s: {i.split("$_$")[0] for i in d.ids} for s, d in data.items()}
    assert not videos["train"] & videos["test"] and not videos["valid"] & videos["test"]
    assert not videos["train"] & videos["valid"]
    assert sum(data["train"].class_balance().values()) == 1447
    cls = load_mmsa(path, task="classification", splits=["test"])["test"]
    assert cls.num_classes == 3 and set(np.unique(cls.labels)) <= {0, 1, 2}


# ------------------------------------------------------------------ standardisation and folds (issue 11)


def test_standardize_on_training_statistics_only(aligned):
    path, raw = aligned
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_mmsa(path)  # on by default
        plain = load_mmsa(path, standardize=False)
        test_only = load_mmsa(path, splits=["test"])
    rec = data["train"].preprocessing["standardize"]
    assert rec["fit_split"] == "train" and rec["modalities"] == ["L", "A", "V"]
    for m in ("L", "A", "V"):
        x = plain["train"].features[m].astype(np.float64)  # (N, C, T), non-finite already zeroed
        mu, sd = x.mean(axis=(0, 2)), x.std(axis=(0, 2))
        np.testing.assert_allclose(rec["mean"][m], mu, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(rec["std"][m], sd, rtol=1e-10)
        z = data["train"].features[m].astype(np.float64)
        np.testing.assert_allclose(z.mean(axis=(0, 2)), 0.0, atol=1e-5)
        np.testing.assert_allclose(z.std(axis=(0, 2)), 1.0, atol=1e-4)
        # other splits use the training statistics, not their own
        for s in ("valid", "test"):
            expected = (plain[s].features[m] - mu[None, :, None]) / sd[None, :, None]
            np.testing.assert_allclose(data[s].features[m], expected, rtol=1e-4, atol=1e-5)
            assert data[s].preprocessing == data["train"].preprocessing
    # loading only the test split still standardises with the training split's statistics
    np.testing.assert_allclose(test_only["test"].features["A"], data["test"].features["A"], rtol=1e-6)
    # token ids are never standardised; a chosen subset only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bert = load_mmsa(path, text_key="text_bert", splits=["test"])
        only_a = load_mmsa(path, standardize=["A"], splits=["valid"])
    np.testing.assert_array_equal(bert["test"].features["L"], raw["test"]["text_bert"])
    assert bert["test"].preprocessing["standardize"]["modalities"] == ["A", "V"]
    np.testing.assert_array_equal(only_a["valid"].features["V"], plain["valid"].features["V"])
    with pytest.raises(ValueError, match="token ids"):
        load_mmsa(path, text_key="text_bert", standardize=["L"])
    with pytest.raises(ValueError, match="not loaded"):
        load_mmsa(path, modalities=("L", "V"), standardize=["A"])
    with pytest.raises(KeyError, match="no 'train' split"):
        standardize_splits({"test": plain["test"]})


def test_standardize_needs_a_training_split(tmp_path):
    rng = np.random.default_rng(3)
    path = _write(tmp_path / "no_train.pkl", {"valid": _split(4, rng), "test": _split(5, rng)})
    with pytest.raises(MMSAFormatError, match="standardize needs the training split"):
        load_mmsa(path)
    assert list(load_mmsa(path, standardize=False)) == ["valid", "test"]


def test_real_mosi_standardized_and_heldout_folds(shared_data):
    root = shared_data / "mosi_utterance"
    main = root / "mosi_utterance_poria.pkl"
    if not main.is_file() or not (root / "heldout_cv" / "fold0.pkl").is_file():
        pytest.skip(f"the MOSI file or its held-out folds are absent under {root}")
    raw = load_mmsa(main, standardize=False)
    data = load_mmsa(main)
    assert float(np.abs(raw["train"].features["A"]).max()) > 100  # unscaled audio (data README)
    assert abs(float(data["train"].features["A"].mean())) < 1e-4
    assert float(np.abs(data["train"].features["A"].std(axis=(0, 2)) - 1).max()) < 1e-3
    from flowtransfer.data.summary import load_dataset

    tests, sizes = set(), 0
    for k in range(5):
        fold = load_dataset("mmsa", str(root), fold=k)
        assert fold["train"].preprocessing["standardize"]["fit_split"] == "train"
        n = {s: len(d) for s, d in fold.items()}
        assert 430 <= n["train"] <= 504 and 124 <= n["valid"] <= 183 and 124 <= n["test"] <= 183
        assert n["train"] + n["valid"] + n["test"] == 752
        videos = {s: {i.split("$_$")[0] for i in d.ids} for s, d in fold.items()}
        assert not videos["train"] & videos["test"] and not videos["valid"] & videos["test"]
        tests |= set(fold["test"].ids)
        sizes += n["test"]
    assert sizes == len(tests) == 752  # the five test folds pool every held-out sample once
    assert heldout_fold_path(1, root / "heldout_cv") == root / "heldout_cv" / "fold1.pkl"
    with pytest.raises(ValueError, match="fold must be"):
        heldout_fold_path(5, root)
    with pytest.raises(ValueError, match="data folder"):
        heldout_fold_path(0, main)
