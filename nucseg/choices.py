"""What a user can choose, and the bounds of the numbers they give: names and ranges only.

Importable without numpy, torch or segment-anything (stdlib only), so the CLI builds its parser, and answers
``--help``, ``--version`` and shell completion, in milliseconds. Each value is defined here once and
re-exported by the module that uses it (``nucseg.model.lora.METHODS`` is this ``METHODS``). The names of the
registries that live with their data (SAM variants, official weights, datasets) are listed here as well;
tests/test_cli_values.py checks the parser offers exactly the library's values.
"""

DEVICES = ("auto", "cuda", "cpu")  # the names --device accepts
MODEL_TYPES = ("vit_b", "vit_l", "vit_h", "vit_tiny")  # the keys of nucseg.model.sam.SPECS
WEIGHT_NAMES = ("vit_b", "vit_l", "vit_h")  # the keys of nucseg.model.weights.REGISTRY
DATASET_NAMES = ("nuinsseg",)  # the keys of nucseg.learn.datasets.SOURCES

METHODS = ("lora", "decoder", "full", "adapter", "medsa")
MAX_RANK = 256  # far above any rank used for SAM (4-32); a larger one in an adapter is tampering or a mistake
MAX_ADAPTER_DIM = 4096  # bottleneck width; above vit_h's 1280 channels it is no bottleneck (tampering or a typo)
MAX_ADAPTER_SCALE = 100.0

PROMPT_MODES = ("auto", "grid", "centers", "none")
SEGMENTER_KINDS = ("sam", "threshold")  # SegmenterSpec.kind: a SAM model, or the classical threshold baseline
MEASUREMENT_MODES = ("none", "shape", "full")
TILE_SIZE_RANGE = (64, 4096)
# Plausible µm/px of a microscope slide and of a segmentation target: 40x scanners give ~0.12-0.25, thumbnails
# of a few µm/px are still tissue images. Outside this range the value is a unit mistake (a TIFF saved by an
# image editor at 72 dpi reads as 352.8 µm/px), and trusting it would plan absurd grids.
MPP_RANGE = (0.05, 20.0)
