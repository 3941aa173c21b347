"""Writing predictions atomically, in exactly the input's geometry.

NIfTI inputs: the input's header is copied (qform/sform, codes, pixdim, orientation) and only the
data type changes to uint8, so the mask has the input's shape and affine bit for bit. DICOM inputs:
SimpleITK writes the mask with the series image's origin, spacing and direction.
Probabilities go to ``<case>.npz`` in the input's grid, with the reference header so that
``spineauto ensemble`` can write masks without the images.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from spineauto.errors import SpineautoError
from spineauto.io.atomic import save_nifti, write_atomic
from spineauto.io.images import load_nifti


def mask_image(labels: np.ndarray, header: nib.Nifti1Header, shape: tuple[int, ...]) -> nib.Nifti1Image:
    hdr = header.copy()
    hdr.set_data_dtype(np.uint8)
    hdr["cal_min"], hdr["cal_max"] = 0, 0  # the image's display window would hide a 0..K mask
    hdr["intent_code"] = 0
    img = nib.Nifti1Image(labels.astype(np.uint8).reshape(shape), None, hdr)
    img.set_sform(header.get_sform(), int(header["sform_code"]))
    img.set_qform(header.get_qform(), int(header["qform_code"]))
    img.header.set_slope_inter(1.0, 0.0)
    return img


def write_mask(target: Path, labels: np.ndarray, header: nib.Nifti1Header | None = None, shape=None, sitk_reference=None) -> Path:
    """Write uint8 ``labels`` (X, Y, Z) atomically with the reference header (NIfTI) or image (DICOM)."""
    if sitk_reference is not None:
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(labels.astype(np.uint8).transpose(2, 1, 0)))
        img.CopyInformation(sitk_reference)
        return write_atomic(target, lambda p: sitk.WriteImage(img, str(p), True), suffix=".nii.gz")
    return save_nifti(target, mask_image(labels, header, tuple(shape) if shape is not None else labels.shape))


def write_probabilities(target: Path, probs: np.ndarray, reference: Path, labels: list[int]) -> Path:
    """``probabilities`` (K, X, Y, Z) float32 + the written mask's header, as a compressed npz."""
    header = load_nifti(Path(reference)).header

    def _write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez_compressed(f, probabilities=probs.astype(np.float32, copy=False),
                                header=np.frombuffer(header.binaryblock, dtype=np.uint8),
                                shape=np.asarray(header.get_data_shape()), labels=np.asarray(labels))
    return write_atomic(target, _write, suffix=".npz")


def read_probabilities(path: Path) -> tuple[np.ndarray, nib.Nifti1Header, tuple[int, ...]]:
    try:
        with np.load(path) as z:
            probs = z["probabilities"]
            header = nib.Nifti1Header(z["header"].tobytes())
            shape = tuple(int(s) for s in z["shape"])
    except Exception as e:
        raise SpineautoError(f"{path}: not a spineauto probability file ({type(e).__name__}: {e}); "
                             "write it with `spineauto predict --save-probabilities`") from None
    return probs, header, shape


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there, before any work is done."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".spineauto_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SpineautoError(f"{folder}: output folder is not writable ({e.strerror}); choose another -o folder") from None
