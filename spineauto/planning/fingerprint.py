"""Dataset fingerprint: the facts about each case that planning decides from.

One pass over the raw data, parallel over cases, that also runs the per-case integrity checks, so
verification costs no extra read.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import get_bbox_from_mask
from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask

from spineauto.datasets.dataset_json import DatasetInfo
from spineauto.datasets.integrity import check_case, check_layout, load_training_case, zero_non_finite
from spineauto.errors import SpineautoError
from spineauto.io.atomic import read_json, write_json
from spineauto.io.geometry import AXIS_OF_PLANE, PLANE_OF_AXIS, CaseGeometry, choose_slice_axis, orientation_code
from spineauto.parallel import map_cases
from spineauto.planning.plans import IntensityStats
from spineauto.schema import from_dict, to_dict

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
SAMPLES_PER_CASE = 10_000


@dataclass
class CaseFingerprint:
    case: str
    subject: str
    orientation: str  # nibabel axis codes of the stored array, e.g. "PSR"
    plane: str  # acquisition plane the 2D slices are cut in
    slice_axis: int  # RAS axis across which slices are cut
    slice_axis_reason: str
    spacing: list[float]  # voxel sizes of the stored array, mm
    shape: list[int]  # stored array shape
    layout_spacing: list[float]  # (slice, row, column) after reorientation, mm
    cropped_shape: list[int]  # (slice, row, column) after cropping to the nonzero region
    crop_fraction: float  # cropped voxels / all voxels
    intensity: list[IntensityStats]  # per channel, foreground voxels (or all nonzero without labels)
    label_voxels: dict[str, int] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)
    label_extent: dict[str, list[int]] = field(default_factory=dict)  # label value -> (slice, row, column) bounding-box size, voxels
    non_finite_voxels: int = 0  # NaN/Inf image voxels that --no-verify let through; preprocessing sets them to 0


@dataclass
class Fingerprint:
    dataset_name: str
    channel_names: dict[str, str]
    labels: dict[str, int]
    heads: dict[str, list[str]]
    cases: list[CaseFingerprint]
    intensity: list[IntensityStats]  # per channel, pooled over cases
    class_counts: dict[str, dict[str, int]]
    isotropic_plane: str = "sagittal"  # slicing plane for near-isotropic blocks (see choose_slice_axis)
    lesion_labels: list[str] = field(default_factory=list)  # declared in dataset.json (else found by name)
    regions: dict[str, list[int]] = field(default_factory=dict)  # region-based labels (dataset.json): name -> label-map values
    ignore_label: int | None = None  # dataset.json's "ignore": unlabelled voxels, left out of every statistic here
    schema_version: int = SCHEMA_VERSION

    def save(self, path: Path) -> Path:
        return write_json(path, to_dict(self))

    @classmethod
    def load(cls, path: Path) -> "Fingerprint":
        if not Path(path).is_file():
            raise SpineautoError(f"{path}: no fingerprint yet; run `spineauto plan_and_preprocess` first")
        data = read_json(path)
        if data.get("schema_version") != SCHEMA_VERSION:
            raise SpineautoError(f"{path}: fingerprint schema {data.get('schema_version')} is not {SCHEMA_VERSION}; rerun plan_and_preprocess")
        return from_dict(cls, data, str(path))


TRAINING_RANGE_FILE = "training_range.json"  # in a model folder: what its training scans looked like (no case names)


def training_range(fp: Fingerprint) -> dict:
    """Voxel sizes and fields of view (mm) of the training cases, each sorted small to large, as
    min and max per rank: what the pipeline's QC compares a new scan with."""
    spacing = np.sort(np.array([c.spacing[:3] for c in fp.cases], float), axis=1)
    fov = np.sort(np.array([np.multiply(c.shape[:3], c.spacing[:3]) for c in fp.cases], float), axis=1)
    return {"cases": len(fp.cases), "spacing_mm": {"min": spacing.min(0).tolist(), "max": spacing.max(0).tolist()},
            "fov_mm": {"min": fov.min(0).tolist(), "max": fov.max(0).tolist()}}


