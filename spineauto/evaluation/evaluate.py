"""`spineauto evaluate`: compare a folder of predicted masks with a folder of reference masks.

Per case and label: Dice and IoU (nnunetv2's definition: nan when the label is absent from both),
HD95 and average symmetric surface distance in mm (from the files' voxel sizes; a picture's pixels are
the dataset's ``pixel_spacing`` when a dataset is given, else 1 mm), relative volume
difference; for lesion labels also lesion-wise detection (26-connected components, a predicted
lesion is a hit if it overlaps a true one). Means skip nan. Written as JSON and CSV.

The labels evaluated are those of the dataset (``-d``) when given, plus every other non-zero value
found in the predictions or the references (``label_<value>``, with a warning when the dataset does
not declare it): a false-positive label that only a prediction contains gets its row (Dice 0), it is
never dropped. A region label of the dataset (``regions_class_order``) is scored on every label-map
value it covers. Voxels a reference marks with the dataset's ignore label (nnU-Net's sparse labels) count
in no metric: they are set to background in the prediction and the reference alike before scoring
(as nnunetv2's ``compute_metrics`` leaves them out of tp/fp/fn); the ignore value gets no row.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from spineauto.datasets.dataset_json import check_ignore, lesion_labels, parse_pixel_spacing, region_labels, split_ignore
from spineauto.errors import SpineautoError
from spineauto.evaluation import metrics as M
from spineauto.evaluation.files import check_writable, read_json_file, writing
from spineauto.io import csv_cells
from spineauto.io.atomic import write_atomic, write_json
from spineauto.io.geometry import voxel_sizes
from spineauto.io.images import IMAGE_ENDINGS, grid_mismatch, read_volume, strip_ending
from spineauto.io.outputs import check_output_apart

log = logging.getLogger(__name__)
NIFTI = ".nii.gz"
VOXEL_METRICS = ("dice", "iou", "hd95", "asd", "rvd")
LESION_METRICS = ("lesion_precision", "lesion_recall", "lesion_f1")


@dataclass
class LabelSet:
    labels: dict[str, int]  # foreground name -> value (of a region: the value it is written as)
    lesion: list[str]
    regions: dict[str, list[int]] = field(default_factory=dict)  # region name -> the label-map values it covers
    pixel_spacing: tuple[float, float] | None = None  # mm of a picture's (row, column): dataset.json's pixel_spacing
    ignore: int | None = None  # the references' value of unlabelled voxels (dataset.json's "ignore"), scored nowhere


def mask_files(folder: Path) -> dict[str, Path]:
    """Case -> mask file of every image file in ``folder`` (any format spineauto reads: .nii.gz, .png, .nrrd ...)."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_ENDINGS))
    return {strip_ending(p.name): p for p in files}


def case_names(folder: Path) -> list[str]:
    return sorted(mask_files(folder))


def with_values(labels: LabelSet | None, values: set[int]) -> LabelSet:
    """``labels`` plus ``label_<v>`` for every non-zero value in ``values`` it does not name (all of them without labels)."""
    declared = dict(labels.labels) if labels else {}
    regions = dict(labels.regions) if labels else {}
    known = set(declared.values()) | {v for members in regions.values() for v in members}
    extra = {f"label_{v}": v for v in sorted(values) if v != 0 and v not in known}
    return LabelSet({**declared, **extra}, list(labels.lesion) if labels else [], regions, labels.pixel_spacing if labels else None,
                    labels.ignore if labels else None)


def with_ignore(labels: LabelSet | None, ignore: int) -> LabelSet:
    """``labels`` (None: found in the masks) with ``ignore`` as the references' value of unlabelled voxels;
    refused in one line when it is a class of the dataset, or background."""
    if ignore <= 0 or (labels is not None and (ignore in labels.labels.values() or any(ignore in m for m in labels.regions.values()))):
        raise SpineautoError(f"--ignore-label {ignore}: is {'background' if ignore <= 0 else 'a class of the dataset'}; "
                             "give the value of the unlabelled voxels (nnU-Net's 'ignore': the highest value)")
    if labels is not None and labels.ignore is not None and labels.ignore != ignore:
        raise SpineautoError(f"--ignore-label {ignore}: the dataset's dataset.json says ignore = {labels.ignore}; leave the option out")
    return replace(labels, ignore=ignore) if labels is not None else LabelSet({}, [], ignore=ignore)


