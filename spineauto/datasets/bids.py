"""Convert a BIDS tree (spine-generic convention) into an nnU-Net v2 raw dataset.

Images are ``sub-X/[ses-Y/]anat/sub-X[_ses-Y][_entity-value...]_<contrast>.nii[.gz]``; masks are
``derivatives/labels/sub-X/[ses-Y/]anat/<image stem>_<label suffix>.nii[.gz]``. Images with a mask of
the base label go to ``imagesTr``/``labelsTr``, the others to ``imagesTs``. The contrast (the last
BIDS suffix) becomes the case's ``sequence`` class. The dataset is built in a temporary folder beside
``dataset_dir`` and renamed into place at the end (:mod:`spineauto.datasets.raw_dataset`), so a
failure never leaves a half-written dataset behind.

Labels (:func:`parse_labels`):

- one suffix (``--label-suffix S``, default ``seg-manual``, or one ``--label NAME=S``): the mask is
  copied as it is. A binary mask is the label NAME (``cord`` for the shorthand). A multi-valued mask
  is named by ``--label-names a,b,...`` (value k gets the k-th name); without it the values keep
  generic names ``label_<k>`` (value 1 keeps NAME when ``--label`` gave one) and a warning says so.
- several ``--label NAME=SUFFIX``: one 0/1 mask per label, merged into one label map. The first is the
  base (value 1) that makes an image a training case; each later one is painted over the map in the
  order given, with values 2, 3, ... A later-label voxel outside the base mask keeps the later label
  (a lesion outside the cord mask stays lesion). A training case without a later label's mask has
  none of that label ("absent lesion mask = no lesion", the usual BIDS convention); this is logged
  per case and recorded in the case's metadata as ``assumed_empty``.

Label names containing "lesion" are listed under ``lesion_labels`` in dataset.json.
"""
from __future__ import annotations

import gzip
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from spineauto.datasets.dataset_json import lesion_labels
from spineauto.datasets.raw_dataset import check_output_free, staged_dataset_dir, write_dataset_json
from spineauto.errors import SpineautoError
from spineauto.io.images import load_nifti

logger = logging.getLogger(__name__)

IMAGE_ENDINGS = (".nii.gz", ".nii")
SIDECAR_KEYS = ("SeriesDescription", "Manufacturer")
MAX_LABEL = 255  # masks are stored as uint8
DEFAULT_SUFFIX = "seg-manual"


@dataclass(frozen=True)
class LabelSpec:
    """A label read from the masks ``<image stem>_<suffix>.nii[.gz]``.

    ``named`` is False for the ``--label-suffix`` shorthand: a multi-valued mask then keeps today's
    generic names ``label_1 .. label_N``.
    """

    name: str
    suffix: str
    named: bool = True


@dataclass(frozen=True)
class LabelPlan:
    """What ``--label``, ``--label-suffix`` and ``--label-names`` ask for, checked."""

    specs: tuple[LabelSpec, ...]
    value_names: tuple[str, ...] = ()  # --label-names: the names of the values 1.. of one multi-valued mask

    @property
    def base(self) -> LabelSpec:
        return self.specs[0]

    @property
    def later(self) -> tuple[LabelSpec, ...]:
        return self.specs[1:]


@dataclass
class BidsCase:
    """One image of the BIDS tree, with its base mask and later-label masks if it has them."""

    case_id: str
    subject: str
    contrast: str
    image: Path
    mask: Path | None = None
    later_masks: dict[str, Path] = field(default_factory=dict)  # later label name -> mask
    metadata: dict[str, Any] = field(default_factory=dict)


