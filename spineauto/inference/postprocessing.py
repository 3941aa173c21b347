"""Postprocessing: keep only the largest connected component of a label, or the component that is a
cord (a tube along the superior-inferior axis), when that helps.

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


def superior_axis(affine: np.ndarray) -> int:
    """The voxel axis closest to the world's superior-inferior axis."""
    cols = np.asarray(affine)[:3, :3]
    return int(np.argmax(np.abs(cols[2]) / np.maximum(np.linalg.norm(cols, axis=0), 1e-12)))


MAX_CORD_RADIUS_MM = 8.0  # RMS in-plane radius of a cord cross-section, at most: twice an adult cervical cord's ~4 mm
# (a filled ellipse of about 13 x 8 mm), so an enlargement or a cord with some CSF still counts as a tube
LONG_FRACTION = 0.75  # tubes crossing at least this share of the most levels any tube crosses are candidates
MIDLINE_WEIGHT = 2.0  # left-right offset from the field of view's centre counts this much more than front-back


def keep_cord_component(seg: np.ndarray, label: int, affine: np.ndarray) -> np.ndarray:
    """``seg`` with every component of ``label`` but the one that is most a cord set to background.

    The cord is a long tube on the body's midline:

    1. *tube*: at every axial level its cross-section is one compact disc (mean RMS radius at most
       :data:`MAX_CORD_RADIUS_MM`); sheets of fat, muscle outlines and merged islands are wider;
    2. *long*: it crosses more axial levels (voxel planes across the axis closest to world S-I) than
       false islands; every tube crossing at least :data:`LONG_FRACTION` of the most levels any tube
       crosses is a candidate (a cord the network missed on an end slice still counts);
    3. *midline*: spine scans are centred on the spine, so of the candidates the one nearest the
       field of view's centre is kept, left-right offsets weighted :data:`MIDLINE_WEIGHT` x (the cord
       lies on the mid-sagittal plane; its front-back place varies with the field of view), which
       sets it apart from vessels and fat that run alongside.

    When no component is a tube, all count as tubes.
    """
    import cc3d

    mask = seg == label
    if not mask.any():
        return seg
    comps = cc3d.connected_components(mask.astype(np.uint8), connectivity=26)
    n = int(comps.max())
    if n <= 1:
        return seg
    affine = np.asarray(affine, dtype=float)
    levels, radius, voxels, coords = _cross_sections(comps, n, superior_axis(affine), np.linalg.norm(affine[:3, :3], axis=0))
    tube = radius <= MAX_CORD_RADIUS_MM
    tube[0] = False
    if not tube.any():
        tube[1:] = True
    candidates = tube & (levels >= LONG_FRACTION * levels[tube].max())
    centroid = coords / np.maximum(voxels, 1)[:, None]
    world = centroid @ affine[:3, :3].T + affine[:3, 3]
    centre = affine[:3, :3] @ ((np.array(seg.shape[:3]) - 1) / 2.0) + affine[:3, 3]
    offset = MIDLINE_WEIGHT * np.abs(world[:, 0] - centre[0]) + np.abs(world[:, 1] - centre[1])
    best = int(np.argmin(np.where(candidates, offset, np.inf)))
    out = seg.copy()
    out[mask & (comps != best)] = 0
    return out


CHUNK_VOXELS = 2 ** 22  # voxels of the component map read at a time by _cross_sections


def _cross_sections(comps: np.ndarray, n: int, axis: int, spacing: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per component 0..n of a label map: the levels along ``axis`` it crosses, the mean over them of
    its cross-section's RMS radius (mm), its voxel count and its voxel-coordinate sums (n + 1, 3).
    Read a chunk of levels at a time (a cross-section lies in one level), so memory follows the chunk."""
    n_levels = comps.shape[axis]
    per = max(1, CHUNK_VOXELS // max(1, comps.size // n_levels))
    levels, radius_sum, voxels, coords = np.zeros(n + 1), np.zeros(n + 1), np.zeros(n + 1), np.zeros((n + 1, 3))
    for l0 in range(0, n_levels, per):
        index = [slice(None)] * 3
        index[axis] = slice(l0, l0 + per)
        part = comps[tuple(index)]
        where = np.nonzero(part)
        if not where[0].size:
            continue
        lab = part[where].astype(np.int64)
        cells, cell_of, count = np.unique(lab * n_levels + where[axis], return_inverse=True, return_counts=True)
        var = np.zeros(len(cells))
        for a in (a for a in range(3) if a != axis):
            x = where[a] * spacing[a]
            var += np.bincount(cell_of, x * x) / count - (np.bincount(cell_of, x) / count) ** 2
        owner = cells // n_levels
        levels += np.bincount(owner, minlength=n + 1)
        radius_sum += np.bincount(owner, np.sqrt(np.maximum(var, 0)), minlength=n + 1)
        voxels += np.bincount(lab, minlength=n + 1)
        for a in range(3):
            coords[:, a] += np.bincount(lab, where[a] + (l0 if a == axis else 0), minlength=n + 1)
    return levels, radius_sum / np.maximum(levels, 1), voxels, coords


def apply_postprocessing(seg: np.ndarray, postprocessing: dict, affine: np.ndarray | None = None) -> np.ndarray:
    """The decided postprocessing; ``cord_component_labels`` need the mask's ``affine`` (where S-I is)."""
    for label in postprocessing.get("largest_component_labels", []):
        seg = keep_largest_component(seg, int(label))
    cord = postprocessing.get("cord_component_labels", [])
    if cord and affine is None:
        raise ValueError("apply_postprocessing: cord_component_labels need the mask's affine")
    for label in cord:
        seg = keep_cord_component(seg, int(label), affine)
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
    cord = data.get("cord_component_labels", [])
    if not isinstance(cord, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in cord):
        raise SpineautoError(f"{path}: cord_component_labels must be a list of positive label values, got {cord!r}; "
                             "rerun `spineauto find_best_configuration` or delete it")
    labels = labels + [v for v in cord if v not in labels]
    if label_values is not None:
        unknown = sorted(set(labels) - {int(v) for v in label_values if int(v) > 0})
        if unknown:
            raise SpineautoError(f"{path}: largest_component_labels {unknown} are not labels of the model "
                                 f"({sorted(int(v) for v in label_values if int(v) > 0)}); rerun `spineauto find_best_configuration` or delete it")
    return data
