"""Training augmentation from the plan's :class:`AugmentationPlan`, with batchgenerators (numpy, 2D).

As nnU-Net (v1, 2D): a larger patch is sampled (so that rotation and scaling never bring the
image border in), ``SpatialTransform`` rotates/scales and center-crops it to the patch size, then
intensity transforms (segmentation only: random intensity curves, contrast inversion, bias
fields and, for a cord model, curves that redraw the cord's contrast to its surround; then noise,
blur, brightness, contrast, low resolution, gamma) and mirroring.
Every random draw comes from numpy's global generator, which the data worker seeds per batch, so a
batch is a pure function of its key (reproducible resume, any number of workers).
"""
from __future__ import annotations

import numpy as np

from spineauto.planning.plans import AugmentationPlan
from spineauto.training.transforms import build_extra_transforms


def initial_patch_size(patch_size: list[int], aug: AugmentationPlan) -> list[int]:
    """The patch to sample before rotation/scaling (nnunetv2's ``get_patch_size``)."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

    rot = np.deg2rad(aug.rotation_degrees)
    size = get_patch_size(patch_size, (-rot, rot), 0, 0, tuple(aug.scale_range)) if (rot > 0 or min(aug.scale_range) < 1) else np.array(patch_size)
    return [max(int(s), int(p)) for s, p in zip(size, patch_size)]


def _restandardise(y: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``y`` shifted and scaled to ``like``'s mean and standard deviation (the plan's normalisation)."""
    sd = float(y.std())
    return (y - y.mean()) / (sd if sd > 1e-8 else 1.0) * float(like.std()) + float(like.mean())


def _unit_range(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, (0.5, 99.5))
    return np.clip((x - lo) / max(float(hi - lo), 1e-8), 0.0, 1.0)


def random_intensity_curve(x: np.ndarray, invert: bool, monotone: bool = True) -> np.ndarray:
    """``x`` through a random smooth curve on its 0.5-99.5 percentile range. Monotone: the cubic Bezier
    intensity mapping of Models Genesis (Zhou et al., Medical Image Analysis 2021), inverted when
    ``invert`` (dark cord in bright CSF becomes bright cord in dark CSF). Not monotone: a shape-
    preserving cubic through 3-6 random knots, so tissues can change their order (T2w: CSF > cord >
    fat and muscle; T1w: fat > cord > CSF), which no monotone curve can do. Mean and spread kept."""
    u = _unit_range(x)
    if monotone:
        p1, p2 = np.random.uniform(0, 1, 2), np.random.uniform(0, 1, 2)
        t = np.linspace(0.0, 1.0, 256)[:, None]
        curve = (3 * (1 - t) ** 2 * t) * p1 + (3 * (1 - t) * t**2) * p2 + t**3  # end points (0, 0) and (1, 1)
        order = np.argsort(curve[:, 0])
        y = np.interp(u, curve[order, 0], curve[order, 1])
        y = 1.0 - y if invert else y
    else:
        from scipy.interpolate import PchipInterpolator

        knots = np.random.randint(3, 7)
        y = PchipInterpolator(np.linspace(0.0, 1.0, knots), np.random.uniform(0, 1, knots))(u)
    return _restandardise(y, x)


def random_bias_field(x: np.ndarray, max_coefficient: float = 0.5, order: int = 3) -> np.ndarray:
    """``x`` times a smooth field exp(polynomial of degree ``order``), coefficients U(-c, c) as
    TorchIO's RandomBiasField (after Van Leemput et al., IEEE TMI 1999). Mean and spread kept."""
    h, w = x.shape[-2:]
    u, v = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    log_field = sum(np.random.uniform(-max_coefficient, max_coefficient) * u**i * v**j
                    for i in range(order + 1) for j in range(order + 1 - i))
    lo = float(x.min())
    return _restandardise((x - lo) * np.exp(log_field), x)


def cord_contrast_curve(x: np.ndarray, cord: np.ndarray) -> np.ndarray | None:
    """``x`` through a random shape-preserving cubic whose knots are the cord's and its surround's median
    intensities (the surround: 1-3 voxels outside ``cord``, mostly CSF), sent to random levels at least
    CORD_CONTRAST_GAP apart, cord brighter or darker alike; the darkest and brightest intensities go to random
    levels too. A function of intensity alone, so no edge is drawn where the image has none: the cord's own
    boundary stays where it was, its polarity and contrast to the CSF drawn anew. None when there is no cord
    in view or no contrast to the surround. Mean and spread kept."""
    from scipy import ndimage
    from scipy.interpolate import PchipInterpolator

    if cord.sum() < 4:
        return None
    ring = ndimage.binary_dilation(cord, iterations=3) & ~ndimage.binary_dilation(cord, iterations=1)
    if not ring.any():
        return None
    u = _unit_range(x)
    uc, ur = (float(np.median(u[m])) for m in (cord, ring))
    if abs(uc - ur) < 0.05:
        return None
    a = np.random.uniform(0, 1)
    b = np.random.uniform(0, 1 - CORD_CONTRAST_GAP)
    b = b + CORD_CONTRAST_GAP if b >= a - CORD_CONTRAST_GAP else b  # |a - b| >= the gap, either order
    knots = [(uc, a), (ur, b)]
    ends = [(e, np.random.uniform(0, 1)) for e in (0.0, 1.0)]  # drawn always: the stream does not depend on the image
    knots += [k for k in ends if min(abs(k[0] - uc), abs(k[0] - ur)) > 0.1]  # the darkest and brightest tissues, where not the cord's or CSF's
    knots.sort()
    xs = [k for k, _ in knots]
    y = PchipInterpolator(xs, [v for _, v in knots])(np.clip(u, xs[0], xs[-1]))  # flat beyond the outer knots
    return _restandardise(y, x)


