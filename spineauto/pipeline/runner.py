"""The hierarchical pipeline on one scan, in memory: ``Pipeline.load(config).run(image)``.

Every model is loaded once (:meth:`Pipeline.load`); each case is read once and preprocessed once
per distinct preprocessing (stages whose plans preprocess alike share it); every stage runs its
networks once through the case driver's :func:`~spineauto.inference.driver.infer`. Stages run in
the order anatomy -> location_view -> sequence -> cord -> lesion; a gate may stop a case, a case
without a cord skips the lesion stage, and the result records why. Every stage adds its quality
flags (:mod:`spineauto.pipeline.qc`): a case that ran through is ``done`` only when nothing is
flagged, else ``check`` with the flags as its reasons. A stage that raises fails the case but
keeps what the stages before it found (classes, masks, flags). The lesion stage of a
cord-ROI model (``plan.roi``) is cropped around the predicted cord; lesion voxels farther than
``remove_outside_mm`` from the cord are removed.
"""
from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from spineauto import paths
from spineauto.devices import resolve_device
from spineauto.errors import SpineautoError
from spineauto.inference.bundle import model_folder_of
from spineauto.inference.driver import infer, localise
from spineauto.inference.inputs import preprocess_around
from spineauto.inference.model import TrainedModel, load_model
from spineauto.inference.postprocessing import UNCERTAIN_CORD
from spineauto.inference.roi import restrict_to_roi
from spineauto.pipeline import qc
from spineauto.pipeline.config import CLASSIFICATION_STAGES, STAGE_HEADS, ClassifyStage, ModelRef, PipelineConfig, load_pipeline_config
from spineauto.pipeline.header import decide
from spineauto.schema import to_dict

log = logging.getLogger(__name__)
CASE_KIND = "spineauto.pipeline_case"
DEFAULT_REMOVE_OUTSIDE_MM = 5.0  # as RoiPlan's default: 3 mm cut real lesion voxels a cord model had left out


@dataclass
class ScanInput:
    """One scan in memory: (C, X, Y, Z) float32 and its voxel -> RAS mm affine."""

    name: str
    data: np.ndarray
    affine: np.ndarray
    source: str = ""
    header: dict[str, tuple[str, str]] = field(default_factory=dict)  # head -> (class, why) the header gives (pipeline/header.py)


@dataclass
class CaseResult:
    case: str
    source: str
    status: str = "done"  # done | check | stopped | failed
    reason: str | None = None
    flags: list[dict] = field(default_factory=list)  # {"stage", "code", "reason"}: why a finished case is "check"
    stages: list[dict] = field(default_factory=list)
    classes: dict[str, dict[str, str]] = field(default_factory=dict)  # stage -> head -> class
    cord: np.ndarray | None = None  # uint8 (X, Y, Z) in the input grid
    lesion: np.ndarray | None = None
    measurements: dict = field(default_factory=dict)
    seconds: float = 0.0

    def flag(self, stage: str, code: str, reason: str) -> None:
        """One more reason to check this case (any stage may add one: see :mod:`spineauto.pipeline.qc`)."""
        self.flags.append(qc.flag(stage, code, reason))

    def to_dict(self, masks: dict[str, str] | None = None, images: dict[str, str] | None = None,
                image_notes: dict[str, str] | None = None) -> dict:
        from spineauto import __version__

        return {"kind": CASE_KIND, "case": self.case, "source": self.source, "status": self.status, "reason": self.reason,
                "flags": self.flags,
                "stages": [dict(s, mask=(masks or {}).get(s["stage"])) if s["kind"] == "segmentation" else s for s in self.stages],
                "measurements": self.measurements, "images": images or {}, "image_notes": image_notes or {},
                "versions": {"spineauto": __version__, "torch": torch.__version__}, "seconds": round(self.seconds, 3)}


def _open_model(ref: ModelRef, device: torch.device) -> TrainedModel:
    if ref.dataset is not None:
        folder = paths.model_folder(ref.dataset, ref.configuration or "2d")
    else:
        folder = model_folder_of(Path(ref.folder or ref.bundle))
    return load_model(folder, ref.folds, ref.checkpoint, device, configuration=ref.configuration)


def _head(model: TrainedModel, head: str | None, where: str) -> str:
    heads = [h.name for h in model.plan.heads]
    if head is None:
        if len(heads) != 1:
            raise SpineautoError(f"{where}: the model has heads {heads}; name the one to use with `head`")
        return heads[0]
    if head not in heads:
        raise SpineautoError(f"{where}: head {head!r} is not one of the model's heads {heads}")
    return head


