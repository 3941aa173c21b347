"""Reading images: every read comes back as float32 (C, X, Y, Z) with a RAS affine, whatever the
file's format (NIfTI through nibabel here, the others through :mod:`spineauto.io.formats`).

``pixel_spacing`` (row, column mm) is what a 2D picture, which has no geometry, gets; the other
formats ignore it."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from spineauto.errors import SpineautoError
from spineauto.io import formats
from spineauto.io.formats import IMAGE_ENDINGS, NIFTI_ENDINGS, ending_of, strip_ending  # noqa: F401 - the module's API

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


def is_nifti(path: Path | str) -> bool:
    """NIfTI by its ending; a name with no ending spineauto knows is read as NIfTI too (nibabel says why it is not)."""
    return ending_of(path) in NIFTI_ENDINGS or not ending_of(path)


def find_image(folder: Path, stem: str) -> Path | None:
    """``folder/<stem><ending>`` for the first image ending present, or None."""
    return next((p for p in (Path(folder) / f"{stem}{e}" for e in IMAGE_ENDINGS) if p.is_file()), None)


def mask_ending(reference: Path | str) -> str:
    """The ending of a mask written for the image ``reference``: its own format (NIfTI: ``.nii.gz``)."""
    return ".nii.gz" if is_nifti(reference) else ending_of(reference)


def mask_image(labels: np.ndarray, header: nib.Nifti1Header, shape: tuple[int, ...]) -> nib.Nifti1Image:
    """A uint8 NIfTI label map with ``header``'s geometry (qform/sform, codes, pixdim) bit for bit."""
    hdr = header.copy()
    hdr.set_data_dtype(np.uint8)
    hdr["cal_min"], hdr["cal_max"] = 0, 0  # the image's display window would hide a 0..K mask
    hdr["intent_code"] = 0
    img = nib.Nifti1Image(labels.astype(np.uint8).reshape(shape), None, hdr)
    img.set_sform(header.get_sform(), int(header["sform_code"]))
    img.set_qform(header.get_qform(), int(header["qform_code"]))
    img.header.set_slope_inter(1.0, 0.0)
    return img


def write_label_map(target: Path, labels: np.ndarray, reference: Path) -> Path:
    """``labels`` (X, Y, Z) written atomically to ``target`` in the format and grid of the image file
    ``reference`` (name ``target`` with :func:`mask_ending`)."""
    from spineauto.io.atomic import save_nifti, write_atomic

    if is_nifti(reference):
        ref = load_nifti(Path(reference))
        return save_nifti(target, mask_image(labels, ref.header, tuple(ref.shape)))
    writer, suffix = formats.mask_writer(labels, Path(reference))
    aux = formats.tiff_aux_for(Path(target), Path(reference))
    if aux is not None:
        write_atomic(aux[0], lambda p: p.write_text(aux[1]))
    return write_atomic(target, writer, suffix=suffix)


def image_header(path: Path, pixel_spacing=None) -> tuple[tuple[int, ...], np.ndarray, np.dtype]:
    """(shape, RAS affine, stored dtype) of any image file, without reading its voxels."""
    if is_nifti(path):
        img = load_nifti(Path(path))
        return tuple(int(n) for n in img.shape), np.asarray(img.affine, float), np.dtype(img.get_data_dtype())
    return formats.header(Path(path), pixel_spacing)


def read_image(path: Path, dtype=np.float32, pixel_spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """(C, X, Y, Z) of one file (a picture's RGB is 3 channels) and its affine."""
    if not is_nifti(path):
        data, affine = formats.read_file(Path(path), pixel_spacing)
        if 0 in data.shape:
            raise SpineautoError(f"{path}: image has no voxels (shape {data.shape[1:]})")
        problem = affine_problem(affine)
        if problem:
            raise SpineautoError(f"{path}: {problem}")
        return data.astype(dtype, copy=False), affine
    data, affine = _read_nifti(path, dtype)
    return data[None], affine


def read_volume(path: Path, dtype=np.float32, pixel_spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """One 3D volume and its affine. A trailing singleton 4th axis is dropped; real 4D is an error."""
    if is_nifti(path):
        return _read_nifti(path, dtype)
    data, affine = read_image(path, dtype, pixel_spacing)
    if data.shape[0] != 1:
        raise SpineautoError(f"{path}: {data.shape[0]} channels (e.g. RGB) where one is expected (a label map); save it as grey-scale")
    return data[0], affine


def _read_nifti(path: Path, dtype) -> tuple[np.ndarray, np.ndarray]:
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
    if isinstance(hdr, nib.Nifti1Header) and path is not None and int(hdr["sform_code"]) == 0:  # nibabel mends pixdim on load: read the stored one
        with nib.openers.ImageOpener(str(path)) as f:
            hdr = type(hdr).from_fileobj(f, check=False)
    if isinstance(hdr, nib.Nifti1Header) and int(hdr["sform_code"]) == 0:
        pixdim = np.asarray(hdr["pixdim"][1:1 + min(3, len(img.shape))], float)
        if not (np.isfinite(pixdim).all() and (pixdim > 0).all()):
            return (f"voxel size (pixdim) {pixdim.tolist()} mm in the header: every voxel size must be a finite number > 0; "
                    "fix the header (the scanner's or the converter's export)")
    return affine_problem(img.affine)


def affine_problem(affine: np.ndarray) -> str | None:
    """Why ``affine``'s voxel sizes are unusable (zero, negative, not finite), or None."""
    sizes = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    if not (np.isfinite(sizes).all() and (sizes > 0).all()):
        return f"voxel sizes {np.round(sizes, 6).tolist()} mm from the header: each must be a finite number > 0; fix the header"
    return None


def read_channels(paths: list[Path], pixel_spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """Stack the channels of the files (one each, or several from an RGB picture or a vector image)
    into (C, X, Y, Z); all files must share the first one's grid."""
    arrays, affine = [], None
    for p in paths:
        data, aff = read_image(p, pixel_spacing=pixel_spacing)
        if affine is None:
            affine, shape = aff, data.shape[1:]
        else:
            problem = grid_mismatch(shape, affine, data.shape[1:], aff)
            if problem:
                raise SpineautoError(f"{p}: channel grid differs from {paths[0].name}: {problem}")
        arrays.append(data)
    return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays)), affine  # one file: no copy


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