def convert_bids(
    root: Path,
    dataset_dir: Path,
    label_suffix: str | None = None,
    contrasts: list[str] | None = None,
    label_name: str = "cord",
    overwrite: bool = False,
    labels: Sequence[str] | None = None,
    label_names: str | Sequence[str] | None = None,
) -> Path:
    """Write the BIDS tree at ``root`` as a raw dataset in ``dataset_dir``; return ``dataset_dir``.

    ``labels`` are ``NAME=SUFFIX`` strings (``--label``), ``label_suffix`` the one-label shorthand
    (named ``label_name``), ``label_names`` the names of a multi-valued mask's values; see
    :func:`parse_labels`.
    """
    plan = parse_labels(labels, label_suffix, label_names, label_name)
    root = Path(root).expanduser().resolve()
    dataset_dir = Path(dataset_dir).expanduser().resolve()
    if not root.is_dir():
        raise SpineautoError(f"BIDS root {root} does not exist or is not a folder")
    check_output_free(dataset_dir, overwrite, root)

    cases = find_bids_cases(root, plan)
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
        report_masks(case, plan)

    with staged_dataset_dir(dataset_dir, overwrite, root) as stage:
        mask_values: dict[int, Path] = {}  # value -> first mask holding it
        for case in cases:
            if case.mask is None:
                copy_nifti(case.image, stage / "imagesTs" / f"{case.case_id}_0000.nii.gz")
                continue
            copy_nifti(case.image, stage / "imagesTr" / f"{case.case_id}_0000.nii.gz")
            values = write_label_map(case, plan, stage / "labelsTr" / f"{case.case_id}.nii.gz")
            for v in values:
                mask_values.setdefault(v, case.mask)
        declared = declare_labels(mask_values, plan)
        entries = {
            c.case_id: {"subject": c.subject, "classes": {"sequence": c.contrast}, "metadata": c.metadata} for c in cases
        }
        n_train = sum(c.mask is not None for c in cases)
        write_dataset_json(
            stage,
            name=dataset_dir.name,
            description=f"Converted from BIDS dataset {root} by spineauto",
            labels=declared,
            num_training=n_train,
            cases=entries,
            lesion_labels=lesion_labels(name for name in declared if name != "background"),
        )
    logger.info(
        "converted %d images from %s into %s (%d with masks, %d without)",
        len(cases), root, dataset_dir, n_train, len(cases) - n_train,
    )
    return dataset_dir


# ------------------------------------------------------------------------------------------ labels


def parse_labels(
    labels: Sequence[str] | None = None,
    label_suffix: str | None = None,
    label_names: str | Sequence[str] | None = None,
    label_name: str = "cord",
) -> LabelPlan:
    """Check ``--label NAME=SUFFIX`` (repeatable), ``--label-suffix`` and ``--label-names``."""
    if labels and label_suffix is not None:
        raise SpineautoError("give either --label NAME=SUFFIX (repeatable) or --label-suffix SUFFIX, not both")
    if labels:
        specs = []
        for text in labels:
            name, sep, suffix = text.partition("=")
            name, suffix = name.strip(), suffix.strip()
            if not sep or not name or not suffix:
                raise SpineautoError(f"bad --label {text!r}: expected NAME=SUFFIX, e.g. --label cord=seg-manual")
            specs.append(LabelSpec(check_label_name(name, f"--label {text}"), check_suffix(suffix)))
    else:
        specs = [LabelSpec(check_label_name(label_name, "label name"), check_suffix(label_suffix or DEFAULT_SUFFIX), named=False)]
    for i, spec in enumerate(specs):
        for other in specs[:i]:
            if spec.name == other.name:
                raise SpineautoError(f"label name {spec.name!r} is given twice in --label; give each label once")
            if spec.suffix == other.suffix:
                raise SpineautoError(
                    f"mask suffix {spec.suffix!r} is given twice in --label (for {other.name} and {spec.name}); "
                    "one mask file makes one label"
                )
    names: tuple[str, ...] = ()
    if label_names is not None:
        parts = label_names.split(",") if isinstance(label_names, str) else list(label_names)
        names = tuple(check_label_name(n.strip(), "--label-names") for n in parts)
        if len(set(names)) != len(names):
            raise SpineautoError(f"--label-names {','.join(names)} gives a name twice; give each label once")
        if len(specs) > 1:
            raise SpineautoError(
                "--label-names names the values of one multi-valued mask; with several --label every mask "
                "is 0/1 and --label gives the names"
            )
        if specs[0].named and specs[0].name != names[0]:
            raise SpineautoError(
                f"--label {specs[0].name}={specs[0].suffix} and --label-names {','.join(names)} name value 1 "
                f"differently ({specs[0].name} vs {names[0]}); make them agree or use --label-suffix"
            )
    return LabelPlan(tuple(specs), names)


