"""Whole-slide access through OpenSlide: opening, µm/px, pyramid level choice, resampled reads, tissue.

Everything downstream works in *target* pixels: the slide resampled to the µm/px the tile model expects.
:class:`TargetView` maps target pixels to the best pyramid level and resamples so that every target pixel
gets the same value whichever tile reads it (tiles then agree in their overlaps, which stitching relies on).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, SlideError

log = logging.getLogger(__name__)

# A target µm/px within this relative distance of a pyramid level's is read natively: resampling by 1-2 %
# costs time and blurs, and the scale error is below what annotations resolve.
MPP_TOLERANCE = 0.02
WHITE = 255
from ..choices import MPP_RANGE  # noqa: F401 - plausible µm/px of slides and targets (why: see there)
# Target pixels finer than the slide's by more than this factor only invent pixels (and multiply the work).
MAX_UPSAMPLING = 4.0


def open_slide(path: str | os.PathLike):
    """Open any OpenSlide format; missing paths raise InputError, unreadable files SlideError (one line)."""
    import openslide

    path = Path(path)
    if not path.exists():
        raise InputError(f"slide not found: {path}")
    if not path.is_file():
        raise InputError(f"slide is not a file: {path}")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        plain = _plain_image_kind(path)
        if plain:
            raise SlideError(f"{path} is not a whole-slide image but {plain} (OpenSlide reads scanner formats "
                             "and tiled TIFFs); use `nucseg segment` for plain images, or convert it to a tiled "
                             "pyramidal TIFF with its µm/px") from None
        raise SlideError(f"cannot open slide {path}: not a supported whole-slide format, or truncated/corrupt") from None
    except (openslide.OpenSlideError, OSError, ValueError) as err:
        raise SlideError(f"cannot open slide {path}: {_one_line(err)}") from None


_MAGIC = {b"\x89PNG\r\n\x1a\n": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF87a": "a GIF image",
          b"GIF89a": "a GIF image"}


def _plain_image_kind(path: Path) -> str | None:
    """What a file OpenSlide refused is, if it is a readable ordinary image; None if it may be a damaged slide.

    OpenSlide reads TIFF only when it is tiled (generic-tiff) or a vendor format; a striped TIFF as image
    editors and microscope cameras write it is refused like a corrupt file. PNG/JPEG/GIF are never slides.
    A TIFF that tifffile cannot parse, or whose first page is tiled, is left to the "corrupt" message.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return None
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    if head[:4] not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return None
    import tifffile

    quiet = logging.getLogger("tifffile")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # tifffile logs what it finds wrong; the caller's message says it
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            if page.is_tiled:
                return None
            if page.nbytes <= 1 << 26:
                page.asarray(maxworkers=1)  # small enough to prove that it decodes
            return "a plain (untiled) TIFF image"
    except Exception:  # noqa: BLE001 - any parse failure means "damaged", which the caller reports
        return None
    finally:
        quiet.setLevel(level)


def slide_mpp(slide, override: float | None = None, path: str | os.PathLike | None = None) -> float:
    """Level-0 µm/px: the override if given, else openslide.mpp-x, else the TIFF resolution tags.

    Without any of these the physical scale is unknown and every size (and the model's scale) would be a
    guess, so it is an error that names the ``--slide-mpp`` option; so is a value outside ``MPP_RANGE``
    (a unit mistake in the metadata), and an override outside it is a bad argument (InputError).
    """
    name = path if path is not None else _slide_name(slide)
    if override is not None:
        check_mpp(override, "--slide-mpp")
        return float(override)
    props = slide.properties
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        try:
            value = float(props[key])
        except (KeyError, ValueError):
            continue
        if value > 0 and math.isfinite(value):
            return _plausible(value, name, props, key)
    value = _mpp_from_tiff_tags(props)
    if value is not None:
        return _plausible(value, name, props, "tiff")
    raise SlideError(f"slide {name} has no µm/px in its metadata; pass --slide-mpp (e.g. --slide-mpp 0.25)")


