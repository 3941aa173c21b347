"""bench/bench_csa.py: its phantom truth, its CSA measures and the inter-contrast variation."""
from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_csa  # noqa: E402


def _disc(radius_px: float, shape=(60, 60, 5), spacing=(0.5, 0.5, 4.0)):
    x, y = np.meshgrid(np.arange(shape[0]) - 29.5, np.arange(shape[1]) - 29.5, indexing="ij")
    d = np.hypot(x, y)[..., None].repeat(shape[2], axis=2)
    return d, np.diag([*spacing, 1.0])


def test_one_anatomy_in_three_contrasts_shares_its_truth_and_the_truth_is_the_continuous_area(tmp_path):
    cases = bench_csa.render_subjects(tmp_path / "img", tmp_path / "ref", 1, seed=5)
    assert sorted(c["contrast"] for c in cases.values()) == sorted(bench_csa.CONTRASTS)
    refs = [nib.load(str(tmp_path / "ref" / f"{k}.nii.gz")) for k in cases]
    for r in refs[1:]:  # one grid, one cord
        np.testing.assert_array_equal(np.asanyarray(r.dataobj), np.asanyarray(refs[0].dataobj))
        np.testing.assert_array_equal(r.affine, refs[0].affine)
    images = [np.asanyarray(nib.load(str(tmp_path / "img" / f"{k}_0000.nii.gz")).dataobj) for k in cases]
    assert not np.allclose(images[0], images[1])  # the contrasts differ
    ref = np.asanyarray(refs[0].dataobj) > 0
    csa = bench_csa.mean_csa(ref, ref, refs[0].affine)
    assert csa == pytest.approx(next(iter(cases.values()))["continuous"], rel=0.01)


def test_csa_measures_on_a_known_disc():
    d, affine = _disc(8)
    ref = d <= 8
    assert bench_csa.mean_csa(ref, ref, affine) == pytest.approx(ref[..., 0].sum() * 0.25)
    small = d <= 6  # a mask 2 voxels inside the truth: its area, not the truth's
    assert bench_csa.mean_csa(small, ref, affine) == pytest.approx(small[..., 0].sum() * 0.25)
    # soft CSA of probabilities that are 0.5 on a one-voxel ring outside the mask (inside the 2-voxel region) and 0.9
    # farther out (outside it): the mask plus half the ring
    ring3 = (d > 6) & (d <= 7)
    p = small.astype(float) + 0.5 * ring3 + 0.9 * (d > 10)
    ring = ring3[..., 0].sum()
    assert bench_csa.mean_csa(p * bench_csa.soft_region(small, affine), ref, affine) == pytest.approx((small[..., 0].sum() + ring / 2) * 0.25)
    # the image's partial volume: a bright disc of radius 8 in a dark ring, found from a mask 2 voxels too small
    image = np.where(ref, 100.0, 20.0)
    area = bench_csa.mean_csa(bench_csa.image_partial_volume(image, small, affine), ref, affine)
    assert area == pytest.approx(ref[..., 0].sum() * 0.25, rel=0.02)


def test_inter_contrast_variation_is_the_sample_cv():
    assert bench_csa.cv([50.0, 50.0, 50.0]) == 0.0
    assert bench_csa.cv([40.0, 50.0, 60.0]) == pytest.approx(10.0 / 50.0)


def test_probes_change_only_the_csf_and_leave_the_table_as_it_was(tmp_path):
    """A probe is its contrast's phantom with the CSF's intensity changed: same cord, same grid; the ring of CSF
    around the cord turns darker than the cord (T2w) or brighter (T1w), the cord's inside keeps its signal."""
    from scipy import ndimage

    from spineauto.datasets import phantoms

    table_before = dict(phantoms._INTENSITY)
    cases = bench_csa.render_subjects(tmp_path / "img", tmp_path / "ref", 1, seed=5, probes=bench_csa.PROBES)
    assert phantoms._INTENSITY == table_before
    assert {c["contrast"] for c in cases.values()} == set(bench_csa.CONTRASTS) | set(bench_csa.PROBES)

    def load(kind, name):
        return np.asanyarray(nib.load(str(tmp_path / kind / f"csa5_0_{name}.nii.gz")).dataobj).astype(float)

    ref = load("ref", "T2w") > 0
    inside = ndimage.binary_erosion(ref, iterations=2)
    ring = ndimage.binary_dilation(ref, iterations=2) & ~ndimage.binary_dilation(ref, iterations=1)
    for probe, (contrast, _) in bench_csa.PROBES.items():
        np.testing.assert_array_equal(load("ref", probe) > 0, ref)
        base, changed = load("img", f"{contrast}_0000"), load("img", f"{probe}_0000")
        assert changed[inside].mean() == pytest.approx(base[inside].mean(), rel=0.02)
        cord_minus_ring = [img[inside].mean() - img[ring].mean() for img in (base, changed)]
        assert np.sign(cord_minus_ring[0]) != np.sign(cord_minus_ring[1])  # the CSF crossed the cord's intensity
