"""Convert a BIDS tree (spine-generic convention) into an nnU-Net v2 raw dataset.

Images are ``sub-X/[ses-Y/]anat/sub-X[_ses-Y][_entity-value...]_<contrast>.nii[.gz]``; masks are
``derivatives/labels/sub-X/[ses-Y/]anat/<image stem>_<label suffix>.nii[.gz]``. Images with a mask go
to ``imagesTr``/``labelsTr``, the others to ``imagesTs``. The contrast (the last BIDS suffix) becomes
the case's ``sequence`` class. The dataset is built in a temporary folder beside ``dataset_dir`` and
renamed into place at the end (:mod:`spineauto.datasets.raw_dataset`), so a failure never leaves a
half-written dataset behind.
"""
from __future__ import annotations

import gzip
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from spineauto.datasets.raw_dataset import check_output_free, staged_dataset_dir, write_dataset_json
from spineauto.errors import SpineautoError
from spineauto.io.images import load_nifti

logger = logging.getLogger(__name__)

IMAGE_ENDINGS = (".nii.gz", ".nii")
SIDECAR_KEYS = ("SeriesDescription", "Manufacturer")
MAX_LABEL = 255  # masks are stored as uint8


@dataclass
class BidsCase:
    """One image of the BIDS tree, with its mask if it has one."""

    case_id: str
    subject: str
    contrast: str
    image: Path
    mask: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def convert_bids(
    root: Path,
    dataset_dir: Path,
    label_suffix: str = "seg-manual",
    contrasts: list[str] | None = None,
    label_name: str = "cord",
    overwrite: bool = False,
) -> Path:
    """Write the BIDS tree at ``root`` as a raw dataset in ``dataset_dir``; return ``dataset_dir``."""
    root = Path(root).expanduser().resolve()
    dataset_dir = Path(dataset_dir).expanduser().resolve()
    if not root.is_dir():
        raise SpineautoError(f"BIDS root {root} does not exist or is not a folder")
    check_output_free(dataset_dir, overwrite)

    cases = find_bids_cases(root, label_suffix)
    if contrasts is not None:
        wanted = set(contrasts)
        found = sorted({c.contrast for c in cases})
        cases = [c for c in cases if c.contrast in wanted]
        if not cases:
            raise SpineautoError(
                f"no image with contrast {', '.join(sorted(wanted))} under {root}; "
                f"contrasts found: {', '.join(found)}"
            )
    for case in cases:
        check_3d(case.image)

    with staged_dataset_dir(dataset_dir, overwrite) as stage:
        mask_values: set[int] = set()
        for case in cases:
            if case.mask is None:
                copy_nifti(case.image, stage / "imagesTs" / f"{case.case_id}_0000.nii.gz")
            else:
                copy_nifti(case.image, stage / "imagesTr" / f"{case.case_id}_0000.nii.gz")
                mask_values |= write_mask(case.mask, case.image, stage / "labelsTr" / f"{case.case_id}.nii.gz")
        labels = declare_labels(mask_values, label_name)
        entries = {
            c.case_id: {"subject": c.subject, "classes": {"sequence": c.contrast}, "metadata": c.metadata} for c in cases
        }
        n_train = sum(c.mask is not None for c in cases)
        write_dataset_json(
            stage,
            name=dataset_dir.name,
            description=f"Converted from BIDS dataset {root} by spineauto",
            labels=labels,
            num_training=n_train,
            cases=entries,
        )
    logger.info(
        "converted %d images from %s into %s (%d with masks, %d without)",
        len(cases), root, dataset_dir, n_train, len(cases) - n_train,
    )
    return dataset_dir


# --------------------------------------------------------------------------------------- discovery


def find_bids_cases(root: Path, label_suffix: str) -> list[BidsCase]:
    """Every ``sub-*`` anatomical image under ``root``, paired with its mask, sorted by case id."""
    images: dict[str, Path] = {}
    for pattern in ("sub-*/anat/sub-*.nii*", "sub-*/ses-*/anat/sub-*.nii*"):
        for path in root.glob(pattern):
            stem = nifti_stem(path)
            if stem is None or not path.is_file():
                continue
            if stem in images:
                raise SpineautoError(
                    f"two images for case {stem}: {images[stem]} and {path}; keep only one of them"
                )
            images[stem] = path
    if not images:
        raise SpineautoError(f"empty BIDS tree: no sub-*/anat/*.nii.gz under {root}")

    masks = find_masks(root, label_suffix, images)
    cases = []
    for stem in sorted(images):
        path = images[stem]
        rel = path.relative_to(root)
        subject = rel.parts[0]
        metadata: dict[str, Any] = {"source": rel.as_posix()}
        if rel.parts[1].startswith("ses-"):
            metadata["session"] = rel.parts[1]
        if stem in masks:
            metadata["mask"] = masks[stem].relative_to(root).as_posix()
        metadata.update(read_sidecar(path))
        cases.append(
            BidsCase(
                case_id=stem,
                subject=subject,
                contrast=stem.rsplit("_", 1)[-1],
                image=path,
                mask=masks.get(stem),
                metadata=metadata,
            )
        )
    return cases


