"""Postprocessing: keep only the largest connected component of a label, or the component that is a
cord (a tube along the superior-inferior axis), when that helps.

find_best_configuration decides it on the cross-validation (nnU-Net's rule, in
:mod:`spineauto.evaluation.best_configuration`) and stores it as ``postprocessing.json``; predict and
ensemble apply it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from spineauto.errors import SpineautoError
from spineauto.io.atomic import read_json

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


def superior_axis(affine: np.ndarray) -> int:
    """The voxel axis closest to the world's superior-inferior axis."""
    cols = np.asarray(affine)[:3, :3]
    return int(np.argmax(np.abs(cols[2]) / np.maximum(np.linalg.norm(cols, axis=0), 1e-12)))


MAX_CORD_RADIUS_MM = 8.0  # RMS in-plane radius of a cord cross-section, at most: twice an adult cervical cord's ~4 mm
# (a filled ellipse of about 13 x 8 mm), so an enlargement or a cord with some CSF still counts as a tube
LONG_FRACTION = 0.75  # tubes crossing at least this share of the most levels any tube crosses are candidates
MIDLINE_WEIGHT = 2.0  # left-right offset from the field of view's centre counts this much more than front-back
MIDLINE_TOLERANCE_MM = 10.0  # tubes within this left-right distance of the most central one lie on the same midline
CANAL_DEPTH_MM = 25.0  # how far behind the most central tube the cord may lie: the vertebral body's centre is ~15 mm
# (cervical) to ~20 mm (thoracic) in front of the cord's (half the canal, the cortex, half a body 15-25 mm deep), a
# disc's the same; farther back lie the spinous processes, the fat between them and the neck muscles
CONFIDENCE_MARGIN = 0.2  # with probabilities: a midline tube whose mean cord probability is this much below the most
# confident one's is passed over by rule 4 (a faint tube behind the cord: fat, a partial-volume rim); the false tubes of
# a real neck are about as confident as the cord (mean 0.69-0.86 vs 0.78-0.95), so only a clearly fainter one loses
PASS_AGREEMENT = 0.1  # a test-time-augmentation pass agrees when at least this share of its own choice lies on the kept
# tube: the same tube drawn wider, shifted or cut into pieces shares a good part of it (a third, seen on small models),
# another structure (a vertebral body 15 mm in front, a vessel alongside) shares nothing
UNCERTAIN_CORD = "uncertain cord"  # how every cord-choice QC reason begins


@dataclass
class CordEvidence:
    """What the network said beyond its mask, in the mask's grid, for :func:`choose_cord_component`."""

    label: int  # the label value it is about
    probability: np.ndarray | None = None  # uint8 (X, Y, Z): the label's probability x 255, folds and passes averaged
    passes: np.ndarray | None = None  # uint8 (X, Y, Z): bit i set where test-time-augmentation pass i alone gives >= 0.5
    pass_names: list[str] = field(default_factory=list)  # what to call pass i in a reason

    @classmethod
    def from_probabilities(cls, probabilities: np.ndarray, label: int) -> "CordEvidence":
        """From averaged probabilities (K, X, Y, Z) whose channel k is label value k (no passes)."""
        return cls(label, np.round(np.clip(probabilities[label], 0, 1) * 255).astype(np.uint8))


@dataclass
class CordChoice:
    """What :func:`choose_cord_component` kept and why it may be wrong."""

    seg: np.ndarray  # the label map with every other component of the label set to background
    reasons: list[str] = field(default_factory=list)  # "uncertain cord: ..." lines; empty when the choice was clear


def keep_cord_component(seg: np.ndarray, label: int, affine: np.ndarray) -> np.ndarray:
    """``seg`` with every component of ``label`` but the one that is most a cord set to background
    (:func:`choose_cord_component`)."""
    return choose_cord_component(seg, label, affine).seg


