"""`spineauto evaluate`: compare a folder of predicted masks with a folder of reference masks.

Per case and label: Dice and IoU (nnunetv2's definition: nan when the label is absent from both),
HD95 and average symmetric surface distance in mm (from the NIfTI voxel sizes), relative volume
difference; for lesion labels also lesion-wise detection (26-connected components, a predicted
lesion is a hit if it overlaps a true one). Means skip nan. Written as JSON and CSV.
"""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from spineauto.datasets.dataset_json import lesion_labels
from spineauto.errors import SpineautoError
from spineauto.evaluation import metrics as M
from spineauto.io.atomic import write_atomic, write_json
from spineauto.io.geometry import voxel_sizes
from spineauto.io.images import grid_mismatch, read_volume

log = logging.getLogger(__name__)
NIFTI = ".nii.gz"
VOXEL_METRICS = ("dice", "iou", "hd95", "asd", "rvd")
LESION_METRICS = ("lesion_precision", "lesion_recall", "lesion_f1")


@dataclass
class LabelSet:
    labels: dict[str, int]  # foreground name -> value
    lesion: list[str]


def case_names(folder: Path) -> list[str]:
    return sorted(p.name[: -len(NIFTI)] for p in Path(folder).glob(f"*{NIFTI}") if not p.name.startswith("."))


def infer_labels(gt_dir: Path, cases: Sequence[str]) -> LabelSet:
    values: set[int] = set()
    for c in cases:
        values |= {int(v) for v in np.unique(read_volume(gt_dir / f"{c}{NIFTI}")[0].round())}
    return LabelSet({f"label_{v}": v for v in sorted(values) if v != 0}, [])


def labels_from_dataset_json(data: dict) -> LabelSet:
    labels = {k: int(v) for k, v in data.get("labels", {}).items() if int(v) != 0}
    return LabelSet(labels, lesion_labels(labels, data.get("lesion_labels")))


def evaluate_case(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], labels: LabelSet) -> dict[str, dict[str, float]]:
    out = {}
    for name, v in labels.labels.items():
        p, r = pred == v, ref == v
        tp, fp, fn = M.confusion(p, r)
        dice = float("nan") if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
        iou = float("nan") if tp + fp + fn == 0 else tp / (tp + fp + fn)
        surf = M.surface_metrics(p, r, spacing)
        row = {"dice": dice, "iou": iou, "hd95": surf.hd95, "asd": surf.asd, "rvd": M.relative_volume_difference(p, r),
               "tp": tp, "fp": fp, "fn": fn, "n_ref": tp + fn, "n_pred": tp + fp}
        if name in labels.lesion:
            det = M.lesion_detection(p, r)
            row.update(lesion_precision=det.precision, lesion_recall=det.recall, lesion_f1=det.f1,
                       lesions_ref=det.n_true, lesions_pred=det.n_pred, lesions_detected=det.tp_true)
        out[name] = row
    return out


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def evaluate_folders(pred_dir: Path, gt_dir: Path, labels: LabelSet | None = None,
                     progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Evaluate every reference case; every one must have a prediction of the same grid."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for folder, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not folder.is_dir():
            raise SpineautoError(f"{folder}: {what} folder not found")
    cases = case_names(gt_dir)
    if not cases:
        raise SpineautoError(f"{gt_dir}: no ground-truth masks (*{NIFTI})")
    preds = set(case_names(pred_dir))
    missing = [c for c in cases if c not in preds]
    if missing:
        raise SpineautoError(f"{pred_dir}: no prediction for {len(missing)} ground-truth case(s) (first: {missing[0]}{NIFTI}); "
                             "predict them or evaluate a matching ground-truth folder")
    extra = sorted(preds - set(cases))
    if extra:
        log.warning("%d prediction(s) without ground truth ignored (first: %s)", len(extra), extra[0])
    labels = labels or infer_labels(gt_dir, cases)
    per_case = {}
    for i, case in enumerate(cases):
        if progress:
            progress(case, i, len(cases))
        ref, aff_r = read_volume(gt_dir / f"{case}{NIFTI}")
        pred, aff_p = read_volume(pred_dir / f"{case}{NIFTI}")
        problem = grid_mismatch(pred.shape, aff_p, ref.shape, aff_r)
        if problem:
            raise SpineautoError(f"{pred_dir / (case + NIFTI)}: grid differs from the ground truth (prediction vs ground truth: {problem}); "
                                 "predict with `spineauto predict` so masks keep the input geometry")
        per_case[case] = evaluate_case(pred.round().astype(np.int16), ref.round().astype(np.int16), voxel_sizes(aff_r), labels)
    if progress:
        progress("", len(cases), len(cases))
    mean = {}
    for name in labels.labels:
        keys = VOXEL_METRICS + (LESION_METRICS if name in labels.lesion else ())
        mean[name] = {k: _nanmean([per_case[c][name][k] for c in cases]) for k in keys}
    foreground = {k: _nanmean([mean[n][k] for n in labels.labels]) for k in VOXEL_METRICS}
    return {"prediction_folder": str(pred_dir), "reference_folder": str(gt_dir), "labels": labels.labels,
            "lesion_labels": labels.lesion, "mean": mean, "foreground_mean": foreground, "metric_per_case": per_case}


def write_summary(summary: dict, json_path: Path) -> tuple[Path, Path]:
    """``summary.json`` and a per-case CSV beside it (``summary.csv``)."""
    json_path = Path(json_path)
    write_json(json_path, summary)
    buf = io.StringIO()
    writer = None
    for case, by_label in summary["metric_per_case"].items():
        for name, row in by_label.items():
            full = {"case": case, "label": name, **row}
            if writer is None:
                fields = ["case", "label", *VOXEL_METRICS, *LESION_METRICS, "tp", "fp", "fn", "n_ref", "n_pred",
                          "lesions_ref", "lesions_pred", "lesions_detected"]
                writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
                writer.writeheader()
            writer.writerow(full)
    for name, row in summary["mean"].items():
        writer.writerow({"case": "mean", "label": name, **row})
    csv_path = json_path.with_suffix(".csv")
    write_atomic(csv_path, lambda p: p.write_text(buf.getvalue()))
    return json_path, csv_path


def dataset_labels(dataset: str) -> LabelSet:
    """Labels of a dataset from the first dataset.json found in raw, preprocessed or a model folder."""
    from spineauto import paths
    from spineauto.io.atomic import read_json

    name = paths.resolve_dataset(dataset)
    candidates = [paths.root("raw") / name / "dataset.json", paths.root("preprocessed") / name / "dataset.json",
                  *sorted((paths.root("results") / name).glob("*/dataset.json"))]
    for c in candidates:
        if c.is_file():
            return labels_from_dataset_json(read_json(c))
    raise SpineautoError(f"dataset {name}: no dataset.json in {', '.join(str(c.parent) for c in candidates[:2])} or its model folders")
