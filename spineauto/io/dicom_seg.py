"""DICOM-SEG through highdicom: a label map read onto the image series a segmentation references,
and a predicted label map written as a DICOM-SEG that references its source series.

Both directions work frame by frame on the series' own files in slice order (the order SimpleITK
stacks them into the image's Z axis), so that voxel ``(x, y, z)`` of the image is pixel
``(row y, column x)`` of slice file ``z`` and no geometry has to be recomputed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from spineauto.errors import SpineautoError

log = logging.getLogger(__name__)
logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every module it copies at INFO
SOFTWARE = "spineauto"


SEG_STORAGE, RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.481.3"


def mask_object_kind(path: Path) -> str | None:
    """"DICOM-SEG" or "RTSTRUCT" for a DICOM file holding a Segmentation or an RT Structure Set (by its
    SOP class or modality, read header only); None for anything else."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"])
    except Exception:  # noqa: BLE001 - not DICOM at all
        return None
    sop, modality = str(ds.get("SOPClassUID", "")), str(ds.get("Modality", ""))
    return "DICOM-SEG" if SEG_STORAGE == sop or modality == "SEG" else "RTSTRUCT" if RTSTRUCT_STORAGE == sop or modality == "RTSTRUCT" else None


def referenced_series(path: Path) -> str:
    """The SeriesInstanceUID of the image series a DICOM-SEG segments."""
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    refs = ds.get("ReferencedSeriesSequence") or []
    if not refs:
        raise SpineautoError(f"{path}: DICOM-SEG without a ReferencedSeriesSequence; it does not say which series it segments")
    return str(refs[0].SeriesInstanceUID)


def read_seg_onto(path: Path, files: list[str]) -> tuple[np.ndarray, dict[str, int]]:
    """(label map (X, Y, Z) uint8 on the series of ``files`` (slice order), segment label -> value).

    Each segment becomes its segment number as a label value (later segments win where they overlap).
    A DICOM-SEG that references another series, or a slice of this one that the series lacks, is an
    error naming the file.
    """
    import highdicom as hd
    import pydicom

    uids = [str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID) for f in files]
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
    if referenced_series(path) != series:
        raise SpineautoError(f"{path}: DICOM-SEG references series {referenced_series(path)}, not the series {series} "
                             f"in {Path(files[0]).parent} it lies with; put it beside the series it segments")
    try:
        seg = hd.seg.segread(str(path))
        referenced = {str(u) for _, _, u in seg.get_source_image_uids()}
        labels = np.zeros((len(files), seg.Rows, seg.Columns), np.uint8)
        covered = [u for u in uids if u in referenced]
        if covered:
            pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=covered, combine_segments=True,
                                                       skip_overlap_checks=True)
            for u, frame in zip(covered, pixels):
                labels[uids.index(u)] = frame
    except SpineautoError:
        raise
    except Exception as e:  # noqa: BLE001 - highdicom raises many kinds for a damaged or unusual object
        raise SpineautoError(f"{path}: cannot read the DICOM-SEG onto its series ({type(e).__name__}: {e})") from None
    names = {str(s.SegmentLabel): int(s.SegmentNumber) for s in seg.SegmentSequence}
    return np.ascontiguousarray(labels.transpose(2, 1, 0)), names


def write_dicom_seg(target: Path, labels: np.ndarray, files: list[str], label_names: dict[int, str]) -> Path:
    """``labels`` (X, Y, Z) on the series of ``files`` (slice order) as a DICOM-SEG referencing it,
    one segment per declared label value > 0 (``label_names``: value -> name), written atomically."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from spineauto import __version__
    from spineauto.io.atomic import write_atomic

    sources = [pydicom.dcmread(f) for f in files]
    frames = np.ascontiguousarray(labels.transpose(2, 1, 0)).astype(np.uint8)  # (slices, rows, columns)
    frames[~np.isin(frames, [v for v in label_names if v > 0])] = 0  # a value the model does not declare has no segment
    algorithm = hd.AlgorithmIdentificationSequence(name=SOFTWARE, version=__version__, family=codes.cid7162.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(
        segment_number=value, segment_label=name, segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.SpinalCord if "cord" in name.lower() else
        codes.SCT.Lesion if "lesion" in name.lower() else codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        for value, name in sorted(label_names.items()) if value > 0]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames if len(sources) > 1 else frames[0],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
        series_instance_uid=hd.UID(), series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=SOFTWARE, manufacturer_model_name=SOFTWARE,
        software_versions=__version__, device_serial_number="0", omit_empty_frames=False,
        series_description=f"{getattr(sources[0], 'SeriesDescription', '')} {SOFTWARE} segmentation".strip())
    return write_atomic(target, lambda p: seg.save_as(str(p)), suffix=".dcm")
