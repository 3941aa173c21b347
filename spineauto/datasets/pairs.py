"""A plain folder of images and a folder of masks -> a raw segmentation dataset.

``IMAGES/x.png`` pairs with ``MASKS/x<mask_suffix>.png`` (any format :mod:`spineauto.io.formats`
reads, the mask's format may differ from the image's). Each image is copied unchanged to
``imagesTr/<case>_0000<ending>`` and its mask is written in the image's format and grid to
``labelsTr/<case><ending>`` after checking that the grids match and that every value is a declared
label. An image without a mask becomes a test case (``imagesTs``); a mask without an image is an
error (a naming mistake, never guessed at). Case names are the stems made filesystem-safe.
"""
from __future__ import annotations

import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spineauto.datasets.raw_dataset import staged_dataset_dir, write_dataset_json
from spineauto.errors import SpineautoError
from spineauto.io.formats import PICTURE_ENDINGS, TIFF_ENDINGS, ending_of, strip_ending
from spineauto.io.images import grid_mismatch, read_image, read_volume, write_label_map

log = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")


@dataclass
class PairsReport:
    dataset: Path
    pairs: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # case -> (image, mask)
    images_without_mask: list[Path] = field(default_factory=list)  # became test cases
    labels: dict[str, int] = field(default_factory=dict)


def parse_labels(specs: list[str] | None) -> dict[str, int] | None:
    """``["cord=1", "lesion=2"]`` -> {"background": 0, "cord": 1, "lesion": 2}; None when not given."""
    if not specs:
        return None
    labels = {"background": 0}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name.strip() or not value.strip().isdigit() or int(value) == 0:
            raise SpineautoError(f"--label {spec!r}: expected NAME=VALUE with an integer value > 0, e.g. --label cord=1")
        if name.strip() in labels or int(value) in labels.values():
            raise SpineautoError(f"--label {spec!r}: name or value given twice")
        labels[name.strip()] = int(value)
    return labels


def _images_in(folder: Path, what: str) -> list[Path]:
    if not Path(folder).is_dir():
        raise SpineautoError(f"{folder}: {what} folder not found")
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".") and ending_of(p))
    if not files:
        raise SpineautoError(f"{folder}: no image files in the {what} folder (.nii.gz, .nrrd, .mha, .png, .bmp, .tif ...)")
    return files


def _case_name(stem: str, taken: set[str]) -> str:
    base = _UNSAFE.sub("_", stem).strip("_") or "case"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def _stem(path: Path) -> str:
    stem = strip_ending(path.name)
    return stem[:-5] if stem.endswith("_0000") else stem  # nnU-Net's channel suffix is not part of the name


def match_pairs(images: list[Path], masks: list[Path], mask_suffix: str = "") -> tuple[dict[str, tuple[Path, Path | None]], list[Path]]:
    """({case: (image, mask or None)}, masks without an image); stems that two images share are an error."""
    by_stem: dict[str, Path] = {}
    for p in images:
        other = by_stem.setdefault(_stem(p), p)
        if other != p:
            raise SpineautoError(f"{p.parent}: {other.name} and {p.name} have the same name; keep one of them")
    mask_of: dict[str, Path] = {}
    stray = []
    for m in masks:
        stem = _stem(m)
        if mask_suffix and stem.endswith(mask_suffix):
            stem = stem[: -len(mask_suffix)]
        if stem in mask_of:
            raise SpineautoError(f"{m.parent}: {mask_of[stem].name} and {m.name} are both masks of {by_stem[stem].name}; keep one of them")
        if stem in by_stem:
            mask_of[stem] = m
        else:
            stray.append(m)
    taken: set[str] = set()
    return {_case_name(stem, taken): (img, mask_of.get(stem)) for stem, img in sorted(by_stem.items())}, stray