def choose_cord_component(seg: np.ndarray, label: int, affine: np.ndarray, evidence: CordEvidence | None = None) -> CordChoice:
    """Keep the component of ``label`` that is most a cord, and say when that choice is uncertain.

    The cord is a long tube on the body's midline, behind the vertebral bodies:

    1. *tube*: at every axial level its cross-section is one compact disc (mean RMS radius at most
       :data:`MAX_CORD_RADIUS_MM`); sheets of fat, muscle outlines and merged islands are wider;
    2. *long*: it crosses more axial levels (voxel planes across the axis closest to world S-I) than
       false islands; every tube crossing at least :data:`LONG_FRACTION` of the most levels any tube
       crosses is a candidate (a cord the network missed on an end slice still counts);
    3. *midline*: spine scans are centred on the spine, so the candidate nearest the field of view's
       centre, left-right offsets weighted :data:`MIDLINE_WEIGHT` x (the cord lies on the
       mid-sagittal plane), sets the midline; this rules out vessels and fat that run alongside;
    4. *posterior*: on that midline, the vertebral bodies, discs, oesophagus and trachea lie in front
       of the cord, and a network that never saw a whole neck marks them as tubes too (a whole-neck
       field of view is centred on the vertebral body, not on the cord). Of the candidates within
       :data:`MIDLINE_TOLERANCE_MM` left-right of the most central one and at most
       :data:`CANAL_DEPTH_MM` behind it, the most posterior (world RAS y) is kept; with the cord
       probability (``evidence.probability``), the most posterior of those whose mean probability is
       within :data:`CONFIDENCE_MARGIN` of the most confident one's.

    ``reasons`` says "uncertain cord: ..." when the choice rested on rule 4 (another tube on the
    midline in front of or behind the kept one; with probabilities, each one's probability mass and
    mean, and whether a fainter tube behind was passed over), when two tubes off each other's midline
    are about as central, or when no component is a tube. When no component is a tube, all count as
    tubes. With each test-time-augmentation pass's own cord (``evidence.passes``), a pass whose own
    choice lies mostly off the kept tube, or that marks no cord, is a reason too (nothing to compare
    without test-time augmentation).
    """
    if evidence is not None and evidence.label != label:
        evidence = None
    passes = evidence is not None and evidence.passes is not None
    mask = seg == label
    if not mask.any():
        return CordChoice(seg)
    affine = np.asarray(affine, dtype=float)
    tubes = _Tubes.of(mask, affine, evidence.probability if evidence is not None else None, statistics=passes)
    if tubes.n <= 1 and not passes:
        return CordChoice(seg)
    best, reasons = tubes.choose(seg.shape, affine) if tubes.n > 1 else (1, [])
    kept = tubes.comps == best
    out = seg.copy()
    out[mask & ~kept] = 0
    del mask
    tubes.comps = None  # the passes' own component maps come one at a time, after this one is let go
    if passes:
        reasons += _pass_disagreements(kept, tubes, best, evidence, affine)
    return CordChoice(out, reasons)


