"""Bad input is refused up front with a clear message, training is reproducible, nothing is lost.

One case per class of defect found by the fuzz pass of issue 13, each asserting the named error or
the correct result. Tiny models and a few optimiser steps: the whole module runs in well under a
minute on one core.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import flowtransfer
from flowtransfer.cli import main
from flowtransfer.io import CheckpointError, InputError

REPO = Path(__file__).resolve().parents[1]
FAST = ["--epochs", "1", "--max-steps-per-epoch", "2", "--preset", "small", "--no-progress"]


# ---------------------------------------------------------------------------------------- helpers


def _write_npz(path: Path, seed: int = 0, classes: int = 2, test_classes: int | None = None,
               float_labels: bool = False, **changes: np.ndarray) -> Path:
    """Tiny two-modality data: ``audio`` (N, 4, 3) and ``image`` (N, 2, 5), NTC layout."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", 48), ("valid", 24), ("test", 30)):
        k = classes if split == "train" or test_classes is None else test_classes
        y = np.arange(n) % k
        arrays[f"{split}.audio"] = (rng.normal(size=(n, 4, 3)) + y[:, None, None]).astype(np.float32)
        arrays[f"{split}.image"] = (rng.normal(size=(n, 2, 5)) - y[:, None, None]).astype(np.float32)
        arrays[f"{split}.labels"] = y.astype(np.float32) if float_labels else y
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def _python(code: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=240, **kwargs)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def trained(data_dir) -> tuple[Path, Path, list[str]]:
    """A DiCMoR trained once by the CLI on float-valued class labels (declared by --task).

    Returns (model file, data file, the train arguments)."""
    data = _write_npz(data_dir / "float_labels.npz", classes=3, float_labels=True)
    args = ["train", "--dataset", "npz", "--data", str(data), "--task", "classification", "--seed", "3", *FAST]
    assert main([*args, "--out", str(data_dir / "first.pt")]) == 0
    return data_dir / "first.pt", data, args


# ---------------------------------------------------------------------------------------- 1


def test_01_train_twice_with_the_same_seed_gives_the_same_model(trained, data_dir) -> None:
    first, _, args = trained
    assert main([*args, "--out", str(data_dir / "second.pt")]) == 0
    _assert_same_weights(_state(first), _state(data_dir / "second.pt"))


# ---------------------------------------------------------------------------------------- 2


def test_02_npz_class_count_comes_from_the_training_split(tmp_path, capsys) -> None:
    from flowtransfer.data import load_npz

    path = _write_npz(tmp_path / "top.npz", classes=3, test_classes=2)  # valid/test lack class 2
    data = load_npz(path)
    assert {s: ds.num_classes for s, ds in data.items()} == {"train": 3, "valid": 3, "test": 3}
    rc, out, _ = _cli(capsys, "run", "--dataset", "npz", "--data", str(path), "--methods", "zero_fill", "--seeds", "0",
                      "--rates", "0.5", "--no-patterns", "--out", str(tmp_path / "run"), *FAST)
    assert rc == 0 and "zero_fill" in out
    bad = _write_npz(tmp_path / "beyond.npz", classes=2, **{"test.labels": np.arange(30) % 3})
    with pytest.raises(ValueError, match=r"\[test\].*label 2 out of range for num_classes=2.*'train' split"):
        load_npz(bad)
    assert load_npz(path, num_classes=5)["test"].num_classes == 5  # the declared count wins


# ---------------------------------------------------------------------------------------- 3


def _mmsa_split(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "text": rng.normal(size=(n, 2, 6)).astype(np.float32),
        "audio": rng.normal(size=(n, 2, 5)).astype(np.float32),
        "vision": rng.normal(size=(n, 2, 4)).astype(np.float32),
        "regression_labels": rng.uniform(-3, 3, n).astype(np.float32),
        "classification_labels": np.arange(n) % 3,
    }


