"""End-of-training validation: the fold's held-out cases, whole volumes, sliding window per the plan.

Predictions are restored to each input's exact voxel grid and written as NIfTI with the raw image's
affine (``validation/<case>.nii.gz``); ``validation/summary.json`` holds per-case and mean Dice per
label, against the raw label file when the raw dataset is at hand, else against the preprocessed
labels restored to the input grid.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from spineauto.io.atomic import save_nifti, write_json
from spineauto.planning.plans import ConfigurationPlan, Plans
from spineauto.training.data import CaseStore

log = logging.getLogger(__name__)


def _reference(case: str, store: CaseStore, raw_labels: Path | None, props: dict) -> np.ndarray:
    if raw_labels is not None and (raw_labels / f"{case}.nii.gz").is_file():
        from spineauto.io.images import read_volume

        return np.rint(read_volume(raw_labels / f"{case}.nii.gz")[0]).astype(np.int16)
    from spineauto.preprocessing.preprocess import restore_segmentation

    return restore_segmentation(np.asarray(store.seg(case)), props)


def validate_cases(network: torch.nn.Module, plans: Plans, plan: ConfigurationPlan, store: CaseStore, cases: list[str],
                   out_dir: Path, device: torch.device, raw_labels: Path | None = None, tta: bool = True,
                   progress=None) -> dict:
    """Predict ``cases``, write NIfTI predictions and ``summary.json``; returns the summary."""
    import nibabel as nib

    from spineauto.evaluation.metrics import dice
    from spineauto.inference.predictor import predict_probabilities
    from spineauto.inference.restore import restore_labels

    out_dir.mkdir(parents=True, exist_ok=True)
    names = {v: k for k, v in plans.labels.items() if v > 0}
    per_case = []
    for case in cases:
        props = store.props[case]
        probs = predict_probabilities([network], np.array(store.data(case)), plan, device, tta=tta)
        labels = restore_labels(probs, props)
        affine = np.asarray(props["geometry"]["affine"], dtype=np.float64)
        save_nifti(out_dir / f"{case}.nii.gz", nib.Nifti1Image(labels.astype(np.uint8), affine))
        ref = _reference(case, store, raw_labels, props)
        if ref.shape != labels.shape:
            log.warning("%s: reference shape %s differs from the prediction %s; Dice skipped", case, ref.shape, labels.shape)
            continue
        per_case.append({"case": case, "dice": {names[v]: dice(labels == v, ref == v) for v in sorted(names)}})
        if progress:
            progress(case)
    mean = {}
    for name in names.values():
        vals = [c["dice"][name] for c in per_case if not np.isnan(c["dice"][name])]
        mean[name] = float(np.mean(vals)) if vals else float("nan")
    valid = [v for v in mean.values() if not np.isnan(v)]
    summary = {"mean": mean, "foreground_mean": float(np.mean(valid)) if valid else float("nan"),
               "cases": per_case, "reference": "raw labels" if raw_labels is not None else "preprocessed labels",
               "tta": tta}
    write_json(out_dir / "summary.json", _nan_to_none(summary))
    return summary


def _nan_to_none(obj):
    if isinstance(obj, float) and np.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj
