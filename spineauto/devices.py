"""The one place that turns ``--device auto|cpu|cuda[:N]`` into a torch device."""
from __future__ import annotations

import torch

from spineauto.errors import SpineautoError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SpineautoError(f"--device {name}: no CUDA GPU is visible; use --device cpu or auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise SpineautoError(f"--device {name!r}: use auto, cpu or cuda")
