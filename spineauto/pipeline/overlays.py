"""Overlay mosaics of one pipeline case: sagittal slices through the cord and axial slices along it.

The volume is reoriented to RAS (axis permutations and flips only, nibabel orientation utilities)
and every slice is shown in the radiological convention: axial slices with the patient's right on
the viewer's left and anterior at the top, sagittal slices with anterior on the left and superior at
the top. Each panel is resampled to square pixels, so thick slices are not squashed. The grey image
is windowed to its 0.5-99.5 percentiles; the cord is tinted and outlined in green, lesions in red.
Each panel is labelled with its voxel index in the original image (i, j or k: the original axis).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from spineauto.io.atomic import write_atomic
from spineauto.io.geometry import to_ras_ornt, voxel_sizes

logger = logging.getLogger(__name__)

CORD_RGB = (0, 255, 0)
LESION_RGB = (255, 32, 32)
TEXT_RGB = (255, 214, 0)
BACKGROUND = 17
SAGITTAL_HEIGHT = 380   # px of one sagittal panel (at most)
AXIAL_SIZE = 170        # px of one axial panel
AXIAL_FOV_MM = 48.0     # axial panels show this square around the cord
MOSAIC_WIDTH = 1100     # px; the report's column
MAX_SAGITTAL, MAX_AXIAL, AXIAL_COLUMNS = 5, 12, 6
GAP = 4
MIN_SAGITTAL_MM = 40.0  # an image shorter than this along S-I (a thin axial slab) gets no sagittal mosaic: a strip


def sagittal_left_out(affine: np.ndarray, shape: tuple[int, ...]) -> str | None:
    """Why an image gets no sagittal mosaic (a thin axial slab), or None."""
    ornt = to_ras_ornt(affine)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = voxel_sizes(affine)
    n = np.empty(3, int)
    n[ornt[:, 0].astype(int)] = shape[-3:]
    extent = n[2] * spacing[2]
    if extent < MIN_SAGITTAL_MM:
        return (f"no sagittal view: the image covers {extent:.0f} mm along S-I ({n[2]} axial slice(s) of {spacing[2]:.3g} mm), "
                f"a thin axial slab whose sagittal reformat would be an unreadable strip; see the axial slices")
    return None


def write_overlays(image: np.ndarray, affine: np.ndarray, cord: np.ndarray | None, lesion: np.ndarray | None,
                   out_dir: Path, case: str) -> dict[str, str]:
    """Write ``<case>_sagittal.png`` and ``<case>_axial.png`` into ``out_dir`` (atomically), and
    with masks ``<case>_<view>_plain.png`` without them (the report's overlay toggle).

    ``image``, ``cord`` and ``lesion`` are (X, Y, Z) arrays in the image's own voxel order with its
    NIfTI ``affine``; masks may be None (or empty): the mosaics are then plain. Returns the file
    names relative to ``out_dir`` under the keys "sagittal", "axial" (and "<view>_plain"); a thin
    axial slab has no sagittal mosaic (:func:`sagittal_left_out`).
    """
    image = _as_3d(image, "image")
    masks = [None if m is None else _as_3d(m, name) > 0 for m, name in ((cord, "cord"), (lesion, "lesion"))]
    for m, name in zip(masks, ("cord", "lesion")):
        if m is not None and m.shape != image.shape:
            raise ValueError(f"write_overlays {case}: {name} mask shape {m.shape} differs from image shape {image.shape}")
    ornt = to_ras_ornt(affine)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = voxel_sizes(affine)
    vol = _window(np.asarray(_reorient(image, ornt), np.float32))
    cord_r, lesion_r = (None if m is None or not m.any() else _reorient(m, ornt) for m in masks)
    # RAS axis -> (original axis letter, flipped?, length) for the panel labels
    origin = {int(a): ("ijk"[i], f < 0, image.shape[i]) for i, (a, f) in enumerate(ornt)}
    out_dir = Path(out_dir)
    views = ["axial"] if sagittal_left_out(affine, image.shape) else ["sagittal", "axial"]
    names, mosaics = {}, {}
    for view in views:
        names[view] = f"{case}_{view}.png"
        draw = _sagittal if view == "sagittal" else _axial
        mosaics[view] = draw(vol, cord_r, lesion_r, spacing, origin[0 if view == "sagittal" else 2])
        if cord_r is not None or lesion_r is not None:  # the same panels without the masks
            names[f"{view}_plain"] = f"{case}_{view}_plain.png"
            mosaics[f"{view}_plain"] = draw(vol, cord_r, lesion_r, spacing, origin[0 if view == "sagittal" else 2], masks=False)
    for view, mosaic in mosaics.items():
        img = Image.fromarray(mosaic)
        write_atomic(out_dir / names[view], lambda p, img=img: img.save(p, format="PNG"))
    logger.debug("%s: wrote %s", case, ", ".join(names.values()))
    return names


def _as_3d(array: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(array)
    while a.ndim > 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3:
        raise ValueError(f"write_overlays: {name} must be a 3D array, got shape {a.shape}")
    return a


def _reorient(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    import nibabel as nib

    return np.ascontiguousarray(nib.orientations.apply_orientation(array, ornt))


def _window(vol: np.ndarray) -> np.ndarray:
    """Grey values in [0, 1] from the 0.5-99.5 percentile window (non-finite values become 0)."""
    finite = np.isfinite(vol)
    if not finite.any():
        return np.zeros(vol.shape, np.float32)
    lo, hi = np.percentile(vol[finite], [0.5, 99.5])
    return np.clip((np.where(finite, vol, lo) - lo) / max(float(hi - lo), 1e-6), 0, 1).astype(np.float32)


def _display(a: np.ndarray) -> np.ndarray:
    """A RAS slice (first axis R, second A or S) in the display convention: both axes reversed."""
    return a.T[::-1, ::-1]


def _label(ras_index: int, origin: tuple[str, bool, int]) -> str:
    letter, flipped, n = origin
    return f"{letter}={n - 1 - ras_index if flipped else ras_index}"


def _spread(indices: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` indices spread over the distribution of ``indices`` (quantiles, no repeats)."""
    if indices.size == 0:
        return []
    return sorted({int(round(q)) for q in np.quantile(indices, np.linspace(0.1, 0.9, n) if n > 1 else [0.5])})


def _lesion_centres(lesion: np.ndarray | None, axis: int) -> set[int]:
    if lesion is None:
        return set()
    labels, count = ndimage.label(lesion)
    centres = ndimage.center_of_mass(lesion, labels, range(1, count + 1))
    return {int(round(c[axis])) for c in centres}


def _sagittal(vol, cord, lesion, spacing, origin, masks: bool = True) -> np.ndarray:
    nx = vol.shape[0]
    if cord is not None:
        xs = set(_spread(np.nonzero(cord)[0], MAX_SAGITTAL)) | _lesion_centres(lesion, 0)
    else:
        xs = {int(round(q * (nx - 1))) for q in (0.3, 0.5, 0.7)}
    xs = sorted(xs)[:MAX_SAGITTAL + 1]
    height_mm, width_mm = vol.shape[2] * spacing[2], vol.shape[1] * spacing[1]
    ppm = min(SAGITTAL_HEIGHT / height_mm, (MOSAIC_WIDTH / len(xs) - GAP) / width_mm)
    panels = [_panel(vol[x], None if cord is None or not masks else cord[x], None if lesion is None or not masks else lesion[x],
                     (spacing[2], spacing[1]), ppm, _label(x, origin)) for x in xs]
    _corner_letters(panels[0], "A", "P")
    return _mosaic(panels, len(panels))


def _axial(vol, cord, lesion, spacing, origin, masks: bool = True) -> np.ndarray:
    nz = vol.shape[2]
    if cord is not None:
        z0, z1 = (lambda z: (int(z.min()), int(z.max())))(np.nonzero(cord.any(axis=(0, 1)))[0])
        extra = _lesion_centres(lesion, 2)
        n = max(2, MAX_AXIAL - len(extra))
        zs = ({int(round(z)) for z in np.linspace(z0, z1, min(n, z1 - z0 + 1))} | extra)
    else:
        zs = {int(round(z)) for z in np.linspace(0, nz - 1, min(MAX_AXIAL, nz))}
    panels = []
    for z in sorted(zs, reverse=True):  # superior first, as read top-down
        sl = [vol[:, :, z], None if cord is None else cord[:, :, z], None if lesion is None else lesion[:, :, z]]
        if cord is not None:
            sl = _crop_around(sl, cord, z, spacing)
            ppm = AXIAL_SIZE / (AXIAL_FOV_MM + max(spacing[:2]))
        else:
            ppm = AXIAL_SIZE / max(vol.shape[0] * spacing[0], vol.shape[1] * spacing[1])
        if not masks:
            sl[1:] = [None, None]
        panels.append(_panel(*sl, (spacing[1], spacing[0]), ppm, _label(z, origin)))
    _corner_letters(panels[0], "R", "L")
    return _mosaic(panels, min(AXIAL_COLUMNS, len(panels)))


def _crop_around(slices: list, cord: np.ndarray, z: int, spacing: np.ndarray) -> list:
    """A square of AXIAL_FOV_MM around the cord centre of slice ``z`` (of the nearest slice with cord)."""
    has = np.nonzero(cord.any(axis=(0, 1)))[0]
    zc = int(has[np.argmin(np.abs(has - z))])
    cx, cy = (int(round(c)) for c in ndimage.center_of_mass(cord[:, :, zc]))
    hx, hy = (int(round(AXIAL_FOV_MM / 2 / s)) for s in spacing[:2])
    out = []
    for a in slices:
        if a is None:
            out.append(None)
            continue
        padded = np.pad(a, ((hx, hx), (hy, hy)), constant_values=0)
        out.append(padded[cx:cx + 2 * hx + 1, cy:cy + 2 * hy + 1])
    return out


def _resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2D float array to (height, width)."""
    img = Image.fromarray(np.ascontiguousarray(a, np.float32), mode="F")
    return np.asarray(img.resize((size[1], size[0]), Image.BILINEAR))


def _panel(grey, cord, lesion, pixel_mm: tuple[float, float], ppm: float, label: str) -> np.ndarray:
    """One slice (RAS) in display convention at ``ppm`` pixels per mm, masks tinted and outlined."""
    grey = _display(grey)
    size = (max(1, round(grey.shape[0] * pixel_mm[0] * ppm)), max(1, round(grey.shape[1] * pixel_mm[1] * ppm)))
    rgb = np.repeat(_resize(grey, size)[..., None] * 255, 3, axis=-1)
    for mask, colour, alpha in ((cord, CORD_RGB, 0.28), (lesion, LESION_RGB, 0.6)):
        if mask is None or not mask.any():
            continue
        m = _resize(_display(mask).astype(np.float32), size) >= 0.5
        rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(colour)
        rgb[m & ~ndimage.binary_erosion(m)] = colour
    panel = np.clip(rgb, 0, 255).astype(np.uint8)
    _text(panel, (4, 3), label)
    return panel


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text(panel: np.ndarray, xy: tuple[int, int], text: str) -> None:
    """Draw ``text`` onto ``panel`` in place (yellow with a dark shadow)."""
    img = Image.fromarray(panel)
    draw = ImageDraw.Draw(img)
    draw.text((xy[0] + 1, xy[1] + 1), text, fill=(0, 0, 0), font=_font())
    draw.text(xy, text, fill=TEXT_RGB, font=_font())
    panel[...] = np.asarray(img)


def _corner_letters(panel: np.ndarray, left: str, right: str) -> None:
    """Orientation letters at the middle of the left and right edges."""
    y = panel.shape[0] // 2 - 7
    _text(panel, (3, y), left)
    _text(panel, (panel.shape[1] - 12, y), right)


def _mosaic(panels: list[np.ndarray], columns: int) -> np.ndarray:
    h = max(p.shape[0] for p in panels)
    w = max(p.shape[1] for p in panels)
    rows = -(-len(panels) // columns)
    out = np.full((rows * h + (rows - 1) * GAP, columns * w + (columns - 1) * GAP, 3), BACKGROUND, np.uint8)
    for i, p in enumerate(panels):
        r, c = divmod(i, columns)
        y, x = r * (h + GAP), c * (w + GAP)
        out[y:y + p.shape[0], x:x + p.shape[1]] = p
    return out
