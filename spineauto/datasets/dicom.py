"""Read DICOM series with SimpleITK and convert them into an nnU-Net v2 raw dataset (``imagesTs`` only).

Series are found per directory with GDCM (``ImageSeriesReader.GetGDCMSeriesIDs``), walking ``root``
recursively, and sorted by directory and SeriesInstanceUID. A series is read as one 3D volume only
when that volume has a geometry: slices that share one orientation, each at its own position. A
series whose slices have several orientations (a three-plane localizer, radial projections) is split
into one stack per orientation, and repeated positions (several echoes or time points in one series)
into one stack per repetition; ``metadata['stack']`` tells the stacks of one series apart. Every stack
becomes a case named after its series (:func:`case_names`: the SeriesDescription, else the folder name,
made filesystem-safe and unique), written as NIfTI by SimpleITK, geometry preserved. Segmentation
objects (DICOM-SEG, RTSTRUCT) are no image series: :func:`find_masks` pairs them with the series they reference.

A series with a slice missing or unreadable is refused, never spaced evenly over the hole: a file in a
series folder that looks like a DICOM image (``DICM`` preamble or a DICOM file ending) but that GDCM
could not read is named, and a gap in the slice positions of a stack (a step of at least
``MISSING_SLICE_RATIO`` times the smallest one) is named by the slices on either side of it, with
their instance numbers. Smaller unevenness is only a warning (``nonuniform_slice_gaps_mm``).
"""
from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import SimpleITK as sitk

from spineauto.datasets.raw_dataset import check_output_free, staged_dataset_dir, write_dataset_json
from spineauto.errors import SpineautoError

logger = logging.getLogger(__name__)

TAGS = {
    "Modality": "0008|0060",
    "SeriesDescription": "0008|103e",
    "SeriesInstanceUID": "0020|000e",
    "PatientID": "0010|0020",
    "ProtocolName": "0018|1030",
    "ScanningSequence": "0018|0020",
    "SequenceName": "0018|0024",
    "BodyPartExamined": "0018|0015",
}
NOT_IMAGES = ("SEG", "RTSTRUCT", "SR", "PR")  # modalities of series that hold no image to train on
_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")
ORIENTATION, POSITION, INSTANCE, PIXEL_SPACING = "0020|0037", "0020|0032", "0020|0013", "0028|0030"
POSITION_TOLERANCE_MM = 1e-3
SPACING_TOLERANCE = 0.01  # relative deviation of a slice gap from the mean before we warn
MISSING_SLICE_RATIO = 1.5  # a gap this many times the smallest slice step means a slice is missing
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"  # DICOMDIR: a DICOM file that is no image


@dataclass
class DicomStack:
    """Files of one series that form one 3D volume, in slice order, and what we know about them."""

    series_uid: str
    directory: Path
    files: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # the case name (:func:`case_names`), set by :func:`find_dicom_stacks`


@dataclass
class SeriesRow:
    """What ``convert dicom`` made of one series (stack): for the table it prints."""

    case: str
    source: str
    split: str  # "Tr" or "Ts"
    mask: str | None = None
    classes: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    why_test: str = ""


@dataclass
class DicomConversion:
    dataset: Path
    rows: list[SeriesRow] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)


def convert_dicom(root: Path, dataset_dir: Path, label_name: str = "cord", overwrite: bool = False) -> Path:
    """Write every DICOM series under ``root`` as a case of a raw dataset in ``dataset_dir`` (see :func:`convert_dicom_dataset`)."""
    return convert_dicom_dataset(root, dataset_dir, label_name=label_name, overwrite=overwrite).dataset


