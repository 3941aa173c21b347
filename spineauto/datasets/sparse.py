"""A whole-field-of-view scan as a sparsely labelled training case (nnU-Net's ``ignore`` label).

A lab often holds a cropped, labelled scan and the uncropped original of the same session. The
crop's mask is carried onto the wide scan through the two affines (voxel -> world -> voxel, linear
interpolation, every voxel the mask touches counts), and the wide scan is labelled:

- background (0) where a voxel lies farther than ``margin_mm`` (in-plane, in mm) from the carried
  mask on its slice: surely not that structure, the negative context a crop never shows;
- ignore (the dataset's ``ignore`` value) within ``margin_mm`` of it: the carried mask is not
  trusted to be the structure (two headers of one session can disagree by millimetres: on the
  ``t2s`` pair of our test data the carried cord lies up to ~10 mm off the cord, a shear between the
  headers), so nothing there is labelled, neither cord nor background;
- slices the mask does not reach (the crop covered fewer slices): ``uncovered="nearest"`` ignores the
  disc of ``margin_mm`` around the carried mask of the nearest slice it reaches (the structure is a
  tube: it moves little from one slice to the next), ``"ignore"`` ignores the whole slice.

Slices are taken along the wide scan's thickest voxel axis (the through-plane axis of an axial
scan). The mask's own label values are never written: the case teaches only where the structure is
not. :func:`add_sparse_case` adds such a case to a raw dataset and declares ``ignore`` in its
dataset.json (the highest value, as nnU-Net v2 requires) when it has none; with ``overlay`` it also
draws the label map over the scan, to be looked at before training.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from spineauto.datasets.dataset_json import IGNORE, load_dataset_json
from spineauto.errors import SpineautoError
from spineauto.io.atomic import save_nifti, write_atomic, write_json
from spineauto.io.outputs import check_output_apart

log = logging.getLogger(__name__)
UNCOVERED = ("nearest", "ignore")


@dataclass
class SparseCase:
    case: str
    image: Path
    label: Path
    ignore_label: int
    slices: int  # of the wide scan, along its thickest axis
    covered: int  # slices the carried mask reaches
    background_share: float  # of the wide scan's voxels labelled background
    ignore_share: float


def carry_mask(mask: nib.Nifti1Image, target: nib.Nifti1Image) -> np.ndarray:
    """Where ``mask`` (any value > 0) touches ``target``'s voxels, through both affines (linear interpolation > 0)."""
    from scipy import ndimage

    vox = np.linalg.inv(mask.affine) @ target.affine  # target voxel -> mask voxel
    m = (np.asanyarray(mask.dataobj) > 0).astype(np.float32)
    while m.ndim > 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim != 3:
        raise SpineautoError(f"{mask.get_filename()}: a 3D mask expected, got shape {m.shape}")
    carried = ndimage.affine_transform(m, vox[:3, :3], vox[:3, 3], output_shape=target.shape[:3], order=1, mode="constant", cval=0.0)
    return carried > 1e-3


def sparse_labels(carried: np.ndarray, spacing, margin_mm: float, ignore: int, uncovered: str = "nearest") -> tuple[np.ndarray, int, int]:
    """The label map (0 far from ``carried``, ``ignore`` near it) of one wide scan; (labels, slice axis, covered slices)."""
    from scipy import ndimage

    if uncovered not in UNCOVERED:
        raise SpineautoError(f"uncovered slices: {uncovered!r} is none of {', '.join(UNCOVERED)}")
    spacing = np.asarray(spacing, float)
    axis = int(np.argmax(spacing))
    plane = tuple(a for a in range(3) if a != axis)
    per_slice = np.moveaxis(carried, axis, 0)
    covered = np.flatnonzero(per_slice.any(axis=(1, 2)))
    out = np.zeros(per_slice.shape, np.uint8)
    for k in range(per_slice.shape[0]):
        if k not in covered and uncovered == "ignore":
            out[k] = ignore
            continue
        near = per_slice[k] if k in covered else per_slice[covered[np.argmin(np.abs(covered - k))]]
        distance = ndimage.distance_transform_edt(~near, sampling=spacing[list(plane)])
        out[k][distance <= margin_mm] = ignore
    return np.moveaxis(out, 0, axis), axis, len(covered)


