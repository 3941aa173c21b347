"""End-of-training validation: the fold's held-out cases, whole volumes, through the same case driver
as ``spineauto predict`` (:func:`spineauto.inference.driver.predict_cases`), as nnU-Net's trainer
validates through its own predictor.

Written to ``fold_k/validation/``: ``<case>.nii.gz`` masks in each case's own voxel grid (with the
raw image's affine), ``<case>.npz`` probabilities when asked (``train --npz``: what
``find_best_configuration`` ensembles from), ``summary.json`` with per-case and mean Dice per label
(per region for region-based labels: a region's Dice counts every value it covers; voxels of the
dataset's ignore label count nowhere)
(against the raw label file when the raw dataset is at hand, else against the preprocessed labels
restored to the input grid); for classification heads ``<case>.json``, ``classification.csv``,
``summary_classification.json`` and confusion matrices.
"""
from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from spineauto.inference.driver import CasePrediction, predict_cases
from spineauto.inference.model import TrainedModel
from spineauto.inference.restore import restore_label_map
from spineauto.io.atomic import save_nifti, write_json
from spineauto.training.data import CaseStore

log = logging.getLogger(__name__)


class StoredCase:
    """A preprocessed training case as a case source of the driver (its mask: NIfTI, whatever the raw format)."""

    mask_ending = ".nii.gz"

    def __init__(self, store: CaseStore, name: str):
        self.store, self.name = store, name

    @property
    def source(self) -> str:
        return str(self.store.folder / f"{self.name}.npy")

    @property
    def props(self) -> dict:
        return self.store.props[self.name]

    def preprocessed(self, model: TrainedModel) -> tuple[np.ndarray, dict]:
        return np.array(self.store.data(self.name)), self.props

    def write_mask(self, target: Path, labels: np.ndarray) -> Path:
        affine = np.asarray(self.props["geometry"]["affine"], dtype=np.float64)
        return save_nifti(target, nib.Nifti1Image(labels.astype(np.uint8), affine))

    def reference(self, raw_labels: Path | None) -> np.ndarray:
        from spineauto.io.images import find_image, read_volume

        raw = find_image(raw_labels, self.name) if raw_labels is not None else None
        if raw is not None:
            return np.rint(read_volume(raw)[0]).astype(np.int16)
        return restore_label_map(np.asarray(self.store.seg(self.name)), self.props)


def validate_fold(model: TrainedModel, store: CaseStore, cases: list[str], out_dir: Path, raw_labels: Path | None = None,
                  tta: bool = True, save_probabilities: bool = False, progress=None) -> dict:
    """Predict ``cases`` and score them; returns ``{"segmentation": summary, "classification": {head: metrics}}``
    with the parts the configuration has."""
    from spineauto.evaluation.metrics import dice

    names = {v: k for k, v in model.plans.labels.items() if v > 0}
    per_case = []

    def score(case: StoredCase, pred: CasePrediction) -> None:
        if pred.labels is not None:
            ref = case.reference(raw_labels)
            if ref.shape != pred.labels.shape:
                log.warning("%s: reference shape %s differs from the prediction %s; Dice skipped", case.name, ref.shape, pred.labels.shape)
            else:
                labelled = ref != model.plans.ignore_label  # all True without an ignore label (None)
                per_case.append({"case": case.name, "dice": {names[v]: dice(np.isin(pred.labels, model.plans.members(v)) & labelled,
                                                                            np.isin(ref, model.plans.members(v))) for v in sorted(names)}})
        if progress:
            progress(case.name)

    sources = [StoredCase(store, c) for c in cases]
    result = predict_cases(model, sources, out_dir, tta=tta, save_probabilities=save_probabilities, on_case=score)
    out: dict = {}
    if model.plan.has_segmentation:
        mean = {}
        for name in names.values():
            vals = [c["dice"][name] for c in per_case if not np.isnan(c["dice"][name])]
            mean[name] = float(np.mean(vals)) if vals else float("nan")
        valid = [v for v in mean.values() if not np.isnan(v)]
        out["segmentation"] = {"mean": mean, "foreground_mean": float(np.mean(valid)) if valid else float("nan"), "cases": per_case,
                               "reference": "raw labels" if raw_labels is not None else "preprocessed labels", "tta": tta}
        write_json(out_dir / "summary.json", out["segmentation"])
    if model.plan.has_classification:
        out["classification"] = _score_classification(model, store, result.classifications, out_dir)
    return out


def _score_classification(model: TrainedModel, store: CaseStore, results, out_dir: Path) -> dict:
    from spineauto.evaluation.classification import evaluate_classification, write_report
    from spineauto.schema import to_dict

    labels = {r.case: dict(store.props[r.case].get("classes") or {}) for r in results}
    report = evaluate_classification({r.case: {h: r.predicted(h) for h in r.classes} for r in results}, labels,
                                     {h.name: list(h.classes) for h in model.plan.heads})
    write_report(report, out_dir)
    return {h: to_dict(m) for h, m in report.heads.items()}