def convert_dicom_dataset(root: Path, dataset_dir: Path, label_name: str = "cord", overwrite: bool = False,
                          classes_from: Path | None = None) -> DicomConversion:
    """Every DICOM series (stack) under ``root`` -> a case of a raw dataset in ``dataset_dir``.

    A series with a mask (a DICOM-SEG under ``root`` that references it, or the one NIfTI file in its
    folder, in its grid) is a training case (``labelsTr``); with ``classes_from`` (a rules file,
    :mod:`spineauto.datasets.dicom_rules`) a series is a training case when the rules give it a class
    for every head (and a mask, when any series has one). The others go to ``imagesTs`` with the reason.
    """
    from spineauto.datasets.dicom_rules import classify, header_values, load_rules

    root = Path(root).expanduser().resolve()
    dataset_dir = Path(dataset_dir).expanduser().resolve()
    rules = load_rules(Path(classes_from)) if classes_from is not None else None
    try:
        check_output_free(dataset_dir, overwrite, root)
    except OSError as err:
        raise _output_error(err, dataset_dir) from None
    stacks = find_dicom_stacks(root)
    masks = find_masks(root, stacks)
    result = DicomConversion(dataset_dir)
    try:
        with staged_dataset_dir(dataset_dir, overwrite, root) as stage:
            cases: dict[str, dict[str, Any]] = {}
            written: dict[str, tuple[sitk.Image, np.ndarray | None]] = {}
            unnamed: set[int] = set()
            for stack, image in _read_stacks(stacks):
                case_id = stack.name
                metadata = dict(stack.metadata, source=_relative(stack.directory, root))
                row = SeriesRow(case_id, metadata["source"], "Ts")
                label_map = None
                if id(stack) in masks:
                    label_map, names, row.mask = _read_mask(masks[id(stack)], stack, image, root)
                    if names is None:  # a NIfTI mask: values only, named below
                        unnamed |= set(np.unique(label_map).tolist()) - {0}
                    else:
                        _merge_labels(result.labels, names, masks[id(stack)])
                if rules is not None:
                    got = classify(rules, header_values(stack.files[0]), f"DICOM series {stack.series_uid} in {stack.directory}")
                    row.classes, row.reasons, row.unmatched = got.classes, got.reasons, got.unmatched
                    metadata["classes_from"] = got.reasons
                cases[case_id] = {"subject": str(metadata.get("PatientID") or case_id), "classes": dict(row.classes), "metadata": metadata}
                written[case_id] = (image, label_map)
                result.rows.append(row)
            if not cases:
                raise SpineautoError(f"no DICOM series under {root} could be read as a scalar 3D image")
            for v in sorted(unnamed - set(result.labels.values())):  # values only NIfTI masks have: label_name for 1
                result.labels[label_name if v == 1 and label_name not in result.labels else f"label_{v}"] = int(v)
            with_masks = any(label_map is not None for _, label_map in written.values())
            for row in result.rows:
                image, label_map = written[row.case]
                missing = [f"no class for {', '.join(row.unmatched)}"] if row.unmatched else []
                if with_masks and label_map is None:
                    missing.append("no mask")
                row.split = "Ts" if missing or not (with_masks or rules) else "Tr"
                row.why_test = "; ".join(missing)
                _write_case(stage, dataset_dir, row, image, label_map)
            labels = {"background": 0, **dict(sorted(result.labels.items(), key=lambda kv: kv[1]))} if with_masks else \
                {} if rules else {"background": 0, label_name: 1}
            write_dataset_json(
                stage,
                name=dataset_dir.name,
                description=f"Converted from DICOM directory {root} by spineauto",
                labels=labels,
                num_training=sum(r.split == "Tr" for r in result.rows),
                cases=cases,
                class_order={h: list(c) for h, c in rules.items()} if rules else None,
            )
            result.labels = labels
    except OSError as err:  # a read-only raw folder, a file where a folder belongs, a full disk
        raise _output_error(err, dataset_dir) from None
    logger.info("converted %d DICOM series from %s into %s (%d training)", len(cases), root, dataset_dir,
                sum(r.split == "Tr" for r in result.rows))
    return result


def _write_case(stage: Path, dataset_dir: Path, row: SeriesRow, image: sitk.Image, label_map: np.ndarray | None) -> None:
    target = Path(f"images{row.split}") / f"{row.case}_0000.nii.gz"
    try:
        with _quiet_itk():
            sitk.WriteImage(image, str(stage / target), True)
            if label_map is not None and row.split == "Tr":
                mask = sitk.GetImageFromArray(np.ascontiguousarray(label_map.transpose(2, 1, 0)))
                mask.CopyInformation(image)
                sitk.WriteImage(mask, str(stage / "labelsTr" / f"{row.case}.nii.gz"), True)
    except RuntimeError as err:
        raise SpineautoError(f"{dataset_dir / target}: cannot write the converted series ({_itk_reason(err)}); "
                             "nothing was written") from None


