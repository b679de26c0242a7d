from __future__ import annotations

import hashlib
import io
import urllib.error
from dataclasses import replace
from pathlib import Path

import pytest

from nucseg.model import weights
from nucseg.io import sha256_file
from nucseg.errors import CheckpointError, InputError, NucsegError

PAYLOAD = bytes(range(256)) * 9000 + b"tail"  # ~2.3 MB: several 1 MiB chunks and a short last one
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes, length: int | None = None, fail_after: int | None = None):
        super().__init__(data)
        self.headers = {} if length is None else {"Content-Length": str(length)}
        self.fail_after = fail_after

    def read(self, n: int = -1) -> bytes:
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        return super().read(n)


class FakeOpener:
    """Stands in for urllib.request.urlopen and records what it was asked."""

    def __init__(
        self, data: bytes = PAYLOAD, length: int | None = len(PAYLOAD), fail_after: int | None = None
    ):
        self.data, self.length, self.fail_after = data, length, fail_after
        self.calls: list[tuple[str, float]] = []

    def __call__(self, url: str, timeout: float = 0.0) -> FakeResponse:
        self.calls.append((url, timeout))
        return FakeResponse(self.data, self.length, self.fail_after)


@pytest.fixture
def fake_vit_b(monkeypatch) -> weights.WeightInfo:
    """Point the vit_b entry at PAYLOAD for this test only; the module's real values come back afterwards."""
    info = replace(weights.REGISTRY["vit_b"], sha256=PAYLOAD_SHA, size_bytes=len(PAYLOAD))
    monkeypatch.setitem(weights.REGISTRY, "vit_b", info)
    return info


def test_registry_holds_the_official_values():
    reg = {w.name: w for w in weights.list_weights()}
    assert list(reg) == ["vit_b", "vit_l", "vit_h"]
    b, l, h = reg["vit_b"], reg["vit_l"], reg["vit_h"]
    assert b.url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert b.sha256 == "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"
    assert b.size_bytes == 375042383
    assert l.url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth"
    assert l.sha256 == "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"
    assert l.size_bytes is None
    assert h.url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"
    assert h.sha256 == "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"
    assert h.size_bytes == 2564550879
    assert [w.model_type for w in reg.values()] == ["vit_b", "vit_l", "vit_h"]
    assert b.filename == "sam_vit_b_01ec64.pth"


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("NUCSEG_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert weights.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("NUCSEG_CACHE")
    assert weights.cache_dir() == tmp_path / "x" / "nucseg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights.cache_dir() == tmp_path / "home" / ".cache" / "nucseg"


def test_sha256_file_streams_in_chunks(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(PAYLOAD)
    assert sha256_file(path) == PAYLOAD_SHA
    assert sha256_file(path, chunk=7) == PAYLOAD_SHA
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_verify(tmp_path, fake_vit_b):
    small = tmp_path / "not_sam.pth"
    small.write_bytes(b"definitely not a SAM checkpoint")
    assert weights.verify(small) is None
    renamed = tmp_path / "whatever.bin"
    renamed.write_bytes(PAYLOAD)
    assert weights.verify(renamed) == fake_vit_b  # recognised by content, not by name
    with pytest.raises(InputError, match="not found"):
        weights.verify(tmp_path / "missing.pth")


def test_fetch_downloads_verifies_and_reports_progress(tmp_path, fake_vit_b):
    opener = FakeOpener()
    seen: list[tuple[int, int]] = []
    path = weights.fetch("vit_b", tmp_path, progress=lambda d, t: seen.append((d, t)), url_opener=opener)
    assert path == tmp_path / "sam_vit_b_01ec64.pth"
    assert path.read_bytes() == PAYLOAD
    assert [url for url, _ in opener.calls] == [fake_vit_b.url]
    assert seen[0] == (0, len(PAYLOAD)) and seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) >= 4
    # no temporary left; the sidecar marks the file as nucseg's download
    assert sorted(p.name for p in tmp_path.iterdir()) == [".sam_vit_b_01ec64.pth.nucseg", "sam_vit_b_01ec64.pth"]


def test_fetch_uses_the_registry_size_when_the_server_sends_none(tmp_path, fake_vit_b):
    seen: list[tuple[int, int]] = []
    opener = FakeOpener(length=None)
    weights.fetch("vit_b", tmp_path, progress=lambda d, t: seen.append((d, t)), url_opener=opener)
    assert {t for _, t in seen} == {len(PAYLOAD)}


def test_fetch_present_and_verified_needs_no_network(tmp_path, fake_vit_b):
    (tmp_path / "sam_vit_b_01ec64.pth").write_bytes(PAYLOAD)

    def no_network(*args, **kwargs):
        raise AssertionError("network used although the checkpoint is present")

    assert weights.fetch("vit_b", tmp_path, url_opener=no_network) == tmp_path / "sam_vit_b_01ec64.pth"


def test_fetch_replaces_a_corrupt_cached_file_it_downloaded(tmp_path, fake_vit_b):
    from nucseg.io import mark_download

    target = tmp_path / "sam_vit_b_01ec64.pth"
    target.write_bytes(PAYLOAD[:1000])
    mark_download(target)  # as if an earlier fetch had written it and it was damaged later
    opener = FakeOpener()
    assert weights.fetch("vit_b", tmp_path, url_opener=opener) == target
    assert len(opener.calls) == 1 and target.read_bytes() == PAYLOAD


def test_fetch_never_replaces_a_file_it_did_not_download(tmp_path, fake_vit_b):
    from nucseg.errors import OutputError

    target = tmp_path / "sam_vit_b_01ec64.pth"
    target.write_bytes(PAYLOAD[:1000])
    opener = FakeOpener()
    with pytest.raises(OutputError, match="did not download"):
        weights.fetch("vit_b", tmp_path, url_opener=opener)
    assert opener.calls == [] and target.read_bytes() == PAYLOAD[:1000]


def test_fetch_hash_mismatch_leaves_nothing(tmp_path, fake_vit_b):
    dest = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="SHA-256"):
        weights.fetch("vit_b", dest, url_opener=FakeOpener(data=PAYLOAD[:-1] + b"X"))
    assert not dest.exists() or list(dest.iterdir()) == []


