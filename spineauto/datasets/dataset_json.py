"""The raw dataset description: nnU-Net v2's dataset.json plus per-case classification labels.

Any nnU-Net v2 raw dataset works unchanged, in any ``file_ending`` :mod:`spineauto.io.formats`
reads. spineauto adds optional keys: ``heads`` (head name -> its class names), ``cases`` (case id ->
subject, classes, metadata) and ``pixel_spacing`` (mm per pixel of 2D pictures, which carry no
geometry: a number or [row, column]; 1 mm when absent). See raw_data_templates/README.md.

Sparse labels follow nnU-Net v2 (>= 2.2): a label named ``ignore`` (one integer, the highest value:
every other value + 1) marks voxels nobody labelled. It is no class: it is kept out of ``labels``
(and so out of the network's outputs) and held in ``ignore_label``; training masks it out of the loss,
sampling and validation, ``evaluate`` out of every metric.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from spineauto.errors import SpineautoError


@dataclass
class CaseInfo:
    subject: str | None = None
    classes: dict[str, str] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


@dataclass
class DatasetInfo:
    folder: Path
    name: str
    channel_names: dict[str, str]
    labels: dict[str, int]  # name -> value; empty for a classification-only dataset
    num_training: int
    file_ending: str
    heads: dict[str, list[str]] = field(default_factory=dict)
    cases: dict[str, CaseInfo] = field(default_factory=dict)
    lesion_labels: list[str] = field(default_factory=list)
    pixel_spacing: tuple[float, float] | None = None
    regions: dict[str, list[int]] = field(default_factory=dict)  # region name -> label-map values (region-based labels)
    ignore_label: int | None = None  # the value of unlabelled voxels (nnU-Net's "ignore"); not a class

    @property
    def class_values(self) -> list[int]:
        """The label-map values that are classes (of a region dataset: every value of a region); never the ignore value."""
        return sorted(set(self.labels.values()) | {v for values in self.regions.values() for v in values})

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def has_segmentation(self) -> bool:
        return len(self.labels) > 1

    @property
    def label_values(self) -> list[int]:
        """The values a label map may hold: the classes' and the ignore value."""
        return self.class_values + ([self.ignore_label] if self.ignore_label is not None else [])

    def training_cases(self) -> list[str]:
        return _cases_in(self.folder / "imagesTr", self.file_ending)

    def test_cases(self) -> list[str]:
        return _cases_in(self.folder / "imagesTs", self.file_ending)

    def channel_files(self, case: str, split: str = "Tr") -> list[Path]:
        """One file per declared channel, as nnU-Net names them."""
        return [self.folder / f"images{split}" / f"{case}_{int(c):04d}{self.file_ending}" for c in sorted(self.channel_names, key=int)]

    def image_files(self, case: str, split: str = "Tr") -> list[Path]:
        """The channel files up to the last one present: a NIfTI file holds one channel, but one RGB
        picture (or vector image) several (nnU-Net's PNG datasets declare R, G, B with one ``_0000`` file)."""
        files = self.channel_files(case, split)
        present = [i for i, f in enumerate(files) if f.is_file()]
        return files if self.file_ending in (".nii.gz", ".nii") or not present else files[: present[-1] + 1]

    def label_file(self, case: str, split: str = "Tr") -> Path:
        return self.folder / f"labels{split}" / f"{case}{self.file_ending}"

    def subject_of(self, case: str) -> str:
        info = self.cases.get(case)
        if info and info.subject:
            return info.subject
        if case.startswith("sub-"):
            return case.split("_")[0]
        return case


def lesion_labels(labels: Iterable[str], declared: Iterable[str] | None = None) -> list[str]:
    """The lesion labels among ``labels`` (names): those dataset.json declares as ``lesion_labels``
    if it declares any, else every label whose name contains "lesion"."""
    names = list(labels)
    return [k for k in declared if k in names] if declared else [k for k in names if "lesion" in k.lower()]


def _cases_in(folder: Path, ending: str) -> list[str]:
    if not folder.is_dir():
        return []
    names = {p.name[: -len(ending)][:-5] for p in folder.iterdir() if p.name.endswith(ending) and p.name[: -len(ending)][-5:-4] == "_"}
    return sorted(names)


