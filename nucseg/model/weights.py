"""The official Segment Anything checkpoints: where they come from, how to recognise them, how to fetch them.

Every checkpoint is identified by its SHA-256, never by its file name, so a renamed file is still recognised
and a truncated or tampered one is refused. Downloads stream into a temporary sibling that is renamed only
after the hash matches, so the cache never holds a partial file. The library reports progress through a
callback and never draws anything itself.

Mirrors: ``$NUCSEG_WEIGHTS_URL`` (or ``base_url``) replaces the official address's folder, so
``<base>/sam_vit_b_01ec64.pth`` is fetched instead (a lab mirror, a proxy, ``file:///shared/sam`` on an offline
cluster); the SHA-256 check is the same, so a mirror cannot hand out other weights.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import CheckpointError, InputError, NucsegError, OutputError
from ..io import atomic_path, is_download, mark_download, sha256_file

ProgressCallback = Callable[[int, int], None]  # (bytes done, total bytes; 0 when the total is unknown)
MIRROR_ENV = "NUCSEG_WEIGHTS_URL"  # base URL of a mirror of the official checkpoints (see :func:`source_url`)


@dataclass(frozen=True)
class WeightInfo:
    """One official checkpoint. ``size_bytes`` is None where it has not been verified."""

    name: str
    model_type: str
    url: str
    sha256: str
    size_bytes: int | None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


REGISTRY: dict[str, WeightInfo] = {
    w.name: w
    for w in (
        WeightInfo(
            "vit_b",
            "vit_b",
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            375042383,
        ),
        WeightInfo(
            "vit_l",
            "vit_l",
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            None,
        ),
        WeightInfo(
            "vit_h",
            "vit_h",
            "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            2564550879,
        ),
    )
}

_CHUNK = 1 << 20


def list_weights() -> list[WeightInfo]:
    """All official checkpoints, smallest model first."""
    return list(REGISTRY.values())


def cache_dir() -> Path:
    """Where fetched checkpoints live.

    ``$NUCSEG_CACHE``, else ``$XDG_CACHE_HOME/nucseg``, else ``~/.cache/nucseg`` (not created here).
    """
    if os.environ.get("NUCSEG_CACHE"):
        return Path(os.environ["NUCSEG_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "nucseg"
    return Path.home() / ".cache" / "nucseg"


def source_url(info: WeightInfo, base_url: str | None = None) -> str:
    """Where ``info`` is downloaded from: ``<base>/<file name>`` for a mirror (``base_url``, else
    ``$NUCSEG_WEIGHTS_URL``), else the official address."""
    base = base_url or os.environ.get(MIRROR_ENV) or ""
    return f"{base.rstrip('/')}/{info.filename}" if base.strip() else info.url


def verify(path: str | os.PathLike) -> WeightInfo | None:
    """Which official checkpoint ``path`` is, by content; None when it is none of them (e.g. fine-tuned).

    A file whose size matches no registered size is only hashed against entries of unknown size, so checking
    a multi-GB file that is obviously not vit_b costs one hash at most, never one per entry.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    candidates = [w for w in REGISTRY.values() if w.size_bytes in (None, size)]
    if not candidates:
        return None
    digest = sha256_file(path)
    return next((w for w in candidates if w.sha256 == digest), None)


def fetch(
    name: str,
    dest_dir: str | os.PathLike | None = None,
    progress: ProgressCallback | None = None,
    url_opener: Callable[..., Any] = urllib.request.urlopen,
    timeout: float = 60.0,
    base_url: str | None = None,
) -> Path:
    """Path of official checkpoint ``name`` (e.g. ``"vit_b"``) in ``dest_dir`` (default :func:`cache_dir`).

    A file already there with the right hash is returned without touching the network. Otherwise the file is
    downloaded to a temporary sibling, hashed while streaming, and renamed into place only if the hash
    matches; on a mismatch nothing is left behind and CheckpointError is raised. A download cut short (fewer
    bytes than announced) is a NucsegError (exit 1: rerun), not a bad checkpoint.

    An existing file of that name with other bytes is replaced only if nucseg downloaded it (its sidecar
    marker, :func:`nucseg.io.mark_download`); anything else there (the user's own file, a folder) is refused,
    untouched (OutputError). ``base_url``: a mirror (:func:`source_url`).
    """
    info = REGISTRY.get(name)
    if info is None:
        raise InputError(f"unknown SAM checkpoint {name!r}; choose one of: {', '.join(REGISTRY)}")
    dest = Path(dest_dir if dest_dir is not None else cache_dir()) / info.filename
    if dest.is_file() and sha256_file(dest) == info.sha256:
        return dest  # read only: a symbolic link to a shared copy is fine
    if os.path.lexists(dest) and not is_download(dest):
        what = "a folder" if dest.is_dir() else "a symbolic link" if dest.is_symlink() else "a file"
        raise OutputError(f"{dest} exists and is {what} nucseg did not download (not the official {name} checkpoint); "
                          "move it away or choose another --dest")
    url = source_url(info, base_url)
    offline = "download it elsewhere and pass --checkpoint PATH to work offline"
    digest = hashlib.sha256()
    with atomic_path(dest, owned=is_download) as tmp:
        try:
            response = url_opener(url, timeout=timeout)
        except (OSError, ValueError, http.client.HTTPException) as err:
            raise NucsegError(f"could not reach {url} ({_reason(err)}); {offline}") from None
        with response, open(tmp, "wb") as out:
            total = _content_length(response) or info.size_bytes or 0
            done = 0
            if progress is not None:
                progress(0, total)
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as err:
                    reason = _reason(err)
                    raise NucsegError(f"download of {url} broke off ({reason}); {offline}") from None
                if not chunk:
                    break
                digest.update(chunk)
                try:
                    out.write(chunk)
                except OSError as err:
                    raise OutputError(f"cannot write {dest}: {err.strerror or err}") from None
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        if total and done < total:  # the connection closed early: a network failure, not a bad checkpoint
            raise NucsegError(f"download of {url} stopped at {done} of {total} bytes; rerun, or {offline}")
        if digest.hexdigest() != info.sha256:
            raise CheckpointError(
                f"downloaded {info.filename} ({done} bytes) has SHA-256 {digest.hexdigest()}, expected "
                f"{info.sha256}; the download was corrupted or the file changed upstream, nothing was saved"
            )
    mark_download(dest)
    return dest


def _content_length(response: Any) -> int | None:
    headers = getattr(response, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    reason = getattr(err, "reason", None)  # urllib.error.URLError wraps the socket error here
    return str(reason or err) or type(err).__name__
