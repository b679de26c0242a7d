"""Public training data: download, verify and unpack into the layout ``train`` and ``cv`` read.

NuInsSeg (Mahbod et al., Scientific Data 2024) is published on Zenodo, record 10518968
(DOI 10.5281/zenodo.10518968), as one archive ``NuInsSeg.zip`` of organ folders
(``<organ>/tissue images``, ``<organ>/label masks modify``, ``<organ>/vague areas/mask binary``, ...).

The expected size and checksum are not hard-coded: this code was written without access to the internet, so
they could not be verified here, and a value copied from elsewhere could be wrong. Instead the download asks
Zenodo's record API (``https://zenodo.org/api/records/10518968``) for the file's published size and MD5
each time and checks the archive against them; then it tests every member's CRC (``zipfile.testzip``) and
checks that the unpacked folders are NuInsSeg's layout. Where the record does not publish a checksum, the
size and the CRCs are still checked, with a warning.

An interrupted download resumes: the bytes so far stay in ``<dest>/NuInsSeg.zip.part`` (locked while a
download runs), and the next run asks the server for the rest (HTTP ``Range``); a server that ignores the
range is answered by starting over. The archive becomes ``NuInsSeg.zip`` only once verified, and the folder
``<dest>/NuInsSeg`` appears only once completely unpacked (atomic rename), with ``.nucseg-source.json``
saying where it came from. A second run finds it and returns at once.

What is the user's stays the user's: an archive nucseg downloaded carries a sidecar marker
(:func:`nucseg.io.mark_download`), and only such an archive is deleted after unpacking or when it fails its
checks. An archive the user put in ``<dest>`` is verified and unpacked but never deleted (a bad one is
reported and left). A ``.part`` nucseg did not start (a browser's, or a symbolic link) is refused untouched.

Mirrors (offline clusters, proxies, tests): ``$NUCSEG_DATA_URL`` (or ``base_url``) is a folder, served over
http(s) or as ``file://``, holding the archive (``<base>/NuInsSeg.zip``) and the record's answer saved as is
(``<base>/NuInsSeg.zip.record.json``, from ``https://zenodo.org/api/records/10518968``); the checks are the same.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import http.client
import os
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import __version__
from ..errors import DataError, InputError, NucsegError, OutputError
from ..io import (JsonMark, atomic_path, check_output, is_download, parse_json, promote_download, remove_owned,
                  resumable_file, write_json)
from .data import IMAGES_DIR, LABELS_DIR

ProgressCallback = Callable[[int, int], None]  # (bytes done, total bytes; 0 when unknown)
SOURCE_FILE = ".nucseg-source.json"
SOURCE_MARK = JsonMark("dataset-source")  # in SOURCE_FILE: the unpacked folder is nucseg's
MIRROR_ENV = "NUCSEG_DATA_URL"  # base URL of a mirror: <base>/<archive> and <base>/<archive>.record.json
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset is published. ``record_api`` answers with the file list, sizes and checksums."""

    name: str
    title: str
    doi: str
    record_api: str
    filename: str
    folder: str  # what the unpacked dataset is called under the destination
    url: str  # the file's address, used when the record does not name one
    mirrored: bool = False  # record and archive come from a mirror (:func:`mirror`): the record's links are ignored


SOURCES: dict[str, DatasetSource] = {
    "nuinsseg": DatasetSource(
        name="nuinsseg",
        title="NuInsSeg: nuclei instance segmentation in H&E images, 31 human and mouse organs",
        doi="10.5281/zenodo.10518968",
        record_api="https://zenodo.org/api/records/10518968",
        filename="NuInsSeg.zip",
        folder="NuInsSeg",
        url="https://zenodo.org/records/10518968/files/NuInsSeg.zip?download=1",
    ),
}


@dataclass(frozen=True)
class Published:
    """What the record says about the archive."""

    url: str
    size: int | None
    algorithm: str | None  # "md5", "sha256", ... as published
    digest: str | None


def is_unpacked_dataset(folder: Path) -> bool:
    """A dataset folder nucseg unpacked (its ``.nucseg-source.json`` carries nucseg's marker)."""
    return folder.is_dir() and not folder.is_symlink() and SOURCE_MARK(folder / SOURCE_FILE)


def mirror(source: DatasetSource, base_url: str | None = None) -> DatasetSource:
    """``source`` with its addresses on a mirror (``base_url``, else ``$NUCSEG_DATA_URL``), or as it is."""
    base = (base_url or os.environ.get(MIRROR_ENV) or "").strip().rstrip("/")
    if not base:
        return source
    return dataclasses.replace(source, record_api=f"{base}/{source.filename}.record.json",
                               url=f"{base}/{source.filename}", mirrored=True)


