"""data fetch deletes only archives it downloaded, never follows a planted ``.part`` symlink, and reads from a
mirror (``$NUCSEG_DATA_URL`` / ``--base-url``) (issue 24, classes 3 and 21)."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile

import pytest

from nucseg.learn.demo import make_demo_dataset
from nucseg_cli.main import main
from hostile_helpers import Mirror, no_proxy, one_error


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> bytes:
    src = make_demo_dataset(tmp_path_factory.mktemp("src") / "NuInsSeg", tiles_per_organ=1, size=64)
    path = tmp_path_factory.mktemp("zip") / "NuInsSeg.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(src.rglob("*")):
            zf.write(f, f.relative_to(src).as_posix())
    return path.read_bytes()


def _record(payload: bytes, md5: str | None = None) -> bytes:
    return json.dumps({"files": [{"key": "NuInsSeg.zip", "size": len(payload),
                                  "checksum": "md5:" + (md5 or hashlib.md5(payload).hexdigest()),
                                  "links": {"self": "https://zenodo.invalid/never-used"}}]}).encode()


@pytest.fixture
def mirror(archive, monkeypatch):
    no_proxy(monkeypatch)
    server = Mirror({"NuInsSeg.zip": archive, "NuInsSeg.zip.record.json": _record(archive)})
    monkeypatch.setenv("NUCSEG_DATA_URL", server.url)
    yield server
    server.close()


def test_an_archive_the_user_put_there_is_unpacked_and_kept(archive, mirror, tmp_path, capsys):
    (tmp_path / "NuInsSeg.zip").write_bytes(archive)
    assert main(["-q", "data", "fetch", "nuinsseg", str(tmp_path)]) == 0
    assert (tmp_path / "NuInsSeg.zip").read_bytes() == archive  # not deleted: nucseg did not download it
    assert "NuInsSeg.zip" not in mirror.requests  # and not downloaded again


def test_a_bad_archive_the_user_put_there_is_reported_and_kept(archive, mirror, tmp_path, capsys):
    mine = archive[:-10] + b"0123456789"  # fails the published checksum
    (tmp_path / "NuInsSeg.zip").write_bytes(mine)
    rc = main(["-q", "data", "fetch", "nuinsseg", str(tmp_path)])
    one_error(rc, capsys.readouterr().err, 3, "left as it is")
    assert (tmp_path / "NuInsSeg.zip").read_bytes() == mine


def test_a_symlinked_part_is_not_followed(mirror, tmp_path, capsys):
    victim = tmp_path / "thesis.docx"
    victim.write_bytes(b"do not truncate me")
    dest = tmp_path / "data"
    dest.mkdir()
    os.symlink(victim, dest / "NuInsSeg.zip.part")
    rc = main(["-q", "data", "fetch", "nuinsseg", str(dest)])
    one_error(rc, capsys.readouterr().err, 6, "NuInsSeg.zip.part")
    assert victim.read_bytes() == b"do not truncate me" and (dest / "NuInsSeg.zip.part").is_symlink()


def test_another_programs_part_file_is_not_resumed(mirror, tmp_path, capsys):
    """A browser's ``NuInsSeg.zip.part`` (same name, no nucseg marker) is left alone."""
    (tmp_path / "NuInsSeg.zip.part").write_bytes(b"firefox was here")
    rc = main(["-q", "data", "fetch", "nuinsseg", str(tmp_path)])
    one_error(rc, capsys.readouterr().err, 6, "NuInsSeg.zip.part")
    assert (tmp_path / "NuInsSeg.zip.part").read_bytes() == b"firefox was here"


def test_a_downloaded_archive_is_removed_after_unpacking(mirror, tmp_path, capsys):
    assert main(["-q", "data", "fetch", "nuinsseg", str(tmp_path / "d")]) == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["NuInsSeg"]  # archive and its marker gone
    assert mirror.requests.count("NuInsSeg.zip") == 1


def test_base_url_option_and_file_url_mirror(archive, tmp_path, monkeypatch, capsys):
    """An offline cluster's mirror is a plain folder: ``--base-url file:///...`` (class 21)."""
    monkeypatch.delenv("NUCSEG_DATA_URL", raising=False)
    folder = tmp_path / "mirror"
    folder.mkdir()
    (folder / "NuInsSeg.zip").write_bytes(archive)
    (folder / "NuInsSeg.zip.record.json").write_bytes(_record(archive))
    rc = main(["-q", "data", "fetch", "nuinsseg", str(tmp_path / "d"), "--base-url", folder.as_uri()])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "d" / "NuInsSeg").is_dir() and (folder / "NuInsSeg.zip").read_bytes() == archive
