"""AV-MNIST-style build: idx reading, PCA degradation, and the real-data build (small sizes)."""

from __future__ import annotations

import gzip
import time

import numpy as np
import pytest

from flowtransfer.data.audio import MFCCConfig, mfcc, read_wav
from flowtransfer.data.avmnist import (
    FSDD_TAKES,
    IMAGE_SPLITS,
    IdxFormatError,
    PCADegradation,
    load_avmnist,
    load_mnist,
    read_idx,
)
from flowtransfer.data.download import MNIST_DECOMPRESSED_SHA256, check_fsdd_manifest, sha256_file


def idx_bytes(arr: np.ndarray, code: int = 0x08, dtype: str = "u1") -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return header + arr.astype(dtype).tobytes()


# ------------------------------------------------------------------------------------ idx
def test_read_idx_raw_and_gzip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4)).astype(np.uint8)
    (tmp_path / "a").write_bytes(idx_bytes(arr))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)
    f = np.linspace(-1, 1, 6).reshape(2, 3)
    (tmp_path / "f").write_bytes(idx_bytes(f, 0x0E, ">f8"))
    np.testing.assert_array_equal(read_idx(tmp_path / "f"), f)


def test_read_idx_errors(tmp_path):
    arr = np.zeros((4, 2), dtype=np.uint8)
    good = idx_bytes(arr)
    cases = {
        "magic": b"\x01" + good[1:],
        "type": good[:2] + b"\x07" + good[3:],
        "size": good[:-1],
        "extra": good + b"\x00",
        "short": good[:3],
        "header": good[:6],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(IdxFormatError, match="magic"):
        read_idx(tmp_path / "magic")
    with pytest.raises(IdxFormatError, match="magic"):
        read_idx(tmp_path / "type")
    with pytest.raises(IdxFormatError, match=r"declares shape \(4, 2\)"):
        read_idx(tmp_path / "size")
    with pytest.raises(IdxFormatError, match="9 data bytes"):
        read_idx(tmp_path / "extra")
    with pytest.raises(IdxFormatError, match="too short"):
        read_idx(tmp_path / "short")
    with pytest.raises(IdxFormatError, match="truncated header"):
        read_idx(tmp_path / "header")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(good)[:-6])
    with pytest.raises(IdxFormatError, match="gzip"):
        read_idx(tmp_path / "bad.gz")
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


def test_load_mnist_checks_consistency(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((3, 28, 28))))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4)))
    with pytest.raises(IdxFormatError, match=r"expected shape \(3,\)"):
        load_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([1, 2, 12])))
    with pytest.raises(IdxFormatError, match="0..9"):
        load_mnist(tmp_path)


