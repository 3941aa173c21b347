"""Input cases for predict (case sources of :mod:`spineauto.inference.driver`): image files of any
format :mod:`spineauto.io.formats` reads (nnU-Net ``<case>_0000.nii.gz`` naming or plain
``<case>.nii.gz``, likewise ``.nrrd``, ``.png`` ...; single file or folder) or DICOM series (one case
per stack).

Every case is read into ``(C, X, Y, Z)`` float32 with its RAS affine, plus a reference to write the
output with: the first channel's file (the mask is written in its format and grid), or the
SimpleITK image of the DICOM series.

In a folder, each file's case name is resolved on its own: ``<case>_XXXX.nii.gz`` is channel XXXX
of ``<case>``, any other name is a one-channel case of that name; two files that give the same case
and channel are an error, never a rename. A case read with NaN/Inf voxels fails with the file
named (a prediction of it would be garbage); an all-zero channel or a sheared (non-orthogonal)
affine is read with a warning naming the case (:func:`check_scan`).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from spineauto.errors import SpineautoError
from spineauto.inference.roi import check_roi_grid, read_roi, restrict_to_roi, roi_file, spatial_shape
from spineauto.io.formats import IMAGE_ENDINGS, sitk_affine, sitk_to_array, strip_ending  # noqa: F401 - strip_ending: cohort's
from spineauto.io.geometry import voxel_sizes
from spineauto.io.images import DIRECTION_ATOL, image_header, is_nifti, mask_ending, read_channels, write_label_map

log = logging.getLogger(__name__)
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class InputCase:
    name: str
    files: list[Path] = field(default_factory=list)  # image files, one per channel (an RGB picture: three)
    dicom: Any = None  # SimpleITK image of a DICOM stack
    dicom_files: list[str] = field(default_factory=list)  # its files, in the image's slice order (for DICOM-SEG)
    dicom_seg_labels: dict[int, str] | None = None  # write <case>.seg.dcm too, one segment per label value -> name
    metadata: dict = field(default_factory=dict)
    roi: Path | None = None  # mask to crop around, for a configuration with an roi (cord -> lesion cascade)
    pixel_spacing: tuple[float, float] | None = None  # of 2D pictures (the model's dataset declares it)
    _restrict: Any = field(default=None, init=False, repr=False, compare=False)  # (mask, affine, mm) once read

    @property
    def source(self) -> str:
        return str(self.files[0]) if self.files else f"DICOM {self.metadata.get('source', '')} {self.metadata.get('SeriesInstanceUID', '')}".strip()

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """(C, X, Y, Z) float32 and the RAS affine, checked by :func:`check_scan`."""
        if self.files:
            data, affine = read_channels(self.files, self.pixel_spacing)
        else:
            data, affine = sitk_to_array(self.dicom)[None], sitk_affine(self.dicom)
        check_scan(self.name, data, affine, [str(f) for f in self.files] or [self.source])
        return data, affine

    def preprocessed(self, model) -> tuple[np.ndarray, dict]:
        """Read, reorient and preprocess with the model's plan: ((C, S, H, W), restore properties)."""
        from spineauto.preprocessing.preprocess import preprocess_array

        data, affine = self.read()
        if data.shape[0] != model.num_channels:
            raise SpineautoError(f"{self.source}: {data.shape[0]} channel(s) but the model expects {model.num_channels}")
        check_spacing(self.source, data.shape[1:], affine, model.plan)
        roi = None
        if model.plan.roi is not None:
            if self.roi is None:
                raise SpineautoError(f"{self.source}: {_needs_roi(model.plan)}")
            roi = read_roi(self.roi, data.shape[1:], affine, self.source, self.pixel_spacing)
            self._restrict = (roi, affine, model.plan.roi.remove_outside_mm)
        layout, _, props = preprocess_array(data, affine, model.plan, model.intensity, roi=roi, name=str(self.roi or self.source))
        return layout, props

    def preprocessed_around(self, model, mask: np.ndarray, margin_mm: float) -> tuple[np.ndarray, dict]:
        """As :meth:`preprocessed`, cropped to the box around ``mask`` (the localise-then-segment second pass)."""
        data, affine = self.read()
        return preprocess_around(model, data, affine, mask, margin_mm, self.source)

    @property
    def mask_ending(self) -> str:
        """The mask file's ending: the input's own format (a DICOM series: NIfTI)."""
        return mask_ending(self.files[0]) if self.files else ".nii.gz"

    def write_mask(self, target: Path, labels: np.ndarray) -> Path:
        """The mask in the first channel's format and grid (NIfTI: its header), or the DICOM series' geometry.

        For a configuration with an roi, label voxels farther than ``roi.remove_outside_mm`` from
        the case's ROI mask are zeroed first, in ``labels`` itself, so that the caller's prediction
        and the file agree.
        """
        from spineauto.inference.export import write_mask

        if self._restrict is not None:
            mask, affine, distance = self._restrict
            labels[...] = restrict_to_roi(labels, mask, affine, distance)
            self._restrict = None
        if self.files:
            return write_label_map(target, labels, self.files[0])
        written = write_mask(target, labels, sitk_reference=self.dicom)
        if self.dicom_seg_labels is not None:
            from spineauto.io.dicom_seg import write_dicom_seg

            write_dicom_seg(target.with_name(f"{self.name}.seg.dcm"), labels, self.dicom_files, self.dicom_seg_labels)
        return written


