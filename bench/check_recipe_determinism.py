"""Is the pinned base recipe deterministic here? Two runs of it, cut to ``--epochs`` (default 1), in fresh
folders, one torch thread: the SHA-256 of the two trained weights must be equal (prints both, exit 1 if not).

A cheap stand-in for building the base twice (20 min each on the shared machine): every epoch runs the same
code, so a difference would show in the first.

    .venv/bin/python bench/check_recipe_determinism.py [--epochs 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BASE_ORGAN, BASE_RECIPE, SAMPLE, sha256  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    recipe = dataclasses.replace(BASE_RECIPE, epochs=args.epochs)

    from nucseg.threads import configure_threads

    configure_threads(recipe.threads)
    from nucseg.model.adapter import WEIGHTS
    from nucseg.learn.data import load_dataset
    from nucseg.model.lora import MethodConfig
    from nucseg.learn.train import finetune

    tiles = load_dataset(SAMPLE / BASE_ORGAN, tile_size=recipe.tile_size, drop_empty=True)
    hashes = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(2):
            res = finetune(tiles, Path(tmp) / f"run{i}", "vit_tiny", None, MethodConfig(method="full"),
                           recipe.train_config())
            hashes.append(sha256(res.adapter / WEIGHTS))
    print("\n".join(hashes))
    print("identical" if hashes[0] == hashes[1] else "DIFFERENT")
    return 0 if hashes[0] == hashes[1] else 1


if __name__ == "__main__":
    sys.exit(main())
