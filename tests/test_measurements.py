"""Cord and lesion measurements against analytic phantoms (spineauto/pipeline/measurements.py).

The cord phantom is an elliptic cylinder (semi-axes A x B perpendicular to its axis, true CSA
pi*A*B) tilted from S-I in the sagittal or coronal plane and cut by the axial planes z = +-HALF.
Those planes lie on slice boundaries for every voxel size used, so the true length 2*HALF/cos(tilt)
and volume CSA*length are representable even with 3 mm slices. Voxels are supersampled (sub-voxel
spacing <= 0.3 mm, an odd count per axis) and thresholded at half coverage.
"""
from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from spineauto.pipeline.measurements import measure_cord, measure_lesions

A, B, HALF = 4.5, 3.5, 12.0
AREA = math.pi * A * B
TILTS = [(0, "sagittal")] + [(t, p) for p in ("sagittal", "coronal") for t in (10, 20, 30)]
# voxel sizes along R, A, S, and the orientation the phantom is stored in ("acquired")
GRIDS = {"0.5iso": ((0.5, 0.5, 0.5), "PSR"), "1.0iso": ((1.0, 1.0, 1.0), "RAS"),
         "0.8x0.8x3 axial": ((0.8, 0.8, 3.0), "LAS"), "0.8x0.8x3 sagittal": ((3.0, 0.8, 0.8), "PSR")}
# sub-voxel R/A positions of the cord's centre (fractions of a voxel): an 8-point Fibonacci lattice
POSITIONS = [((k + 0.5) / 8, ((5 * k) % 8 + 0.5) / 8) for k in range(8)]


