"""Atomic writes: write to a temporary name in the same folder, then rename.

A killed run therefore never leaves a half-written plan, checkpoint or prediction behind.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


@contextmanager
def atomic_path(target: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; it replaces ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes 0600; results get the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except OSError as e:
        if e.filename is None or Path(e.filename) == tmp_path:  # name what was being written, not the temporary
            raise OSError(e.errno, e.strerror or str(e) or type(e).__name__, str(target)) from e
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(target: Path | str, writer: Callable[[Path], Any], suffix: str = "") -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``target``."""
    with atomic_path(target, suffix) as tmp:
        writer(tmp)
    return Path(target)


def write_json(target: Path | str, data: Any) -> Path:
    """Write ``data`` as standard JSON (NaN and infinities become null, see :func:`json_safe`)."""
    text = json.dumps(json_safe(data), indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    return write_atomic(target, lambda p: p.write_text(text + "\n"))


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None, through dicts, lists and tuples."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def read_json(path: Path | str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except RecursionError:  # a hostile file of nested brackets: a ValueError as any other invalid JSON
        raise ValueError("nested too deeply") from None


def save_npy(target: Path | str, array: np.ndarray) -> Path:
    def _write(p: Path) -> None:
        with open(p, "wb") as f:
            np.save(f, array)

    return write_atomic(target, _write)


def save_nifti(target: Path | str, image: Any) -> Path:
    """Save a nibabel image atomically (the temporary name keeps the .nii.gz ending)."""
    import nibabel as nib

    ending = ".nii.gz" if str(target).endswith(".nii.gz") else ".nii"
    return write_atomic(target, lambda p: nib.save(image, str(p)), suffix=ending)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic, np.ndarray)):
        return json_safe(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")
