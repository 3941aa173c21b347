"""Preprocessing: reorient, crop, resample in-plane and normalise (nnunetv2's functions), stored
per case as memory-mappable ``.npy`` in the slice-first layout for fast random 2D slice access.

The same forward transform is used at inference (:func:`preprocess_array`) and undone by
:mod:`spineauto.inference.restore` so predictions land in the input's exact voxel grid.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import get_bbox_from_mask
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from nnunetv2.preprocessing.normalization import default_normalization_schemes as schemes
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg

from spineauto.datasets.dataset_json import DatasetInfo
from spineauto.errors import SpineautoError
from spineauto.io.atomic import read_json, save_npy, write_json
from spineauto.io.geometry import AXIS_OF_PLANE, CaseGeometry, choose_slice_axis
from spineauto.io.images import read_channels, read_volume
from spineauto.planning.plans import IntensityStats
from spineauto.parallel import map_cases
from spineauto.planning.plans import ConfigurationPlan

log = logging.getLogger(__name__)
LOCATIONS_PER_LABEL = 2000
PREPROCESS_VERSION = 1


def slice_axis_for(plan: ConfigurationPlan, affine: np.ndarray, shape) -> int:
    if plan.slicing == "per_case":
        return choose_slice_axis(affine, shape, plan.isotropic_plane)[0]
    return AXIS_OF_PLANE[plan.slicing]


def _normalizer(name: str, use_mask: bool, stats: IntensityStats | None):
    props = None
    if stats is not None:
        props = {"mean": stats.mean, "std": stats.std, "percentile_00_5": stats.p00_5, "percentile_99_5": stats.p99_5}
    return getattr(schemes, name)(use_mask_for_norm=use_mask, intensityproperties=props)


def preprocess_array(data: np.ndarray, affine: np.ndarray, plan: ConfigurationPlan, intensity: list[IntensityStats] | None,
                     seg: np.ndarray | None = None, roi: np.ndarray | None = None, *, jitter_seed: int | None = None,
                     name: str = "case") -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(C, X, Y, Z) in the stored order -> normalised (C, S, H, W) at the target in-plane spacing.

    With ``plan.roi`` set, ``roi`` (a boolean (X, Y, Z) mask in the input's grid, e.g. the cord) is
    required: the crop is its bounding box widened by ``plan.roi.margin_mm`` on every side (moved
    per edge by the seeded jitter of :func:`roi_box` when ``jitter_seed`` is given: training cases),
    intersected with the nonzero region. ``name`` names the case in errors.

    Returns (data, seg or None, properties); the properties restore the original grid.
    """
    geom = CaseGeometry(np.asarray(affine).tolist(), list(data.shape[1:]), slice_axis_for(plan, affine, data.shape[1:]))
    box = None
    if plan.roi is not None:
        box = _roi_layout_box(geom, plan, roi, data.shape[1:], jitter_seed, name)
    data = geom.to_layout(data)
    seg_l = geom.to_layout(seg[None]).astype(np.int8) if seg is not None else None
    data, seg_c, bbox = crop_to_nonzero(data, seg_l)
    if box is not None:
        inner = [[max(a, c), min(b, d)] for (a, b), (c, d) in zip(box, bbox)]
        if any(lo >= hi for lo, hi in inner):
            raise SpineautoError(f"no {plan.roi.label} found: {name}: its {plan.roi.label} mask lies outside the image's nonzero region")
        inside = (slice(None),) + tuple(slice(lo - c, hi - c) for (lo, hi), (c, _) in zip(inner, bbox))
        data, seg_c, bbox = data[inside], seg_c[inside], inner
    geom.bbox = [[int(a), int(b)] for a, b in bbox]
    data = data.astype(np.float32)
    for c in range(data.shape[0]):
        norm = _normalizer(plan.normalization[c], plan.use_mask_for_norm[c], intensity[c] if intensity else None)
        data[c] = norm.run(data[c], seg_c[0])
    spacing = geom.spacing
    cropped_shape = list(data.shape[1:])
    new_shape = [cropped_shape[0]] + [max(1, int(round(s * sp / t))) for s, sp, t in zip(cropped_shape[1:], spacing[1:], plan.target_spacing)]
    if new_shape != cropped_shape:
        data = resample_data_or_seg(data, new_shape, is_seg=False, axis=0, order=3, do_separate_z=True, order_z=0)
        if seg is not None:
            seg_c = resample_data_or_seg(seg_c, new_shape, is_seg=True, axis=0, order=1, do_separate_z=True, order_z=0)
    props = {"geometry": geom.to_dict(), "spacing": spacing, "cropped_shape": cropped_shape, "shape": new_shape}
    out_seg = None
    if seg is not None:
        out_seg = np.where(seg_c < 0, 0, seg_c).astype(np.int8)
    return data.astype(np.float32), out_seg, props


