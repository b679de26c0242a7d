"""A small synthetic H&E dataset in the NuInsSeg layout, so the pipeline can be tried on a fresh machine.

Tiles are rendered in optical-density space with the reference haematoxylin and eosin vectors of Macenko et
al. (2009), so stain mixing, dark rims and pale nuclei blend the way real stains do rather than as flat
colours: pink eosin stroma with smooth and fibrous texture and a few clear spaces, purple haematoxylin nuclei
as irregular ellipses about 8-20 px across with a darker rim and chromatin grain, some touching, a few pale.
The two default organs differ in colour, nucleus size and density. ``cells="mixed"`` (the demo's own tiles
and slide) renders other tissue: large vesicular nuclei (pale chromatin, dark membrane, a nucleolus) next to
small dark lymphocytes, denser and more often touching, so that a base trained on the default tiles has
something to adapt to. It is demo data only: nothing learnt on it says anything about real tissue.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi

from .data import IMAGES_DIR, LABELS_DIR, MASK_DIR, VAGUE_DIR
from ..errors import InputError
from ..io import SOFTWARE, atomic_path, is_nucseg_tiff, save_png

# optical density per unit stain (R, G, B); Macenko et al.'s reference vectors, typical of real H&E scans
_H_VEC = np.array([0.5626, 0.7201, 0.4062], np.float32)
_E_VEC = np.array([0.2159, 0.8012, 0.5581], np.float32)
# H and E vectors by name: Macenko's reference (the default) and Ruifrok & Johnston's (2001; scikit-image's
# rgb2hed), a bluer haematoxylin and a redder eosin, as a scan from another lab or scanner looks
STAINS = {
    "macenko": (_H_VEC, _E_VEC),
    "ruifrok": (np.array([0.65, 0.70, 0.29], np.float32), np.array([0.07, 0.99, 0.11], np.float32)),
}


@dataclass(frozen=True)
class _Style:
    eosin: float  # stroma eosin optical density
    hema: float  # nucleus haematoxylin optical density
    density: float  # nuclei per 10,000 px²
    semi_axis: tuple[float, float]  # long semi-axis range in px (diameters 8-20 px)
    pale: float  # fraction of pale nuclei
    clear: float  # fraction of the tile that is clear space (fat, oedema, tears)
    # cells="mixed" only (0 elsewhere, leaving the "uniform" tiles bit for bit as they were):
    small: float = 0.0  # fraction of small, round, dark lymphocytes (semi-axis SMALL_AXIS)
    vesicular: float = 0.0  # fraction of large vesicular nuclei: pale chromatin, dark membrane, a nucleolus
    touch: float = 0.25  # chance a nucleus is placed against the previous one (touching pairs and clusters)


SMALL_AXIS = (4.6, 5.6)  # px at render resolution: 18-22 px across at zoom 2 (a 16 px patch of vit_tiny or more)
VESICULAR_AXIS = (10.0, 12.5)  # 40-50 px across at zoom 2, beyond the "uniform" tiles' 8-20 px (16-40)
CELLS = ("uniform", "mixed")


def _style(t: float) -> _Style:
    """Interpolate between a sparse, pink organ (t = 0) and a dense, purple one with larger nuclei (t = 1)."""

    def mix(a: float, b: float) -> float:
        return a + (b - a) * t

    return _Style(
        eosin=mix(0.6, 0.45),
        hema=mix(1.4, 1.8),
        density=mix(5.0, 9.0),
        semi_axis=(mix(4.0, 5.0), mix(8.0, 10.0)),
        pale=mix(0.08, 0.04),
        clear=mix(0.08, 0.04),
    )


def _mixed_style(t: float) -> _Style:
    """Tissue unlike the "uniform" one in the ways real tissue is unlike what a generic model saw: a tumour-like
    organ (t = 0) of large vesicular nuclei among lymphocytes, and a lymphocyte-rich one (t = 1), both dense and
    full of touching nuclei."""

    def mix(a: float, b: float) -> float:
        return a + (b - a) * t

    return _Style(eosin=mix(0.55, 0.5), hema=mix(1.6, 1.7), density=mix(11.0, 14.0), semi_axis=(5.0, 7.5),
                  pale=0.0, clear=mix(0.05, 0.03), small=mix(0.3, 0.5), vesicular=mix(0.5, 0.25), touch=0.4)


def make_demo_dataset(
    root: str | os.PathLike,
    organs: tuple[str, ...] = ("demo organ a", "demo organ b"),
    tiles_per_organ: int = 6,
    size: int = 256,
    seed: int = 0,
    zoom: int = 1,
    stain: str = "macenko",
    cells: str = "uniform",
) -> Path:
    """Write the demo dataset under ``root`` and return ``root``.

    Layout per organ: ``tissue images/<stem>.png`` (RGB), ``label masks modify/<stem>.tif`` (uint16
    instances), ``mask binary/<stem>.png`` and ``vague areas/mask binary/<stem>.png`` (0/255; an ambiguous
    smudge on about half the tiles, empty on the others). Every tile depends only on (seed, organ index,
    tile index, zoom), and every file is written atomically.

    ``zoom``: the tissue is rendered at ``size / zoom`` px and scanned at ``zoom`` x the magnification (image
    resampled bilinearly, labels by nearest neighbour): nuclei ``zoom`` times larger, as a 40x scan of the
    same tissue shows them compared with a 20x one. ``stain``: the H and E vectors (:data:`STAINS`).
    ``cells``: "uniform" (one kind of nucleus, 8-20 px, a quarter of them touching: what the demo base is
    trained on) or "mixed" (:func:`_mixed_style`: large vesicular nuclei next to small dark lymphocytes, denser,
    40 % placed against a neighbour: the demo's own tiles, what fine-tuning has to adapt to).
    """
    if stain not in STAINS:
        raise InputError(f"unknown demo stain {stain!r}; choose one of {', '.join(STAINS)}")
    if cells not in CELLS:
        raise InputError(f"unknown demo cells {cells!r}; choose one of {', '.join(CELLS)}")
    style_of = _style if cells == "uniform" else _mixed_style
    if not organs or tiles_per_organ < 1 or size < 64 or zoom < 1 or size % zoom:
        raise InputError("demo dataset needs at least one organ, one tile, a tile size of at least 64 px and a "
                         "zoom >= 1 that divides it")
    root = Path(root)
    for o, organ in enumerate(organs):
        style = style_of(o / (len(organs) - 1) if len(organs) > 1 else 0.0)
        slug = re.sub(r"[^0-9a-zA-Z]+", "_", organ).strip("_").lower() or f"organ{o}"
        for i in range(tiles_per_organ):
            rng = np.random.default_rng([seed, o, i])
            image, labels, vague = render_tile(size // zoom, style, rng, stain)
            if zoom > 1:
                image = np.clip(np.rint(ndi.zoom(image.astype(np.float32), (zoom, zoom, 1), order=1,
                                                 grid_mode=True, mode="nearest")), 0, 255).astype(np.uint8)
                labels, vague = (np.kron(a, np.ones((zoom, zoom), a.dtype)) for a in (labels, vague))
            stem = f"{slug}_{i + 1:02d}"
            _write_png(root / organ / IMAGES_DIR / f"{stem}.png", image)
            with atomic_path(root / organ / LABELS_DIR / f"{stem}.tif", owned=is_nucseg_tiff) as tmp:
                tifffile.imwrite(tmp, labels.astype(np.uint16), software=SOFTWARE)
            _write_png(root / organ / MASK_DIR / f"{stem}.png", _binary(labels > 0))
            _write_png(root / organ / VAGUE_DIR / f"{stem}.png", _binary(vague))
    return root


def make_demo_slide(
    path: str | os.PathLike, px: int, seed: int = 1, stain: str = "macenko", cells: str = "uniform",
    mpp: float = 0.5
) -> np.ndarray:
    """A pyramidal TIFF slide (``px`` x ``px`` at ``mpp`` µm/px) of the same tissue as :func:`make_demo_dataset`'s
    tiles of that ``stain`` and ``cells`` (the two organs' styles blended half-way), and its true instance labels.

    The tiles are rendered at 1 / ``zoom`` of their resolution and scanned at ``zoom`` x; the slide is that
    render itself: read at ``mpp / zoom`` µm/px (the tiles' own), its nuclei are the tiles' nuclei.
    """
    from ..wsi.synthslide import _write_tiff

    if stain not in STAINS or cells not in CELLS:
        raise InputError(f"unknown demo stain {stain!r} or cells {cells!r}")
    style = (_style if cells == "uniform" else _mixed_style)(0.5)
    image, labels, _ = render_tile(px, style, np.random.default_rng([seed, 99]), stain)
    _write_tiff(path, image, mpp, pyramid=True, compression="zlib")
    return labels


# Size classes of the demo's nuclei by equivalent diameter in µm (lymphocytes, plain nuclei, vesicular nuclei)
SIZE_CLASSES = (("small (< 5.5 µm)", 0.0, 5.5), ("medium (5.5-8 µm)", 5.5, 8.0), ("large (>= 8 µm)", 8.0, np.inf))


def recall_by_size(truth: np.ndarray, pred: np.ndarray, mpp: float, iou: float = 0.5) -> list[dict]:
    """Per size class of the true nuclei (:data:`SIZE_CLASSES`, diameters from areas at ``mpp`` µm/px): how many
    there are, how many a predicted instance matches at IoU >= ``iou``, and that recall."""
    from ..wsi.synthslide import match_instances

    ia, _, overlap = match_instances(truth, pred)
    found = np.zeros(int(truth.max()) + 1, bool)
    found[ia[overlap >= iou]] = True
    area = np.bincount(truth.ravel(), minlength=len(found))
    ids = np.flatnonzero(area)
    ids = ids[ids > 0]
    diameter = 2 * np.sqrt(area[ids] / np.pi) * mpp
    rows = []
    for name, lo, hi in SIZE_CLASSES:
        sel = ids[(diameter >= lo) & (diameter < hi)]
        n, k = len(sel), int(found[sel].sum())
        rows.append({"size": name, "nuclei": n, "found": k, "missed": n - k, "recall": k / n if n else None})
    return rows


def render_tile(
    size: int, style: _Style, rng: np.random.Generator, stain: str = "macenko"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one tile: (RGB uint8 (size, size, 3), labels int32 1..n, vague-area mask bool)."""
    shape = (size, size)
    field = _noise(rng, shape, 10)
    clear = field > np.quantile(field, 1 - style.clear)
    fibres = _fibres(rng, size)
    eosin = style.eosin * np.clip(1 + 0.25 * _noise(rng, shape, 8) + 0.12 * fibres, 0.2, None)
    hema = 0.12 + 0.04 * _noise(rng, shape, 3)
    keep = np.where(clear, 0.12, 1.0)
    eosin, hema = eosin * keep, hema * keep

    labels = np.zeros(shape, np.int32)
    blocked = np.zeros(shape, bool)
    vague = np.zeros(shape, bool)
    if rng.random() < 0.5:  # an out-of-focus smudge that annotators would mark as ambiguous
        cy, cx = rng.uniform(0.15 * size, 0.85 * size, 2)
        r = rng.uniform(8, 16)
        yy, xx = np.ogrid[:size, :size]
        vague = (yy - cy) ** 2 + ((xx - cx) / rng.uniform(0.7, 1.0)) ** 2 <= r**2
        hema = hema + 0.45 * style.hema * ndi.gaussian_filter(vague.astype(np.float32), 3)
        blocked = ndi.binary_dilation(vague, iterations=3)

    grain = _noise(rng, shape, 1.0)
    n_target = int(round(style.density * size * size / 1e4))
    last: tuple[float, float, float] | None = None
    count = 0
    for _ in range(4 * n_target):
        if count >= n_target:
            break
        kind = "plain"
        if style.small or style.vesicular:  # (no draw otherwise: the "uniform" tiles stay as they were)
            u = rng.random()
            kind = "small" if u < style.small else "vesicular" if u < style.small + style.vesicular else "plain"
        a = rng.uniform(*{"plain": style.semi_axis, "small": SMALL_AXIS, "vesicular": VESICULAR_AXIS}[kind])
        if last is not None and rng.random() < style.touch:  # against the previous nucleus: touching pair
            phi = rng.uniform(0, 2 * np.pi)
            d = 0.85 * (last[2] + a)
            cy, cx = last[0] + d * np.sin(phi), last[1] + d * np.cos(phi)
        else:
            cy, cx = rng.uniform(0, size, 2)
        if _paint_nucleus(labels, count + 1, hema, eosin, blocked, grain, (cy, cx), a, style, rng, kind):
            count += 1
            last = (cy, cx, a)

    h_vec, e_vec = STAINS[stain]
    od = hema[..., None] * h_vec + eosin[..., None] * e_vec
    od = ndi.gaussian_filter(od, (0.6, 0.6, 0))  # optics: nothing in a scan has perfectly sharp edges
    rgb = 255.0 * np.exp(-od) + rng.normal(0, 2.0, od.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), labels, vague


def _paint_nucleus(
    labels: np.ndarray,
    new_id: int,
    hema: np.ndarray,
    eosin: np.ndarray,
    blocked: np.ndarray,
    grain: np.ndarray,
    centre: tuple[float, float],
    a: float,
    style: _Style,
    rng: np.random.Generator,
    kind: str = "plain",
) -> bool:
    """Rasterise an irregular ellipse as ``new_id`` into free pixels of ``labels``, its stain into the maps.

    ``kind``: "plain" (solid chromatin with a darker rim, a few pale), "small" (a lymphocyte: round, dark,
    dense) or "vesicular" (large, pale chromatin with coarse grain, a dark nuclear membrane and a nucleolus).
    Returns False, painting nothing, when less than 80 % of it is free: an overlapped nucleus is a sliver.
    """
    b = a * rng.uniform(0.85, 1.0) if kind == "small" else a * rng.uniform(0.55, 0.95)
    theta = rng.uniform(0, np.pi)
    k = np.arange(2, 5)
    amp, phase = rng.uniform(0, 0.08, 3), rng.uniform(0, 2 * np.pi, 3)
    pale = rng.random() < style.pale
    cy, cx = centre
    size = labels.shape[0]
    reach = int(np.ceil(a * 1.3)) + 1
    y0, y1 = max(int(cy) - reach, 0), min(int(cy) + reach + 1, size)
    x0, x1 = max(int(cx) - reach, 0), min(int(cx) + reach + 1, size)
    if y1 - y0 < 3 or x1 - x0 < 3:
        return False
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    u = ((xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)) / a
    v = (-(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)) / b
    phi = np.arctan2(v, u)
    edge = 1 + (amp[:, None, None] * np.cos(k[:, None, None] * phi + phase[:, None, None])).sum(0)
    rho = np.hypot(u, v) / edge  # 1 on the outline
    inside = rho <= 1
    free = inside & (labels[y0:y1, x0:x1] == 0) & ~blocked[y0:y1, x0:x1]
    if free.sum() < max(0.8 * inside.sum(), 20):
        return False
    labels[y0:y1, x0:x1][free] = new_id
    level = style.hema * (0.35 if pale else rng.uniform(0.8, 1.1))
    if kind == "small":
        stain = 1.3 * level * (0.9 + 0.15 * rho**4) * np.clip(1 + 0.1 * grain[y0:y1, x0:x1], 0.3, None)
    elif kind == "vesicular":
        membrane = np.clip((rho - 0.8) / 0.12, 0, 1)  # the outer ~15 % of the radius
        ny, nx = np.array([cy, cx]) + rng.uniform(-0.3, 0.3, 2) * b
        nucleolus = np.hypot(yy - ny, xx - nx) <= rng.uniform(1.0, 1.5)
        chromatin = 0.3 * np.clip(1 + 0.6 * grain[y0:y1, x0:x1], 0.2, None)
        stain = level * np.where(nucleolus, 1.2, np.maximum(chromatin, membrane))
    else:
        stain = level * (0.75 + 0.35 * rho**4) * np.clip(1 + 0.2 * grain[y0:y1, x0:x1], 0.3, None)
    hema[y0:y1, x0:x1][free] = stain[free]
    eosin[y0:y1, x0:x1][free] *= 0.35
    return True


def _noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]
) -> np.ndarray:
    """Smooth Gaussian noise with unit standard deviation (the texture of stroma, clear spaces, chromatin)."""
    field = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return field / (field.std() + 1e-8)


def _fibres(rng: np.random.Generator, size: int) -> np.ndarray:
    """Stroma fibre texture: noise stretched along one random direction per tile."""
    big = int(np.ceil(size * 1.5))
    field = _noise(rng, (big, big), (1.0, 5.0))
    field = ndi.rotate(field, rng.uniform(0, 180), reshape=False, order=1, mode="wrap")
    o = (big - size) // 2
    field = field[o : o + size, o : o + size]
    return field / (field.std() + 1e-8)


def _binary(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, 255, 0).astype(np.uint8)


def _write_png(path: Path, array: np.ndarray) -> None:
    save_png(path, array)  # tagged as nucseg's: a rerun replaces its own files only


# The demo base (scripts/make_demo_base.py) is trained on these organs and seed, never on the demo's own tiles.
BASE_ORGANS = ("base organ a", "base organ b", "base organ c")
BASE_SEED = 1000
BASE_STAIN = "macenko"  # the demo's own tiles use another stain (DemoRecipe.stain): what fine-tuning adapts to
BASE_DIR = Path(__file__).resolve().parents[2] / "adapters" / "demo-base"
BASE_FILE = "sam_vit_tiny_demo.safetensors"
BASE_INFO = "base.json"
KIND = "nucseg-demo-base"  # base.json's "kind"


@dataclass(frozen=True)
class BaseRecipe:
    """The demo base's pinned build (``scripts/make_demo_base.py``): vit_tiny from random init, method ``full``.

    From a plain random init the model first answers every prompt with a mask of every nucleus in the tile
    (train IoU ~0.2) and learns to pick out the prompted one only after ~200-260 steps (docs/BENCHMARKS.md,
    "Demo recipe"). ``pe_scale`` shrinks the prompt encoder's random Fourier frequencies (SAM: a Gaussian
    matrix of scale 1, a buffer saved with the weights): at 0.5 the positional kernel is wide enough on the
    8 x 8 token grid of a 128 px tile that a point's token and the image tokens around it are similar from the
    first step, and the plateau ends after ~100 steps instead. With twice the first recipe's learning rate,
    50 epochs (half its steps, ~5 min on one core) give a base within the folds' spread of its 100 epochs'
    in the demo; what comes after the plateau does not shorten further (docs/BENCHMARKS.md, "Demo recipe").
    """

    tiles_per_organ: int = 64
    epochs: int = 50
    batch_size: int = 8
    lr: float = 4e-3
    warmup_fraction: float = 0.05
    pe_scale: float = 0.5  # multiplies SAM's prompt-encoder Fourier matrix at init (1.0 = SAM's own)
    box_fraction: float = 0.5
    positive_prompts: int = 16
    calibration_fraction: float = 0.1
    seed: int = 0

    def train_config(self, device: str = "cpu"):
        from .train import TrainConfig

        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           warmup_fraction=self.warmup_fraction, box_fraction=self.box_fraction, balance_ce=True,
                           positive_prompts=self.positive_prompts, calibration_fraction=self.calibration_fraction,
                           seed=self.seed, device=device, foreground_head=False)

    def init_model(self, size: int):
        """The build's starting point: the seeded random init of vit_tiny at ``size`` px with the prompt encoder's
        Fourier matrix scaled by ``pe_scale`` (deterministic)."""
        import torch

        from ..model.sam import load_sam

        model, _ = load_sam("vit_tiny", None, img_size=size, seed=self.seed)
        with torch.no_grad():
            model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(self.pe_scale)
        return model

    def init_checkpoint(self, path: str | os.PathLike, size: int) -> Path:
        """:meth:`init_model` written as a checkpoint (official keys, safetensors; the same bytes every time, so a
        resumed build finds the same fingerprint)."""
        from ..model.adapter import export_merged

        return export_merged(self.init_model(size), Path(path))