def _stats(values: np.ndarray) -> IntensityStats:
    if values.size == 0:
        return IntensityStats(0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    p = np.percentile(values, [50.0, 0.5, 99.5])
    return IntensityStats(float(values.mean()), float(values.std()), float(p[0]), float(p[1]), float(p[2]), float(values.min()), float(values.max()))


def scan_case(info: DatasetInfo, case: str, verify: bool = True, seed: int = 0):
    """(problems, CaseFingerprint or None, per-channel foreground samples)."""
    data, affine, seg, seg_affine, problems = load_training_case(info, case)
    if data is None or (info.has_segmentation and seg is None):
        return problems, None, None
    if verify:
        problems += check_case(info, case, data, affine, seg, seg_affine)
        if problems:
            return problems, None, None
    non_finite = zero_non_finite(data)  # only without verification: the check above refuses them
    axis, reason = choose_slice_axis(affine, data.shape[1:], isotropic_plane=None)
    geom = CaseGeometry(affine.tolist(), list(data.shape[1:]), 0)  # plain RAS; the slicing is applied after the pass
    layout = geom.to_layout(data)
    nonzero = create_nonzero_mask(layout)
    bbox = get_bbox_from_mask(nonzero)
    cropped_shape = [b - a for a, b in bbox]
    if seg is not None:
        if info.ignore_label is not None:  # unlabelled voxels are no class: out of the counts, extents and foreground
            seg = np.where(seg == info.ignore_label, 0, seg)
        fg = geom.to_layout(seg) > 0
        label_voxels = {str(int(v)): int(c) for v, c in zip(*np.unique(seg, return_counts=True))}
        label_extent = _label_extents(geom.to_layout(seg))
    else:
        fg = nonzero
        label_voxels, label_extent = {}, {}
    if not fg.any():
        fg = np.ones_like(nonzero)
    rng = np.random.default_rng(seed)
    samples, stats = [], []
    for c in range(layout.shape[0]):
        vals = layout[c][fg]
        stats.append(_stats(vals))
        samples.append(rng.choice(vals, min(SAMPLES_PER_CASE, vals.size), replace=False) if vals.size else vals)
    cinfo = info.cases.get(case)
    fp = CaseFingerprint(
        case=case, subject=info.subject_of(case), orientation=orientation_code(affine), plane="",
        slice_axis=-1 if axis is None else axis, slice_axis_reason=reason, spacing=[float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)],
        shape=list(data.shape[1:]), layout_spacing=geom.spacing, cropped_shape=cropped_shape,
        crop_fraction=float(np.prod(cropped_shape) / np.prod(data.shape[1:])), intensity=stats,
        label_voxels=label_voxels, classes={h: cinfo.classes[h] for h in info.heads if cinfo and h in cinfo.classes},
        label_extent=label_extent, non_finite_voxels=non_finite,
    )
    return problems, fp, samples


def _label_extents(seg: np.ndarray) -> dict[str, list[int]]:
    """Bounding-box size (voxels, per axis) of each foreground label of a 3D label map."""
    return {str(int(v)): [int(hi - lo) for lo, hi in get_bbox_from_mask(seg == v)] for v in np.unique(seg) if v > 0}


def fingerprint_dataset(info: DatasetInfo, verify: bool = True, workers: int = 2,
                        progress: Callable[[str], None] | None = None) -> Fingerprint:
    """Scan every training case; raise one SpineautoError listing every problem found."""
    problems = check_layout(info) if verify else []
    cases = info.training_cases()
    if not cases:
        raise SpineautoError("\n".join(problems) or f"{info.folder}/imagesTr: no training cases")
    results = map_cases(scan_case, cases, [(info, c, verify, i) for i, c in enumerate(cases)], workers, progress)
    for case_problems, _, _ in results:
        problems += case_problems
    if problems:
        hint = "Fix them, or pass --no-verify to skip these checks." if verify else "Fix them (--no-verify does not skip these)."
        raise SpineautoError(f"{len(problems)} problem(s) in {info.folder}:\n" + "\n".join(f"  - {p}" for p in problems) + "\n" + hint)
    fps = [fp for _, fp, _ in results]
    for fp in fps:
        if fp.non_finite_voxels:
            log.warning("%s: %d NaN/Inf voxels in %s set to 0 (--no-verify); fix the image to train on its real values",
                        fp.case, fp.non_finite_voxels, info.image_files(fp.case)[0].name)
    isotropic_plane = _isotropic_plane(fps)
    for fp in fps:
        if fp.slice_axis < 0:
            fp.slice_axis = AXIS_OF_PLANE[isotropic_plane]
            fp.slice_axis_reason += f" ({isotropic_plane})"
        fp.plane = PLANE_OF_AXIS[fp.slice_axis]
        order = [fp.slice_axis] + [a for a in range(3) if a != fp.slice_axis]
        fp.layout_spacing = [fp.layout_spacing[a] for a in order]  # RAS -> slice-first
        fp.cropped_shape = [fp.cropped_shape[a] for a in order]
        fp.label_extent = {v: [e[a] for a in order] for v, e in fp.label_extent.items()}
    pooled = [_stats(np.concatenate([s[c] for _, _, s in results])) for c in range(info.num_channels)]
    counts = {h: dict(Counter(fp.classes[h] for fp in fps if h in fp.classes)) for h in info.heads}
    for h, classes in info.heads.items():
        counts[h] = {k: counts[h].get(k, 0) for k in classes}
    return Fingerprint(dataset_name=info.folder.name, channel_names=info.channel_names, labels=info.labels,
                       heads=info.heads, cases=fps, intensity=pooled, class_counts=counts, isotropic_plane=isotropic_plane,
                       lesion_labels=list(info.lesion_labels), regions=dict(info.regions), ignore_label=info.ignore_label)


def _isotropic_plane(fps: list[CaseFingerprint]) -> str:
    """Plane for near-isotropic blocks: the most common plane of the cases that have a clear one;
    sagittal (the plane that shows the cord's length) when none do or on a tie."""
    planes = Counter(PLANE_OF_AXIS[fp.slice_axis] for fp in fps if fp.slice_axis >= 0)
    ranked = sorted(planes.items(), key=lambda kv: (-kv[1], kv[0] != "sagittal"))
    return ranked[0][0] if ranked else "sagittal"