def fetch_dataset(name: str, dest: str | os.PathLike, progress: ProgressCallback | None = None,
                  keep_archive: bool = False, timeout: float = 60.0, base_url: str | None = None) -> Path:
    """Download, verify and unpack dataset ``name`` under ``dest``; returns the folder to pass to ``--data``.

    ``base_url``: a mirror (:func:`mirror`). An archive already in ``dest`` is used; it is deleted afterwards
    (unless ``keep_archive``) only if nucseg downloaded it.
    """
    source = SOURCES.get(name)
    if source is None:
        raise InputError(f"unknown dataset {name!r}; choose one of: {', '.join(SOURCES)}")
    source = mirror(source, base_url)
    dest = Path(dest)
    final = dest / source.folder
    if final.is_dir() and SOURCE_MARK(final / SOURCE_FILE):  # done (read only: a symbolic link to it is fine)
        return dataset_root(final)
    if os.path.lexists(final):
        raise OutputError(f"{final} exists but was not unpacked by nucseg; move it away or choose another folder")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {dest}: {err.strerror or err}") from None
    archive = dest / source.filename
    if os.path.lexists(archive) and not archive.is_file():
        raise OutputError(f"{archive} is in the way of the download and is not a file; move it away")
    published = published_file(source, timeout)
    if not archive.is_file():
        download(published, archive, progress, timeout)
    verify_archive(archive, published)
    with atomic_path(final, is_dir=True, owned=is_unpacked_dataset) as tmp:
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)  # zipfile drops absolute paths and ".." parts: nothing lands outside tmp
        except (OSError, zipfile.BadZipFile) as err:
            raise OutputError(f"cannot unpack {archive} into {dest}: {getattr(err, 'strerror', None) or err}") from None
        root = dataset_root(tmp)
        write_json(tmp / SOURCE_FILE, {
            "dataset": source.name, "title": source.title, "doi": source.doi, "url": published.url,
            "size": archive.stat().st_size, "checksum": f"{published.algorithm}:{published.digest}"
            if published.digest else None, "root": str(root.relative_to(tmp)),
            "fetched": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "nucseg_version": __version__,
        }, SOURCE_MARK)
    if not keep_archive and is_download(archive):
        remove_owned(archive, is_download)  # only what nucseg downloaded: an archive the user put there stays
    return dataset_root(final)


def dataset_root(folder: Path) -> Path:
    """The folder holding the organ folders: the unpacked folder itself, or the one folder it wraps."""
    def has_organs(p: Path) -> bool:
        return any((o / IMAGES_DIR).is_dir() and (o / LABELS_DIR).is_dir() for o in p.iterdir() if o.is_dir())

    if has_organs(folder):
        return folder
    inner = [p for p in folder.iterdir() if p.is_dir()]
    if len(inner) == 1 and has_organs(inner[0]):
        return inner[0]
    raise DataError(f"the archive unpacked into {folder} has no NuInsSeg organ folders "
                    f"(<organ>/{IMAGES_DIR} and <organ>/{LABELS_DIR})")


def published_file(source: DatasetSource, timeout: float = 60.0) -> Published:
    """Ask the record API for the archive's address, size and checksum."""
    try:
        with urllib.request.urlopen(urllib.request.Request(source.record_api, headers={
                "Accept": "application/json"}), timeout=timeout) as r:
            record = parse_json(r.read())  # strict, depth-limited: a record is input like any other
    except (OSError, ValueError, http.client.HTTPException) as err:
        raise NucsegError(f"could not read the dataset record {source.record_api} ({_reason(err)}); it publishes "
                          "the size and checksum the download is checked against") from None

    def malformed(what: str) -> NucsegError:
        return NucsegError(f"the dataset record {source.record_api} is malformed ({what}); it publishes the size and "
                           "checksum the download is checked against")

    if not isinstance(record, dict):
        raise malformed(f"a JSON {type(record).__name__}, not an object")
    files = record.get("files", [])
    if isinstance(files, dict):  # InvenioRDM's native form: {"entries": {key: {...}}}
        entries = files.get("entries", {})
        files = list(entries.values()) if isinstance(entries, dict) else []
    if not isinstance(files, list):
        raise malformed(f"files is a {type(files).__name__}")
    entry = next((f for f in files if isinstance(f, dict) and (f.get("key") or f.get("filename")) == source.filename),
                 None)
    if entry is None:
        raise NucsegError(f"the record {source.record_api} lists no file {source.filename}; the dataset moved?")
    links = entry.get("links") if isinstance(entry.get("links"), dict) else {}
    # a mirror serves the record verbatim: its links point to Zenodo, the archive is beside the record
    url = source.url if source.mirrored else (links.get("self") or links.get("content") or links.get("download")
                                              or source.url)
    if not source.mirrored and (not isinstance(url, str) or not url.startswith(("https://", "http://"))):
        raise malformed(f"the file's address is {url!r}")
    algorithm = digest = None
    if isinstance(entry.get("checksum"), str) and ":" in entry["checksum"]:
        algorithm, digest = entry["checksum"].split(":", 1)
        if algorithm not in hashlib.algorithms_available:
            algorithm = digest = None
    size = entry.get("size") or entry.get("filesize")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise malformed(f"the file's size is {size!r}, not a whole number of bytes")
    return Published(url=url, size=size or None, algorithm=algorithm, digest=digest)