def find_masks(root: Path, stacks: list[DicomStack]) -> dict[int, Path]:
    """id(stack) -> its mask file: a DICOM-SEG or RTSTRUCT anywhere under ``root`` referencing its series,
    else the one NIfTI file in its folder (a folder holding one stack). A DICOM-SEG or RTSTRUCT of a series
    that is not under ``root``, two masks for one series, or two NIfTI files in a series folder are one-line errors."""
    from spineauto.io import dicom_seg, rtstruct

    by_uid: dict[str, list[DicomStack]] = defaultdict(list)
    for stack in stacks:
        by_uid[stack.series_uid].append(stack)
    masks: dict[int, Path] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith((".nii", ".nii.gz", ".json", ".txt"))):
        kind = dicom_seg.mask_object_kind(path)
        if kind is None:
            continue
        uid = (dicom_seg if kind == "DICOM-SEG" else rtstruct).referenced_series(path)
        if uid not in by_uid:
            raise SpineautoError(f"{path}: {kind} references series {uid}, which is not among the series under {root}; "
                                 "add that series or remove the segmentation")
        for stack in by_uid[uid]:
            if id(stack) in masks:
                raise SpineautoError(f"{path}: a second mask for series {uid} (the first: {masks[id(stack)]}); keep one")
            masks[id(stack)] = path
    by_folder: dict[Path, list[DicomStack]] = defaultdict(list)
    for stack in stacks:
        by_folder[stack.directory].append(stack)
    for folder, here in by_folder.items():
        nifti = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((".nii", ".nii.gz")))
        if not nifti:
            continue
        if len(nifti) > 1 or len(here) > 1:
            raise SpineautoError(f"{folder}: {len(nifti)} NIfTI file(s) beside {len(here)} series; a mask beside its series needs "
                                 "one series and one .nii.gz in the folder")
        if id(here[0]) in masks:
            raise SpineautoError(f"{nifti[0]}: a second mask for series {here[0].series_uid} (the first: {masks[id(here[0])]}); keep one")
        masks[id(here[0])] = nifti[0]
    return masks


def _read_mask(path: Path, stack: DicomStack, image: sitk.Image, root: Path) -> tuple[np.ndarray, dict[str, int] | None, str]:
    """(label map (X, Y, Z) on ``image``, label name -> value (a DICOM-SEG's segments, an RTSTRUCT's ROIs; None for a NIfTI
    mask, which has values only), the file relative to ``root``)."""
    from spineauto.io.formats import sitk_affine
    from spineauto.io.images import grid_mismatch, read_volume

    if not path.name.endswith((".nii", ".nii.gz")):
        from spineauto.io.dicom_seg import mask_object_kind, read_seg_onto
        from spineauto.io.rtstruct import read_rtstruct_onto

        labels, names = (read_rtstruct_onto if mask_object_kind(path) == "RTSTRUCT" else read_seg_onto)(path, stack.files)
    else:
        data, affine = read_volume(path)
        problem = grid_mismatch(data.shape, affine, image.GetSize(), sitk_affine(image))
        if problem:
            raise SpineautoError(f"{path}: mask grid does not match series {stack.series_uid} in {stack.directory}: {problem}; "
                                 "resample the mask onto the series")
        if not np.array_equal(data, np.round(data)) or data.min() < 0 or data.max() > 255:
            raise SpineautoError(f"{path}: mask values must be whole numbers 0..255 (label values)")
        labels, names = data.astype(np.uint8), None
    return labels, names, _relative(path, root)


def _merge_labels(labels: dict[str, int], names: dict[str, int], source: Path) -> None:
    """Add one mask's label names to the dataset's; one name with two values (or the reverse) is an error."""
    for name, value in names.items():
        other = next((n for n, v in labels.items() if v == value and n != name), None)
        if name in labels and labels[name] != value:
            raise SpineautoError(f"{source}: label {name!r} is {value} here and {labels[name]} in another mask; number the labels alike")
        if other is not None:
            raise SpineautoError(f"{source}: value {value} is {name!r} here and {other!r} in another mask; number the labels alike")
        labels[name] = value


def case_names(stacks: list[DicomStack]) -> list[str]:
    """One case name per stack: its SeriesDescription (else its folder's name), ``_stack<k>`` for the
    stacks split from one series, made filesystem-safe (letters, digits, ``.``, ``-``, ``_``) and
    unique (``_2``, ``_3`` ... in stack order)."""
    names, taken = [], set()
    for stack in stacks:
        base = stack.metadata.get("SeriesDescription") or stack.directory.name
        base = _UNSAFE.sub("_", base).strip("_.") or "series"
        if "stack" in stack.metadata:
            base += f"_stack{stack.metadata['stack']}"
        name, k = base, 2
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        names.append(name)
    return names