def convert_pairs(images_dir: Path, masks_dir: Path, dataset_dir: Path, labels: dict[str, int] | None = None,
                  mask_suffix: str = "", pixel_spacing: float | None = None, overwrite: bool = False) -> PairsReport:
    """Write ``dataset_dir`` from matched image/mask pairs; see the module doc."""
    if pixel_spacing is not None and not (math.isfinite(pixel_spacing) and pixel_spacing > 0):
        raise SpineautoError(f"--spacing {pixel_spacing}: the pixel size must be a number of mm > 0")
    images, masks = _images_in(images_dir, "images"), _images_in(masks_dir, "masks")
    endings = sorted({ending_of(p) for p in images})
    if len(endings) > 1:
        raise SpineautoError(f"{images_dir}: images in several formats ({', '.join(endings)}); a dataset has one file_ending, "
                             "convert them to one format first")
    ending = endings[0]
    cases, stray = match_pairs(images, masks, mask_suffix)
    if stray:
        names = ", ".join(p.name for p in stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
        hint = f" with suffix {mask_suffix!r}" if mask_suffix else " (pass --mask-suffix if masks are named <image><suffix>)"
        raise SpineautoError(f"{masks_dir}: {len(stray)} mask(s) match no image by name{hint}: {names}; rename or remove them")
    if not any(mask for _, mask in cases.values()):
        raise SpineautoError(f"{masks_dir}: no mask matches an image of {images_dir} by name; name each mask as its image")
    report = PairsReport(dataset=Path(dataset_dir))
    spacing = (pixel_spacing, pixel_spacing) if pixel_spacing else None
    found: set[int] = set()
    channels = None
    with staged_dataset_dir(Path(dataset_dir), overwrite, [images_dir, masks_dir]) as stage:
        for case, (image, mask) in cases.items():
            data, affine = read_image(image, pixel_spacing=spacing)
            if channels is None:
                channels = data.shape[0]
            elif data.shape[0] != channels:
                raise SpineautoError(f"{image}: {data.shape[0]} channel(s) where the other images have {channels}; "
                                     "make every image grey-scale or every image colour")
            split = "Tr" if mask is not None else "Ts"
            shutil.copyfile(image, stage / f"images{split}" / f"{case}_0000{ending}")
            if ending in TIFF_ENDINGS:  # a 3D tif's spacing file travels with it (nnU-Net's <case>.json)
                aux = image.with_name(_stem(image) + ".json")
                if aux.is_file():
                    shutil.copyfile(aux, stage / f"images{split}" / f"{case}.json")
            if mask is None:
                report.images_without_mask.append(image)
                continue
            seg, seg_affine = read_volume(mask, pixel_spacing=spacing)
            problem = grid_mismatch(data.shape[1:], affine, seg.shape, seg_affine)
            if problem:
                raise SpineautoError(f"{mask}: mask grid does not match its image {image.name}: {problem}; "
                                     "resample the mask onto the image or pair it with the right image")
            if not np.array_equal(seg, np.round(seg)) or seg.min() < 0 or seg.max() > 255:
                raise SpineautoError(f"{mask}: mask has non-integer, negative or > 255 values; a mask holds label values 0, 1, 2 ...")
            values = set(np.unique(seg).astype(int).tolist())
            if labels is not None and values - set(labels.values()):
                raise SpineautoError(f"{mask}: label values {sorted(values - set(labels.values()))} not given by --label "
                                     f"({', '.join(f'{k}={v}' for k, v in labels.items() if v)}); add --label NAME=VALUE for each")
            found |= values
            write_label_map(stage / "labelsTr" / f"{case}{ending}", seg.astype(np.int16), image)
            report.pairs[case] = (image, mask)
        report.labels = labels or {"background": 0, **{("foreground" if found == {0, 1} else f"label_{v}"): v for v in sorted(found - {0})}}
        channel_names = {"0": "R", "1": "G", "2": "B"} if channels == 3 and ending in PICTURE_ENDINGS + TIFF_ENDINGS else \
            {str(c): f"channel_{c}" if channels > 1 else "image" for c in range(channels)}
        write_dataset_json(
            stage, name=Path(dataset_dir).name, description=f"image/mask pairs from {Path(images_dir).resolve()} and {Path(masks_dir).resolve()}",
            labels=report.labels, num_training=len(report.pairs), channel_names=channel_names, file_ending=ending,
            cases={case: {"subject": case, "metadata": {"source": str(image), **({"mask": str(mask)} if mask else {})}}
                   for case, (image, mask) in cases.items()},
            extra={"pixel_spacing": pixel_spacing} if pixel_spacing and ending in PICTURE_ENDINGS + TIFF_ENDINGS else None,
        )
    log.info("%d pairs, %d image(s) without a mask (test cases) -> %s", len(report.pairs), len(report.images_without_mask), dataset_dir)
    return report
