"""Hostile dataset records for ``nucseg data fetch`` (issue 24, class 17): a record that is not what Zenodo
publishes (a list, a size "abc", NaN, nesting 10^5 deep) is one line and exit 1, never a traceback, and
nothing is downloaded or written."""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading

import pytest

import nucseg.learn.datasets as ds
from nucseg_cli.main import main


def _record_server(body: bytes):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def _entry(**kw) -> dict:
    return {"key": "NuInsSeg.zip", "links": {"self": "http://127.0.0.1:9/files/NuInsSeg.zip"}, **kw}


@pytest.mark.parametrize("kind,body,needle", [
    ("list", json.dumps([_entry(size=10)]), "is malformed (a JSON list, not an object)"),
    ("size-abc", json.dumps({"files": [_entry(size="abc")]}), "the file's size is 'abc'"),
    ("size-negative", json.dumps({"files": [_entry(size=-5)]}), "the file's size is -5"),
    ("files-string", json.dumps({"files": "NuInsSeg.zip"}), "files is a str"),
    ("url-number", json.dumps({"files": [_entry(size=10, links={"self": 12})]}), "the file's address is 12"),
    ("nan", '{"files": [{"key": "NuInsSeg.zip", "size": NaN}]}', "NaN and Infinity are not JSON numbers"),
    ("deep", '{"files": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested more than 64 levels"),
])
def test_malformed_record_is_one_line(kind, body, needle, tmp_path, monkeypatch, capsys):
    httpd = _record_server(body.encode())
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        monkeypatch.setitem(ds.SOURCES, "nuinsseg", dataclasses.replace(
            ds.SOURCES["nuinsseg"], record_api=f"{base}/api/records/1", url=f"{base}/files/NuInsSeg.zip"))
        rc = main(["-q", "data", "fetch", "nuinsseg", str(tmp_path / "d")])
    finally:
        httpd.shutdown()
        httpd.server_close()
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("nucseg: error: ")]
    assert rc == 1, err
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())  # nothing downloaded
