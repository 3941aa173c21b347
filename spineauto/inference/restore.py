"""Probabilities at the target spacing -> labels (and optionally probabilities) in the input's grid.

The inverse of :func:`spineauto.preprocessing.preprocess.preprocess_array`, done without the memory
blow-up nnU-Net users report (its issue #2912: every channel of the whole volume resampled at once in
float64): slices are resampled in-plane in small chunks with bilinear interpolation on the device the
probabilities already live on, argmax is taken per chunk, and only uint8 labels are kept. The
probabilities can arrive slab by slab as the networks finish them (:class:`Restoration`), so a
case's whole probability volume never exists. Full probabilities in the input grid are built only
when asked (``--save-probabilities``). For the cord choice, the cord label's probability is kept
as uint8 (probability x 255) and, with test-time augmentation, one bit per pass where that pass
alone marks the cord (:class:`~spineauto.inference.postprocessing.CordEvidence`): at most two uint8
volumes beside the labels, whatever the number of channels and passes (up to 8).
A stored label map (a preprocessed training case's reference) goes back the same way, as one-hot
probabilities (:func:`restore_label_map`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from spineauto.inference.postprocessing import CordEvidence
from spineauto.io.geometry import CaseGeometry

CHUNK_PIXELS = 2 ** 24  # resampled values (K * slices * H * W) per chunk
MAX_PASSES = 8  # passes a uint8 holds one bit each of (2D test-time augmentation has at most 4)


def _chunks(probs: torch.Tensor, cropped: list[int]):
    k = probs.shape[0]
    per = max(1, CHUNK_PIXELS // max(1, k * cropped[1] * cropped[2]))
    same = list(probs.shape[2:]) == list(cropped[1:])
    for s0 in range(0, probs.shape[1], per):
        part = probs[:, s0:s0 + per].transpose(0, 1)  # (n, K, h, w)
        if not same:
            part = F.interpolate(part.float(), size=tuple(cropped[1:]), mode="bilinear", align_corners=False)
        yield s0, part


class Restoration:
    """Probabilities at the target spacing, given slab by slab (:func:`spineauto.inference.predictor.run_networks`'s
    ``seg_sink``) -> uint8 labels, and with ``probabilities`` the probabilities too, in the input's grid.

    With ``cord_label`` (the label value whose component is the cord, = its channel): that channel's
    probability as uint8, and each pass's own probability of it (``pass_sink``, :meth:`add_passes`)
    as one bit per pass (set where that pass gives the cord at least 0.5), for :meth:`cord_evidence`."""

    def __init__(self, props: dict, probabilities: bool = False, cord_label: int | None = None, pass_names: list[str] | None = None):
        self.geom = CaseGeometry.from_dict(props["geometry"])
        self.cropped = list(props["cropped_shape"])
        self._labels = np.zeros(self.geom.layout_shape, dtype=np.uint8)
        self._probs: np.ndarray | None = None
        self.keep_probabilities = probabilities
        self.cord_label = cord_label
        self._cord = np.zeros(self.geom.layout_shape, dtype=np.uint8) if cord_label is not None else None
        self._passes: np.ndarray | None = None  # uint8 bit i: pass i marks the cord
        self.pass_names = list(pass_names or [])

    def add(self, first: int, probs: torch.Tensor) -> None:
        """(K, n, h, w) probabilities of the preprocessed slices ``first`` .. ``first + n``."""
        (s0_, _), (h0, h1), (w0, w1) = self.geom.bbox
        with torch.inference_mode():
            for s0, part in _chunks(probs, self.cropped):
                at = s0_ + first + s0
                lab = part.argmax(1).to(torch.uint8).cpu().numpy()
                self._labels[at:at + lab.shape[0], h0:h1, w0:w1] = lab
                if self._cord is not None:
                    q = part[:, self.cord_label].clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
                    self._cord[at:at + q.shape[0], h0:h1, w0:w1] = q
                if self.keep_probabilities:
                    if self._probs is None:  # background is 1 outside the crop
                        self._probs = np.zeros((part.shape[1], *self.geom.layout_shape), dtype=np.float32)
                        self._probs[0] = 1
                    arr = part.transpose(0, 1).cpu().numpy()
                    self._probs[:, at:at + arr.shape[1], h0:h1, w0:w1] = arr

    def add_passes(self, first: int, passes: torch.Tensor) -> None:
        """(P, n, h, w): each pass's probability of the cord label on the preprocessed slices ``first`` .. ``first + n``."""
        if not 1 < passes.shape[0] <= MAX_PASSES:
            raise ValueError(f"Restoration: {passes.shape[0]} passes; between 2 and {MAX_PASSES} are kept")
        (s0_, _), (h0, h1), (w0, w1) = self.geom.bbox
        if self._passes is None:
            self._passes = np.zeros(self.geom.layout_shape, dtype=np.uint8)
        bits = torch.tensor([1 << i for i in range(passes.shape[0])], dtype=torch.uint8, device=passes.device)
        with torch.inference_mode():
            for s0, part in _chunks(passes, self.cropped):  # (n, P, h, w)
                at = s0_ + first + s0
                packed = ((part >= 0.5).to(torch.uint8) * bits[:, None, None]).sum(1, dtype=torch.uint8).cpu().numpy()
                self._passes[at:at + packed.shape[0], h0:h1, w0:w1] = packed

    def cord_evidence(self) -> CordEvidence | None:
        """The cord label's probability and each pass's cord in the input's grid (``cord_label``; None
        without). Called once, after the last slab: the layout copies are let go."""
        if self._cord is None:
            return None
        back = lambda a: self.geom.from_layout(a[None])[0]  # noqa: E731
        cord, self._cord = back(self._cord), None
        passes = back(self._passes) if self._passes is not None else None
        self._passes = None
        return CordEvidence(self.cord_label, cord, passes, self.pass_names if passes is not None else [])

    def labels(self) -> np.ndarray:
        """uint8 (X, Y, Z) in the input's voxel grid."""
        return self.geom.from_layout(self._labels[None])[0]

    def probabilities(self) -> np.ndarray:
        """(K, X, Y, Z) in the input's grid (``probabilities=True``)."""
        if self._probs is None:
            raise ValueError("Restoration: probabilities were not kept (probabilities=False) or none were added")
        return self.geom.from_layout(self._probs)


def restore_labels(probs: torch.Tensor, props: dict) -> np.ndarray:
    """(K, S, h, w) probabilities of a whole case -> uint8 labels (X, Y, Z) in the input's voxel grid."""
    restoration = Restoration(props)
    restoration.add(0, probs)
    return restoration.labels()


def restore_label_map(seg: np.ndarray, props: dict) -> np.ndarray:
    """A stored (1, S, H, W) label map -> int16 labels (X, Y, Z) in the input's grid (one-hot, restored, argmax)."""
    k = max(int(seg.max()) + 1, 2)
    onehot = torch.from_numpy(np.stack([(seg[0] == v) for v in range(k)]).astype(np.float32))
    return restore_labels(onehot, props).astype(np.int16)
