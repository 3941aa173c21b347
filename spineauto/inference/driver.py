"""The one case driver: ``spineauto predict`` and the end-of-training validation run every case
through :func:`predict_cases`.

A *case source* (:class:`CaseSource`) hands over one preprocessed case and knows how to write a mask
in its own geometry: a new scan (:class:`spineauto.inference.inputs.InputCase`: read, reoriented and
preprocessed per the plan) or a preprocessed training case (the trainer's validation). For each
case the networks run once (:func:`~spineauto.inference.predictor.run_networks`), and from that one
output the driver writes, as the configuration has them:

- ``<case>.nii.gz``: labels restored to the input's exact grid, postprocessed;
- ``<case>.npz``: probabilities in the input's grid (``save_probabilities``), for ensembles;
- ``<case>.json`` and ``classification.csv``: each head's class and probabilities;
- ``<case>.json`` of a segmentation whose output may be wrong: ``qc``, a list of reasons (today the cord
  choice's "uncertain cord: ...", :func:`~spineauto.inference.postprocessing.choose_cord_component`,
  which weighs the network's cord probability and, with test-time augmentation, whether each
  mirrored pass alone puts the cord on the same tube: the one pass of the networks hands both over);
  a classification's ``<case>.json`` carries the same ``qc`` list (empty when nothing was doubtful).

Every write is atomic; a failing case (a :class:`~spineauto.errors.SpineautoError`, an OS error
while reading or writing, or any other error of that case) leaves none of its files behind, the
other cases still run, and the failures are reported together at the end. A prediction with label
values the model does not declare is written with a warning naming the case.
"""
from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from spineauto.errors import SpineautoError
from spineauto.inference.classify import CaseClassification, aggregate_slices, write_case_json, write_classification_csv
from spineauto.inference.export import (check_writable, error_message, failures_error, remove_case_outputs, remove_temporaries,
                                        warn_undeclared_labels, write_probabilities, writing)
from spineauto.inference.model import TrainedModel
from spineauto.inference.postprocessing import CordEvidence, apply_postprocessing, choose_cord_component, superior_axis
from spineauto.inference.predictor import pass_names, run_networks
from spineauto.inference.restore import Restoration
from spineauto.io.atomic import write_json

log = logging.getLogger(__name__)
SEGMENTATION_KIND = "spineauto.segmentation"  # <case>.json of a segmentation with quality-control reasons


class CaseSource(Protocol):
    name: str

    @property
    def source(self) -> str: ...  # what to name in a message (a file, a series)
    def preprocessed(self, model: TrainedModel) -> tuple[np.ndarray, dict]: ...  # (C, S, H, W) + restore properties
    def write_mask(self, target: Path, labels: np.ndarray) -> Path: ...  # uint8 (X, Y, Z) in the case's own geometry
    mask_ending: str  # the mask file's ending: the case's own format (".nii.gz", ".png", ".nrrd" ...)
    # optional, for configurations that localise first: preprocessed(model) cropped to a box around
    # ``mask`` ((X, Y, Z) bool in the case's grid) widened by margin_mm; sources without it predict in one pass
    # def preprocessed_around(self, model, mask, margin_mm) -> tuple[np.ndarray, dict]: ...


@dataclass
class CasePrediction:
    case: str
    labels: np.ndarray | None  # (X, Y, Z) uint8 in the input's grid, postprocessed; None without segmentation
    classification: CaseClassification | None
    files: list[Path] = field(default_factory=list)
    qc: list[str] = field(default_factory=list)  # quality-control reasons, e.g. "uncertain cord: ..."


@dataclass
class PredictResult:
    written: list[Path] = field(default_factory=list)  # masks
    classifications: list[CaseClassification] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class CaseInference:
    """One case's outputs in memory, in the input's grid (what :func:`infer` returns)."""

    labels: np.ndarray | None  # (X, Y, Z) uint8, postprocessed; None without segmentation
    probabilities: np.ndarray | None  # (K, X, Y, Z) float32 when asked
    classification: CaseClassification | None
    qc: list[str] = field(default_factory=list)  # why the output may be wrong (the cord choice's "uncertain cord: ...")
    cord_evidence: CordEvidence | None = None  # the cord's probability (and passes), until the localise plan's choice


def cord_label(model: TrainedModel) -> int | None:
    """The label value whose component is the cord: the localise plan's, else the first postprocessing cord label."""
    if model.plan.localise is not None:
        return model.plans.cord_value(model.plan)
    labels = model.postprocessing.get("cord_component_labels", [])
    return int(labels[0]) if labels else None


def infer(model: TrainedModel, layout: np.ndarray, props: dict, case: str, tta: bool = True, batch_slices: int | None = None,
          probabilities: bool = False) -> CaseInference:
    """Run the networks once over a preprocessed case and restore what the configuration outputs."""
    cord = cord_label(model) if model.plan.has_segmentation else None
    restoration = (Restoration(props, probabilities, cord, pass_names(model.plan.augmentation.mirror_axes))
                   if model.plan.has_segmentation else None)  # fed slab by slab
    out = run_networks(model.networks, layout, model.plan, model.device, tta=tta, batch_slices=batch_slices,
                       seg_sink=restoration.add if restoration else None, region_order=model.plans.region_order,
                       pass_channel=cord, pass_sink=restoration.add_passes if restoration else None)
    result = CaseInference(None, None, None)
    if restoration is not None:
        evidence = restoration.cord_evidence()
        result.labels = apply_postprocessing(restoration.labels(), model.postprocessing, np.asarray(props["geometry"]["affine"], float),
                                             qc=result.qc, evidence=evidence)
        if model.plan.localise is not None:  # for localise()'s cord choice; otherwise let go now
            result.cord_evidence = evidence
        if probabilities:
            result.probabilities = restoration.probabilities()
    if out.cls is not None:
        classes = {h.name: list(h.classes) for h in model.plan.heads}
        result.classification = CaseClassification(case=case, probabilities={h: aggregate_slices(out.cls[h]) for h in classes},
                                                   classes=classes, n_slices=int(next(iter(out.cls.values())).shape[0]))
    return result