def check_label_name(name: str, where: str) -> str:
    if not name.isidentifier():
        raise SpineautoError(
            f"label name {name!r} ({where}) is not an identifier: use letters, digits and _, "
            "not starting with a digit (e.g. cord, ms_lesion)"
        )
    if name == "background":
        raise SpineautoError(f"label name 'background' ({where}) is reserved for value 0; choose another name")
    return name


def check_suffix(suffix: str) -> str:
    if "/" in suffix or "\\" in suffix or any(suffix.endswith(e) for e in IMAGE_ENDINGS) or suffix.startswith("_"):
        raise SpineautoError(
            f"bad mask suffix {suffix!r}: give the part after '<image>_' without .nii.gz, e.g. seg-manual"
        )
    return suffix


def declare_labels(values: dict[int, Path], plan: LabelPlan) -> dict[str, int]:
    """``labels`` of dataset.json: ``background`` plus one name per value (values are consecutive)."""
    if len(plan.specs) > 1:
        return {"background": 0, **{spec.name: i for i, spec in enumerate(plan.specs, start=1)}}
    if plan.value_names:
        return {"background": 0, **{name: i for i, name in enumerate(plan.value_names, start=1)}}
    spec = plan.base
    top = max(set(values) | {1})
    if top == 1:
        return {"background": 0, spec.name: 1}
    names = {v: f"label_{v}" for v in range(1, top + 1)}
    if spec.named:
        names[1] = spec.name
    unnamed = [v for v in range(1, top + 1) if names[v].startswith("label_")]
    found = sorted(v for v in values if v in unnamed)
    example = values[found[0]] if found else next(iter(values.values()))
    logger.warning(
        "mask values %s (e.g. in %s) have no name and are declared as %s; lesion labels are recognised by "
        "name, so name every value with --label-names (value k gets the k-th name), e.g. --label-names %s",
        ", ".join(map(str, found)), example, ", ".join(names[v] for v in unnamed),
        ",".join([spec.name if spec.named else "cord", "lesion", *[f"name{v}" for v in range(3, top + 1)]]),
    )
    return {"background": 0, **{names[v]: v for v in range(1, top + 1)}}


# --------------------------------------------------------------------------------------- discovery


def find_bids_cases(root: Path, plan: LabelPlan) -> list[BidsCase]:
    """Every ``sub-*`` anatomical image under ``root``, paired with its masks, sorted by case id."""
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

    masks = find_masks(root, [spec.suffix for spec in plan.specs], images)
    base = masks[plan.base.suffix]
    cases = []
    for stem in sorted(images):
        path = images[stem]
        rel = path.relative_to(root)
        subject = rel.parts[0]
        metadata: dict[str, Any] = {"source": rel.as_posix()}
        if rel.parts[1].startswith("ses-"):
            metadata["session"] = rel.parts[1]
        later = {spec.name: masks[spec.suffix][stem] for spec in plan.later if stem in masks[spec.suffix]}
        if stem in base:
            metadata["mask"] = base[stem].relative_to(root).as_posix()
            if plan.later:
                metadata["masks"] = {
                    plan.base.name: metadata["mask"], **{n: p.relative_to(root).as_posix() for n, p in later.items()}
                }
                absent = [spec.name for spec in plan.later if spec.name not in later]
                if absent:
                    metadata["assumed_empty"] = absent
        metadata.update(read_sidecar(path))
        cases.append(
            BidsCase(
                case_id=stem,
                subject=subject,
                contrast=stem.rsplit("_", 1)[-1],
                image=path,
                mask=base.get(stem),
                later_masks=later,
                metadata=metadata,
            )
        )
    return cases