def roi_box(mask: np.ndarray, spacing: list[float], margin_mm: float, jitter_mm: float = 0.0,
            rng: np.random.Generator | None = None) -> list[list[int]]:
    """Bounding box ``[[lo, hi), ...]`` of a 3D mask, each side widened by ``margin_mm`` (at least
    that much: rounded up to whole voxels of that axis), clipped to the array.

    With ``rng``, each of the six edges moves by its own ``U(-jitter_mm, +jitter_mm)`` first (a side
    never closer than 0 mm to the mask): the box a predicted mask would give, which is looser or
    tighter than the reference's by about that much.
    """
    box = []
    for (lo, hi), sp, n in zip(get_bbox_from_mask(mask), spacing, mask.shape):
        widen = [margin_mm, margin_mm]
        if rng is not None and jitter_mm > 0:
            widen = [w + float(rng.uniform(-jitter_mm, jitter_mm)) for w in widen]
        below, above = (int(np.ceil(max(0.0, w) / sp - 1e-6)) for w in widen)
        box.append([max(0, int(lo) - below), min(n, int(hi) + above)])
    return box


def _roi_layout_box(geom: CaseGeometry, plan: ConfigurationPlan, roi: np.ndarray | None, shape, jitter_seed: int | None,
                    name: str) -> list[list[int]]:
    label = plan.roi.label
    if roi is None:
        raise SpineautoError(f"no {label} found: {name}: configuration {plan.name} crops around the {label} and needs its mask")
    if tuple(roi.shape) != tuple(shape):
        raise SpineautoError(f"{name}: the {label} mask has shape {tuple(roi.shape)}, the image {tuple(shape)}")
    mask = geom.to_layout(np.asarray(roi, dtype=bool)[None])[0]
    if not mask.any():
        raise SpineautoError(f"no {label} found: {name}: its {label} mask is empty")
    rng = np.random.default_rng(jitter_seed) if jitter_seed is not None else None
    return roi_box(mask, geom.spacing, plan.roi.margin_mm, plan.roi.jitter_mm, rng)


def case_seed(case: str, salt: str = "") -> int:
    """A seed that depends only on the case name (and a salt per use)."""
    return int(hashlib.sha1(f"{salt}{case}".encode()).hexdigest()[:8], 16)


def class_locations(seg: np.ndarray, labels: list[int], rng: np.random.Generator) -> dict[str, list[list[int]]]:
    out = {}
    for v in labels:
        if v == 0:
            continue
        idx = np.argwhere(seg[0] == v)
        if len(idx) > LOCATIONS_PER_LABEL:
            idx = idx[rng.choice(len(idx), LOCATIONS_PER_LABEL, replace=False)]
        out[str(v)] = idx.tolist()
    return out


def _source_hash(files: list[Path], plan: ConfigurationPlan, intensity) -> str:
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    key = [PREPROCESS_VERSION, plan.slicing, plan.isotropic_plane, plan.target_spacing, plan.normalization, plan.use_mask_for_norm,
           [s.__dict__ for s in intensity] if intensity else None]
    if plan.roi is not None:  # only then: the cases of other plans keep their hash
        key.append(plan.roi.__dict__)
    h.update(json.dumps(key, default=str).encode())
    return h.hexdigest()


def preprocess_case(info: DatasetInfo, case: str, plan: ConfigurationPlan, intensity: list[IntensityStats], out_dir: Path) -> bool:
    """Preprocess one training case into ``out_dir``; False when it was already up to date."""
    files = info.image_files(case) + ([info.label_file(case)] if info.has_segmentation else [])
    digest = _source_hash(files, plan, intensity)
    props_path = out_dir / f"{case}.json"
    if props_path.is_file() and (out_dir / f"{case}.npy").is_file():
        try:
            if read_json(props_path).get("source_hash") == digest:
                return False
        except ValueError:
            pass
    data, affine = read_channels(info.image_files(case))
    seg = read_volume(info.label_file(case))[0].round().astype(np.int16) if info.has_segmentation else None
    roi = None
    if plan.roi is not None:  # the reference mask of the roi label, with a seeded per-case jitter of its box
        if seg is None or plan.roi.label not in info.labels:
            raise SpineautoError(f"{info.folder}: configuration {plan.name} crops around label {plan.roi.label!r}, "
                                 f"which the dataset does not have (labels: {', '.join(info.labels)})")
        roi = seg == info.labels[plan.roi.label]
        if not roi.any():  # e.g. a scan without a cord: nothing for a model that only ever sees crops around one
            log.info("%s: no %s voxels; not part of configuration %s", case, plan.roi.label, plan.name)
            for stale in (props_path, out_dir / f"{case}.npy", out_dir / f"{case}_seg.npy"):
                stale.unlink(missing_ok=True)
            return False
    data, seg_p, props = preprocess_array(data, affine, plan, intensity, seg, roi=roi, jitter_seed=case_seed(case, "roi:"),
                                          name=f"{case} ({info.label_file(case).name})")
    cinfo = info.cases.get(case)
    props.update(case=case, subject=info.subject_of(case), classes=dict(cinfo.classes) if cinfo else {}, source_hash=digest)
    if seg_p is not None:
        props["class_locations"] = class_locations(seg_p, info.label_values, np.random.default_rng(case_seed(case)))
        save_npy(out_dir / f"{case}_seg.npy", seg_p)
    save_npy(out_dir / f"{case}.npy", data)
    write_json(props_path, props)  # last: its presence with the right hash marks the case done
    return True


def preprocess_dataset(info: DatasetInfo, plan: ConfigurationPlan, intensity: list[IntensityStats], out_dir: Path,
                       workers: int = 2, progress: Callable[[str], None] | None = None) -> int:
    """Preprocess every training case; returns how many were (re)written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = info.training_cases()
    return sum(map_cases(preprocess_case, cases, [(info, c, plan, intensity, out_dir) for c in cases], workers, progress))