def preprocess_around(model, data: np.ndarray, affine: np.ndarray, mask: np.ndarray, margin_mm: float,
                      name: str) -> tuple[np.ndarray, dict]:
    """``data`` (C, X, Y, Z) preprocessed per the model's plan, cropped to the box around ``mask``
    ((X, Y, Z) bool) widened by ``margin_mm`` and normalised inside it: ((C, S, H, W), restore properties)."""
    from spineauto.planning.plans import RoiPlan
    from spineauto.preprocessing.preprocess import preprocess_array

    plan = replace(model.plan, roi=RoiPlan(label=model.plan.localise.label, margin_mm=margin_mm, jitter_mm=0.0, remove_outside_mm=0.0))
    layout, _, props = preprocess_array(data, affine, plan, model.intensity, roi=mask, name=name)
    return layout, props


def check_scan(case: str, data: np.ndarray, affine: np.ndarray, sources: list[str]) -> None:
    """A scan to predict: NaN/Inf voxels are an error naming the file (as the integrity check of
    training data rejects them); an all-zero channel or a sheared affine is a warning naming the case."""
    for channel, source in zip(data, sources):
        if not np.isfinite(channel).all():
            bad = int(np.count_nonzero(~np.isfinite(channel)))
            raise SpineautoError(f"{source}: {bad} NaN/Inf voxel(s) of {channel.size}; replace them (e.g. with 0) before predicting")
        if not channel.any():
            log.warning("%s: %s is all zero; its prediction says nothing about the scan", case, source)
        elif channel.min() == channel.max():
            raise SpineautoError(f"{source}: every voxel is {float(channel.flat[0]):g} (a constant image): there is nothing to segment; "
                                 "check the export")
    shear = affine_shear(affine)
    if shear > DIRECTION_ATOL:
        log.warning("%s: the affine of %s is sheared (voxel axes not orthogonal, largest cosine %.2g); the mask is written "
                    "in its grid, but the scan is resampled as if its axes were orthogonal", case, sources[0], shear)


SPACING_FACTOR = 10  # in-plane voxel sizes this many times finer or coarser than the model's are not the scan the header says


def check_spacing(source: str, shape, affine: np.ndarray, plan) -> None:
    """Refuse a scan whose in-plane voxel size is more than :data:`SPACING_FACTOR` times finer or
    coarser than the model's target spacing: a wrong header (1e-4 mm shrinks a slice to a pixel, 50 mm
    blows it up), whose mask would be confidently wrong."""
    from spineauto.preprocessing.preprocess import slice_axis_for

    sizes = voxel_sizes(affine)
    axis = slice_axis_for(plan, affine, shape)
    in_plane = [float(s) for i, s in enumerate(sizes) if i != axis]
    lo, hi = min(plan.target_spacing), max(plan.target_spacing)
    if min(in_plane) < lo / SPACING_FACTOR or max(in_plane) > hi * SPACING_FACTOR:
        raise SpineautoError(f"{source}: in-plane voxel size {[round(s, 6) for s in in_plane]} mm is more than {SPACING_FACTOR} times "
                             f"off the model's {[round(t, 4) for t in plan.target_spacing]} mm; check the header's voxel size (pixdim/affine)")


def affine_shear(affine: np.ndarray) -> float:
    """The largest |cosine| between two voxel axes of ``affine`` (0 for an orthogonal grid)."""
    axes = np.asarray(affine, float)[:3, :3]
    norms = np.linalg.norm(axes, axis=0)
    if not np.all(norms > 0):
        return 1.0
    unit = axes / norms
    return float(np.abs(unit.T @ unit - np.eye(3)).max())


