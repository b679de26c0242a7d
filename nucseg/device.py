"""Which torch device a run uses; shared by training, calibration, cv and inference, so that whole-slide
inference does not import the training code to pick one."""

from __future__ import annotations

import torch

from .errors import InputError

from .choices import DEVICES  # noqa: F401 - the names --device accepts


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the CUDA GPU if there is one, else the CPU; an explicit ``cuda`` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(name)