def add_sparse_case(dataset_dir: Path, wide: Path, mask: Path, case: str, margin_mm: float = 15.0, uncovered: str = "nearest",
                    overwrite: bool = False, overlay: Path | None = None) -> SparseCase:
    """Add ``wide`` as training case ``case`` of the raw dataset ``dataset_dir`` (one channel, NIfTI),
    labelled from the cropped scan's ``mask`` (on another grid of the same session, see the module)."""
    dataset_dir, wide, mask = Path(dataset_dir), Path(wide), Path(mask)
    info = load_dataset_json(dataset_dir)
    if info.file_ending not in (".nii.gz", ".nii"):
        raise SpineautoError(f"{dataset_dir}: file_ending {info.file_ending!r}; a sparse case needs NIfTI (its labels come through the affines)")
    if info.num_channels != 1:
        raise SpineautoError(f"{dataset_dir}: {info.num_channels} channels; a sparse case adds one scan, for a one-channel dataset")
    if not info.has_segmentation:
        raise SpineautoError(f"{dataset_dir}: declares no segmentation labels; a sparse case belongs to a segmentation dataset")
    if not (margin_mm > 0 and np.isfinite(margin_mm)):
        raise SpineautoError(f"--margin-mm {margin_mm}: must be a number of mm > 0")
    if not case or not all(ch.isalnum() or ch in "-_." for ch in case):
        raise SpineautoError(f"--case {case!r}: letters, digits, '-', '_' and '.' only")
    image_out, label_out = info.channel_files(case)[0], info.label_file(case)
    if overlay is not None and Path(overlay).suffix.lower() != ".png":
        raise SpineautoError(f"--overlay {overlay}: a .png file to write")
    if (image_out.exists() or label_out.exists()) and not overwrite:
        raise SpineautoError(f"{image_out}: case {case!r} is already in {dataset_dir.name}; choose another --case or pass --overwrite")
    for out in (image_out, label_out):
        check_output_apart([wide, mask], out, protect=(), what=f"case {case}'s files", hint="choose another --case")
    if overlay is not None:
        check_output_apart([wide, mask], Path(overlay), what="the overlay", hint="choose another --overlay file")
    images = {}
    for path, what in ((wide, "wide scan"), (mask, "cropped scan's mask")):
        try:
            images[what] = nib.load(str(path))
        except FileNotFoundError:
            raise SpineautoError(f"{path}: the {what} does not exist") from None
        except Exception as e:  # nibabel raises several types for a file that is no NIfTI
            raise SpineautoError(f"{path}: the {what} is not a readable NIfTI file ({type(e).__name__})") from None
    target = images["wide scan"]
    if len(target.shape) != 3:
        raise SpineautoError(f"{wide}: a 3D scan expected, got shape {target.shape}")
    carried = carry_mask(images["cropped scan's mask"], target)
    if not carried.any():
        raise SpineautoError(f"{mask}: carried through the affines it does not reach {wide} at all; are they of the same session?")
    ignore = info.ignore_label if info.ignore_label is not None else max(info.class_values) + 1
    spacing = np.linalg.norm(target.affine[:3, :3], axis=0)
    labels, axis, covered = sparse_labels(carried, spacing, margin_mm, ignore, uncovered)
    header = target.header.copy()
    header.set_data_dtype(np.uint8)
    image_out.parent.mkdir(parents=True, exist_ok=True)
    label_out.parent.mkdir(parents=True, exist_ok=True)
    # dataset.json declares the ignore value before any label file holds it: a run killed in between leaves a
    # dataset that still plans (an image without labels is named by plan_and_preprocess; rerun with --overwrite)
    _declare_ignore(dataset_dir / "dataset.json", ignore, len(info.training_cases()))
    write_atomic(image_out, lambda p: shutil.copyfile(wide, p), suffix=info.file_ending)
    save_nifti(label_out, nib.Nifti1Image(labels, target.affine, header))
    _declare_ignore(dataset_dir / "dataset.json", ignore, len(info.training_cases()))
    if overlay is not None:
        write_overlay(Path(overlay), np.asanyarray(target.dataobj), labels, carried, axis, ignore, f"{case}: margin {margin_mm:g} mm")
    log.info("%s: case %s: %d of %d slices reached by the carried mask; %.1f%% background, %.1f%% ignore", dataset_dir.name, case,
             covered, labels.shape[axis], 100 * np.mean(labels == 0), 100 * np.mean(labels == ignore))
    return SparseCase(case, image_out, label_out, ignore, labels.shape[axis], covered, float(np.mean(labels == 0)),
                      float(np.mean(labels == ignore)))


def write_overlay(path: Path, image: np.ndarray, labels: np.ndarray, carried: np.ndarray, axis: int, ignore: int, title: str) -> Path:
    """Every slice of the wide scan (up to 12, evenly spread): ignore shaded, the carried mask outlined in red: look before training."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = image.shape[axis]
    picks = np.unique(np.linspace(0, n - 1, min(n, 12)).round().astype(int))
    cols = min(len(picks), 6)
    fig = Figure(figsize=(3 * cols, 3 * -(-len(picks) // cols)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(-(-len(picks) // cols), cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, k in zip(axes, picks):
        img, lab, car = (np.take(a, k, axis=axis).T for a in (image, labels, carried))
        ax.imshow(img, cmap="gray", origin="lower")
        ax.imshow(np.ma.masked_where(lab != ignore, lab), cmap="autumn_r", alpha=0.35, origin="lower")  # yellow
        if car.any():
            ax.contour(car, [0.5], colors="r", linewidths=0.8)
        ax.set_title(f"slice {k}{'' if car.any() else ' (not reached)'}", fontsize=8)
    fig.suptitle(f"{title}: shaded = ignore, unshaded = background, red = the carried mask", fontsize=9)
    return write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=60), suffix=".png")


def _declare_ignore(path: Path, ignore: int, n_training: int) -> None:
    """dataset.json with ``"ignore": ignore`` among its labels (kept where it is) and numTraining brought up to date."""
    raw = json.loads(path.read_text())
    raw["labels"] = {**raw["labels"], IGNORE: ignore}
    raw["numTraining"] = n_training
    write_json(path, raw)