def test_fetch_real_registry_entry_refuses_foreign_bytes(tmp_path):
    # the untouched registry: a server handing out something else is caught before the rename
    with pytest.raises(CheckpointError):
        weights.fetch("vit_l", tmp_path, url_opener=FakeOpener())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "error",
    [
        urllib.error.URLError(OSError(-3, "Temporary failure in name resolution")),
        urllib.error.HTTPError("https://x", 404, "Not Found", {}, None),
        TimeoutError("timed out"),
    ],
)
def test_fetch_network_failure_is_a_one_line_nucseg_error(tmp_path, fake_vit_b, error):
    def opener(url, timeout=0.0):
        raise error

    with pytest.raises(NucsegError) as info:
        weights.fetch("vit_b", tmp_path, url_opener=opener)
    msg = str(info.value)
    assert "\n" not in msg
    assert fake_vit_b.url in msg and "--checkpoint PATH" in msg and "offline" in msg
    assert list(tmp_path.iterdir()) == []


def test_fetch_connection_lost_midway(tmp_path, fake_vit_b):
    with pytest.raises(NucsegError, match="--checkpoint PATH"):
        weights.fetch("vit_b", tmp_path, url_opener=FakeOpener(fail_after=1 << 20))
    assert list(tmp_path.iterdir()) == []


def test_fetch_unknown_name(tmp_path):
    with pytest.raises(InputError, match="vit_b"):
        weights.fetch("vit_x", tmp_path, url_opener=FakeOpener())


def test_fetch_defaults_to_cache_dir(tmp_path, monkeypatch, fake_vit_b):
    monkeypatch.setenv("NUCSEG_CACHE", str(tmp_path / "cache"))
    path = weights.fetch("vit_b", url_opener=FakeOpener())
    assert path == tmp_path / "cache" / "sam_vit_b_01ec64.pth" and Path(path).is_file()