def localise(model: TrainedModel, case: CaseSource, first: CaseInference, props: dict, tta: bool = True,
             batch_slices: int | None = None, probabilities: bool = False) -> CaseInference:
    """The configuration's :class:`~spineauto.planning.plans.LocalisePlan`: the cord component of
    ``first`` (the whole image); with ``second_pass``, the networks again on a box around it
    (in-plane: around the cord wherever it was found; along S-I: the whole scan) and the cord
    component of that. A first pass without a cord is returned as it is."""
    loc = model.plan.localise
    value = model.plans.labels[loc.label]
    affine = np.asarray(props["geometry"]["affine"], dtype=float)
    choice = choose_cord_component(first.labels, value, affine, first.cord_evidence)
    first.labels, first.qc, first.cord_evidence = choice.seg, _merge(first.qc, choice.reasons), None
    cord = first.labels == value
    if not loc.second_pass or not cord.any():
        return first
    # the cord runs through the whole scan along S-I: the box spans it there, even where the first pass missed the cord
    si = superior_axis(affine)
    along = np.broadcast_to(cord.any(axis=si, keepdims=True), cord.shape)
    layout, box_props = case.preprocessed_around(model, along, loc.margin_mm)
    second = infer(model, layout, box_props, case.name, tta, batch_slices, probabilities)
    choice = choose_cord_component(second.labels, value, affine, second.cord_evidence)
    second.labels, second.qc, second.cord_evidence = choice.seg, _merge(_merge(first.qc, second.qc), choice.reasons), None
    second.classification = first.classification
    return second


def _merge(a: list[str], b: list[str]) -> list[str]:
    return a + [r for r in b if r not in a]


def predict_case(model: TrainedModel, case: CaseSource, output: Path, tta: bool = True, save_probabilities: bool = False,
                 batch_slices: int | None = None) -> CasePrediction:
    """Preprocess once, run the networks once (twice for a configuration whose localise plan has a
    second pass: on the whole image, then around the cord found there), write every output of one
    case into ``output``."""
    layout, props = case.preprocessed(model)
    res = infer(model, layout, props, case.name, tta, batch_slices, probabilities=save_probabilities)
    del layout
    if model.plan.localise is not None and res.labels is not None and hasattr(case, "preprocessed_around"):
        res = localise(model, case, res, props, tta, batch_slices, save_probabilities)
    if res.labels is not None:
        warn_undeclared_labels(case.name, res.labels, model.label_values)
    pred = CasePrediction(case.name, res.labels, res.classification, qc=list(res.qc))
    for reason in pred.qc:
        log.warning("%s: %s", case.name, reason)
    if res.labels is not None:
        mask = case.write_mask(output / f"{case.name}{case.mask_ending}", res.labels)
        pred.files.append(mask)
        if save_probabilities:
            pred.files.append(write_probabilities(output / f"{case.name}.npz", res.probabilities, mask, model.label_values))
    extra = {"source": case.source, "folds": list(model.folds), "configuration": model.plan.name}
    if pred.files:
        extra["mask"] = pred.files[0].name
    if res.classification is not None:
        pred.files.append(write_case_json(output, res.classification, {**extra, "qc": pred.qc}))
    elif pred.qc:  # a segmentation says why it may be wrong in <case>.json
        pred.files.append(write_json(output / f"{case.name}.json", {"kind": SEGMENTATION_KIND, "case": case.name, **extra, "qc": pred.qc}))
    else:
        (output / f"{case.name}.json").unlink(missing_ok=True)  # an earlier run's reasons no longer hold
    return pred


def predict_cases(model: TrainedModel, cases: Sequence[CaseSource], output: Path, tta: bool = True, save_probabilities: bool = False,
                  batch_slices: int | None = None, progress: Callable[[str, int, int], None] | None = None,
                  on_case: Callable[[CaseSource, CasePrediction], None] | None = None,
                  csv_name: str = "classification.csv") -> PredictResult:
    """Predict every case into ``output``; ``on_case`` sees each prediction (e.g. to score it).

    Raises one :class:`SpineautoError` naming the failed cases after the others are written.
    """
    output = Path(output)
    check_writable(output)
    result = PredictResult()
    for i, case in enumerate(cases):
        if progress:
            progress(case.name, i, len(cases))
        t0 = time.perf_counter()
        remove_temporaries(output, case.name)  # what a killed earlier run left
        try:
            pred = predict_case(model, case, output, tta, save_probabilities, batch_slices)
        except Exception as e:  # noqa: BLE001 - one failing case must not stop the others
            result.failed[case.name] = error_message(e)
            log.error("%s: %s", case.name, result.failed[case.name])
            if not isinstance(e, (SpineautoError, OSError)):
                log.debug("%s", traceback.format_exc())
            remove_case_outputs(output, case.name)
            continue
        finally:
            result.seconds[case.name] = time.perf_counter() - t0
        if pred.labels is not None:
            result.written.append(pred.files[0])
        if pred.classification is not None:
            result.classifications.append(pred.classification)
        if on_case:
            on_case(case, pred)
    with writing(output / csv_name):
        write_classification_csv(output, result.classifications, csv_name)
    if progress:
        progress("", len(cases), len(cases))
    if result.failed:
        raise failures_error(result.failed, len(cases), output)
    return result