def labels_from_dataset_json(data: dict) -> LabelSet:
    """The labels a dataset.json declares; region labels (``regions_class_order``) are each scored on
    every label-map value they cover, in the prediction and the reference alike (as nnU-Net scores them)."""
    regions, problems = {}, []
    raw, ignore = split_ignore(data.get("labels", {}), problems)
    if any(isinstance(v, list) for v in raw.values()):
        raw, regions = region_labels(raw, data.get("regions_class_order"), problems)
    check_ignore(ignore, raw, regions, problems)
    spacing = parse_pixel_spacing(data.get("pixel_spacing"), problems)
    if problems:
        raise ValueError("; ".join(problems))
    labels = {k: int(v) for k, v in raw.items() if int(v) != 0}
    return LabelSet(labels, lesion_labels(labels, data.get("lesion_labels")), regions, spacing, ignore)


def evaluate_case(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], labels: LabelSet) -> dict[str, dict[str, float]]:
    """Per label (per region: all the values it covers) the voxel metrics, and lesion detection for lesion labels."""
    out = {}
    for name, v in labels.labels.items():
        members = labels.regions.get(name, [v])
        p, r = np.isin(pred, members), np.isin(ref, members)
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


def check_label_mask(path: Path, mask: np.ndarray) -> None:
    """A mask to score holds finite whole numbers (label values): NaN would score as background (a Dice
    of 1.0 against an empty reference), 0.5 is a probability map, not a label."""
    finite = np.isfinite(mask)
    if not finite.all():
        raise SpineautoError(f"{path}: {int(np.count_nonzero(~finite))} NaN/Inf voxel(s); a mask to evaluate holds label values "
                             "0, 1, 2 ...; write it with `spineauto predict`")
    fractional = mask != np.round(mask)
    if fractional.any():
        raise SpineautoError(f"{path}: {int(np.count_nonzero(fractional))} voxel(s) that are not whole label values (e.g. "
                             f"{float(mask[fractional].flat[0]):g}): a probability map, not a mask; threshold it (or write it with "
                             "`spineauto predict`) before evaluating")


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
    if pred_dir.resolve() == gt_dir.resolve():
        raise SpineautoError(f"{pred_dir}: is the ground-truth folder {gt_dir} itself (every score would be perfect); "
                             "pass the predictions' folder first")
    gt_files, pred_files = mask_files(gt_dir), mask_files(pred_dir)
    cases = sorted(gt_files)
    if not cases:
        hint = ("; it is a folder: a classification labels file must be a dataset.json or CSV file"
                if gt_dir.suffix.lower() in (".json", ".csv") else "")
        raise SpineautoError(f"{gt_dir}: no ground-truth masks (*{NIFTI}, or another image format){hint}")
    preds = set(pred_files)
    missing = [c for c in cases if c not in preds]
    if missing:
        raise SpineautoError(f"{pred_dir}: no prediction for {len(missing)} ground-truth case(s) (first: {gt_files[missing[0]].name}); "
                             "predict them or evaluate a matching ground-truth folder")
    extra = sorted(preds - set(cases))
    if extra:
        log.warning("%d prediction(s) without ground truth ignored (first: %s)", len(extra), extra[0])
    declared = labels
    spacing = declared.pixel_spacing if declared else None  # what a picture's pixels measure (else 1 mm)
    per_case, found = {}, set()
    for i, case in enumerate(cases):
        if progress:
            progress(case, i, len(cases))
        ref, aff_r = read_volume(gt_files[case], pixel_spacing=spacing)
        pred, aff_p = read_volume(pred_files[case], pixel_spacing=spacing)
        problem = grid_mismatch(pred.shape, aff_p, ref.shape, aff_r)
        if problem:
            raise SpineautoError(f"{pred_files[case]}: grid differs from the ground truth (prediction vs ground truth: {problem}); "
                                 "predict with `spineauto predict` so masks keep the input geometry")
        for path, mask in ((pred_files[case], pred), (gt_files[case], ref)):
            check_label_mask(path, mask)
        pred, ref = pred.astype(np.int16), ref.astype(np.int16)
        if declared is not None and declared.ignore is not None:  # unlabelled voxels: no metric counts them
            unlabelled = ref == declared.ignore
            pred[unlabelled], ref[unlabelled] = 0, 0
        values = {int(v) for v in np.union1d(np.unique(pred), np.unique(ref))}
        found |= values
        per_case[case] = evaluate_case(pred, ref, voxel_sizes(aff_r), with_values(declared, values))
    if progress:
        progress("", len(cases), len(cases))
    labels = with_values(declared, found)
    undeclared = [n for n in labels.labels if declared is not None and declared.labels and n not in declared.labels]
    if undeclared:
        log.warning("value(s) %s found in the predictions or references but not declared by the dataset; evaluated as %s",
                    ", ".join(str(labels.labels[n]) for n in undeclared), ", ".join(undeclared))
    # a label a case has in neither mask: the defined values for "absent from both" (Dice nan, ...)
    absent = evaluate_case(np.zeros((1, 1, 1), np.int16), np.zeros((1, 1, 1), np.int16), (1.0, 1.0, 1.0), labels)
    per_case = {c: {n: rows.get(n, absent[n]) for n in labels.labels} for c, rows in per_case.items()}
    mean = {}
    for name in labels.labels:
        keys = VOXEL_METRICS + (LESION_METRICS if name in labels.lesion else ())
        mean[name] = {k: _nanmean([per_case[c][name][k] for c in cases]) for k in keys}
    foreground = {k: _nanmean([mean[n][k] for n in labels.labels]) for k in VOXEL_METRICS}
    return {"prediction_folder": str(pred_dir), "reference_folder": str(gt_dir), "labels": labels.labels, "ignore_label": labels.ignore,
            "lesion_labels": labels.lesion, "mean": mean, "foreground_mean": foreground, "metric_per_case": per_case}


