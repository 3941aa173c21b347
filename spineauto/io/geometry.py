"""Geometry as a first-class object: canonical orientation and the slice-first layout.

Every case is reoriented to RAS (closest canonical, no interpolation: axis permutations and flips
only) and then transposed so that the axis the 2D slices are cut across comes first:
``(C, S, H, W)``. The in-plane axes keep their RAS order, so all axial slices of a dataset look the
same way whatever the scanner's storage order, and likewise all sagittal slices.
:class:`CaseGeometry` records what is needed to put a prediction back into the input's exact
voxel grid (shape, affine, orientation).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

PLANE_OF_AXIS = {0: "sagittal", 1: "coronal", 2: "axial"}  # RAS axis normal to the plane
AXIS_OF_PLANE = {v: k for k, v in PLANE_OF_AXIS.items()}
ANISOTROPY_RATIO = 1.5  # a spacing this many times the next largest marks the through-plane axis
THIN_SLAB_RATIO = 0.8  # near-isotropic: an axis with this fraction of the next-fewest voxels is a slab


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def to_ras_ornt(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform from the array's axes to RAS."""
    return nib.orientations.io_orientation(np.asarray(affine))


def orientation_code(affine: np.ndarray) -> str:
    return "".join(nib.aff2axcodes(np.asarray(affine)))


def choose_slice_axis(affine: np.ndarray, shape: tuple[int, ...], isotropic_plane: str | None = "sagittal") -> tuple[int | None, str]:
    """Pick the RAS axis to cut 2D slices across, for one case, with the reason.

    1. Anisotropic voxels: the axis with the largest spacing (the acquisition's through-plane axis),
       when it is at least ``ANISOTROPY_RATIO`` times the next largest.
    2. Near-isotropic voxels: a thin slab's short axis (fewest voxels, when clearly fewer).
    3. Otherwise ``isotropic_plane`` (planned per dataset: the majority plane of the cases decided by
       rules 1-2), so the choice never depends on the order the scanner stored the axes in; ``None``
       returns ``None`` for the caller to decide.
    """
    ornt = to_ras_ornt(affine)
    sp = np.empty(3)
    n = np.empty(3)
    for i in range(3):
        sp[int(ornt[i, 0])] = voxel_sizes(affine)[i]
        n[int(ornt[i, 0])] = shape[i]
    order = np.argsort(sp)[::-1]
    if sp[order[0]] >= ANISOTROPY_RATIO * sp[order[1]]:
        axis = int(order[0])
        return axis, f"largest spacing {sp[axis]:.3g} mm vs {sp[order[1]]:.3g} mm in-plane"
    by_count = np.argsort(n, kind="stable")
    if n[by_count[0]] <= THIN_SLAB_RATIO * n[by_count[1]]:
        axis = int(by_count[0])
        return axis, f"near-isotropic; thin slab of {int(n[axis])} voxels along it"
    if isotropic_plane is None:
        return None, "near-isotropic block; the dataset's isotropic plane"
    return AXIS_OF_PLANE[isotropic_plane], f"near-isotropic block; the dataset's isotropic plane ({isotropic_plane})"


@dataclass
class CaseGeometry:
    """Original grid of a case and how it maps to the stored slice-first layout."""

    affine: list[list[float]]
    shape: list[int]
    slice_axis: int
    bbox: list[list[int]] = field(default_factory=list)  # crop in the slice-first layout (pre-resampling)

    @property
    def plane(self) -> str:
        return PLANE_OF_AXIS[self.slice_axis]

    @property
    def ornt(self) -> np.ndarray:
        return to_ras_ornt(np.asarray(self.affine))

    @property
    def transpose(self) -> tuple[int, int, int]:
        rest = [a for a in range(3) if a != self.slice_axis]
        return (self.slice_axis, rest[0], rest[1])

    @property
    def spacing(self) -> list[float]:
        """Spacing in the slice-first layout (slice, row, column), mm."""
        ras = np.empty(3)
        for i, vs in enumerate(voxel_sizes(np.asarray(self.affine))):
            ras[int(self.ornt[i, 0])] = vs
        return [float(ras[a]) for a in self.transpose]

    @property
    def layout_shape(self) -> list[int]:
        ras = np.empty(3, dtype=int)
        for i, s in enumerate(self.shape):
            ras[int(self.ornt[i, 0])] = s
        return [int(ras[a]) for a in self.transpose]

    def to_layout(self, array: np.ndarray) -> np.ndarray:
        """(..., X, Y, Z) in the original voxel order -> (..., S, H, W) slice-first RAS."""
        lead = array.ndim - 3
        ras = _apply(array, self.ornt)
        return np.ascontiguousarray(ras.transpose(*range(lead), *(lead + a for a in self.transpose)))

    def from_layout(self, array: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_layout`."""
        lead = array.ndim - 3
        inv_t = np.argsort(self.transpose)
        ras = array.transpose(*range(lead), *(lead + int(a) for a in inv_t))
        return np.ascontiguousarray(_apply(ras, _inverse_ornt(self.ornt)))

    def to_dict(self) -> dict:
        return {"affine": self.affine, "shape": self.shape, "slice_axis": self.slice_axis, "bbox": self.bbox}

    @classmethod
    def from_dict(cls, d: dict) -> "CaseGeometry":
        return cls(affine=d["affine"], shape=list(d["shape"]), slice_axis=int(d["slice_axis"]), bbox=d.get("bbox", []))


def _apply(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Apply a 3-axis orientation transform to the last three axes of ``array``."""
    lead = array.ndim - 3
    full = np.concatenate([np.array([[i, 1] for i in range(lead)]).reshape(-1, 2),
                           np.column_stack([ornt[:, 0] + lead, ornt[:, 1]])]) if lead else ornt
    return nib.orientations.apply_orientation(array, full)


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    inv = np.zeros_like(ornt)
    for i, (axis, flip) in enumerate(ornt):
        inv[int(axis)] = (i, flip)
    return inv
