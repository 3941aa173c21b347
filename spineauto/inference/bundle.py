"""Opening bundles: a zip (``spineauto export``) that ``predict`` and ``pipeline`` accept directly.

A bundle holds one top-level folder: a model folder (``plans.json``, ``dataset.json``,
``postprocessing.json`` when decided, the chosen checkpoints; no raw or preprocessed data, as
nnU-Net's model zips) or a pipeline (``pipeline.yaml`` and its model folders). Opening a bundle
extracts it once per process into a temporary folder that is removed at exit.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
import zipfile
from pathlib import Path

from spineauto.errors import SpineautoError
from spineauto.io.atomic import write_atomic

_opened: dict[Path, Path] = {}


def write_zip(target: Path, write) -> Path:
    if target.suffix != ".zip":
        raise SpineautoError(f"{target}: a bundle is a .zip file; name it e.g. model.zip")
    return write_atomic(target, write, suffix=".zip")


def open_bundle(path: Path) -> Path:
    """The folder a bundle unpacks to (once per process); its single top-level folder."""
    path = Path(path).resolve()
    if path in _opened:
        return _opened[path]
    if not zipfile.is_zipfile(path):
        raise SpineautoError(f"{path}: not a zip bundle; write one with `spineauto export`")
    dest = Path(tempfile.mkdtemp(prefix="spineauto_bundle_"))
    atexit.register(shutil.rmtree, dest, True)
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if name.startswith("/") or ".." in Path(name).parts:
                raise SpineautoError(f"{path}: unsafe path {name!r} in the bundle; refusing to unpack it")
        z.extractall(dest)
    tops = [p for p in dest.iterdir()]
    if len(tops) != 1 or not tops[0].is_dir():
        raise SpineautoError(f"{path}: a bundle holds exactly one top-level folder; rewrite it with `spineauto export`")
    _opened[path] = tops[0]
    return tops[0]


def model_folder_of(path: Path) -> Path:
    """A model folder, or the folder inside a model bundle (.zip)."""
    path = Path(path)
    return open_bundle(path) if path.is_file() and path.suffix == ".zip" else path
