"""Preprocessing: reorient, crop, resample in-plane and normalise (nnunetv2's functions), stored
per case as memory-mappable ``.npy`` in the slice-first layout for fast random 2D slice access.

The same forward transform is used at inference (:func:`preprocess_array`) and undone by
:mod:`spineauto.inference.restore` so predictions land in the input's exact voxel grid.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import get_bbox_from_mask
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from nnunetv2.preprocessing.normalization import default_normalization_schemes as schemes
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg

from spineauto.datasets.dataset_json import DatasetInfo
from spineauto.datasets.integrity import zero_non_finite
from spineauto.errors import SpineautoError
from spineauto.io.atomic import json_safe, read_json, save_npy, write_json
from spineauto.io.geometry import AXIS_OF_PLANE, CaseGeometry, choose_slice_axis
from spineauto.io.images import read_channels, read_volume
from spineauto.parallel import map_cases
from spineauto.planning.plans import ConfigurationPlan, IntensityStats
from spineauto.preprocessing.manifest import file_entry, file_problem

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
    source, data = data, geom.to_layout(data)
    owned = not np.may_share_memory(data, source)  # to_layout copied it: normalise that copy in place, no second copy
    del source
    seg_l = geom.to_layout(seg[None]).astype(np.int8) if seg is not None else None
    data, seg_c, bbox = crop_to_nonzero(data, seg_l)
    if box is not None:
        inner = [[max(a, c), min(b, d)] for (a, b), (c, d) in zip(box, bbox)]
        if any(lo >= hi for lo, hi in inner):
            raise SpineautoError(f"no {plan.roi.label} found: {name}: its {plan.roi.label} mask lies outside the image's nonzero region")
        inside = (slice(None),) + tuple(slice(lo - c, hi - c) for (lo, hi), (c, _) in zip(inner, bbox))
        data, seg_c, bbox = data[inside], seg_c[inside], inner
    geom.bbox = [[int(a), int(b)] for a, b in bbox]
    data = data.astype(np.float32, copy=not owned)  # never the caller's array
    for c in range(data.shape[0]):
        norm = _normalizer(plan.normalization[c], plan.use_mask_for_norm[c], intensity[c] if intensity else None)
        data[c] = norm.run(data[c], seg_c[0])
    spacing = geom.spacing
    cropped_shape = list(data.shape[1:])
    new_shape = [cropped_shape[0]] + [max(1, int(round(s * sp / t))) for s, sp, t in zip(cropped_shape[1:], spacing[1:], plan.target_spacing)]
    coarse = [sp / t for sp, t in zip(spacing[1:], plan.target_spacing)]
    if seg is None and roi is None and jitter_seed is None and max(coarse) >= COARSE_RATIO:  # a whole scan to predict
        log.warning("%s: in-plane voxel size %s mm is %.1fx the plan's %s mm: upsampled from %s to %s px slices (slower, "
                    "and the model sees interpolated detail it was not trained on)", name, " x ".join(f"{v:.3g}" for v in spacing[1:]),
                    max(coarse), " x ".join(f"{v:.3g}" for v in plan.target_spacing), " x ".join(map(str, cropped_shape[1:])),
                    " x ".join(map(str, new_shape[1:])))
    if new_shape != cropped_shape:
        data = resample_in_plane(data, new_shape, is_seg=False, order=3)
        if seg is not None:
            seg_c = resample_in_plane(seg_c, new_shape, is_seg=True, order=1)
    props = {"geometry": geom.to_dict(), "spacing": spacing, "cropped_shape": cropped_shape, "shape": new_shape}
    out_seg = None
    if seg is not None:
        out_seg = np.where(seg_c < 0, 0, seg_c).astype(np.int8)
    return data.astype(np.float32, copy=False), out_seg, props


COARSE_RATIO = 3.0  # a scan to predict this many times coarser in-plane than the plan is upsampled with a warning
RESAMPLE_SLAB = 8  # slices resampled at a time (nnunetv2 works in float64: 8 x a slice x 8 bytes, in and out)


def resample_in_plane(data: np.ndarray, new_shape: list[int], is_seg: bool, order: int) -> np.ndarray:
    """(C, S, h, w) -> (C, S, H, W) (``new_shape`` keeps S): nnunetv2's per-slice resampling, run on
    ``RESAMPLE_SLAB`` slices at a time into a result of the input's dtype. The same values as one
    call on the whole case, whose float64 copies of the case would grow with it."""
    out = np.empty((data.shape[0], *new_shape), dtype=data.dtype)
    for s in range(0, data.shape[1], RESAMPLE_SLAB):
        part = data[:, s:s + RESAMPLE_SLAB]
        out[:, s:s + part.shape[1]] = resample_data_or_seg(part, [part.shape[1], *new_shape[1:]], is_seg=is_seg, axis=0, order=order,
                                                          do_separate_z=True, order_z=0)
    return out


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
    """Up to LOCATIONS_PER_LABEL (slice, row, column) voxels of each foreground value in ``labels``
    (the classes: never the ignore value, which foreground oversampling must not target)."""
    return {str(v): _sample_locations(seg[0] == v, rng) for v in labels if v != 0}


def annotated_locations(seg: np.ndarray, ignore: int, rng: np.random.Generator) -> list[list[int]]:
    """Voxels anyone labelled (not ``ignore``, background included): where a sparse case's random
    patches are centred, as nnU-Net samples only annotated regions of a dataset with an ignore label."""
    return _sample_locations((seg[0] != ignore) & (seg[0] >= 0), rng)


def _sample_locations(mask: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
    idx = np.argwhere(mask)
    if len(idx) > LOCATIONS_PER_LABEL:
        idx = idx[rng.choice(len(idx), LOCATIONS_PER_LABEL, replace=False)]
    return idx.tolist()


def _source_hash(files: list[Path], plan: ConfigurationPlan, intensity, pixel_spacing=None, ignore_label=None) -> str:
    h = hashlib.sha1()
    for f in files:  # named within the dataset (imagesTr/x_0000.nii.gz): a moved or copied dataset keeps its cases
        st = f.stat()
        h.update(f"{f.parent.name}/{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    key = [PREPROCESS_VERSION, plan.slicing, plan.isotropic_plane, plan.target_spacing, plan.normalization, plan.use_mask_for_norm,
           [s.__dict__ for s in intensity] if intensity else None]
    if plan.roi is not None:  # only then: the cases of other plans keep their hash
        key.append(plan.roi.__dict__)
    if pixel_spacing is not None:  # only then: likewise
        key.append(list(pixel_spacing))
    if ignore_label is not None:  # likewise: a dataset that gains an ignore label resamples its patches' centres
        key.append({"ignore": ignore_label})
    h.update(json.dumps(key, default=str).encode())
    return h.hexdigest()


def _up_to_date(out_dir: Path, case: str, digest: str) -> dict[str, dict] | None:
    """The case's manifest entries when its files were preprocessed from these sources with this plan
    and are intact (every file's SHA-1 checked: a truncated or corrupt case is redone); else None."""
    props_path = out_dir / f"{case}.json"
    try:
        props = read_json(props_path)
    except (OSError, ValueError):
        return None
    if not isinstance(props, dict) or props.get("source_hash") != digest or not _sealed(props):
        return None
    files = props.get("files")
    if not isinstance(files, dict) or f"{case}.npy" not in files:
        return None
    if any(file_problem(out_dir / name, entry) for name, entry in files.items()):
        return None
    entries = {name: file_entry(out_dir / name, sha1=entry["sha1"]) for name, entry in files.items()}
    entries[props_path.name] = file_entry(props_path)
    return dict(sorted(entries.items()))


def _seal(props: dict) -> dict:
    """``props`` with the SHA-1 of its own content (``props_sha1``): a changed properties file is told from an intact one."""
    plain = json.dumps(json_safe({k: v for k, v in props.items() if k != "props_sha1"}), sort_keys=True,
                       default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))  # as written, then read back
    return {**json.loads(plain), "props_sha1": hashlib.sha1(plain.encode()).hexdigest()}


