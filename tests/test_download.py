"""Verified atomic downloads, served from a local HTTP server on 127.0.0.1 (never the internet)."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import threading
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from flowtransfer.data.avmnist import load_mnist
from flowtransfer.data.download import (
    FSDD_SPEAKERS,
    ChecksumError,
    DownloadError,
    check_fsdd_manifest,
    download,
    extract_fsdd,
    fetch_avmnist_sources,
    sha256_file,
)

CONTENT = bytes(range(256)) * 64  # 16 KiB


def tiny_wav(value: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(8000)
        f.writeframes(np.full(4, value, dtype="<i2").tobytes())
    return buf.getvalue()


def fsdd_archive(n_takes: int = 3, evil: bool = True) -> bytes:
    """A .tar.gz laid out like the FSDD GitHub tag archive, with small wav files."""
    buf = io.BytesIO()
    wav = tiny_wav(7)
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as t:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))

        add("free-spoken-digit-dataset-1.0.10/README.md", b"readme")
        for d in range(10):
            for s in FSDD_SPEAKERS:
                for i in range(n_takes):
                    add(f"free-spoken-digit-dataset-1.0.10/recordings/{d}_{s}_{i}.wav", wav)
        if evil:  # members that must never be written outside the target
            add("../recordings/0_evil_0.wav", wav)
            add("free-spoken-digit-dataset-1.0.10/recordings/../../escape.wav", wav)
    return buf.getvalue()


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


class Server:
    """Serves ``routes`` (path -> bytes); ``/half/...`` sends half the bytes then closes."""

    def __init__(self, routes: dict[str, bytes]):
        self.routes = routes
        self.hits: dict[str, int] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                half = self.path.startswith("/half/")
                key = self.path[len("/half") :] if half else self.path
                if key not in outer.routes:
                    self.send_error(404)
                    return
                data = outer.routes[key]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if half:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server({})
    yield s
    s.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_good_file_accepted(server, tmp_path):
    gz = gzip.compress(CONTENT)
    server.routes["/good.gz"] = gz
    dest = tmp_path / "cache" / "good.gz"
    out = download(server.url + "/good.gz", dest, sha256=sha(gz), decompressed_sha256=sha(CONTENT))
    assert out == dest and dest.read_bytes() == gz
    assert sha256_file(dest, decompress=True) == sha(CONTENT)
    assert leftovers(dest.parent) == ["good.gz"]
    # a verified existing file is kept without a second request
    download(server.url + "/good.gz", dest, decompressed_sha256=sha(CONTENT))
    assert server.hits["/good.gz"] == 1


def test_recompressed_file_accepted_by_decompressed_checksum(server, tmp_path):
    """Mirrors re-compress: the .gz bytes differ, the decompressed content does not."""
    server.routes["/re.gz"] = gzip.compress(CONTENT, compresslevel=1, mtime=123)
    dest = download(server.url + "/re.gz", tmp_path / "re.gz", decompressed_sha256=sha(CONTENT))
    assert gzip.decompress(dest.read_bytes()) == CONTENT


def test_corrupted_file_rejected_and_removed(server, tmp_path):
    server.routes["/bad.gz"] = gzip.compress(CONTENT[:-1] + b"\x00")
    server.routes["/notgz.gz"] = CONTENT
    dest = tmp_path / "cache" / "bad.gz"
    with pytest.raises(ChecksumError, match="decompressed content mismatch"):
        download(server.url + "/bad.gz", dest, decompressed_sha256=sha(CONTENT))
    assert leftovers(dest.parent) == []
    with pytest.raises(ChecksumError, match="not a valid gzip"):
        download(server.url + "/notgz.gz", dest, decompressed_sha256=sha(CONTENT))
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        download(server.url + "/notgz.gz", dest, sha256="0" * 64)
    assert leftovers(dest.parent) == []


def test_corrupted_existing_file_is_replaced(server, tmp_path):
    server.routes["/f.gz"] = gzip.compress(CONTENT)
    dest = tmp_path / "f.gz"
    dest.write_bytes(b"garbage")
    download(server.url + "/f.gz", dest, decompressed_sha256=sha(CONTENT))
    assert gzip.decompress(dest.read_bytes()) == CONTENT


def test_interrupted_download_leaves_no_file(server, tmp_path):
    server.routes["/big.bin"] = CONTENT * 8
    dest = tmp_path / "cache" / "big.bin"
    with pytest.raises(DownloadError, match="(?i)incomplete|failed"):
        download(server.url + "/half/big.bin", dest)
    assert leftovers(dest.parent) == []


def test_http_error(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download(server.url + "/missing.gz", tmp_path / "m.gz")
    assert leftovers(tmp_path) == []


def test_extract_fsdd_only_recordings(tmp_path):
    archive = tmp_path / "fsdd.tar.gz"
    archive.write_bytes(fsdd_archive())
    rec = extract_fsdd(archive, tmp_path / "fsdd" / "recordings", n_takes=3)
    names = check_fsdd_manifest(rec, n_takes=3)
    assert len(names) == 180 and "0_evil_0.wav" not in names
    assert not (tmp_path / "escape.wav").exists() and not (tmp_path / "recordings").exists()
    assert leftovers(tmp_path / "fsdd") == ["recordings"]  # no temporary folder left


def test_incomplete_fsdd_archive_rejected(tmp_path):
    archive = tmp_path / "fsdd.tar.gz"
    archive.write_bytes(fsdd_archive(n_takes=2, evil=False))
    with pytest.raises(DownloadError, match="60 missing"):
        extract_fsdd(archive, tmp_path / "fsdd" / "recordings", n_takes=3)
    assert leftovers(tmp_path / "fsdd") == []
    archive.write_bytes(b"not an archive")
    with pytest.raises(DownloadError, match="not a readable FSDD archive"):
        extract_fsdd(archive, tmp_path / "fsdd" / "recordings", n_takes=3)


def test_fetch_avmnist_sources_from_local_mirror(server, tmp_path):
    rng = np.random.default_rng(0)
    images = idx_bytes(rng.integers(0, 256, size=(12, 28, 28)))
    labels = idx_bytes(np.arange(12) % 10)
    server.routes["/mnist/img.gz"] = gzip.compress(images)
    server.routes["/mnist/lab.gz"] = gzip.compress(labels)
    server.routes["/fsdd.tar.gz"] = fsdd_archive(evil=False)
    urls = {
        "t10k-images-idx3-ubyte.gz": server.url + "/mnist/img.gz",
        "t10k-labels-idx1-ubyte.gz": server.url + "/mnist/lab.gz",
    }
    sums = {"t10k-images-idx3-ubyte.gz": sha(images), "t10k-labels-idx1-ubyte.gz": sha(labels)}
    root = fetch_avmnist_sources(
        tmp_path / "src", urls, sums, fsdd_url=server.url + "/fsdd.tar.gz", fsdd_takes=3
    )
    x, y = load_mnist(root / "mnist")
    assert x.shape == (12, 28, 28) and np.array_equal(y, np.arange(12) % 10)
    assert len(check_fsdd_manifest(root / "fsdd" / "recordings", n_takes=3)) == 180
    assert leftovers(root / "fsdd") == ["recordings"]  # the archive is removed after extraction
    # second call: everything verified in place, nothing fetched again
    fetch_avmnist_sources(
        tmp_path / "src", urls, sums, fsdd_url=server.url + "/fsdd.tar.gz", fsdd_takes=3
    )
    assert server.hits == {"/mnist/img.gz": 1, "/mnist/lab.gz": 1, "/fsdd.tar.gz": 1}
    # a mirror serving a wrong file is refused
    bad = dict(sums, **{"t10k-labels-idx1-ubyte.gz": "1" * 64})
    with pytest.raises(ChecksumError):
        fetch_avmnist_sources(
            tmp_path / "other", urls, bad, fsdd_url=server.url + "/fsdd.tar.gz", fsdd_takes=3
        )
    assert not (tmp_path / "other" / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()
