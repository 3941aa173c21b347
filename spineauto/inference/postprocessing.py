"""Postprocessing: keep only the largest connected component of a label, when that helps.

find_best_configuration decides it on the cross-validation (nnU-Net's rule, in
:mod:`spineauto.evaluation.best_configuration`) and stores it as ``postprocessing.json``; predict and
ensemble apply it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from spineauto.errors import SpineautoError
from spineauto.io.atomic import read_json

POSTPROCESSING_FILE = "postprocessing.json"


def keep_largest_component(seg: np.ndarray, label: int) -> np.ndarray:
    """``seg`` with every component of ``label`` but the largest (26-connected) set to background."""
    import cc3d

    mask = seg == label
    if not mask.any():
        return seg
    comps = cc3d.connected_components(mask.astype(np.uint8), connectivity=26)
    if comps.max() <= 1:
        return seg
    sizes = np.bincount(comps.ravel())
    sizes[0] = 0
    out = seg.copy()
    out[mask & (comps != int(sizes.argmax()))] = 0
    return out


def apply_postprocessing(seg: np.ndarray, postprocessing: dict) -> np.ndarray:
    for label in postprocessing.get("largest_component_labels", []):
        seg = keep_largest_component(seg, int(label))
    return seg


def load_postprocessing(path: Path, label_values: Sequence[int] | None = None) -> dict:
    """A ``postprocessing.json``, checked: ``{"largest_component_labels": [label values], ...}``.

    Every reader of such a file goes through here, so that a file of any other shape (not JSON, a
    list, wrong types, labels that are not positive or, with ``label_values``, not declared) is
    one line naming the file, never a traceback or a silently ignored setting.
    """
    path = Path(path)
    if not path.is_file():
        raise SpineautoError(f"{path}: postprocessing file not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        data = read_json(path)
    except (OSError, ValueError, RecursionError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        raise SpineautoError(f"{path}: unreadable postprocessing file ({reason}); rerun `spineauto find_best_configuration`") from None
    labels = data.get("largest_component_labels", []) if isinstance(data, dict) else None
    if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in labels):
        raise SpineautoError(f"{path}: not a postprocessing file (expected {{\"largest_component_labels\": [positive label "
                             "values]}}); rerun `spineauto find_best_configuration` or delete it")
    if label_values is not None:
        unknown = sorted(set(labels) - {int(v) for v in label_values if int(v) > 0})
        if unknown:
            raise SpineautoError(f"{path}: largest_component_labels {unknown} are not labels of the model "
                                 f"({sorted(int(v) for v in label_values if int(v) > 0)}); rerun `spineauto find_best_configuration` or delete it")
    return data
