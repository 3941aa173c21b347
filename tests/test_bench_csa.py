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


def test_label_conventions_compares_masks_on_the_levels_they_share_whatever_their_orientation(tmp_path, monkeypatch):
    """A sagittal reference (S-I along its second voxel axis) and an axial mask (S-I along its third, 2 mm slices)
    of vertical cords with known cross-sections, overlapping on part of their S-I range: the table holds the
    axial mask's area against the reference's on the shared range only; a mask sharing no level gets no row."""
    sag = np.zeros((20, 40, 20), np.uint8)  # x = R-L, y = S-I (1 mm), z = A-P
    sag[5:15, :, 5:13] = 1  # 10 x 8 mm = 80 mm² on every level, S from 0 to 39 mm ...
    sag[5:15, :10, 9:13] = 0  # ... but 40 mm² on levels S 0..9, outside the axial mask's range
    sag_affine = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)
    ax = np.zeros((30, 30, 10), np.uint8)  # 0.5 mm in-plane, 2 mm slices from S 20 to 38
    ax[5:25, 5:19, :] = 1  # 10 x 7 mm = 70 mm²
    ax_affine = np.diag([0.5, 0.5, 2.0, 1.0])
    ax_affine[2, 3] = 20.0
    far = ax.copy()
    far_affine = ax_affine.copy()
    far_affine[2, 3] = 100.0
    for name, data, affine in (("sag", sag, sag_affine), ("ax", ax, ax_affine), ("far", far, far_affine)):
        nib.save(nib.Nifti1Image(data, affine), str(tmp_path / f"{name}.nii.gz"))
    monkeypatch.setattr(bench_csa, "SHARED_DATA", tmp_path)
    monkeypatch.setattr(bench_csa, "REAL_CASES", {k: ("", f"{k}.nii.gz") for k in ("sag", "ax", "far")})
    rows = [line for line in bench_csa.label_conventions("sag").splitlines() if line.startswith("| ax") or line.startswith("| far")]
    assert len(rows) == 1, "a mask sharing no level with the reference gets no row"
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells == ["ax", "20 .. 38", "70.0", "80.0", "-12.5 %"]