def _sealed(props: dict) -> bool:
    return props.get("props_sha1") is not None and _seal(props)["props_sha1"] == props["props_sha1"]


def case_file_names(case: str) -> tuple[str, str, str]:
    """The files one preprocessed case consists of: image array, label array (segmentation datasets), properties."""
    return f"{case}.npy", f"{case}_seg.npy", f"{case}.json"


def preprocess_case(info: DatasetInfo, case: str, plan: ConfigurationPlan, intensity: list[IntensityStats], out_dir: Path) -> tuple[bool, dict | None]:
    """Preprocess one training case into ``out_dir``: (written, its files' manifest entries); written is
    False when it was already up to date, the entries None when the case is not part of the plan's data."""
    files = info.image_files(case) + ([info.label_file(case)] if info.has_segmentation else [])
    digest = _source_hash(files, plan, intensity, info.pixel_spacing, info.ignore_label)
    npy_name, seg_name, props_name = case_file_names(case)
    props_path = out_dir / props_name
    kept = _up_to_date(out_dir, case, digest)
    if kept is not None:
        return False, kept
    for stale in (props_path, out_dir / npy_name, out_dir / seg_name):  # the properties first: no half case looks done
        stale.unlink(missing_ok=True)
    data, affine = read_channels(info.image_files(case), info.pixel_spacing)
    non_finite = zero_non_finite(data)  # only reachable with --no-verify (the fingerprint warned)
    if non_finite:
        log.debug("%s: %d NaN/Inf voxels set to 0", case, non_finite)
    seg = read_volume(info.label_file(case), pixel_spacing=info.pixel_spacing)[0].round().astype(np.int16) if info.has_segmentation else None
    roi = None
    if plan.roi is not None:  # the reference mask of the roi label, with a seeded per-case jitter of its box
        if seg is None or plan.roi.label not in info.labels:
            raise SpineautoError(f"{info.folder}: configuration {plan.name} crops around label {plan.roi.label!r}, "
                                 f"which the dataset does not have (labels: {', '.join(info.labels)})")
        roi = seg == info.labels[plan.roi.label]
        if not roi.any():  # e.g. a scan without a cord: nothing for a model that only ever sees crops around one
            log.info("%s: no %s voxels; not part of configuration %s", case, plan.roi.label, plan.name)
            return False, None
    data, seg_p, props = preprocess_array(data, affine, plan, intensity, seg, roi=roi, jitter_seed=case_seed(case, "roi:"),
                                          name=f"{case} ({info.label_file(case).name})")
    if not np.isfinite(data).all():  # never store a NaN case, whatever the normalisation made of the input
        raise SpineautoError(f"{case}: preprocessing produced NaN/Inf values (normalisation {plan.normalization} of "
                             f"{info.image_files(case)[0].name}); check the image's intensities")
    cinfo = info.cases.get(case)
    props.update(case=case, subject=info.subject_of(case), classes=dict(cinfo.classes) if cinfo else {}, source_hash=digest)
    written = {}
    if seg_p is not None:
        props["class_locations"] = class_locations(seg_p, info.class_values, np.random.default_rng(case_seed(case)))
        if info.ignore_label is not None:
            props["annotated_locations"] = annotated_locations(seg_p, info.ignore_label, np.random.default_rng(case_seed(case, "annotated:")))
        written[seg_name] = save_npy(out_dir / seg_name, seg_p)
    written[npy_name] = save_npy(out_dir / npy_name, data)
    props["files"] = {name: {k: v for k, v in file_entry(path).items() if k != "mtime_ns"} for name, path in written.items()}
    write_json(props_path, _seal(props))  # last: its presence with the right hash and intact files marks the case done
    entries = {name: file_entry(out_dir / name, sha1=props["files"][name]["sha1"]) for name in written}
    entries[props_name] = file_entry(props_path)
    return True, dict(sorted(entries.items()))


