"""Synthetic spine MRI phantoms: small, fast (numpy/scipy only) and deterministic from a seed.

The anatomy lives in a physical frame (mm, RAS: x to the right, y anterior, z superior): a spinal
cord of elliptical cross-section with a grey-matter butterfly, following a gently curved centreline,
a CSF-filled canal around it, vertebral bodies and discs in front, a posterior arch behind, muscle,
subcutaneous fat and two bright vessel-like tubes. Optional lesions are small ellipsoids inside the
cord. A voxel grid with a real, slightly oblique affine (orientation, spacing and field of view
drawn per case like on a scanner) samples that frame; thick slices are averaged over sub-slices
(partial volume), then blurred, bias-modulated, given Rician noise and a random intensity scale.

Label values: 0 background, 1 cord, 2 lesion (lesion overrides cord).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from spineauto.datasets.raw_dataset import staged_dataset_dir, write_dataset_json
from spineauto.io.atomic import save_nifti

logger = logging.getLogger(__name__)

CONTRASTS = ("T1w", "T2w", "T2starw")
VIEWS = ("axial", "sagittal", "coronal")
LOCATIONS = ("cervical", "thoracic", "lumbar")
ANATOMIES = ("spine", "limb", "brain", "noise", "other")  # non-spine scans (no cord) for anatomy gates: "limb" (muscle,
# fat, a long bone), "brain" (a brain-like head), "noise" (no anatomy at all), "other": one of those three per subject
OTHER_KINDS = ("limb", "brain", "noise")
MAX_LESIONS = 3
MAX_VOXELS = 150_000

# Tissue codes of the tissue map (one per voxel centre).
TISSUES = {"background": 0, "muscle": 1, "fat": 2, "vessel": 3, "bone": 4, "disc": 5, "arch": 6,
           "csf": 7, "white_matter": 8, "grey_matter": 9, "lesion": 10}
BG, MUSCLE, FAT, VESSEL, BONE, DISC, ARCH, CSF, WM, GM, LESION = range(11)

# Mean signal per tissue code (order as TISSUES), before per-case jitter, bias, noise and scale.
_INTENSITY = {
    "T1w":     (0.0, 0.40, 0.95, 0.85, 0.60, 0.35, 0.30, 0.15, 0.72, 0.64, 0.35),
    "T2w":     (0.0, 0.22, 0.65, 0.90, 0.40, 0.75, 0.15, 1.00, 0.36, 0.44, 0.80),
    "T2starw": (0.0, 0.25, 0.45, 0.90, 0.25, 0.60, 0.10, 0.90, 0.35, 0.60, 0.82),
}

# Per location: cord semi-axes (LR, AP) mm, CSF thickness, vertebral block height, disc height,
# vertebral body semi-axes (LR, AP), sagittal curvature (mm^-1; < 0 lordosis), conus taper.
_LOCATION = {
    "cervical": dict(cord=(6.0, 4.0), csf=3.0, block=14.0, disc=5.0, body=(9.0, 7.5), curve=-0.0012, taper=False),
    "thoracic": dict(cord=(4.5, 3.5), csf=3.0, block=20.0, disc=5.0, body=(14.0, 12.0), curve=0.0010, taper=False),
    "lumbar": dict(cord=(4.0, 3.2), csf=4.0, block=26.0, disc=9.0, body=(21.0, 15.0), curve=-0.0012, taper=True),
}

# Voxel-axis orientation codes (nibabel aff2axcodes letters) per view; the thick axis is the one
# pointing along S/I (axial), L/R (sagittal) or A/P (coronal).
_ORIENTATIONS = {"axial": ("LAS", "RAS", "LPS"), "sagittal": ("PSR", "ASL", "RAS"), "coronal": ("LSA", "RSP", "RAS")}
_THROUGH = {"axial": "z", "sagittal": "x", "coronal": "y"}
_LETTER = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


@dataclass
class PhantomSpec:
    contrast: str   # "T1w" | "T2w" | "T2starw"
    view: str       # "axial" | "sagittal" | "coronal"
    location: str   # "cervical" | "thoracic" | "lumbar"
    lesions: int = 0
    seed: int = 0
    anatomy: str = "spine"
    subject_seed: int | None = None  # cases with the same subject_seed share their anatomy
    fov_scale: float = 1.0  # in-plane matrix (and field of view) times this: e.g. 2.5 shows the whole neck

    def validate(self) -> None:
        for value, allowed, what in ((self.contrast, CONTRASTS, "contrast"), (self.view, VIEWS, "view"),
                                     (self.location, LOCATIONS, "location"), (self.anatomy, ANATOMIES, "anatomy")):
            if value not in allowed:
                raise ValueError(f"PhantomSpec: unknown {what} {value!r}; choose one of {list(allowed)}")
        if not 1.0 <= float(self.fov_scale) <= 4.0:
            raise ValueError(f"PhantomSpec: fov_scale must be between 1 and 4, got {self.fov_scale}")
        if not 0 <= int(self.lesions) <= MAX_LESIONS:
            raise ValueError(f"PhantomSpec: lesions must be between 0 and {MAX_LESIONS}, got {self.lesions}")


@dataclass
class Phantom:
    image: nib.Nifti1Image   # float32
    label: nib.Nifti1Image   # uint8, same affine and shape
    tissues: np.ndarray      # uint8 tissue code (TISSUES) at each voxel centre


@dataclass
class _Anatomy:
    cord: tuple[float, float]
    cord_dy: float
    csf: tuple[float, float]
    block: float
    disc: float
    level_phase: float
    body: tuple[float, float]
    curve: float
    wander: tuple[float, float, float, float, float]  # amp x, amp y, wavelength, phase x, phase y
    taper: bool
    neck: tuple[float, float, float]  # body outline semi-axes (LR, AP) and centre y
    fat: float
    vessels: tuple[tuple[float, float, float], ...]  # (dx, dy, radius) relative to the centreline
    kind: str = "spine"  # or "limb", "brain", "noise"


@dataclass
class _Lesion:
    centre: np.ndarray  # local mm
    radii: np.ndarray


def _draw_anatomy(rng: np.random.Generator, location: str, kind: str = "spine") -> _Anatomy:
    p = _LOCATION[location]
    j = lambda: rng.uniform(0.9, 1.1)  # noqa: E731 - per-dimension jitter
    cord = (p["cord"][0] * j(), p["cord"][1] * j())
    csf = (cord[0] + p["csf"] * j() * 1.1, cord[1] + p["csf"] * j() * 0.9)
    body = (p["body"][0] * j(), p["body"][1] * j())
    block, disc = p["block"] * j(), p["disc"] * j()
    neck = (55.0 * j(), 50.0 * j(), 10.0) if location == "cervical" else (140.0 * j(), 95.0 * j(), 55.0)
    wander = (rng.uniform(0, 1.0), rng.uniform(0, 1.5), rng.uniform(150, 300), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi))
    body_front = csf[1] + 1.5 + 2 * body[1]
    vessels = tuple((side * rng.uniform(body[0] + 3, body[0] + 12), rng.uniform(0.5, 1.0) * body_front, rng.uniform(1.5, 3.0))
                    for side in (-1.0, 1.0))
    anatomy = _Anatomy(cord=cord, cord_dy=rng.uniform(-0.6, 0.6), csf=csf, block=block, disc=disc,
                       level_phase=rng.uniform(0, block + disc), body=body, curve=p["curve"] * j(), wander=wander,
                       taper=p["taper"], neck=neck, fat=rng.uniform(4.0, 9.0), vessels=vessels, kind=kind)
    if kind == "other":
        anatomy.kind = str(rng.choice(OTHER_KINDS))
    return anatomy


def _centreline(a: _Anatomy, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ax, ay, lam, px, py = a.wander
    return ax * np.sin(2 * np.pi * z / lam + px), a.curve * z**2 + ay * np.sin(2 * np.pi * z / lam + py)


def _cord_semi_axes(a: _Anatomy, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cord semi-axes along z; lumbar cords narrow towards the conus (inferior)."""
    f = np.clip(0.8 + 0.2 * z / 40.0, 0.6, 1.0) if a.taper else np.ones_like(z)
    return a.cord[0] * f, a.cord[1] * f


