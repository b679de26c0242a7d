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
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import InputError, OutputError

LABEL_SUFFIXES = (".tif", ".tiff", ".png", ".npy")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_ID_LEN = 12  # hex digits of a temporary's id: ".<name>.tmp-<id><suffix>"
_LOCK = ".lock"  # a temporary folder is guarded by the sibling file ".<name>.tmp-<id>.lock"
_UMASK_LOCK = threading.Lock()


def temp_prefix(path: str | os.PathLike) -> str:
    """The name every temporary of ``path`` starts with (``.<name>.tmp-``)."""
    return f".{Path(path).name}.tmp-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success rename it onto ``path``, on failure remove it.

    The temporary name keeps the final suffix (``.x.geojson.tmp-<id>.geojson``) so writers that look at the
    suffix (gzip, zarr, PIL) behave as for the final name. Leftover temporaries of ``path`` from killed
    writers are removed first. A folder output replaces the previous folder of that name.
    """
    path = Path(path)
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
        raise OutputError(f"cannot write to {parent}: {err.strerror or err}") from None
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
    except BaseException:
        _remove(tmp)
        if old.exists() and not path.exists():
            os.replace(old, path)  # failed after moving the previous output aside: put it back
        raise
    finally:
        if is_dir:
            Path(guard).unlink(missing_ok=True)
        os.close(fd)


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
        groups.setdefault(name[len(prefix) : len(prefix) + _ID_LEN], []).append(parent / name)
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


def writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it can take new files, before any long work starts."""
    path = Path(path)
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


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write strict JSON atomically (NaN -> null), sorted keys and 2-space indent so reruns give identical bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


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


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """Read an instance label map (.tif/.png/.npy) as a 2-D int32 array (0 = background)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"label map not found: {path}")
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
        raise InputError(f"cannot read label map {path}: {err}") from None
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., 0]
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise InputError(f"label map {path} is not 2-D (shape {arr.shape})")
    return arr.astype(np.int32, copy=False)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image as HxWx3 uint8 RGB (alpha dropped, grey expanded)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        from skimage.io import imread

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = np.asarray(imread(path))
    except Exception as err:
        raise InputError(f"cannot read image {path}: {err}") from None
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] < 3:
        raise InputError(f"image {path} is not RGB (shape {img.shape})")
    img = img[..., :3]
    if img.dtype != np.uint8:
        if img.max() <= 1.0 and img.dtype.kind == "f":
            img = img * 255.0
        img = np.clip(img, 0, 255).astype(np.uint8)
    return img
