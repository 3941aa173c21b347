"""`spineauto ensemble`: average saved probabilities of several models and write masks.

Every folder holds ``<case>.npz`` written by ``spineauto predict --save-probabilities`` (or by
validation); each npz carries the reference header, so no image is needed to write the mask.
Every case found in any folder is ensembled on its own: a case missing from a folder, or whose
files are unreadable or do not agree, fails alone and leaves no file; the others are written and
the failures are reported together at the end, as ``predict`` does.
"""
from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from spineauto.errors import SpineautoError
from spineauto.inference.export import (check_output_apart, check_writable, error_message, failures_error, read_probabilities,
                                        remove_case_outputs, remove_temporaries, warn_undeclared_labels, write_mask,
                                        write_probabilities)
from spineauto.inference.postprocessing import CordEvidence, apply_postprocessing

log = logging.getLogger(__name__)


def all_cases(folders: Sequence[Path]) -> list[str]:
    """Case names present as ``.npz`` in any folder; an error when a folder is missing or has none."""
    if len(folders) < 1:
        raise SpineautoError("ensemble needs at least one -i folder of .npz probabilities")
    names: set[str] = set()
    for f in folders:
        if not Path(f).is_dir():
            raise SpineautoError(f"{f}: folder not found")
        try:
            found = {p.name[:-4] for p in Path(f).glob("*.npz") if not p.name.startswith(".")}
        except OSError as e:
            raise SpineautoError(f"{f}: cannot read the folder ({e.strerror}); check its permissions") from None
        if not found:
            raise SpineautoError(f"{f}: no <case>.npz probabilities; run `spineauto predict --save-probabilities` into it")
        names |= found
    return sorted(names)


def average_probabilities(files: Sequence[Path]) -> tuple[np.ndarray, object, tuple[int, ...], list[int] | None]:
    """Mean of the probability arrays (float32, accumulated in float64); header, shape and labels of the first."""
    total, header, shape, labels = None, None, None, None
    for f in files:
        if not f.is_file():
            raise SpineautoError(f"{f}: missing; every -i folder needs the case's probabilities")
        probs, hdr, shp, lab = read_probabilities(f, with_labels=True)
        if total is None:
            total, header, shape, labels = probs.astype(np.float64), hdr, shp, lab
        elif probs.shape != total.shape or shp != shape:
            raise SpineautoError(f"{f}: probabilities of shape {probs.shape} (image {shp}) differ from {files[0]} {total.shape} "
                                 f"(image {shape}); ensemble models with the same labels on the same images")
        elif not np.allclose(hdr.get_best_affine(), header.get_best_affine(), atol=1e-3):
            raise SpineautoError(f"{f}: written for an image placed elsewhere than {files[0]} (another scan of the same name and "
                                 "size?); ensemble predictions of the same images")
        elif lab is not None and labels is not None and lab != labels:
            raise SpineautoError(f"{f}: labels {lab} differ from {files[0]} {labels}; ensemble models with the same labels")
        else:
            total += probs
    return (total / len(files)).astype(np.float32), header, shape, labels


def ensemble_case(folders: Sequence[Path], case: str, output: Path, save_probabilities: bool, postprocessing: dict) -> Path:
    """Average one case's probabilities from every folder and write its mask (and npz) into ``output``."""
    probs, header, shape, labels = average_probabilities([f / f"{case}.npz" for f in folders])
    if labels is None:  # a file without declared labels: channel k is label k
        labels = list(range(probs.shape[0]))
    cord = postprocessing.get("cord_component_labels", [])  # the cord choice weighs the averaged cord probability
    evidence = CordEvidence.from_probabilities(probs, int(cord[0])) if cord and int(cord[0]) < probs.shape[0] else None
    mask = apply_postprocessing(probs.argmax(0).astype(np.uint8), postprocessing, header.get_best_affine(),  # channel k is label value k
                                evidence=evidence)
    warn_undeclared_labels(case, mask, labels)
    target = write_mask(output / f"{case}.nii.gz", mask, header=header, shape=shape)
    if save_probabilities:
        write_probabilities(output / f"{case}.npz", probs, target, labels)
    return target


def ensemble_folders(folders: Sequence[Path], output: Path, save_probabilities: bool = False, postprocessing: dict | None = None,
                     progress: Callable[[str, int, int], None] | None = None) -> list[Path]:
    """Ensemble every case of ``folders`` into ``output``; the written masks.

    Raises one :class:`SpineautoError` naming the failed cases after the others are written.
    """
    folders, output = [Path(f) for f in folders], Path(output)
    same = [f for i, f in enumerate(folders) if f.resolve() in {g.resolve() for g in folders[:i]}]
    if same:
        raise SpineautoError(f"{same[0]}: given twice as -i (an ensemble of a model with itself); pass each model's folder once")
    check_output_apart(folders, output)
    cases = all_cases(folders)
    check_writable(output)
    written, failed = [], {}
    for i, case in enumerate(cases):
        if progress:
            progress(case, i, len(cases))
        remove_temporaries(output, case)
        try:
            written.append(ensemble_case(folders, case, output, save_probabilities, postprocessing or {}))
        except Exception as e:  # noqa: BLE001 - one failing case must not stop the others
            failed[case] = error_message(e)
            log.error("%s: %s", case, failed[case])
            if not isinstance(e, (SpineautoError, OSError)):
                log.debug("%s", traceback.format_exc())
            remove_case_outputs(output, case)
    if progress:
        progress("", len(cases), len(cases))
    if failed:
        raise failures_error(failed, len(cases), output)
    return written