def _tissue_map(a: _Anatomy, pts: np.ndarray, lesions: Sequence[_Lesion] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Tissue code and normalised cord radius (< 1 inside the cord) at local points (3, N)."""
    if a.kind == "limb":
        return _limb_map(a, pts)
    if a.kind == "brain":
        return _brain_map(a, pts)
    if a.kind == "noise":
        return np.zeros(pts.shape[1], np.uint8), np.full(pts.shape[1], np.inf)
    x, y, z = pts
    xc, yc = _centreline(a, z)
    dx, dy = x - xc, y - yc
    codes = np.zeros(x.shape, np.uint8)
    outline = ((x / a.neck[0]) ** 2 + ((y - a.neck[2]) / a.neck[1]) ** 2)
    codes[outline <= 1] = FAT
    inner = ((x / (a.neck[0] - a.fat)) ** 2 + ((y - a.neck[2]) / (a.neck[1] - a.fat)) ** 2)
    codes[inner <= 1] = MUSCLE
    for vx, vy, r in a.vessels:
        codes[(dx - vx) ** 2 + (dy - vy) ** 2 <= r * r] = VESSEL
    level = np.mod(z - a.level_phase, a.block + a.disc)
    in_block = level < a.block
    body_dy = a.csf[1] + 1.5 + a.body[1]
    block_shape = np.abs(dx / a.body[0]) ** 2.5 + np.abs((dy - body_dy) / a.body[1]) ** 2.5 <= 1
    codes[block_shape & in_block] = BONE
    codes[block_shape & ~in_block] = DISC
    canal = (dx / a.csf[0]) ** 2 + (dy / a.csf[1]) ** 2
    ring = ((dx / (a.csf[0] + 3)) ** 2 + (dy / (a.csf[1] + 3)) ** 2 <= 1) & (canal > 1) & (dy < 0.3 * a.csf[1])
    spinous = (np.abs(dx) < 2.5) & (dy < -a.csf[1]) & (dy > -a.csf[1] - 22) & (level > 0.2 * a.block) & (level < 0.9 * a.block)
    codes[(ring & in_block) | spinous] = ARCH
    codes[canal <= 1] = CSF
    sa, sb = _cord_semi_axes(a, z)
    u, v = dx / sa, (dy - a.cord_dy) / sb
    rnorm = u**2 + v**2
    cord = rnorm <= 1
    codes[cord] = WM
    gm = ((np.abs(u) <= 0.55) & (np.abs(v) <= 0.16)) | (((np.abs(u) - 0.35) / 0.17) ** 2 + (v / 0.7) ** 2 <= 1)
    codes[cord & gm] = GM
    for les in lesions:
        codes[cord & _in_ellipsoid(pts, les)] = LESION
    return codes, rnorm


def _limb_map(a: _Anatomy, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A thigh-like cross-section: fat, muscle, one long bone (cortex and fatty marrow), a vessel; no cord."""
    x, y, _ = pts
    codes = np.zeros(x.shape, np.uint8)
    rx, ry = 0.7 * a.neck[0], 0.7 * a.neck[1]
    codes[(x / rx) ** 2 + (y / ry) ** 2 <= 1] = FAT
    codes[(x / (rx - a.fat)) ** 2 + (y / (ry - a.fat)) ** 2 <= 1] = MUSCLE
    bx, by, br = a.body[0] * 0.4, -a.body[1] * 0.3, a.body[0] * 0.9
    bone = (x - bx) ** 2 + (y - by) ** 2
    codes[bone <= br**2] = BONE
    codes[bone <= (0.6 * br) ** 2] = FAT
    vx, vy, vr = a.vessels[0]
    codes[(x - bx - br - 3 - abs(vx) * 0.2) ** 2 + (y - by - vy * 0.2) ** 2 <= vr**2] = VESSEL
    return codes, np.full(x.shape, np.inf)


def _brain_map(a: _Anatomy, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A brain-like head: scalp fat, skull, CSF, a folded grey-matter cortex, white matter, two ventricles; no cord."""
    x, y, z = pts
    semi = np.array([0.8 * a.neck[0], 1.0 * a.neck[1], 0.9 * a.neck[1]])
    r = np.sqrt((x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2)
    depth = (1 - r) * semi.min()  # mm under the outline, roughly
    folds = 2.0 * np.sin(x / 6.0 + a.wander[3]) * np.sin(y / 7.0) * np.sin(z / 5.0 + a.wander[4])
    codes = np.zeros(x.shape, np.uint8)
    codes[depth >= 0] = FAT
    codes[depth >= a.fat] = BONE
    codes[depth >= a.fat + 6] = CSF
    codes[depth >= a.fat + 8] = GM
    codes[depth >= a.fat + 12 + folds] = WM
    for side in (-1.0, 1.0):
        codes[((x - side * 14) / 6) ** 2 + ((y + 4) / 8) ** 2 + (z / 8) ** 2 <= 1] = GM  # deep grey nuclei
        codes[((x - side * 6) / 3.5) ** 2 + (y / 16) ** 2 + (z / 10) ** 2 <= 1] = CSF
    return codes, np.full(x.shape, np.inf)


def _in_ellipsoid(pts: np.ndarray, les: _Lesion) -> np.ndarray:
    return (((pts - les.centre[:, None]) / les.radii[:, None]) ** 2).sum(axis=0) <= 1


@dataclass
class _Grid:
    affine: np.ndarray
    shape: tuple[int, int, int]
    through: int  # voxel axis of the slice thickness


def _draw_grid(rng: np.random.Generator, view: str, origin: np.ndarray, fov_scale: float = 1.0) -> _Grid:
    """Orientation, spacing, shape and field of view of one acquisition (world mm)."""
    if view == "axial":
        inplane, thick = rng.uniform(0.5, 0.8), rng.uniform(3.0, 6.0)
        n = {"x": int(rng.choice([64, 72, 80, 96])), "y": int(rng.choice([64, 72, 80, 96])), "z": int(rng.integers(10, 17))}
        centre = np.array([rng.uniform(-3, 3), rng.uniform(3, 10), rng.uniform(-10, 10)])
    elif view == "sagittal":
        inplane, thick = rng.uniform(0.8, 1.0), rng.uniform(2.0, 4.0)
        n = {"x": int(rng.integers(9, 16)), "y": int(rng.choice([48, 56, 64, 72])), "z": int(rng.choice([72, 80, 96]))}
        centre = np.array([rng.uniform(-0.5, 0.5), rng.uniform(3, 10), rng.uniform(-10, 10)])
    else:
        inplane, thick = rng.uniform(0.8, 1.0), rng.uniform(2.0, 3.0)
        n = {"x": int(rng.choice([56, 64, 72])), "y": int(rng.integers(9, 17)), "z": int(rng.choice([72, 80, 96]))}
        centre = np.array([rng.uniform(-3, 3), rng.uniform(-0.5, 0.5), rng.uniform(-10, 10)])
    through = _THROUGH[view]
    for k in n:
        if k != through:
            n[k] = int(round(n[k] * fov_scale))
    cap = int(MAX_VOXELS * fov_scale**2)
    n[through] = max(1, min(n[through], cap // int(np.prod([v for k, v in n.items() if k != through]))))
    if n[through] % 2 == 0:  # keep a slice centre on the cord's midline
        centre["xyz".index(through)] += thick / 2
    codes = str(rng.choice(_ORIENTATIONS[view]))
    direction, shape, spacing = np.zeros((3, 3)), [], []
    for col, letter in enumerate(codes):
        axis, sign = _LETTER[letter]
        direction[axis, col] = sign
        shape.append(n["xyz"[axis]])
        spacing.append(thick if "xyz"[axis] == through else inplane)
    rot = _small_rotation(rng, max_deg=3.0)
    a3 = rot @ direction @ np.diag(spacing)
    affine = np.eye(4)
    affine[:3, :3] = a3
    affine[:3, 3] = origin + centre - a3 @ ((np.array(shape) - 1) / 2.0)
    through_col = next(col for col, letter in enumerate(codes) if "xyz"[_LETTER[letter][0]] == through)
    return _Grid(affine=affine, shape=(shape[0], shape[1], shape[2]), through=through_col)


def _small_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(0, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _local_points(grid: _Grid, origin: np.ndarray, through_offset: float = 0.0) -> np.ndarray:
    idx = np.indices(grid.shape, dtype=np.float64).reshape(3, -1)
    idx[grid.through] += through_offset
    return grid.affine[:3, :3] @ idx + (grid.affine[:3, 3] - origin)[:, None]


def _place_lesions(rng: np.random.Generator, a: _Anatomy, pts: np.ndarray, cord: np.ndarray, rnorm: np.ndarray,
                   shape: tuple[int, int, int], count: int) -> list[_Lesion]:
    """Ellipsoids centred on cord voxels, each one connected component, none touching another."""
    full = np.ones((3, 3, 3), bool)
    core = (cord & (rnorm <= 0.45)).reshape(shape)
    taken = np.zeros(shape, bool)  # lesions dilated by one voxel
    lesions: list[_Lesion] = []
    for _ in range(300):
        if len(lesions) == count:
            break
        candidates = np.flatnonzero(core & ~ndimage.binary_dilation(taken, full))
        if candidates.size == 0:
            break
        centre = pts[:, int(rng.choice(candidates))]
        sa, sb = _cord_semi_axes(a, centre[2:3])
        radii = rng.uniform(1.0, 3.0, size=3)
        radii[:2] = np.minimum(radii[:2], [0.75 * sa[0], 0.75 * sb[0]])
        les = _Lesion(centre=centre.copy(), radii=radii)
        mask = (_in_ellipsoid(pts, les) & cord).reshape(shape)
        if (mask & taken).any() or ndimage.label(mask, full)[1] != 1:
            continue
        lesions.append(les)
        taken |= ndimage.binary_dilation(mask, full)
    if len(lesions) < count:
        raise RuntimeError(f"could not place {count} separate lesions in a cord of {int(cord.sum())} voxels; "
                           "use another seed or fewer lesions")
    return lesions


def _sampled_anatomy(spec: PhantomSpec):
    """The anatomy, generator, table position, grid, sample points, tissue codes and cord radii of ``spec``."""
    spec.validate()
    anat_seed = spec.seed if spec.subject_seed is None else spec.subject_seed
    anatomy = _draw_anatomy(np.random.default_rng([anat_seed, 0]), spec.location, spec.anatomy)
    rng = np.random.default_rng([spec.seed, 1])
    origin = np.array([rng.uniform(-20, 20), rng.uniform(-40, 0), rng.uniform(-150, 50)])  # table position
    grid = _draw_grid(rng, spec.view, origin, float(spec.fov_scale))
    pts = _local_points(grid, origin)
    codes, rnorm = _tissue_map(anatomy, pts)
    return anatomy, rng, origin, grid, pts, codes, rnorm


def phantom_tissues(spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray]:
    """The tissue map (uint8 codes of TISSUES at each voxel centre, no lesions) and the affine of
    ``spec``'s phantom, without rendering an image: a label map to draw intensities on."""
    _, _, _, grid, _, codes, _ = _sampled_anatomy(spec)
    return codes.reshape(grid.shape), grid.affine


def render_phantom(spec: PhantomSpec) -> Phantom:
    """The phantom of ``spec`` with its tissue map (for tests and for checking contrasts)."""
    anatomy, rng, origin, grid, pts, codes, rnorm = _sampled_anatomy(spec)
    cord = (codes == WM) | (codes == GM)
    try:
        lesions = _place_lesions(rng, anatomy, pts, cord, rnorm, grid.shape, int(spec.lesions)) if spec.lesions else []
    except RuntimeError as e:
        raise RuntimeError(f"{spec}: {e}") from None
    if lesions:
        codes, _ = _tissue_map(anatomy, pts, lesions)

    table = np.asarray(_INTENSITY[spec.contrast]) * rng.uniform(0.92, 1.08, size=len(TISSUES))
    zooms = np.linalg.norm(grid.affine[:3, :3], axis=0)
    ratio = zooms[grid.through] / np.delete(zooms, grid.through).min()
    n_sub = 1 if ratio < 1.5 else 3 if ratio < 4 else 5
    signal = np.zeros(codes.shape)
    for off in (np.arange(n_sub) + 0.5) / n_sub - 0.5:
        sub = codes if off == 0 else _tissue_map(anatomy, _local_points(grid, origin, off), lesions)[0]
        signal += table[sub]
    signal = (signal / n_sub).reshape(grid.shape)
    sigma = [0.0 if ax == grid.through else 0.6 for ax in range(3)]
    signal = ndimage.gaussian_filter(signal, sigma)
    signal *= _bias_field(rng, grid.shape)
    noise = rng.uniform(0.02, 0.05) * table.max()
    signal = np.hypot(signal + rng.normal(0, noise, grid.shape), rng.normal(0, noise, grid.shape))
    signal *= 10 ** rng.uniform(2.0, 3.5)

    codes = codes.reshape(grid.shape)
    label = np.zeros(grid.shape, np.uint8)
    label[(codes == WM) | (codes == GM)] = 1
    label[codes == LESION] = 2
    if anatomy.kind != "spine":  # a brain's white and grey matter are no cord
        label[:] = 0
    descrip = f"spineauto phantom {spec.contrast} {spec.view} {spec.location} seed {spec.seed}"
    return Phantom(image=_nifti(signal.astype(np.float32), grid.affine, descrip),
                   label=_nifti(label, grid.affine, descrip), tissues=codes)


def make_phantom(spec: PhantomSpec) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """(image float32, label uint8) of one synthetic spine MRI; identical for identical specs."""
    p = render_phantom(spec)
    return p.image, p.label


def _bias_field(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    u, v, w = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    terms = (u, v, w, u * v, u * w, v * w, u * u, v * v, w * w)
    log_b = sum(c * t for c, t in zip(rng.normal(0, 0.12, len(terms)), terms))
    return np.exp(np.clip(log_b, -0.5, 0.5))


def _nifti(data: np.ndarray, affine: np.ndarray, descrip: str) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = descrip[:79].encode()
    return img


# ----------------------------------------------------------------------------- dataset writer


@dataclass
class _Case:
    case_id: str
    subject: str
    split: str  # "Tr" | "Ts"
    spec: PhantomSpec


def _cycle(rng: np.random.Generator, items: Sequence) -> Iterator:
    while True:
        for i in rng.permutation(len(items)):
            yield items[int(i)]


def _subject_sizes(rng: np.random.Generator, n: int) -> list[int]:
    """Split ``n`` cases into subjects of 2 or 3 cases (a single case only when n == 1)."""
    sizes = []
    while n > 0:
        k = n if n <= 3 else 2 if n == 4 else int(rng.choice([2, 3]))
        sizes.append(k)
        n -= k
    return sizes


def _plan_cases(rng: np.random.Generator, n_train: int, n_test: int, views: Sequence[str], lesions: bool,
                anatomies: Sequence[str] = ("spine",)) -> list[_Case]:
    combos = _cycle(rng, [(c, v) for c in CONTRASTS for v in views])
    kinds = _cycle(rng, list(anatomies))
    locations = _cycle(rng, LOCATIONS)
    lesion_parity = int(rng.integers(2))
    cases: list[_Case] = []
    subject = 0
    for split, n in (("Tr", n_train), ("Ts", n_test)):
        for size in _subject_sizes(rng, n):
            location = next(locations)
            kind = next(kinds) if len(anatomies) > 1 else anatomies[0]
            n_lesions = int(rng.integers(1, 4)) if lesions and kind == "spine" and subject % 2 == lesion_parity else 0
            subject_seed = int(rng.integers(2**31 - 1))
            chosen: list[tuple[str, str]] = []
            while len(chosen) < size:
                combo = next(combos)
                if combo not in chosen:
                    chosen.append(combo)
            for contrast, view in chosen:
                spec = PhantomSpec(contrast, view, location, n_lesions, int(rng.integers(2**31 - 1)), anatomy=kind,
                                   subject_seed=subject_seed)
                cases.append(_Case(f"phantom_{len(cases):03d}", f"sub-{subject:03d}", split, spec))
            subject += 1
    return cases


def write_phantom_dataset(dataset_dir: Path, n_train: int = 12, n_test: int = 4, seed: int = 0,
                          views: Sequence[str] = ("axial", "sagittal"), lesions: bool = True,
                          name: str | None = None, anatomies: Sequence[str] = ("spine",)) -> Path:
    """Write an nnU-Net v2 raw dataset of phantoms (imagesTr/labelsTr/imagesTs/labelsTs + dataset.json).

    Cases of one subject share anatomy, location and lesion count; subjects never straddle the
    train/test split. With several ``anatomies`` (e.g. ``("spine", "limb")``) subjects alternate
    between them and the cases get an ``anatomy`` class (for an anatomy gate). The dataset is built beside ``dataset_dir`` and then replaces it whole, so a
    rerun leaves nothing of an earlier dataset behind and a failure leaves the old one as it was.
    """
    dataset_dir = Path(dataset_dir)
    views = tuple(views)
    if n_train < 1 or n_test < 0:
        raise ValueError(f"write_phantom_dataset: need n_train >= 1 and n_test >= 0, got {n_train}, {n_test}")
    if not views or any(v not in VIEWS for v in views) or len(set(views)) != len(views):
        raise ValueError(f"write_phantom_dataset: views must be distinct values from {list(VIEWS)}, got {list(views)}")
    anatomies = tuple(anatomies)
    if not anatomies or any(a not in ANATOMIES for a in anatomies):
        raise ValueError(f"write_phantom_dataset: anatomies must be values from {list(ANATOMIES)}, got {list(anatomies)}")
    cases = _plan_cases(np.random.default_rng(seed), n_train, n_test, views, lesions, anatomies)
    with_anatomy = len(set(anatomies)) > 1
    with staged_dataset_dir(dataset_dir, overwrite=True) as stage:
        for case in cases:
            image, label = make_phantom(case.spec)
            save_nifti(stage / f"images{case.split}" / f"{case.case_id}_0000.nii.gz", image)
            save_nifti(stage / f"labels{case.split}" / f"{case.case_id}.nii.gz", label)
            logger.debug("%s %s: %s", case.case_id, case.subject, case.spec)
        write_dataset_json(
            stage,
            name=name or dataset_dir.name,
            description=f"Synthetic spine phantoms generated by spineauto (seed {seed})",
            labels={"background": 0, "cord": 1, **({"lesion": 2} if lesions else {})},
            num_training=sum(c.split == "Tr" for c in cases),
            cases={c.case_id: {"subject": c.subject, "classes": {"sequence": c.spec.contrast, "view": c.spec.view,
                                                                 "location": c.spec.location,
                                                                 **({"anatomy": c.spec.anatomy} if with_anatomy else {})}}
                   for c in cases},
            class_order={"sequence": CONTRASTS, "view": VIEWS, "location": LOCATIONS, "anatomy": ANATOMIES},
        )
    logger.info("wrote %d training and %d test phantoms to %s", n_train, n_test, dataset_dir)
    return dataset_dir


__all__ = ["CONTRASTS", "VIEWS", "LOCATIONS", "ANATOMIES", "TISSUES", "PhantomSpec", "Phantom",
           "make_phantom", "render_phantom", "write_phantom_dataset"]