def _output_error(err: OSError, dataset_dir: Path) -> SpineautoError:
    """One line for an OS error while making ``dataset_dir``: the folder it names (never the staging one)."""
    where = Path(err.filename) if isinstance(err.filename, str) and err.filename else dataset_dir.parent
    if where.name.startswith(f"{dataset_dir.name}.tmp-") or where == dataset_dir:
        where = dataset_dir.parent
    reason = "not a folder" if isinstance(err, (FileExistsError, NotADirectoryError)) else err.strerror or type(err).__name__
    return SpineautoError(f"{where}: cannot write the dataset {dataset_dir.name} there ({reason}); "
                          "point SPINEAUTO_RAW at a writable folder")


def read_dicom_series(directory: Path, recursive: bool = True) -> list[tuple[DicomStack, sitk.Image]]:
    """``(stack, image)`` for every series (stack) under ``directory``: the stack names its case, uid and
    files (in slice order: the image's slice order).

    Images are 3D (a single slice gives a depth of one). Stacks split from one series share the uid
    and differ in ``metadata['stack']``. ``metadata['source']`` is the directory relative to
    ``directory``.
    """
    directory = Path(directory).expanduser().resolve()
    stacks = find_dicom_stacks(directory, recursive=recursive)
    for stack in stacks:
        stack.metadata["source"] = _relative(stack.directory, directory)
    return list(_read_stacks(stacks))


# --------------------------------------------------------------------------------------- discovery


def find_dicom_stacks(root: Path, recursive: bool = True) -> list[DicomStack]:
    """Every series under ``root`` split into 3D stacks, sorted by directory, series uid and stack."""
    if not root.is_dir():
        raise SpineautoError(f"DICOM folder {root} does not exist or is not a folder")

    def unreadable_folder(err: OSError) -> None:
        raise SpineautoError(f"{err.filename}: cannot list the folder ({err.strerror}); make it readable or move it out of {root}")

    directories = sorted(d for d, _, files in os.walk(root, onerror=unreadable_folder) if files) if recursive else [str(root)]
    stacks: list[DicomStack] = []
    for directory in directories:
        with _quiet_itk():
            uids = sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(directory))
        series = {}
        for uid in uids:
            with _quiet_itk():
                series[uid] = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(directory, uid))
        _check_left_out_files(Path(directory), {os.path.basename(f) for files in series.values() for f in files}, root)
        for uid, files in series.items():
            if _tag(_information_reader(files[0]), TAGS["Modality"]).upper() in NOT_IMAGES:
                continue  # a segmentation or report object of another series
            stacks.extend(split_series(uid, Path(directory), files))
    for stack, name in zip(stacks, case_names(stacks)):
        stack.name = name
    if not stacks:
        where = "or its subfolders " if recursive else ""
        raise SpineautoError(
            f"no DICOM series found in {root} {where}(files must be DICOM with a SeriesInstanceUID)"
        )
    return stacks


def split_series(uid: str, directory: Path, files: list[str]) -> list[DicomStack]:
    """Split one series' files into stacks of parallel slices at distinct positions, each in order."""
    infos = [_file_info(f) for f in files]
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for info in infos:
        if info["depth"] > 1 or info["orientation"] is None or info["position"] is None:
            groups[("file", info["file"])].append(info)  # multi-frame or no geometry: on its own
        else:
            groups[tuple(np.round(info["orientation"], 3))].append(info)
    stacks: list[list[dict[str, Any]]] = []
    for group in groups.values():
        stacks.extend(_split_repeated_positions(group))
    stacks.sort(key=lambda s: (s[0]["instance"], s[0]["file"]))
    metadata = _series_metadata(files[0])
    result = []
    for k, stack in enumerate(stacks):
        _check_stack(uid, directory, stack)
        meta = dict(metadata, num_files=len(stack))
        if len(stacks) > 1:
            meta["stack"] = k
        gaps = _slice_gaps(stack)
        if gaps is not None:
            meta["nonuniform_slice_gaps_mm"] = gaps
            logger.warning(
                "series %s in %s has uneven slice gaps (%.3g to %.3g mm): the NIfTI spacing is their mean",
                uid, directory, gaps[0], gaps[1],
            )
        result.append(DicomStack(uid, directory, [i["file"] for i in stack], meta))
    if len(stacks) > 1:
        logger.info("series %s in %s split into %d stacks (orientations or repeated positions)", uid, directory, len(stacks))
    return result