def find_masks(root: Path, suffixes: Sequence[str], images: dict[str, Path]) -> dict[str, dict[str, Path]]:
    """Masks ``derivatives/labels/.../<image stem>_<suffix>.nii[.gz]``: suffix -> image stem -> mask.

    A file that ends with several of the suffixes belongs to the longest one whose image exists.
    """
    labels_root = root / "derivatives" / "labels"
    masks: dict[str, dict[str, Path]] = {s: {} for s in suffixes}
    for pattern in ("sub-*/anat/*.nii*", "sub-*/ses-*/anat/*.nii*"):
        for path in sorted(labels_root.glob(pattern)):
            stem = nifti_stem(path)
            if stem is None:
                continue
            matching = sorted((s for s in suffixes if stem.endswith(f"_{s}")), key=len, reverse=True)
            if not matching:
                continue
            suffix = next((s for s in matching if stem[: -len(s) - 1] in images), matching[0])
            image_stem = stem[: -len(suffix) - 1]
            if image_stem not in images:
                expected = path.parent.relative_to(labels_root) / f"{image_stem}.nii.gz"
                raise SpineautoError(
                    f"mask {path} has no image: expected {root / expected}; "
                    "remove the mask or add the image"
                )
            if image_stem in masks[suffix]:
                raise SpineautoError(f"two masks for {image_stem}: {masks[suffix][image_stem]} and {path}; keep one")
            masks[suffix][image_stem] = path
    return masks


def report_masks(case: BidsCase, plan: LabelPlan) -> None:
    """Log a later-label mask that is not used, and a training case assumed to lack a later label."""
    if case.mask is None:
        for name, path in case.later_masks.items():
            logger.warning(
                "%s: ignoring %s mask %s: the image has no %s mask (_%s), so it goes to imagesTs without labels",
                case.case_id, name, path, plan.base.name, plan.base.suffix,
            )
        return
    for name in case.metadata.get("assumed_empty", []):
        suffix = next(s.suffix for s in plan.later if s.name == name)
        logger.info("%s: no %s mask (_%s): no %s in this case", case.case_id, name, suffix, name)


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


def read_mask(mask_path: Path, image_path: Path) -> tuple[np.ndarray, Any]:
    """The mask rounded to uint8, checked to lie on the image's grid; with the loaded mask image."""
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
    return data.astype(np.uint8), mask


def check_binary(values: np.ndarray, mask_path: Path, spec: LabelSpec, value: int) -> np.ndarray:
    """``values == 1``, after checking that the mask holds only 0 and 1."""
    found = np.unique(values)
    if found.max(initial=0) > 1:
        raise SpineautoError(
            f"mask {mask_path} holds values {', '.join(map(str, found))}, but the mask of --label "
            f"{spec.name}={spec.suffix} must be 0/1 (it becomes value {value}); with several --label every "
            "mask is binary (for one multi-valued mask use a single --label and --label-names)"
        )
    return values == 1


def write_label_map(case: BidsCase, plan: LabelPlan, target: Path) -> set[int]:
    """Write the case's label map (uint8, on the base mask's header); return the values it holds.

    With several labels the base mask is value 1 and each later mask, in order, paints its voxels
    with its value over whatever is there, inside the base mask or not.
    """
    assert case.mask is not None
    values, mask = read_mask(case.mask, case.image)
    if plan.later:
        base = check_binary(values, case.mask, plan.base, 1)
        values = base.astype(np.uint8)
        for value, spec in enumerate(plan.specs[1:], start=2):
            path = case.later_masks.get(spec.name)
            if path is None:
                continue
            later = check_binary(read_mask(path, case.image)[0], path, spec, value)
            outside = int((later & ~base).sum())
            if outside:
                logger.info(
                    "%s: %d %s voxels lie outside the %s mask; kept as %s",
                    case.case_id, outside, spec.name, plan.base.name, spec.name,
                )
            values[later] = value
    elif plan.value_names and values.max(initial=0) > len(plan.value_names):
        raise SpineautoError(
            f"mask {case.mask} holds values up to {values.max()} but --label-names names only "
            f"{len(plan.value_names)} ({','.join(plan.value_names)}); name every value"
        )
    header = mask.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(type(mask)(values, mask.affine, header), str(target))
    return {int(v) for v in np.unique(values)}
