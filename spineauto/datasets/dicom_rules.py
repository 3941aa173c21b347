"""Classification labels of DICOM series from their header tags, by a small rules file.

``spineauto convert dicom ROOT ... --classes-from rules.yaml``::

    sequence:                     # a head
      T2w:                        # one of its classes
        SeriesDescription: "(?i)t2(?!\\*|star)"   # tag keyword: a regular expression (searched, not anchored)
      T1w:
        - SeriesDescription: "(?i)t1"            # a list: any of these rule sets (each: all of its tags)
        - ProtocolName: "(?i)mprage"
    view:
      sagittal: {orientation: sagittal}          # orientation: from ImageOrientationPatient (axial/coronal/sagittal)

Any DICOM keyword of the series' first file can be matched (``SeriesDescription``, ``ProtocolName``,
``ScanningSequence``, ``SequenceName``, ``BodyPartExamined`` ...); ``orientation`` is the plane the
slices lie in. A series gets a head's class when exactly one class's rules match; two classes matching
is an error naming both, no class matching leaves the series unlabelled for that head (listed, never
guessed). Every decision keeps its reason (``SeriesDescription='T2 SAG' ~ /(?i)t2/``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spineauto.errors import SpineautoError
from spineauto.schema import load_yaml_mapping

ORIENTATION = "orientation"


@dataclass
class SeriesClasses:
    """What the rules gave one series: head -> class, head -> why, and the heads no rule matched."""

    classes: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)


Rules = dict[str, dict[str, list[dict[str, re.Pattern]]]]  # head -> class -> alternatives of {tag: pattern}


def load_rules(path: Path) -> Rules:
    """The rules file, checked: every problem in one line naming the file and the place."""
    raw = load_yaml_mapping(path, "classes rules file", "pass a YAML file of head -> class -> {tag: regular expression}")
    rules: Rules = {}
    for head, classes in raw.items():
        if not isinstance(classes, dict) or len(classes) < 2:
            raise SpineautoError(f"{path}: head {head!r} must map at least two classes to their rules, e.g. {head}: {{A: {{SeriesDescription: a}}, B: ...}}")
        rules[str(head)] = {}
        for cls, spec in classes.items():
            alternatives = spec if isinstance(spec, list) else [spec]
            compiled = []
            for alt in alternatives:
                if not isinstance(alt, dict) or not alt:
                    raise SpineautoError(f"{path}: {head}.{cls} must be a mapping of DICOM keyword -> regular expression (or a list of them)")
                entry = {}
                for tag, pattern in alt.items():
                    try:
                        entry[str(tag)] = re.compile(str(pattern))
                    except re.error as e:
                        raise SpineautoError(f"{path}: {head}.{cls}.{tag}: invalid regular expression {pattern!r} ({e})") from None
                compiled.append(entry)
            rules[str(head)][str(cls)] = compiled
    return rules


def series_plane(orientation) -> str:
    """axial / coronal / sagittal: the patient axis closest to the normal of ImageOrientationPatient's rows and columns."""
    values = np.asarray([float(v) for v in orientation], float)
    normal = np.abs(np.cross(values[:3], values[3:]))
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]


def header_values(file: str) -> dict[str, str]:
    """Keyword -> value (as text) of one DICOM file's header, plus ``orientation``."""
    import pydicom

    ds = pydicom.dcmread(file, stop_before_pixels=True)
    values = {}
    for element in ds:
        if element.keyword and element.VR != "SQ":
            v = element.value
            values[element.keyword] = "\\".join(str(x) for x in v) if isinstance(v, (list, pydicom.multival.MultiValue)) else str(v)
    if "ImageOrientationPatient" in ds:
        values[ORIENTATION] = series_plane(ds.ImageOrientationPatient)
    return values


def classify(rules: Rules, values: dict[str, str], series: str) -> SeriesClasses:
    """The classes ``rules`` give a series with header ``values``; ``series`` names it in errors."""
    out = SeriesClasses()
    for head, classes in rules.items():
        hits = {}
        for cls, alternatives in classes.items():
            for alt in alternatives:
                if all(values.get(tag) is not None and pattern.search(values[tag]) for tag, pattern in alt.items()):
                    hits[cls] = ", ".join(f"{tag}={values[tag]!r} ~ /{pattern.pattern}/" for tag, pattern in alt.items())
                    break
        if len(hits) > 1:
            first, second = list(hits)[:2]
            raise SpineautoError(f"{series}: the rules of head {head!r} match two classes, {first!r} ({hits[first]}) and "
                                 f"{second!r} ({hits[second]}); make the rules exclusive")
        if hits:
            (cls, why), = hits.items()
            out.classes[head], out.reasons[head] = cls, why
        else:
            out.unmatched.append(head)
    return out