def test_03_mmsa_nan_slots_are_missing_and_reported(tmp_path, capsys) -> None:
    from flowtransfer.data import load_mmsa

    rng = np.random.default_rng(0)
    raw = {s: _mmsa_split(rng, n) for s, n in (("train", 40), ("valid", 20), ("test", 24))}
    raw["train"]["audio"][:4] = np.nan  # audio really missing for 4 samples
    raw["train"]["audio"][5, 0, 1] = -np.inf  # one bad value: zeroed, reported
    raw["test"]["vision"][[1, 2]] = np.nan
    path = tmp_path / "aligned.pkl"
    path.write_bytes(pickle.dumps(raw, protocol=4))
    with pytest.warns(UserWarning, match=r"\[train\].*treated as missing it: A: 4 of 40"):
        data = load_mmsa(path)
    tr, te = data["train"], data["test"]
    assert not tr.mask[:4, 1].any() and tr.mask[4:, 1].all()  # A is column 1
    assert tr.nonfinite == {"A": {"nan": 40, "inf": 1, "missing_slots": 4, "zeroed": 1}}
    assert te.nonfinite["V"]["missing_slots"] == 2 and not te.mask[[1, 2], 2].any()

    rc, out, _ = _cli(capsys, "run", "--dataset", "mmsa", "--data", str(path), "--methods", "zero_fill",
                      "--seeds", "0", "--rates", "0.5", "--out", str(tmp_path / "run"), *FAST)
    assert rc == 0
    assert "data: [train] A: 40 NaN, 1 inf; 4 samples entirely non-finite, treated as missing A; 1 values replaced with 0" in out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["train"]["nonfinite"]["A"] == {"nan": 40, "inf": 1, "missing_slots": 4, "zeroed": 1}
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    only_v = next(r for r in rows if r["setting"] == "pattern=V")
    assert only_v["samples_without_input"] == 2  # the two test samples without vision


# ---------------------------------------------------------------------------------------- 4


def test_04_npz_mask_columns_follow_each_splits_own_key_order(tmp_path) -> None:
    from flowtransfer.data import load_npz

    rng = np.random.default_rng(0)
    mask = np.ones((30, 2), bool)
    mask[:10, 0] = False  # the test split lists image first: its first 10 samples lack the image
    arrays = {}
    for split, n in (("train", 20), ("valid", 10)):
        arrays |= {f"{split}.audio": rng.normal(size=(n, 4, 3)), f"{split}.image": rng.normal(size=(n, 2, 5)),
                   f"{split}.labels": np.arange(n) % 2}
    arrays |= {"test.image": rng.normal(size=(30, 2, 5)), "test.audio": rng.normal(size=(30, 4, 3)),
               "test.labels": np.arange(30) % 2, "test.mask": mask}
    np.savez(tmp_path / "order.npz", **arrays)
    test = load_npz(tmp_path / "order.npz")["test"]
    assert test.modalities == ("audio", "image")
    assert test.mask[:, 0].all(), "audio is present everywhere"
    assert not test.mask[:10, 1].any() and test.mask[10:, 1].all()


# ---------------------------------------------------------------------------------------- 5


