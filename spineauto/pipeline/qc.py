"""Quality control of a pipeline case: the facts that make a finished case ``check`` instead of ``done``.

Every stage adds flags to its case (``CaseResult.flag(stage, code, reason)``): one line each that
names what is implausible and the value behind it. A case whose stages all ran is ``done`` only
when nothing is flagged, else ``check`` with the flags as its reasons. The checks:

- ``anatomy``: no anatomy gate (nothing said the input is a spine scan), or a gate whose head has
  no class meaning "none of these" (``qc.other_classes``, e.g. ``other``): a brain or a noise
  volume is then forced into one of the trained classes. (``qc.require_anatomy_gate: false`` turns it off.)
- ``low_confidence``: a classification head whose predicted class has p < ``qc.min_probability``
  (heads the image classifier decided).
- ``header_disagrees``: the header gave a head's class and the image classifier predicts another
  (the runner adds it: :mod:`spineauto.pipeline.header`).
- ``input_range``: the scan's voxel size or field of view more than ``qc.max_spacing_ratio`` times
  outside the range of the model's training cases (``training_range.json`` in the model folder; a
  folder without it: the in-plane spacing of its plan).
- ``no_cord``: fewer cord voxels than ``cord.min_voxels``, or none left when the mask is put on an
  RAS grid; there are then no cord measurements at all.
- ``cord_pieces`` / ``cord_gaps``: more than ``qc.max_pieces`` 26-connected cord pieces, or axial
  slices without cord between the first and the last slice with cord.
- ``csa_range`` / ``volume_range`` / ``length_range``: the cord's median CSA outside the normal
  adult range of the level (``location`` of the location_view stage; unknown: every level's),
  its volume outside that range times the S-I extent it covers, its length over a whole adult
  cord, or its S-I extent under ``qc.min_fov_coverage`` of the image's (a spinal cord crosses
  every spine image above the conus; not checked for the lumbar level).

Normal adult cord CSA (``NORMAL_CSA_MM2``, mm^2, overridable as ``qc.csa_mm2`` in the pipeline YAML):
Frostell et al. 2016, "A Review of the Segmental Diameter of the Healthy Human Spinal Cord",
Front. Neurol. 7:238, pool the segmental cord diameters of healthy adults (its abstract): transverse
13.3 +- 2.2 mm at C5, 8.3 +- 2.1 at T8, 9.4 +- 1.5 at L3; antero-posterior 7.4 +- 1.6 at C5, 6.3 +- 2.0
at T8, i.e. ellipse areas of about 77 mm^2 (C5) and 41 mm^2 (T8); the lumbar range assumes a cervical-
like antero-posterior diameter. The bounds are roughly half and 1.5 times those areas: wide on purpose,
to catch a failed segmentation (a quarter-filled cord, a blob in the face), not atrophy. An adult cord
is about 45 cm long (a textbook figure, not from that review).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from spineauto.io.geometry import voxel_sizes

if TYPE_CHECKING:
    from spineauto.inference.model import TrainedModel

log = logging.getLogger(__name__)

NORMAL_CSA_MM2 = {"cervical": (35.0, 115.0), "thoracic": (18.0, 60.0), "lumbar": (25.0, 90.0)}
MAX_CORD_LENGTH_MM = 450.0
SOURCE = "Frostell et al. 2016, Front. Neurol. 7:238"


@dataclass
class QcConfig:
    """When a finished case is ``check`` rather than ``done`` (:mod:`spineauto.pipeline.qc`; README "Quality control")."""

    csa_mm2: dict[str, list[float]] = field(default_factory=lambda: {k: list(v) for k, v in NORMAL_CSA_MM2.items()})
    max_cord_length_mm: float = MAX_CORD_LENGTH_MM  # a whole adult cord
    min_fov_coverage: float = 0.5  # the cord crosses the image's S-I extent above the conus: shorter is suspect
    max_pieces: int = 1  # 26-connected cord pieces (voxels of the input grid)
    max_gap_slices: int = 0  # axial slices without cord between the first and the last with cord
    min_probability: float = 0.6  # a classification stage less sure than this is flagged
    max_spacing_ratio: float = 3.0  # voxel size or field of view this many times outside the training data's range
    require_anatomy_gate: bool = True  # no anatomy gate, or one that cannot answer "none of these", is flagged
    other_classes: list[str] = field(default_factory=lambda: ["other"])  # the anatomy classes meaning "none of these"


def flag(stage: str, code: str, reason: str) -> dict:
    return {"stage": stage, "code": code, "reason": reason}


def csa_range(qc: QcConfig, level: str | None) -> tuple[float, float, str]:
    """(low, high, what) of the plausible CSA at ``level``; an unknown level: the widest over the table."""
    if level in qc.csa_mm2:
        lo, hi = qc.csa_mm2[level]
        return float(lo), float(hi), level
    return (float(min(v[0] for v in qc.csa_mm2.values())), float(max(v[1] for v in qc.csa_mm2.values())),
            "any level")


def anatomy_flags(qc: QcConfig, anatomy_classes: list[str] | None) -> list[dict]:
    """Out-of-distribution input: no anatomy gate (``anatomy_classes`` None), or a gate whose head's
    classes cannot say "none of these"."""
    if not qc.require_anatomy_gate:
        return []
    if anatomy_classes is None:
        return [flag("anatomy", "anatomy", "no anatomy gate: nothing checked that this is a spine scan (a limb, a brain "
                                           "or noise would be segmented all the same)")]
    if anatomy_classes is not None and not set(anatomy_classes) & set(qc.other_classes):
        return [flag("anatomy", "anatomy", f"the anatomy gate's classes {anatomy_classes} cannot say 'none of these' "
                                           f"(no {' / '.join(qc.other_classes)} class): a non-spine input is forced into one of them")]
    return []


def confidence_flags(qc: QcConfig, stage: str, decisions: dict[str, tuple[str, float]]) -> list[dict]:
    return [flag(stage, "low_confidence", f"{stage}: {head} {cls!r} with p={p:.2f} < {qc.min_probability}")
            for head, (cls, p) in decisions.items() if p < qc.min_probability]


@lru_cache(maxsize=32)
def training_range(folder: Path) -> dict | None:
    """The model folder's ``training_range.json`` (sorted voxel sizes and fields of view of its training
    scans, min and max per rank), as arrays; None when it has none."""
    from spineauto.io.atomic import read_json
    from spineauto.planning.fingerprint import TRAINING_RANGE_FILE

    try:
        data = read_json(Path(folder) / TRAINING_RANGE_FILE)
        return {k: (np.asarray(data[f"{k}_mm"]["min"], float), np.asarray(data[f"{k}_mm"]["max"], float)) for k in ("spacing", "fov")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def input_flags(qc: QcConfig, stage: str, model: "TrainedModel", affine: np.ndarray, shape: tuple[int, ...]) -> list[dict]:
    """The scan's voxel size and field of view against what ``model`` was trained on."""
    spacing = np.sort(voxel_sizes(np.asarray(affine, float)))
    fov = np.sort(np.multiply(voxel_sizes(np.asarray(affine, float)), shape[-3:]))
    r = qc.max_spacing_ratio
    known = training_range(model.folder)
    out = []
    if known is None:  # a folder without its fingerprint: the plan's in-plane spacing
        finest = float(max(model.plan.target_spacing))
        if spacing[1] > r * finest:
            out.append(flag(stage, "input_range", f"{stage}: in-plane voxel size {spacing[1]:.2g} mm is over {r:g} x the "
                                                  f"model's {finest:.2g} mm"))
        return out
    for what, values, (lo, hi) in (("voxel size", spacing, known["spacing"]), ("field of view", fov, known["fov"])):
        if np.any(values > r * hi) or np.any(values < lo / r):
            have = " x ".join(f"{v:.3g}" for v in values)
            trained = " x ".join(f"{a:.3g}-{b:.3g}" for a, b in zip(lo, hi))
            out.append(flag(stage, "input_range", f"{stage}: {what} {have} mm is over {r:g} x outside the training "
                                                  f"cases' {trained} mm ({model.folder.name})"))
    return out