def download(published: Published, archive: Path, progress: ProgressCallback | None = None,
             timeout: float = 60.0) -> Path:
    """Download to ``<archive>.part`` (resuming what is there with HTTP Range) and rename when complete.

    The ``.part`` is resumed only if nucseg started it (:func:`nucseg.io.resumable_file`), never through a
    symbolic link; the archive it becomes is marked as nucseg's download."""
    part = archive.with_name(archive.name + ".part")
    check_output(archive, is_download)  # nothing to replace at the final name (or only our own download)
    with resumable_file(part) as fd:
        have = os.fstat(fd).st_size
        if published.size is not None and have > published.size:
            os.ftruncate(fd, 0)  # more than the whole file: not a prefix of it
            have = 0
        if published.size is None or have < published.size:
            _fetch_rest(published, fd, have, progress, timeout)
        promote_download(part, archive)
    return archive


def _fetch_rest(published: Published, fd: int, have: int, progress: ProgressCallback | None, timeout: float) -> None:
    headers = {"Range": f"bytes={have}-"} if have else {}
    advice = "rerun the same command to resume"
    try:
        response = urllib.request.urlopen(urllib.request.Request(published.url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the part may be whole; verification decides
            return
        raise NucsegError(f"could not download {published.url} ({_reason(err)}); {advice}") from None
    except (OSError, ValueError, http.client.HTTPException) as err:
        raise NucsegError(f"could not reach {published.url} ({_reason(err)}); {advice}") from None
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored the range and sends everything: start over
            os.ftruncate(fd, 0)
        elif have and not str(response.headers.get("Content-Range", "")).startswith(f"bytes {have}-"):
            raise NucsegError(f"{published.url} answered a resume request with another range "
                              f"({response.headers.get('Content-Range')}); delete the .part file and rerun")
        os.lseek(fd, have, os.SEEK_SET)
        total = published.size or (have + int(response.headers.get("Content-Length") or 0))
        done = have
        if progress is not None:
            progress(done, total)
        read = getattr(response, "read1", response.read)  # read1 hands over what arrived before a cut
        while True:
            try:
                chunk = read(_CHUNK)
            except (OSError, http.client.HTTPException) as err:
                raise NucsegError(f"download of {published.url} broke off after {done} bytes ({_reason(err)}); "
                                  f"{advice}") from None
            if not chunk:
                break
            try:
                os.write(fd, chunk)
            except OSError as err:
                raise OutputError(f"cannot write the download: {err.strerror or err}") from None
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        os.fsync(fd)
    if published.size is not None and done < published.size:
        raise NucsegError(f"download of {published.url} stopped at {done} of {published.size} bytes; {advice}")


def verify_archive(archive: Path, published: Published) -> None:
    """Size and checksum as published, then every member's CRC. A bad archive is removed if nucseg downloaded
    it (rerun to download it again); one the user put there is left as it is, and named."""
    size = archive.stat().st_size

    def bad(msg: str) -> DataError:
        if is_download(archive):
            remove_owned(archive, is_download)
            return DataError(f"{archive.name}: {msg}; it was removed, rerun to download it again")
        return DataError(f"{archive}: {msg}; nucseg did not download this file, so it was left as it is: replace it "
                         "with a good copy, or remove it and rerun to download one")

    if published.size is not None and size != published.size:
        raise bad(f"{size} bytes, the record says {published.size}")
    if published.digest:
        h = hashlib.new(published.algorithm, usedforsecurity=False)
        with open(archive, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        if h.hexdigest() != published.digest.lower():
            raise bad(f"{published.algorithm} {h.hexdigest()}, the record publishes {published.digest}")
    else:
        warnings.warn(f"the record publishes no checksum for {archive.name}; only its size and zip CRCs are checked",
                      stacklevel=2)
    try:
        with zipfile.ZipFile(archive) as zf:
            broken = zf.testzip()
    except zipfile.BadZipFile as err:
        raise bad(f"not a zip archive ({err})") from None
    if broken is not None:
        raise bad(f"member {broken!r} fails its CRC check")


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    reason = getattr(err, "reason", None)
    return str(reason or err) or type(err).__name__

