"""Writing predictions atomically, in exactly the input's geometry.

NIfTI inputs: the input's header is copied (qform/sform, codes, pixdim, orientation) and only the
data type changes to uint8, so the mask has the input's shape and affine bit for bit. DICOM inputs:
SimpleITK writes the mask with the series image's origin, spacing and direction.
Probabilities go to ``<case>.npz`` in the input's grid, with the reference header so that
``spineauto ensemble`` can write masks without the images.

The checks every command that writes predictions shares (``predict``, ``ensemble``, ``pipeline``)
live here too: the output folder lies apart from every input, reference, dataset and model
(:func:`~spineauto.io.outputs.check_output_apart`) and is
writable (:func:`check_writable`); a case that fails leaves none of its files, not even the
temporary one of an interrupted write (:func:`remove_case_outputs`), and the failures are summed up
in one line (:func:`failures_error`).
"""
from __future__ import annotations

import glob
import logging
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np

from spineauto.errors import SpineautoError
from spineauto.io.atomic import save_nifti, write_atomic
from spineauto.io.formats import IMAGE_ENDINGS
from spineauto.io.images import image_header, is_nifti, load_nifti, mask_image
from spineauto.io.outputs import check_output_apart  # noqa: F401 (the one output rule, used by predict, ensemble, pipeline)

log = logging.getLogger(__name__)
CASE_ENDINGS = (*IMAGE_ENDINGS, ".npz", ".json", ".seg.dcm")  # the files a case may have in an output folder (a mask in its input's format)


def write_mask(target: Path, labels: np.ndarray, header: nib.Nifti1Header | None = None, shape=None, sitk_reference=None) -> Path:
    """Write uint8 ``labels`` (X, Y, Z) atomically with the reference header (NIfTI) or image (DICOM)."""
    if sitk_reference is not None:
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(labels.astype(np.uint8).transpose(2, 1, 0)))
        img.CopyInformation(sitk_reference)
        return write_atomic(target, lambda p: sitk.WriteImage(img, str(p), True), suffix=".nii.gz")
    return save_nifti(target, mask_image(labels, header, tuple(shape) if shape is not None else labels.shape))


def write_probabilities(target: Path, probs: np.ndarray, reference: Path, labels: list[int]) -> Path:
    """``probabilities`` (K, X, Y, Z) float32 + the written mask's header, as a compressed npz (a mask in
    another format than NIfTI: a NIfTI header of its grid, so ``spineauto ensemble`` writes NIfTI masks)."""
    if is_nifti(reference):
        header = load_nifti(Path(reference)).header
    else:
        shape, affine, _ = image_header(Path(reference))
        header = nib.Nifti1Image(np.zeros(shape[:3], np.uint8), affine).header

    def _write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez_compressed(f, probabilities=probs.astype(np.float32, copy=False),
                                header=np.frombuffer(header.binaryblock, dtype=np.uint8),
                                shape=np.asarray(header.get_data_shape()), labels=np.asarray(labels))
    return write_atomic(target, _write, suffix=".npz")


def read_probabilities(path: Path, with_labels: bool = False):
    """(probabilities, header, shape) of a ``<case>.npz``; with ``with_labels`` also the declared
    label values it was written with (None in a file without them)."""
    try:
        with np.load(path) as z:
            probs = z["probabilities"]
            header = nib.Nifti1Header(z["header"].tobytes())
            shape = tuple(int(s) for s in z["shape"])
            labels = [int(v) for v in z["labels"]] if "labels" in z.files else None
        if probs.ndim != 4 or int(np.prod(probs.shape[1:])) != int(np.prod(shape)):
            raise ValueError(f"probabilities of shape {probs.shape} for an image of shape {shape}")
        if not np.isfinite(probs).all():
            raise ValueError("probabilities that are not finite (NaN/Inf)")
    except Exception as e:
        raise SpineautoError(f"{path}: not a spineauto probability file ({type(e).__name__}: {e}); "
                             "write it with `spineauto predict --save-probabilities`") from None
    return (probs, header, shape, labels) if with_labels else (probs, header, shape)


def warn_undeclared_labels(case: str, labels: np.ndarray, declared: Sequence[int]) -> None:
    """Log a warning naming ``case`` when a predicted mask holds values that are not declared labels."""
    present = np.flatnonzero(np.bincount(np.asarray(labels, dtype=np.uint8).ravel(), minlength=1))
    undeclared = sorted(set(present.tolist()) - {int(v) for v in declared})
    if undeclared:
        log.warning("%s: predicted label value(s) %s that the dataset does not declare (labels %s); check the model",
                    case, undeclared, sorted(int(v) for v in declared))


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there, before any work is done."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SpineautoError(f"{folder}: exists and is not a folder; choose another -o folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".spineauto_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SpineautoError(f"{folder}: output folder is not writable ({e.strerror}); choose another -o folder") from None


def error_message(e: BaseException) -> str:
    """One line for a failed case: a :class:`SpineautoError` as it is, an OS error with its path."""
    if isinstance(e, SpineautoError):
        return str(e)
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or type(e).__name__}"
    return f"{type(e).__name__}: {e}"


@contextmanager
def writing(target: Path) -> Iterator[None]:
    """Turn an OS error while writing ``target`` into one line naming the path."""
    try:
        yield
    except OSError as e:
        where = e.filename2 or e.filename or target  # os.replace(temporary, target): the target
        raise SpineautoError(f"{where}: cannot write ({e.strerror or e}); check the output folder") from None


def remove_temporaries(output: Path, case: str) -> None:
    """Delete the temporary files (``.<case>.nii.gz.XXXX.tmp.nii.gz``, see :mod:`spineauto.io.atomic`)
    that a killed earlier run left while writing this case's outputs."""
    for ending in CASE_ENDINGS:
        for p in Path(output).glob(f".{glob.escape(case + ending)}.*.tmp*"):
            with suppress(OSError):
                p.unlink()


def remove_case_outputs(output: Path, case: str) -> None:
    """A failed case leaves nothing: its outputs (also those of an earlier run) and temporary files."""
    for ending in CASE_ENDINGS:
        path = Path(output) / f"{case}{ending}"
        try:
            if path.is_file() or path.is_symlink():
                path.unlink()
        except OSError as e:
            log.warning("%s: could not remove the failed case's %s (%s)", case, path, e.strerror)
    remove_temporaries(output, case)


def failures_error(failed: dict[str, str], total: int, output: Path) -> SpineautoError:
    """The one-line summary of the failed cases of a run that wrote the others to ``output``."""
    first = next(iter(failed.items()))
    return SpineautoError(f"{len(failed)} of {total} case(s) failed (first: {first[0]}: {first[1]}); "
                          f"{total - len(failed)} written to {output}")