class Pipeline:
    def __init__(self, config: PipelineConfig, models: dict[str, TrainedModel], device: torch.device,
                 labels: dict[str, str] | None = None):
        self.config, self.models, self.device = config, models, device
        self.labels = labels or {}  # stage key -> the model as the case JSON names it (never a temporary folder)
        self.header_rules = None  # the DICOM tag rules of config.header_rules, read when the first case needs them

    @classmethod
    def load(cls, config: PipelineConfig | Path | str, device: str | torch.device = "auto") -> "Pipeline":
        """From a pipeline YAML, a pipeline bundle (.zip from ``spineauto export --pipeline``) or a config object."""
        bundle = None
        if not isinstance(config, PipelineConfig):
            path = Path(config)
            if path.suffix == ".zip":
                bundle = (path.resolve(), model_folder_of(path))
                path = bundle[1] / "pipeline.yaml"
            config = load_pipeline_config(path)
        device = device if isinstance(device, torch.device) else resolve_device(device)
        models: dict[str, TrainedModel] = {}
        opened: dict[str, TrainedModel] = {}  # a model serving several stages is loaded once
        for key, ref in config.model_refs().items():
            identity = json.dumps(to_dict(ref), sort_keys=True)
            if identity not in opened:
                opened[identity] = _open_model(ref, device)
            models[key] = opened[identity]
        pipeline = cls(config, models, device, {key: _model_label(ref, models[key], bundle) for key, ref in config.model_refs().items()})
        pipeline._check_models()
        return pipeline

    def _check_models(self) -> None:
        channels = {k: m.num_channels for k, m in self.models.items()}
        if len(set(channels.values())) > 1:
            raise SpineautoError(f"pipeline: the stages' models expect different channel counts {channels}; use models of one input")
        for name in CLASSIFICATION_STAGES:
            stage: ClassifyStage | None = getattr(self.config, name)
            if stage is None:
                continue
            model = self.models[name]
            if not model.plan.has_classification:
                raise SpineautoError(f"pipeline.{name}: {model.folder} is a segmentation model; a classification stage needs heads")
            unknown = [h for h in (stage.heads or []) if h not in [x.name for x in model.plan.heads]]
            if unknown:
                raise SpineautoError(f"pipeline.{name}.heads: {unknown} are not heads of {model.folder.name} "
                                     f"({[x.name for x in model.plan.heads]})")
            if stage.gate is not None:
                head = _head(model, stage.gate.head, f"pipeline.{name}.gate")
                known = next(h.classes for h in model.plan.heads if h.name == head)
                unknown = [c for c in stage.gate.classes if c not in known]
                if unknown:
                    raise SpineautoError(f"pipeline.{name}.gate: class(es) {unknown} are not classes of head {head!r} ({known})")
        for key, model in self.models.items():
            if key.split(":")[0] in ("cord", "lesion") and not model.plan.has_segmentation:
                raise SpineautoError(f"pipeline.{key}: {model.folder} has no segmentation output")
        cord = self.config.cord
        if cord is not None and cord.select_by is not None:
            selector = self.models[cord.select_by]
            head = _head(selector, cord.head, "pipeline.cord.head")
            known = next(h.classes for h in selector.plan.heads if h.name == head)
            unknown = [c for c in cord.models if c not in known]
            if unknown:
                raise SpineautoError(f"pipeline.cord.models: class(es) {unknown} are not classes of {cord.select_by}'s head {head!r} ({known})")

    @property
    def num_channels(self) -> int:
        return next(iter(self.models.values())).num_channels

    def header_of(self, case, affine: np.ndarray, shape) -> dict[str, tuple[str, str]]:
        """What the header of an input case (``inference.inputs.InputCase``) says: head -> (class, why)."""
        from spineauto.datasets.dicom_rules import load_rules
        from spineauto.pipeline.header import header_classes

        if self.config.header_rules is not None and self.header_rules is None:
            self.header_rules = load_rules(Path(self.config.header_rules))
        name = case.files[0].name if case.files else case.name
        return header_classes(name, affine, shape, case.dicom_files, self.header_rules)

    # -- one case ---------------------------------------------------------------------------
    def run(self, image, name: str = "case") -> CaseResult:
        """Run every stage on ``image`` (a path, a nibabel image, a SimpleITK image or a ScanInput)."""
        scan = as_scan(image, name)
        t0 = time.perf_counter()
        result = CaseResult(scan.name, scan.source)
        result.flags += qc.anatomy_flags(self.config.qc, self._anatomy_classes())
        cache: dict = {}  # preprocessed layouts by preprocessing, inferences by model: this case only
        stage = "input"
        try:
            for stage in CLASSIFICATION_STAGES:
                if getattr(self.config, stage) is not None and not self._classify(stage, scan, cache, result):
                    break
            else:
                if self.config.cord is not None:
                    stage = "cord"
                    self._segment_cord(scan, cache, result)
                if self.config.lesion is not None:
                    stage = "lesion"
                    self._segment_lesion(scan, cache, result)
                stage = "measurements"
                self._measure(scan, result)
        except Exception as e:  # noqa: BLE001 - the case fails; what the stages before found is kept
            message = str(e) if isinstance(e, SpineautoError) else f"{type(e).__name__}: {e}"
            log.error("%s: %s failed: %s", scan.name, stage, message)
            log.debug("%s", traceback.format_exc())
            result.status, result.reason = "failed", f"{stage}: {message}"
        finally:
            result.seconds = time.perf_counter() - t0
        if result.status == "done" and result.flags:
            result.status, result.reason = "check", "; ".join(f["reason"] for f in result.flags)
        return result

    def _anatomy_classes(self) -> list[str] | None:
        """The classes of the anatomy gate's head (None without a gate)."""
        stage = self.config.anatomy
        if stage is None or stage.gate is None:
            return None
        model = self.models["anatomy"]
        head = _head(model, stage.gate.head, "pipeline.anatomy.gate")
        return list(next(h.classes for h in model.plan.heads if h.name == head))

    def _prepared(self, model: TrainedModel, scan: ScanInput, cache: dict, roi: np.ndarray | None = None):
        from spineauto.preprocessing.preprocess import preprocess_array

        plan = model.plan
        key = json.dumps([plan.slicing, plan.isotropic_plane, plan.target_spacing, plan.normalization, plan.use_mask_for_norm,
                          to_dict(model.intensity), to_dict(plan.roi)], default=str)
        if roi is None and key in cache:
            return cache[key]
        if scan.data.shape[0] != model.num_channels:
            raise SpineautoError(f"{scan.source or scan.name}: {scan.data.shape[0]} channel(s) but {model.folder.name} expects {model.num_channels}")
        kwargs = {"roi": roi} if roi is not None else {"name": scan.source or scan.name}
        layout, _, props = preprocess_array(scan.data, scan.affine, plan, model.intensity, **kwargs)
        if roi is None:
            cache[key] = (layout, props)
        return layout, props

    def _infer(self, key: str, scan: ScanInput, cache: dict, result: CaseResult, roi: np.ndarray | None = None):
        model = self.models[key]
        t0 = time.perf_counter()
        done = ("inference", id(model))  # one model serving several stages runs once per case
        if roi is None and done in cache:
            out = cache[done]
        else:
            if ("checked", id(model)) not in cache:  # the scan against the model's training data, once per model
                cache[("checked", id(model))] = True
                for f in qc.input_flags(self.config.qc, key.split(":")[0], model, scan.affine, scan.data.shape):
                    result.flags.append(f)
            layout, props = self._prepared(model, scan, cache, roi)
            out = infer(model, layout, props, scan.name, tta=self.config.tta)
            if roi is None and out.labels is not None and model.plan.localise is not None:  # as `spineauto predict` does
                out = localise(model, _Around(scan), out, props, tta=self.config.tta)
            if roi is None:
                cache[done] = out
        record = {"stage": key.split(":")[0], "kind": "classification" if out.labels is None else "segmentation",
                  "model": self.labels.get(key, str(model.folder)), "folds": list(model.folds), "seconds": 0.0}
        return model, out, record, t0

    def _classify(self, stage: str, scan: ScanInput, cache: dict, result: CaseResult) -> bool:
        model, out, record, t0 = self._infer(stage, scan, cache, result)
        cls = out.classification
        config = getattr(self.config, stage)
        gate = config.gate
        shown = config.heads or [h for h in STAGE_HEADS[stage] if h in cls.classes] or list(cls.classes)
        if gate is not None and gate.head is not None and gate.head not in shown:
            shown.append(gate.head)
        head = _head(model, gate.head, f"pipeline.{stage}") if gate else (shown[0] if len(shown) == 1 else None)
        record.update(kind="classification", heads={h: {"class": cls.predicted(h), "probabilities": {
            c: round(float(p), 6) for c, p in zip(cls.classes[h], cls.probabilities[h])}} for h in shown})
        for h in shown:  # the header decides where it knows, the image classifier cross-checks (pipeline/header.py)
            v = record["heads"][h]
            v.update(decide(h, cls.predicted(h), max(v["probabilities"].values()), list(cls.classes[h]), scan.header))
            if v.pop("disagrees"):
                result.flag(stage, "header_disagrees", f"{h}: the header says {v['class']} ({v['header_reason']}), the image "
                                                         f"classifier {v['image_class']} (p={v['image_probability']:.2f})")
        if head is not None:
            record.update(head=head, **{"class": record["heads"][head]["class"]}, probabilities=record["heads"][head]["probabilities"])
        result.classes[stage] = {h: v["class"] for h, v in record["heads"].items()}
        result.flags += qc.confidence_flags(self.config.qc, stage, {
            h: (v["class"], max(v["probabilities"].values())) for h, v in record["heads"].items() if v["source"] == "image"})
        passed = True
        if gate is not None:
            p = float(cls.probabilities[head].max())
            decided = record["heads"][head]
            if decided["class"] not in gate.classes:
                who = "predicted" if decided["source"] == "image" else f"header ({decided['header_reason']})"
                passed, why = False, f"{stage}: {who} {head} {decided['class']!r} (p={p:.2f}) is not one of {gate.classes}"
            elif decided["source"] == "image" and p < gate.min_probability:
                passed, why = False, f"{stage}: {head} {cls.predicted(head)!r} with p={p:.2f} < min_probability {gate.min_probability}"
            if not passed:
                result.status, result.reason = "stopped", why
        record.update(passed=passed, seconds=round(time.perf_counter() - t0, 3))
        result.stages.append(record)
        return passed

    def _cord_model_key(self, result: CaseResult) -> str:
        cord = self.config.cord
        if cord.select_by is None:
            return "cord"
        selector = self.models[cord.select_by]
        head = _head(selector, cord.head, "pipeline.cord.head")
        chosen = result.classes.get(cord.select_by, {}).get(head)
        if chosen in cord.models:
            return f"cord:{chosen}"
        if cord.model is not None:
            return "cord"
        raise SpineautoError(f"pipeline.cord: {cord.select_by} predicted {chosen!r}, which has no cord model and there is no fallback `model`")

    def _segment_cord(self, scan: ScanInput, cache: dict, result: CaseResult) -> None:
        key = self._cord_model_key(result)
        model, out, record, t0 = self._infer(key, scan, cache, result)
        value = _label_value(model, ("cord", "spinal"), default=1)
        result.cord = (out.labels == value).astype(np.uint8)
        voxels = int(result.cord.sum())
        record.update(voxels=voxels, skipped=None, seconds=round(time.perf_counter() - t0, 3), qc=list(out.qc))  # e.g. "uncertain cord: ..."
        for reason in out.qc:  # the cord choice's doubts (inference/postprocessing.py) are flags like any other
            result.flag("cord", "uncertain_cord" if reason.startswith(UNCERTAIN_CORD) else "cord_qc", reason)
        if voxels < self.config.cord.min_voxels:
            record["note"] = f"no cord found ({voxels} voxel(s) < min_voxels {self.config.cord.min_voxels})"
            result.flag("cord", "no_cord", record["note"])
        result.stages.append(record)

    def _segment_lesion(self, scan: ScanInput, cache: dict, result: CaseResult) -> None:
        stage = self.config.lesion
        model = self.models["lesion"]
        if result.cord is None or int(result.cord.sum()) < self.config.cord.min_voxels:
            result.stages.append({"stage": "lesion", "kind": "segmentation", "model": self.labels.get("lesion", str(model.folder)),
                                  "folds": list(model.folds),
                                  "skipped": "no cord found: the lesion stage needs the cord", "seconds": 0.0})
            return
        cord = result.cord.astype(bool)
        roi = cord if model.plan.roi is not None else None
        model, out, record, t0 = self._infer("lesion", scan, cache, result, roi)
        values = [model.plans.labels[n] for n in model.plans.lesion_labels] or [_label_value(model, ("lesion",), default=1)]
        lesion = np.isin(out.labels, values)
        distance = stage.remove_outside_mm if stage.remove_outside_mm is not None else (
            model.plan.roi.remove_outside_mm if model.plan.roi is not None else DEFAULT_REMOVE_OUTSIDE_MM)
        kept = restrict_to_roi(lesion, cord, scan.affine, distance)
        result.lesion = kept.astype(np.uint8)
        record.update(skipped=None, removed_outside_cord_voxels=int(lesion.sum() - kept.sum()), remove_outside_mm=distance,
                      seconds=round(time.perf_counter() - t0, 3))
        result.stages.append(record)

    def _measure(self, scan: ScanInput, result: CaseResult) -> None:
        """Cord and lesion measurements; a measurement that cannot be made is a flag, never a failed case."""
        if result.cord is not None and result.cord.sum() >= self.config.cord.min_voxels:  # fewer: flagged, not measured
            self._measured(result, "cord", lambda: self._measure_cord(scan, result))
        if result.lesion is not None:
            from spineauto.pipeline.measurements import measure_lesions

            self._measured(result, "lesion", lambda: result.measurements.update(lesions=measure_lesions(result.lesion, scan.affine)))

    @staticmethod
    def _measured(result: CaseResult, stage: str, measure) -> None:
        try:
            measure()
        except Exception as e:  # noqa: BLE001 - the masks stay; the case says what could not be measured
            log.error("%s: %s measurements failed: %s: %s", result.case, stage, type(e).__name__, e)
            log.debug("%s", traceback.format_exc())
            result.flag(stage, "measurement_failed", f"{stage} measurements failed ({type(e).__name__}: {e})")

    def _measure_cord(self, scan: ScanInput, result: CaseResult) -> None:
        from spineauto.pipeline.measurements import measure_cord

        cord = measure_cord(result.cord, scan.affine)
        if cord.get("unmeasurable"):
            result.flag("cord", "no_cord", f"no measurable cord ({cord['unmeasurable']})")
            return
        result.measurements["cord"] = cord
        level = result.classes.get("location_view", {}).get("location")
        result.flags += qc.cord_flags(self.config.qc, result.cord, scan.affine, cord, level)
        low, high, what = qc.csa_range(self.config.qc, level)
        cord["plausible_csa_mm2"] = {"low": low, "high": high, "level": what}  # the report shades it


