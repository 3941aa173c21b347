"""Reading images: every read goes through nibabel (NIfTI) and comes back as float32 (C, X, Y, Z)."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from spineauto.errors import SpineautoError

# Two grids are "the same" within these tolerances. Real masks differ from their images by ~1e-8
# in direction cosines after a NIfTI qform round trip; a real mismatch is orders of magnitude larger.
DIRECTION_ATOL = 1e-4  # direction cosines (unitless)
SPACING_RTOL = 1e-4  # relative voxel size
ORIGIN_ATOL_MM = 1e-3  # origin, in mm (also scaled by the voxel size, see same_grid)


def load_nifti(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise SpineautoError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise SpineautoError(f"{path}: file is empty; re-export it")
    try:
        img = nib.load(str(path))
        img.header  # noqa: B018 - force header parsing
    except Exception as e:  # nibabel raises many kinds
        raise SpineautoError(f"{path}: unreadable image ({type(e).__name__}: {e}); check the file is a valid NIfTI") from None
    return img


def read_volume(path: Path, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """One 3D volume and its affine. A trailing singleton 4th axis is dropped; real 4D is an error."""
    img = load_nifti(path)
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3:
        raise SpineautoError(f"{path}: image has shape {img.shape}, a 3D image is expected; split 4D series into one file per volume or channel")
    if 0 in shape:
        raise SpineautoError(f"{path}: image has no voxels (shape {img.shape})")
    problem = header_problem(img, path)
    if problem:
        raise SpineautoError(f"{path}: {problem}")
    try:
        data = np.asanyarray(img.dataobj).reshape(shape).astype(dtype, copy=False)
    except Exception as e:
        raise SpineautoError(f"{path}: cannot read voxel data ({type(e).__name__}: {e}); the file may be truncated") from None
    return data, img.affine


def header_problem(img, path: Path | None = None) -> str | None:
    """Why a header's voxels cannot be taken at face value, or None: complex values (casting keeps
    only the real part), or a voxel size that is zero, negative or not finite: in ``pixdim`` when
    the affine comes from it (nibabel then silently uses 1 mm), or in the affine itself."""
    if np.dtype(img.get_data_dtype()).kind == "c":
        return f"complex voxel values ({img.get_data_dtype()}); save the magnitude (or real part) as a real-valued image"
    hdr = img.header
    if isinstance(hdr, nib.Nifti1Header) and path is not None:  # nibabel mends pixdim on load: read the stored one
        with nib.openers.ImageOpener(str(path)) as f:
            hdr = type(hdr).from_fileobj(f, check=False)
    if isinstance(hdr, nib.Nifti1Header) and int(hdr["sform_code"]) == 0:
        pixdim = np.asarray(hdr["pixdim"][1:1 + min(3, len(img.shape))], float)
        if not (np.isfinite(pixdim).all() and (pixdim > 0).all()):
            return (f"voxel size (pixdim) {pixdim.tolist()} mm in the header: every voxel size must be a finite number > 0; "
                    "fix the header (the scanner's or the converter's export)")
    sizes = np.linalg.norm(np.asarray(img.affine, float)[:3, :3], axis=0)
    if not (np.isfinite(sizes).all() and (sizes > 0).all()):
        return f"voxel sizes {np.round(sizes, 6).tolist()} mm from the affine: each must be a finite number > 0; fix the header (qform/sform)"
    return None


def read_channels(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Stack one file per channel into (C, X, Y, Z); all channels must share the first one's grid."""
    arrays, affine = [], None
    for p in paths:
        data, aff = read_volume(p)
        if affine is None:
            affine, shape = aff, data.shape
        else:
            problem = grid_mismatch(shape, affine, data.shape, aff)
            if problem:
                raise SpineautoError(f"{p}: channel grid differs from {paths[0].name}: {problem}")
        arrays.append(data)
    return (arrays[0][None] if len(arrays) == 1 else np.stack(arrays)), affine  # one channel: no copy


def grid_mismatch(shape_a, affine_a, shape_b, affine_b) -> str | None:
    """Why two voxel grids differ beyond the documented tolerances, or None if they match."""
    if tuple(shape_a) != tuple(shape_b):
        return f"shape {tuple(shape_a)} vs {tuple(shape_b)}"
    a, b = np.asarray(affine_a, float), np.asarray(affine_b, float)
    sa, sb = np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(b[:3, :3], axis=0)
    if not np.allclose(sa, sb, rtol=SPACING_RTOL, atol=0):
        return f"spacing {np.round(sa, 5).tolist()} vs {np.round(sb, 5).tolist()} mm"
    if not np.allclose(a[:3, :3] / sa, b[:3, :3] / sb, atol=DIRECTION_ATOL, rtol=0):
        return "direction (orientation) differs"
    if not np.allclose(a[:3, 3], b[:3, 3], atol=ORIGIN_ATOL_MM + 1e-3 * sa.max(), rtol=0):
        return f"origin {np.round(a[:3, 3], 3).tolist()} vs {np.round(b[:3, 3], 3).tolist()} mm"
    return None
