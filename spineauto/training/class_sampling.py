"""Class-balanced 2D slice sampling for classification heads (the data side of the cls task).

A training sample is one slice of one preprocessed case, labelled with the case's classes (a
volume-level label holds for each of its slices). Cases are drawn with probability proportional to
the planned inverse-frequency ``class_weights`` of their classes (the geometric mean over heads when
a network carries several), so rare classes are seen about as often as common ones; the slice is
then drawn uniformly within the case, so a volume with many slices is not over-represented.
Because the sampling balances the classes, the loss is left unweighted.

The window is placed as the segmentation sampler places it (random position, zero padding where
the slice is smaller than the window, centred), and :func:`spineauto.inference.predictor.run_networks`
cuts slices into the same patch-sized, centred-padded windows at prediction time. Both samplers follow the trainer's
``BatchSampler`` protocol: ``sample(cases, batch_size, rng, size) -> {"data", "cls", "keys"[, "seg"]}``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from spineauto.errors import SpineautoError
from spineauto.planning.plans import HeadPlan
from spineauto.training.data import CaseStore, SegmentationPatchSampler, crop_padded


def class_indices(case: str, classes: dict[str, str], heads: Sequence[HeadPlan], where: str = "") -> dict[str, int]:
    """head -> class index of one case; a missing or undeclared class is an error naming the case."""
    out = {}
    for h in heads:
        value = classes.get(h.name)
        if value is None:
            raise SpineautoError(f"{where or case}: case {case} has no class for head {h.name!r}; add cases.{case}.classes.{h.name} "
                                 "to dataset.json and rerun `spineauto plan_and_preprocess`")
        if value not in h.classes:
            raise SpineautoError(f"{where or case}: case {case} has class {value!r} for head {h.name!r}, not one of {h.classes}; "
                                 "fix dataset.json and rerun `spineauto plan_and_preprocess`")
        out[h.name] = h.classes.index(value)
    return out


def store_class_indices(store: CaseStore, heads: Sequence[HeadPlan]) -> dict[str, dict[str, int]]:
    """case -> head -> class index for every case of ``store`` (checked once, before training starts)."""
    return {c: class_indices(c, p.get("classes") or {}, heads, str(store.folder / f"{c}.json")) for c, p in store.props.items()}


def case_weights(labels: Sequence[dict[str, int]], heads: Sequence[HeadPlan]) -> np.ndarray:
    """Sampling probability per case: geometric mean over heads of its class weight, normalised."""
    w = np.ones(len(labels))
    for h in heads:
        cw = np.asarray(h.class_weights, dtype=float)
        w *= np.array([cw[lab[h.name]] for lab in labels]) ** (1.0 / len(heads))
    return w / w.sum()


def _cls_arrays(labels: dict[str, dict[str, int]], cases: Sequence[str], heads: Sequence[HeadPlan]) -> dict[str, np.ndarray]:
    return {h.name: np.array([labels[c][h.name] for c in cases], dtype=np.int64) for h in heads}


@dataclass
class ClassBalancedSliceSampler:
    """Random whole-case slices (a random window of ``size``) with class-balanced case sampling."""

    store: CaseStore
    heads: list[HeadPlan]
    balanced: bool = True
    labels: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self):
        if not self.labels:
            self.labels = store_class_indices(self.store, self.heads)
        self._p_cache: dict[tuple[str, ...], np.ndarray] = {}

    def probabilities(self, cases: Sequence[str]) -> np.ndarray:
        key = tuple(cases)
        if key not in self._p_cache:
            self._p_cache[key] = (case_weights([self.labels[c] for c in cases], self.heads) if self.balanced
                                  else np.full(len(cases), 1.0 / len(cases)))
        return self._p_cache[key]

    def sample(self, cases: list[str], batch_size: int, rng: np.random.Generator, size: list[int]) -> dict:
        if not cases:
            raise SpineautoError("no cases to sample classification slices from")
        picked = [cases[i] for i in rng.choice(len(cases), size=batch_size, p=self.probabilities(cases))]
        data, keys = [], []
        for case in picked:
            d = self.store.data(case)
            n_slices, h, w = d.shape[1:]
            s = int(rng.integers(n_slices))
            y0 = _offset(h, size[0], rng)
            x0 = _offset(w, size[1], rng)
            data.append(crop_padded(d, s, y0, x0, size))
            keys.append(f"{case}:{s}")
        return {"data": np.stack(data).astype(np.float32, copy=False), "cls": _cls_arrays(self.labels, picked, self.heads), "keys": keys}

    def __getstate__(self):
        return {**self.__dict__, "_p_cache": {}}


def _offset(n: int, p: int, rng: np.random.Generator) -> int:
    """Random window start: inside the slice when it is larger, centred padding when smaller."""
    if n >= p:
        return int(rng.integers(0, n - p + 1))
    return -((p - n) // 2)


@dataclass
class MultitaskSampler:
    """The segmentation sampler's patches (foreground oversampling) plus each patch's case classes."""

    store: CaseStore
    heads: list[HeadPlan]
    oversample: float = 0.33
    labels: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self):
        if not self.labels:
            self.labels = store_class_indices(self.store, self.heads)
        self.seg_sampler = SegmentationPatchSampler(self.store, self.oversample)

    def sample(self, cases: list[str], batch_size: int, rng: np.random.Generator, size: list[int]) -> dict:
        batch = self.seg_sampler.sample(cases, batch_size, rng, size)
        picked = [k.rsplit(":", 1)[0] for k in batch["keys"]]
        batch["cls"] = _cls_arrays(self.labels, picked, self.heads)
        return batch
