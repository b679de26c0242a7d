"""File helpers shared by every stage: atomic writes and label-map / image reading.

Every output goes through :func:`atomic_path` so that a killed job never leaves a partial file behind: the
content is written to a temporary name in the same folder and renamed (atomic on POSIX) when complete.

A job killed with SIGKILL cannot remove its temporary, so the next writer of the same output does: every
temporary is held under an exclusive ``flock`` by the process writing it, and a temporary nobody holds is
a leftover of a dead writer. Shards writing other outputs into the same folder are never touched, and a
second live writer of the same output keeps its temporary.

Outputs get the modes the user's umask gives a plain ``open()`` (0644 files, 0755 folders under umask 022),
whatever wrote them: some writers create private files (safetensors' ``save_file`` writes 0600), which
colleagues on shared lab storage could not read. :func:`atomic_path` applies the umask to everything under
the temporary before the rename, so every output benefits.

Ownership: one rule for every path nucseg writes, appends to or deletes
-----------------------------------------------------------------------
An existing path is replaced, appended to or deleted only if nucseg recognises it as its own, of the kind about
to be written, by a *marker nucseg itself wrote*, never by its name (``summary.json``, ``adapter_config.json``,
``NuInsSeg.zip`` or ``*.part`` are names other tools use too). Every writer states what it may replace by an
``owned`` predicate, and only the functions of this module touch the filesystem:

* :func:`atomic_path` (new files and folders, replacing an owned one), :func:`write_json`, :func:`write_text`,
  :func:`save_png`: the temporary is always new; ``owned`` guards what is at the final path.
* :func:`open_append` (the run log), :func:`remove_owned` (deletions), :func:`resumable_file` and
  :func:`promote_download` (resumed downloads), :func:`claim` (a store updated in place: the tile cache),
  :func:`locked` (lock files, never modified).
* :func:`check_output`: the same refusal before long work starts, plus "never an input of the same run".

The markers: none is a name, and none is written by accident by another program.

* Embedded in the format wherever it has room for one, so it travels with the file (a copied output folder
  is still recognised): the ``Software`` tag of PNG/TIFF (``nucseg``), the ``"nucseg"`` foreign member of
  GeoJSON and key of GeoParquet/zarr metadata, nucseg's header row of a CSV, the ``format`` entry of
  safetensors metadata and of an adapter's ``nucseg.json``, the training state key of a training checkpoint; :class:`JsonMark` for JSON bookkeeping files (a
  top-level ``"nucseg_file": "<kind>"``), :class:`TextMark` for Markdown (a last line
  ``<!-- nucseg_file: <kind> -->``, invisible when rendered) and the JSON-lines run log (every line carries
  ``"nucseg_file"``);
* A sidecar ``.<name>.nucseg`` (:func:`mark_download`) for files whose bytes are someone else's and must stay
  exactly so: downloaded archives and checkpoints, and their ``.part``. It records the file's device, inode
  (and, once complete, size and mtime), deliberately binding it to that very file: a user's file later put
  at that name, one written over it, or a copy elsewhere is not taken for nucseg's download.

Temporaries (``.<name>.tmp-<12 hex digits>...``) are the one thing recognised by name: atomic_path creates
them with ``O_EXCL`` under an exclusive ``flock``, and a leftover is removed only when nobody holds its lock.

A symbolic link is never owned (nucseg creates none): writing onto one, appending or resuming through one
(opened with ``O_NOFOLLOW``) and deleting one are all refused (reading through one is fine: inputs may be
links). ``tests/test_ownership_sites.py`` walks the package's syntax tree and fails on any write or delete that
does not go through these functions.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import threading
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .errors import DiskFullError, InputError, OutputError

LABEL_SUFFIXES = (".tif", ".tiff", ".png", ".npy")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_ID_LEN = 12  # hex digits of a temporary's id: ".<name>.tmp-<id><suffix>"
_LOCK = ".lock"  # a temporary folder is guarded by the sibling file ".<name>.tmp-<id>.lock"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_UMASK_LOCK = threading.Lock()


def temp_prefix(path: str | os.PathLike) -> str:
    """The name every temporary of ``path`` starts with (``.<name>.tmp-``)."""
    return f".{Path(path).name}.tmp-"


Owned = Callable[[Path], bool]  # "is this existing path an output nucseg wrote, of the kind about to replace it?"
SOFTWARE = "nucseg"  # the Software tag of the PNG and TIFF files nucseg writes (how it recognises its own)


def new_only(path: Path) -> bool:
    """The ``owned`` of an output that never replaces anything: an existing path is always refused (a file
    inside a folder being built, an official checkpoint, a download's final name)."""
    return False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False, *, owned: Owned) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success rename it onto ``path``, on failure remove it.

    The temporary name keeps the final suffix (``.x.geojson.tmp-<id>.geojson``) so writers that look at the
    suffix (gzip, zarr, PIL) behave as for the final name. Leftover temporaries of ``path`` from killed
    writers are removed first. A folder output replaces the previous folder of that name.
    ``owned``: an existing ``path`` is only replaced if ``owned(path)`` says nucseg wrote it (:func:`new_only`:
    never); :func:`check_output` makes the same check before long work starts, this is the last line of defence.
    """
    path = Path(path)
    _refuse_foreign(path, owned)
    parent = path.parent if str(path.parent) else Path(".")
    token = uuid.uuid4().hex[:_ID_LEN]
    base = parent / f"{temp_prefix(path)}{token}"
    tmp = Path(f"{base}{''.join(path.suffixes[-2:])}")
    guard = Path(f"{base}{_LOCK}") if is_dir else tmp
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd = os.open(guard, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any output
    except OSError as err:
        raise write_error(err, parent, "cannot write to") from None
    old = Path(f"{base}.old")
    try:
        _try_lock(fd)  # where the filesystem cannot lock, leftovers are merely kept, never wrongly removed
        if is_dir:
            tmp.mkdir()
        yield tmp
        apply_umask(tmp)
        if is_dir and path.exists():
            os.replace(path, old)  # folders cannot be renamed over: move the old one aside under our lock
        os.replace(tmp, path)
        _remove(old)
    except BaseException as err:
        _remove(tmp)
        if old.exists() and not path.exists():
            os.replace(old, path)  # failed after moving the previous output aside: put it back
        if is_disk_full(err):
            # After the clean-up, so the free space it names is true. The folder, not the file: the write that
            # failed may be another output's in the same with-block (a full filesystem fails them all).
            raise disk_full_error(err, parent) from None
        raise
    finally:
        if is_dir:
            Path(guard).unlink(missing_ok=True)
        os.close(fd)


def _refuse_foreign(path: Path, owned: Owned) -> None:
    if not os.path.lexists(path):
        return
    if path.is_symlink():
        raise OutputError(f"refusing to replace {path}: it is a symbolic link (nucseg never writes through one); "
                          "remove it or choose another path")
    if not owned(path):
        raise OutputError(f"refusing to replace {path}: it exists and is not an output nucseg wrote; remove it or "
                          f"choose another path")


def check_output(path: str | os.PathLike, owned: Owned, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Before any work: refuse an output that would destroy something nucseg did not make.

    Refused (OutputError, exit 6): ``path`` is one of ``inputs``, lies inside an input folder, or holds an input;
    ``path`` exists and is not nucseg's own output of this kind (``owned``); a folder where a file goes. Then the
    parent folder must accept new files. An existing output of the same kind is replaced (reruns).
    """
    path = check_not_input(path, inputs)
    _refuse_foreign(path, owned)
    writable_dir(path.parent if str(path.parent) else Path("."), create=False)
    return path