# ------------------------------------------------------------------------------------ PCA
def low_rank_data(n=400, d=30, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.geomspace(10, 0.1, d)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return (rng.standard_normal((n, d)) * scales) @ basis.T + rng.standard_normal(d)


def test_pca_drop_leading_matches_sklearn():
    from sklearn.decomposition import PCA

    x = low_rank_data()
    pca = PCADegradation(0.75, "drop_leading").fit(x)
    ref = PCA(svd_solver="full").fit(x)
    ratio = np.cumsum(ref.explained_variance_ratio_)
    k = int(np.argmax(ratio >= 0.75)) + 1  # fewest leading components with >= 75% of the variance
    comps = ref.components_[k:]
    expected = ref.mean_ + (x - ref.mean_) @ comps.T @ comps
    np.testing.assert_allclose(pca.transform(x), expected, atol=1e-9)
    assert pca.components_.shape[1] == k
    assert pca.energy_kept_ <= 0.25 + 1e-12
    # the degraded training data carries exactly the kept fraction of the variance
    kept = ((pca.transform(x) - x.mean(0)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    np.testing.assert_allclose(kept, pca.energy_kept_, rtol=1e-9)


def test_pca_with_fewer_samples_than_pixels():
    """The thin-SVD path (N < D) projects out the same leading directions as the covariance path."""
    x = low_rank_data(n=20, d=30, seed=2)
    for mode in ("drop_leading", "keep_leading"):
        small = PCADegradation(0.6, mode).fit(x)
        assert small.components_.shape[0] == 30
        big = PCADegradation(0.6, mode)
        big.fit(np.concatenate([x, x]))  # N >= D path: same directions, rescaled variances
        np.testing.assert_allclose(small.transform(x), big.transform(x), atol=1e-8)


def test_pca_keep_leading_and_identity():
    x = low_rank_data(seed=1)
    pca = PCADegradation(0.75, "keep_leading").fit(x)
    assert 0.25 <= pca.energy_kept_ < 0.25 + pca.explained_[0] / pca.explained_.sum()
    np.testing.assert_allclose(PCADegradation(0.0).fit(x).transform(x), x)
    with pytest.raises(ValueError, match="energy_removed"):
        PCADegradation(1.0)
    with pytest.raises(ValueError, match="mode"):
        PCADegradation(0.5, "middle")
    with pytest.raises(RuntimeError, match="before fit"):
        PCADegradation(0.5).transform(x)
    with pytest.raises(ValueError, match=r"expected \(N, 30\)"):
        pca.transform(x[:, :5])


# ------------------------------------------------------------------------------- real data
SMALL = 60


@pytest.fixture
def sources(shared_data):
    root = shared_data / "avmnist_sources"
    if not (root / "mnist").is_dir() or not (root / "fsdd" / "recordings").is_dir():
        pytest.skip(f"AV-MNIST sources absent from {root}")
    return root


def test_sources_match_published_checksums(sources):
    for name, digest in MNIST_DECOMPRESSED_SHA256.items():
        assert sha256_file(sources / "mnist" / name, decompress=True) == digest
    assert len(check_fsdd_manifest(sources / "fsdd" / "recordings")) == 3000


def test_build_shapes_pairing_splits_and_cache(sources, tmp_path, monkeypatch):
    t0 = time.perf_counter()
    ds = load_avmnist(sources, cache_dir=tmp_path, max_per_split=SMALL, seed=0)
    first = time.perf_counter() - t0
    assert set(ds) == {"train", "valid", "test"}
    taken: dict[str, set] = {}
    for split, d in ds.items():
        assert d.modalities == ("V", "A") and len(d) == SMALL and d.task == "classification"
        assert d.features["V"].shape == (SMALL, 28, 28) and d.features["A"].shape == (SMALL, 20, 20)
        assert d.features["V"].dtype == np.float32 and np.isfinite(d.features["A"]).all()
        lo, hi = IMAGE_SPLITS[split]
        idx = d.extras["image_index"].astype(int)
        assert idx.min() >= lo and idx.max() < hi
        # the audio is a recording of the same digit as the image
        digits = np.array([int(name.split("_")[0]) for name in d.extras["audio_file"]])
        np.testing.assert_array_equal(digits, d.labels)
        takes = np.array([int(name.split("_")[2][:-4]) for name in d.extras["audio_file"]])
        assert takes.min() >= FSDD_TAKES[split][0] and takes.max() < FSDD_TAKES[split][1]
        taken[split] = set(d.extras["audio_file"])
        assert d.ids[0] == f"mnist{idx[0]}|{d.extras['audio_file'][0]}"
    assert not (taken["train"] & taken["test"]) and not (taken["valid"] & taken["test"])
    assert not (taken["train"] & taken["valid"])
    # standardised with train statistics
    a = ds["train"].features["A"]
    np.testing.assert_allclose(a.mean(axis=(0, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(a.std(axis=(0, 2)), 1, atol=1e-3)

    # cache: one file, second call much faster and identical
    assert len(list(tmp_path.glob("avmnist-*.npz"))) == 1
    import flowtransfer.data.avmnist as avmnist

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached features should have been reused")

    with monkeypatch.context() as m:
        m.setattr(avmnist, "build_avmnist_arrays", no_rebuild)
        t0 = time.perf_counter()
        again = load_avmnist(sources, cache_dir=tmp_path, max_per_split=SMALL, seed=0)
        second = time.perf_counter() - t0
    assert second < first, (first, second)
    for split in ds:
        for m in ("V", "A"):
            np.testing.assert_array_equal(again[split].features[m], ds[split].features[m])
        np.testing.assert_array_equal(again[split].ids, ds[split].ids)

    # determinism by seed, without the cache; another seed pairs and noises differently
    fresh = load_avmnist(sources, max_per_split=SMALL, seed=0, cache=False)
    np.testing.assert_array_equal(fresh["test"].features["A"], ds["test"].features["A"])
    other = load_avmnist(sources, cache_dir=tmp_path, max_per_split=SMALL, seed=1)
    assert not np.array_equal(other["test"].extras["audio_file"], ds["test"].extras["audio_file"])
    np.testing.assert_array_equal(other["test"].features["V"], ds["test"].features["V"])
    assert len(list(tmp_path.glob("avmnist-*.npz"))) == 2


def test_clean_build_equals_direct_computation(sources):
    """Without noise, degradation or standardisation: V is the image (rows as time), A its MFCC."""
    n = 12
    ds = load_avmnist(
        sources, snr_db=None, pca_energy_removed=0.0, standardize=False, max_per_split=n,
        cache=False,
    )
    images, labels = load_mnist(sources / "mnist")
    d = ds["test"]
    idx = d.extras["image_index"].astype(int)
    np.testing.assert_array_equal(idx, np.arange(7000, 7000 + n))
    np.testing.assert_array_equal(d.labels, labels[idx])
    # channel c = pixel column, time t = row
    np.testing.assert_allclose(d.features["V"], images[idx].transpose(0, 2, 1) / 255.0, atol=1e-6)
    for i in (0, n - 1):
        x, sr = read_wav(sources / "fsdd" / "recordings" / d.extras["audio_file"][i])
        expected = mfcc(x, sr, MFCCConfig())
        np.testing.assert_allclose(d.features["A"][i], expected, rtol=1e-5, atol=1e-4)


def test_missing_sources_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_avmnist(tmp_path / "nothing", cache_dir=tmp_path)
