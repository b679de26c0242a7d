"""`nucseg data fetch nuinsseg DIR` against a local HTTP server (127.0.0.1) that serves a Zenodo-like record
and a small NuInsSeg-layout archive made here: verification, unpacking, and resuming a cut download.

The server is a mirror (``$NUCSEG_DATA_URL``: ``<base>/NuInsSeg.zip`` and ``<base>/NuInsSeg.zip.record.json``),
as an offline cluster would set one up; nothing in nucseg's source tables is patched."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import zipfile
from pathlib import Path

import pytest

import nucseg.learn.datasets as ds
from nucseg.learn.data import discover
from nucseg.learn.demo import make_demo_dataset
from nucseg.errors import DataError, NucsegError
from nucseg_cli.main import main


class _Server:
    """A record endpoint and a file endpoint with HTTP Range; can cut a response short or ignore Range."""

    def __init__(self, payload: bytes, checksum: str | None):
        self.payload, self.checksum = payload, checksum
        self.cut_after: int | None = None  # next file response stops after this many bytes, then closes
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        self.sent = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                if self.path == "/NuInsSeg.zip.record.json":  # the record API's answer, saved as is on the mirror
                    body = json.dumps({"files": [{
                        "key": "NuInsSeg.zip", "size": len(server.payload),
                        **({"checksum": server.checksum} if server.checksum else {}),
                        "links": {"self": "https://zenodo.invalid/files/NuInsSeg.zip/content"}}]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if self.path != "/NuInsSeg.zip":
                    self.send_error(404)
                    return
                start, data = 0, server.payload
                rng = self.headers.get("Range")
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.cut_after is not None:
                    body, server.cut_after = body[: server.cut_after], None
                    self.close_connection = True
                self.wfile.write(body)
                self.wfile.flush()
                server.sent += len(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[bytes, Path]:
    """A NuInsSeg-layout zip (organ folders at the top, as the published archive) and the folder it came from."""
    src = make_demo_dataset(tmp_path_factory.mktemp("src") / "NuInsSeg", tiles_per_organ=2, size=96)
    path = tmp_path_factory.mktemp("zip") / "NuInsSeg.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:  # stored: a cut lands mid-member
        for f in sorted(src.rglob("*")):
            zf.write(f, f.relative_to(src).as_posix())
    return path.read_bytes(), src


@pytest.fixture
def serve(monkeypatch):
    servers = []

    def start(payload: bytes, checksum: str | None) -> _Server:
        server = _Server(payload, checksum)
        servers.append(server)
        monkeypatch.setenv("NUCSEG_DATA_URL", f"http://127.0.0.1:{server.port}")
        return server

    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    yield start
    for s in servers:
        s.close()


def _md5(data: bytes) -> str:
    return "md5:" + hashlib.md5(data).hexdigest()


def test_cut_download_resumes_with_range_and_unpacks_the_layout_train_reads(archive, serve, tmp_path, capsys):
    payload, src = archive
    server = serve(payload, _md5(payload))
    cut = len(payload) // 3
    server.cut_after = cut
    dest = tmp_path / "data"
    with pytest.raises(NucsegError, match="resume"):
        ds.fetch_dataset("nuinsseg", dest)
    part = dest / "NuInsSeg.zip.part"
    assert part.stat().st_size == cut and not (dest / "NuInsSeg").exists()

    assert main(["-q", "data", "fetch", "nuinsseg", str(dest)]) == 0
    root = Path(capsys.readouterr().out.strip())
    assert root == dest / "NuInsSeg"
    ranges = [r for p, r in server.requests if p == "/NuInsSeg.zip"]
    assert ranges == [None, f"bytes={cut}-"]  # the second request asked only for the rest
    assert server.sent == len(payload)  # every byte crossed the wire once
    assert not part.exists() and not (dest / "NuInsSeg.zip").exists()  # the verified archive is removed
    got, want = discover(root), discover(src)
    assert [s.image.relative_to(root) for s in got] == [s.image.relative_to(src) for s in want] and len(got) == 4
    for a, b in zip(got, want):
        assert a.image.read_bytes() == b.image.read_bytes() and a.labels.read_bytes() == b.labels.read_bytes()
    source = json.loads((root / ds.SOURCE_FILE).read_text())
    assert source["checksum"] == _md5(payload) and source["size"] == len(payload)
    # done: a rerun touches neither the network nor the files
    n = len(server.requests)
    assert ds.fetch_dataset("nuinsseg", dest) == root and len(server.requests) == n


def test_wrong_checksum_is_refused_and_nothing_is_unpacked(archive, serve, tmp_path):
    payload, _ = archive
    serve(payload, "md5:" + "0" * 32)
    with pytest.raises(DataError, match="md5"):
        ds.fetch_dataset("nuinsseg", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no archive, no part, no folder


def test_server_ignoring_range_starts_over_and_record_without_checksum_still_checks_crcs(archive, serve, tmp_path):
    payload, _ = archive
    server = serve(payload, None)
    server.cut_after = 100  # a prefix the server will then not continue
    with pytest.raises(NucsegError, match="resume"):
        ds.fetch_dataset("nuinsseg", tmp_path)
    server.ignore_range = True
    with pytest.warns(UserWarning, match="no checksum"):
        root = ds.fetch_dataset("nuinsseg", tmp_path, keep_archive=True)
    assert (tmp_path / "NuInsSeg.zip").read_bytes() == payload and len(discover(root)) == 4


def test_an_archive_that_is_not_nuinsseg_leaves_nothing_behind(serve, tmp_path):
    zpath = tmp_path / "other.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("readme.txt", "not a dataset")
    payload = zpath.read_bytes()
    serve(payload, _md5(payload))
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="no NuInsSeg organ folders"):
        ds.fetch_dataset("nuinsseg", dest)
    assert not (dest / "NuInsSeg").exists() and [p.name for p in dest.iterdir() if ".tmp-" in p.name] == []
