"""File helpers shared by every stage: atomic writes and label-map / image reading.

Every output goes through :func:`atomic_path` so that a killed job never leaves a partial file behind: the
content is written to a temporary name in the same folder and renamed (atomic on POSIX) when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import InputError, OutputError

LABEL_SUFFIXES = (".tif", ".tiff", ".png", ".npy")
_UMASK = os.umask(0o022)
os.umask(_UMASK)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success rename it onto ``path``, on failure remove it.

    The temporary name keeps the final suffix (``.x.tmp-123.geojson``) so writers that look at the suffix
    (gzip, zarr, PIL) behave as for the final name.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=".nucseg-probe-", delete=True)
        probe.close()
    except OSError as err:
        raise OutputError(f"cannot write to {parent}: {err.strerror or err}") from None
    fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.tmp-", suffix="".join(path.suffixes[-2:]))
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs on shared storage must be readable
    if is_dir:
        tmp.unlink()
        tmp.mkdir()
    try:
        yield tmp
        if is_dir and path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


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