def _needs_roi(plan) -> str:
    return (f"configuration {plan.name} works in a box around the {plan.roi.label}: pass --roi FOLDER with a "
            f"<case>.nii.gz {plan.roi.label} mask per input case (e.g. the masks of `spineauto predict` with the {plan.roi.label} model)")


def attach_roi_masks(cases: list[InputCase], plan, folder: Path | None) -> None:
    """Give each case its ROI mask ``folder/<case>.nii.gz``, checked before any case runs: a
    configuration without an roi takes no folder, one with an roi needs one, with a mask per case
    in that case's grid (NIfTI inputs are checked here from the headers, DICOM ones when read)."""
    if plan.roi is None:
        if folder is not None:
            raise SpineautoError(f"--roi {folder}: configuration {plan.name} does not crop to an ROI; leave --roi out")
        return
    if folder is None:
        raise SpineautoError(_needs_roi(plan))
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise SpineautoError(f"{folder}: ROI folder not found; {_needs_roi(plan)}")
    for case in cases:
        case.roi = roi_file(folder, case.name)
        if case.files:
            shape, affine, _ = image_header(case.files[0], case.pixel_spacing)
            check_roi_grid(case.roi, spatial_shape(shape[:3]), affine, str(case.files[0]), case.pixel_spacing)


def discover_cases(source: Path, num_channels: int, pixel_spacing=None) -> list[InputCase]:
    """Cases under ``source`` (an image file, a folder of image files, or a folder of DICOM series);
    ``pixel_spacing``: what 2D pictures get (the model's dataset.json declares it)."""
    source = Path(source).expanduser()
    if not source.exists():
        raise SpineautoError(f"{source}: input not found; pass a folder of image files or DICOM series")
    if source.is_file():
        if not source.name.lower().endswith(IMAGE_ENDINGS):
            raise SpineautoError(f"{source}: not an image file spineauto reads ({', '.join(IMAGE_ENDINGS)}); pass a folder for DICOM series")
        files = [source]
    else:
        try:
            files = sorted(p for p in source.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_ENDINGS) and not p.name.startswith("."))
        except OSError as e:
            raise SpineautoError(f"{source}: cannot read the input folder ({e.strerror}); check its permissions") from None
    if not files:
        return _dicom_cases(source)
    groups: dict[str, dict[int, Path]] = {}
    for p in files:
        stem = strip_ending(p.name)
        m = _CHANNEL.match(stem)
        if m is None and num_channels != 1 and is_nifti(p):  # a picture or vector image may hold every channel
            raise SpineautoError(f"{p}: the model expects {num_channels} channels per case; name the files "
                                 "<case>_0000.nii.gz, <case>_0001.nii.gz, ... (nnU-Net naming)")
        case, channel = (m["case"], int(m["channel"])) if m else (stem, 0)
        other = groups.setdefault(case, {}).get(channel)
        if other is not None:
            raise SpineautoError(f"{source}: {other.name} and {p.name} both give case {case!r}"
                                 f"{f' channel _{channel:04d}' if num_channels > 1 else ''}; rename or remove one of them")
        groups[case][channel] = p
    cases = []
    for case, chans in sorted(groups.items()):
        several = not is_nifti(chans[min(chans)])  # RGB in one file: the read counts its channels
        if sorted(chans) != list(range(len(chans) if several and len(chans) < num_channels else num_channels)):
            have = ", ".join(f"_{c:04d}" for c in sorted(chans))
            raise SpineautoError(f"{source}: case {case!r} has channel files {have} but the model expects {num_channels} "
                                 f"channel(s) _0000.._{num_channels - 1:04d}; add or remove files")
        cases.append(InputCase(case, [chans[c] for c in sorted(chans)], pixel_spacing=pixel_spacing))
    return cases


def _dicom_cases(folder: Path) -> list[InputCase]:
    from spineauto.datasets.dicom import read_dicom_series

    try:
        series = read_dicom_series(folder)
    except SpineautoError:
        series = []
    if not series:
        raise SpineautoError(f"{folder}: no image files ({', '.join(IMAGE_ENDINGS)}) and no readable DICOM series found; check the input folder")
    cases = []
    for stack, image in series:
        cases.append(InputCase(stack.name, dicom=image, metadata=dict(stack.metadata, SeriesInstanceUID=stack.series_uid),
                               dicom_files=list(stack.files)))
        log.info("%s: %s %s", stack.name, stack.metadata.get("source", ""), stack.metadata.get("SeriesDescription", stack.series_uid))
    return cases
