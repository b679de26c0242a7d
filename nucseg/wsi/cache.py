"""The zarr resume cache of a slide run: tiles read and predictions made, so reruns resume.

Cache (one zarr v3 group per slide + target µm/px + geometry + tissue settings, under ``work_dir``)::

    <stem>-<key16>.zarr/            attrs: key (the JSON the name hashes), slide path
      coords       (n, 2) int64     tile origins (x, y) in target pixels, in processing order
      tiles        (n, T, T, 3) u8  RGB tiles, chunk = CHUNK_TILES tiles (file ``tiles/c.<i>.0.0.0``: flat keys)
      tiles_done   (n,) uint64      0: tile i not read yet; else its checksum (it was written completely),
                                    chunk = FLAG_CHUNK tiles
      pred/<model16>/               attrs: model (the fingerprint string)
        labels     (n, T, T) int32  raw per-tile instance labels, chunk = CHUNK_TILES tiles
        scores     (n, K) float32   scores[i, k-1] = score of label k (NaN past n_inst[i]), chunk = CHUNK_TILES
        n_inst     (n,) int32       chunk = FLAG_CHUNK tiles
        done       (n,) uint64      0: prediction i not made yet; else the checksums of its labels (high 32
                                    bits) and scores (low 32), chunk = FLAG_CHUNK tiles

Flags are written after the data they describe (zarr's local store writes each chunk atomically), so a
killed run leaves at worst un-flagged work that is redone.

Flags are checksums (CRC-32C, :func:`tile_sums` / :func:`pred_sums`) of the data they flag, salted with the
cache key, the model and the tile's position, and every read of a done tile verifies them: a chunk that
decodes but holds other values (swapped with another chunk or another cache's, a deleted chunk file that
reads as the fill value, a tampered ``zarr.json``) is damaged like one that does not decode. Each array's
metadata (shape, chunks, dtype, fill value, codecs, chunk names) is compared with the layout when the cache is
opened; a changed one is damaged metadata (its group is rebuilt).

Damage is repaired, never fatal: a chunk that fails to decode (a truncated or overwritten file) only costs
the work it held. A damaged flag or ``n_inst`` chunk counts as "none of its tiles done" (and is rewritten when
they are), a damaged tile is read from the slide again, and a damaged prediction raises
:class:`CacheDamaged` with its tiles after marking them not done, so the caller recomputes them. A warning
says so once per cache. The cache only ever deletes a store it recognises as its own (a zarr v3 group with a
cache key, or one it left half-created); anything else at its path is an OutputError.

Several processes may fill one cache at once if each owns whole flag chunks (tile ranges aligned to
``FLAG_CHUNK``): tiles and predictions are chunked by ``CHUNK_TILES`` tiles (which divides ``FLAG_CHUNK``), and
a process only ever writes the flag chunks of the tiles it fills, from its own copy. ``nucseg.wsi.distributed`` spreads the tiles of a large slide over
workers that way. Flags are chunked by ``FLAG_CHUNK`` rather than per tile because zarr reads ~0.2 ms per
chunk: per-tile flags would cost seconds to open a 20,000-tile slide. Creating the group and a model's
prediction group happens under an exclusive ``flock`` on ``<cache>.lock`` beside it, so two processes
opening a new cache do not both create it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError, OutputError

CACHE_VERSION = 5  # 2: flags chunked by FLAG_CHUNK (concurrent writers of aligned tile ranges); 3: flat chunk keys;
# 4: tiles and predictions chunked by CHUNK_TILES tiles; 5: flags are checksums, slides keyed by content
# (an older cache's key differs: it is rebuilt, never read)
FLAG_CHUNK = 64
# A pass over the tiles (``defer=True``) writes its flag chunks with the first batch written FLAG_FLUSH_S
# seconds after the last flag write, and when it ends or fails, not after every batch: each zarr call costs
# ~10 ms of GIL-bound event-loop work in a busy process, and the three flag writes per batch were half the calls
# of the host path. Flags still follow their data, so a SIGKILL loses at most the work of the last FLAG_FLUSH_S
# seconds plus one batch (redone on the rerun), never correctness.
FLAG_FLUSH_S = 1.0
# Tiles and predictions (labels, scores) are chunked by a batch of tiles, not one tile: zarr's cost per chunk
# written (its event loop, thread hops, a file) is paid in the GIL the export thread needs, and with one chunk
# per tile and array it was the largest cost of the host path (bench_host: 0.5 s of CPU of 2.6 on the bench
# slide), and 8x the files on a cluster file system. A write that covers part of a chunk merges it with the
# chunk's done tiles (read back from disk) and fills the others.
CHUNK_TILES = 8
assert FLAG_CHUNK % CHUNK_TILES == 0  # a FLAG_CHUNK-aligned tile range owns whole tile and prediction chunks
# Chunk files named ``c.<i>.0.0.0`` in the array's own folder, not zarr's default nested ``c/<i>/0/0/0``: the
# local store creates a chunk's parent folders on every write, and three new folders per tile and array cost
# more CPU than compressing the tile (measured: 4.8 -> 3.0 ms of CPU per tile for tiles + labels).
_KEYS = {"name": "default", "separator": "."}


def cache_key(**fields) -> tuple[dict, str]:
    """The JSON-able key and its 16-hex-digit hash (stable: sorted keys, floats rounded)."""
    norm = {k: (round(v, 9) if isinstance(v, float) else v) for k, v in fields.items()}
    norm["cache_version"] = CACHE_VERSION
    digest = hashlib.sha256(json.dumps(norm, sort_keys=True).encode()).hexdigest()[:16]
    return norm, digest


class ChecksumMismatch(ValueError):
    """Rows of a chunk that decoded to other values than their flags' checksums say were written: handled
    exactly like a chunk that fails to decode (see :func:`_decode_failed`)."""


def _salt(*parts: str) -> bytes:
    """What binds a checksum to one cache (its key), model and kind of data: 16 bytes."""
    return hashlib.sha256("\0".join(parts).encode()).digest()[:16]


def _crc(salt: bytes, i: int, *data: np.ndarray) -> int:
    """CRC-32C of ``salt``, position i (4 bytes: any swap of two positions changes it) and the arrays' bytes."""
    import google_crc32c

    crc = google_crc32c.value(salt + int(i).to_bytes(4, "little"))
    for d in data:
        crc = google_crc32c.extend(crc, np.ascontiguousarray(d).tobytes())
    return crc


