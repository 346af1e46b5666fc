"""MMSA pickles (CMU-MOSI / MOSEI / SIMS ``aligned_50.pkl``, ``unaligned_50.pkl``) loaded safely.

Layout of an MMSA pickle: a dict of splits (``train``, ``valid``, ``test``), each a dict of

==========================  ==================  ============================================
key                         shape               meaning
==========================  ==================  ============================================
``text``                    ``(N, T_L, 768)``   BERT features (NTC)
``text_bert``               ``(N, 3, T_L)``     token ids, attention mask, segment ids
``audio``                   ``(N, T_A, C_A)``   e.g. COVAREP (may hold ``-inf``)
``vision``                  ``(N, T_V, C_V)``   e.g. Facet
``regression_labels``       ``(N,)``            sentiment in [-3, 3]
``classification_labels``   ``(N,)``            class ids (when present)
``id``, ``raw_text``        ``(N,)``            sample ids, transcripts
``audio_lengths``, ...      ``(N,)``            valid lengths (unaligned files)
==========================  ==================  ============================================

The modalities are named ``L`` (text), ``A`` (audio) and ``V`` (vision) and converted once to
flowtransfer's ``(N, C, T)`` layout.

Pickles can run arbitrary code when loaded. :class:`RestrictedUnpickler` resolves only the globals
that numpy arrays and plain containers need and refuses every other one with
:class:`UnsafePickleError` *before* anything is called, so a crafted file runs nothing.

Pickles can also exhaust memory: the C unpickler allocates a counted string, a frame or its memo
table from a size field before reading the data, and ``bytearray(n)`` or ``numpy.ndarray(shape)``
allocate from a number. So before unpickling, :func:`restricted_load` walks the opcodes
(``pickletools.genops``, nothing built) and refuses a length beyond the end of the file or a memo
index no pickler writes; no allow-listed callable allocates from a size: ``numpy.ndarray`` cannot
be called directly, numpy's ``_reconstruct`` only makes the empty array that numpy's own pickles
start from, an array's state must hold exactly the data its shape declares, and ``bytearray`` and
``_codecs.encode`` only copy data that is in the file. Memory use is then bounded by a small
multiple of the file size.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from flowtransfer.data.dataset import MultimodalDataset, check_splits, from_arrays

__all__ = [
    "UnsafePickleError",
    "MMSAFormatError",
    "RestrictedUnpickler",
    "restricted_load",
    "load_mmsa",
    "standardize_splits",
    "heldout_fold_path",
    "HELDOUT_FOLDS",
    "MMSA_MODALITIES",
    "SPLITS",
]

#: modality name -> MMSA key (text's key is chosen by ``text_key``)
MMSA_MODALITIES: dict[str, str] = {"L": "text", "A": "audio", "V": "vision"}
#: the splits an MMSA pickle holds
SPLITS: tuple[str, ...] = ("train", "valid", "test")


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list (it could run code); nothing was called."""


class MMSAFormatError(ValueError):
    """A file is unreadable, corrupt, or not in the MMSA layout."""


def _numpy_core(sub: str) -> Any:
    """``numpy._core.<sub>`` (numpy >= 2) or ``numpy.core.<sub>`` (numpy 1.x)."""
    for base in ("numpy._core", "numpy.core"):
        try:
            return importlib.import_module(f"{base}.{sub}")
        except ImportError:
            continue
    raise ImportError(f"cannot import numpy core module {sub!r}")


