"""Postprocessing: keep only the largest connected component of a label, when that helps.

The decision follows nnU-Net's rule: on the cross-validation predictions, a label gets
largest-component filtering if it raises that label's mean Dice over the cases. The decision is
stored as ``postprocessing.json`` in the model folder and applied by predict.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from spineauto.errors import SpineautoError
from spineauto.evaluation.metrics import dice
from spineauto.io.atomic import write_json

log = logging.getLogger(__name__)
POSTPROCESSING_FILE = "postprocessing.json"


def keep_largest_component(seg: np.ndarray, label: int) -> np.ndarray:
    """``seg`` with every component of ``label`` but the largest (26-connected) set to background."""
    import cc3d

    mask = seg == label
    if not mask.any():
        return seg
    comps = cc3d.connected_components(mask.astype(np.uint8), connectivity=26)
    if comps.max() <= 1:
        return seg
    sizes = np.bincount(comps.ravel())
    sizes[0] = 0
    out = seg.copy()
    out[mask & (comps != int(sizes.argmax()))] = 0
    return out


def apply_postprocessing(seg: np.ndarray, postprocessing: dict) -> np.ndarray:
    for label in postprocessing.get("largest_component_labels", []):
        seg = keep_largest_component(seg, int(label))
    return seg


def decide_postprocessing(pairs: Sequence[tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]],
                          labels: dict[str, int]) -> dict:
    """Decide per label from (load prediction, load reference) pairs; returns the postprocessing dict."""
    fg = {n: v for n, v in labels.items() if v != 0}
    before: dict[str, list[float]] = {n: [] for n in fg}
    after: dict[str, list[float]] = {n: [] for n in fg}
    for load_pred, load_ref in pairs:
        pred, ref = load_pred(), load_ref()
        for name, v in fg.items():
            before[name].append(dice(pred == v, ref == v))
            after[name].append(dice(keep_largest_component(pred, v) == v, ref == v))
    chosen, report = [], {}
    for name, v in fg.items():
        b, a = _mean(before[name]), _mean(after[name])
        use = bool(np.isfinite(a) and np.isfinite(b) and a > b)
        report[name] = {"dice_before": b, "dice_after": a, "largest_component": use}
        if use:
            chosen.append(v)
    return {"largest_component_labels": chosen, "cases": len(pairs), "per_label": report,
            "rule": "keep the largest 26-connected component of a label if it raises the label's mean cross-validation Dice"}


def _mean(values: list[float]) -> float:
    vals = [v for v in values if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def validation_pairs(model_folder: Path, reference_dirs: Sequence[Path]) -> list[tuple[Callable, Callable]]:
    """(prediction, reference) loaders for every fold_*/validation/<case>.nii.gz with a reference file."""
    from spineauto.io.images import read_volume

    preds = sorted(model_folder.glob("fold_[0-9]*/validation/*.nii.gz"))
    if not preds:
        raise SpineautoError(f"{model_folder}: no cross-validation predictions (fold_<k>/validation/*.nii.gz; fold_all does not count); train the folds first")
    pairs = []
    for p in preds:
        ref = next((d / p.name for d in reference_dirs if (d / p.name).is_file()), None)
        if ref is None:
            raise SpineautoError(f"{p}: no ground truth {p.name} in {', '.join(map(str, reference_dirs))}; "
                                 "set SPINEAUTO_RAW to the raw dataset")
        pairs.append((lambda p=p: read_volume(p)[0].round().astype(np.int16),
                      lambda r=ref: read_volume(r)[0].round().astype(np.int16)))
    return pairs


def determine_postprocessing(model_folder: Path, reference_dirs: Sequence[Path], labels: dict[str, int]) -> dict:
    """Decide from the folds' validation predictions and write ``postprocessing.json``."""
    decision = decide_postprocessing(validation_pairs(model_folder, reference_dirs), labels)
    write_json(model_folder / POSTPROCESSING_FILE, decision)
    log.info("postprocessing for %s: largest component for labels %s", model_folder.name, decision["largest_component_labels"])
    return decision
