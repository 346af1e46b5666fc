"""AV-MNIST-style dataset built from MNIST idx files and Free Spoken Digit Dataset recordings.

AV-MNIST (Vielzeuf et al., "CentralNet", ECCV-W 2018; used by SMIL and MultiBench) pairs a
degraded MNIST image with a noisy spoken digit of the same label, so that neither modality alone
solves the task. This module rebuilds it from the public sources (``root/mnist/t10k-*-ubyte.gz``,
``root/fsdd/recordings/*.wav``) with every choice fixed and documented:

Images (modality ``"V"``, ``(N, C=28, T=28)``)
    Pixels scaled to ``[0, 1]``, then degraded by PCA energy removal, fitted on the **train split
    only**: eigen-decompose the covariance of the centred training images, sort the components by
    variance ("energy"), and remove components until ``pca_energy_removed`` of the total variance
    is gone. ``pca_mode="drop_leading"`` (default) projects out the *leading* components (those
    carrying the first ``pca_energy_removed`` of the variance), keeping the low-energy tail plus
    the mean image: the reading of AV-MNIST's "remove 75% of the energy" in which the image keeps
    about 25% of its energy (``pca_energy_removed=0.75`` reproduces that setting).
    ``pca_mode="keep_leading"`` instead keeps the fewest leading components that reach
    ``1 - pca_energy_removed`` of the variance (a blur). The image is then read as a sequence of
    rows: time ``t`` = image row (top to bottom), channel ``c`` = pixel column.

Audio (modality ``"A"``, ``(N, C=20, T=20)``)
    The paired FSDD recording (8 kHz) plus Gaussian white noise at ``snr_db`` (drawn per sample
    with a seeded generator, rescaled to the exact SNR; the original mixed in ESC-50 background
    sounds, which are not available here), then a 20 x 20 MFCC matrix
    (:func:`flowtransfer.data.audio.mfcc`: 20 coefficients x 20 frames, frames spread over the
    whole recording, see :func:`flowtransfer.data.audio.frame_starts`).

Splits (fixed)
    MNIST test images 0-5999 -> ``train``, 6000-6999 -> ``valid``, 7000-9999 -> ``test``.
    FSDD takes 10-49 -> ``train``, 5-9 -> ``valid``, 0-4 (FSDD's official test set) -> ``test``,
    so no recording is shared between splits.

Pairing
    Within a split and a digit, the images (in index order) get that split's recordings of the
    same digit in an order shuffled with ``seed``, cycling (recordings are reused as needed).

Standardisation
    With ``standardize=True`` (default) each channel of each modality is z-scored with the mean
    and std of the train split (over samples and time).

Defaults: ``snr_db=0`` and ``pca_energy_removed=0.6`` (drop_leading), chosen with a
logistic-regression probe on the full build (train 6000, test 3000, z-scored features; command
``python -m flowtransfer.data.avmnist --probe``) so that neither modality alone is near-perfect:

================================  ==============================
setting                           logistic-regression test acc.
================================  ==============================
image-only, clean images          0.896
image-only, 0.50/0.60/0.70/0.75   0.714 / 0.643 / 0.552 / 0.514
audio-only, clean / SNR 10 dB     0.953 / 0.878
audio-only, SNR 5 / 0 / -5 dB     0.827 / 0.739 / 0.630
both, defaults (0.6, 0 dB)        0.843
================================  ==============================

The paper's 75% leaves the image at 0.51 with this linear probe on 6000 training images; the
default removes 60% so that both modalities sit between 0.6 and 0.8.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from flowtransfer.data.audio import MFCCConfig, add_noise, mfcc, read_wav
from flowtransfer.data.download import fetch_avmnist_sources, sha256_file

__all__ = [
    "IdxFormatError",
    "SPLITS",
    "IMAGE_SPLITS",
    "FSDD_TAKES",
    "read_idx",
    "load_mnist",
    "list_fsdd",
    "PCADegradation",
    "default_cache_dir",
    "build_avmnist_arrays",
    "load_avmnist",
]

SPLITS = ("train", "valid", "test")
#: ``[start, stop)`` ranges of MNIST test-set image indices per split.
IMAGE_SPLITS = {"train": (0, 6000), "valid": (6000, 7000), "test": (7000, 10000)}
#: ``[start, stop)`` ranges of FSDD take indices per split (official test set: takes 0-4).
FSDD_TAKES = {"train": (10, 50), "valid": (5, 10), "test": (0, 5)}
_BUILD_VERSION = 1
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
#: the largest idx file read (decompressed); MNIST's 60k training images are 47 MB
MAX_IDX_BYTES = 1 << 30
_WAV_NAME = re.compile(r"^([0-9])_([A-Za-z]+)_([0-9]+)\.wav$")


class IdxFormatError(ValueError):
    """An idx file is malformed (bad magic number, unknown type, size mismatch)."""


# ----------------------------------------------------------------------------------------- sources
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (MNIST format), gzip-compressed or raw (detected from the content).

    Layout: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions ``d``, ``d`` big-endian uint32 sizes,
    then the data. The data must fill the rest of the file exactly.

    Raises:
        FileNotFoundError: no such file.
        IdxFormatError: anything malformed, with the path and what was expected, or a file that
            decompresses to more than :data:`MAX_IDX_BYTES` (read no further than that).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"idx file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
                raw = stream.read(MAX_IDX_BYTES + 1)  # never more than the cap, whatever the stream expands to
        except (OSError, EOFError) as err:
            raise IdxFormatError(f"{path}: corrupt gzip stream ({err})") from err
        if len(raw) > MAX_IDX_BYTES:
            raise IdxFormatError(f"{path}: decompresses to more than {MAX_IDX_BYTES} bytes; not an MNIST file")
    if len(raw) < 4:
        raise IdxFormatError(f"{path}: {len(raw)} bytes, too short for an idx header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise IdxFormatError(
            f"{path}: bad idx magic number {raw[:4].hex()} (expected 0000 + type code in "
            f"{sorted(hex(k) for k in _IDX_DTYPES)} + number of dimensions >= 1)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated header ({len(raw)} bytes, need {header})")
    shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise IdxFormatError(
            f"{path}: header declares shape {shape} ({expected} data bytes) but the file holds "
            f"{len(raw) - header} data bytes"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_mnist(mnist_dir: str | os.PathLike, prefix: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """Read ``{prefix}-images-idx3-ubyte[.gz]`` and ``{prefix}-labels-idx1-ubyte[.gz]``.

    Returns:
        ``images (N, 28, 28) uint8`` and ``labels (N,) int64`` in ``0..9``.
    """
    mnist_dir = Path(mnist_dir)

    def find(stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (mnist_dir / name).is_file():
                return mnist_dir / name
        raise FileNotFoundError(f"MNIST file {stem}[.gz] not found in {mnist_dir}")

    images = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IdxFormatError(
            f"MNIST images: expected uint8 (N, H, W), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise IdxFormatError(
            f"MNIST labels: expected shape ({images.shape[0]},) to match the images, "
            f"got {labels.shape}"
        )
    if labels.max(initial=0) > 9:
        raise IdxFormatError(f"MNIST labels: values must lie in 0..9, found {labels.max()}")
    return images, labels.astype(np.int64)


def list_fsdd(recordings: str | os.PathLike) -> list[tuple[str, int, str, int]]:
    """``(file name, digit, speaker, take)`` for every ``{digit}_{speaker}_{take}.wav``, sorted."""
    recordings = Path(recordings)
    if not recordings.is_dir():
        raise FileNotFoundError(f"FSDD recordings folder not found: {recordings}")
    out = []
    for name in os.listdir(recordings):
        m = _WAV_NAME.match(name)
        if m:
            out.append((name, int(m.group(1)), m.group(2), int(m.group(3))))
    if not out:
        raise FileNotFoundError(f"no FSDD recordings (digit_speaker_take.wav) in {recordings}")
    return sorted(out)


# --------------------------------------------------------------------------------------- PCA
class PCADegradation:
    """Remove a fraction of the variance ("energy") of images with PCA (AV-MNIST degradation).

    ``fit(X)`` on flattened training images ``(N, D)`` computes the mean ``mu`` and the principal
    directions ``u_1, u_2, ...`` of the centred data, sorted by decreasing variance
    ``lambda_1 >= lambda_2 >= ...``. With cumulative energy
    ``E_k = sum_{i<=k} lambda_i / sum_i lambda_i`` and ``U_k = [u_1 ... u_k]``:

    - ``mode="drop_leading"``: ``k`` is the smallest with ``E_k >= energy_removed`` and
      ``transform(X) = X - (X - mu) U_k U_k^T`` (the leading components are projected out; the
      mean image and every other direction, including those unseen in training, are kept);
    - ``mode="keep_leading"``: ``k`` is the smallest with ``E_k >= 1 - energy_removed`` and
      ``transform(X) = mu + (X - mu) U_k U_k^T``.

    ``energy_removed = 0`` keeps everything (``transform`` is the identity). ``components_`` holds
    ``U_k`` ``(D, k)``; ``energy_kept_`` the fraction of the training variance left.
    """

    def __init__(self, energy_removed: float = 0.75, mode: str = "drop_leading") -> None:
        if not 0.0 <= energy_removed < 1.0:
            raise ValueError(f"energy_removed must lie in [0, 1), got {energy_removed}")
        if mode not in ("drop_leading", "keep_leading"):
            raise ValueError(
                f"unknown PCA mode {mode!r} (expected 'drop_leading' or 'keep_leading')"
            )
        self.energy_removed = float(energy_removed)
        self.mode = mode

    def fit(self, x: np.ndarray) -> PCADegradation:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"PCA fit expects (N >= 2, D) flattened images, got shape {x.shape}")
        n, d = x.shape
        self.mean_ = x.mean(axis=0)
        xc = x - self.mean_
        if n >= d:  # eigen-decomposition of the D x D covariance
            eigval, eigvec = np.linalg.eigh(xc.T @ xc / (n - 1))
            order = np.argsort(eigval)[::-1]
            eigval, eigvec = np.clip(eigval[order], 0.0, None), eigvec[:, order]
        else:  # fewer samples than pixels: eigen-decompose the N x N Gram matrix instead
            gval, gvec = np.linalg.eigh(xc @ xc.T / (n - 1))
            order = np.argsort(gval)[::-1]
            gval, gvec = gval[order], gvec[:, order]
            rank = int(np.sum(gval > gval[0] * 1e-12)) if gval[0] > 0 else 0
            eigval = gval[:rank]
            # unit principal directions from the Gram eigenvectors
            eigvec = (xc.T @ gvec[:, :rank]) / np.sqrt((n - 1) * eigval)
        total = float(np.sum(xc**2) / (n - 1))
        if total <= 0.0:
            raise ValueError("PCA fit: the training images have zero variance")
        cum = np.cumsum(eigval) / total  # cum[k-1] = E_k
        target = self.energy_removed if self.mode == "drop_leading" else 1.0 - self.energy_removed
        if self.energy_removed == 0.0:
            k = 0 if self.mode == "drop_leading" else cum.size
        else:
            k = min(int(np.searchsorted(cum, target - 1e-12)) + 1, cum.size)
        self.components_ = eigvec[:, :k]  # (D, k)
        self.explained_ = eigval
        lead = float(cum[k - 1]) if k > 0 else 0.0
        self.energy_kept_ = 1.0 - lead if self.mode == "drop_leading" else lead
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        if not hasattr(self, "components_"):
            raise RuntimeError("PCADegradation.transform called before fit")
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.mean_.shape[0]:
            raise ValueError(f"expected (N, {self.mean_.shape[0]}) images, got shape {x.shape}")
        if self.energy_removed == 0.0:
            return x.copy()
        u = self.components_
        projected = ((x - self.mean_) @ u) @ u.T
        return x - projected if self.mode == "drop_leading" else self.mean_ + projected


# ------------------------------------------------------------------------------------- build
def _shared_root() -> Path:
    try:
        from flowtransfer.data.paths import shared_data_dir  # type: ignore[attr-defined]

        return Path(shared_data_dir()) / "avmnist_sources"
    except ImportError:
        env = os.environ.get("FLOWTRANSFER_DATA")
        base = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"
        return base / "avmnist_sources"


def default_cache_dir() -> Path:
    """``$FLOWTRANSFER_CACHE``, else ``$XDG_CACHE_HOME/flowtransfer``, else
    ``~/.cache/flowtransfer``."""
    if os.environ.get("FLOWTRANSFER_CACHE"):
        return Path(os.environ["FLOWTRANSFER_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "flowtransfer"


def _pair(
    labels: np.ndarray, pool: dict[int, list[str]], rng: np.random.Generator, split: str
) -> np.ndarray:
    """For each image label, a recording name of the same digit (shuffled pool, cycled)."""
    out = np.empty(labels.shape[0], dtype=object)
    for d in range(10):
        where = np.flatnonzero(labels == d)
        if where.size == 0:
            continue
        recs = pool.get(d, [])
        if not recs:
            raise ValueError(f"split {split!r}: no FSDD recording of digit {d} to pair with")
        order = rng.permutation(len(recs))
        out[where] = [recs[order[i % len(recs)]] for i in range(where.size)]
    return out.astype(str)


def build_avmnist_arrays(
    root: str | os.PathLike,
    snr_db: float | None = 0.0,
    pca_energy_removed: float = 0.6,
    pca_mode: str = "drop_leading",
    seed: int = 0,
    noise_color: str = "white",
    standardize: bool = True,
    max_per_split: int | None = None,
    mfcc_config: MFCCConfig | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Build the AV-MNIST arrays (no cache, no dataset objects); see the module docstring.

    Args:
        root: folder with ``mnist/`` and ``fsdd/recordings/``.
        snr_db: SNR of the added noise in dB; ``None`` for clean audio.
        pca_energy_removed, pca_mode: image degradation (:class:`PCADegradation`).
        seed: pairing and noise seed.
        noise_color: ``"white"`` or ``"pink"``.
        standardize: z-score every channel with train-split statistics.
        max_per_split: keep only the first ``k`` images of each split (quick builds).
        mfcc_config: MFCC parameters (default 20 x 20).

    Returns:
        split -> ``{"V": (N, 28, 28) float32 NCT, "A": (N, 20, 20) float32 NCT,
        "labels": (N,) int64, "image_index": (N,) int64, "audio_file": (N,) str}``.
    """
    root = Path(root)
    cfg = mfcc_config or MFCCConfig()
    images, labels = load_mnist(root / "mnist")
    if images.shape[0] < IMAGE_SPLITS["test"][1]:
        raise ValueError(f"expected the 10,000-image MNIST test set, got {images.shape[0]} images")
    recordings = root / "fsdd" / "recordings"
    files = list_fsdd(recordings)
    if max_per_split is not None and max_per_split < 1:
        raise ValueError(f"max_per_split must be >= 1, got {max_per_split}")

    index = {}
    for split in SPLITS:
        lo, hi = IMAGE_SPLITS[split]
        if max_per_split is not None:
            hi = min(hi, lo + max_per_split)
        index[split] = np.arange(lo, hi)

    def flat(idx: np.ndarray) -> np.ndarray:  # (n, H*W) in [0, 1]
        return images[idx].reshape(idx.size, -1).astype(np.float64) / 255.0

    pca = PCADegradation(pca_energy_removed, pca_mode).fit(flat(index["train"]))

    wav_cache: dict[str, tuple[np.ndarray, int]] = {}
    out: dict[str, dict[str, np.ndarray]] = {}
    for code, split in enumerate(SPLITS):
        idx = index[split]
        y = labels[idx]
        lo, hi = FSDD_TAKES[split]
        pool: dict[int, list[str]] = {}
        for name, digit, _speaker, take in files:
            if lo <= take < hi:
                pool.setdefault(digit, []).append(name)
        paired = _pair(y, pool, np.random.default_rng([seed, code, 0]), split)
        noise_rng = np.random.default_rng([seed, code, 1])
        audio = np.empty((idx.size, cfg.n_mfcc, cfg.n_frames), dtype=np.float64)
        for i, name in enumerate(paired):
            if name not in wav_cache:
                wav_cache[name] = read_wav(recordings / name)
            x, sr = wav_cache[name]
            audio[i] = mfcc(add_noise(x, snr_db, noise_rng, noise_color), sr, cfg)
        img = pca.transform(flat(idx)).reshape(idx.size, *images.shape[1:])  # (N, rows, cols)
        out[split] = {
            "V": np.ascontiguousarray(img.transpose(0, 2, 1)),  # (N, C=cols, T=rows)
            "A": audio,
            "labels": y,
            "image_index": idx.astype(np.int64),
            "audio_file": paired,
        }
    if standardize:
        for m in ("V", "A"):
            train = out["train"][m]
            mu = train.mean(axis=(0, 2), keepdims=True)
            sd = train.std(axis=(0, 2), keepdims=True)
            sd = np.where(sd > 1e-8, sd, 1.0)
            for split in SPLITS:
                out[split][m] = (out[split][m] - mu) / sd
    for split in SPLITS:
        for m in ("V", "A"):
            out[split][m] = out[split][m].astype(np.float32)
    return out