def find_masks(root: Path, label_suffix: str, images: dict[str, Path]) -> dict[str, Path]:
    """Masks ``derivatives/labels/.../<image stem>_<label_suffix>.nii[.gz]`` keyed by image stem."""
    labels_root = root / "derivatives" / "labels"
    tail = f"_{label_suffix}"
    masks: dict[str, Path] = {}
    for pattern in ("sub-*/anat/*.nii*", "sub-*/ses-*/anat/*.nii*"):
        for path in labels_root.glob(pattern):
            stem = nifti_stem(path)
            if stem is None or not stem.endswith(tail):
                continue
            image_stem = stem[: -len(tail)]
            if image_stem not in images:
                expected = path.parent.relative_to(labels_root) / f"{image_stem}.nii.gz"
                raise SpineautoError(
                    f"mask {path} has no image: expected {root / expected}; "
                    "remove the mask or add the image"
                )
            if image_stem in masks:
                raise SpineautoError(f"two masks for {image_stem}: {masks[image_stem]} and {path}; keep one")
            masks[image_stem] = path
    return masks


def nifti_stem(path: Path) -> str | None:
    """File name without ``.nii``/``.nii.gz``; None for anything else."""
    for ending in IMAGE_ENDINGS:
        if path.name.endswith(ending):
            return path.name[: -len(ending)]
    return None


def read_sidecar(image: Path) -> dict[str, Any]:
    """``SeriesDescription`` and ``Manufacturer`` from the image's JSON sidecar, if there is one."""
    sidecar = image.parent / f"{nifti_stem(image)}.json"
    if not sidecar.is_file():
        return {}
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        logger.warning("ignoring unreadable sidecar %s: %s", sidecar, err)
        return {}
    if not isinstance(data, dict):
        logger.warning("ignoring sidecar %s: it is not a JSON object", sidecar)
        return {}
    return {key: data[key] for key in SIDECAR_KEYS if key in data}


# ----------------------------------------------------------------------------------- images, masks


def check_3d(path: Path) -> None:
    shape = load_nifti(path).shape
    if len(shape) != 3:
        raise SpineautoError(
            f"{path} has shape {tuple(shape)}: a 3D image is expected; "
            "split or average the other dimensions first (e.g. sct_image -split t, sct_maths -mean t)"
        )


def copy_nifti(source: Path, target: Path) -> None:
    """Copy an image byte for byte (``.nii`` is gzipped), so header and affine stay exactly as they were."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.name.endswith(".nii.gz"):
        shutil.copyfile(source, target)
    else:
        with open(source, "rb") as src, gzip.open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)


def write_mask(mask_path: Path, image_path: Path, target: Path) -> set[int]:
    """Round the mask to uint8 on the image's grid and save it; return the label values it holds."""
    mask = load_nifti(mask_path)
    image = load_nifti(image_path)
    if mask.shape != image.shape:
        raise SpineautoError(
            f"mask {mask_path} has shape {tuple(mask.shape)} but its image {image_path} has "
            f"{tuple(image.shape)}; the mask must be on the image's voxel grid"
        )
    if not np.allclose(mask.affine, image.affine, atol=1e-3):
        raise SpineautoError(
            f"mask {mask_path} and its image {image_path} have different affines "
            f"({np.round(mask.affine, 4).tolist()} vs {np.round(image.affine, 4).tolist()}); "
            "resample the mask onto the image (e.g. sct_register_multimodal -identity 1)"
        )
    data = np.rint(np.asanyarray(mask.dataobj, dtype=np.float64))
    if not np.isfinite(data).all() or data.min() < 0 or data.max() > MAX_LABEL:
        raise SpineautoError(
            f"mask {mask_path} holds values outside 0..{MAX_LABEL} (min {np.nanmin(data)}, max {np.nanmax(data)}); "
            "a mask holds 0 for background and small positive integers for labels"
        )
    values = data.astype(np.uint8)
    header = mask.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    out = type(mask)(values, mask.affine, header)
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(target))
    return {int(v) for v in np.unique(values)}


def declare_labels(values: set[int], label_name: str) -> dict[str, int]:
    """``{background: 0, <label_name>: 1}`` for binary masks, else ``label_1 .. label_<max>``."""
    top = max(values | {1})
    if top == 1:
        return {"background": 0, label_name: 1}
    return {"background": 0, **{f"label_{v}": v for v in range(1, top + 1)}}
