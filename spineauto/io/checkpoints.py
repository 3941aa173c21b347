"""Reading and writing checkpoint files (torch pickles), atomically; the only ``torch.load``/``torch.save``.

A checkpoint is read with ``torch.load(weights_only=True)``: tensors, plain Python data and the few
harmless types our own checkpoints hold (:data:`SAFE_GLOBALS`: numpy arrays, dtypes and scalars as the
RNG state and metric history carry them, paths, torch's version string). Anything else a pickle asks
for (``os.system``, ``builtins.exec``, a class of some module) is refused before it is looked up, so a
checkpoint from elsewhere (a model bundle, ``--pretrained``) cannot run code when it is opened.
"""
from __future__ import annotations

import pathlib
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
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


def _safe_globals() -> list:
    """What our checkpoints may hold besides tensors and plain data, with the names numpy 1 wrote."""
    reconstruct, scalar = np._core.multiarray._reconstruct, np._core.multiarray.scalar
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [np.ndarray, np.dtype, reconstruct, scalar, *dtypes, torch.torch_version.TorchVersion,
            (reconstruct, "numpy.core.multiarray._reconstruct"), (scalar, "numpy.core.multiarray.scalar"),
            pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]


SAFE_GLOBALS = _safe_globals()


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's content, loaded without running code (see the module's docstring); one line on failure."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path) or sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))  # the legacy format: the unpickler's words
        if not unsafe:  # not a refusal: a damaged file (torch's advice to load it unsafely left out)
            reason = str(e).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
            raise _unreadable(path, pickle.UnpicklingError(reason)) from None
        raise SpineautoError(f"{path}: refused: the checkpoint asks to import {', '.join(unsafe[:3])}{' ...' if len(unsafe) > 3 else ''}, "
                             "which could run code on loading; spineauto loads only tensors and plain data from a checkpoint "
                             "(ask its author for one written by spineauto or a plain torch.save(model.state_dict()))") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise _unreadable(path, e) from None


def _unsafe_globals(path: Path) -> list[str]:
    """The names a pickled checkpoint would import that are not allowed (read from its opcodes, nothing run)."""
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception:  # noqa: BLE001 - not a zip checkpoint: the unpickler's own words will do
        return []


def _unreadable(path: Path, e: BaseException) -> SpineautoError:
    reason = " ".join(str(e).split())[:300]  # one line, whatever the unpickler says
    return SpineautoError(f"{path}: not a readable checkpoint ({type(e).__name__}: {reason}); delete it, copy it again or pick another")


def network_state(ckpt, path: Path) -> dict:
    """The network weights of a spineauto checkpoint (or a bare state dict), without DDP/compile prefixes."""
    state = ckpt.get("network", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpineautoError(f"{path}: no network weights in it (expected a spineauto checkpoint or a state_dict)")
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a diverged run's weights predict nothing (empty masks) and train nothing: never a silent result
        raise SpineautoError(f"{path}: {len(bad)} weight tensor(s) hold NaN or infinite values ({bad[0]}{' ...' if len(bad) > 1 else ''}); "
                             "the run that wrote it diverged: pick an earlier checkpoint or retrain")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
