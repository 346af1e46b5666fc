"""Atomic file writes, safe checkpoint loading, and the guards that files from strangers pass first.

A killed process never leaves a half-written file: data goes to a temporary file in the same folder
(``.<name>.<pid>.<random>.tmp``), is flushed and fsync'ed, then ``os.replace``d over the target
(atomic on POSIX). Files get the usual ``0o666 & ~umask`` mode (``0644`` under the common umask
``022``), like any file a program opens for writing. A temporary file left by a process that was
killed between its write and its rename is removed by the next write into that folder (or by
:func:`clean_stale_temp_files`): its name carries the writer's process id, and only files of
processes that no longer run are touched.

Loading uses ``torch.load(weights_only=True)``, which refuses pickled code; a crafted file fails
with :class:`CheckpointError` naming the path. Before any module is built from a checkpoint, its
plain-data configuration is range-checked (:func:`check_config_limits`): a file whose config asks
for a width of ``1e5`` is refused instead of allocating tens of gigabytes.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
import time
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "InputError",
    "CONFIG_LIMITS",
    "CONFIG_WEIGHTS_FACTOR",
    "CONFIG_WEIGHTS_FLOOR",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save",
    "safe_load",
    "check_config_limits",
    "check_finite_state",
    "check_npy_size",
    "clean_stale_temp_files",
    "file_mode",
    "dir_mode",
    "temp_prefix",
    "ensure_writable_dir",
    "ensure_writable_file",
]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, malformed, or not a flowtransfer checkpoint."""


class InputError(ValueError):
    """A file or argument given by the user cannot be used; the message says what is wrong."""


# --------------------------------------------------------------------------------------------------
# file modes and stale temporary files
# --------------------------------------------------------------------------------------------------

#: ``.<target name>.<pid>.<random>.tmp``: the temporary files of :func:`atomic_write_bytes`
#: (``.part`` for downloads); legacy names without a pid are ``.<target name>.<random>.tmp``
_TEMP_NAME = re.compile(r"^\.(?P<target>.+?)\.(?:(?P<pid>\d+)\.)?(?P<rand>[A-Za-z0-9_]{8})\.(?:tmp|part)$")
#: legacy temporary files (no pid in the name) older than this are stale
_LEGACY_TEMP_AGE_S = 3600.0