def check_mpp(value, what: str) -> float:
    """``value`` as a float if it is a plausible µm/px (``MPP_RANGE``), else an InputError naming ``what``."""
    lo, hi = MPP_RANGE
    try:
        if isinstance(value, (bool, str, bytes)):
            raise TypeError(value)
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number of µm/px, not {value!r}") from None
    if not lo <= v <= hi:
        raise InputError(f"{what} {value!r} is outside the plausible {lo:g}-{hi:g} µm/px (a whole-slide scan at "
                         "40x is about 0.25, at 20x about 0.5)")
    return v


def _plausible(value: float, name, props, key: str) -> float:
    lo, hi = MPP_RANGE
    if lo <= value <= hi:
        return value
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    if key == "tiff" or (props.get("openslide.vendor") == "generic-tiff" and unit in ("inch", "centimeter")):
        # OpenSlide derives a generic TIFF's µm/px from these tags; name them, they are what is wrong
        source = f"from its TIFF resolution tags: {props.get('tiff.XResolution')} pixels per {unit}"
    else:
        source = f"{key} in its metadata"
    raise SlideError(f"slide {name} reports {value:.4g} µm/px ({source}), outside the plausible {lo:g}-{hi:g} "
                     "µm/px; pass the true value with --slide-mpp (e.g. --slide-mpp 0.25)")


def _mpp_from_tiff_tags(props) -> float | None:
    """µm/px from tiff.XResolution + tiff.ResolutionUnit (pixels per cm or inch); None when absent/unitless."""
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    per_um = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    try:
        res = float(props.get("tiff.XResolution", "nan"))
    except ValueError:
        return None
    if per_um is None or not (res > 0 and math.isfinite(res)):
        return None
    return per_um / res


# A slide's content identity (the resume cache's key and a batch's done-check; docs/HPC.md "The cache key"):
# SHA-256 over the file's size and bytes, all of them up to WHOLE_FILE_BYTES, else its first and last
# IDENTITY_EDGE bytes and IDENTITY_BLOCKS blocks of IDENTITY_BLOCK bytes spread evenly between them (mostly
# level-0 tile data), plus its pyramid and properties. Formats whose pixels live in companion files (MIRAX
# .mrxs + folder, Hamamatsu .vms, DICOM, any vendor not known to be one file) add the decoded pixels of
# IDENTITY_TILES² level-0 regions of IDENTITY_TILE px spread over the slide, and MIRAX its folder's files
# (size, head and tail each). The name (and OpenSlide's quickhash, which hashes only the smallest level) is
# not an identity: two different slides can share both. Measured (docs/HPC.md): ~1 ms for a 2 MB slide,
# ~8 ms for a 256 MiB one (6 MiB read), ~0.1 s more where tiles are decoded. A change confined to bytes
# between the samples of a file over WHOLE_FILE_BYTES is not seen.
IDENTITY_VERSION = 1
WHOLE_FILE_BYTES = 64 << 20
IDENTITY_EDGE = 1 << 20
IDENTITY_BLOCKS = 64
IDENTITY_BLOCK = 64 << 10
IDENTITY_TILES = 4
IDENTITY_TILE = 256
# Vendors whose slide is one self-contained file, whose bytes are its content (Hamamatsu only as .ndpi; its .vms
# is an index of JPEG files).
SINGLE_FILE_VENDORS = {"aperio", "generic-tiff", "leica", "philips", "sakura", "ventana", "zeiss"}
# Companion files of a MIRAX slide (``x.mrxs`` + folder ``x/``) hashed by size, head and tail each, at most this
# many (a MIRAX folder holds an index and some tens of data files).
COMPANION_FILES = 1024


