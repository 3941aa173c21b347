"""RTSTRUCT (DICOM RT Structure Set) masks: ROI contours rasterised onto the image series they reference.

pydicom reads the contours (patient coordinates in mm); each closed planar contour is drawn with
``skimage.draw.polygon`` onto the slice it lies on (the slice its ContourImageSequence names, else the
slice whose position along the slice normal is within half a slice gap of the contour's). Pixel
``(row, column)`` of a slice is where ``ImagePositionPatient + column * PixelSpacing[1] * row direction +
row * PixelSpacing[0] * column direction`` lies; a pixel whose centre is inside or on a contour is filled, so
a contour around pixel edges fills those pixels.

Labels: each ROI becomes its ROI number (StructureSetROISequence ROINumber) under its ROIName, as a
DICOM-SEG's segment becomes its segment number; ROIs are drawn in number order, so a higher number wins
where two overlap (cord 1, lesion 2: the lesion inside the cord). Within one ROI and slice the contours
are combined by exclusive or: a contour inside another is a hole. POINT and OPEN_PLANAR contours enclose
nothing and are skipped with a warning.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from spineauto.errors import SpineautoError

log = logging.getLogger(__name__)


def referenced_series(path: Path) -> str:
    """The SeriesInstanceUID of the image series whose slices the structure set's contours lie on."""
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    uids = {str(series.SeriesInstanceUID)
            for frame in ds.get("ReferencedFrameOfReferenceSequence") or []
            for study in frame.get("RTReferencedStudySequence") or []
            for series in study.get("RTReferencedSeriesSequence") or [] if "SeriesInstanceUID" in series}
    if len(uids) != 1:
        which = "no" if not uids else f"{len(uids)}"
        raise SpineautoError(f"{path}: RTSTRUCT references {which} image series (ReferencedFrameOfReferenceSequence); "
                             "one structure set per series can be read as its mask")
    return uids.pop()


def read_rtstruct_onto(path: Path, files: list[str]) -> tuple[np.ndarray, dict[str, int]]:
    """(label map (X, Y, Z) uint8 on the series of ``files`` (slice order), ROI name -> value).

    A structure set referencing another series, an ROI number outside 1..255 and a contour that lies on
    no slice of the series are errors naming the file.
    """
    import pydicom
    from skimage.draw import polygon

    slices = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    series = str(slices[0].SeriesInstanceUID)
    referenced = referenced_series(path)
    if referenced != series:
        raise SpineautoError(f"{path}: RTSTRUCT references series {referenced}, not the series {series} "
                             f"in {Path(files[0]).parent}; put it beside the series it outlines")
    try:
        ds = pydicom.dcmread(str(path))
        origins = np.array([[float(v) for v in s.ImagePositionPatient] for s in slices])
        orientation = np.array([float(v) for v in slices[0].ImageOrientationPatient])
        row_spacing, column_spacing = (float(v) for v in slices[0].PixelSpacing)
        shape = (int(slices[0].Rows), int(slices[0].Columns))
        names = {int(roi.ROINumber): str(roi.ROIName) for roi in ds.StructureSetROISequence}
        contours = {int(c.ReferencedROINumber): list(c.get("ContourSequence") or []) for c in ds.ROIContourSequence}
    except (AttributeError, KeyError, ValueError, TypeError) as e:
        raise SpineautoError(f"{path}: cannot read the RTSTRUCT onto its series ({type(e).__name__}: {e})") from None
    bad = sorted(n for n in names if not 0 < n < 256)
    if bad:
        raise SpineautoError(f"{path}: ROI number {bad[0]} ({names[bad[0]]!r}) is not a label value 1..255; renumber the ROIs")
    row_dir, column_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, column_dir)
    along = origins @ normal
    tolerance = max(float(np.min(np.abs(np.diff(along)))) / 2 if len(along) > 1 else 0.0, 1e-3)
    by_uid = {str(s.SOPInstanceUID): k for k, s in enumerate(slices)}
    labels = np.zeros((len(files), *shape), np.uint8)
    for number in sorted(names):
        drawn = np.zeros_like(labels, dtype=bool)
        for contour in contours.get(number, []):
            if str(contour.get("ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
                log.warning("%s: ROI %r has a %s contour, which encloses nothing; skipped", path, names[number], contour.ContourGeometricType)
                continue
            points = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
            k = _slice_of(contour, float(np.mean(points @ normal)), along, tolerance, by_uid)
            if k is None:
                raise SpineautoError(f"{path}: a contour of ROI {names[number]!r} at {float(points[0] @ normal):.4g} mm along the slice "
                                     f"normal lies on no slice of series {series}; the structure set was drawn on another series")
            offset = points - origins[k]
            rr, cc = polygon(offset @ column_dir / row_spacing, offset @ row_dir / column_spacing, shape)
            drawn[k, rr, cc] ^= True
        labels[drawn] = number
    return np.ascontiguousarray(labels.transpose(2, 1, 0)), {name: number for number, name in names.items()}


def _slice_of(contour, position: float, along: np.ndarray, tolerance: float, by_uid: dict[str, int]) -> int | None:
    """The index of the slice a contour lies on: the image it references, else the slice within
    ``tolerance`` mm of its ``position`` along the slice normal; None when there is none."""
    for image in contour.get("ContourImageSequence") or []:
        if str(image.get("ReferencedSOPInstanceUID", "")) in by_uid:
            return by_uid[str(image.ReferencedSOPInstanceUID)]
    k = int(np.argmin(np.abs(along - position)))
    return k if abs(along[k] - position) <= tolerance else None