def check_not_input(path: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> Path:
    """OutputError if output ``path`` is an input, lies inside an input folder, or holds an input."""
    path = Path(path)
    target = path.resolve()
    for inp in inputs:
        src = Path(inp).resolve()
        if target == src or src in target.parents or target in src.parents:
            raise OutputError(f"output {path} would overwrite or mix with the input {inp}; choose another output path")
    return path


def is_nucseg_png(path: Path) -> bool:
    """A PNG whose Software text chunk says nucseg wrote it (see :func:`save_png`)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.format == "PNG" and str(getattr(im, "text", {}).get("Software", "")).startswith(SOFTWARE)
    except Exception:
        return False


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an RGB/grey uint8 image as PNG atomically, tagged ``Software: nucseg`` so reruns may replace it and
    nothing else is ever replaced."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", SOFTWARE)
    with atomic_path(path, owned=is_nucseg_png) as tmp:
        Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format="PNG", pnginfo=info)


def is_nucseg_tiff(path: Path) -> bool:
    """A TIFF whose Software tag says nucseg wrote it (label maps of ``nucseg segment``)."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            tag = tf.pages[0].tags.get(305)
            return tag is not None and str(tag.value).startswith(SOFTWARE)
    except Exception:
        return False


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` alone must set it)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # set-and-restore is process-wide: serialise it against our other threads
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything in it) the permission bits a plain ``open()``/``mkdir()``
    would have under the current umask. Only for paths this program just created (a temporary of
    :func:`atomic_path`): writers that create private files (safetensors writes 0600) then follow the umask
    like every other output. Executable files stay executable; symbolic links are left alone.
    """
    mask = current_umask()
    fmode, xmode = 0o666 & ~mask, 0o777 & ~mask

    def fix(p: str, st: os.stat_result) -> None:
        if stat.S_ISLNK(st.st_mode):
            return
        want = xmode if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111 else fmode
        if stat.S_IMODE(st.st_mode) != want:
            os.chmod(p, want)

    path = os.fspath(path)
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return  # the caller wrote nothing (atomic_path's rename then reports it)
    fix(path, top)
    if stat.S_ISDIR(top.st_mode):
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                p = os.path.join(root, name)
                fix(p, os.lstat(p))


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``path`` whose writer is gone (their lock is free); returns what was removed."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    prefix = temp_prefix(path)
    groups: dict[str, list[Path]] = {}
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except FileNotFoundError:
        return []
    for name in names:
        token = name[len(prefix) : len(prefix) + _ID_LEN]
        if len(token) == _ID_LEN and all(c in "0123456789abcdef" for c in token):  # exactly what atomic_path names
            groups.setdefault(token, []).append(parent / name)
    removed: list[Path] = []
    for token, entries in groups.items():
        base = f"{prefix}{token}"
        guard = next((e for e in entries if e.name == base + _LOCK), None)
        if guard is None:
            guard = next((e for e in entries if e.is_file() and not e.is_symlink()), None)
        fd = None
        if guard is not None:
            try:
                fd = os.open(guard, os.O_RDWR)
            except FileNotFoundError:
                continue  # its writer just finished
            if not _try_lock(fd):
                os.close(fd)
                continue  # a live writer holds it (or locking is unsupported here: leave it alone)
        try:
            for e in sorted(entries, key=lambda e: e == guard):  # the guard goes last
                _remove(e)
                removed.append(e)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def _try_lock(fd: int) -> bool:
    """Exclusive, non-blocking flock; False when another process holds it or the filesystem cannot lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.ENOLCK, errno.EOPNOTSUPP,
                             errno.EBADF, errno.EINVAL):
            raise
        return False


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def is_disk_full(err: BaseException) -> bool:
    """An OSError saying the filesystem is full or the user's quota is exhausted."""
    return isinstance(err, OSError) and err.errno in DISK_FULL


def disk_full_error(err: OSError, path: str | os.PathLike) -> DiskFullError:
    """The one-line error for a full filesystem while writing to ``path`` (a file or the folder it is in), with
    the free space there where it can tell."""
    reason = "disk quota exceeded" if err.errno == errno.EDQUOT else "no space left on device"
    return DiskFullError(f"{reason} while writing to {path}{_free_space(path)}; free some space or write elsewhere")


def write_error(err: OSError, path: str | os.PathLike, doing: str = "cannot write") -> OutputError:
    """The one-line error of a failed filesystem call while writing ``path``: :func:`disk_full_error` for a full
    filesystem or quota, else ``OutputError("{doing} {path}: {reason}")``. Raise it ``from None``."""
    if is_disk_full(err):
        return disk_full_error(err, path)
    return OutputError(f"{doing} {path}: {err.strerror or err}")


def _free_space(path: str | os.PathLike) -> str:
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return ""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            break
        free /= 1024
    return f" ({free:.0f} {unit} free there)" if unit == "bytes" else f" ({free:.1f} {unit} free there)"


def writable_dir(path: str | os.PathLike, create: bool = True) -> Path:
    """Create ``path`` if needed and prove it can take new files, before any long work starts.

    ``create=False`` proves the same without creating anything: the nearest existing folder on the way must take
    new files (the folders are made when the output is written, so a run that fails leaves no empty folders).
    """
    path = Path(path)
    if not create:
        existing = path
        while not os.path.lexists(existing) and existing != existing.parent:
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            raise OutputError(f"cannot write to {path}: {existing} is not a folder")
        path = existing
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".nucseg-probe-{uuid.uuid4().hex[:_ID_LEN]}"
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as err:
        raise OutputError(f"cannot write to {path}: {err.strerror or err}") from None
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte pieces so multi-GB checkpoints never sit in memory.

    It identifies checkpoints (official or not) and adapter weights.
    """
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def write_json(path: str | os.PathLike, obj: Any, owned: Owned) -> None:
    """Write strict JSON atomically (NaN -> null), sorted keys and 2-space indent so reruns give identical bytes.

    ``owned``: what an existing ``path`` must be to be replaced; a :class:`JsonMark` also stamps ``obj`` with it.
    """
    if isinstance(owned, JsonMark):
        obj = owned.stamp(obj)
    with atomic_path(path, owned=owned) as tmp:
        tmp.write_text(json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_text(path: str | os.PathLike, text: str, owned: Owned) -> None:
    """Write UTF-8 text atomically; a :class:`TextMark` appends its marker line."""
    if isinstance(owned, TextMark):
        text = owned.stamp(text)
    with atomic_path(path, owned=owned) as tmp:
        tmp.write_text(text, encoding="utf-8")


MARK_KEY = "nucseg_file"  # the top-level key of a JSON file (or JSON line) that says nucseg wrote it, and as what
_MARK_READ_LIMIT = 64 << 20  # a "summary.json" of 10 GB is not ours: never parse it to find out


@dataclass(frozen=True)
class JsonMark:
    """Marker of a JSON bookkeeping file nucseg writes: a top-level ``"nucseg_file": kind``.

    A key, not a file name: ``summary.json`` or ``run-summary.json`` are names other tools write too, the key
    is nucseg's alone. As an ``owned`` predicate it recognises exactly the files stamped with this kind.
    """

    kind: str

    def stamp(self, obj: Any) -> dict:
        if not isinstance(obj, dict):
            raise TypeError(f"a {self.kind} JSON file must be an object to carry its marker")
        return {**obj, MARK_KEY: self.kind}

    def __call__(self, path: Path) -> bool:
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_size > _MARK_READ_LIMIT:
                return False
            with open(path, "rb") as fh:
                obj = json.loads(fh.read())
            return isinstance(obj, dict) and obj.get(MARK_KEY) == self.kind
        except (OSError, ValueError, RecursionError):
            return False

    def line(self, record: dict) -> dict:
        """One JSON-lines record carrying the marker (every line of the run log does)."""
        return {**record, MARK_KEY: self.kind}

    def first_line(self, path: Path) -> bool:
        """An ``owned`` predicate for a JSON-lines file: its first line carries this marker."""
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return False
            with open(path, "rb") as fh:
                head = fh.readline(1 << 20)
            obj = json.loads(head)
            return isinstance(obj, dict) and obj.get(MARK_KEY) == self.kind
        except (OSError, ValueError, RecursionError):
            return False


@dataclass(frozen=True)
class TextMark:
    """Marker of a Markdown file nucseg writes: the last line ``<!-- nucseg_file: kind -->`` (an HTML
    comment, so it does not show when the file is rendered)."""

    kind: str

    @property
    def _line(self) -> str:
        return f"<!-- {MARK_KEY}: {self.kind} -->\n"

    def stamp(self, text: str) -> str:
        return text + ("" if text.endswith("\n") else "\n") + self._line

    def strip(self, text: str) -> str:
        """The text without its marker line (what to show people)."""
        return text[: -len(self._line)] if text.endswith(self._line) else text

    def __call__(self, path: Path) -> bool:
        want = self._line.encode()
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_size < len(want):
                return False
            with open(path, "rb") as fh:
                fh.seek(-len(want), os.SEEK_END)
                return fh.read() == want
        except OSError:
            return False


# ------------------------------------------------------------------------------ appends, deletions, downloads
def claim(path: str | os.PathLike, owned: Owned, refusal: Callable[[], Exception] | None = None) -> Path:
    """``path``, for a store nucseg updates in place (the tile cache): absent, or ``owned`` and no symbolic link.
    Otherwise ``refusal()`` (default: the OutputError of any foreign output) is raised and nothing is touched."""
    path = Path(path)
    if os.path.lexists(path) and (path.is_symlink() or not owned(path)):
        if refusal is not None:
            raise refusal()
        _refuse_foreign(path, owned)
    return path


def open_append(path: str | os.PathLike, owned: Owned):
    """A text handle appending to ``path``: created if missing, else only if ``owned(path)``; never through a
    symbolic link (``O_NOFOLLOW``)."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, flags | os.O_EXCL, 0o666)
        except FileExistsError:
            _refuse_foreign(path, owned)
            fd = os.open(path, flags & ~os.O_CREAT)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OutputError(f"refusing to append to {path}: it is a symbolic link nucseg did not make") from None
        raise write_error(err, path, "cannot write to") from None
    return os.fdopen(fd, "a", encoding="utf-8")


def remove_owned(path: str | os.PathLike, owned: Owned) -> bool:
    """Delete ``path`` (a file or folder) only if ``owned(path)``; False if it is not there. A path that is not
    nucseg's (a symbolic link never is) raises OutputError and stays. Its download marker goes with it."""
    path = Path(path)
    if not os.path.lexists(path):
        return False
    if path.is_symlink() or not owned(path):
        raise OutputError(f"refusing to delete {path}: it is not something nucseg wrote")
    try:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError as err:
        raise OutputError(f"cannot remove {path}: {err.strerror or err}") from None
    _sidecar(path).unlink(missing_ok=True)
    return True


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.nucseg")


_DOWNLOAD = JsonMark("download")


def mark_download(path: str | os.PathLike, complete: bool = True) -> None:
    """Record that nucseg downloaded ``path`` (a file whose bytes are another publisher's, so it cannot carry
    an embedded marker): a sidecar ``.<name>.nucseg`` with the file's device and inode, and, once complete,
    its size and mtime. :func:`is_download` then knows this very file, and no other put at its name, is ours."""
    path = Path(path)
    st = os.lstat(path)
    ident = {"name": path.name, "dev": st.st_dev, "ino": st.st_ino}
    if complete:
        ident.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    write_json(_sidecar(path), ident, _DOWNLOAD)


def is_download(path: str | os.PathLike) -> bool:
    """``path`` is a regular file (not a link) that nucseg downloaded and nobody changed or swapped since."""
    path = Path(path)
    try:
        st = os.lstat(path)
        side = _sidecar(path)
        if not stat.S_ISREG(st.st_mode) or not _DOWNLOAD(side):
            return False
        ident = json.loads(side.read_bytes())
    except (OSError, ValueError):
        return False
    if ident.get("name") != path.name or (ident.get("dev"), ident.get("ino")) != (st.st_dev, st.st_ino):
        return False
    return "size" not in ident or (ident["size"], ident.get("mtime_ns")) == (st.st_size, st.st_mtime_ns)


def _unmark(path: Path) -> None:
    side = _sidecar(path)
    if _DOWNLOAD(side):
        side.unlink(missing_ok=True)


@contextlib.contextmanager
def resumable_file(part: str | os.PathLike) -> Iterator[int]:
    """A read-write descriptor of a download's partial file, locked against a second downloader.

    A new ``part`` is created (``O_EXCL``) and marked as nucseg's (:func:`mark_download`, incomplete); an
    existing one is resumed only if it is that same file. Never through a symbolic link (``O_NOFOLLOW``): a
    ``NuInsSeg.zip.part`` pointing elsewhere (or a browser's own ``.part``) is refused, untouched.
    """
    part = Path(part)
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd = os.open(part, flags | os.O_CREAT | os.O_EXCL, 0o666)
            created = True
        except FileExistsError:
            if part.is_symlink() or not is_download(part):
                raise OutputError(f"refusing to resume into {part}: it exists and is not a download nucseg started; "
                                  "remove it or choose another folder") from None
            fd = os.open(part, flags)
            created = False
    except OSError as err:
        raise write_error(err, part) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:  # held by another downloader; a filesystem without locks is used unlocked
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputError(f"another nucseg is downloading {part}; wait for it") from None
        if created:
            mark_download(part, complete=False)
        yield fd
    finally:
        os.close(fd)


def promote_download(part: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename a finished :func:`resumable_file` onto ``final`` (which must not exist, or be an earlier download
    of nucseg's) and mark it complete."""
    part, final = Path(part), Path(final)
    _refuse_foreign(final, is_download)
    if not is_download(part):
        raise OutputError(f"refusing to rename {part}: it is not a download nucseg started")
    os.replace(part, final)
    mark_download(final)
    _unmark(part)
    return final


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive flock on the lock file ``path`` for the duration (created empty if missing, never written, never
    through a symbolic link); a no-op where the filesystem cannot lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as err:
        raise write_error(err, path, "cannot create the lock file") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks: single-process use is still safe
            pass
        yield
    finally:
        os.close(fd)  # closing releases the lock


def json_safe(obj: Any) -> Any:
    """Plain JSON types only: numpy scalars/arrays and paths converted, NaN and infinities become None."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


MAX_JSON_DEPTH = 64  # nesting of arrays/objects: GeoJSON needs 5, nucseg.json 4; deeper is not a file we read


def parse_json(raw: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON, as every JSON nucseg reads from a user or a server is parsed (GeoJSON, ``--roi``,
    ``nucseg.json``/``method.json``, records, training-state metadata).

    ValueError (a one-line reason) for anything else: NaN, Infinity and numbers that overflow to infinity
    (Python's json accepts them; they would reach GEOS or a config as non-numbers), invalid UTF-8, and nesting
    deeper than ``max_depth`` (Python's json would raise RecursionError, and so would later walks of such a
    value). orjson parses without recursing in Python and stops at 1024 levels itself; the depth is then
    checked by an explicit stack. A UTF-8 byte-order mark is allowed (Windows editors write one).
    """
    import orjson

    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        msg = str(err)
        if "depth limit" in msg or "recursion" in msg:
            raise ValueError(f"JSON nested more than {max_depth} levels deep") from None
        hint = "; NaN and Infinity are not JSON numbers" if "infinity" in msg or "expected a JSON value" in msg else ""
        raise ValueError(f"not valid JSON ({' '.join(msg.split())[:160]}{hint})") from None
    stack = [(doc, 1)] if type(doc) is dict or type(doc) is list else []
    while stack:
        obj, depth = stack.pop()
        for child in (obj.values() if type(obj) is dict else obj):
            if type(child) is dict or type(child) is list:
                if depth >= max_depth:
                    raise ValueError(f"JSON nested more than {max_depth} levels deep")
                stack.append((child, depth + 1))
    return doc


def read_json(path: str | os.PathLike, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """:func:`parse_json` of a file; OSError as ``open`` raises it, ValueError for content that is not strict
    JSON (the caller turns it into its one-line error, which names the file)."""
    with open(path, "rb") as fh:
        raw = fh.read()
    return parse_json(raw, max_depth)


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """Read an instance label map (.tif/.png/.npy) as a 2-D int32 array (0 = background).

    Only what is unambiguously a map of integer ids is accepted: float maps whose every value is a whole
    number, and colour images whose channels are all equal (a grey map saved as RGB). A colour-coded map, or
    float values such as 0.4 or 1.6, would have to be guessed at (truncation merges and drops nuclei), so they
    are refused; so are ids beyond int32, which everything downstream uses.
    """
    path = Path(path)
    arr = _read_array(path, "label map")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise InputError(f"label map {path} is a colour image (its R, G and B differ): instance ids must be "
                             "one channel (a colour-coded map cannot be read as ids)")
        arr = rgb[..., 0]
    arr = _squeeze_2d(arr)
    if arr.ndim != 2:
        raise InputError(f"label map {path} is not 2-D (shape {arr.shape})")
    return _as_ids(arr, path)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a binary mask (e.g. NuInsSeg's ambiguous areas) as a 2-D bool array: any non-zero channel is set."""
    path = Path(path)
    arr = _read_array(path, "mask")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].any(axis=-1)
    arr = _squeeze_2d(arr)
    if arr.ndim != 2:
        raise InputError(f"mask {path} is not 2-D (shape {arr.shape})")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"mask {path} has NaN or infinite values")
    return arr != 0


def _squeeze_2d(arr: np.ndarray) -> np.ndarray:
    """Drop axes of length 1 beyond the two of an image: (1, h, w) and (h, w, 1) become (h, w), and a 1x1 image
    stays 1x1 (``np.squeeze`` would make it a scalar)."""
    while arr.ndim > 2 and 1 in arr.shape:
        arr = arr.squeeze(axis=arr.shape.index(1))
    return arr


def max_image_pixels() -> int:
    """The most pixels nucseg decodes from one image file: Pillow's decompression-bomb limit (twice
    ``PIL.Image.MAX_IMAGE_PIXELS``, 178,956,970 by default), which every PNG/JPEG read meets already. TIFF and
    .npy files are held to the same limit from their headers, before anything is decoded."""
    from PIL import Image

    return 2 * int(Image.MAX_IMAGE_PIXELS or 89_478_485)


def check_image_size(path: str | os.PathLike, what: str = "image") -> None:
    """InputError if ``path`` holds more than :func:`max_image_pixels` pixels, read from its header only (a
    1 MB compressed TIFF can ask for gigabytes). Files whose header cannot be read are left to the decoder."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                shape = tuple(tf.series[0].shape) if tf.series else ()
        elif suffix == ".npy":
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        else:
            from PIL import Image

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as im:
                    shape = (im.size[1], im.size[0])
    except Exception as err:
        if type(err).__name__ == "DecompressionBombError":
            shape = (max_image_pixels() + 1,)
        else:
            return
    if len(shape) > 2 and shape[-1] in (3, 4):
        shape = shape[:-1]  # colour samples of one pixel
    pixels = int(np.prod(shape, dtype=np.float64)) if shape else 0
    if pixels > max_image_pixels():
        size = "x".join(str(n) for n in shape[::-1]) if len(shape) >= 2 else f"{pixels:,} pixels"
        raise InputError(f"{what} {path} is {size} pixels ({pixels:,}), more than the {max_image_pixels():,} nucseg "
                         "decodes from one image file (Pillow's decompression-bomb limit); save it smaller")


def _read_array(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    check_image_size(path, what)
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from skimage.io import imread

            with warnings.catch_warnings():  # imageio's plugin chatter about a bad file is not for users
                warnings.simplefilter("ignore")
                arr = imread(path)
    except Exception as err:  # any decoder failure is a bad file, not a bug
        raise InputError(f"cannot read {what} {path}: {_one_line(err)}") from None
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{what} {path} holds {arr.dtype} values, not numbers")
    return arr


def _as_ids(arr: np.ndarray, path: Path) -> np.ndarray:
    """int32 ids from any numeric 2-D map, refusing what cannot be converted exactly."""
    limit = np.iinfo(np.int32).max
    if arr.dtype.kind == "b":
        return arr.astype(np.int32)
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            raise InputError(f"label map {path} has NaN or infinite values; instance ids must be whole numbers")
        frac = arr != np.round(arr)
        if frac.any():
            raise InputError(f"label map {path} has non-integer values (e.g. {arr[frac].flat[0]:g}); instance ids "
                             "must be whole numbers (rounding or truncating would merge or drop nuclei)")
    if arr.size and (arr.max() > limit or arr.min() < -limit):
        raise InputError(f"label map {path} has instance ids up to {arr.max():.0f}, more than the {limit:,} "
                         "nucseg handles; renumber them 1..n (skimage.segmentation.relabel_sequential)")
    return arr.astype(np.int32, copy=False)


_WARNED_DEPTH: set[str] = set()


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image as HxWx3 uint8 RGB (alpha dropped, grey expanded).

    Deeper integer images (16-bit TIFF/PNG) are scaled to 8 bits by their dtype's range, with one warning per
    dtype (clipping would turn them white); float images must lie in [0, 1] (anything else is ambiguous).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    check_image_size(path, "image")
    try:
        from skimage.io import imread

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = np.asarray(imread(path))
    except Exception as err:
        raise InputError(f"cannot read image {path}: {_one_line(err)}") from None
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] < 3:
        raise InputError(f"image {path} is not RGB (shape {img.shape})")
    img = img[..., :3]
    return _to_uint8(img, path)


def _to_uint8(img: np.ndarray, path: Path) -> np.ndarray:
    kind = img.dtype.kind
    if img.dtype == np.uint8:
        return img
    if kind == "b":
        return img.astype(np.uint8) * 255
    if kind == "u":
        top = np.iinfo(img.dtype).max
        if str(img.dtype) not in _WARNED_DEPTH:
            _WARNED_DEPTH.add(str(img.dtype))
            warnings.warn(f"{path} is a {img.dtype.itemsize * 8}-bit image: scaled to 8 bits (0-{top} -> 0-255); "
                          "other images of this depth are scaled alike", UserWarning, stacklevel=3)
        return np.rint(img.astype(np.float64) * (255.0 / top)).astype(np.uint8)
    if kind == "i":
        if img.size and (img.min() < 0 or img.max() > 255):
            raise InputError(f"image {path} has signed {img.dtype} values in [{img.min()}, {img.max()}]; save it "
                             "as 8- or 16-bit unsigned RGB")
        return img.astype(np.uint8)
    if kind == "f":
        if img.size and not (np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0):
            raise InputError(f"image {path} has float values outside [0, 1] (min {np.nanmin(img):g}, max "
                             f"{np.nanmax(img):g}); save it as 8- or 16-bit RGB, or scale it to [0, 1]")
        return np.rint(img.astype(np.float64) * 255.0).astype(np.uint8)
    raise InputError(f"image {path} holds {img.dtype} values, not an RGB image")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
