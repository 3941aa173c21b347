"""2D image folders (PNG/JPEG, one folder per class) -> a raw classification dataset.

The original framework's ``pillow`` driver, used for foundation pretraining of an encoder on a
large pool of 2D images. Accepted layouts::

    ROOT/<class>/*.png|jpg|jpeg                  every image a training case
    ROOT/train/<class>/...  ROOT/test/<class>/... training cases (imagesTr) and test cases (imagesTs)

Each image becomes a one-slice NIfTI volume (1 mm pixels unless told otherwise, RAS, the picture's
top row anterior), grey-scale (Pillow mode ``L``) or three channels with ``rgb=True``. The
dataset.json declares one head (``head``, default ``class``) whose classes are the folder names,
and every case's class (test cases too, so ``spineauto evaluate`` can use it as the labels file).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from spineauto.datasets.raw_dataset import staged_dataset_dir, write_dataset_json
from spineauto.errors import SpineautoError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class FolderImage:
    path: Path
    cls: str
    split: str  # "Tr" | "Ts"
    case: str = ""


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _class_folders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def find_images(root: Path) -> list[FolderImage]:
    """Every image under ``root`` with its class (folder name) and split."""
    root = Path(root)
    if not root.is_dir():
        raise SpineautoError(f"{root}: not a folder; expected ROOT/<class>/*.png (or ROOT/train/<class>/...)")
    splits = {"train": "Tr", "test": "Ts"}
    subdirs = {d.name.lower(): d for d in _class_folders(root)}
    if "train" in subdirs:
        sources = [(subdirs[name], split) for name, split in splits.items() if name in subdirs]
    else:
        sources = [(root, "Tr")]
    images = []
    for folder, split in sources:
        for d in _class_folders(folder):
            files = sorted(p for p in d.rglob("*") if _is_image(p))
            if not files:
                log.warning("%s: no PNG/JPEG images; class %r skipped", d, d.name)
            images += [FolderImage(p, d.name, split) for p in files]
    if not images:
        raise SpineautoError(f"{root}: no PNG/JPEG images in class folders; expected ROOT/<class>/*.png")
    return images


def _case_ids(images: list[FolderImage]) -> None:
    used: set[str] = set()
    for im in images:
        base = re.sub(r"[^A-Za-z0-9-]+", "-", f"{im.cls}-{im.path.stem}").strip("-") or "img"
        case, k = base, 1
        while case in used:
            k += 1
            case = f"{base}-{k}"
        used.add(case)
        im.case = case


def read_picture(path: Path, rgb: bool = False) -> np.ndarray:
    """(C, rows, columns) float32 from a PNG/JPEG."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if not rgb and img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float grey: keep the full range
                arr = np.asarray(img, dtype=np.float32)
            else:
                arr = np.asarray(img.convert("RGB" if rgb else "L"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise SpineautoError(f"{path}: unreadable image ({' '.join(str(e).split())[:200]}); remove or re-export it") from None
    return np.moveaxis(arr, -1, 0) if rgb else arr[None]


def picture_to_nifti(channel: np.ndarray, spacing: float = 1.0) -> nib.Nifti1Image:
    """(rows, columns) -> (X=columns, Y=rows bottom-up, 1) volume, RAS affine with ``spacing`` mm pixels."""
    from spineauto.io.formats import picture_affine, picture_to_volume

    return nib.Nifti1Image(picture_to_volume(channel[None])[0], picture_affine((spacing, spacing)))


def convert_image_folder(root: Path, dataset_dir: Path, head: str = "class", rgb: bool = False, spacing: float = 1.0,
                         overwrite: bool = False) -> Path:
    """Write ``dataset_dir`` (nnU-Net v2 raw layout, classification only) from an image folder."""
    if not (isinstance(spacing, (int, float)) and math.isfinite(spacing) and spacing > 0):
        raise SpineautoError(f"--spacing {spacing}: the pixel size must be a number of mm > 0")
    images = find_images(root)
    classes = sorted({im.cls for im in images})
    if len(classes) < 2:
        raise SpineautoError(f"{root}: only one class folder ({classes[0]}); a classifier needs at least two class folders")
    _case_ids(images)
    channels = {"0": "R", "1": "G", "2": "B"} if rgb else {"0": "image"}
    with staged_dataset_dir(Path(dataset_dir), overwrite, root) as stage:
        for im in images:
            pixels = read_picture(im.path, rgb)
            for c in range(pixels.shape[0]):
                nib.save(picture_to_nifti(pixels[c], spacing), str(stage / f"images{im.split}" / f"{im.case}_{c:04d}.nii.gz"))
        (stage / "labelsTr").rmdir()
        n_train = sum(im.split == "Tr" for im in images)
        write_dataset_json(
            stage, name=Path(dataset_dir).name, description=f"2D images from {Path(root).resolve()} (one folder per class)",
            labels={}, num_training=n_train, channel_names=channels,
            cases={im.case: {"subject": im.case, "classes": {head: im.cls}, "metadata": {"source": str(im.path), "split": im.split}}
                   for im in images},
        )
    log.info("%d images (%d training) in %d classes -> %s", len(images), n_train, len(classes), dataset_dir)
    return Path(dataset_dir)
