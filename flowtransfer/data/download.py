"""Verified, atomic downloads and the fetchers for the AV-MNIST sources.

:func:`download` streams a URL into a temporary file beside the destination, checks the byte count
against ``Content-Length``, checks the sha256 of the file and, for ``.gz`` files, of the
decompressed content (mirrors re-compress, so only the decompressed bytes are comparable), then
renames it into place. Any failure (connection closed early, wrong checksum, corrupt gzip) removes
the temporary file and raises :class:`DownloadError` or :class:`ChecksumError`: the destination
either holds a verified file or does not exist.

:func:`fetch_avmnist_sources` fills ``root/mnist`` (MNIST 10k test set) and ``root/fsdd/recordings``
(the Free Spoken Digit Dataset), the layout :func:`flowtransfer.data.avmnist.load_avmnist` reads.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from flowtransfer.io import clean_stale_temp_files, dir_mode, file_mode, temp_prefix

__all__ = [
    "DownloadError",
    "ChecksumError",
    "MNIST_URLS",
    "MNIST_DECOMPRESSED_SHA256",
    "FSDD_URL",
    "FSDD_SPEAKERS",
    "sha256_file",
    "download",
    "check_fsdd_manifest",
    "extract_fsdd",
    "fetch_avmnist_sources",
]

MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_URLS = {
    "t10k-images-idx3-ubyte.gz": MNIST_MIRROR + "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz": MNIST_MIRROR + "t10k-labels-idx1-ubyte.gz",
}
#: sha256 of the *decompressed* idx files (LeCun's originals; identical across mirrors).
MNIST_DECOMPRESSED_SHA256 = {
    "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
FSDD_URL = (
    "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/tags/v1.0.10.tar.gz"
)
FSDD_SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")

_WAV_NAME = re.compile(r"^([0-9])_([a-z]+)_([0-9]+)\.wav$")


class DownloadError(RuntimeError):
    """A download failed (network error, truncated transfer, bad archive)."""


class ChecksumError(DownloadError):
    """Downloaded content does not match the expected checksum; the file was removed."""


def sha256_file(path: str | os.PathLike, decompress: bool = False, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, or of its gzip-decompressed content with ``decompress=True``."""
    h = hashlib.sha256()
    opener = gzip.open if decompress else open
    with opener(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, sha256: str | None, decompressed_sha256: str | None, url: str) -> None:
    if sha256 is not None:
        got = sha256_file(path)
        if got != sha256.lower():
            raise ChecksumError(f"{url}: sha256 mismatch (expected {sha256}, got {got})")
    if decompressed_sha256 is not None:
        try:
            got = sha256_file(path, decompress=True)
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            raise ChecksumError(f"{url}: not a valid gzip file ({err})") from err
        if got != decompressed_sha256.lower():
            raise ChecksumError(
                f"{url}: sha256 of the decompressed content mismatch "
                f"(expected {decompressed_sha256}, got {got})"
            )


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    decompressed_sha256: str | None = None,
    timeout: float = 60.0,
    chunk_size: int = 1 << 16,
    overwrite: bool = False,
) -> Path:
    """Download ``url`` to ``dest`` atomically and verify it.

    Args:
        url: http(s) or file URL.
        dest: final path; its folder is created. The data goes first to a temporary file in the
            same folder and is renamed over ``dest`` only once complete and verified.
        sha256: expected hex sha256 of the downloaded bytes (optional).
        decompressed_sha256: expected hex sha256 of the gzip-decompressed content (optional;
            the file must then be gzip).
        timeout: socket timeout in seconds.
        chunk_size: bytes per read.
        overwrite: re-download even if ``dest`` exists. Without it an existing ``dest`` is
            verified against the given checksums and kept if it passes (re-downloaded if not).

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        DownloadError: network failure or a transfer shorter than its ``Content-Length``.
        ChecksumError: a checksum does not match (no file is left behind).
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        try:
            _verify(dest, sha256, decompressed_sha256, str(dest))
            return dest
        except ChecksumError:
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_files(dest.parent, name=dest.name)  # .part files of killed downloads
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(dest), suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), file_mode())
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    length = response.headers.get("Content-Length")
                    expected = int(length) if length is not None else None
                    received = 0
                    while block := response.read(chunk_size):
                        out.write(block)
                        received += len(block)
            except (urllib.error.URLError, OSError, ValueError) as err:
                raise DownloadError(f"download of {url} failed: {err}") from err
            except Exception as err:  # http.client.IncompleteRead and friends
                raise DownloadError(f"download of {url} failed: {err!r}") from err
            if expected is not None and received != expected:
                raise DownloadError(
                    f"download of {url} incomplete: received {received} of {expected} bytes"
                )
            out.flush()
            os.fsync(out.fileno())
        _verify(tmp, sha256, decompressed_sha256, url)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def check_fsdd_manifest(recordings: str | os.PathLike, n_takes: int = 50) -> list[str]:
    """Check that ``recordings`` holds exactly the FSDD files ``{digit}_{speaker}_{take}.wav``
    for digits 0-9, the six :data:`FSDD_SPEAKERS` and takes ``0..n_takes-1`` (3000 files).

    Returns:
        The sorted file names.

    Raises:
        DownloadError: files are missing or unexpected, naming a few of them.
    """
    recordings = Path(recordings)
    if not recordings.is_dir():
        raise DownloadError(f"FSDD recordings folder not found: {recordings}")
    expected = {
        f"{d}_{s}_{i}.wav" for d in range(10) for s in FSDD_SPEAKERS for i in range(n_takes)
    }
    found = {p.name for p in recordings.iterdir() if p.suffix == ".wav"}
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing or extra:
        raise DownloadError(
            f"{recordings} is not the expected FSDD release ({len(expected)} recordings): "
            f"{len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(extra)} unexpected (e.g. {extra[:3]})"
        )
    return sorted(found)


#: no FSDD recording comes near this size (they are 5-50 kB); a larger member is refused unread
MAX_RECORDING_BYTES = 16 << 20


def _check_member_size(archive: Path, name: str, size: int) -> None:
    if size > MAX_RECORDING_BYTES:
        raise DownloadError(
            f"{archive}: member {name} declares {size} bytes (limit {MAX_RECORDING_BYTES}); not an FSDD recording"
        )


def extract_fsdd(
    archive: str | os.PathLike, recordings: str | os.PathLike, n_takes: int = 50
) -> Path:
    """Extract the ``recordings/*.wav`` members of an FSDD release archive (.tar.gz or .zip).

    Only regular members whose path ends in ``recordings/<digit>_<speaker>_<take>.wav`` are
    read (by base name, so no member can write outside the target). They go to a temporary
    folder beside ``recordings``, which is checked with :func:`check_fsdd_manifest` and then
    renamed into place. ``n_takes``: takes per digit and speaker expected (50 in the release).
    """
    archive, recordings = Path(archive), Path(recordings)
    recordings.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".recordings.", dir=recordings.parent))
    os.chmod(tmp, dir_mode())  # mkdtemp makes 0700; the final folder is an ordinary one

    def wanted(name: str) -> str | None:
        parts = name.replace("\\", "/").split("/")
        if name.startswith("/") or ".." in parts:
            return None
        if len(parts) >= 2 and parts[-2] == "recordings" and _WAV_NAME.match(parts[-1]):
            return parts[-1]
        return None

    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    base = wanted(info.filename)
                    if base and not info.is_dir():
                        _check_member_size(archive, info.filename, info.file_size)
                        (tmp / base).write_bytes(z.read(info))
        else:
            try:
                with tarfile.open(archive, "r:*") as t:
                    for member in t:
                        base = wanted(member.name)
                        if base and member.isfile():
                            _check_member_size(archive, member.name, member.size)
                            src = t.extractfile(member)
                            assert src is not None
                            (tmp / base).write_bytes(src.read())
            except (tarfile.TarError, EOFError, OSError) as err:
                raise DownloadError(f"{archive}: not a readable FSDD archive ({err})") from err
        check_fsdd_manifest(tmp, n_takes)
        if recordings.exists():
            shutil.rmtree(recordings)
        os.replace(tmp, recordings)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return recordings


def fetch_avmnist_sources(
    root: str | os.PathLike,
    mnist_urls: dict[str, str] | None = None,
    mnist_decompressed_sha256: dict[str, str] | None = None,
    fsdd_url: str = FSDD_URL,
    timeout: float = 60.0,
    fsdd_takes: int = 50,
) -> Path:
    """Download and verify the AV-MNIST sources into ``root`` (skipping what is already there).

    Layout written: ``root/mnist/t10k-images-idx3-ubyte.gz``,
    ``root/mnist/t10k-labels-idx1-ubyte.gz``
    (verified by the sha256 of their decompressed content) and ``root/fsdd/recordings/*.wav``
    (verified as the 3000-file FSDD manifest; the archive itself has no published checksum).
    The URL, checksum and ``fsdd_takes`` (takes per digit and speaker, 50 in the release)
    arguments exist so that tests can point at a small local mirror.
    """
    root = Path(root)
    urls = MNIST_URLS if mnist_urls is None else mnist_urls
    sums = mnist_decompressed_sha256
    if sums is None:
        sums = MNIST_DECOMPRESSED_SHA256
    for name, url in urls.items():
        download(url, root / "mnist" / name, decompressed_sha256=sums.get(name), timeout=timeout)
    recordings = root / "fsdd" / "recordings"
    try:
        check_fsdd_manifest(recordings, fsdd_takes)
    except DownloadError:
        suffix = ".zip" if fsdd_url.endswith(".zip") else ".tar.gz"
        archive = root / "fsdd" / f"fsdd-archive{suffix}"
        download(fsdd_url, archive, timeout=timeout, overwrite=True)
        try:
            extract_fsdd(archive, recordings, fsdd_takes)
        finally:
            archive.unlink(missing_ok=True)
    return root
