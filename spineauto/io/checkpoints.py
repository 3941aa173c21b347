"""Reading and writing checkpoint files (torch pickles), atomically; the only ``torch.load``/``torch.save``."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from spineauto.errors import SpineautoError
from spineauto.io.atomic import atomic_path


def save_checkpoint(path: Path, state: dict) -> Path:
    """``torch.save`` to a temporary name, then rename; a failure leaves the previous file intact."""
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as e:
        raise SpineautoError(f"{path}: could not write the checkpoint ({e}); the previous checkpoint is intact; "
                             "free disk space or fix permissions, then rerun with --continue") from None
    return Path(path)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of ``src`` at ``dst``, atomically: its own file, never a hard link (a damaged
    ``checkpoint_latest.pt`` must not damage ``checkpoint_final.pt``)."""
    try:
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    except OSError as e:
        raise SpineautoError(f"{dst}: could not copy the checkpoint from {Path(src).name} ({e.strerror or e}); "
                             "free disk space or fix permissions, then rerun with --continue") from None
    return Path(dst)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        reason = " ".join(str(e).split())  # one line, whatever the unpickler says
        raise SpineautoError(f"{path}: not a readable checkpoint ({type(e).__name__}: {reason}); delete it, copy it again or pick another") from None


def network_state(ckpt, path: Path) -> dict:
    """The network weights of a spineauto checkpoint (or a bare state dict), without DDP/compile prefixes."""
    state = ckpt.get("network", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpineautoError(f"{path}: no network weights in it (expected a spineauto checkpoint or a state_dict)")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