def _rotation(deg: float, plane: str) -> np.ndarray:
    """Columns: the cord's semi-axis A direction, semi-axis B direction, axis direction (RAS)."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    if plane == "sagittal":  # about R: the axis leans anterior
        return np.array([[1, 0, 0], [0, c, s], [0, -s, c]], float)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], float)  # coronal, about A: leans right


def _rasterise(inside, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Voxels more than half inside ``inside(x, y, z)`` (world mm), sampled every <= 0.3 mm."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    index = []
    for axis, (n, z) in enumerate(zip(shape, zooms)):
        sub = max(3, math.ceil(z / 0.3)) | 1  # odd: a coverage of exactly one half cannot occur
        pos = (np.arange(n)[:, None] + (np.arange(sub) + 0.5) / sub - 0.5).astype(np.float32)  # (n, sub)
        index.append(pos.reshape([1] * 2 * axis + [n, sub] + [1] * (4 - 2 * axis)))
    x, y, z = (sum(float(affine[r, c]) * index[c] for c in range(3) if affine[r, c]) + float(affine[r, 3])
               for r in range(3))
    return inside(x, y, z).mean(axis=(1, 3, 5)) > 0.5


def _cord_inside(tilt: float, plane: str, centre=(0.0, 0.0)):
    rot = _rotation(tilt, plane) / [A, B, 1]  # scaled: u*u + v*v <= 1 inside the ellipse
    (ux, vx, _), (uy, vy, _), (uz, vz, _) = rot.tolist()  # plain floats keep float32 arrays float32

    def inside(x, y, z):
        x, y = x - centre[0], y - centre[1]
        u, v = ux * x + uy * y + uz * z, vx * x + vy * y + vz * z
        return (u * u + v * v <= 1) & (np.abs(z) <= HALF)
    return inside


def _cord_ras(zooms: tuple, tilt: float, plane: str, position=(0.0, 0.0)) -> nib.Nifti1Image:
    """The phantom on an RAS grid whose voxel edges lie on multiples of the voxel size."""
    reach = HALF * math.tan(math.radians(tilt)) + A + 2 * max(zooms)
    half_n = [math.ceil(reach / zooms[0]), math.ceil(reach / zooms[1]), math.ceil(HALF / zooms[2]) + 1]
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = [(0.5 - n) * z for n, z in zip(half_n, zooms)]
    centre = (position[0] * zooms[0], position[1] * zooms[1])
    mask = _rasterise(_cord_inside(tilt, plane, centre), affine, tuple(2 * n for n in half_n))
    return nib.Nifti1Image(mask.astype(np.uint8), affine)


def _reorient(img: nib.Nifti1Image, code: str) -> tuple[np.ndarray, np.ndarray]:
    out = img.as_reoriented(nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                            nib.orientations.axcodes2ornt(tuple(code))))
    assert "".join(nib.aff2axcodes(out.affine)) == code
    return np.asarray(out.dataobj), out.affine


def _check_method(result: dict, tilt: float, angle_tol: float = 1.0) -> float:
    """Checks against the mask's own content; returns the mean CSA's error against pi*A*B.

    The binary mask's mean perpendicular area is its volume / the true length: the reference
    for the method alone (half-coverage thresholding itself moves the area by a few % at 1-3 mm).
    """
    length = 2 * HALF / math.cos(math.radians(tilt))
    own_area = result["volume_mm3"] / length
    csa = result["csa_mm2"]
    assert result["length_mm"] == pytest.approx(length, rel=0.03)
    assert csa["mean"] == pytest.approx(own_area, rel=0.03)
    assert csa["min"] <= csa["median"] <= csa["max"]
    angles = np.array([s["angle_deg"] for s in csa["per_slice"]])
    assert np.median(angles) == pytest.approx(tilt, abs=angle_tol)
    if tilt >= 20:  # the uncorrected axial area is 1/cos(tilt) too large: +6.4% at 20 degrees, +15.5% at 30
        axial = np.mean([s["csa_mm2"] / math.cos(math.radians(s["angle_deg"])) for s in csa["per_slice"]])
        assert axial / own_area - 1 > 0.75 * (1 / math.cos(math.radians(tilt)) - 1)
    return csa["mean"] / AREA - 1


def _numbers(result: dict) -> list[float]:
    csa = result["csa_mm2"]
    return [result["volume_mm3"], result["length_mm"], *(csa[k] for k in ("mean", "median", "min", "max")),
            *(v for s in csa["per_slice"] for v in s.values())]


@pytest.mark.parametrize("tilt,plane", TILTS)
@pytest.mark.parametrize("grid", list(GRIDS))
def test_cord_phantom(grid, tilt, plane):
    """Every sub-voxel position: method checks; their mean: CSA and volume within 3% of the truth;
    the first position stored RAS, LAS and PSR: identical results."""
    zooms, code = GRIDS[grid]
    errors, volumes = [], []
    for k, position in enumerate(POSITIONS):
        img = _cord_ras(zooms, tilt, plane, position)
        result = measure_cord(*_reorient(img, code))
        # 3 mm R-L voxels resolve a 24 mm cord's R-L slope to ~2.5 degrees (cos error < 1.5% at 30)
        errors.append(_check_method(result, tilt, 1.0 if max(zooms[:2]) <= 1 else 3.0))
        volumes.append(result["volume_mm3"])
        if k == 0:
            for other in {"RAS", "LAS", "PSR"} - {code}:
                np.testing.assert_allclose(_numbers(measure_cord(*_reorient(img, other))), _numbers(result))
    length = 2 * HALF / math.cos(math.radians(tilt))
    assert abs(np.mean(errors)) < 0.03
    assert np.mean(volumes) == pytest.approx(AREA * length, rel=0.03)


@pytest.mark.parametrize("tilt,plane", [(20, "sagittal"), (30, "coronal")])
def test_cord_oblique_affine_is_resampled(tilt, plane):
    """A 0.5 mm grid rotated 25 degrees about a skew axis (resampled to RAS by the code). At 1 mm the
    resampling's trilinear + 0.5 threshold erodes the cord by up to 3% more (see the module doc)."""
    axis = np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5])
    rot = nib.quaternions.angle_axis2mat(math.radians(25), axis) * 0.5
    shape = (68, 68, 68)  # covers the phantom (radius < 16.6 mm) at any rotation
    affine = np.eye(4)
    affine[:3, :3] = rot
    affine[:3, 3] = -rot @ (np.array(shape) - 1) / 2
    assert nib.orientations.aff2axcodes(affine) == ("R", "A", "S")  # closest codes hide the obliquity
    mask = _rasterise(_cord_inside(tilt, plane), affine, shape)
    assert abs(_check_method(measure_cord(mask, affine), tilt)) < 0.03


def test_empty_cord_and_no_lesions():
    empty = np.zeros((8, 9, 10), np.uint8)
    assert measure_cord(empty, np.diag([0.5, 0.5, 3.0, 1.0])) == {
        "volume_mm3": 0.0, "length_mm": 0.0, "slices": 0, "gap_slices": 0, "si_extent_mm": 0.0,
        "csa_mm2": {"mean": None, "median": None, "min": None, "max": None, "per_slice": []}, "unmeasurable": "empty mask"}
    assert measure_lesions(empty, np.eye(4)) == {"count": 0, "total_volume_mm3": 0.0, "items": []}


def test_short_and_broken_cords_stay_finite():
    """One slice, two slices, and a cord missing a slice: plain finite JSON, length over cord slices."""
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    data = np.zeros((10, 10, 8), np.uint8)
    data[3:6, 3:6, 2] = 1
    one = measure_cord(data, affine)
    assert one["length_mm"] == 2.0 and one["csa_mm2"]["per_slice"][0]["angle_deg"] == 0.0
    data[4:7, 3:6, 3] = 1  # second slice shifted 0.5 mm along R: tangent (0.5, 0, 2)
    two = measure_cord(data, affine)
    assert two["csa_mm2"]["per_slice"][1]["angle_deg"] == pytest.approx(math.degrees(math.atan(0.25)))
    data[3:6, 3:6, 4:8] = 1
    data[:, :, 5] = 0
    broken = measure_cord(data, affine)
    assert len(broken["csa_mm2"]["per_slice"]) == 5 and broken["length_mm"] == pytest.approx(10.0, rel=0.05)
    assert (broken["slices"], broken["gap_slices"], broken["si_extent_mm"]) == (5, 1, 12.0)
    json.dumps(broken, allow_nan=False)
    with pytest.raises(ValueError):
        measure_cord(data[..., None], affine)