def fov_si_extent(affine: np.ndarray, shape: tuple[int, ...]) -> float:
    """S-I extent (mm) of the image's voxel box."""
    return float(np.sum(np.abs(np.asarray(affine, float)[2, :3]) * np.asarray(shape[-3:], float)))


def cord_flags(qc: QcConfig, cord: np.ndarray, affine: np.ndarray, measured: dict, level: str | None) -> list[dict]:
    """Pieces, gaps and implausible CSA / volume / length of a measured cord (``measure_cord``'s dict)."""
    out = []
    pieces = ndimage.label(cord > 0, structure=np.ones((3, 3, 3), bool))[1]
    if pieces > qc.max_pieces:
        out.append(flag("cord", "cord_pieces", f"cord in {pieces} separate pieces"))
    gaps = int(measured.get("gap_slices") or 0)
    if gaps > qc.max_gap_slices:
        out.append(flag("cord", "cord_gaps", f"{gaps} axial slice(s) without cord between the cord's first and last slice"))
    median = measured["csa_mm2"]["median"]
    lo, hi, what = csa_range(qc, level)
    cite = "" if what in NORMAL_CSA_MM2 and tuple(qc.csa_mm2[what]) != NORMAL_CSA_MM2[what] else f"; {SOURCE}"
    if not lo <= median <= hi:
        out.append(flag("cord", "csa_range", f"CSA median {median:.1f} mm² outside the plausible {lo:g}-{hi:g} mm² "
                                             f"({what}{cite})"))
    extent = float(measured.get("si_extent_mm") or 0.0)
    volume = float(measured["volume_mm3"])
    if extent > 0 and not 0.8 * lo * extent <= volume <= 1.5 * hi * extent:  # 1.5: a tilted cord has more volume per S-I mm
        out.append(flag("cord", "volume_range", f"cord volume {volume:,.0f} mm³ implausible for its {extent:.0f} mm S-I extent "
                                                f"({0.8 * lo * extent:,.0f}-{1.5 * hi * extent:,.0f} mm³ at {what})"))
    if measured["length_mm"] > qc.max_cord_length_mm:
        out.append(flag("cord", "length_range", f"cord length {measured['length_mm']:.0f} mm over a whole adult cord's "
                                                f"{qc.max_cord_length_mm:g} mm"))
    fov = fov_si_extent(affine, cord.shape)
    if level != "lumbar" and fov > 0 and extent < qc.min_fov_coverage * fov:
        out.append(flag("cord", "length_range", f"cord covers {extent:.0f} mm of the image's {fov:.0f} mm S-I extent "
                                                f"(< {qc.min_fov_coverage:.0%}; a cord crosses a spine image)"))
    return out