def _fingerprint(root: Path) -> dict[str, Any]:
    """Identity of the sources by content: the sha256 of every MNIST file and one sha256 over the
    names and contents of the FSDD recordings, so an edited source (even one of the same size)
    gives another cache key. About 30 MB are read (well under a second)."""
    mnist = sorted((p.name, sha256_file(p)) for p in (root / "mnist").iterdir() if p.is_file())
    h = hashlib.sha256()
    recordings = root / "fsdd" / "recordings"
    with os.scandir(recordings) as entries:
        names = sorted(e.name for e in entries if _WAV_NAME.match(e.name))
    for name in names:
        h.update(f"{name}:{sha256_file(recordings / name)};".encode())
    return {"mnist": mnist, "fsdd": h.hexdigest()}


def _sources_present(root: Path) -> bool:
    mnist = root / "mnist"
    has_mnist = all(
        (mnist / f"t10k-{kind}-ubyte.gz").is_file() or (mnist / f"t10k-{kind}-ubyte").is_file()
        for kind in ("images-idx3", "labels-idx1")
    )
    return has_mnist and (root / "fsdd" / "recordings").is_dir()


def load_avmnist(
    root: str | os.PathLike | None = None,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    snr_db: float | None = 0.0,
    pca_energy_removed: float = 0.6,
    seed: int = 0,
    *,
    pca_mode: str = "drop_leading",
    noise_color: str = "white",
    standardize: bool = True,
    max_per_split: int | None = None,
    mfcc_config: MFCCConfig | None = None,
    cache: bool = True,
) -> dict[str, Any]:
    """AV-MNIST-style splits as :class:`~flowtransfer.data.dataset.MultimodalDataset` objects.

    Modalities ``"V"`` (image rows, ``(N, 28, 28)``: channels = pixel columns, time = rows) and
    ``"A"`` (MFCC, ``(N, 20, 20)``: channels = coefficients, time = frames); task
    ``"classification"`` with 10 classes; ids ``"mnist<image index>|<wav name>"``; extras
    ``image_index`` and ``audio_file``. Build rules: module docstring.

    Args:
        root: folder with ``mnist/`` and ``fsdd/recordings/``. Default: the shared data folder's
            ``avmnist_sources``; with ``download=True`` and no sources there,
            ``<cache_dir>/avmnist_sources``.
        download: fetch missing sources (MNIST from the ossci-datasets mirror, FSDD from its
            GitHub release archive), verified
            (:func:`flowtransfer.data.download.fetch_avmnist_sources`).
        cache_dir: where built features are cached (default :func:`default_cache_dir`). The cache
            file name is a hash of every build parameter and of the sources' contents (sha256 of
            every file), so edited sources are never served from a stale cache; it is written
            atomically and reused on later calls.
        snr_db, pca_energy_removed, seed, pca_mode, noise_color, standardize, max_per_split,
            mfcc_config: see :func:`build_avmnist_arrays`.
        cache: set False to neither read nor write the cache.

    Returns:
        ``{"train": ds, "valid": ds, "test": ds}`` (6000 / 1000 / 3000 samples at full size).
    """
    from flowtransfer.data.dataset import from_arrays
    from flowtransfer.io import atomic_write_bytes

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if root is None:
        root = _shared_root()
        if download and not _sources_present(root):
            root = cache_dir / "avmnist_sources"
    root = Path(root)
    if not _sources_present(root):
        if not download:
            raise FileNotFoundError(
                f"AV-MNIST sources not found in {root} (expected mnist/t10k-images-idx3-ubyte.gz, "
                f"mnist/t10k-labels-idx1-ubyte.gz and fsdd/recordings/*.wav); pass download=True "
                f"to fetch them or root= to point at them"
            )
        fetch_avmnist_sources(root)
    cfg = mfcc_config or MFCCConfig()
    params = {
        "version": _BUILD_VERSION,
        "snr_db": None if snr_db is None else float(snr_db),
        "pca_energy_removed": float(pca_energy_removed),
        "pca_mode": pca_mode,
        "seed": int(seed),
        "noise_color": noise_color,
        "standardize": bool(standardize),
        "max_per_split": max_per_split,
        "mfcc": cfg.as_dict(),
        "image_splits": IMAGE_SPLITS,
        "fsdd_takes": FSDD_TAKES,
    }
    arrays = None
    path = None
    if cache:
        key = json.dumps({**params, "sources": _fingerprint(root)}, sort_keys=True)
        path = cache_dir / f"avmnist-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    arrays = {s: {k: z[f"{s}.{k}"] for k in _KEYS} for s in SPLITS}
            except Exception as err:  # corrupt or foreign file: rebuild
                warnings.warn(f"ignoring unreadable AV-MNIST cache {path}: {err}", stacklevel=2)
                arrays = None
    if arrays is None:
        arrays = build_avmnist_arrays(
            root,
            snr_db=snr_db,
            pca_energy_removed=pca_energy_removed,
            pca_mode=pca_mode,
            seed=seed,
            noise_color=noise_color,
            standardize=standardize,
            max_per_split=max_per_split,
            mfcc_config=cfg,
        )
        if path is not None:
            buf = io.BytesIO()
            np.savez(buf, **{f"{s}.{k}": arrays[s][k] for s in SPLITS for k in _KEYS})
            atomic_write_bytes(path, buf.getvalue())
    out = {}
    for s in SPLITS:
        a = arrays[s]
        ids = np.char.add(
            np.char.add("mnist", a["image_index"].astype(str)), np.char.add("|", a["audio_file"])
        )
        out[s] = from_arrays(
            {"V": a["V"], "A": a["A"]},
            a["labels"],
            "classification",
            layout="NCT",
            ids=ids,
            num_classes=10,
            extras={"image_index": a["image_index"], "audio_file": a["audio_file"]},
        )
    return out


