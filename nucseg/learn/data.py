"""NuInsSeg-layout datasets: discovery with precise errors, loading, and cutting into model-sized tiles.

Layout (one folder per organ)::

    <root>/<organ>/tissue images/<stem>.png
    <root>/<organ>/label masks modify/<stem>.tif          instance labels, 0 = background
    <root>/<organ>/vague areas/mask binary/<stem>.png     ambiguous regions (optional)

``root`` may also be a single organ folder. Problems are reported by file name, before any training starts,
so that a bad dataset never costs a night's run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, InputError
from ..io import IMAGE_SUFFIXES, read_label_map, read_mask, read_rgb

log = logging.getLogger(__name__)

IMAGES_DIR = "tissue images"
LABELS_DIR = "label masks modify"
MASK_DIR = "mask binary"  # NuInsSeg's binary nucleus masks (written by the demo, not read)
VAGUE_DIR = Path("vague areas") / MASK_DIR


@dataclass(frozen=True)
class SampleFiles:
    """Paths of one annotated tile."""

    organ: str
    stem: str
    image: Path
    labels: Path
    ambiguous: Path | None


@dataclass
class Tile:
    """One model-sized training/evaluation tile in memory."""

    name: str  # "<stem>" or "<stem>@y,x" when cut from a larger image
    organ: str
    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) int32
    ambiguous: np.ndarray | None  # (H, W) bool

    @property
    def stem(self) -> str:
        return self.name.split("@")[0]


def organ_dirs(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.exists():
        raise InputError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise InputError(f"dataset path is not a folder: {root}")
    if (root / IMAGES_DIR).is_dir():
        return [root]
    organs = sorted(p for p in root.iterdir() if p.is_dir() and (p / IMAGES_DIR).is_dir())
    if not organs:
        raise DataError(f"no NuInsSeg organ folders under {root} (expected <organ>/{IMAGES_DIR}/*.png)")
    return organs


def discover(root: str | Path) -> list[SampleFiles]:
    """List every annotated tile under ``root``; a missing label file is an error naming it."""
    samples: list[SampleFiles] = []
    for organ in organ_dirs(root):
        files = sorted(p for p in (organ / IMAGES_DIR).iterdir() if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        for other in set(files) - set(images):
            log.warning("ignoring non-image file %s", other)
        if not images:
            raise DataError(f"no images in {organ / IMAGES_DIR}")
        for img in images:
            labels = next((organ / LABELS_DIR / (img.stem + s) for s in (".tif", ".tiff", ".png")
                           if (organ / LABELS_DIR / (img.stem + s)).is_file()), None)
            if labels is None:
                raise DataError(f"missing label file {organ / LABELS_DIR / (img.stem + '.tif')} for image {img}")
            vague = organ / VAGUE_DIR / (img.stem + ".png")
            samples.append(SampleFiles(organ.name, img.stem, img, labels, vague if vague.is_file() else None))
    stems = [s.stem for s in samples]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})[:3]
        raise DataError(f"tile names must be unique across organs; duplicated: {dup}")
    return samples


def load_sample(files: SampleFiles) -> Tile:
    """Read one tile; image/label size mismatch is an error naming both files."""
    try:
        image = read_rgb(files.image)
        labels = read_label_map(files.labels)
        ambiguous = read_mask(files.ambiguous) if files.ambiguous else None
    except InputError as err:
        raise DataError(str(err)) from None
    if image.shape[:2] != labels.shape:
        raise DataError(f"size mismatch: {files.image} is {image.shape[1]}x{image.shape[0]} but "
                        f"{files.labels} is {labels.shape[1]}x{labels.shape[0]}")
    if ambiguous is not None and ambiguous.shape != labels.shape:
        raise DataError(f"size mismatch: ambiguous mask {files.ambiguous} does not match {files.labels}")
    if labels.min() < 0:
        raise DataError(f"negative instance ids in {files.labels}")
    return Tile(files.stem, files.organ, image, labels, ambiguous)


def cut_tiles(tile: Tile, size: int, fill: int = 255) -> list[Tile]:
    """Cut an image larger than ``size`` into ``size`` tiles (edges padded with ``fill``, labels with 0).

    Smaller images are returned as they are: the encoder pads them itself.
    """
    h, w = tile.labels.shape
    if h <= size and w <= size:
        return [tile]
    out = []
    for y in range(0, h, size):
        for x in range(0, w, size):
            img = np.full((size, size, 3), fill, np.uint8)
            lab = np.zeros((size, size), np.int32)
            amb = None if tile.ambiguous is None else np.zeros((size, size), bool)
            crop = np.s_[y : y + size, x : x + size]
            ch, cw = tile.labels[crop].shape
            img[:ch, :cw] = tile.image[crop]
            lab[:ch, :cw] = tile.labels[crop]
            if amb is not None:
                amb[:ch, :cw] = tile.ambiguous[crop]
            out.append(Tile(f"{tile.name}@{y},{x}", tile.organ, img, lab, amb))
    return out


def load_dataset(root: str | Path, tile_size: int | None = 512, drop_empty: bool = False) -> list[Tile]:
    """Load every tile of ``root`` cut to ``tile_size`` (None: whole images); ``drop_empty`` removes tiles with no
    nuclei."""
    samples = (load_sample(files) for files in discover(root))
    tiles = [t for s in samples for t in (cut_tiles(s, tile_size) if tile_size else [s])]
    if drop_empty:
        tiles = [t for t in tiles if t.labels.any()]
    if not tiles:
        raise DataError(f"no usable tiles in {root}")
    return tiles


def summarize(tiles: list[Tile]) -> dict:
    """Data summary stored in adapter metadata: what the model was trained on."""
    organs = sorted({t.organ for t in tiles})
    return {
        "tiles": len(tiles),
        "images": len({t.stem for t in tiles}),
        "organs": organs,
        "nuclei": int(sum(len(np.unique(t.labels)) - 1 for t in tiles)),
        "tile_size": int(max(max(t.labels.shape) for t in tiles)),
        "with_ambiguous_masks": int(sum(t.ambiguous is not None for t in tiles)),
    }


def few_shot(tiles: list[Tile], exemplars: int, synthesize_per: int | None, seed: int) -> list[Tile]:
    """Keep ``exemplars`` tiles (seeded choice) and optionally add exemplar-guided synthetic tiles
    (nuclei with their masks pasted onto other exemplars' backgrounds; see :mod:`nucseg.learn.synthesis`)."""
    if exemplars < 1:
        raise InputError("--exemplars must be >= 1")
    if exemplars > len(tiles):
        raise DataError(f"--exemplars {exemplars} but the dataset has only {len(tiles)} tiles")
    rng = np.random.default_rng(seed)
    chosen = [tiles[i] for i in sorted(rng.choice(len(tiles), exemplars, replace=False))]
    if not synthesize_per:
        return chosen
    from .synthesis import SynthesisConfig, synthesize

    pairs = synthesize([(t.image, t.labels) for t in chosen], n=synthesize_per * exemplars, rng=rng,
                       cfg=SynthesisConfig(n_per_exemplar=synthesize_per, seed=seed))
    return chosen + [Tile(f"synthetic_{i:04d}", "synthetic", img, lab, None) for i, (img, lab) in enumerate(pairs)]
