"""Probabilities at the target spacing -> labels (and optionally probabilities) in the input's grid.

The inverse of :func:`spineauto.preprocessing.preprocess.preprocess_array`, done without the memory
blow-up nnU-Net users report (its issue #2912: every channel of the whole volume resampled at once in
float64): slices are resampled in-plane in small chunks with bilinear interpolation on the device the
probabilities already live on, argmax is taken per chunk, and only uint8 labels are kept. Full
probabilities in the input grid are built only when asked (``--save-probabilities``).
A stored label map (a preprocessed training case's reference) goes back the same way, as one-hot
probabilities (:func:`restore_label_map`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from spineauto.io.geometry import CaseGeometry

CHUNK_PIXELS = 2 ** 24  # resampled values (K * slices * H * W) per chunk


def _chunks(probs: torch.Tensor, cropped: list[int]):
    k = probs.shape[0]
    per = max(1, CHUNK_PIXELS // max(1, k * cropped[1] * cropped[2]))
    same = list(probs.shape[2:]) == list(cropped[1:])
    for s0 in range(0, probs.shape[1], per):
        part = probs[:, s0:s0 + per].transpose(0, 1)  # (n, K, h, w)
        if not same:
            part = F.interpolate(part.float(), size=tuple(cropped[1:]), mode="bilinear", align_corners=False)
        yield s0, part


def restore_labels(probs: torch.Tensor, props: dict) -> np.ndarray:
    """(K, S, h, w) probabilities -> uint8 labels (X, Y, Z) in the input's voxel grid."""
    geom = CaseGeometry.from_dict(props["geometry"])
    cropped = list(props["cropped_shape"])
    labels = np.zeros(geom.layout_shape, dtype=np.uint8)
    (s0_, s1_), (h0, h1), (w0, w1) = geom.bbox
    with torch.inference_mode():
        for s0, part in _chunks(probs, cropped):
            lab = part.argmax(1).to(torch.uint8).cpu().numpy()
            labels[s0_ + s0:s0_ + s0 + lab.shape[0], h0:h1, w0:w1] = lab
    return geom.from_layout(labels[None])[0]


def restore_probabilities(probs: torch.Tensor, props: dict, dtype=np.float32) -> np.ndarray:
    """(K, S, h, w) probabilities -> (K, X, Y, Z) in the input's grid; background is 1 outside the crop."""
    geom = CaseGeometry.from_dict(props["geometry"])
    cropped = list(props["cropped_shape"])
    full = np.zeros((probs.shape[0], *geom.layout_shape), dtype=dtype)
    full[0] = 1
    (s0_, _), (h0, h1), (w0, w1) = geom.bbox
    with torch.inference_mode():
        for s0, part in _chunks(probs, cropped):
            arr = part.transpose(0, 1).cpu().numpy()
            full[:, s0_ + s0:s0_ + s0 + arr.shape[1], h0:h1, w0:w1] = arr
    return geom.from_layout(full)


def restore_label_map(seg: np.ndarray, props: dict) -> np.ndarray:
    """A stored (1, S, H, W) label map -> int16 labels (X, Y, Z) in the input's grid (one-hot, restored, argmax)."""
    k = max(int(seg.max()) + 1, 2)
    onehot = torch.from_numpy(np.stack([(seg[0] == v) for v in range(k)]).astype(np.float32))
    return restore_labels(onehot, props).astype(np.int16)
