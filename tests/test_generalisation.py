"""What the cord model's generalisation rests on: contrast remapping, the cord-component
postprocessing and the shifted phantoms of bench/bench_generalisation.py."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from spineauto.datasets.phantoms import PhantomSpec, render_phantom
from spineauto.inference.postprocessing import keep_cord_component, keep_largest_component, superior_axis
from spineauto.planning.plans import AugmentationPlan
from spineauto.training.augment import ContrastRemapTransform, build_transforms, random_bias_field, random_intensity_curve


def _ramp() -> np.ndarray:
    return np.linspace(-2, 2, 48, dtype=np.float32)[None, :].repeat(40, 0)


@pytest.mark.parametrize("seed", range(5))
def test_intensity_curve_keeps_order_or_inverts_it_and_keeps_the_statistics(seed):
    x = _ramp()
    np.random.seed(seed)
    same = random_intensity_curve(x, invert=False)
    np.random.seed(seed)
    inverted = random_intensity_curve(x, invert=True)
    assert spearmanr(x.ravel(), same.ravel())[0] > 0.99
    assert spearmanr(x.ravel(), inverted.ravel())[0] < -0.99
    for y in (same, inverted):
        assert y.mean() == pytest.approx(x.mean(), abs=1e-5) and y.std() == pytest.approx(x.std(), rel=1e-4)
    assert not np.allclose(same, x, atol=0.05)  # the curve changed the intensities


def test_bias_field_is_smooth_multiplicative_and_keeps_the_statistics():
    x = np.ones((40, 48), np.float32) + _ramp() * 0.01
    np.random.seed(3)
    y = random_bias_field(x)
    assert y.mean() == pytest.approx(x.mean(), abs=1e-5) and y.std() == pytest.approx(x.std(), rel=1e-4)
    assert np.abs(np.diff(y, axis=0)).max() < 0.2 * (y.max() - y.min())  # smooth: no jumps between neighbours


def test_contrast_remap_runs_per_sample_and_only_where_asked():
    batch = {"data": np.stack([_ramp()[None]] * 8).copy(), "seg": np.zeros((8, 1, 40, 48), np.int16)}
    np.random.seed(0)
    out = ContrastRemapTransform(p_curve=1.0, p_invert=0.5, p_bias=0.0)(**batch)
    signs = [np.sign(spearmanr(_ramp().ravel(), out["data"][b, 0].ravel())[0]) for b in range(8)]
    assert 0 < signs.count(-1.0) < 8  # some inverted, some not: drawn per sample
    names = lambda remap: [type(t).__name__ for t in build_transforms([40, 48], AugmentationPlan(), True, remap).transforms]  # noqa: E731
    assert "ContrastRemapTransform" in names(True) and "ContrastRemapTransform" not in names(False)
    off = AugmentationPlan(intensity_curves=0.0, bias_field=0.0)
    assert "ContrastRemapTransform" not in [type(t).__name__ for t in build_transforms([40, 48], off, True).transforms]


def _tube_and_blob(sagittal: bool) -> tuple[np.ndarray, np.ndarray]:
    """A thin tube through every level along S-I and a bigger blob on three levels; the affine
    puts S-I on the last voxel axis (axial stack) or on the second (sagittal stack)."""
    seg = np.zeros((40, 40, 20), np.uint8)
    seg[18:21, 18:21, :] = 1  # tube: 9 voxels x 20 levels = 180
    seg[2:10, 2:10, 5:8] = 1  # blob: 64 x 3 = 192, larger
    affine = np.diag([0.5, 0.5, 3.0, 1.0])
    if sagittal:  # the same voxels, S-I along array axis 1: move the tube's axis there
        seg = np.zeros((20, 40, 40), np.uint8)
        seg[8:11, :, 18:21] = 1  # tube: 3 x 40 levels x 3 = 360
        seg[2:7, 2:12, 2:14] = 1  # blob: 5 x 10 levels x 12 = 600
        affine = np.array([[3.0, 0, 0, 0], [0, 0, 0.5, 0], [0, 0.5, 0, 0], [0, 0, 0, 1]])
    return seg, affine


@pytest.mark.parametrize("sagittal", [False, True])
def test_cord_component_is_the_tube_where_the_largest_is_the_blob(sagittal):
    seg, affine = _tube_and_blob(sagittal)
    tube = np.zeros_like(seg)
    if sagittal:
        tube[8:11, :, 18:21] = 1
        assert superior_axis(affine) == 1
    else:
        tube[18:21, 18:21, :] = 1
        assert superior_axis(affine) == 2
    assert (keep_largest_component(seg, 1) != tube).any()  # the largest component is the blob
    np.testing.assert_array_equal(keep_cord_component(seg, 1, affine), tube)


def test_cord_component_leaves_other_labels_and_single_components_alone():
    seg, affine = _tube_and_blob(False)
    seg[30:32, 30:32, 0:2] = 2
    out = keep_cord_component(seg, 1, affine)
    assert (out == 2).sum() == 8 and (out == 1).sum() == 180
    np.testing.assert_array_equal(keep_cord_component(out, 1, affine), out)


def test_phantom_field_of_view_scale_shows_more_of_the_neck():
    base = render_phantom(PhantomSpec("T2w", "axial", "cervical", seed=7))
    wide = render_phantom(PhantomSpec("T2w", "axial", "cervical", seed=7, fov_scale=2.5))
    through = int(np.argmax(np.linalg.norm(base.image.affine[:3, :3], axis=0)))
    fov = lambda p: np.delete(np.array(p.image.shape) * np.linalg.norm(p.image.affine[:3, :3], axis=0), through)  # noqa: E731
    np.testing.assert_allclose(fov(wide), 2.5 * fov(base), rtol=0.02)
    assert (wide.tissues == 0).mean() > (base.tissues == 0).mean()  # air around the neck comes into view
    assert np.asarray(wide.label.dataobj).sum() > 0
    with pytest.raises(ValueError, match="fov_scale"):
        render_phantom(PhantomSpec("T2w", "axial", "cervical", fov_scale=9))