def load_dataset_json(folder: Path) -> DatasetInfo:
    """Read and check ``folder/dataset.json``; every problem at once, as one message."""
    path = folder / "dataset.json"
    if not path.is_file():
        raise SpineautoError(f"{path}: dataset.json is missing; copy a template from raw_data_templates/ and fill it in")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SpineautoError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, or nested too deeply
        raise SpineautoError(f"{path}: not a readable JSON file ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not isinstance(raw, dict):
        raise SpineautoError(f"{path}: must be a JSON object")
    problems = []
    for key in ("channel_names", "file_ending"):
        if key not in raw:
            problems.append(f"missing key {key!r}")
    channels = raw.get("channel_names") or raw.get("modality") or {}
    if (not isinstance(channels, dict) or not channels or not all(str(k).isdigit() for k in channels)
            or not all(isinstance(v, str) and v.strip() for v in channels.values())):
        problems.append("'channel_names' must map channel numbers to names, e.g. {\"0\": \"MRI\"}")
        channels = {}
    labels = raw.get("labels", {})
    labels, ignore = split_ignore(labels, problems)
    regions: dict[str, list[int]] = {}
    if isinstance(labels, dict) and any(isinstance(v, list) for v in labels.values()):
        labels, regions = region_labels(labels, raw.get("regions_class_order"), problems)
    elif isinstance(labels, dict) and "regions_class_order" in raw:
        problems.append("'regions_class_order' is given but no label is a region (a list of values, e.g. \"cord\": [1, 2])")
    if not isinstance(labels, dict) or (labels and not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values())):
        problems.append("'labels' must map label names to integer values, or to lists of values for regions (with 'regions_class_order')")
        labels = {}
    if labels and labels.get("background", 0) != 0:
        problems.append("'labels' must have background = 0")
    elif labels and not regions and sorted({0, *labels.values()}) != list(range(max(labels.values()) + 1)):
        problems.append(f"'labels' values must be consecutive 0, 1, 2 ... (one output channel each, as nnU-Net), "
                        f"not {sorted(set(labels.values()))[:10]}; renumber the label maps and dataset.json")
    check_ignore(ignore, labels, regions, problems)
    heads = raw.get("heads", {})
    if not isinstance(heads, dict) or not all(isinstance(v, list) for v in heads.values()):
        problems.append("'heads' must map head names to lists of class names")
        heads = {}
    for head, classes in heads.items():
        if len(classes) < 2:
            problems.append(f"head {head!r} has a single class {classes}: a classifier needs at least two; remove the head")
        if len(set(classes)) != len(classes):
            problems.append(f"head {head!r} lists a class twice")
    cases = {}
    for case, info in (raw.get("cases") or {}).items():
        if not isinstance(info, dict):
            problems.append(f"cases[{case!r}] must be an object")
            continue
        cases[case] = CaseInfo(subject=info.get("subject"), classes=dict(info.get("classes") or {}), metadata=dict(info.get("metadata") or {}))
    pixel_spacing = parse_pixel_spacing(raw.get("pixel_spacing"), problems)
    try:
        num_training = int(raw.get("numTraining", -1))
    except (TypeError, ValueError):
        problems.append("'numTraining' must be an integer")
        num_training = -1
    if problems:
        raise SpineautoError(f"{path}: " + "; ".join(problems))
    return DatasetInfo(
        folder=folder, name=raw.get("name", folder.name), channel_names={str(k): v for k, v in channels.items()},
        labels={"background": 0, **labels} if labels else {}, num_training=num_training, file_ending=raw["file_ending"],
        heads={k: list(v) for k, v in heads.items()}, cases=cases, lesion_labels=lesion_labels(labels, raw.get("lesion_labels")),
        pixel_spacing=pixel_spacing, regions=regions, ignore_label=ignore,
    )


IGNORE = "ignore"  # nnU-Net v2's name of the label of unlabelled voxels


def split_ignore(labels, problems: list[str]) -> tuple:
    """(``labels`` without ``ignore``, the ignore value or None); a bad ``ignore`` goes to ``problems``."""
    if not isinstance(labels, dict) or IGNORE not in labels:
        return labels, None
    rest = {k: v for k, v in labels.items() if k != IGNORE}
    value = labels[IGNORE]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        problems.append(f"label 'ignore' must be one integer value > 0 (the highest; nnU-Net's convention), not {value!r}")
        return rest, None
    return rest, value


def check_ignore(ignore: int | None, labels: dict, regions: dict[str, list[int]], problems: list[str]) -> None:
    """nnU-Net's rule: the ignore value is the highest, every class value (region members included) + 1."""
    if ignore is None or not isinstance(labels, dict):
        return
    values = {v for v in labels.values() if isinstance(v, int)} | {v for members in regions.values() for v in members} | {0}
    if ignore != max(values) + 1:
        problems.append(f"label 'ignore' = {ignore} must be the highest value, {max(values) + 1} (every other label value + 1, "
                        f"as nnU-Net requires); renumber it in dataset.json and the label maps")


def parse_pixel_spacing(value, problems: list[str]) -> tuple[float, float] | None:
    """dataset.json's ``pixel_spacing`` (mm of a picture's rows and columns: a number or [row, column])
    as (row, column); None when absent, or when invalid (with the problem added to ``problems``)."""
    if value is None:
        return None
    pair = value if isinstance(value, list) else [value, value]
    if len(pair) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf") for v in pair):
        problems.append(f"'pixel_spacing' must be a number of mm > 0 or [row, column] mm, not {value!r}")
        return None
    return float(pair[0]), float(pair[1])


def region_labels(labels: dict, order, problems: list[str]) -> tuple[dict[str, int], dict[str, list[int]]]:
    """nnU-Net's region labels: ``{"background": 0, "cord": [1, 2], "lesion": 2}`` with
    ``regions_class_order`` (the label value each region is written as, in the order they are painted:
    a later region overwrites an earlier one) -> (name -> written value, name -> label-map values).
    spineauto needs the written values to be 1..R (one output channel each)."""
    names = [k for k in labels if k != "background"]
    regions = {}
    for name in names:
        v = labels[name]
        values = [v] if isinstance(v, int) and not isinstance(v, bool) else v
        if not (isinstance(values, list) and values and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in values)):
            problems.append(f"region {name!r} must be a value > 0 or a list of them, not {v!r}")
            return {}, {}
        regions[name] = sorted(set(values))
    if labels.get("background", 0) not in (0, [0]):
        problems.append("'labels' must have background = 0")
    if not (isinstance(order, list) and sorted(order) == list(range(1, len(names) + 1))):
        problems.append(f"'regions_class_order' must list the value each of the {len(names)} region(s) {names} is written as, "
                        f"in their order, each of 1..{len(names)} once (e.g. {list(range(1, len(names) + 1))}), not {order!r}")
        return {}, {}
    return {"background": 0, **{name: int(o) for name, o in zip(names, order)}}, regions
