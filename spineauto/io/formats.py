"""One reader/writer pair per image file format, chosen by the file's ending.

Every reader returns float32 ``(C, X, Y, Z)`` and a RAS affine (the convention of the rest of the
code base), every writer puts a label map ``(X, Y, Z)`` back into a file of the reference image's
format and grid. Nothing above ``io/`` knows which format a file was.

- NIfTI (``.nii.gz``, ``.nii``): nibabel; the mask copies the reference's header.
- SimpleITK formats (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``): origin, spacing and direction kept
  (LPS -> RAS); a vector image (e.g. RGB) is one channel per component; a 2D file is one slice.
- 2D pictures (``.png``, ``.bmp``, 2D ``.tif``): nnU-Net's ``NaturalImage2DIO`` (RGB(A) -> 3 (4)
  channels). A picture has no geometry: it becomes a one-slice volume with the dataset's declared
  pixel spacing, laid out as ``spineauto convert images`` lays pictures out (X = columns,
  Y = rows bottom-up, Z = the one slice).
- 3D ``.tif``: nnU-Net's ``Tiff3DIO`` (spacing from ``<case>.json`` beside it, as nnU-Net).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from spineauto.errors import SpineautoError

NIFTI_ENDINGS = (".nii.gz", ".nii")
SITK_ENDINGS = (".nrrd", ".nhdr", ".mha", ".mhd")
PICTURE_ENDINGS = (".png", ".bmp")
TIFF_ENDINGS = (".tif", ".tiff")
IMAGE_ENDINGS = NIFTI_ENDINGS + SITK_ENDINGS + PICTURE_ENDINGS + TIFF_ENDINGS
DEFAULT_PIXEL_SPACING = (1.0, 1.0)  # (row, column) mm of a picture whose dataset declares none


def ending_of(path: Path | str) -> str:
    """The image ending of ``path`` (lower case; ``.nii.gz`` whole), or '' when it is none we read."""
    name = Path(path).name.lower()
    return next((e for e in IMAGE_ENDINGS if name.endswith(e)), "")


def strip_ending(name: str) -> str:
    e = ending_of(name)
    return name[: -len(e)] if e else name


def check_ending(path: Path | str) -> str:
    ending = ending_of(path)
    if not ending:
        raise SpineautoError(f"{path}: not an image format spineauto reads (one of {', '.join(IMAGE_ENDINGS)})")
    return ending


def picture_affine(pixel_spacing) -> np.ndarray:
    row, col = (float(s) for s in pixel_spacing)
    return np.diag([col, row, max(row, col), 1.0])


def picture_to_volume(pixels: np.ndarray) -> np.ndarray:
    """(C, rows, columns) -> (C, X=columns, Y=rows bottom-up, 1)."""
    return np.ascontiguousarray(pixels[:, ::-1, :].transpose(0, 2, 1)[..., None])


def _volume_to_picture(labels: np.ndarray) -> np.ndarray:
    """Inverse of :func:`picture_to_volume` for one (X, Y, 1) label map -> (rows, columns)."""
    return np.ascontiguousarray(labels[:, :, 0].T[::-1])


def _is_3d_tiff(path: Path) -> bool:
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        series = tif.series[0]
        rgb = series.keyframe.photometric == tifffile.PHOTOMETRIC.RGB
        return len(series.shape) == 3 and not rgb


# ---------------------------------------------------------------- reading


def read_file(path: Path, pixel_spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """(C, X, Y, Z) float32 and the RAS affine of one image file of any supported format."""
    path = Path(path)
    ending = check_ending(path)
    if not path.is_file():
        raise SpineautoError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise SpineautoError(f"{path}: file is empty; re-export it")
    try:
        if ending in SITK_ENDINGS:
            return _read_sitk(path)
        if ending in TIFF_ENDINGS and _is_3d_tiff(path):
            return _read_tiff3d(path)
        return _read_picture(path, pixel_spacing or DEFAULT_PIXEL_SPACING)
    except SpineautoError:
        raise
    except Exception as e:  # the readers raise many kinds
        raise SpineautoError(f"{path}: unreadable image ({type(e).__name__}: {e}); check the file is a valid {ending} image") from None


def _read_picture(path: Path, pixel_spacing) -> tuple[np.ndarray, np.ndarray]:
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    data, _ = NaturalImage2DIO().read_images([str(path)])  # (C, 1, rows, columns)
    return picture_to_volume(data[:, 0].astype(np.float32, copy=False)), picture_affine(pixel_spacing)


def _read_tiff3d(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    data = tifffile.imread(str(path))  # (Z, Y, X)
    spacing = _tiff_spacing(path)  # (z, y, x) as nnU-Net's Tiff3DIO
    return np.ascontiguousarray(data.transpose(2, 1, 0)[None].astype(np.float32)), np.diag([spacing[2], spacing[1], spacing[0], 1.0])


def _tiff_spacing(path: Path) -> list[float]:
    aux = _tiff_aux(path)
    if not aux.is_file():
        raise SpineautoError(f"{path}: a 3D .tif needs its spacing in {aux.name} beside it ({{\"spacing\": [z, y, x]}} mm, as nnU-Net)")
    spacing = json.loads(aux.read_text()).get("spacing")
    if not (isinstance(spacing, list) and len(spacing) == 3):
        raise SpineautoError(f"{aux}: 'spacing' must list 3 numbers (z, y, x) in mm")
    return [float(s) for s in spacing]


def _tiff_aux(path: Path) -> Path:
    """nnU-Net's spacing file of a 3D tif: ``img.tif`` -> ``img.json`` (a mask, or any file that has one),
    else a channel file's case: ``img_0000.tif`` -> ``img.json`` (so a mask ``scan_0012.tif`` keeps its own)."""
    stem = strip_ending(path.name)
    exact = path.with_name(stem + ".json")
    if exact.is_file() or not (len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit()):
        return exact
    return path.with_name(stem[:-5] + ".json")