def tile_sums(salt: bytes, indices: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    """The flag values (uint64, never 0) of RGB tiles at cache ``indices``."""
    return np.asarray([(_crc(salt, i, t) << 32) | 1 for i, t in zip(np.asarray(indices).tolist(), tiles)],
                      dtype=np.uint64)


def pred_sums(salt: bytes, indices: np.ndarray, labels: np.ndarray, scores: np.ndarray,
              n_inst: np.ndarray) -> np.ndarray:
    """The flag values (uint64, never 0) of predictions: labels (with n_inst) high, scores (full rows) low."""
    return np.asarray([(_crc(salt, i, np.int32(n), lab) << 32) | _crc(salt, i, sc) | 1 for i, lab, sc, n in
                       zip(np.asarray(indices).tolist(), labels, scores, np.asarray(n_inst).tolist())],
                      dtype=np.uint64)


def _verify(what: str, start: int, rows: np.ndarray, sums: np.ndarray, part, check) -> None:
    """Raise ChecksumMismatch unless ``check(i, row) == part(sums[k])`` for every row k with a nonzero flag
    (rows[k] is cache tile start + k; a zero flag means not done, whatever the row holds)."""
    bad = [start + k for k, (row, flag) in enumerate(zip(rows, np.asarray(sums, np.uint64).tolist()))
           if flag and check(start + k, row) != part(flag)]
    if bad:
        raise ChecksumMismatch(f"{what} of tiles {bad[:5]} do not match their checksums")


def check_tiles(salt: bytes, start: int, rows: np.ndarray, sums: np.ndarray) -> None:
    """Verify RGB tiles ``rows`` (cache tiles start, start + 1, ...) against their flags ``sums``."""
    _verify("tiles", start, rows, sums, lambda f: f >> 32, lambda i, row: _crc(salt, i, row))


def check_labels(salt: bytes, start: int, rows: np.ndarray, sums: np.ndarray, n_inst: np.ndarray) -> None:
    """Verify label rows against their prediction flags ``sums`` (and instance counts ``n_inst``)."""
    _verify("labels", start, rows, sums, lambda f: f >> 32,
            lambda i, row: _crc(salt, i, np.int32(n_inst[i - start]), row))


def check_scores(salt: bytes, start: int, rows: np.ndarray, sums: np.ndarray) -> None:
    """Verify full score rows against their prediction flags ``sums``."""
    _verify("scores", start, rows, sums, lambda f: f & 0xFFFFFFFF, lambda i, row: _crc(salt, i, row) | 1)


class CacheDamaged(Exception):
    """Cached predictions of ``tiles`` failed to decode; they are marked not done and must be recomputed."""

    def __init__(self, root: Path, tiles: list[int]):
        super().__init__(f"tile cache {root}: damaged predictions of tiles {tiles}")
        self.root = root
        self.tiles = tiles
        self.work = (0, 0)  # (tiles read, tiles predicted) by the pass it ended, so the summary still counts them


_GROUP_CHILDREN = {"zarr.json", "coords", "tiles", "tiles_done", "pred"}


def is_nucseg_cache(root: Path) -> bool:
    """Whether ``root`` is (recognisably) a cache this module made, so that replacing it destroys nothing else.

    True for an empty folder, a zarr v3 group whose attrs carry a cache key, and a group killed while being
    created (no key yet, nothing but the cache's own members); False for anything else, e.g. a user's
    folder or file that happens to sit at the cache's path.
    """
    if root.is_symlink() or not root.is_dir():
        return False
    names = set(os.listdir(root))
    if not names:
        return True
    try:
        from ..io import read_json

        meta = read_json(root / "zarr.json")  # strict and depth-limited: a user's folder may sit here
        key = meta.get("attributes", {}).get("key")
        if meta.get("zarr_format") == 3 and meta.get("node_type") == "group" and isinstance(key, dict) \
                and "cache_version" in key:
            return True
    except (OSError, ValueError, AttributeError):
        pass
    return names <= _GROUP_CHILDREN  # half-created or with damaged metadata: only our own members


def _decode_failed(err: BaseException) -> bool:
    """A chunk read that failed because the stored bytes are damaged (zarr/codec errors), not for lack of memory."""
    return isinstance(err, Exception) and not isinstance(err, (MemoryError, OutputError))


@contextlib.contextmanager
def _disk_full_is_output_error(root: Path):
    """ENOSPC/EDQUOT while writing the cache becomes the one-line DiskFullError (exit 6)."""
    from ..io import disk_full_error, is_disk_full

    try:
        yield
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(err, root) from None
        raise


def _locked(path: Path):
    """Exclusive flock on ``path`` (created if missing, never written) for the duration (:func:`nucseg.io.locked`)."""
    from ..io import locked

    return locked(path)


class TileCache:
    """Tiles and per-tile predictions of one slide in a zarr v3 group (see module docstring for layout)."""

    def __init__(self, root: Path, key: dict, coords: np.ndarray, tile_size: int, model: str, max_instances: int,
                 create: bool = True):
        """``create=False``: the cache and the model's prediction group must already exist and match (a
        process filling one range of a shared cache must never rebuild it under the others)."""
        self.root = Path(root)
        self.tile_size = int(tile_size)
        self.max_instances = int(max_instances)
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.n = len(coords)
        self.coords = coords
        self.damaged: set[str] = set()  # what was found damaged (chunk names), for the one warning
        # the last chunk of tiles / labels decoded, for readers going tile by tile (cached tiles of a batch, the
        # labels output); every write bumps the generation once it is on disk, so a chunk read before is not kept
        self._memos = threading.local()  # per thread (reader, export): .memo = {name: (generation, chunk, rows)}
        self._generation = {"tiles": 0, "labels": 0}
        self._memo_lock = threading.Lock()
        # flag chunks set in memory (their data on disk) but not yet written, per kind; see FLAG_FLUSH_S
        self._unflushed: dict[str, set[int]] = {"tiles": set(), "pred": set()}
        self._flushed_at = {"tiles": time.monotonic(), "pred": time.monotonic()}
        self._flag_lock = threading.Lock()
        keyed = json.dumps(key, sort_keys=True)
        self.tile_salt, self.pred_salt = _salt("tiles", keyed), _salt("pred", keyed, model)
        with _disk_full_is_output_error(self.root), _locked(self.root.with_name(self.root.name + ".lock")):
            self.group = self._open_group(key, coords, create)
            self.pred = self._open_pred(model, create)
        # Array handles opened once (each group lookup reads metadata from disk); chunks are written without
        # first comparing them with the fill value (a full pass over every tile).
        fast = {"write_empty_chunks": True}
        self.tiles = self.group["tiles"].with_config(fast)
        self._flags = self.group["tiles_done"]
        self._pred = {k: self.pred[k].with_config(fast) for k in ("labels", "scores", "n_inst", "done")}
        tiles_bad: set[int] = set()
        pred_bad: set[int] = set()
        # each kind's done flags (bool) and checksums (uint64, what the flag chunks on disk hold where done)
        self._tiles_sum = self._read_flags(self._flags, np.uint64, 0, tiles_bad)
        self._tiles_done = self._tiles_sum != 0
        n_inst = self._read_flags(self._pred["n_inst"], np.int32, -1, pred_bad)
        self._pred_sum = self._read_flags(self._pred["done"], np.uint64, 0, pred_bad)
        self._pred_done = (self._pred_sum != 0) & (n_inst >= 0)
        self._n_inst = np.maximum(n_inst, 0)
        if create and (tiles_bad or pred_bad):
            # Rewrite damaged flag chunks now (as "not done"), or a chunk whose tiles need no more work would
            # stay damaged. Not in create=False mode: a range task must only write the chunks of its own range.
            with _disk_full_is_output_error(self.root):
                first = [c * FLAG_CHUNK for c in sorted(tiles_bad)]
                _write_chunks(self._flags, self._tiles_done, np.asarray(first, np.int64), self._tiles_sum)
                first = np.asarray([c * FLAG_CHUNK for c in sorted(pred_bad)], np.int64)
                _write_chunks(self._pred["n_inst"], self._n_inst, first)
                _write_chunks(self._pred["done"], self._pred_done, first, self._pred_sum)
        self._warn()

    def _read_flags(self, array, dtype, bad, damaged_chunks: set[int]) -> np.ndarray:
        """A flag array read whole, or chunk by chunk when that fails: a damaged chunk reads as ``bad`` and its
        index is added to ``damaged_chunks``."""
        try:
            return np.asarray(array[:], dtype=dtype)
        except Exception as err:  # noqa: BLE001 - see _decode_failed
            if not _decode_failed(err):
                raise
        out = np.full(self.n, bad, dtype=dtype)
        for lo in range(0, self.n, FLAG_CHUNK):
            hi = min(lo + FLAG_CHUNK, self.n)
            try:
                out[lo:hi] = array[lo:hi]
            except Exception as err:  # noqa: BLE001
                if not _decode_failed(err):
                    raise
                self.damaged.add(f"{array.path} chunk {lo // FLAG_CHUNK}")
                damaged_chunks.add(lo // FLAG_CHUNK)
        return out

    def _warn(self) -> None:
        if self.damaged and not getattr(self, "_warned", False):
            self._warned = True
            names = sorted(self.damaged)
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            warnings.warn(f"tile cache {self.root}: damaged {', '.join(names[:3])}{more} (a chunk that does not "
                          "decode or match its checksums); its tiles are read and predicted again", UserWarning, stacklevel=3)

    def _refusal(self, create: bool):
        """What :func:`nucseg.io.claim` raises when something that is not a cache sits at the cache's path."""
        return lambda: OutputError(
            f"{self.root} is in the way of the tile cache and is not one (nucseg never replaces what it did not "
            "make): move it away or use another --work-dir") if create else DataError(
            f"tile cache {self.root} is missing or does not match this slide and settings")

    def _open_group(self, key: dict, coords: np.ndarray, create: bool):
        import zarr

        from ..io import claim  # the store is updated in place: only if it is absent or a cache

        group = None
        if self.root.exists() or self.root.is_symlink():
            try:
                group = zarr.open_group(str(claim(self.root, is_nucseg_cache, self._refusal(create))), mode="r+",
                                        zarr_format=3)
                same = group.attrs.get("key") == key
                if same and not all(_layout_ok(group[name], spec) for name, spec in self._layout().items()):
                    self.damaged.add("metadata")  # a changed array layout: rebuilt (nothing it holds is trusted)
                    same = False
                if same:
                    try:
                        same = np.array_equal(group["coords"][:], coords)
                    except Exception as err:  # noqa: BLE001 - our cache with a damaged coords chunk: rewrite it
                        if not _decode_failed(err):
                            raise
                        self.damaged.add("coords")
                        group["coords"][:] = coords
                if not same:
                    group = None
            except Exception as err:  # noqa: BLE001 - unreadable or foreign store: rebuild if it is ours
                if not _decode_failed(err):
                    raise
                group = None
            if group is None and create:
                if not is_nucseg_cache(self.root):
                    raise OutputError(f"{self.root} is in the way of the tile cache and is not one (nucseg never "
                                      "replaces what it did not make): move it away or use another --work-dir")
                from ..io import remove_owned

                remove_owned(self.root, is_nucseg_cache)  # checked just above; the one way nucseg deletes
        if group is None and not create:
            raise DataError(f"tile cache {self.root} is missing or does not match this slide and settings")
        if group is None:
            layout = self._layout()
            group = zarr.open_group(str(claim(self.root, is_nucseg_cache, self._refusal(create))), mode="w",
                                    zarr_format=3)
            group.create_array("coords", **layout["coords"])
            if self.n:
                group["coords"][:] = coords
            group.create_array("tiles", **layout["tiles"])
            group.create_array("tiles_done", **layout["tiles_done"])
            group.attrs["key"] = key  # last: a group killed while being created has no key and is rebuilt
        return group

    def _layout(self, pred: bool = False) -> dict[str, dict]:
        """``create_array`` arguments of each array of the group (``pred``: of a prediction group): the one
        description that creates them and, when they are opened, checks their metadata (:func:`_layout_ok`)."""
        n, T, K = self.n, self.tile_size, self.max_instances

        def spec(shape, chunks, dtype, fill, **codecs):
            return {"shape": shape, "chunks": chunks, "dtype": dtype, "fill_value": fill,
                    "chunk_key_encoding": _KEYS, **codecs}

        if pred:
            return {"labels": spec((n, T, T), (CHUNK_TILES, T, T), "int32", 0, compressors=_fast_zstd()),
                    "scores": spec((n, K), (CHUNK_TILES, K), "float32", np.nan, compressors=_fast_zstd()),
                    "n_inst": spec((n,), (FLAG_CHUNK,), "int32", 0),
                    "done": spec((n,), (FLAG_CHUNK,), "uint64", 0)}
        return {"coords": spec((n, 2), (max(n, 1), 2), "int64", 0),
                "tiles": spec((n, T, T, 3), (CHUNK_TILES, T, T, 3), "uint8", 255, compressors=_fast_lz4()),
                "tiles_done": spec((n,), (FLAG_CHUNK,), "uint64", 0)}

    def _open_pred(self, model: str, create: bool):
        # Segmenters without a fingerprint get a fresh "volatile" group each run: never reused, never piling up.
        name = "volatile" if model.startswith("volatile:") else hashlib.sha256(model.encode()).hexdigest()[:16]
        path = f"pred/{name}"
        try:
            pred = self.group[path]
            if pred.attrs.get("model") != model:
                raise KeyError(path)
            if not all(_layout_ok(pred[name], spec) for name, spec in self._layout(pred=True).items()):
                raise ChecksumMismatch(f"{path}: an array layout differs from the cache's")  # damaged metadata
        except Exception as err:  # noqa: BLE001 - missing, another model's, or damaged metadata: (re)create
            if not (isinstance(err, KeyError) or _decode_failed(err)):
                raise
            if not isinstance(err, KeyError):
                self.damaged.add(f"{path} metadata")
            if not create:
                raise DataError(f"tile cache {self.root} has no predictions of this model yet") from None
            pred = self.group.create_group(path, overwrite=True)
            for name, spec in self._layout(pred=True).items():
                pred.create_array(name, **spec)
            pred.attrs["model"] = model  # last, as the group's key: a half-created group is recreated
        return pred

    # ---- tiles -------------------------------------------------------------------------------------------
    @property
    def tiles_done(self) -> np.ndarray:
        return self._tiles_done.copy()

    def get_tile(self, i: int) -> np.ndarray | None:
        """Cached tile i, or None if its chunk is damaged (the chunk's tiles marked not read, with the one
        warning: they are read from the slide again); None too for a tile not cached (or no longer: another tile
        of its chunk was found damaged)."""
        i = int(i)
        if not self._tiles_done[i]:
            return None
        try:
            return self._row("tiles", self.tiles, i)
        except Exception as err:  # noqa: BLE001 - see _decode_failed
            if not _decode_failed(err):
                raise
        lo, hi = self._span(i // CHUNK_TILES)
        with self._flag_lock:
            self._tiles_done[lo:hi] = False
        # on disk at once: the next put_tiles of this chunk rewrites its other tiles with fill
        self._flag("tiles", np.arange(lo, hi), defer=False)
        self.damaged.add(f"tiles chunk {i // CHUNK_TILES}")
        self._warn()
        return None

    def put_tiles(self, indices: np.ndarray, tiles: np.ndarray, defer: bool = False) -> None:
        """Write tiles whole chunk by whole chunk (merged with the chunk's other cached tiles, see
        :func:`_chunk_rows`), then mark them done (flag after data: a crash leaves them merely un-flagged). A chunk
        found damaged while merging loses its other tiles: marked not read, they are read from the slide again.
        ``defer``: the done flags may wait for :meth:`flush` (see FLAG_FLUSH_S)."""
        indices = np.asarray(indices, dtype=np.int64)
        if not len(indices):
            return
        sums = tile_sums(self.tile_salt, indices, tiles)
        writes, lost = self._merged_chunks(indices, self._tiles_done, [(self.tiles, tiles, 255, self._check_tiles)])
        self.damaged.update(f"tiles chunk {i // CHUNK_TILES}" for i in lost)
        if lost:  # un-flagged on disk before their chunk is rewritten with fill: a kill never leaves them "done"
            with self._flag_lock:
                self._tiles_done[lost] = False
            self._flag("tiles", np.asarray(lost, np.int64), defer=False)
        with _disk_full_is_output_error(self.root):
            self._write_merged(writes, [self.tiles], "tiles")
        with self._flag_lock:  # never between a flush's reads of the flags
            self._tiles_done[indices] = True
            self._tiles_sum[indices] = sums
        self._flag("tiles", indices, defer)
        if lost:
            self._warn()

    def _span(self, c: int) -> tuple[int, int]:
        """Tiles [lo, hi) of chunk c (the last chunk may be short)."""
        return c * CHUNK_TILES, min((c + 1) * CHUNK_TILES, self.n)

    def _merged_chunks(self, indices: np.ndarray, done: np.ndarray,
                       columns: list[tuple]) -> tuple[list[tuple[int, int, list]], list[int]]:
        """What writing ``indices`` means chunk by chunk: ``[(lo, hi, [rows per column])]`` to write whole, and
        the done tiles that were lost. ``columns``: (array, values per index, fill, check) written together. A
        chunk the indices cover whole is their values as is; one covered in part keeps its other done tiles (read
        back and checked, see :func:`_chunk_rows`) and fills the rest; if it does not decode or does not match
        its checksums, those done tiles are lost."""
        assert np.all(np.diff(indices) > 0), "tile indices must be ascending and unique"
        chunk_of = indices // CHUNK_TILES
        writes, lost = [], []
        for c in np.unique(chunk_of).tolist():
            lo, hi = self._span(c)
            mine = np.flatnonzero(chunk_of == c)
            if len(mine) == hi - lo:  # the whole chunk (the common case: batches are aligned to chunks)
                writes.append((lo, hi, [values[mine] for _, values, _, _ in columns]))
                continue
            keep = np.setdiff1d(np.flatnonzero(done[lo:hi]), indices[mine] - lo)
            merged = [_chunk_rows(array, lo, hi, keep, indices[mine] - lo, values[mine], fill, check)
                      for array, values, fill, check in columns]
            writes.append((lo, hi, [rows for rows, _ in merged]))
            if not all(ok for _, ok in merged):
                lost += (lo + keep).tolist()
        return writes, lost

    def _write_merged(self, writes: list[tuple[int, int, list]], arrays: list, memo: str) -> None:
        """Write :meth:`_merged_chunks`' chunks, then make every thread's memo ``memo`` of them stale."""
        for lo, hi, rows in writes:
            for array, r in zip(arrays, rows):
                array[lo:hi] = r
        self._forget(memo)

    def _row(self, name: str, array, i: int) -> np.ndarray:
        """Row i of a chunked array, decoding its chunk once for consecutive readers in a thread (see ``_memos``)."""
        c = i // CHUNK_TILES
        memos = getattr(self._memos, "memo", None)
        if memos is None:
            memos = self._memos.memo = {}
        with self._memo_lock:
            gen = self._generation[name]
        memo = memos.get(name)
        if memo is None or memo[0] != gen or memo[1] != c:
            lo, hi = self._span(c)
            # the flags before the read: a row flagged done while it is read may be newer than what it got
            check = self._checker("tiles" if name == "tiles" else "labels", lo, hi)
            memo = (gen, c, np.asarray(array[lo:hi]))
            check(memo[2])  # its done rows
            with self._memo_lock:  # kept only if no write or discard happened while it was read
                if self._generation[name] == gen:
                    memos[name] = memo
        return memo[2][i - c * CHUNK_TILES].copy()

    def expected(self, kind: str, lo: int, hi: int, only: np.ndarray | None = None) -> np.ndarray:
        """The flags (checksums) of tiles [lo, hi) of ``kind`` ("tiles" or "pred") as this process knows them, 0
        where not done (or, with ``only``, not among those offsets from lo): what reads are verified against."""
        with self._flag_lock:
            done = (self._tiles_done if kind == "tiles" else self._pred_done)[lo:hi].copy()
            sums = (self._tiles_sum if kind == "tiles" else self._pred_sum)[lo:hi].copy()
        if only is not None:
            mask = np.zeros(hi - lo, bool)
            mask[only] = True
            done &= mask
        return np.where(done, sums, np.uint64(0)).astype(np.uint64)

    def checksums(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prediction flags, instance counts, tile flags) of tiles [lo, hi): what a reader of the arrays
        themselves (:attr:`prediction_arrays`, :attr:`tiles`) verifies them against."""
        with self._flag_lock:
            n_inst = self._n_inst[lo:hi].copy()
        return self.expected("pred", lo, hi), n_inst, self.expected("tiles", lo, hi)

    def _checker(self, what: str, lo: int, hi: int) -> Callable[[np.ndarray], None]:
        """A check of rows [lo, hi) of ``what`` ("tiles", "labels" or "scores") against the flags as they are
        now, to be taken before the rows are read."""
        want = self.expected("tiles" if what == "tiles" else "pred", lo, hi)
        if what == "tiles":
            return lambda rows: check_tiles(self.tile_salt, lo, rows, want)
        if what == "scores":
            return lambda rows: check_scores(self.pred_salt, lo, rows, want)
        with self._flag_lock:
            n_inst = self._n_inst[lo:hi].copy()
        return lambda rows: check_labels(self.pred_salt, lo, rows, want, n_inst)

    def _check_tiles(self, lo: int, rows: np.ndarray, only: np.ndarray | None = None) -> None:
        check_tiles(self.tile_salt, lo, rows, self.expected("tiles", lo, lo + len(rows), only))

    def _check_labels(self, lo: int, rows: np.ndarray, only: np.ndarray | None = None) -> None:
        check_labels(self.pred_salt, lo, rows, self.expected("pred", lo, lo + len(rows), only),
                     self._n_inst[lo : lo + len(rows)])

    def _check_scores(self, lo: int, rows: np.ndarray, only: np.ndarray | None = None) -> None:
        check_scores(self.pred_salt, lo, rows, self.expected("pred", lo, lo + len(rows), only))

    def _forget(self, name: str) -> None:
        with self._memo_lock:  # every thread's memo of ``name`` is stale from now on
            self._generation[name] += 1

    # ---- flags -------------------------------------------------------------------------------------------
    def _flag(self, kind: str, indices: np.ndarray, defer: bool) -> None:
        """Write the flag chunks of ``indices`` (set in memory after their data was written), or with ``defer``
        only once FLAG_FLUSH_S has passed since the last write of this kind's flags."""
        with self._flag_lock:
            self._unflushed[kind].update((np.unique(indices // FLAG_CHUNK) * FLAG_CHUNK).tolist())
            due = not defer or time.monotonic() - self._flushed_at[kind] >= FLAG_FLUSH_S
        if due:
            self._flush(kind)

    def _flush(self, kind: str) -> None:
        with self._flag_lock:  # a chunk is written from the in-memory flags: always safe (they follow the data)
            pending = self._unflushed[kind]
            self._flushed_at[kind] = time.monotonic()
            if not pending:
                return
            first = np.asarray(sorted(pending), np.int64)
            with _disk_full_is_output_error(self.root):
                if kind == "tiles":
                    _write_chunks(self._flags, self._tiles_done, first, self._tiles_sum)
                else:
                    _write_chunks(self._pred["n_inst"], self._n_inst, first)
                    # last: the tiles' data is complete
                    _write_chunks(self._pred["done"], self._pred_done, first, self._pred_sum)
            pending.clear()  # only once written: a failed write is tried again by the next flush

    def flush(self) -> None:
        """Write every deferred flag: after it, the cache on disk says all that this process has written."""
        self._flush("tiles")
        self._flush("pred")

    # ---- predictions -------------------------------------------------------------------------------------
    @property
    def pred_done(self) -> np.ndarray:
        return self._pred_done.copy()

    def put_predictions(self, indices: np.ndarray, labels: np.ndarray, scores: list[np.ndarray],
                        defer: bool = False) -> None:
        """Write a batch's predictions whole prediction chunk by whole chunk, then mark them done (``defer``: the
        flags may wait for :meth:`flush`, see FLAG_FLUSH_S).

        A chunk the batch covers only in part keeps its other tiles that are done (read back from disk) and
        holds fill values for those that are not (they are predicted later). If that read-back finds the chunk
        damaged, its done tiles are marked not done and CacheDamaged is raised after this batch is written, so
        the caller predicts them again (as when an export read finds damage).
        """
        indices = np.asarray(indices, dtype=np.int64)
        if not len(indices):
            return
        K = self.max_instances
        n_inst = np.zeros(len(indices), np.int32)
        rows = np.full((len(indices), K), np.nan, dtype=np.float32)
        for j, i in enumerate(indices):
            sc = np.asarray(scores[j], dtype=np.float32).ravel()
            n_inst[j] = int(labels[j].max()) if labels[j].size else 0
            if n_inst[j] > K:
                raise ValueError(f"tile {int(i)} has {n_inst[j]} instances, more than the cache holds ({K})")
            if len(sc) < n_inst[j]:
                raise ValueError(f"segmenter returned {len(sc)} scores for {n_inst[j]} instances in a tile")
            rows[j, : n_inst[j]] = sc[: n_inst[j]]
        labels = np.asarray(labels).astype(np.int32, copy=False)
        sums = pred_sums(self.pred_salt, indices, labels, rows, n_inst)
        arrays = [self._pred["labels"], self._pred["scores"]]
        writes, damaged = self._merged_chunks(indices, self._pred_done,
                                              [(arrays[0], labels, 0, self._check_labels),
                                               (arrays[1], rows, np.nan, self._check_scores)])
        # tiles whose labels or scores were lost are marked not done on disk before their chunk is rewritten with
        # fill, so a kill in between never leaves fill values flagged as predictions
        lost = self.discard(damaged, "labels") if damaged else None
        with _disk_full_is_output_error(self.root):
            self._write_merged(writes, arrays, "labels")
        with self._flag_lock:  # n_inst and done together: a flush writes both from one state
            self._n_inst[indices] = n_inst
            self._pred_done[indices] = True
            self._pred_sum[indices] = sums
        self._flag("pred", indices, defer)
        if lost is not None:
            raise lost

    @property
    def prediction_arrays(self) -> tuple:
        """(labels, scores) zarr arrays, for readers of many tiles at once (which must verify what they read,
        :func:`check_labels` / :func:`check_scores` against :meth:`expected`, and turn a chunk that fails to
        decode or to match into :meth:`discard`, as :meth:`get_labels` does)."""
        return self._pred["labels"], self._pred["scores"]

    def get_labels(self, i: int) -> np.ndarray:
        """Labels (T, T) int32 of cache tile i; a damaged chunk raises CacheDamaged (see discard) for its done
        tiles, all of which it lost."""
        i = int(i)
        try:
            return self._row("labels", self._pred["labels"], i)
        except Exception as err:  # noqa: BLE001 - see _decode_failed
            if not _decode_failed(err):
                raise
        raise self.discard(self._chunk_done(i), "labels")

    def _chunk_done(self, i: int) -> list[int]:
        """Tile i and the other done tiles of its prediction chunk (what a damaged chunk takes with it)."""
        lo, hi = self._span(i // CHUNK_TILES)
        return sorted({i, *(lo + np.flatnonzero(self._pred_done[lo:hi])).tolist()})

    def get_prediction(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(labels (T, T) int32, scores (n_inst,) float32) of cache tile i; damaged chunks raise CacheDamaged."""
        i = int(i)
        n_inst = int(self._n_inst[i])
        labels = self.get_labels(i)
        try:
            check = self._checker("scores", i, i + 1)
            row = np.asarray(self._pred["scores"][i : i + 1])  # the whole row: its checksum covers it
            check(row)
            scores = row[0, :n_inst]
        except Exception as err:  # noqa: BLE001 - see _decode_failed
            if not _decode_failed(err):
                raise
            raise self.discard(self._chunk_done(int(i)), "scores") from None
        return labels, scores

    def scan_predictions(self) -> int:
        """Verify every prediction chunk holding done tiles and :meth:`discard` those that do not decode or
        match; returns how many. After damage was found (one chunk at a time by the export), so that the repair
        pass redoes all of it at once: swapped chunks, a cache of another slide. Reads what one export reads."""
        bad = 0
        for c in range(-(-self.n // CHUNK_TILES)):
            lo, hi = self._span(c)
            if not self._pred_done[lo:hi].any():
                continue
            try:
                self._check_labels(lo, np.asarray(self._pred["labels"][lo:hi]))
                self._check_scores(lo, np.asarray(self._pred["scores"][lo:hi]))
            except Exception as err:  # noqa: BLE001 - see _decode_failed
                if not _decode_failed(err):
                    raise
                self.discard(self._chunk_done(lo), "labels")
                bad += 1
        return bad

    def discard(self, indices: list[int], what: str = "predictions") -> CacheDamaged:
        """Mark the predictions of ``indices`` not done (here and in the flag chunks on disk, so a rerun redoes
        them too), warn once, and return the CacheDamaged to raise."""
        idx = np.asarray(indices, dtype=np.int64)
        with self._flag_lock:
            self._pred_done[idx] = False
        self._flag("pred", idx, defer=False)
        self.damaged.update(f"{what} chunk {i // CHUNK_TILES}" for i in indices)
        self._warn()
        return CacheDamaged(self.root, [int(i) for i in indices])


def _layout_ok(array, spec: dict) -> bool:
    """Whether a zarr array opened from disk has the metadata the cache gives it (``spec``: its ``create_array``
    arguments): a tampered or foreign ``zarr.json`` (dtype, fill value, codecs, chunk names) changes what its
    chunks decode to. Compared with the same array created in memory (~0.2 ms)."""
    import zarr
    from zarr.storage import MemoryStore

    return array.metadata.to_dict() == zarr.create_array(MemoryStore(), **spec).metadata.to_dict()


def _fast_zstd():
    """zstd level 1 for label maps: faster than zarr's default (level 3), same size (they compress ~80x)."""
    from zarr.codecs import ZstdCodec

    return ZstdCodec(level=1)


def _fast_lz4():
    """Blosc lz4 for RGB tiles: ~4x less CPU per tile than zarr's default zstd (level 3), ~7 % larger."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle", typesize=1)


def _chunk_rows(array, lo: int, hi: int, keep: np.ndarray, at: np.ndarray, values: np.ndarray,
                fill, check) -> tuple[np.ndarray, bool]:
    """Rows [lo, hi) of one chunk of ``array``, to be written whole: ``values`` at positions ``at``, the stored
    rows at positions ``keep`` (read back, verified by ``check(lo, rows, keep)``), ``fill`` elsewhere. ok is
    False when the stored chunk did not decode or match: the ``keep`` rows are then fill as well, and the
    caller must treat them as lost."""
    out = np.full((hi - lo, *array.shape[1:]), fill, dtype=array.dtype)
    ok = True
    if len(keep):
        try:
            stored = np.asarray(array[lo:hi])
            check(lo, stored, keep)
            out[keep] = stored[keep]
        except Exception as err:  # noqa: BLE001 - see _decode_failed
            if not _decode_failed(err):
                raise
            ok = False
    out[at] = values
    return out, ok


def _write_chunks(array, values: np.ndarray, indices: np.ndarray, sums: np.ndarray | None = None) -> None:
    """Write the flag chunks holding ``indices`` (only those) from this process's copy ``values``; with ``sums``,
    ``values`` are done flags and the chunks hold the checksums where done, 0 elsewhere."""
    for c in np.unique(indices // FLAG_CHUNK):
        lo, hi = int(c) * FLAG_CHUNK, min((int(c) + 1) * FLAG_CHUNK, len(values))
        array[lo:hi] = values[lo:hi] if sums is None else np.where(values[lo:hi], sums[lo:hi], np.uint64(0))


def cache_dir_name(slide_path: Path, digest: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", slide_path.stem)[:60] or "slide"
    return f"{stem}-{digest}.zarr"
