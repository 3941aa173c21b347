"""Region-of-interest masks for a configuration that works in a box around another structure (the
lesion model of the cord -> lesion cascade, ``plans.json`` ``roi``): reading a case's mask (e.g. the
cord predicted by another ``spineauto predict``) and removing predictions far from it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import get_bbox_from_mask
from scipy import ndimage

from spineauto.errors import SpineautoError
from spineauto.io.geometry import voxel_sizes
from spineauto.io.images import find_image, grid_mismatch, image_header, read_volume


def roi_file(folder: Path, case: str) -> Path:
    """``folder/<case>.nii.gz`` (or ``<case>`` in another image format), or a one-line error naming it when it is missing."""
    path = find_image(Path(folder), case)
    if path is None:
        raise SpineautoError(f"{Path(folder) / (case + '.nii.gz')}: no ROI mask for case {case}; the --roi folder needs one "
                             "<case>.nii.gz (or .png, .nrrd ... as the input) per input case (e.g. the masks of `spineauto predict` with the cord model)")
    return path


def spatial_shape(shape) -> tuple[int, ...]:
    """A NIfTI shape as :func:`spineauto.io.images.read_volume` reads it (2D gets a slice axis, a
    trailing singleton 4th axis goes)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4 and shape[3] == 1:
        return shape[:3]
    return (*shape, 1) if len(shape) == 2 else shape


def check_roi_grid(path: Path, shape, affine: np.ndarray, image: str, pixel_spacing=None) -> None:
    """One-line error naming ``path`` when its voxel grid is not the image's (header only; a picture
    gets ``pixel_spacing``, as its image)."""
    roi_shape, roi_affine, _ = image_header(Path(path), pixel_spacing)
    problem = grid_mismatch(spatial_shape(roi_shape), roi_affine, tuple(shape), affine)
    if problem:
        raise SpineautoError(f"{path}: ROI mask grid differs from the image {image} ({problem}); "
                             "it must be a mask predicted on that very image")


def read_roi(path: Path, shape, affine: np.ndarray, image: str, pixel_spacing=None) -> np.ndarray:
    """The boolean mask (any value > 0) of ``path``, checked to lie in the image's grid."""
    check_roi_grid(path, shape, affine, image, pixel_spacing)
    values = read_volume(Path(path), pixel_spacing=pixel_spacing)[0]
    if values.dtype.kind == "f" and not np.isfinite(values).all():  # a damaged or probability file, not a mask
        raise SpineautoError(f"{path}: the ROI mask holds NaN or infinite values; it must be a mask (0 outside, > 0 inside), "
                             "e.g. what `spineauto predict` wrote with the cord model")
    return values > 0


def restrict_to_roi(labels: np.ndarray, roi: np.ndarray, affine: np.ndarray, distance_mm: float) -> np.ndarray:
    """``labels`` with every voxel farther than ``distance_mm`` from ``roi`` set to 0 (a new array).

    Distances are Euclidean in mm (the voxel sizes of ``affine``), from each voxel centre to the
    nearest ``roi`` voxel centre; ``distance_mm=0`` keeps labels inside the mask only. An empty
    ``roi`` removes every label. The distance transform runs only on the box around ``roi`` widened
    by the distance: everything outside that box is farther anyway.
    """
    labels = np.asarray(labels)
    roi = np.asarray(roi, dtype=bool)
    if roi.shape != labels.shape:
        raise SpineautoError(f"restrict_to_roi: ROI shape {roi.shape} differs from the labels' {labels.shape}")
    out = np.zeros_like(labels)
    if not roi.any():
        return out
    spacing = voxel_sizes(affine)
    pads = [int(np.floor(distance_mm / sp)) + 1 for sp in spacing]
    box = tuple(slice(max(0, lo - p), min(n, hi + p)) for (lo, hi), p, n in zip(get_bbox_from_mask(roi), pads, roi.shape))
    near = ndimage.distance_transform_edt(~roi[box], sampling=spacing) <= distance_mm
    out[box] = np.where(near, labels[box], 0)
    return out
