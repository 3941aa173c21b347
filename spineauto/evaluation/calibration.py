"""Choosing a cord model's probability threshold so that its cross-sectional area (CSA) is the truth's
(``spineauto calibrate``; applied at prediction by :mod:`spineauto.inference.calibration`).

The model predicts cases whose truth is known, grouped by contrast: rendered phantoms
(:mod:`spineauto.datasets.phantoms`: one anatomy per subject, drawn in T1w, T2*w and T2w on the same
grid, the cord mask sampled at voxel centres: within 1% of the continuous cord area) or a folder of
labelled scans. For every threshold of :data:`GRID` the cord probability is thresholded, the cord
component kept (:func:`~spineauto.inference.postprocessing.choose_cord_component`) and its mean CSA
over the reference's slices compared with the reference's. The threshold kept is the one whose worst
contrast is nearest the truth (the smallest largest |mean CSA error| over the groups), ties to 0.5.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np

from spineauto.errors import SpineautoError
from spineauto.inference.calibration import CALIBRATION_FILE
from spineauto.inference.model import TrainedModel
from spineauto.inference.postprocessing import choose_cord_component, superior_axis
from spineauto.io.atomic import write_json

log = logging.getLogger(__name__)
GRID = tuple(round(float(t), 3) for t in np.arange(0.05, 0.951, 0.025))
PHANTOM_CONTRASTS = ("T1w", "T2starw", "T2w")


@dataclass
class CalibrationCase:
    name: str
    group: str  # the contrast: thresholds are judged per group
    probability: np.ndarray  # (X, Y, Z) probability of the calibrated label, in the reference's grid
    reference: np.ndarray  # (X, Y, Z) bool
    affine: np.ndarray


def mean_csa(mask: np.ndarray, reference: np.ndarray, affine: np.ndarray) -> float:
    """Mean area (mm^2) per axial level of ``mask`` over the levels where ``reference`` has cord."""
    ax = superior_axis(affine)
    other = tuple(i for i in range(3) if i != ax)
    zooms = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    on = reference.any(axis=other)
    if not on.any():
        return 0.0
    return float(mask.sum(axis=other)[on].mean() * abs(np.linalg.det(np.asarray(affine)[:3, :3])) / zooms[ax])


def csa_errors(cases: Sequence[CalibrationCase], grid: Sequence[float] = GRID) -> dict[float, dict[str, float]]:
    """{threshold: {group: mean relative CSA error of its cases}} (-0.1: 10% too small)."""
    out: dict[float, dict[str, list[float]]] = {}
    for c in cases:
        ref = mean_csa(c.reference, c.reference, c.affine)
        if ref <= 0:
            raise SpineautoError(f"{c.name}: the reference has no cord; a calibration case needs one")
        for t in grid:
            mask = choose_cord_component((c.probability >= t).astype(np.uint8), 1, c.affine).seg > 0
            out.setdefault(t, {}).setdefault(c.group, []).append(mean_csa(mask, c.reference, c.affine) / ref - 1.0)
    return {t: {g: float(np.mean(v)) for g, v in groups.items()} for t, groups in out.items()}


def choose_threshold(errors: dict[float, dict[str, float]]) -> float:
    """The threshold whose worst group is nearest the truth; among equals, the one nearest 0.5."""
    return min(errors, key=lambda t: (round(max(abs(e) for e in errors[t].values()), 6), abs(t - 0.5)))


def predicted_cases(model: TrainedModel, images: Path, references: dict[str, tuple[str, Path]], label: int,
                    tta: bool = True, progress: Callable[[str, int, int], None] | None = None) -> list[CalibrationCase]:
    """Predict every case of ``images`` that ``references`` names ({case: (group, reference mask file)})
    and keep the probability of ``label`` (as `spineauto predict` would: the model's localise plan included)."""
    from spineauto.inference.driver import infer, localise
    from spineauto.inference.inputs import discover_cases

    cases = [c for c in discover_cases(images, model.num_channels, model.pixel_spacing) if c.name in references]
    missing = sorted(set(references) - {c.name for c in cases})
    if missing:
        raise SpineautoError(f"{images}: no image for case(s) {', '.join(missing[:5])}")
    out = []
    for i, case in enumerate(cases):
        if progress:
            progress(case.name, i, len(cases))
        layout, props = case.preprocessed(model)
        res = infer(model, layout, props, case.name, tta, probabilities=True)
        if model.plan.localise is not None:
            res = localise(model, case, res, props, tta, probabilities=True)
        group, ref_file = references[case.name]
        ref_img = nib.load(str(ref_file))
        ref = np.asanyarray(ref_img.dataobj) > 0
        prob = res.probabilities[label]
        if prob.shape != ref.shape:
            raise SpineautoError(f"{ref_file}: shape {ref.shape} but its image {case.source} has {prob.shape}")
        out.append(CalibrationCase(case.name, group, prob, ref, ref_img.affine))
    return out


def write_phantoms(folder: Path, subjects: int, seed: int) -> dict[str, tuple[str, Path]]:
    """``subjects`` phantom anatomies (cervical and thoracic in turn), each an axial scan in every contrast
    on one grid; {case: (contrast, reference file)}."""
    from spineauto.datasets.phantoms import PhantomSpec, make_phantom
    from spineauto.io.atomic import save_nifti

    refs = {}
    for i in range(subjects):
        s = int(np.random.default_rng([seed, i]).integers(2**31 - 1))
        for contrast in PHANTOM_CONTRASTS:
            image, label = make_phantom(PhantomSpec(contrast, "axial", ("cervical", "thoracic")[i % 2], 0, s, subject_seed=s))
            name = f"calib_{i}_{contrast}"
            save_nifti(folder / f"{name}_0000.nii.gz", image)
            refs[name] = (contrast, save_nifti(folder / f"{name}_ref.nii.gz", label))
    return refs


def calibrate(model: TrainedModel, label: str, subjects: int = 6, seed: int = 0, tta: bool = True,
              images: Path | None = None, references: dict[str, tuple[str, Path]] | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Choose the threshold of ``label`` on phantoms (default) or on ``images`` with ``references``, and
    write ``calibration.json`` into the model folder; returns what was written."""
    if label not in model.plans.labels or model.plans.labels[label] == 0:
        raise SpineautoError(f"{model.folder}: no label {label!r} to calibrate (labels: {', '.join(k for k, v in model.plans.labels.items() if v)})")
    if not model.plan.has_segmentation:
        raise SpineautoError(f"{model.folder}: configuration {model.plan.name} has no segmentation output to calibrate")
    value = int(model.plans.labels[label])
    with tempfile.TemporaryDirectory(prefix="spineauto_calibrate_") as tmp:
        if images is None:
            images = Path(tmp)
            references = write_phantoms(images, subjects, seed)
            source = f"{subjects} phantom subjects x {', '.join(PHANTOM_CONTRASTS)} (axial, seed {seed})"
        else:
            source = f"{len(references or {})} labelled cases of {images}"
        saved, model.calibration = model.calibration, {}  # the probabilities do not depend on it; the masks would
        try:
            cases = predicted_cases(model, images, references or {}, value, tta, progress)
        finally:
            model.calibration = saved
    errors = csa_errors(cases)
    t = choose_threshold(errors)
    data = {"thresholds": {str(value): t}, "label": label, "chosen_on": source, "tta": tta,
            "rule": "the threshold whose worst group's mean CSA error is smallest",
            "mean_csa_error": {g: round(e, 4) for g, e in errors[t].items()},
            "mean_csa_error_at_0.5": {g: round(e, 4) for g, e in errors.get(0.5, {}).items()}}
    write_json(Path(model.folder) / CALIBRATION_FILE, data)
    log.info("%s: threshold %.3f for %s (CSA error per group %s)", model.folder, t, label, data["mean_csa_error"])
    return data