BASE = BaseRecipe()


def demo_base(folder: str | os.PathLike | None = None) -> Path:
    """The demo's pre-trained base checkpoint, checked against the SHA-256 recorded when it was built.

    It is committed to the repository (``adapters/demo-base/``, 3 MB of safetensors built from synthetic data,
    the one weight file in git); ``scripts/make_demo_base.py --install`` rebuilds it there with a new record
    (``base.json``: SHA-256, command, machine, date). A missing or altered file is an error here, before any work.
    """
    import json

    from ..errors import CheckpointError
    from ..io import sha256_file

    folder = Path(folder) if folder is not None else BASE_DIR
    path, info = folder / BASE_FILE, folder / BASE_INFO
    if not path.is_file() or not info.is_file():
        raise CheckpointError(f"the demo base is missing ({path}; it is part of the repository): restore it with "
                              "git checkout -- adapters/demo-base, or rebuild it with: python "
                              "scripts/make_demo_base.py --install")
    try:
        want = json.loads(info.read_text(encoding="utf-8"))["sha256"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"{info} is not a demo-base record (no sha256)") from None
    if sha256_file(path) != want:
        raise CheckpointError(f"{path} does not match the SHA-256 recorded in {info}: altered or damaged; "
                              "rebuild it with: python scripts/make_demo_base.py --install")
    return path