@dataclass
class _Tubes:
    """The components of a mask and, per component 0..n, what the cord choice weighs."""

    comps: np.ndarray | None  # component map (0: background); None once let go
    n: int
    levels: np.ndarray  # levels crossed
    radius: np.ndarray  # mean cross-section RMS radius, mm
    voxels: np.ndarray
    world: np.ndarray  # (n + 1, 3) centroid in world RAS mm
    mass: np.ndarray | None  # summed cord probability (voxels' worth); None without probabilities

    @classmethod
    def of(cls, mask: np.ndarray, affine: np.ndarray, probability: np.ndarray | None = None, statistics: bool = False) -> "_Tubes":
        """The components of ``mask``; their statistics when there are two or more, or ``statistics``."""
        import cc3d

        comps = cc3d.connected_components(mask.astype(np.uint8), connectivity=26)
        n = int(comps.max())
        if n <= 1 and not statistics:
            return cls(comps, n, *(np.zeros(n + 1),) * 3, np.zeros((n + 1, 3)), None)
        levels, radius, voxels, coords, mass = _cross_sections(comps, n, superior_axis(affine), np.linalg.norm(affine[:3, :3], axis=0),
                                                               probability)
        world = (coords / np.maximum(voxels, 1)[:, None]) @ affine[:3, :3].T + affine[:3, 3]
        return cls(comps, n, levels, radius, voxels, world, mass)

    def describe(self, c: int) -> str:
        what = f"{int(self.voxels[c])} voxels on {int(self.levels[c])} levels"
        if self.mass is not None:
            what += f", cord probability mass {self.mass[c]:.0f}, mean {self.mass[c] / max(1, self.voxels[c]):.2f}"
        return what

    def choose(self, shape: tuple[int, ...], affine: np.ndarray) -> tuple[int, list[str]]:
        """Rules 1-4 of :func:`choose_cord_component`: the component kept and the reasons to doubt it."""
        levels, voxels, world = self.levels, self.voxels, self.world
        reasons = []
        tube = self.radius <= MAX_CORD_RADIUS_MM
        tube[0] = False
        if not tube.any():
            tube[1:] = True
            reasons.append(f"{UNCERTAIN_CORD}: none of the {self.n} components is a tube (mean cross-section radius > "
                           f"{MAX_CORD_RADIUS_MM:g} mm); kept the most central of the longest")
        candidates = tube & (levels >= LONG_FRACTION * levels[tube].max())
        centre = affine[:3, :3] @ ((np.array(shape[:3]) - 1) / 2.0) + affine[:3, 3]
        offset = np.where(candidates, MIDLINE_WEIGHT * np.abs(world[:, 0] - centre[0]) + np.abs(world[:, 1] - centre[1]), np.inf)
        central = int(np.argmin(offset))
        lr = np.abs(world[:, 0] - world[central, 0])
        behind = world[central, 1] - world[:, 1]  # mm posterior of the most central candidate (RAS: y is anterior)
        midline = candidates & (lr <= MIDLINE_TOLERANCE_MM) & (behind <= CANAL_DEPTH_MM)
        posterior = int(np.argmax(np.where(midline, behind, -np.inf)))
        best = posterior
        if self.mass is not None:  # the most posterior of the confident ones
            mean = self.mass / np.maximum(voxels, 1)
            confident = midline & (mean >= mean[midline].max() - CONFIDENCE_MARGIN)
            best = int(np.argmax(np.where(confident, behind, -np.inf)))
        others = [int(c) for c in np.flatnonzero(midline) if c != best]
        if best != posterior:
            reasons.append(f"{UNCERTAIN_CORD}: {len(others) + 1} tubes on the midline; kept one ({self.describe(best)}) "
                           f"{world[best, 1] - world[posterior, 1]:.0f} mm in front of a fainter one ({self.describe(posterior)}; "
                           f"mean probability more than {CONFIDENCE_MARGIN:g} below the most confident tube's)")
        elif others:
            front = max(others, key=lambda c: world[c, 1])
            reasons.append(f"{UNCERTAIN_CORD}: {len(others) + 1} tubes on the midline; kept the most posterior "
                           f"({self.describe(best)}), "
                           f"{world[front, 1] - world[best, 1]:.0f} mm behind one of {self.describe(front)} "
                           f"(the cord lies behind the vertebral bodies)")
        rival = [int(c) for c in np.flatnonzero(candidates & ~midline) if offset[c] <= offset[central] + MIDLINE_TOLERANCE_MM]
        if rival:
            reasons.append(f"{UNCERTAIN_CORD}: a tube {lr[rival[0]]:.0f} mm to the side is about as central "
                           f"({self.describe(rival[0])})")
        return best, reasons


def _pass_disagreements(kept: np.ndarray, tubes: _Tubes, best: int, evidence: CordEvidence, affine: np.ndarray) -> list[str]:
    """Each test-time-augmentation pass's own cord choice (mask only) against the kept tube: a reason
    per pass that marks no cord, or whose choice has less than :data:`PASS_AGREEMENT` of its voxels on it
    (another tube)."""
    reasons = []
    n_passes = len(evidence.pass_names)
    for i, name in enumerate(evidence.pass_names):
        own = (evidence.passes & np.uint8(1 << i)) > 0
        if not own.any():
            reasons.append(f"{UNCERTAIN_CORD}: {name} marks no cord (of {n_passes} passes)")
            continue
        theirs = _Tubes.of(own, affine, statistics=True)
        del own
        pick = 1 if theirs.n <= 1 else theirs.choose(kept.shape, affine)[0]
        on_kept = np.count_nonzero(theirs.comps[kept] == pick) / max(1, int(theirs.voxels[pick]))
        theirs.comps = None
        if on_kept < PASS_AGREEMENT:
            d = theirs.world[pick] - tubes.world[best]
            reasons.append(f"{UNCERTAIN_CORD}: {name} puts the cord on another tube ({theirs.describe(pick)}; "
                           f"{100 * on_kept:.0f}% on the kept one, its centre {abs(d[0]):.0f} mm to the side and "
                           f"{abs(d[1]):.0f} mm {'in front of' if d[1] > 0 else 'behind'} the kept one's; "
                           f"{n_passes} passes)")
    return reasons


CHUNK_VOXELS = 2 ** 22  # voxels of the component map read at a time by _cross_sections


