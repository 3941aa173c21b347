"""Spinal-cord and lesion measurements from binary masks, in millimetres, in any image orientation.

Cord (:func:`measure_cord`): the slice-wise method that Spinal Cord Toolbox documents for
``sct_process_segmentation`` with angle correction (``-angle-corr 1``; SCT docs, "Computing shape
metrics" / "Verify the correctness of the metrics"), reimplemented here with numpy/scipy/nibabel:

1. Put the mask on an RAS-aligned grid. When every voxel axis is within ``OBLIQUE_TOL`` of an RAS
   axis this is a pure flip/permutation (nibabel's ``io_orientation`` + ``apply_orientation``, as
   ``as_closest_canonical`` does: no interpolation). An oblique mask is instead resampled onto an
   RAS grid at its finest voxel size, voxel edges on multiples of that step in world mm: trilinear
   on the float mask, threshold 0.5. That erodes a convex cord slightly (phantoms: area up to -3% at
   1 mm, < 1% at 0.5 mm); nearest neighbour keeps the volume but leaves ragged cord ends whose
   partial slices cost more (same phantoms: length up to +12%, CSA down to -12%).
2. Per axial (S-I) slice: area = voxel count x in-plane voxel area (mm^2, so anisotropic voxels and
   sagittal images, whose axial "slices" are image rows, are handled alike); centre of mass in mm.
3. Centreline: the centres of mass (linearly bridged over slices without cord), smoothed by a
   quadratic Savitzky-Golay filter over ``SMOOTH_MM`` (SCT smooths with a b-spline, 20 mm by
   default); the tangent is the filter's derivative (inside the cord: a local least-squares slope;
   a cubic fit turned 3 mm voxel steps into 3 degree tangent errors on the test phantoms).
4. ``angle`` = angle between the tangent and the S-I axis; ``CSA = area * cos(angle)``. SCT scales
   the slice by cos(angle_AP) and cos(angle_RL) separately, which equals this for a tilt in one
   plane; here the exact cosine is used for any tilt direction.
5. Length = sum over the slices holding cord of ``thickness / cos(angle)`` (SCT's per-slice length),
   i.e. the centreline's arc length across them. Volume = voxel count x voxel volume, input grid.

Lesions (:func:`measure_lesions`): 26-connected components in the input grid; craniocaudal length =
S-I extent of the component's voxel boxes; in-plane extent = the largest caliper (Feret) diameter
of its voxel squares within one image slice across the voxel axis closest to S-I (the axial plane
exactly for RAS-aligned images; exact for boxes, above a round outline by < one voxel diagonal);
``slices`` = first and last index along that axis.
"""
from __future__ import annotations

import itertools
import logging

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.signal import savgol_filter
from scipy.spatial import ConvexHull
from scipy.spatial.distance import pdist

from spineauto.io.geometry import voxel_sizes

log = logging.getLogger(__name__)

OBLIQUE_TOL = 1e-3  # largest off-axis direction cosine still treated as RAS-aligned (~0.06 degree)
SMOOTH_MM = 20.0  # Savitzky-Golay window of the centreline, mm along S-I
POLYORDER = 2