@dataclass(frozen=True)
class DemoRecipe:
    """Everything the demo trains and predicts with; :data:`QUICK` is ``make demo``, :data:`FULL` the long one.

    The demo does what a user does with the official vit_b: it fine-tunes a pre-trained base on tissue the
    base never saw (``stain`` and ``cells`` differ from the base's: another stain, vesicular nuclei and
    lymphocytes, more touching), calibrates the inference thresholds on held-back tiles and scores the base
    beside the result. The base is the small ``vit_tiny`` SAM of ``adapters/demo-base`` (:func:`demo_base`,
    committed), pre-trained on "uniform" synthetic tiles of other seeds by ``scripts/make_demo_base.py``: no
    official weights can be assumed on a
    fresh machine, and a SAM trained from scratch needs far more than a first run's minutes of CPU to learn
    how a point prompt picks out one nucleus (``pretrained=False``; docs/BENCHMARKS.md, "Demo recipe").
    Nuclei span one or two 16 px patches (``zoom``) in small tiles, so every step is cheap.
    """

    tiles_per_organ: int = 48
    size: int = 128  # tile side in px (also the model input)
    zoom: int = 2  # nuclei 16-40 px across
    mpp: float = 0.25  # µm/px of the tiles (the 0.5 µm/px demo slide is read at this resolution)
    folds: int = 2
    epochs: int = 20
    batch_size: int = 8
    lr: float = 2e-3
    # what the folds train: "full" (every weight of the 0.8 M-parameter vit_tiny; LoRA rank 4 on q and v adapts
    # it too little in the demo's 100 steps per fold: docs/BENCHMARKS.md, "Demo recipe"), or "lora"
    finetune: str = "full"
    box_fraction: float = 0.5
    positive_prompts: int = 16
    points_per_side: int = 16
    calibration_fraction: float = 0.2
    slide_px: int = 384  # side of the demo slide at 0.5 µm/px (~240 nuclei)
    overlap: int = 56  # whole-slide tile overlap in px at the tiles' resolution: wider than the largest nucleus
    seed: int = 0
    stain: str = "ruifrok"  # the demo tiles' H and E vectors (the base was trained on BASE_STAIN)
    cells: str = "mixed"  # the demo tiles' nuclei (the base was trained on "uniform" ones; make_demo_dataset)
    pretrained: bool = True  # fine-tune the demo base with LoRA; False: train every weight from random init

    def method(self):
        from ..model.lora import MethodConfig

        # random init: nothing to adapt; "lora": the product's default (rank 4 on q, v, the mask decoder)
        return MethodConfig(method=self.finetune if self.pretrained else "full")

    def checkpoint(self) -> Path | None:
        """The base checkpoint to fine-tune (checked), or None for a random initialisation."""
        return demo_base() if self.pretrained else None

    def train_config(self, device: str = "cpu"):
        from .augment import AugmentConfig
        from .train import TrainConfig

        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, box_fraction=self.box_fraction,
                           balance_ce=True, positive_prompts=self.positive_prompts,
                           calibration_fraction=self.calibration_fraction, seed=self.seed, device=device,
                           augment=AugmentConfig())

    def infer(self) -> dict:
        """Explicit inference settings; the thresholds are left to each adapter's calibration."""
        return {"points_per_side": self.points_per_side}

    def steps(self) -> int:
        """Training steps of the whole cross-validation (for progress and ETA)."""
        import math

        images = self.tiles_per_organ * 2
        per_fold = images - images // self.folds
        train = per_fold - max(1, round(self.calibration_fraction * per_fold))
        return self.folds * self.epochs * math.ceil(train / self.batch_size)


QUICK = DemoRecipe()
FULL = DemoRecipe(tiles_per_organ=96, folds=5, epochs=60, slide_px=1536)


class Eta:
    """Progress in work units (a training step is one) with an ETA from the rate measured so far."""

    def __init__(self, total: float, say):
        import time

        self.total, self.done, self.say = float(total), 0.0, say
        self.t0 = time.perf_counter()
        self._last = -1e9

    def add(self, units: float, what: str | None = None, every: float = 5.0) -> None:
        """Count ``units`` done; print ``what`` with the ETA (at most every ``every`` seconds unless forced)."""
        import time

        self.done = min(self.total, self.done + units)
        now = time.perf_counter()
        if what is not None and (every == 0 or now - self._last >= every):
            self._last = now
            self.say(f"{what}  [{100 * self.done / self.total:3.0f} %, ETA {self.eta()}]")

    def eta(self) -> str:
        import time

        if self.done <= 0:
            return "?"
        left = (time.perf_counter() - self.t0) * (self.total - self.done) / self.done
        return f"{left / 60:.0f} min {left % 60:02.0f} s" if left >= 60 else f"{left:.0f} s"