SUMMARY_HINT = "choose another summary file with -o"


def check_summary_target(json_path: Path, gt_dir: Path | None = None) -> None:
    """Before evaluating: ``summary.json`` and the CSV beside it can be written at ``json_path``: a
    ``.json`` file that is no case's file (a mask's or classification's), outside the reference
    ``gt_dir`` and any raw dataset (:func:`~spineauto.io.outputs.check_output_apart`)."""
    json_path = Path(json_path)
    if json_path.suffix.lower() != ".json":
        raise SpineautoError(f"{json_path}: the summary is a .json file (a .csv is written beside it); {SUMMARY_HINT}")
    case_files = [json_path.with_name(f"{json_path.stem}{e}") for e in (*IMAGE_ENDINGS, ".npz")]
    if any(f.exists() for f in case_files):
        raise SpineautoError(f"{json_path}: is the JSON of the case {json_path.stem} (its mask lies beside it), not a summary; {SUMMARY_HINT}")
    check_output_apart([], json_path, references=[gt_dir], protect=("raw dataset",), what="the summary", hint=SUMMARY_HINT)
    check_output_apart([], json_path.with_suffix(".csv"), references=[gt_dir], protect=("raw dataset",), what="the per-case CSV",
                       hint=SUMMARY_HINT)
    check_writable(json_path, "the summary", SUMMARY_HINT)
    check_writable(json_path.with_suffix(".csv"), "the per-case CSV", SUMMARY_HINT)


def write_summary(summary: dict, json_path: Path) -> tuple[Path, Path]:
    """``summary.json`` and a per-case CSV beside it (``summary.csv``)."""
    json_path = Path(json_path)
    buf = io.StringIO()
    fields = ["case", "label", *VOXEL_METRICS, *LESION_METRICS, "tp", "fp", "fn", "n_ref", "n_pred",
              "lesions_ref", "lesions_pred", "lesions_detected"]
    writer = csv_cells.dict_writer(buf, fields, extrasaction="ignore")
    writer.writeheader()
    for case, by_label in summary["metric_per_case"].items():
        for name, row in by_label.items():
            writer.writerow({"case": case, "label": name, **row})
    for name, row in summary["mean"].items():
        writer.writerow({"case": "mean", "label": name, **row})
    csv_path = json_path.with_suffix(".csv")
    with writing(json_path, "the summary", SUMMARY_HINT):
        write_json(json_path, summary)
    with writing(csv_path, "the per-case CSV", SUMMARY_HINT):
        write_atomic(csv_path, lambda p: p.write_text(buf.getvalue()))
    return json_path, csv_path


def dataset_labels(dataset: str) -> LabelSet:
    """Labels of a dataset from the first dataset.json found in raw, preprocessed or a model folder."""
    from spineauto import paths

    name = paths.resolve_dataset(dataset)
    candidates = [paths.root("raw") / name / "dataset.json", paths.root("preprocessed") / name / "dataset.json",
                  *sorted((paths.root("results") / name).glob("*/dataset.json"))]
    for c in candidates:
        if c.is_file():
            data = read_json_file(c, "the dataset's dataset.json")
            if not isinstance(data, dict) or not isinstance(data.get("labels", {}), dict):
                raise SpineautoError(f"{c}: expected a dataset.json with \"labels\": {{name: value}}")
            try:
                return labels_from_dataset_json(data)
            except (TypeError, ValueError) as e:  # a region or pixel_spacing problem, or a value that is no integer
                raise SpineautoError(f"{c}: label values must be integers, or lists of them with regions_class_order, and "
                                     f"pixel_spacing a size in mm ({e})") from None
    raise SpineautoError(f"dataset {name}: no dataset.json in {', '.join(str(c.parent) for c in candidates[:2])} or its model folders")