def _read_sitk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise SpineautoError(f"{path}: {image.GetDimension()}D image; a 2D or 3D image is expected")
    arr = sitk.GetArrayFromImage(image)  # (Z, Y, X) or (Z, Y, X, components)
    if arr.ndim == 3:
        arr = arr[..., None]
    return np.ascontiguousarray(arr.transpose(3, 2, 1, 0).astype(np.float32)), sitk_affine(image)


def sitk_affine(image) -> np.ndarray:
    """RAS affine of a 3D SimpleITK image (SimpleITK is LPS)."""
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing(), float)[None, :]
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def sitk_to_array(image) -> np.ndarray:
    """(X, Y, Z) float32 voxels of a 3D scalar SimpleITK image."""
    import SimpleITK as sitk

    return np.ascontiguousarray(sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0))


def header(path: Path, pixel_spacing=None) -> tuple[tuple[int, ...], np.ndarray, np.dtype]:
    """(shape (X, Y, Z[, C]), RAS affine, stored dtype) of a non-NIfTI file without reading its voxels."""
    path = Path(path)
    ending = check_ending(path)
    if ending in SITK_ENDINGS:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        size = tuple(int(s) for s in reader.GetSize())
        if len(size) != 3:  # a 2D file: one slice, as the read makes it (small: read it)
            image = sitk.JoinSeries(sitk.ReadImage(str(path)))
            return tuple(int(s) for s in image.GetSize()), sitk_affine(image), np.dtype(np.float32)
        affine = np.eye(4)
        affine[:3, :3] = np.asarray(reader.GetDirection(), float).reshape(3, 3) * np.asarray(reader.GetSpacing(), float)[None, :]
        affine[:3, 3] = reader.GetOrigin()
        components = reader.GetNumberOfComponents()
        return size + ((components,) if components > 1 else ()), np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine, np.dtype(np.float32)
    if ending in TIFF_ENDINGS and _is_3d_tiff(path):
        import tifffile

        with tifffile.TiffFile(str(path)) as tif:
            z, y, x = tif.series[0].shape
            dtype = tif.series[0].dtype
        s = _tiff_spacing(path)
        return (x, y, z), np.diag([s[2], s[1], s[0], 1.0]), np.dtype(dtype)
    from PIL import Image

    with Image.open(path) as img:
        columns, rows = img.size
        channels = len(img.getbands())
    return (columns, rows, 1) + ((channels,) if channels > 1 else ()), picture_affine(pixel_spacing or DEFAULT_PIXEL_SPACING), np.dtype(np.uint16)


# ---------------------------------------------------------------- writing


def mask_writer(labels: np.ndarray, reference: Path) -> tuple[Callable[[Path], None], str]:
    """(writer of ``labels`` (X, Y, Z) into a temporary path, the temporary path's suffix) for a mask
    in the format and grid of the non-NIfTI image ``reference``."""
    reference = Path(reference)
    ending = check_ending(reference)
    labels = labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16, copy=False)
    if ending in SITK_ENDINGS:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(reference))
        reader.ReadImageInformation()
        flat = len(reader.GetSize()) == 2
        img = sitk.GetImageFromArray(np.ascontiguousarray(labels[:, :, 0].T if flat else labels.transpose(2, 1, 0)))
        img.SetOrigin(reader.GetOrigin())
        img.SetSpacing(reader.GetSpacing())
        img.SetDirection(reader.GetDirection())
        return (lambda p: sitk.WriteImage(img, str(p), True)), ending
    if ending in TIFF_ENDINGS and _is_3d_tiff(reference):
        import tifffile

        return (lambda p: tifffile.imwrite(str(p), np.ascontiguousarray(labels.transpose(2, 1, 0)), photometric="minisblack",
                                           compression="zlib")), ending
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    picture = _volume_to_picture(labels)
    return (lambda p: NaturalImage2DIO().write_seg(picture[None], str(p), {})), ending


def tiff_aux_for(target: Path, reference: Path) -> tuple[Path, str] | None:
    """The spacing file a mask written as a 3D .tif needs beside it (nnU-Net's convention), or None."""
    if ending_of(reference) in TIFF_ENDINGS and _is_3d_tiff(Path(reference)):
        return Path(target).with_name(strip_ending(Path(target).name) + ".json"), _tiff_aux(Path(reference)).read_text()
    return None
