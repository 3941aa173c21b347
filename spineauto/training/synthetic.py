"""Whole-neck context for a cord network: training patches drawn from phantom label maps of a whole
neck, each tissue at a random intensity (domain randomisation from label maps, as SynthSeg: Billot
et al., *Medical Image Analysis* 2023).

Our labelled crops are 25-60 mm wide; a neck is 130+ mm, with vertebral bodies and discs in front
of the cord, the oesophagus and trachea, vessels, muscle and fat, which a network trained on crops
marks as cord. :class:`NeckContext` replaces a share (``augmentation.whole_neck``) of each training
batch's samples with patches of whole-neck phantoms (:mod:`spineauto.datasets.phantoms`: cervical
and thoracic, 2-3x the field of view of a cord scan): the cord is the label, every other tissue is
background, and the intensity of every tissue is drawn anew per sample (uniform on [0, 1], with
its own texture), so no contrast order can be learnt from them, only shape and context. The
phantoms' tissue maps go through the plan's geometry (reorientation to the slice-first RAS layout,
the target in-plane spacing, nearest neighbour) once per process; a sample then costs a table look-up, a blur and
noise. The batchgenerators transforms of the plan follow as for real samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from spineauto.datasets.phantoms import CSF, GM, LESION, TISSUES, WM, PhantomSpec, phantom_tissues
from spineauto.planning.plans import ConfigurationPlan, Plans

POOL = 8  # phantom tissue maps per process (drawn once, from a fixed seed: the same maps in every worker and run)
POOL_SEED = 19
FOV_SCALES = (2.0, 3.0)  # in-plane field of view of the phantoms, times a cord scan's
CORD_TISSUES = (WM, GM, LESION)  # the phantom tissues of the cord label
MAX_TUBES = 6  # extra round structures per sample (vessels, oesophagus, trachea), each with its own random intensity
TUBE_RADIUS_MM = (1.5, 9.0)
CORTEX_MM = (0.7, 2.5)  # thickness of a vertebral body's cortical shell (augmentation.vertebral_cortex), partial volume included


def neck_context(plans: Plans, plan: ConfigurationPlan) -> "NeckContext | None":
    """The whole-neck context of a configuration: a segmentation of one channel with a cord label
    (``plan.localise``) and ``augmentation.whole_neck`` > 0; None otherwise."""
    share = float(plan.augmentation.whole_neck)
    if share <= 0 or plan.localise is None or plan.task != "segmentation" or len(plans.channel_names) != 1:
        return None
    return NeckContext(plan, plans.cord_value(plan), share, float(plan.augmentation.vertebral_cortex))


@dataclass
class NeckContext:
    plan: ConfigurationPlan
    cord_value: int
    share: float
    cortex: float = 0.0  # share of the patches whose vertebral bodies get a cortical shell
    _maps: list = field(default_factory=list, repr=False)  # (S, H, W) int8 tissue codes in the plan's layout
    _cord: list = field(default_factory=list, repr=False)  # (n, 3) cord voxels of each map

    def __getstate__(self):  # workers build their own pool
        return {**self.__dict__, "_maps": [], "_cord": []}

    def maps(self) -> list[np.ndarray]:
        if not self._maps:
            rng = np.random.default_rng(POOL_SEED)
            for i in range(POOL):
                spec = PhantomSpec("T2w", "axial", ("cervical", "thoracic")[i % 2], 0, int(rng.integers(2 ** 31 - 1)),
                                   fov_scale=float(rng.uniform(*FOV_SCALES)))
                self._maps.append(self._layout(*phantom_tissues(spec)))
                self._cord.append(np.argwhere(np.isin(self._maps[-1], CORD_TISSUES)))
        return self._maps

    def _layout(self, codes: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """A tissue map (X, Y, Z) -> (S, H, W) in the plan's slice-first RAS layout at its in-plane target
        spacing (nearest neighbour: tissue codes), as preprocessing puts a scan."""
        from spineauto.io.geometry import CaseGeometry
        from spineauto.preprocessing.preprocess import slice_axis_for

        geom = CaseGeometry(np.asarray(affine).tolist(), list(codes.shape), slice_axis_for(self.plan, affine, codes.shape))
        layout = geom.to_layout(codes.astype(np.int8)[None])[0]
        zoom = [1.0] + [sp / t for sp, t in zip(geom.spacing[1:], self.plan.target_spacing)]
        return ndimage.zoom(layout, zoom, order=0, grid_mode=True, mode="grid-constant")

    def _with_tubes(self, plane: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``plane`` with 0-MAX_TUBES more round structures (the cross-sections of vessels, the oesophagus, the
        trachea, a nerve root), some with a wall, each its own tissue code, none touching the spinal canal:
        round and bright is not enough to be cord."""
        from spineauto.datasets.phantoms import ARCH

        out = plane.copy()
        canal = ndimage.binary_dilation(np.isin(plane, (CSF, ARCH, *CORD_TISSUES)), iterations=3)
        yy, xx = np.mgrid[:plane.shape[0], :plane.shape[1]]
        body = np.argwhere(plane > 0)
        for j in range(int(rng.integers(MAX_TUBES + 1))):
            cy, cx = body[int(rng.integers(len(body)))]
            r = rng.uniform(*TUBE_RADIUS_MM) / float(self.plan.target_spacing[0])
            wall = rng.uniform(0, 0.5) * r if rng.uniform() < 0.5 else 0.0
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (r + wall) ** 2
            if (disc & canal).any():
                continue
            out[disc] = len(TISSUES) + 2 * j + 1
            out[(yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2] = len(TISSUES) + 2 * j
        return out

    def _with_cortex(self, plane: np.ndarray, mean: np.ndarray, texture: np.ndarray, rng: np.random.Generator):
        """``plane`` with a shell of random thickness (CORTEX_MM) around each vertebral body, a tissue of its own
        with its own random intensity: the body becomes a round structure in a ring in front of the canal, as a
        real vertebral body or dens in its dark cortex is, and the label says it is not the cord."""
        from spineauto.datasets.phantoms import BONE

        bone = plane == BONE
        px = max(1, int(round(rng.uniform(*CORTEX_MM) / float(self.plan.target_spacing[0]))))
        out = plane.copy()
        out[bone & ~ndimage.binary_erosion(bone, iterations=px)] = len(mean)
        return out, np.append(mean, rng.uniform(0, 1)), np.append(texture, rng.uniform(0, 0.08))

    def mix(self, batch: dict, rng: np.random.Generator, n_foreground: int) -> dict:
        """``batch`` ({"data": (B, 1, h, w), "seg": (B, 1, h, w)}) with each sample replaced by a whole-neck
        patch with probability ``share``; the last ``n_foreground`` samples' patches are centred on the cord."""
        b = batch["data"].shape[0]
        for i in range(b):
            if rng.uniform() < self.share:
                batch["data"][i], batch["seg"][i] = self.patch(rng, batch["data"].shape[2:], i >= b - n_foreground)
        return batch

    def patch(self, rng: np.random.Generator, size, on_cord: bool) -> tuple[np.ndarray, np.ndarray]:
        """One (1, h, w) image and label patch of a random pool map, tissues at random intensities."""
        k = int(rng.integers(POOL))
        codes = self.maps()[k]
        h, w = int(size[0]), int(size[1])
        if on_cord:
            where = self._cord[k]
            s, cy, cx = where[int(rng.integers(len(where)))]
            y0, x0 = _around(rng, cy, cx, h, w)
        else:
            s = int(rng.integers(codes.shape[0]))
            y0, x0 = int(rng.integers(-h // 4, max(1, codes.shape[1] - 3 * h // 4))), int(rng.integers(-w // 4, max(1, codes.shape[2] - 3 * w // 4)))
        plane = self._with_tubes(codes[s], rng)
        n = len(TISSUES) + 2 * MAX_TUBES
        mean, texture = rng.uniform(0, 1, n), rng.uniform(0, 0.08, n)
        mean[0] = rng.uniform(0, 0.1)  # air: dark on every MRI contrast
        if self.cortex > 0 and rng.uniform() < self.cortex:
            plane, mean, texture = self._with_cortex(plane, mean, texture, rng)
        img = _render(plane, mean, texture, rng)
        return _window(img, np.where(np.isin(plane, CORD_TISSUES), self.cord_value, 0), y0, x0, h, w)


def _around(rng: np.random.Generator, cy, cx, h: int, w: int) -> tuple[int, int]:
    """The corner of an (h, w) view holding (cy, cx), moved by up to a quarter of the view."""
    return int(cy) - h // 2 + int(rng.integers(-h // 4, h // 4 + 1)), int(cx) - w // 2 + int(rng.integers(-w // 4, w // 4 + 1))


def _render(plane: np.ndarray, mean: np.ndarray, texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A tissue map at the given intensities: texture, partial volume (a blur), noise; z-scored over the whole
    slice (the plan's normalisation, as a whole-neck scan gets it)."""
    img = mean[plane] + texture[plane] * rng.standard_normal(plane.shape)
    img = ndimage.gaussian_filter(img, rng.uniform(0.3, 1.2))  # partial volume
    img += rng.uniform(0.005, 0.04) * rng.standard_normal(plane.shape)
    return (img - img.mean()) / max(float(img.std()), 1e-6)


def _window(img: np.ndarray, label: np.ndarray, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The (1, h, w) view at (y0, x0) of a slice and its label; beyond the slice: air (its 1st percentile), label 0."""
    window = np.full((h, w), float(np.percentile(img, 1)), np.float32)
    out = np.zeros((h, w), np.int16)
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + h, img.shape[0]), min(x0 + w, img.shape[1])
    if ye > ys and xe > xs:
        window[ys - y0:ye - y0, xs - x0:xe - x0] = img[ys:ye, xs:xe]
        out[ys - y0:ye - y0, xs - x0:xe - x0] = label[ys:ye, xs:xe]
    return window[None], out[None]