def _umask() -> int:
    """The process umask (read from ``/proc`` where possible: setting it to read it races threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new regular file gets from ``open()``: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode a new folder gets from ``mkdir()``: ``0o777 & ~umask``."""
    return 0o777 & ~_umask()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists (another user's) or unparseable: leave it alone
    return True


def temp_prefix(path: Path) -> str:
    """Prefix of this process's temporary files for ``path``: ``.<name>.<pid>.``."""
    return f".{path.name}.{os.getpid()}."


def clean_stale_temp_files(folder: str | os.PathLike, name: str | None = None, recursive: bool = False) -> list[Path]:
    """Remove temporary files that a killed writer left behind; return the removed paths.

    Only files named like this module's (and the downloader's) temporary files are considered:
    ``.<target>.<pid>.<8 chars>.tmp`` / ``.part`` whose process ``pid`` no longer runs, and legacy
    ``.<target>.<8 chars>.tmp`` older than an hour. ``name`` restricts the cleaning to the
    temporary files of one target file; ``recursive`` walks sub-folders too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed: list[Path] = []
    walker: Iterable[tuple[str, list[str], list[str]]]
    walker = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]
    now = time.time()
    for root, _dirs, files in walker:
        for fname in files:
            m = _TEMP_NAME.match(fname)
            if m is None or (name is not None and m.group("target") != name):
                continue
            path = Path(root) / fname
            try:
                if m.group("pid") is not None:
                    stale = not _pid_alive(int(m.group("pid")))
                else:
                    stale = now - path.stat().st_mtime > _LEGACY_TEMP_AGE_S
                if stale and path.is_file():
                    path.unlink()
                    removed.append(path)
            except OSError:
                continue  # vanished or not ours to remove
    return removed


def ensure_writable_dir(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove that files can be written into it.

    Raises:
        InputError: the path is a file, cannot be created, or is not writable.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{what} {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(folder / "probe"), suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise InputError(f"cannot write into the {what} {folder}: {err.strerror or err}") from err
    return folder


def ensure_writable_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Check that ``path`` can be written (its folder is created if needed); nothing is left behind.

    Raises:
        InputError: ``path`` is a folder, or its folder cannot be created or written.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{what} {path} exists and is not writable")
    try:
        ensure_writable_dir(path.parent, what="folder")
    except InputError as err:
        raise InputError(f"{what} {path} cannot be written: {err}") from None
    return path


# --------------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    The file gets mode ``0o666 & ~umask``. Stale temporary files of ``path`` left by killed
    writers are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_files(path.parent, name=path.name)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically. ``obj`` should hold tensors and plain data only."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------------
# configuration limits
# --------------------------------------------------------------------------------------------------

#: ``(key pattern, upper limit, kind)``: integer sizes in a checkpoint config, checked before any
#: module is built. The first matching pattern applies (keys are matched in lower case); keys that
#: match none (strings, dropouts, bounds, unknown options) are accepted as they are. Kinds:
#: ``count`` (layers, blocks, heads, bins), ``kernel``, ``width`` (channels, hidden sizes),
#: ``classes``, ``length`` (sequence lengths), ``vocab``.
CONFIG_LIMITS: tuple[tuple[str, int, str], ...] = (
    (r"(^|_)(min|max)_|batch_size$|epochs?$|seed$|patience$|steps_per_epoch$", 0, "skip"),
    (r"vocab", 10_000_000, "vocab"),
    (r"classes$", 100_000, "classes"),
    (r"length|seq_lens?$|positions?|max_position", 10_000_000, "length"),
    (r"kernel", 1_025, "kernel"),
    (r"(layers|blocks|depth|heads|bins|priors|steps|stacks)$", 1_024, "count"),
    (r"(^|_)(d|dim|dims|hidden|width|channels|bottleneck|size|reduction|features)$|^input_dims$", 16_384, "width"),
)
#: the coarse weight estimate ``width**2 * count * kernel`` of any one part of a config (a dict and
#: the sizes of the dicts above it) may exceed the weights the file holds by at most this factor ...
CONFIG_WEIGHTS_FACTOR: float = 256.0
#: ... or this many weights (2e8 bytes of float32), whichever is larger
CONFIG_WEIGHTS_FLOOR: float = 5e7


def _limit_for(key: str) -> tuple[int, str] | None:
    low = key.lower()
    for pattern, limit, kind in CONFIG_LIMITS:
        if re.search(pattern, low):
            return None if kind == "skip" else (limit, kind)
    return None


def check_config_limits(config: Any, where: str = "checkpoint config", weights: int | None = None) -> None:
    """Refuse a plain-data model configuration whose sizes no sane model has, before it is built.

    Walks nested dicts and lists:

    - every number must be finite;
    - every size under a key of :data:`CONFIG_LIMITS` (``width``, ``channels``, ``hidden``,
      ``num_layers``, ``num_bins``, ``num_classes``, the values of ``input_dims``, ...) must be a
      whole number in ``[0, limit]``;
    - the coarse estimate ``width**2 * count * kernel`` of the weights that each dict asks for
      (its own sizes and those of the dicts above it) must stay below
      ``max(CONFIG_WEIGHTS_FLOOR, CONFIG_WEIGHTS_FACTOR * weights)``, where ``weights`` is the
      number of tensor elements the file holds (a consistent config builds a model of exactly
      those weights; one that asks for vastly more is lying about its size).

    Unknown keys and string values are accepted: the builder validates its own options.

    Raises:
        CheckpointError: naming the key path, the value and the limit.
    """
    budget = max(CONFIG_WEIGHTS_FLOOR, CONFIG_WEIGHTS_FACTOR * float(weights or 0))

    def sizes(path: str, value: Any, limit: int, kind: str, largest: dict[str, float]) -> None:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, Mapping):
            for k, v in value.items():
                sizes(f"{path}.{k}", v, limit, kind, largest)
            return
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                sizes(f"{path}[{i}]", v, limit, kind, largest)
            return
        if not isinstance(value, (int, float)):
            return
        if not math.isfinite(value) or value != int(value) or not 0 <= value <= limit:
            raise CheckpointError(
                f"{where}: {path} = {value!r} is not a sane {kind} (expected a whole number in [0, {limit}]); "
                "refusing to build a model from it"
            )
        if kind in largest:
            largest[kind] = max(largest[kind], float(value))

    def walk(path: str, value: Any, inherited: dict[str, float]) -> None:
        if isinstance(value, Mapping):
            largest = dict(inherited)
            for k, v in value.items():
                limit = _limit_for(str(k))
                if limit is not None:
                    sizes(f"{path}.{k}" if path else str(k), v, *limit, largest)
            estimate = largest["width"] ** 2 * largest["count"] * largest["kernel"]
            if estimate > budget:
                raise CheckpointError(
                    f"{where}: {path or 'the config'} asks for width {largest['width']:.0f}, "
                    f"{largest['count']:.0f} layers and kernel {largest['kernel']:.0f}: about {estimate:.2g} "
                    f"weights, far more than the {weights or 0} the file holds (limit {budget:.2g}); "
                    "refusing to build a model from it"
                )
            for k, v in value.items():
                walk(f"{path}.{k}" if path else str(k), v, largest)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{path}[{i}]", v, inherited)
        elif isinstance(value, float) and not math.isfinite(value):
            raise CheckpointError(f"{where}: {path} = {value!r} is not a finite number")

    walk("", config, {"width": 1.0, "count": 1.0, "kernel": 1.0})


def _tensor_elements(obj: Any) -> int:
    """Total elements of the tensors in a (nested) plain-data payload."""
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, Mapping):
        return sum(_tensor_elements(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_elements(v) for v in obj)
    return 0


def check_finite_state(state_dict: Mapping[str, Any], where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming the first tensor of ``state_dict`` with NaN or inf."""
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{where}: weight {name!r} holds {bad} non-finite values (NaN/inf) of {tensor.numel()}; "
                "the model cannot give finite outputs"
            )