def test_05_non_finite_outputs_are_refused(tmp_path, capsys) -> None:
    from flowtransfer.api import NonFiniteOutputError

    blown = flowtransfer.load()  # finite weights far outside any trained range: finite input, overflowing output
    with torch.no_grad():
        for p in blown.parameters():
            p.mul_(1e30)
    x = np.full((2, 8, 5), 1e3, np.float32)
    with pytest.raises(NonFiniteOutputError, match=r"A -> L gave non-finite values \(NaN/inf\) for 2 of 2 samples"):
        flowtransfer.transfer(x, "A", "L", model=blown)
    payload = torch.load(flowtransfer.default_model_path(), weights_only=True)
    payload["state_dict"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    torch.save(payload, tmp_path / "nan.pt")
    np.save(tmp_path / "a.npy", np.ones((2, 8, 5), np.float32))
    rc, _, err = _cli(capsys, "transfer", "--src", "A", "--dst", "L", "--input", str(tmp_path / "a.npy"),
                      "--output", str(tmp_path / "l.npy"), "--model", str(tmp_path / "nan.pt"))
    assert rc == 2 and "holds" in err and "non-finite values (NaN/inf)" in err
    assert not (tmp_path / "l.npy").exists()


# ---------------------------------------------------------------------------------------- 6


@pytest.mark.parametrize("command", ["train", "run"])
def test_06_a_missing_split_is_named(tmp_path, capsys, command) -> None:
    path = _write_npz(tmp_path / "novalid.npz", **{"valid.audio": None, "valid.image": None, "valid.labels": None})
    rc, _, err = _cli(capsys, command, "--dataset", "npz", "--data", str(path), "--out", str(tmp_path / "o"), *FAST)
    assert rc == 2
    assert "has no 'valid' split (it has ['train', 'test'])" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------- 7


def test_07_hostile_pickles_refused_before_allocating() -> None:
    """Run under a 2 GiB address-space limit: each file asks for far more, and must be refused."""
    code = r'''
        import pickle, resource, struct
        import numpy as np
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from flowtransfer.data.mmsa import MMSAFormatError, UnsafePickleError, restricted_load
        cases = {
            "bytearray": b"\x80\x04\x8c\x08builtins\x8c\tbytearray\x93J\x00\x00\x00\xd0\x85R.",
            "memo": b"\x80\x04Nr" + struct.pack("<I", 0xFFFFFFF0) + b".",
            "bytes8": b"\x80\x04\x8e" + struct.pack("<Q", 36 << 30) + b"xx.",
            "frame": b"\x80\x04\x95" + struct.pack("<Q", 36 << 30) + b"N.",
            "ndarray": b"\x80\x04\x8c\x05numpy\x8c\x07ndarray\x93(J\x00\x00\x01\x00J\x00\x00\x01\x00t\x85R.",
            "reconstruct": b"\x80\x04\x8c\x16numpy._core.multiarray\x8c\x0c_reconstruct\x93\x8c\x05numpy"
                           b"\x8c\x07ndarray\x93J\x00\x00\x01\x00J\x00\x00\x01\x00\x86C\x01f\x87R.",
            "object_state": pickle.dumps(np.array(["a"], dtype=object), protocol=2).replace(
                b"K\x01\x85", b"J\x00\xca\x9a\x3b\x85", 1),
        }
        for name, blob in cases.items():
            try:
                restricted_load(blob)
            except (MMSAFormatError, UnsafePickleError) as err:
                print(name, type(err).__name__, err)
            else:
                print(name, "LOADED")
        print("fine", restricted_load(pickle.dumps({"x": np.arange(3.0)}, protocol=5))["x"].sum())
    '''
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert lines["fine"] == "3.0"
    assert lines["bytearray"].startswith("UnsafePickleError") and "bytearray(n) allocates" in lines["bytearray"]
    for name in ("memo", "bytes8", "frame"):
        assert lines[name].startswith("MMSAFormatError") and "nothing was allocated" in lines[name], lines[name]
    assert lines["ndarray"].startswith("UnsafePickleError") and "numpy.ndarray directly" in lines["ndarray"]
    assert lines["reconstruct"].startswith("UnsafePickleError") and "(65536, 65536)" in lines["reconstruct"]
    assert "holds 1 items instead of 1000000000" in lines["object_state"]


def test_07_checkpoint_configs_range_checked_before_any_module_is_built(tmp_path, monkeypatch) -> None:
    from flowtransfer.crossmodal import CrossModalFlows

    def built(*_args, **_kwargs):
        raise AssertionError("a module was built from an unchecked config")

    for key, value, match in (("width", 1e5, r"width = 100000.0 is not a sane width"),
                              ("hidden", 12000, r"asks for width 12000, 8 layers .* far more than the"),
                              ("num_layers", -1, r"num_layers = -1 is not a sane count"),
                              ("augment_std", float("nan"), r"augment_std = nan is not a finite number")):
        payload = torch.load(flowtransfer.default_model_path(), weights_only=True)
        target = payload["config"] if key in payload["config"] else payload["config"]["flow_kwargs"]
        target[key] = value
        torch.save(payload, tmp_path / "bad.pt")
        with monkeypatch.context() as m:
            m.setattr(CrossModalFlows, "__init__", built)
            with pytest.raises(CheckpointError, match=match):
                flowtransfer.load(tmp_path / "bad.pt")


def test_07_checkpoint_entries_claiming_more_than_the_file_are_refused(tmp_path) -> None:
    from flowtransfer.io import safe_load

    blob = bytearray(flowtransfer.default_model_path().read_bytes())
    entry = blob.index(b"PK\x01\x02")  # first central-directory record: uncompressed size at +24
    blob[entry + 24: entry + 28] = struct.pack("<I", 0xFFFFFFF0)
    (tmp_path / "claims.pt").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"claims 4294967280 bytes but the file holds \d+; nothing was allocated"):
        safe_load(tmp_path / "claims.pt")
    buffer = io.BytesIO()
    torch.save({"x": torch.zeros(2)}, buffer, _use_new_zipfile_serialization=False)  # storages sized by the pickle
    (tmp_path / "legacy.pt").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="not a zip-format torch checkpoint"):
        safe_load(tmp_path / "legacy.pt")


