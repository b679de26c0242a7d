"""Label maps for plain images (``nucseg segment``): which files, where their outputs go, and writing them.

The output plan is settled before the model runs: two inputs that would write the same ``<stem>.tif`` are
refused, as is an output folder that is an input folder (a rerun would read the label maps as images) and
any existing file there that nucseg did not write.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError
from .io import IMAGE_SUFFIXES, SOFTWARE, atomic_path, check_output, is_nucseg_tiff
from .segmenter import TileSegmenter


def plan_outputs(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, label map path) for every image given or found (not recursively) in a given folder."""
    out_dir = Path(out_dir)
    files: list[Path] = []
    for path in map(Path, inputs):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"input not found: {path}")
    if not files:
        raise InputError("no images to segment")
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems and stems[f.stem].resolve() != f.resolve():
            raise InputError(f"{stems[f.stem]} and {f} would both write {out_dir / (f.stem + '.tif')}; "
                             f"rename one or segment them separately")
        stems[f.stem] = f
    plan = [(f, out_dir / f"{f.stem}.tif") for f in dict.fromkeys(stems.values())]
    for _, out in plan:
        check_output(out, is_nucseg_tiff, inputs=[*inputs, *(f for f, _ in plan)])
    return plan


def segment_image(segmenter: TileSegmenter, image: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """Instance labels (H, W) of one RGB image; larger than the model input: the seam-correct grid of predict."""
    from .model.infer import segment_tiles

    return segment_tiles(segmenter, [image], batch_size)[0]


def write_label_map(path: str | os.PathLike, labels: np.ndarray) -> None:
    """uint16 (uint32 past 65,535 nuclei) TIFF, tagged as nucseg's so a rerun may replace it."""
    import tifffile

    dtype = np.uint32 if labels.max(initial=0) > 65535 else np.uint16
    with atomic_path(path, owned=is_nucseg_tiff) as tmp:
        tifffile.imwrite(tmp, labels.astype(dtype), software=SOFTWARE)