def slide_identity(slide, path: str | os.PathLike) -> str:
    """The slide's content identity ``"content:<sha256>"`` (see IDENTITY_VERSION above for what it covers).

    ``slide`` is the open OpenSlide handle (pyramid, properties); the sampled tiles are read through a handle of
    their own, so that a tile OpenSlide cannot decode (which leaves a handle failing every later read) costs
    only a marker in the hash. SlideError if the file cannot be read.
    """
    path = Path(path)
    h = hashlib.sha256(f"nucseg-slide-identity-{IDENTITY_VERSION}\0".encode())
    vendor = slide.properties.get("openslide.vendor")
    try:
        _hash_file(h, path)
        companion = path.with_suffix("")
        if vendor == "mirax" and companion.is_dir():
            for i, f in enumerate(sorted(p for p in companion.rglob("*") if p.is_file())):
                if i == COMPANION_FILES:
                    break
                h.update(f"{f.relative_to(companion)}\0".encode())
                _hash_file(h, f, whole=0, edge=IDENTITY_BLOCK, blocks=0)
    except OSError as err:
        raise SlideError(f"cannot read slide {path}: {err.strerror or err}") from None
    h.update(repr((tuple(slide.level_dimensions), tuple(float(d) for d in slide.level_downsamples))).encode())
    h.update(repr(sorted(slide.properties.items())).encode())
    single = vendor in SINGLE_FILE_VENDORS or (vendor == "hamamatsu" and path.suffix.lower() == ".ndpi")
    if not single:
        _hash_tiles(h, path, slide.level_dimensions[0])
    return "content:" + h.hexdigest()


