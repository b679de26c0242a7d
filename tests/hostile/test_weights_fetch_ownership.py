"""weights fetch never replaces a file it did not download, refuses a folder in the way with one line, reports
a cut download as a network failure, and reads from a mirror (issue 24, classes 4, 17, 18 and 21)."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from nucseg.model import weights
from nucseg_cli.main import main
from hostile_helpers import Mirror, no_proxy, one_error

NAME = "sam_vit_b_01ec64.pth"
PAYLOAD = bytes(range(256)) * 4000


@pytest.fixture
def mirror(monkeypatch):
    """A mirror serving PAYLOAD as vit_b; the registry's hash (not its address) is set to PAYLOAD's."""
    no_proxy(monkeypatch)
    monkeypatch.setitem(weights.REGISTRY, "vit_b", replace(
        weights.REGISTRY["vit_b"], sha256=hashlib.sha256(PAYLOAD).hexdigest(), size_bytes=len(PAYLOAD)))
    server = Mirror({NAME: PAYLOAD})
    monkeypatch.setenv("NUCSEG_WEIGHTS_URL", server.url)
    yield server
    server.close()


def test_a_users_own_file_of_that_name_is_not_replaced(mirror, tmp_path, capsys):
    mine = tmp_path / NAME
    mine.write_bytes(b"my fine-tuned weights, saved under the official name")
    rc = main(["-q", "weights", "fetch", "vit_b", "--dest", str(tmp_path)])
    one_error(rc, capsys.readouterr().err, 6, str(mine))
    assert mine.read_bytes().startswith(b"my fine-tuned") and mirror.requests == []


def test_a_folder_where_the_file_goes_is_one_line(mirror, tmp_path, capsys):
    (tmp_path / NAME).mkdir()
    rc = main(["-q", "weights", "fetch", "vit_b", "--dest", str(tmp_path)])
    one_error(rc, capsys.readouterr().err, 6, "folder")
    assert (tmp_path / NAME).is_dir()


def test_a_truncated_download_is_a_network_failure(mirror, tmp_path, capsys):
    mirror.short.add(NAME)
    rc = main(["-q", "weights", "fetch", "vit_b", "--dest", str(tmp_path)])
    one_error(rc, capsys.readouterr().err, 1, "rerun")
    assert list(tmp_path.iterdir()) == []


def test_mirror_env_and_option(mirror, tmp_path, monkeypatch, capsys):
    assert main(["-q", "weights", "fetch", "vit_b", "--dest", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / NAME).read_bytes() == PAYLOAD and mirror.requests == [NAME]
    folder = tmp_path / "offline"  # --base-url wins over the variable; a plain folder as file://
    folder.mkdir()
    (folder / NAME).write_bytes(PAYLOAD)
    rc = main(["-q", "weights", "fetch", "vit_b", "--dest", str(tmp_path / "b"), "--base-url", folder.as_uri()])
    assert rc == 0 and (tmp_path / "b" / NAME).read_bytes() == PAYLOAD and mirror.requests == [NAME]


def test_its_download_rewritten_since_is_not_replaced(mirror, tmp_path, capsys):
    """The marker records the file as downloaded (inode, size, mtime): someone's bytes written over it since are
    theirs now; a file nucseg downloaded and nobody touched would have been used as it is."""
    assert main(["-q", "weights", "fetch", "vit_b", "--dest", str(tmp_path)]) == 0
    target = tmp_path / NAME
    target.write_bytes(PAYLOAD[:100])
    rc = main(["-q", "weights", "fetch", "vit_b", "--dest", str(tmp_path)])
    one_error(rc, capsys.readouterr().err, 6, str(target))


def test_the_library_call_does_not_replace_a_users_file_either(tmp_path, monkeypatch):
    """The same through ``weights.fetch`` with any opener: the refusal comes before the network."""
    import io

    from nucseg.errors import OutputError

    monkeypatch.setitem(weights.REGISTRY, "vit_b", replace(
        weights.REGISTRY["vit_b"], sha256=hashlib.sha256(PAYLOAD).hexdigest(), size_bytes=len(PAYLOAD)))
    mine = tmp_path / NAME
    mine.write_bytes(b"mine")
    calls = []

    def opener(url, timeout=0.0):
        calls.append(url)
        response = io.BytesIO(PAYLOAD)
        response.headers = {"Content-Length": str(len(PAYLOAD))}
        return response

    with pytest.raises(OutputError, match="did not download"):
        weights.fetch("vit_b", tmp_path, url_opener=opener)
    assert mine.read_bytes() == b"mine" and calls == []


def test_a_symlink_to_a_shared_official_copy_is_used_as_it_is(mirror, tmp_path, capsys):
    """Reading through a link is fine; only writes never follow one."""
    shared = tmp_path / "shared.pth"
    shared.write_bytes(PAYLOAD)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / NAME).symlink_to(shared)
    assert main(["-q", "weights", "fetch", "vit_b", "--dest", str(tmp_path / "cache")]) == 0
    assert mirror.requests == [] and (tmp_path / "cache" / NAME).is_symlink()
