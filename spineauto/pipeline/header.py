"""What a scan's header says about the classes the pipeline's classification stages predict.

An image-only classifier trained on a few subjects does not transfer to an unseen site, while the
header usually knows: the BIDS suffix (``sub-01_T2w.nii.gz`` -> sequence ``T2w``), the DICOM tags
through the rules file of ``convert dicom --classes-from`` (the pipeline YAML's ``header_rules``), and
the view from the affine (the through-plane axis: :func:`spineauto.io.geometry.choose_slice_axis`).
A stage takes the header's class where it names one of the model's classes, runs the image classifier
as the fallback and as a cross-check, and flags a disagreement (:func:`decide`).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from spineauto.io.geometry import PLANE_OF_AXIS, choose_slice_axis

_BIDS = re.compile(r"^sub-[A-Za-z0-9]+(_[A-Za-z0-9]+-[A-Za-z0-9]+)*_(?P<suffix>[A-Za-z0-9]+)$")


def header_classes(name: str, affine: np.ndarray, shape, dicom_files: list[str] | None = None,
                   rules=None) -> dict[str, tuple[str, str]]:
    """Head -> (class, why) that the scan's name, DICOM tags and affine give."""
    from spineauto.io.formats import strip_ending

    out: dict[str, tuple[str, str]] = {}
    axis, why = choose_slice_axis(np.asarray(affine, float), tuple(shape[-3:]), isotropic_plane=None)
    if axis is not None:
        out["view"] = (PLANE_OF_AXIS[axis], f"affine: {why}")
    m = _BIDS.match(strip_ending(Path(name).name))
    if m:
        out["sequence"] = (m["suffix"], f"BIDS suffix _{m['suffix']}")
    if dicom_files and rules:
        from spineauto.datasets.dicom_rules import classify, header_values

        got = classify(rules, header_values(dicom_files[0]), f"DICOM series in {Path(dicom_files[0]).parent}")
        out.update({h: (c, f"DICOM {got.reasons[h]}") for h, c in got.classes.items()})
    return out


def decide(head: str, predicted: str, probability: float, classes: list[str], header: dict[str, tuple[str, str]]) -> dict:
    """The head's decision: the header's class when it names one of ``classes``, else the image
    classifier's; ``disagrees`` when both exist and differ."""
    if head in header and header[head][0] in classes:
        cls, why = header[head]
        return {"class": cls, "source": "header", "header_reason": why, "image_class": predicted,
                "disagrees": cls != predicted, "image_probability": probability}
    return {"class": predicted, "source": "image", "disagrees": False}