class _CheckedArray(np.ndarray):
    """What a pickle gets for ``numpy.ndarray``: the array type of numpy's own ``_reconstruct``
    pickles, whose ``__setstate__`` checks the declared size against the data before numpy
    allocates, and which cannot be called to allocate an array of any shape.

    :func:`restricted_load` turns every instance back into a plain ``numpy.ndarray``.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickleError(
            "the pickle calls numpy.ndarray directly (an allocation from a size field); "
            "only numpy's own array reconstruction is allowed"
        )

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise ValueError(f"malformed numpy array state ({type(state).__name__})")
        shape, dtype, _fortran, raw = state[-4:]
        if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"malformed numpy array shape {shape!r}")
        if not isinstance(dtype, np.dtype):
            raise ValueError(f"malformed numpy array dtype {dtype!r}")
        n = 1
        for d in shape:
            n *= d
        if dtype.hasobject:
            if not isinstance(raw, list) or len(raw) != n:
                got = len(raw) if isinstance(raw, list) else type(raw).__name__
                raise ValueError(f"an object array of shape {shape} holds {got} items instead of {n}")
        elif not isinstance(raw, (bytes, bytearray, str)) or len(raw) != n * dtype.itemsize:
            got = len(raw) if isinstance(raw, (bytes, bytearray, str)) else type(raw).__name__
            raise ValueError(
                f"an array of shape {shape} and dtype {dtype} declares {n * dtype.itemsize} bytes but holds {got}"
            )
        super().__setstate__(state)


def _reconstruct_checked(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ``_reconstruct``, for the empty array numpy's pickles start from (its data comes
    with the array's state, checked by :class:`_CheckedArray`)."""
    if subtype is not _CheckedArray:
        raise UnsafePickleError(f"numpy _reconstruct called for {subtype!r}; only numpy.ndarray is allowed")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and 0 <= d <= 1 for d in shape):
        raise UnsafePickleError(f"numpy _reconstruct asked for shape {shape!r}: an allocation from a size field")
    return _numpy_core("multiarray")._reconstruct(_CheckedArray, shape, dtype)


def _bytearray_checked(*args: Any) -> bytearray:
    """``bytearray`` of data that is in the file (bytes, or a str and its codec); never ``bytearray(n)``."""
    if not args:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], str):
        return bytearray(args[0], args[1])
    raise UnsafePickleError(
        f"bytearray({', '.join(type(a).__name__ for a in args)}) is not allowed: only a copy of bytes "
        "in the file (bytearray(n) allocates from a size field)"
    )


