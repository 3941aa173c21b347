"""`spineauto ensemble`: average saved probabilities of several models and write masks.

Every folder holds ``<case>.npz`` written by ``spineauto predict --save-probabilities`` (or by
validation); each npz carries the reference header, so no image is needed to write the mask.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from spineauto.errors import SpineautoError
from spineauto.inference.export import check_writable, read_probabilities, write_mask, write_probabilities
from spineauto.inference.postprocessing import apply_postprocessing

log = logging.getLogger(__name__)


def common_cases(folders: Sequence[Path]) -> list[str]:
    """Case names present as ``.npz`` in every folder; an error names the first gap."""
    if len(folders) < 1:
        raise SpineautoError("ensemble needs at least one -i folder of .npz probabilities")
    sets = []
    for f in folders:
        if not Path(f).is_dir():
            raise SpineautoError(f"{f}: folder not found")
        names = {p.name[:-4] for p in Path(f).glob("*.npz")}
        if not names:
            raise SpineautoError(f"{f}: no <case>.npz probabilities; run `spineauto predict --save-probabilities` into it")
        sets.append(names)
    union = set().union(*sets)
    for f, names in zip(folders, sets):
        missing = sorted(union - names)
        if missing:
            raise SpineautoError(f"{f}: no probabilities for {len(missing)} case(s) present elsewhere (first: {missing[0]}.npz)")
    return sorted(union)


def average_probabilities(files: Sequence[Path]) -> tuple[np.ndarray, object, tuple[int, ...]]:
    """Mean of the probability arrays (float32, accumulated in float64); header/shape of the first."""
    total, header, shape = None, None, None
    for f in files:
        probs, hdr, shp = read_probabilities(f)
        if total is None:
            total, header, shape = probs.astype(np.float64), hdr, shp
        elif probs.shape != total.shape:
            raise SpineautoError(f"{f}: probabilities of shape {probs.shape} differ from {files[0]} {total.shape}; "
                                 "ensemble models with the same labels on the same images")
        else:
            total += probs
    return (total / len(files)).astype(np.float32), header, shape


def ensemble_folders(folders: Sequence[Path], output: Path, save_probabilities: bool = False, postprocessing: dict | None = None,
                     progress: Callable[[str, int, int], None] | None = None) -> list[Path]:
    folders = [Path(f) for f in folders]
    cases = common_cases(folders)
    check_writable(output)
    written = []
    for i, case in enumerate(cases):
        if progress:
            progress(case, i, len(cases))
        probs, header, shape = average_probabilities([f / f"{case}.npz" for f in folders])
        labels = apply_postprocessing(probs.argmax(0).astype(np.uint8), postprocessing or {})
        target = write_mask(output / f"{case}.nii.gz", labels, header=header, shape=shape)
        if save_probabilities:
            write_probabilities(output / f"{case}.npz", probs, target, list(range(probs.shape[0])))
        written.append(target)
    if progress:
        progress("", len(cases), len(cases))
    return written