CORD_CONTRAST_GAP = 0.25  # the least difference between the cord's and its surround's new levels (on [0, 1])


class ContrastRemapTransform:
    """Per sample and channel: a random bias field (``p_bias``), then a curve: of a cord model (``cord_value``)
    with probability ``p_cord`` the cord-contrast curve (:func:`cord_contrast_curve`), otherwise with
    probability ``p_curve`` a random intensity curve (a share ``p_non_monotone`` of them not monotone, and
    of the monotone ones a share ``p_invert`` inverted), so that a contrast, coil or site the training
    cases lack looks like one they have. Numpy's global generator (seeded per batch)."""

    def __init__(self, p_curve: float, p_invert: float, p_bias: float, p_non_monotone: float = 0.0,
                 p_cord: float = 0.0, cord_value: int | None = None):
        self.p_curve, self.p_invert, self.p_bias, self.p_non_monotone = p_curve, p_invert, p_bias, p_non_monotone
        self.p_cord, self.cord_value = (p_cord, cord_value) if cord_value is not None else (0.0, None)

    def __call__(self, **batch):
        data = batch["data"]
        for b in range(data.shape[0]):
            for c in range(data.shape[1]):
                x = data[b, c]
                if np.random.uniform() < self.p_bias:
                    x = random_bias_field(x)
                y = None
                if self.p_cord and np.random.uniform() < self.p_cord:  # no draw when off: same stream as before
                    y = cord_contrast_curve(x, batch["seg"][b, 0] == self.cord_value)
                if y is not None:
                    x = y
                elif np.random.uniform() < self.p_curve:
                    monotone = self.p_non_monotone == 0 or np.random.uniform() >= self.p_non_monotone  # no draw when off: same stream as before
                    x = random_intensity_curve(x, invert=monotone and np.random.uniform() < self.p_invert, monotone=monotone)
                data[b, c] = x
        return batch


def build_transforms(patch_size: list[int], aug: AugmentationPlan, with_seg: bool, remap_contrast: bool = True,
                     cord_value: int | None = None):
    """A batchgenerators ``Compose`` working on ``{"data": (B,C,H,W), "seg": (B,1,H,W)}``.

    ``remap_contrast``: the contrast remapping (intensity curves, inversion, bias fields); off for
    classification heads, which may have to tell contrasts apart. ``cord_value``: the cord label of a
    cord model (for ``augmentation.cord_contrast``)."""
    from batchgenerators.transforms.abstract_transforms import Compose
    from batchgenerators.transforms.color_transforms import (BrightnessMultiplicativeTransform,
                                                             ContrastAugmentationTransform, GammaTransform)
    from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
    from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
    from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

    p = aug.probability
    rot = np.deg2rad(aug.rotation_degrees)
    transforms = [
        SpatialTransform(
            patch_size, patch_center_dist_from_border=None, do_elastic_deform=aug.elastic, alpha=(0.0, 200.0), sigma=(9.0, 13.0),
            do_rotation=rot > 0, angle_x=(-rot, rot), angle_y=(0, 0), angle_z=(0, 0),
            do_scale=tuple(aug.scale_range) != (1.0, 1.0), scale=tuple(aug.scale_range),
            border_mode_data="constant", border_cval_data=0, order_data=3, border_mode_seg="constant", border_cval_seg=0,
            order_seg=1, random_crop=False, p_el_per_sample=p, p_scale_per_sample=p, p_rot_per_sample=p,
            independent_scale_for_each_axis=False),
    ]
    if remap_contrast and (aug.intensity_curves > 0 or aug.bias_field > 0 or aug.cord_contrast > 0):
        transforms.append(ContrastRemapTransform(aug.intensity_curves, aug.inversion, aug.bias_field, aug.non_monotone,
                                                 aug.cord_contrast if with_seg else 0.0, cord_value))
    if aug.noise_variance > 0:
        transforms.append(GaussianNoiseTransform(noise_variance=(0, aug.noise_variance), p_per_sample=0.1))
    if max(aug.blur_sigma) > 0:
        transforms.append(GaussianBlurTransform(tuple(aug.blur_sigma), different_sigma_per_channel=True, p_per_sample=p, p_per_channel=0.5))
    if tuple(aug.brightness_range) != (1.0, 1.0):
        transforms.append(BrightnessMultiplicativeTransform(multiplier_range=tuple(aug.brightness_range), p_per_sample=0.15))
    if tuple(aug.contrast_range) != (1.0, 1.0):
        transforms.append(ContrastAugmentationTransform(contrast_range=tuple(aug.contrast_range), p_per_sample=0.15))
    if min(aug.lowres_range) < 1:
        transforms.append(SimulateLowResolutionTransform(zoom_range=tuple(aug.lowres_range), per_channel=True, p_per_channel=0.5,
                                                         order_downsample=0, order_upsample=3, p_per_sample=0.25))
    if tuple(aug.gamma_range) != (1.0, 1.0):
        transforms.append(GammaTransform(tuple(aug.gamma_range), invert_image=True, per_channel=True, retain_stats=True, p_per_sample=0.1))
        transforms.append(GammaTransform(tuple(aug.gamma_range), invert_image=False, per_channel=True, retain_stats=True, p_per_sample=0.3))
    if aug.mirror_axes:
        transforms.append(MirrorTransform(tuple(int(a) for a in aug.mirror_axes)))
    transforms += build_extra_transforms(aug.transforms)  # augmentation.transforms: registered or package.module:Name
    return Compose(transforms)

