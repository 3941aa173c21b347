"""Training augmentation from the plan's :class:`AugmentationPlan`, with batchgenerators (numpy, 2D).

As nnU-Net (v1, 2D): a larger patch is sampled (so that rotation and scaling never bring the
image border in), ``SpatialTransform`` rotates/scales and center-crops it to the patch size, then
intensity transforms (noise, blur, brightness, contrast, low resolution, gamma) and mirroring.
Every random draw comes from numpy's global generator, which the data worker seeds per batch, so a
batch is a pure function of its key (reproducible resume, any number of workers).
"""
from __future__ import annotations

import numpy as np

from spineauto.planning.plans import AugmentationPlan


def initial_patch_size(patch_size: list[int], aug: AugmentationPlan) -> list[int]:
    """The patch to sample before rotation/scaling (nnunetv2's ``get_patch_size``)."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

    rot = np.deg2rad(aug.rotation_degrees)
    size = get_patch_size(patch_size, (-rot, rot), 0, 0, tuple(aug.scale_range)) if (rot > 0 or min(aug.scale_range) < 1) else np.array(patch_size)
    return [max(int(s), int(p)) for s, p in zip(size, patch_size)]


def build_transforms(patch_size: list[int], aug: AugmentationPlan, with_seg: bool):
    """A batchgenerators ``Compose`` working on ``{"data": (B,C,H,W), "seg": (B,1,H,W)}``."""
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
    return Compose(transforms)