def _encode_checked(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it: a str to latin-1 bytes."""
    import _codecs

    if not isinstance(obj, str) or encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise UnsafePickleError(f"_codecs.encode({type(obj).__name__}, {encoding!r}) is not allowed (latin-1 strings only)")
    return _codecs.encode(obj, encoding, errors)


def _allowed() -> dict[tuple[str, str], Any]:
    multiarray = _numpy_core("multiarray")
    numeric = _numpy_core("numeric")
    import collections

    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): _CheckedArray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _encode_checked,  # bytes in protocol-2 pickles
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for base in ("numpy.core", "numpy._core"):
        table[(f"{base}.multiarray", "_reconstruct")] = _reconstruct_checked
        table[(f"{base}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{base}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol-5 arrays
    for mod in ("builtins", "__builtin__"):
        for name, obj in (("set", set), ("frozenset", frozenset), ("bytearray", _bytearray_checked), ("complex", complex)):
            table[(mod, name)] = obj
    return table


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain Python containers, and nothing else.

    Allowed globals: ``numpy.ndarray`` (as the type of numpy's ``_reconstruct``, never called),
    ``numpy.dtype``, numpy's ``_reconstruct`` (empty arrays only), ``scalar`` and ``_frombuffer``
    (``numpy.core`` or ``numpy._core``), ``_codecs.encode`` (latin-1), ``collections.OrderedDict``
    and the builtins ``set``, ``frozenset``, ``bytearray`` (of bytes, never of a size) and
    ``complex``. Dicts, lists, tuples, strings, bytes and numbers need no global. Any other global
    raises :class:`UnsafePickleError` naming it; persistent ids are refused too. Use it through
    :func:`restricted_load`, which also checks the sizes in the file first.
    """

    _table: dict[tuple[str, str], Any] | None = None

    def __init__(self, file: BinaryIO, *, source: str = "<stream>") -> None:
        super().__init__(file)
        self.source = source
        if RestrictedUnpickler._table is None:
            RestrictedUnpickler._table = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        obj = (self._table or {}).get((module, name))
        if obj is None:
            raise UnsafePickleError(
                f"refusing to load {self.source}: it asks for the global '{module}.{name}', which is not "
                "on the allow-list (numpy arrays and plain containers only); nothing from the file was run"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refusing to load {self.source}: persistent id {pid!r} is not allowed")


class _Bounded:
    """A read-only view of a seekable file that never reads (or allocates) past ``size``."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh, self.size = fh, size

    def tell(self) -> int:
        return self.fh.tell()

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.fh.tell())
        return self.fh.read(left if n is None or n < 0 else min(n, left))

    def readline(self, limit: int = -1) -> bytes:
        left = max(0, self.size - self.fh.tell())
        return self.fh.readline(left if limit is None or limit < 0 else min(limit, left))


def _prescan(fh: BinaryIO, size: int, name: str) -> None:
    """Walk the opcodes of the pickle at the current position without building anything.

    Refuses what would make the C unpickler allocate from a size field: a counted string, bytes,
    long or frame longer than the rest of the file, and a memo index no pickler writes (the memo
    table is resized to the index).
    """
    import pickletools

    start = fh.tell()
    bounded = _Bounded(fh, size)
    memo = 0
    try:
        for op, arg, pos in pickletools.genops(bounded):
            if op.name == "FRAME" and arg > size - bounded.tell():
                raise ValueError(f"a frame of {arg} bytes at offset {pos} runs past the end of the file")
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                if not isinstance(arg, int) or not 0 <= arg <= 2 * memo + 1024:
                    raise ValueError(f"memo index {arg} at offset {pos} after {memo} memo entries")
                memo += 1
            elif op.name == "MEMOIZE":
                memo += 1
    except ValueError as err:  # genops: "expected N bytes in a bytes8, but only M remain", bad opcodes
        raise MMSAFormatError(
            f"cannot read {name} as a pickle: {err} (truncated, corrupt, or built to exhaust memory); nothing was allocated"
        ) from None
    except Exception as err:
        raise MMSAFormatError(f"cannot read {name} as a pickle ({type(err).__name__}: {err})") from None
    fh.seek(start)


def _plain(obj: Any) -> Any:
    """Turn every :class:`_CheckedArray` in a loaded structure into a plain ``numpy.ndarray``."""
    if isinstance(obj, np.ndarray):
        arr = obj.view(np.ndarray) if type(obj) is not np.ndarray else obj
        if arr.dtype.hasobject:
            flat = arr.reshape(-1)
            for i, item in enumerate(flat):
                if isinstance(item, (np.ndarray, dict, list, tuple, set, frozenset)):
                    flat[i] = _plain(item)
        return arr
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _plain(v)
        return obj
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            obj[i] = _plain(v)
        return obj
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    return obj


def restricted_load(source: str | os.PathLike | bytes | BinaryIO) -> Any:
    """Unpickle a path, bytes or binary file with :class:`RestrictedUnpickler`.

    The opcodes are checked first (:func:`_prescan`), so a small hostile file cannot make the
    unpickler allocate gigabytes.

    Raises :class:`UnsafePickleError` for a forbidden global or allocation and
    :class:`MMSAFormatError` (naming the path) when the file is unreadable, corrupt or declares
    sizes it does not hold.
    """
    if isinstance(source, (bytes, bytearray)):
        return _unpickle(io.BytesIO(source), "<bytes>")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            if path.is_dir():
                pkls = sorted(p.name for p in path.glob("*.pkl"))
                raise MMSAFormatError(f"{path} is a folder; pass one pickle file (found here: {pkls or 'none'})")
            raise FileNotFoundError(f"MMSA pickle not found: {path}")
        try:
            fh = open(path, "rb")
        except OSError as err:
            raise MMSAFormatError(f"cannot open {path}: {err}") from err
        with fh:
            return _unpickle(fh, str(path))
    name = getattr(source, "name", "<stream>")
    if not (hasattr(source, "seekable") and source.seekable()):
        source = io.BytesIO(source.read())
    return _unpickle(source, str(name))


def _unpickle(fh: BinaryIO, name: str) -> Any:
    start = fh.tell()
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    fh.seek(start)
    _prescan(fh, size, name)
    try:
        return _plain(RestrictedUnpickler(fh, source=name).load())
    except UnsafePickleError as err:
        if name in str(err):
            raise
        raise UnsafePickleError(f"refusing to load {name}: {err}") from None
    except Exception as err:  # corrupt or truncated data surfaces as many exception types
        raise MMSAFormatError(f"cannot read {name} as a pickle ({type(err).__name__}: {err})") from err


def _lengths(split: dict, key: str, t: int, where: str) -> np.ndarray | None:
    if key not in split:
        return None
    ln = np.asarray(split[key]).reshape(-1)
    if ln.dtype.kind not in "biuf":
        raise MMSAFormatError(f"{where}: '{key}' must be numeric, got dtype {ln.dtype}")
    ln = ln.astype(np.int64)
    if ln.size and (ln.max() > t or ln.min() < 0):
        n_bad = int(((ln > t) | (ln < 0)).sum())
        warnings.warn(f"{where}: {n_bad} values of '{key}' lie outside [0, {t}]; clipped", stacklevel=3)
        ln = np.clip(ln, 0, t)
    return ln


def load_mmsa(
    path: str | os.PathLike,
    text_key: str = "text",
    nonfinite: str = "zero",
    task: str = "regression",
    splits: Sequence[str] | None = None,
    modalities: Sequence[str] = ("L", "A", "V"),
    standardize: bool | Sequence[str] = True,
) -> dict[str, MultimodalDataset]:
    """Load an MMSA pickle into one :class:`MultimodalDataset` per split.

    Args:
        path: the ``.pkl`` file (read with :class:`RestrictedUnpickler`).
        text_key: ``"text"`` (features ``(N, T, 768)``, the default) or ``"text_bert"``
            (``(N, 3, T)`` token ids / attention mask / segment ids, stored as float32 channels of
            modality ``L``: ids below 2**24 are exact; a BERT encoder consumes them).
        nonfinite: ``"zero"`` (default: MMSA audio holds ``-inf``) replaces NaN/inf with 0, warns
            and reports counts in ``ds.cleaning``; ``"error"`` raises instead. Either way a sample
            whose modality is entirely NaN/inf is missing that modality (marked absent in the
            mask), and ``ds.nonfinite`` reports per modality what was found and done.
        task: ``"regression"`` (``regression_labels``) or ``"classification"``
            (``classification_labels``; the class count comes from the training split).
        splits: which splits to load (default: every split in the file); an unknown name raises
            ``KeyError`` listing the available ones.
        modalities: subset of ``("L", "A", "V")`` to load, in that order.
        standardize: z-score every feature channel with the mean and standard deviation of the
            **training split only** (:func:`standardize_splits`), applied to every split: ``True``
            (default) for every loaded modality except token ids (``text_key="text_bert"``), a
            sequence of modality names for those only, ``False`` for the raw features. The
            statistics are recorded in every split's ``ds.preprocessing`` (plain data, for a run's
            ``config.json``); with ``splits`` lacking ``train`` the training split is still read
            for them. A file without a ``train`` split cannot be standardised (``MMSAFormatError``).

    Returns:
        split name -> dataset with modalities ``L``, ``A``, ``V`` in ``(N, C, T)``, ``ids`` from
        ``id``, lengths from ``*_lengths`` (and ``L``'s from the BERT attention mask when present),
        ``extras`` holding ``raw_text`` and the other label kind.

    Example::

        data = load_mmsa("MOSI/aligned_50.pkl")
        data["train"].input_dims   # {"L": 768, "A": 5, "V": 20}
    """
    if text_key not in ("text", "text_bert"):
        raise ValueError(f"text_key must be 'text' or 'text_bert', got {text_key!r}")
    if task not in ("regression", "classification"):
        raise ValueError(f"unknown task {task!r}; expected 'regression' or 'classification'")
    mods = tuple(modalities)
    unknown = [m for m in mods if m not in MMSA_MODALITIES]
    if unknown or not mods:
        raise ValueError(f"modalities must be a non-empty subset of {tuple(MMSA_MODALITIES)}, got {mods}")
    path = Path(path)
    raw = restricted_load(path)
    if not isinstance(raw, dict):
        raise MMSAFormatError(f"{path}: expected a dict of splits, got {type(raw).__name__}")
    available = [k for k, v in raw.items() if isinstance(v, dict)]
    if not available:
        raise MMSAFormatError(f"{path}: no splits found (top-level keys: {list(raw)})")
    wanted = list(splits) if splits is not None else [s for s in SPLITS if s in available] + [
        s for s in available if s not in SPLITS
    ]
    for s in wanted:
        if s not in available:
            raise KeyError(f"unknown split {s!r} in {path}; available splits: {available}")
    if standardize is True:
        std_mods = tuple(m for m in mods if not (m == "L" and text_key == "text_bert"))
    elif standardize is False or standardize is None:
        std_mods = ()
    else:
        std_mods = tuple(standardize)
        bad = [m for m in std_mods if m not in mods]
        if bad:
            raise ValueError(f"standardize names modalities {bad} that are not loaded ({list(mods)})")
        if "L" in std_mods and text_key == "text_bert":
            raise ValueError("standardize cannot include 'L' with text_key='text_bert' (token ids, not features)")
    if std_mods and "train" not in available:
        raise MMSAFormatError(
            f"{path}: standardize needs the training split for its statistics, and the file has none "
            f"(splits {available}); pass standardize=False"
        )
    to_build = list(wanted) + (["train"] if std_mods and "train" not in wanted else [])
    label_key = "regression_labels" if task == "regression" else "classification_labels"
    other_label = "classification_labels" if task == "regression" else "regression_labels"

    out: dict[str, MultimodalDataset] = {}
    num_classes: int | None = None
    if task == "classification":
        # the class count comes from the training split, so a split that lacks the top class agrees
        ref = raw.get("train") if "train" in available else raw[wanted[0]]
        labels = np.asarray(ref.get(label_key, np.zeros(0)))
        if labels.size and labels.dtype.kind in "biuf" and np.isfinite(labels).all() and labels.min() >= 0:
            num_classes = max(int(labels.max()) + 1, 2)
    for s in to_build:
        split = raw[s]
        where = f"{path} [{s}]"
        keys = {m: (text_key if m == "L" else MMSA_MODALITIES[m]) for m in mods}
        for need in [*keys.values(), label_key]:
            if need not in split:
                raise MMSAFormatError(f"{where}: missing key '{need}'; keys present: {sorted(split)}")
        features: dict[str, np.ndarray] = {}
        for m, k in keys.items():
            x = np.asarray(split[k])
            if x.ndim != 3:
                raise MMSAFormatError(f"{where}: '{k}' must be rank 3, got shape {x.shape}")
            # every key is (N, T, C) except text_bert, which is (N, 3, T): bring it to NTC
            features[m] = np.swapaxes(x, 1, 2) if k == "text_bert" else x
        lengths: dict[str, np.ndarray] = {}
        for m, k in keys.items():
            t = features[m].shape[1]
            if m == "L":
                bert = split.get("text_bert")
                if bert is not None and np.asarray(bert).ndim == 3 and np.asarray(bert).shape[2] == t:
                    lengths["L"] = np.asarray(bert)[:, 1, :].sum(axis=1).astype(np.int64)
                ln = _lengths(split, "text_lengths", t, where)
            else:
                ln = _lengths(split, f"{k}_lengths", t, where)
            if ln is not None:
                lengths[m] = ln
        extras = {}
        for k in ("raw_text", other_label):
            if k in split and np.asarray(split[k]).shape[:1] == (features[mods[0]].shape[0],):
                extras[k] = np.asarray(split[k])
        ids = split.get("id")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ds = from_arrays(
                    features,
                    split[label_key],
                    task,
                    layout="NTC",
                    lengths=lengths or None,
                    ids=None if ids is None else np.asarray(ids).reshape(-1),
                    nonfinite=nonfinite,
                    extras=extras,
                    num_classes=num_classes,
                )
        except ValueError as err:
            raise MMSAFormatError(f"{where}: {err}") from err
        for w in caught:  # re-emit with the file and split named
            warnings.warn(f"{where}: {w.message}", w.category, stacklevel=2)
        out[s] = ds
    try:
        check_splits(out, source=str(path))
    except ValueError as err:
        raise MMSAFormatError(str(err)) from None
    standardize_splits(out, std_mods)
    return {s: out[s] for s in wanted}


def standardize_splits(
    splits: dict[str, MultimodalDataset],
    modalities: Sequence[str] | None = None,
    fit_split: str = "train",
    min_std: float = 1e-6,
) -> dict[str, Any]:
    """Z-score feature channels of every split **in place** with statistics of ``fit_split`` only.

    For each modality :math:`m` and channel :math:`c`, :math:`\\mu_{mc}` and :math:`\\sigma_{mc}`
    are the mean and (population) standard deviation of the training values over the samples
    that have :math:`m` (``mask``) and every time step; every split becomes
    :math:`(x - \\mu) / \\sigma` (a channel with :math:`\\sigma < ` ``min_std`` is only centred).
    Absent slots are transformed too but are never exposed (batches hold NaN there).

    Each split's ``ds.preprocessing`` is set to the same plain dict::

        {"standardize": {"fit_split": "train", "modalities": [...], "min_std": 1e-6,
                         "mean": {m: [C floats]}, "std": {m: [C floats]}}}

    (``{"standardize": False}`` when ``modalities`` is empty). Returns that dict.

    Args:
        splits: split name -> dataset (``(N, C, T)`` float32 features).
        modalities: which modalities (default: all of ``fit_split``'s).
        fit_split: the split the statistics come from.
        min_std: smallest standard deviation divided by.

    Raises:
        KeyError: ``fit_split`` is not in ``splits`` or a modality is unknown.
        ValueError: a modality has no present training sample.
    """
    if modalities is not None and not tuple(modalities):
        record: dict[str, Any] = {"standardize": False}
        for ds in splits.values():
            ds.preprocessing = dict(record)
        return record
    if fit_split not in splits:
        raise KeyError(f"standardize_splits: no {fit_split!r} split to take statistics from; splits: {list(splits)}")
    ref = splits[fit_split]
    mods = tuple(ref.modalities) if modalities is None else tuple(modalities)
    unknown = [m for m in mods if m not in ref.modalities]
    if unknown:
        raise KeyError(f"standardize_splits: unknown modalities {unknown}; known: {list(ref.modalities)}")
    mean: dict[str, np.ndarray] = {}
    std: dict[str, np.ndarray] = {}
    for m in mods:
        rows = np.asarray(ref.mask)[:, ref.modalities.index(m)]
        if not rows.any():
            raise ValueError(f"standardize_splits: no {fit_split} sample has modality {m!r}")
        x = ref.features[m][rows].astype(np.float64)  # (n, C, T)
        mu = x.mean(axis=(0, 2))
        sd = x.std(axis=(0, 2))
        mean[m], std[m] = mu, np.where(sd >= min_std, sd, 1.0)
    for ds in splits.values():
        for m in mods:
            x = ds.features[m]
            ds.features[m] = ((x - mean[m][None, :, None]) / std[m][None, :, None]).astype(np.float32)
    record = {"standardize": {"fit_split": fit_split, "modalities": list(mods), "min_std": float(min_std),
                              "mean": {m: mean[m].tolist() for m in mods},
                              "std": {m: std[m].tolist() for m in mods}}}
    for ds in splits.values():
        ds.preprocessing = record
    return record


#: the fully held-out 5-fold version of the MOSI file (``heldout_cv/fold{k}.pkl``, see the data README)
HELDOUT_FOLDS = 5


def heldout_fold_path(fold: int, root: str | os.PathLike) -> Path:
    """Path of held-out fold ``fold`` (0-4): ``root/heldout_cv/fold{k}.pkl``, or ``root/fold{k}.pkl``
    when ``root`` is the ``heldout_cv`` folder itself. Each fold file is an MMSA pickle with its own
    ``train``/``valid``/``test`` (test = fold k, valid = fold k+1 mod 5); pooling the five test
    folds gives one estimate over every held-out video.

    Raises:
        ValueError: ``fold`` outside ``[0, 5)``.
        FileNotFoundError: the file does not exist (naming the path).
    """
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= int(fold) < HELDOUT_FOLDS:
        raise ValueError(f"fold must be an int in [0, {HELDOUT_FOLDS}), got {fold!r}")
    base = Path(root)
    if base.is_file():
        raise ValueError(f"fold= needs the data folder (holding heldout_cv/), got the file {base}")
    folder = base if base.name == "heldout_cv" else base / "heldout_cv"
    path = folder / f"fold{int(fold)}.pkl"
    if not path.is_file():
        raise FileNotFoundError(f"held-out fold file {path} does not exist")
    return path