def _model_label(ref: ModelRef, model: TrainedModel, bundle: tuple[Path, Path] | None) -> str:
    """A model folder's path; inside a pipeline bundle ``<bundle.zip>:models/...``; a model bundle: its zip."""
    if bundle is not None and model.folder.resolve().is_relative_to(bundle[1].resolve()):
        return f"{bundle[0]}:{model.folder.resolve().relative_to(bundle[1].resolve()).as_posix()}"
    return str(ref.bundle) if ref.bundle is not None else str(model.folder)


def _label_value(model: TrainedModel, words: tuple[str, ...], default: int) -> int:
    for name, value in model.plans.labels.items():
        if value > 0 and any(w in name.lower() for w in words):
            return int(value)
    return default


@dataclass
class _Around:
    """A scan as the case driver's second (localised) pass needs it."""

    scan: ScanInput

    @property
    def name(self) -> str:
        return self.scan.name

    def preprocessed_around(self, model: TrainedModel, mask: np.ndarray, margin_mm: float):
        return preprocess_around(model, self.scan.data, self.scan.affine, mask, margin_mm, self.scan.source or self.scan.name)


def as_scan(image, name: str = "case") -> ScanInput:
    """A path (NIfTI), a nibabel image, a SimpleITK image or a ScanInput -> ScanInput."""
    if isinstance(image, ScanInput):
        return image
    if isinstance(image, (str, Path)):
        from spineauto.inference.inputs import InputCase, strip_ending

        path = Path(image)
        data, affine = InputCase(strip_ending(path.name), [path]).read()
        return ScanInput(strip_ending(path.name), data, affine, str(path))
    import nibabel as nib

    if isinstance(image, nib.spatialimages.SpatialImage):
        data = np.asanyarray(image.dataobj, dtype=np.float32)
        if data.ndim != 3:
            raise SpineautoError(f"{name}: a {data.ndim}D image; the pipeline takes one 3D volume")
        return ScanInput(name, data[None], np.asarray(image.affine, dtype=np.float64), name)
    try:
        import SimpleITK as sitk
    except ImportError:  # pragma: no cover - SimpleITK is a dependency
        sitk = None
    if sitk is not None and isinstance(image, sitk.Image):
        from spineauto.inference.inputs import sitk_affine, sitk_to_array

        if image.GetDimension() != 3:
            raise SpineautoError(f"{name}: a {image.GetDimension()}D image; the pipeline takes one 3D volume")
        return ScanInput(name, sitk_to_array(image)[None], sitk_affine(image), name)
    raise SpineautoError(f"{name}: cannot read a {type(image).__name__}; pass a NIfTI path, a nibabel or a SimpleITK image")
