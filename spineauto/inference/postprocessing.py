"""Postprocessing: keep only the largest connected component of a label, when that helps.

The decision follows nnU-Net's rule: on the cross-validation predictions, a label gets
largest-component filtering if it raises that label's mean Dice over the cases. find_best_configuration
stores the decision as ``postprocessing.json``; predict applies it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from spineauto.evaluation.metrics import dice

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