def _split_repeated_positions(group: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Sort parallel slices along their normal; the k-th slice at each position goes to stack k."""
    if len(group) == 1 or group[0]["orientation"] is None or group[0]["depth"] > 1:
        return [group]
    row, col = group[0]["orientation"][:3], group[0]["orientation"][3:]
    normal = np.cross(row, col)
    for info in group:
        info["along"] = float(np.dot(info["position"], normal))
    group = sorted(group, key=lambda i: (i["along"], i["instance"], i["file"]))
    stacks: list[list[dict[str, Any]]] = []
    previous, rank = None, 0
    for info in group:
        rank = rank + 1 if previous is not None and abs(info["along"] - previous) < POSITION_TOLERANCE_MM else 0
        previous = info["along"]
        while len(stacks) <= rank:
            stacks.append([])
        stacks[rank].append(info)
    if len({len(s) for s in stacks}) > 1:
        logger.warning("series in %s has a different number of slices at each position", Path(group[0]["file"]).parent)
    return stacks


def _slice_gaps(stack: list[dict[str, Any]]) -> list[float] | None:
    """``[min, max]`` slice gap when the gaps differ by more than the tolerance, else None."""
    if len(stack) < 3 or "along" not in stack[0]:
        return None
    gaps = np.diff([i["along"] for i in stack])
    mean = float(gaps.mean())
    if np.abs(gaps - mean).max() <= max(SPACING_TOLERANCE * abs(mean), POSITION_TOLERANCE_MM):
        return None
    return [round(float(gaps.min()), 4), round(float(gaps.max()), 4)]


def _check_stack(uid: str, directory: Path, stack: list[dict[str, Any]]) -> None:
    """Refuse a stack with a slice of another size than the others, or with a hole in its slice positions
    (a file missing or unreadable), naming the file or where the hole is."""
    sizes = [i["size"] for i in stack]
    usual = max(set(sizes), key=sizes.count)
    odd = next((i for i in stack if i["size"] != usual), None)
    if odd is not None:
        raise SpineautoError(
            f"DICOM series {uid} in {directory}: slice {Path(odd['file']).name} (instance {odd['instance']}) is "
            f"{'x'.join(map(str, odd['size']))} pixels where the other slices are {'x'.join(map(str, usual))}; "
            "restore the right file or move the series out of the folder"
        )
    if len(stack) < 3 or "along" not in stack[0]:
        return
    gaps = np.diff([i["along"] for i in stack])
    step = float(gaps.min())
    k = int(np.argmax(gaps))
    if step <= POSITION_TOLERANCE_MM or gaps[k] < MISSING_SLICE_RATIO * step:
        return
    before, after = stack[k], stack[k + 1]
    missing = max(1, int(round(gaps[k] / step)) - 1)
    raise SpineautoError(
        f"DICOM series {uid} in {directory}: about {missing} slice(s) missing between {Path(before['file']).name} "
        f"(instance {before['instance']}, {before['along']:.4g} mm along the slice normal) and {Path(after['file']).name} "
        f"(instance {after['instance']}, {after['along']:.4g} mm): a gap of {gaps[k]:.4g} mm where the slices are {step:.4g} mm apart; "
        "restore the missing or unreadable file(s) (the volume would be spaced evenly over the hole) or move the series out of the folder"
    )


def _check_left_out_files(directory: Path, claimed: set[str], root: Path) -> None:
    """Refuse a file of ``directory`` that no series claimed although it looks like a DICOM image (a slice
    GDCM could not read: truncated, damaged, unreadable); non-DICOM files and DICOMDIRs are ignored."""
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name in claimed or not entry.is_file():
            continue
        why = _broken_dicom_image(entry.path)
        if why:
            raise SpineautoError(f"{entry.path}: {why}; it may be a slice of a series in {directory}, which would be converted "
                                 f"without it: repair or restore the file, or move it out of {root}")


def _broken_dicom_image(path: str) -> str | None:
    """Why ``path`` is a DICOM image that cannot be read; None when it is none (notes, NIfTI, DICOMDIR, reports)."""
    import warnings

    import pydicom

    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as err:
        return f"cannot read the file ({err.strerror})"
    if head[128:132] != b"DICM" and Path(path).suffix.lower() not in DICOM_SUFFIXES:
        return None
    if not head:
        return "the DICOM file is empty"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as err:  # noqa: BLE001 - pydicom raises many kinds for a damaged file
        return f"not a readable DICOM file ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'damaged'})"
    sop = str(ds.file_meta.get("MediaStorageSOPClassUID", "") if hasattr(ds, "file_meta") else "") or str(ds.get("SOPClassUID", ""))
    if sop == DIRECTORY_STORAGE or (sop and "Image Storage" not in pydicom.uid.UID(sop).name):
        return None  # a DICOM object that is no image (DICOMDIR, structured report, presentation state)
    reason = _read_error(path)
    return f"a DICOM image that cannot be read (truncated or damaged: {reason})" if reason else None


def _itk_reason(err: RuntimeError) -> str:
    """The message of an ITK error: its first line after "Exception thrown in ...", without the
    ``ITK ERROR: Class(0x...):`` prefix and memory addresses."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip() and not line.startswith("Exception thrown in")]
    if not lines:
        return type(err).__name__
    return re.sub(r" ?\(0x[0-9a-fA-F]+\)", "", re.sub(r"^ITK ERROR: \w+\(0x[0-9a-fA-F]+\): ", "", lines[0]))


def _file_info(path: str) -> dict[str, Any]:
    reader = _information_reader(path)
    info: dict[str, Any] = {"file": path, "depth": reader.GetSize()[2] if reader.GetDimension() > 2 else 1,
                            "size": tuple(reader.GetSize()[:2])}
    info["orientation"] = _floats(reader, ORIENTATION, 6)
    info["position"] = _floats(reader, POSITION, 3)
    instance = _tag(reader, INSTANCE)
    try:
        info["instance"] = int(float(instance)) if instance else 0
    except ValueError:
        info["instance"] = 0
    return info


def _series_metadata(path: str) -> dict[str, Any]:
    reader = _information_reader(path)
    return {key: value for key, tag in TAGS.items() if (value := _tag(reader, tag))}


def _information_reader(path: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(path)
    try:
        with _quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError as err:
        raise SpineautoError(f"cannot read DICOM file {path}: {_itk_reason(err)}") from None
    return reader


def _tag(reader: sitk.ImageFileReader, tag: str) -> str:
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""


def _floats(reader: sitk.ImageFileReader, tag: str, count: int) -> np.ndarray | None:
    try:
        values = np.array([float(v) for v in _tag(reader, tag).split("\\")])
    except ValueError:
        return None
    return values if values.size == count else None


# ----------------------------------------------------------------------------------------- reading


def _read_stacks(stacks: list[DicomStack]) -> Iterator[tuple[DicomStack, sitk.Image]]:
    """Read each stack as a scalar 3D image; stacks that are not (colour, 4D) are skipped with a warning."""
    for stack in stacks:
        image = read_stack(stack)
        if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
            logger.warning(
                "skipping series %s in %s: %d-component %dD image, a scalar 3D image is expected",
                stack.series_uid, stack.directory, image.GetNumberOfComponentsPerPixel(), image.GetDimension(),
            )
            continue
        yield stack, image


def read_stack(stack: DicomStack) -> sitk.Image:
    """The stack's files as one image (a single 2D slice becomes a 3D image of depth one)."""
    spacing = _floats(_information_reader(stack.files[0]), PIXEL_SPACING, 2)
    if spacing is not None and not (np.isfinite(spacing).all() and (spacing > 0).all()):  # GDCM would read it as 1 mm
        shown = "\\".join(f"{v:g}" for v in spacing)
        raise SpineautoError(f"{stack.files[0]}: PixelSpacing {shown} of series {stack.series_uid}: "
                             "a pixel size must be a number of mm > 0; fix the header (the scanner's or the anonymiser's export)")
    try:
        with _quiet_itk():
            if len(stack.files) == 1:
                image = sitk.ReadImage(stack.files[0], imageIO="GDCMImageIO")
            else:
                reader = sitk.ImageSeriesReader()
                reader.SetImageIO("GDCMImageIO")
                reader.SetFileNames(stack.files)
                image = reader.Execute()
    except RuntimeError as err:
        culprit = next((f for f in stack.files if _read_error(f)), None)
        where = f"its file {culprit} cannot be read" if culprit else "its files cannot be read together"
        raise SpineautoError(
            f"cannot read DICOM series {stack.series_uid} in {stack.directory}: {where} ({_itk_reason(err)}); "
            "repair or restore the file, or move the series out of the folder"
        ) from None
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    return image


def _read_error(path: str) -> str | None:
    """Why GDCM cannot read the image file ``path``; None when it can."""
    try:
        with _quiet_itk():
            sitk.ReadImage(path, imageIO="GDCMImageIO")
    except RuntimeError as err:
        return _itk_reason(err)
    return None


@contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silence ITK's own stderr warnings (we log what matters ourselves); restore the setting after."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _relative(path: Path, root: Path) -> str:
    rel = Path(path).relative_to(root).as_posix()
    return rel if rel else "."