def _resample_to_ras(data: np.ndarray, affine: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Oblique mask -> RAS grid of isotropic ``step`` covering its bounding box (trilinear, >= 0.5)."""
    idx = np.argwhere(data)
    box = [(lo, hi) for lo, hi in zip(idx.min(0) - 1, idx.max(0) + 1)]
    world = nib.affines.apply_affine(affine, np.array(list(itertools.product(*box)), float))
    lo, hi = np.floor(world.min(0) / step) * step, np.ceil(world.max(0) / step) * step
    shape = tuple(int(n) for n in np.round((hi - lo) / step))
    out_affine = np.diag([step, step, step, 1.0])
    out_affine[:3, 3] = lo + step / 2
    to_input = np.linalg.inv(affine) @ out_affine  # RAS-grid voxel -> input voxel
    res = ndimage.affine_transform(data.astype(np.float32), to_input[:3, :3], to_input[:3, 3],
                                   output_shape=shape, order=1, mode="constant", cval=0.0)
    log.info("oblique mask resampled to an RAS grid of %.3g mm, shape %s", step, shape)
    return res >= 0.5, out_affine


def _ras_grid(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The boolean mask on an RAS-aligned grid and that grid's affine."""
    zooms = voxel_sizes(affine)
    ornt = nib.orientations.io_orientation(affine)
    off_axis = np.abs(affine[:3, :3] / zooms)
    off_axis[ornt[:, 0].astype(int), np.arange(3)] = 0.0
    if off_axis.max() > OBLIQUE_TOL:
        return _resample_to_ras(data, affine, float(zooms.min()))
    return (nib.orientations.apply_orientation(data, ornt),
            affine @ nib.orientations.inv_ornt_aff(ornt, data.shape))


def _tangents(points: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed centreline (n, 3) and its tangent per slice, for points one slice apart."""
    n = len(points)
    if n < 3:
        tangent = np.diff(points, axis=0) if n == 2 else np.array([[0.0, 0.0, 1.0]])
        return points, np.repeat(tangent, n, axis=0)
    window = min(max(3, int(round(SMOOTH_MM / step)) | 1), n if n % 2 else n - 1)
    order = min(POLYORDER, window - 1)
    smooth = savgol_filter(points, window, order, axis=0, mode="interp")
    return smooth, savgol_filter(points, window, order, deriv=1, axis=0, mode="interp")


def _stats(values: np.ndarray) -> dict:
    if not len(values):
        return {"mean": None, "median": None, "min": None, "max": None}
    return {"mean": float(np.mean(values)), "median": float(np.median(values)),
            "min": float(np.min(values)), "max": float(np.max(values))}


def measure_cord(mask: np.ndarray, affine: np.ndarray) -> dict:
    """Volume, length and angle-corrected cross-sectional area of a binary cord mask (see module doc).

    ``mask`` is (X, Y, Z) in the image's own voxel order, ``affine`` its voxel -> RAS mm affine.
    Returns plain JSON-ready data (``slices`` with cord, ``gap_slices`` without cord between them,
    ``si_extent_mm`` from the first to the last); a mask with no slice left on the RAS grid (empty,
    or a few voxels of an oblique grid) gives zeros, ``None`` statistics and ``unmeasurable``: why.
    """
    data, affine = np.asarray(mask) > 0, np.asarray(affine, dtype=float)
    if data.ndim != 3:
        raise ValueError(f"cord mask must be 3D (X, Y, Z), got shape {data.shape}")
    count = int(np.count_nonzero(data))
    if not count:
        return _unmeasurable(0.0, "empty mask")
    volume = count * abs(float(np.linalg.det(affine[:3, :3])))
    ras, ras_affine = _ras_grid(data, affine)
    if not ras.any():  # a few voxels of an oblique grid that the RAS resampling's threshold removes
        log.warning("cord mask of %d voxel(s) is empty on an RAS grid: no measurable cord", count)
        return _unmeasurable(volume, f"{count} voxel(s), none left on an RAS grid")
    dx, dy, dz = voxel_sizes(ras_affine)
    areas = ras.sum(axis=(0, 1)).astype(float)
    slices = np.flatnonzero(areas)
    centre_i = (ras.sum(axis=1) * np.arange(ras.shape[0])[:, None]).sum(0)[slices] / areas[slices]
    centre_j = (ras.sum(axis=0) * np.arange(ras.shape[1])[:, None]).sum(0)[slices] / areas[slices]
    run = np.arange(slices[0], slices[-1] + 1)  # every slice from first to last, gaps bridged
    voxels = np.column_stack([np.interp(run, slices, centre_i), np.interp(run, slices, centre_j), run])
    centreline, tangent = _tangents(nib.affines.apply_affine(ras_affine, voxels), dz)
    cosine = np.abs(tangent[:, 2]) / np.linalg.norm(tangent, axis=1)
    has_cord = np.isin(run, slices)
    cosine, centreline = cosine[has_cord], centreline[has_cord]
    csa = areas[slices] * dx * dy * cosine
    angle = np.degrees(np.arccos(np.clip(cosine, 0.0, 1.0)))
    length = float(np.sum(dz / cosine))
    log.debug("cord: %d slices, length %.1f mm, mean CSA %.1f mm2", len(slices), length, csa.mean())
    per_slice = [{"z_mm": float(z), "csa_mm2": float(c), "angle_deg": float(a)}
                 for z, c, a in zip(centreline[:, 2], csa, angle)]
    return {"volume_mm3": float(volume), "length_mm": length, "slices": int(len(slices)), "gap_slices": int(len(run) - len(slices)),
            "si_extent_mm": float(len(run) * dz), "csa_mm2": {**_stats(csa), "per_slice": per_slice}}


def _unmeasurable(volume: float, why: str) -> dict:
    """No slice holds cord: zeros and ``None`` statistics, and why (``unmeasurable``)."""
    return {"volume_mm3": float(volume), "length_mm": 0.0, "slices": 0, "gap_slices": 0, "si_extent_mm": 0.0,
            "csa_mm2": {**_stats(np.array([])), "per_slice": []}, "unmeasurable": why}


def _feret(points: np.ndarray) -> float:
    """Largest distance between two of the 2D ``points`` (voxel corners: never all collinear)."""
    return float(pdist(points[ConvexHull(points).vertices]).max())


def measure_lesions(lesion: np.ndarray, affine: np.ndarray) -> dict:
    """Count, volumes and extents of the 26-connected components of a binary lesion mask (module doc).

    ``slices`` are indices along the input array's own voxel axis closest to S-I.
    """
    data, affine = np.asarray(lesion) > 0, np.asarray(affine, dtype=float)
    if data.ndim != 3:
        raise ValueError(f"lesion mask must be 3D (X, Y, Z), got shape {data.shape}")
    labels, count = ndimage.label(data, structure=np.ones((3, 3, 3), dtype=bool))
    voxel_volume = abs(float(np.linalg.det(affine[:3, :3])))
    si_axis = int(np.argmax(np.abs(affine[2, :3]) / voxel_sizes(affine)))
    box_si = float(np.abs(affine[2, :3]).sum())  # S-I extent of one voxel box
    plane_axes = [a for a in range(3) if a != si_axis]
    # in-slice index coordinates -> orthonormal 2D mm coordinates of that slice's plane
    to_plane = np.linalg.qr(affine[:3, plane_axes])[1]
    corners = np.array(list(itertools.product((-0.5, 0.5), repeat=2)))
    items = []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        idx = np.argwhere(labels[box] == label) + [s.start for s in box]
        world_si = nib.affines.apply_affine(affine, idx)[:, 2]
        widest = 0.0
        for s in np.unique(idx[:, si_axis]):
            footprint = idx[idx[:, si_axis] == s][:, plane_axes]
            pts = (footprint[:, None, :] + corners[None]).reshape(-1, 2) @ to_plane.T
            widest = max(widest, _feret(pts))
        items.append({"id": label, "volume_mm3": len(idx) * voxel_volume,
                      "craniocaudal_length_mm": float(np.ptp(world_si) + box_si),
                      "max_inplane_extent_mm": widest,
                      "slices": [int(idx[:, si_axis].min()), int(idx[:, si_axis].max())]})
    log.debug("lesions: %d components", count)
    return {"count": int(count), "total_volume_mm3": float(sum(i["volume_mm3"] for i in items)), "items": items}