def _hash_file(h, path: Path, whole: int = WHOLE_FILE_BYTES, edge: int = IDENTITY_EDGE,
               blocks: int = IDENTITY_BLOCKS) -> None:
    """Size and bytes of ``path`` into ``h``: all of them up to ``whole`` bytes, else head, tail and samples."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        h.update(f"{size}\0".encode())
        if size <= max(whole, 2 * edge):
            spans = [(0, size)]
        else:
            step = (size - 2 * edge) / (blocks + 1)
            spans = [(0, edge), *((edge + int(step * (k + 1)), IDENTITY_BLOCK) for k in range(blocks)),
                     (size - edge, edge)]
        for offset, length in spans:
            while length > 0:
                data = os.pread(fd, min(length, 8 << 20), offset)
                if not data:
                    break
                h.update(data)
                offset, length = offset + len(data), length - len(data)
    finally:
        os.close(fd)


def _hash_tiles(h, path: Path, size0: tuple[int, int]) -> None:
    """Decoded RGBA of IDENTITY_TILES x IDENTITY_TILES level-0 regions, centred in a regular grid, into ``h``."""
    import openslide

    W, H = size0
    try:
        own = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError, ValueError):
        h.update(b"unopenable")
        return
    try:
        for j in range(IDENTITY_TILES):
            for i in range(IDENTITY_TILES):
                x = max(0, int((i + 0.5) * W / IDENTITY_TILES) - IDENTITY_TILE // 2)
                y = max(0, int((j + 0.5) * H / IDENTITY_TILES) - IDENTITY_TILE // 2)
                try:
                    h.update(own.read_region((x, y), 0, (IDENTITY_TILE, IDENTITY_TILE)).tobytes())
                except (openslide.OpenSlideError, OSError, ValueError):
                    h.update(b"unreadable")
                    return  # the handle fails every later read
    finally:
        own.close()


def best_level(slide, mpp0: float, target_mpp: float) -> int:
    """The pyramid level with the largest µm/px that is still <= target (within tolerance); else level 0."""
    best = 0
    for level, ds in enumerate(slide.level_downsamples):
        if mpp0 * ds <= target_mpp * (1 + MPP_TOLERANCE):
            if mpp0 * ds > mpp0 * slide.level_downsamples[best]:
                best = level
    return best


@dataclass
class TargetView:
    """The slide seen at ``target_mpp``: target-pixel reads backed by one pyramid level plus resampling.

    scale: level-0 pixels per target pixel (multiply target coordinates by it to get level-0 coordinates).
    width/height: size of the slide in target pixels.
    """

    slide: object
    path: Path
    mpp0: float
    target_mpp: float
    level: int
    factor: float  # level pixels per target pixel (1.0 = native read)
    width: int
    height: int

    @property
    def scale(self) -> float:
        return float(self.slide.level_downsamples[self.level]) * self.factor

    @classmethod
    def create(cls, slide, path: str | os.PathLike, mpp0: float, target_mpp: float) -> "TargetView":
        """The view at ``target_mpp``; a target finer than the slide by more than MAX_UPSAMPLING is refused."""
        if mpp0 / target_mpp > MAX_UPSAMPLING:
            raise InputError(f"target {target_mpp:g} µm/px is {mpp0 / target_mpp:.3g}x finer than slide {path} "
                             f"({mpp0:.4g} µm/px); at most {MAX_UPSAMPLING:g}x up-sampling is allowed (check --mpp "
                             "and --slide-mpp)")
        level = best_level(slide, mpp0, target_mpp)
        level_mpp = mpp0 * float(slide.level_downsamples[level])
        factor = target_mpp / level_mpp
        if abs(factor - 1.0) <= MPP_TOLERANCE:
            factor, target_mpp = 1.0, level_mpp
        elif factor < 1.0:
            log.warning("target %.3f µm/px is finer than the slide (%.3f µm/px): upsampling", target_mpp, mpp0)
        lw, lh = slide.level_dimensions[level]
        width = int(math.floor(lw / factor + 1e-6))
        height = int(math.floor(lh / factor + 1e-6))
        return cls(slide, Path(path), mpp0, float(target_mpp), level, float(factor), width, height)

    def read(self, x: int, y: int, size: int) -> np.ndarray:
        """RGB (size, size, 3) uint8 at target pixels [y, y+size) x [x, x+size); outside the slide is white."""
        if self.factor == 1.0:
            tile = self._read_level(x, y, size, size)
        else:
            tile = self._read_resampled(x, y, size)
        # Pixels past the slide's target extent are padding, identical in every tile that sees them.
        if x + size > self.width:
            tile[:, max(self.width - x, 0) :] = WHITE
        if y + size > self.height:
            tile[max(self.height - y, 0) :, :] = WHITE
        return tile

    def _read_level(self, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        """Level pixels [ly, ly+h) x [lx, lx+w), transparent (outside) composited onto white."""
        import openslide

        ds = float(self.slide.level_downsamples[self.level])
        try:
            region = self.slide.read_region((int(round(lx * ds)), int(round(ly * ds))), self.level, (int(w), int(h)))
        except openslide.OpenSlideError as err:
            raise SlideError(f"cannot read slide {self.path}: {_one_line(err)} (truncated or corrupt?)") from None
        rgba = np.asarray(region)
        return composite_white(rgba)

    def _read_resampled(self, x: int, y: int, size: int) -> np.ndarray:
        """Anti-aliased resampling whose value at a target pixel depends only on its global position.

        Sample positions come from *global* target indices, split exactly (float64) into an integer level pixel
        and a 1/32-pixel interpolation step, and OpenCV interpolates with those fixed-point maps (integer
        arithmetic): every tile computes bit-identical values for the pixels it shares with another. The window
        is read with a margin wider than the anti-aliasing Gaussian (OpenCV's bit-exact 8-bit blur,
        sigma = (factor - 1) / 2 when shrinking, as skimage.transform.resize), so borders never matter.
        """
        import cv2

        f = self.factor
        sigma = max(0.0, (f - 1.0) / 2.0)
        margin = int(math.ceil(4 * sigma)) + 2
        wx, wy = int(math.floor(x * f)) - margin, int(math.floor(y * f)) - margin
        ww = int(math.ceil((x + size) * f)) + margin - wx
        wh = int(math.ceil((y + size) * f)) + margin - wy
        window = self._read_level(wx, wy, ww, wh)
        if sigma > 0:
            window = cv2.GaussianBlur(window, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)

        def axis(start: int, origin: int) -> tuple[np.ndarray, np.ndarray]:
            # output index -> global target index -> level coordinate of its centre -> (window pixel, 1/32 step)
            g = (np.arange(start, start + size, dtype=np.float64) + 0.5) * f - 0.5
            whole = np.floor(g)
            frac = np.rint((g - whole) * 32).astype(np.int64)
            whole = whole.astype(np.int64) + (frac == 32)
            return whole - origin, frac % 32

        ix, fx = axis(x, wx)
        iy, fy = axis(y, wy)
        xy = np.empty((size, size, 2), dtype=np.int16)
        xy[..., 0] = ix[None, :]
        xy[..., 1] = iy[:, None]
        steps = (fy[:, None] * 32 + fx[None, :]).astype(np.uint16)
        return cv2.remap(window, xy, steps, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def composite_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA -> RGB over white; OpenSlide marks pixels outside the scanned area as transparent."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    return np.clip(np.rint(rgb * a + WHITE * (1.0 - a)), 0, 255).astype(np.uint8)


def _block_mean(rgba: np.ndarray, block: int) -> np.ndarray:
    """RGB over white of an RGBA region, averaged over ``block`` x ``block`` pixel blocks (rounded half to even).

    An opaque region (every read inside the scanned area) is averaged with its alpha channel by OpenCV's area
    resize, about 20x faster than numpy's strided block sum, where that is bit-identical to it
    (tests/test_slide.py): factors that are powers of two from 4 (OpenCV's 1/area is exact in float32) and odd
    factors up to 63 (an odd area has no exact ties, and float32 cannot move a mean across a rounding boundary).
    OpenCV rounds ties up for a factor of 2, and misrounds some ties for even factors such as 22 (its float32
    1/area): numpy does those.
    """
    import cv2

    h, w = rgba.shape[0] // block, rgba.shape[1] // block
    exact = (block >= 4 and block & (block - 1) == 0) or (block % 2 == 1 and 3 <= block <= 63)
    if exact and rgba[..., 3].min() == 255:
        return cv2.resize(rgba, (w, h), interpolation=cv2.INTER_AREA)[..., :3]
    rgb = composite_white(rgba)
    if block == 1:  # the level itself: nothing to average
        return rgb
    # exact integer block sums (no float copy of the block), then the rounded mean
    total = rgb.reshape(h, block, w, block, 3).sum(axis=(1, 3), dtype=np.uint32)
    return np.clip(np.rint(total / (block * block)), 0, 255).astype(np.uint8)


def read_overview(slide, path: str | os.PathLike, mpp0: float, target_mpp: float, block_px: int = 4096) -> tuple[np.ndarray, float]:
    """The whole slide at about ``target_mpp`` (coarse), read block by block so memory stays small (at most one
    block of ``block_px``² RGBA per thread in flight).

    Blocks are read by up to 4 threads (OpenSlide decodes outside the GIL). On a level with an integer downsample
    (level 0 included) the rows are also split so that each thread has a strip: a slide without a pyramid is
    averaged down from its full-resolution level, which is most of the time before the first tile is read.
    Elsewhere the blocks stay where they always were: OpenSlide interpolates reads at fractional level positions,
    so moving a block's origin would change its pixels, and the overview (the tissue mask, the cache key) must
    not depend on the machine. Returns (rgb, mpp) where mpp is the exact µm/px of the result (level µm/px x
    integer block factor).
    """
    import concurrent.futures

    import openslide

    from ..threads import current_threads

    level = best_level(slide, mpp0, target_mpp)
    ds = float(slide.level_downsamples[level])
    level_mpp = mpp0 * ds
    block = max(1, int(math.floor(target_mpp / level_mpp + 1e-6)))
    lw, lh = slide.level_dimensions[level]
    out_w, out_h = max(1, lw // block), max(1, lh // block)
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    step = max(1, block_px // block)  # output pixels per read block along each axis
    workers = max(1, min(4, current_threads()))
    step_y = step
    if float(ds).is_integer():  # strips start at whole level pixels: the same pixels wherever they start
        step_y = max(1, min(step, -(-out_h // workers)))

    def read(oy: int, ox: int) -> None:
        bh, bw = min(step_y, out_h - oy), min(step, out_w - ox)
        loc = (int(round(ox * block * ds)), int(round(oy * block * ds)))
        region = np.asarray(slide.read_region(loc, level, (bw * block, bh * block)))
        out[oy : oy + bh, ox : ox + bw] = _block_mean(region, block)

    boxes = [(oy, ox) for oy in range(0, out_h, step_y) for ox in range(0, out_w, step)]
    try:
        if workers == 1 or len(boxes) == 1:
            for box in boxes:
                read(*box)
        else:
            with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="nucseg-overview") as pool:
                for f in [pool.submit(read, *box) for box in boxes]:
                    f.result()
    except openslide.OpenSlideError as err:
        raise SlideError(f"cannot read slide {path}: {_one_line(err)} (truncated or corrupt?)") from None
    return out, level_mpp * block


@dataclass
class TissueMask:
    """Boolean tissue mask of the whole slide at ``mpp`` µm/px, with the RGB overview it came from."""

    mask: np.ndarray
    mpp: float
    overview: np.ndarray

    @property
    def area_mm2(self) -> float:
        return float(self.mask.sum()) * (self.mpp / 1000.0) ** 2


def detect_tissue(
    slide,
    path: str | os.PathLike,
    mpp0: float,
    mpp: float = 8.0,
    min_saturation: float = 0.05,
    max_saturation: float = 0.15,
    min_area_um2: float = 5000.0,
) -> TissueMask:
    """Tissue = saturated (stained) or dark pixels at low resolution, cleaned up morphologically.

    Glass is bright and grey, H&E tissue is coloured: Otsu on saturation separates them. The threshold is
    clamped to [min_saturation, max_saturation]: the floor keeps an all-glass slide empty instead of
    thresholding noise, the ceiling stops Otsu from splitting pink tissue from purple nuclei when a slide
    (or crop) has no glass at all.
    """
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu
    from skimage.morphology import closing, disk, opening, remove_small_holes, remove_small_objects

    overview, eff = read_overview(slide, path, mpp0, mpp)
    hsv = rgb2hsv(overview)
    sat, val = hsv[..., 1], hsv[..., 2]
    thr = min_saturation
    if np.ptp(sat) > 0 and sat.max() > min_saturation:
        thr = float(np.clip(threshold_otsu(sat), min_saturation, max_saturation))
    mask = (sat > thr) | (val < 0.25)  # very dark regions (pen, dense nuclei) count as tissue as well
    radius = max(1, int(round(16.0 / eff)))  # ~16 µm
    mask = closing(mask, disk(radius))
    mask = opening(mask, disk(max(1, radius // 2)))
    min_px = max(1, int(min_area_um2 / eff**2))
    mask = remove_small_objects(mask, max_size=min_px - 1) if min_px > 1 else mask
    mask = remove_small_holes(mask, max_size=min_px - 1) if min_px > 1 else mask
    return TissueMask(mask=mask.astype(bool), mpp=eff, overview=overview)


def write_tissue_preview(path: str | os.PathLike, tissue: TissueMask, tile_boxes: np.ndarray | None = None) -> None:
    """PNG of the overview with the tissue outline (green) and kept tiles (blue boxes), written atomically."""
    from skimage.draw import rectangle_perimeter
    from skimage.segmentation import find_boundaries

    from ..io import save_png

    img = tissue.overview.copy()
    img[find_boundaries(tissue.mask, mode="inner")] = (0, 160, 0)
    if tile_boxes is not None:
        h, w = img.shape[:2]
        for x0, y0, x1, y1 in np.asarray(tile_boxes, dtype=np.float64):
            rr, cc = rectangle_perimeter((int(y0), int(x0)), end=(int(y1) - 1, int(x1) - 1), shape=(h, w), clip=True)
            img[rr, cc] = (40, 80, 220)
    save_png(path, img)


def _slide_name(slide) -> str:
    return str(getattr(slide, "_filename", "slide"))


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