def test_tiny_mask_on_an_oblique_grid_is_unmeasurable_not_an_error():
    """One voxel of a rotated grid vanishes under the RAS resampling's 0.5 threshold: "no measurable
    cord" (zeros, None statistics, the reason), not an IndexError that fails the case."""
    affine = np.eye(4)
    affine[:3, :3] = nib.quaternions.angle_axis2mat(math.radians(30), [1.0, 1.0, 0.0]) @ np.diag([1.0, 1.0, 3.0])
    affine[:3, 3] = -affine[:3, :3] @ [4, 4, 4]  # its centre on a corner of the RAS grid: every sample < 0.5
    data = np.zeros((9, 9, 9), np.uint8)
    data[4, 4, 4] = 1
    result = measure_cord(data, affine)
    assert result["volume_mm3"] == pytest.approx(3.0) and result["slices"] == 0 and result["csa_mm2"]["median"] is None
    assert "none left on an RAS grid" in result["unmeasurable"]
    json.dumps(result, allow_nan=False)


def test_lesion_blobs_sagittal():
    """An ellipsoid (3 x 2.5 x 6 mm semi-axes, long along S) and a sphere (r 4 mm) at 0.5 mm, stored
    PSR. Tolerance 10% (and, for extents, the voxel-level bound): at half-coverage thresholding a
    pole can lose its partial slab (craniocaudal: -1 voxel at most) and the caliper diameter of the
    voxel squares exceeds a round outline by less than a voxel diagonal; over 12 sub-voxel placements
    volumes were within 2.5%, lengths -6.2..0%, in-plane extents +0.7..+7.5%."""
    affine = np.diag([0.5, 0.5, 0.5, 1.0])
    affine[:3, 3] = [-15, -15, -20]
    blobs = [((-6, 0, -8), (3.0, 2.5, 6.0)), ((6, 2, 8), (4.0, 4.0, 4.0))]
    inside = lambda x, y, z: sum(((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1
                                 for c, r in blobs) > 0
    img = nib.Nifti1Image(_rasterise(inside, affine, (60, 60, 80)).astype(np.uint8), affine)
    data, psr_affine = _reorient(img, "PSR")
    result = measure_lesions(data, psr_affine)
    assert result["count"] == 2
    items = sorted(result["items"], key=lambda i: i["slices"][0])  # PSR: axis 1 runs I -> S
    for item, (centre, radii) in zip(items, blobs):
        assert item["volume_mm3"] == pytest.approx(4 / 3 * math.pi * np.prod(radii), rel=0.10)
        length, width = item["craniocaudal_length_mm"], item["max_inplane_extent_mm"]
        assert length == pytest.approx(2 * radii[2], rel=0.10) and -0.5 <= length - 2 * radii[2] <= 1e-9
        assert width == pytest.approx(2 * max(radii[:2]), rel=0.10) and 0 <= width - 2 * max(radii[:2]) < 0.5 * math.sqrt(2)
        first, last = item["slices"]
        assert (last - first + 1) * 0.5 == pytest.approx(length)
        assert first < (centre[2] + 20) / 0.5 < last  # the centre's S index lies between them
    assert result["total_volume_mm3"] == pytest.approx(sum(i["volume_mm3"] for i in items))


def test_lesion_box_exact_and_26_connectivity():
    """Axial LAS 0.8 x 0.8 x 3 mm: a 5 x 3 x 4 voxel box, and two voxels touching at a corner only."""
    affine = np.diag([-0.8, 0.8, 3.0, 1.0])
    data = np.zeros((20, 20, 12), np.uint8)
    data[2:7, 4:7, 3:7] = 1
    data[12, 12, 8] = data[13, 13, 9] = 1  # one lesion with 26-connectivity, two with 6
    result = measure_lesions(data, affine)
    assert result["count"] == 2
    box, pair = result["items"]
    assert box["volume_mm3"] == pytest.approx(5 * 3 * 4 * 0.8 * 0.8 * 3.0)
    assert box["craniocaudal_length_mm"] == pytest.approx(12.0)
    assert box["max_inplane_extent_mm"] == pytest.approx(math.hypot(4.0, 2.4))
    assert box["slices"] == [3, 6]
    assert pair["slices"] == [8, 9] and pair["craniocaudal_length_mm"] == pytest.approx(6.0)
    assert pair["max_inplane_extent_mm"] == pytest.approx(0.8 * math.sqrt(2))
