"""Integrity checks of a raw dataset: every problem is collected and reported at once.

The header checks of :func:`load_training_case` (geometry usable, voxel data that fits in memory)
run before any voxel is read, with or without ``--no-verify``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from spineauto.datasets.dataset_json import DatasetInfo
from spineauto.errors import SpineautoError
from spineauto.io.images import grid_mismatch, image_header, read_channels, read_volume
from spineauto.parallel import human_bytes, machine_memory

READ_COPIES = 3  # a read holds the file's own dtype, its float32 copy and the stacked channels at once


def check_layout(info: DatasetInfo) -> list[str]:
    """Problems visible without reading voxels: counts, missing files, stray channels, class labels."""
    problems = []
    folder, ending = info.folder, info.file_ending
    cases = info.training_cases()
    if not cases:
        problems.append(f"{folder / 'imagesTr'}: no training images named <case>_0000{ending}")
    if info.num_training >= 0 and info.num_training != len(cases):
        problems.append(f"{folder / 'dataset.json'}: numTraining is {info.num_training} but imagesTr holds {len(cases)} cases; fix numTraining")
    channels = {f"{int(c):04d}" for c in info.channel_names}
    for split in ("Tr", "Ts"):
        d = folder / f"images{split}"
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if p.name.endswith(ending) and p.name[: -len(ending)][-4:] not in channels:
                    problems.append(f"{p}: channel {p.name[: -len(ending)][-4:]} is not declared in channel_names ({len(channels)} channel(s)); wrong channel count")
    for case in cases:
        for f in info.image_files(case):
            if not f.is_file():
                problems.append(f"{f}: missing channel file for case {case}")
    if info.has_segmentation:
        labels_dir = folder / "labelsTr"
        if not labels_dir.is_dir():
            problems.append(f"{labels_dir}: missing; dataset.json declares labels")
        else:
            for case in cases:
                if not info.label_file(case).is_file():
                    problems.append(f"{info.label_file(case)}: missing label for case {case}")
            known = set(cases)
            for p in sorted(labels_dir.iterdir()):
                if p.name.endswith(ending) and p.name[: -len(ending)] not in known:
                    problems.append(f"{p}: label with no image (expected imagesTr/{p.name[: -len(ending)]}_0000{ending})")
    for head, classes in info.heads.items():
        for case in cases:
            value = info.cases.get(case).classes.get(head) if case in info.cases else None
            if value is None:
                problems.append(f"{folder / 'dataset.json'}: case {case} has no label for head {head!r}; add cases.{case}.classes.{head}")
            elif value not in classes:
                problems.append(f"{folder / 'dataset.json'}: case {case} has class {value!r} for head {head!r}, not declared in heads.{head} {classes}")
    return problems


def check_case(info: DatasetInfo, case: str, data: np.ndarray, affine: np.ndarray, seg: np.ndarray | None, seg_affine) -> list[str]:
    """Problems in one loaded case."""
    problems = []
    img = info.image_files(case)[0]
    if not np.isfinite(data).all():
        problems.append(f"{img}: {int((~np.isfinite(data)).sum())} NaN/Inf voxels; replace them (e.g. with 0) before training")
    if seg is not None:
        lab = info.label_file(case)
        mismatch = grid_mismatch(data.shape[1:], affine, seg.shape, seg_affine)
        if mismatch:
            problems.append(f"{lab}: label grid does not match image: {mismatch}")
        undeclared = sorted(set(np.unique(seg).tolist()) - set(info.label_values))
        if undeclared:
            problems.append(f"{lab}: label values {undeclared} not declared in dataset.json labels {info.labels}")
    return problems


def header_problems(path: Path, channels: int = 1, pixel_spacing=None) -> list[str]:
    """Problems visible in an image header, before its voxels are read: an affine that is not a usable
    geometry (non-finite, a zero or non-finite voxel size) and voxel data larger than this machine's
    memory (a wrong dimension in the header). Unreadable files are left to the read."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        return []  # reported by the layout check or the read
    except OSError as e:
        return [f"{path}: cannot be read ({e.strerror}); make it readable"]
    try:
        shape, affine, dtype = image_header(path, pixel_spacing)
    except Exception:  # noqa: BLE001 - unreadable files are left to the read, which says why
        return []
    problems = []
    affine = np.asarray(affine, dtype=float)
    sizes = np.linalg.norm(affine[:3, :3], axis=0) if np.isfinite(affine).all() else None
    if sizes is None or not (np.isfinite(sizes).all() and (sizes > 0).all()):
        problems.append(f"{path}: unusable geometry: voxel sizes {np.round(np.linalg.norm(affine[:3, :3], axis=0), 6).tolist()} mm "
                        "from its affine (every voxel size must be a finite number > 0); fix the header (qform/sform, pixdim)")
    voxels = float(np.prod([int(n) for n in shape], dtype=float))
    need = voxels * (np.dtype(dtype).itemsize + 4 * (READ_COPIES - 1)) * channels
    ram = machine_memory()
    if ram is not None and need > ram:
        problems.append(f"{path}: shape {tuple(int(n) for n in shape)} needs about {human_bytes(need)} of memory to read, more "
                        f"than this machine's {human_bytes(ram)}; check the header's dimensions")
    return problems


def zero_non_finite(data: np.ndarray) -> int:
    """Set NaN and infinite voxels to 0 in place; returns how many there were."""
    bad = ~np.isfinite(data)
    n = int(bad.sum())
    if n:
        data[bad] = 0
    return n


def load_training_case(info: DatasetInfo, case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, list[str]]:
    """(data, affine, seg, seg_affine, problems); unreadable files become problems, not exceptions."""
    files = info.image_files(case) + ([info.label_file(case)] if info.has_segmentation else [])
    problems = [p for f in files for p in header_problems(f, pixel_spacing=info.pixel_spacing)]
    if problems:
        return None, None, None, None, problems
    data = affine = seg = seg_affine = None
    try:
        data, affine = read_channels(info.image_files(case), info.pixel_spacing)
        if data.shape[0] != info.num_channels:
            problems.append(f"{info.image_files(case)[0]}: case {case} has {data.shape[0]} channel(s) in its image file(s), "
                            f"dataset.json declares {info.num_channels} in channel_names")
    except SpineautoError as e:
        problems.append(str(e))
    if info.has_segmentation:
        try:
            seg, seg_affine = read_volume(info.label_file(case), dtype=np.float32, pixel_spacing=info.pixel_spacing)
            if not np.array_equal(seg, np.round(seg)):
                problems.append(f"{info.label_file(case)}: label has non-integer values")
            seg = np.round(np.nan_to_num(seg, nan=0.0, posinf=0.0, neginf=0.0)).astype(np.int16)  # NaN: reported above
        except SpineautoError as e:
            problems.append(str(e))
    return data, affine, seg, seg_affine, problems