# --------------------------------------------------------------------------------------------------
# numpy files
# --------------------------------------------------------------------------------------------------


def check_npy_size(fp: Any, available: int, where: str) -> tuple[tuple[int, ...], Any]:
    """Read the header of the ``.npy`` data at ``fp``'s position and check that the ``available``
    bytes (header included) hold exactly the array it declares; return ``(shape, dtype)``.

    numpy allocates the declared array before reading its data, so a tiny file whose header
    claims a huge shape would otherwise allocate gigabytes. ``fp`` is left after the header.

    Raises:
        InputError: an unreadable header, an object dtype, or a size that does not match.
    """
    import numpy as np

    start = fp.tell() if hasattr(fp, "tell") else 0
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        else:
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    except (ValueError, OSError, EOFError, SyntaxError) as err:
        raise InputError(f"{where}: not a readable .npy array ({err})") from None
    if dtype.hasobject:
        raise InputError(f"{where}: holds Python objects (dtype {dtype}), which are refused")
    header = (fp.tell() if hasattr(fp, "tell") else 0) - start
    declared = math.prod(shape) * dtype.itemsize
    if header + declared != available:
        raise InputError(
            f"{where}: its header declares shape {tuple(shape)} of {dtype} ({declared} bytes) but it holds "
            f"{available - header} bytes of data; nothing was allocated"
        )
    return tuple(shape), dtype


# --------------------------------------------------------------------------------------------------
# safe loading
# --------------------------------------------------------------------------------------------------

_ADVICE = re.compile(r"weights_only|safe_globals|allowlist|trusted source|arbitrary code", re.IGNORECASE)


def _torch_reason(err: BaseException) -> str:
    """The part of torch's load error that describes the file, without its advice.

    torch suggests re-running with ``weights_only=False`` or allow-listing the global: the wrong
    advice for a file that was just refused as possibly hostile, so it is dropped.
    """
    text = str(err) if not isinstance(err, KeyError) else f"KeyError {err}"
    kept = []
    for paragraph in re.split(r"\n\s*\n", text):
        sentences = re.split(r"(?<=[.!?])\s+", paragraph.strip())
        clean = " ".join(s for s in sentences if s and not _ADVICE.search(s))
        if clean:
            kept.append(clean)
    return " ".join(kept) or type(err).__name__


def _check_archive_sizes(path: Path) -> None:
    """Refuse a file that is not a zip-format torch checkpoint, or whose entries claim more bytes
    than the file holds: torch allocates an entry's (or, in the legacy format, a storage's)
    declared size before reading it."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise CheckpointError(
            f"refusing to load {path}: it is not a zip-format torch checkpoint (what torch.save writes): {err}"
        ) from None
    for info in entries:
        if info.file_size > size or info.compress_size > size:
            raise CheckpointError(
                f"refusing to load {path}: entry {info.filename!r} claims {info.file_size} bytes but the file "
                f"holds {size}; nothing was allocated"
            )


def safe_load(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", *, check_config: bool = True
) -> Any:
    """Load a checkpoint without executing code from it.

    With ``check_config`` (default), the ``config`` and ``hparams`` entries of a dict checkpoint
    pass :func:`check_config_limits` before anything is built from them.

    Only zip-format checkpoints (what ``torch.save`` writes) are read, and none whose entries
    claim more bytes than the file holds.

    Raises:
        CheckpointError: the file is missing, truncated, holds anything but tensors and plain
            Python data (for example a pickled object whose loading would run code), declares
            sizes it does not hold, or its configuration asks for absurd sizes.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}" if not path.is_dir() else f"{path} is a folder, not a checkpoint file")
    _check_archive_sizes(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError, ...
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-data flowtransfer checkpoint "
            f"(only tensors and plain Python containers are accepted): {_torch_reason(err)}"
        ) from None
    if check_config and isinstance(payload, dict):
        weights = _tensor_elements(payload.get("state_dict", {}))
        for key in ("config", "hparams"):
            if key in payload:
                check_config_limits(payload[key], where=f"{path} [{key}]", weights=weights)
    return payload