@dataclass
class PreprocessedData:
    """What :func:`preprocess_dataset` left in one folder."""

    written: int  # cases (re)written by this run; the others were up to date
    cases: dict[str, dict[str, dict]]  # case -> file name -> manifest entry; cases outside the plan's data left out


def preprocess_dataset(info: DatasetInfo, plan: ConfigurationPlan, intensity: list[IntensityStats], out_dir: Path,
                       workers: int = 2, progress: Callable[[str], None] | None = None) -> PreprocessedData:
    """Preprocess every training case into ``out_dir``, and remove every other case's files from it
    (cases no longer in the raw dataset, or no longer part of the plan's data) and the temporaries
    of killed writes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for tmp in out_dir.glob(".*.tmp*"):  # the caller holds the dataset's lock: no other process writes here
        tmp.unlink(missing_ok=True)
    cases = info.training_cases()
    results = map_cases(preprocess_case, cases, [(info, c, plan, intensity, out_dir) for c in cases], workers, progress)
    kept = {case: entries for case, (_, entries) in zip(cases, results) if entries is not None}
    wanted = {name for entries in kept.values() for name in entries}
    stale = sorted(p for pattern in ("*.npy", "*.json") for p in out_dir.glob(pattern) if p.name not in wanted)
    if stale:
        log.info("%s: removing %d file(s) of cases that are not in the plan's data any more (%s%s)", out_dir, len(stale),
                 ", ".join(p.name for p in stale[:4]), ", ..." if len(stale) > 4 else "")
    for p in stale:
        p.unlink()
    return PreprocessedData(written=sum(w for w, _ in results), cases=kept)
