"""Plain numpy segmentation metrics, spacing-aware where distances are involved.

Conventions follow nnunetv2.evaluation.evaluate_predictions.compute_metrics: a label absent from
both reference and prediction has Dice/IoU ``nan`` (excluded from means), absent from one of them 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


def confusion(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int]:
    """(tp, fp, fn) of two boolean masks."""
    pred = np.asarray(pred, bool)
    ref = np.asarray(ref, bool)
    tp = int(np.count_nonzero(pred & ref))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(ref)) - tp
    return tp, fp, fn


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; nan when both are empty."""
    tp, fp, fn = confusion(pred, ref)
    denom = 2 * tp + fp + fn
    return float("nan") if denom == 0 else 2 * tp / denom


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    tp, fp, fn = confusion(pred, ref)
    denom = tp + fp + fn
    return float("nan") if denom == 0 else tp / denom


def relative_volume_difference(pred: np.ndarray, ref: np.ndarray) -> float:
    """(V_pred - V_ref) / V_ref; nan when the reference is empty."""
    vr = int(np.count_nonzero(ref))
    return float("nan") if vr == 0 else (int(np.count_nonzero(pred)) - vr) / vr


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    if not mask.any():
        return mask
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1), border_value=0)
    return mask & ~eroded


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``pred`` to ``ref``'s surface, and the other way."""
    from scipy import ndimage

    sp, sr = _surface(np.asarray(pred, bool)), _surface(np.asarray(ref, bool))
    dt_r = ndimage.distance_transform_edt(~sr, sampling=spacing)
    dt_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return dt_r[sp], dt_p[sr]


@dataclass
class SurfaceMetrics:
    hd95: float
    asd: float  # average symmetric surface distance


def surface_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> SurfaceMetrics:
    """HD95 and ASD in mm; nan if either mask is empty (undefined), computed on the masks' bounding box."""
    pred = np.asarray(pred, bool)
    ref = np.asarray(ref, bool)
    if not pred.any() or not ref.any():
        return SurfaceMetrics(float("nan"), float("nan"))
    both = pred | ref
    idx = np.argwhere(both)
    lo, hi = np.maximum(idx.min(0) - 1, 0), idx.max(0) + 2
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    d_pr, d_rp = surface_distances(pred[box], ref[box], spacing)
    all_d = np.concatenate([d_pr, d_rp])
    hd95 = max(float(np.percentile(d_pr, 95)), float(np.percentile(d_rp, 95)))
    return SurfaceMetrics(hd95=hd95, asd=float(all_d.mean()))


@dataclass
class LesionDetection:
    n_true: int
    n_pred: int
    tp_true: int  # true lesions hit by at least one predicted lesion
    tp_pred: int  # predicted lesions overlapping at least one true lesion

    @property
    def recall(self) -> float:
        return float("nan") if self.n_true == 0 else self.tp_true / self.n_true

    @property
    def precision(self) -> float:
        return float("nan") if self.n_pred == 0 else self.tp_pred / self.n_pred

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        if self.n_true == 0 and self.n_pred == 0:
            return float("nan")
        if np.isnan(p) or np.isnan(r) or p + r == 0:
            return 0.0
        return 2 * p * r / (p + r)


def lesion_detection(pred: np.ndarray, ref: np.ndarray) -> LesionDetection:
    """Lesion-wise detection with 26-connected components; a hit is any voxel overlap."""
    import cc3d

    lp = cc3d.connected_components(np.asarray(pred, np.uint8), connectivity=26)
    lr = cc3d.connected_components(np.asarray(ref, np.uint8), connectivity=26)
    n_p, n_r = int(lp.max()), int(lr.max())
    overlap = (lp > 0) & (lr > 0)
    tp_pred = len(np.unique(lp[overlap]))
    tp_true = len(np.unique(lr[overlap]))
    return LesionDetection(n_true=n_r, n_pred=n_p, tp_true=tp_true, tp_pred=tp_pred)