_KEYS = ("V", "A", "labels", "image_index", "audio_file")


# ------------------------------------------------------------------------------------- probe
def _probe(args: argparse.Namespace) -> None:
    """Logistic-regression test accuracy of each modality alone (and both), over PCA/SNR grids."""
    from sklearn.linear_model import LogisticRegression

    def score(split_tr: dict, split_te: dict, mods: tuple[str, ...]) -> float:
        def flat(a: dict) -> np.ndarray:
            return np.concatenate([a[m].reshape(len(a[m]), -1) for m in mods], axis=1)

        clf = LogisticRegression(max_iter=args.max_iter, C=args.C)
        clf.fit(flat(split_tr), split_tr["labels"])
        return float(clf.score(flat(split_te), split_te["labels"]))

    for pca in args.pca:
        for j, snr in enumerate(args.snr):
            t0 = time.perf_counter()
            a = build_avmnist_arrays(
                args.root,
                snr_db=None if snr == "clean" else float(snr),
                pca_energy_removed=pca,
                pca_mode=args.pca_mode,
                seed=args.seed,
            )
            tr, te = a["train"], a["test"]
            if j == 0:  # the image features do not depend on the SNR
                acc = score(tr, te, ("V",))
                print(f"pca_removed={pca:.2f} mode={args.pca_mode}: image-only {acc:.3f}")
            msg = f"  snr_db={snr}: audio-only {score(tr, te, ('A',)):.3f}"
            if args.both:
                msg += f", both {score(tr, te, ('V', 'A')):.3f}"
            print(f"{msg} ({time.perf_counter() - t0:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Build AV-MNIST-style data; --probe prints unimodal accuracies."
    )
    p.add_argument("--root", type=Path, default=_shared_root())
    p.add_argument("--probe", action="store_true")
    p.add_argument("--snr", nargs="+", default=["clean", "10", "5", "0", "-5"])
    p.add_argument("--pca", nargs="+", type=float, default=[0.6])
    p.add_argument("--pca-mode", default="drop_leading")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--C", type=float, default=1.0)
    p.add_argument("--max-iter", type=int, default=500)
    p.add_argument("--both", action="store_true", help="also fit on both modalities")
    args = p.parse_args(argv)
    if args.probe:
        _probe(args)
    else:
        ds = load_avmnist(args.root, seed=args.seed)
        for s, d in ds.items():
            print(s, len(d), d.input_dims, d.seq_lens, d.class_balance())


if __name__ == "__main__":
    main()