def _npy_claiming(shape: str) -> bytes:
    """A small .npy whose header claims ``shape`` (padded to the original header length)."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 8, 3), np.float32))
    blob = buffer.getvalue()
    length = int.from_bytes(blob[8:10], "little")
    header = blob[10:10 + length].decode("latin1").replace("(2, 8, 3)", shape)
    return blob[:10] + (header.rstrip()[: length - 1].ljust(length - 1) + "\n").encode("latin1") + blob[10 + length:]


def test_07_npy_headers_claiming_huge_arrays_are_refused(tmp_path, capsys) -> None:
    import zipfile

    from flowtransfer.data import load_npz

    (tmp_path / "huge.npy").write_bytes(_npy_claiming("(99999, 99999, 9)"))
    rc, _, err = _cli(capsys, "transfer", "--src", "A", "--dst", "L", "--input", str(tmp_path / "huge.npy"),
                      "--output", str(tmp_path / "out.npy"))
    assert rc == 2 and "declares shape (99999, 99999, 9) of float32 (359992800036 bytes) but it holds 192" in err
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.writestr("train.audio.npy", _npy_claiming("(99999, 99999, 9)"))
    with pytest.raises(InputError, match=r"huge.npz \[train.audio\]: its header declares .* nothing was allocated"):
        load_npz(tmp_path / "huge.npz")


def test_07_transfer_chunks_large_batches(monkeypatch) -> None:
    import flowtransfer.api as api

    model = flowtransfer.load()
    x = torch.randn(10, 8, 6)
    whole = flowtransfer.transfer(x, "A", "L", model=model)
    calls = []
    original = type(model).transfer
    monkeypatch.setattr(type(model), "transfer", lambda self, t, s, d: calls.append(len(t)) or original(self, t, s, d))
    monkeypatch.setattr(api, "TRANSFER_CHUNK_ELEMENTS", 16 * 6 * 3)  # three samples of width 16, T 6
    chunked = flowtransfer.transfer(x, "A", "L", model=model)
    assert calls == [3, 3, 3, 1]
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    calls.clear()
    assert flowtransfer.transfer(x, "A", "L", model=model, batch_size=4).shape == (10, 16, 6) and calls == [4, 4, 2]


# ---------------------------------------------------------------------------------------- 8


@pytest.mark.parametrize("argv, message", [
    (["run", "--seeds", ","], "--seeds: no values given"),
    (["run", "--methods", ","], "--methods: no values given"),
    (["run", "--rates", ","], "--rates: no values given"),
    (["run", "--seeds", "0,1,0"], "seeds repeat [0]"),
    (["run", "--rates", "0.5,0.5"], "rates repeat [0.5]"),
    (["run", "--rates", "1.5"], "rates must be numbers in [0, 1), got 1.5"),
    (["run", "--methods", "zero_fill,zero_fill"], "methods repeat ['zero_fill']"),
    (["run", "--methods", "zero_fill,nope"], "unknown method ['nope']; registered: ["),
    (["train", "--method", "nope"], "unknown method ['nope']"),
    (["train", "--lr", "nan"], "lr must be a finite number, got nan"),
    (["run", "--preset", "huge"], "unknown preset 'huge'"),
    (["run", "--out", "{file}/sub"], "cannot write into the output folder"),
    (["train", "--out", "{file}/m.pt"], "--out {file}/m.pt cannot be written"),
    (["train", "--out", "{dir}"], "is a folder; give a file name"),
    (["evaluate", "{model}", "--out", "{file}/x"], "cannot write into the --out folder"),
])
def test_08_arguments_checked_before_any_work(tmp_path, capsys, monkeypatch, argv, message) -> None:
    import flowtransfer.experiment as experiment

    def trained(*_args, **_kwargs):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(experiment, "_fit", trained)
    (tmp_path / "file").write_text("not a folder")
    names = {"file": str(tmp_path / "file"), "dir": str(tmp_path), "model": str(tmp_path / "model.pt")}
    argv = [a.format(**names) for a in argv]
    if argv[0] in ("run", "train"):
        argv = [argv[0], *FAST, *argv[1:]]  # the case's own options come last and win
    rc, _, err = _cli(capsys, *argv)
    assert rc == 2, err
    assert err.startswith("error: ") and message.format(**names) in err, err


# ---------------------------------------------------------------------------------------- 9


def test_09_avmnist_cache_key_follows_the_file_contents(tmp_path, monkeypatch) -> None:
    import flowtransfer.data.avmnist as avmnist

    root = tmp_path / "sources"
    (root / "mnist").mkdir(parents=True)
    (root / "fsdd" / "recordings").mkdir(parents=True)
    for kind in ("images-idx3", "labels-idx1"):
        (root / "mnist" / f"t10k-{kind}-ubyte.gz").write_bytes(b"\x00" * 64)
    wav = root / "fsdd" / "recordings" / "0_jackson_0.wav"
    wav.write_bytes(b"RIFF" + b"\x01" * 60)
    builds = []

    def build(_root, **_kwargs):
        builds.append(1)
        n = 4
        split = {"V": np.zeros((n, 28, 28), np.float32), "A": np.zeros((n, 20, 20), np.float32),
                 "labels": np.arange(n) % 2, "image_index": np.arange(n), "audio_file": np.array(["0_jackson_0.wav"] * n)}
        return {s: dict(split) for s in avmnist.SPLITS}

    monkeypatch.setattr(avmnist, "build_avmnist_arrays", build)
    avmnist.load_avmnist(root, cache_dir=tmp_path / "cache")
    avmnist.load_avmnist(root, cache_dir=tmp_path / "cache")
    assert len(builds) == 1, "unchanged sources come from the cache"
    wav.write_bytes(b"RIFF" + b"\x02" * 60)  # same name, same size, new content
    avmnist.load_avmnist(root, cache_dir=tmp_path / "cache")
    assert len(builds) == 2, "an edited source must not be served from the old cache"


# ---------------------------------------------------------------------------------------- 10


def test_10_transfer_writes_exactly_the_output_name(tmp_path, capsys) -> None:
    np.save(tmp_path / "a.npy", np.random.default_rng(0).normal(size=(3, 8, 4)).astype(np.float32))
    rc, out, _ = _cli(capsys, "transfer", "--src", "A", "--dst", "L", "--input", str(tmp_path / "a.npy"),
                      "--output", str(tmp_path / "recovered"))
    assert rc == 0 and out.strip().endswith(f"wrote {tmp_path / 'recovered'}")
    assert np.load(tmp_path / "recovered").shape == (3, 16, 4) and not (tmp_path / "recovered.npy").exists()


def test_10_evaluate_takes_the_task_from_the_model(trained, tmp_path, capsys) -> None:
    model, data, _ = trained  # float labels: without the model's task the data would load as regression
    rc, out, err = _cli(capsys, "evaluate", str(model), "--rates", "0.5", "--out", str(tmp_path / "eval"))
    assert rc == 0, err
    assert "acc" in out and (tmp_path / "eval" / "results.csv").is_file()
    rc, _, err = _cli(capsys, "evaluate", str(model), "--task", "regression")
    assert rc == 2 and "does not match the model, which was trained for classification" in err


def test_10_check_and_length_errors(tmp_path, capsys) -> None:
    torch.save([1, 2, 3], tmp_path / "list.pt")
    payload = torch.load(flowtransfer.default_model_path(), weights_only=True)
    del payload["config"]["input_dims"]
    torch.save(payload, tmp_path / "malformed.pt")
    rc, _, err = _cli(capsys, "check", str(tmp_path / "list.pt"))
    assert rc == 2 and "is not a flowtransfer model file" in err
    rc, _, err = _cli(capsys, "check", str(tmp_path / "malformed.pt"))
    assert rc == 2 and "is a malformed CrossModalFlows file: missing entry 'input_dims'" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--length", "-3"])
    assert exit_info.value.code == 2 and "--length: must be an integer in [1, 4096], got -3" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- 11


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_11_checkpoint_error_gives_no_weights_only_false_advice(tmp_path) -> None:
    from flowtransfer.io import safe_load

    torch.save({"format": "flowtransfer.CrossModalFlows/1", "x": _RunsCode(tmp_path / "ran")}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as info:
        safe_load(tmp_path / "evil.pt")
    message = str(info.value)
    assert "refusing to load" in message and "system" in message
    for advice in ("weights_only", "will likely succeed", "safe_globals", "trusted source"):
        assert advice not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not (tmp_path / "ran").exists()


# ---------------------------------------------------------------------------------------- 12


def test_12_load_hands_out_independent_models() -> None:
    x = torch.randn(2, 8, 5)
    before = flowtransfer.transfer(x, "A", "L")
    mine = flowtransfer.load()
    assert mine is not flowtransfer.load()
    with torch.no_grad():
        next(mine.parameters()).add_(1.0)
    assert torch.equal(flowtransfer.transfer(x, "A", "L"), before)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_12_outputs_get_ordinary_file_modes(tmp_path, umask, mode) -> None:
    from flowtransfer.io import atomic_save, atomic_write_text

    old = os.umask(umask)
    try:
        text = atomic_write_text(tmp_path / "results.csv", "a,b\n")
        ckpt = atomic_save({"x": torch.zeros(1)}, tmp_path / "model.pt")
        with open(tmp_path / "plain.png", "wb"):
            pass  # what matplotlib's savefig gets
    finally:
        os.umask(old)
    for path in (text, ckpt, tmp_path / "plain.png"):
        assert path.stat().st_mode & 0o777 == mode, path


def test_12_a_writer_killed_before_its_rename_leaves_no_temp_file(tmp_path) -> None:
    from flowtransfer.io import atomic_write_text, clean_stale_temp_files

    target = tmp_path / "results.json"
    proc = _python(f"""
        import os, signal
        import flowtransfer.io as fio
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        fio.atomic_write_text({str(target)!r}, "half")
    """)
    assert proc.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".results.json.") and left[0].endswith(".tmp")
    mine = tmp_path / "sub" / f".other.{os.getpid()}.abcdefgh.tmp"  # a live writer's: kept
    mine.parent.mkdir()
    mine.write_text("in flight")
    atomic_write_text(target, "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "sub"]
    assert clean_stale_temp_files(tmp_path, recursive=True) == [] and mine.exists()


def test_12_train_resume_after_sigkill_is_bit_identical(trained, data_dir, capsys) -> None:
    first, _, args = trained
    out = data_dir / "killed.pt"
    argv = [*args, "--out", str(out)]
    proc = _python(f"""
        import os, signal, sys
        import flowtransfer.training.trainer as t
        original = t.Trainer._checkpoint
        def checkpoint_then_die(self, improved):
            original(self, improved)
            os.kill(os.getpid(), signal.SIGKILL)   # right after the first stage's checkpoint
        t.Trainer._checkpoint = checkpoint_then_die
        from flowtransfer.cli import main
        sys.exit(main({argv!r}))
    """)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    assert (data_dir / "killed_checkpoints" / "complete" / "last.pt").is_file()
    assert main([*args, "--out", str(out), "--resume"]) == 0
    _assert_same_weights(_state(first), _state(out))


# ---------------------------------------------------------------------------------------- CLI errors


def test_cli_user_errors_exit_2_debug_shows_traceback_internal_errors_propagate(tmp_path, capsys, monkeypatch) -> None:
    rc, out, err = _cli(capsys, "run", "--seeds", "0,0")
    assert rc == 2 and err == "error: seeds repeat [0]: each may appear once\n" and out == ""
    with pytest.raises(InputError, match="seeds repeat"):
        main(["run", "--seeds", "0,0", "--debug"])
    with pytest.raises(InputError, match="seeds repeat"):
        main(["--debug", "run", "--seeds", "0,0"])

    def broken(*_args, **_kwargs):
        raise RuntimeError("an internal failure")

    np.save(tmp_path / "a.npy", np.ones((1, 8, 2), np.float32))
    monkeypatch.setattr(flowtransfer, "transfer", broken)
    with pytest.raises(RuntimeError, match="an internal failure"):
        main(["transfer", "--src", "A", "--dst", "L", "--input", str(tmp_path / "a.npy"), "--output", str(tmp_path / "o")])


# ---------------------------------------------------------------------------------------- real data


def test_real_mosi_passes_the_guards_and_shares_one_class_count(shared_data) -> None:
    from flowtransfer.data import load_mmsa, restricted_load

    path = shared_data / "mosi_utterance" / "mosi_utterance_poria.pkl"
    if not path.is_file():
        pytest.skip(f"the MOSI file {path} is absent")
    raw = restricted_load(path)
    assert type(raw["train"]["text"]) is np.ndarray and raw["train"]["text"].shape == (1447, 1, 100)
    data = load_mmsa(path, task="classification")
    assert {s: ds.num_classes for s, ds in data.items()} == {"train": 3, "valid": 3, "test": 3}
    assert all(not ds.nonfinite and ds.mask.all() for ds in data.values())