def _cross_sections(comps: np.ndarray, n: int, axis: int, spacing: np.ndarray,
                    probability: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Per component 0..n of a label map: the levels along ``axis`` it crosses, the mean over them of
    its cross-section's RMS radius (mm), its voxel count, its voxel-coordinate sums (n + 1, 3) and,
    with ``probability`` (uint8, x 255), its summed probability (else None).
    Read a chunk of levels at a time (a cross-section lies in one level), so memory follows the chunk."""
    n_levels = comps.shape[axis]
    per = max(1, CHUNK_VOXELS // max(1, comps.size // n_levels))
    levels, radius_sum, voxels, coords = np.zeros(n + 1), np.zeros(n + 1), np.zeros(n + 1), np.zeros((n + 1, 3))
    mass = np.zeros(n + 1) if probability is not None else None
    for l0 in range(0, n_levels, per):
        index = [slice(None)] * 3
        index[axis] = slice(l0, l0 + per)
        part = comps[tuple(index)]
        where = np.nonzero(part)
        if not where[0].size:
            continue
        lab = part[where].astype(np.int64)
        cells, cell_of, count = np.unique(lab * n_levels + where[axis], return_inverse=True, return_counts=True)
        var = np.zeros(len(cells))
        for a in (a for a in range(3) if a != axis):
            x = where[a] * spacing[a]
            var += np.bincount(cell_of, x * x) / count - (np.bincount(cell_of, x) / count) ** 2
        owner = cells // n_levels
        levels += np.bincount(owner, minlength=n + 1)
        radius_sum += np.bincount(owner, np.sqrt(np.maximum(var, 0)), minlength=n + 1)
        voxels += np.bincount(lab, minlength=n + 1)
        for a in range(3):
            coords[:, a] += np.bincount(lab, where[a] + (l0 if a == axis else 0), minlength=n + 1)
        if mass is not None:
            mass += np.bincount(lab, probability[tuple(index)][where] / 255.0, minlength=n + 1)
    return levels, radius_sum / np.maximum(levels, 1), voxels, coords, mass


def apply_postprocessing(seg: np.ndarray, postprocessing: dict, affine: np.ndarray | None = None,
                         qc: list[str] | None = None, evidence: CordEvidence | None = None) -> np.ndarray:
    """The decided postprocessing; ``cord_component_labels`` need the mask's ``affine`` (where S-I is).
    ``qc``, when given, receives the cord choice's "uncertain cord: ..." reasons; ``evidence``, the
    network's cord probability (and passes) for the label it is about."""
    for label in postprocessing.get("largest_component_labels", []):
        seg = keep_largest_component(seg, int(label))
    cord = postprocessing.get("cord_component_labels", [])
    if cord and affine is None:
        raise ValueError("apply_postprocessing: cord_component_labels need the mask's affine")
    for label in cord:
        choice = choose_cord_component(seg, int(label), affine, evidence)
        seg = choice.seg
        if qc is not None:
            qc.extend(choice.reasons)
    return seg


def load_postprocessing(path: Path, label_values: Sequence[int] | None = None) -> dict:
    """A ``postprocessing.json``, checked: ``{"largest_component_labels": [label values], ...}``.

    Every reader of such a file goes through here, so that a file of any other shape (not JSON, a
    list, wrong types, labels that are not positive or, with ``label_values``, not declared) is
    one line naming the file, never a traceback or a silently ignored setting.
    """
    path = Path(path)
    if not path.is_file():
        raise SpineautoError(f"{path}: postprocessing file not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        data = read_json(path)
    except (OSError, ValueError, RecursionError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        raise SpineautoError(f"{path}: unreadable postprocessing file ({reason}); rerun `spineauto find_best_configuration`") from None
    labels = data.get("largest_component_labels", []) if isinstance(data, dict) else None
    if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in labels):
        raise SpineautoError(f"{path}: not a postprocessing file (expected {{\"largest_component_labels\": [positive label "
                             "values]}}); rerun `spineauto find_best_configuration` or delete it")
    cord = data.get("cord_component_labels", [])
    if not isinstance(cord, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in cord):
        raise SpineautoError(f"{path}: cord_component_labels must be a list of positive label values, got {cord!r}; "
                             "rerun `spineauto find_best_configuration` or delete it")
    labels = labels + [v for v in cord if v not in labels]
    if label_values is not None:
        unknown = sorted(set(labels) - {int(v) for v in label_values if int(v) > 0})
        if unknown:
            raise SpineautoError(f"{path}: largest_component_labels {unknown} are not labels of the model "
                                 f"({sorted(int(v) for v in label_values if int(v) > 0)}); rerun `spineauto find_best_configuration` or delete it")
    return data
