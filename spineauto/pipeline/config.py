"""The pipeline definition: which trained model serves each stage, and which cases go on.

A YAML file (see ``plans/pipelines/spine_pipeline.yaml``) with up to five stages, always run in
this order; any may be left out::

    anatomy:        {model: MODEL, gate: {head: anatomy, classes: [spine], min_probability: 0.5}, heads: [anatomy]}
    location_view:  {model: MODEL}
    sequence:       {model: MODEL}
    cord:           {model: MODEL}              # or {select_by: sequence, models: {T2w: MODEL, T2starw: MODEL}, model: FALLBACK}
    lesion:         {model: MODEL, remove_outside_mm: 5.0}

where MODEL is ``{folder: PATH}`` (a model folder), ``{bundle: PATH.zip}`` (``spineauto export``) or
``{dataset: 1, configuration: 2d}`` (under SPINEAUTO_RESULTS), each with optional ``folds`` and
``checkpoint``. A classification stage reports the model's heads named like the stage (anatomy;
location and view; sequence), else all of them, unless ``heads`` lists them; one model with several
heads may serve several stages (it is loaded and run once). A classification stage with a ``gate`` stops a case whose predicted class (of
``head``) is not in ``classes`` or whose probability is below ``min_probability``; the case's report
says why. ``header_rules: rules.yaml`` (a ``convert dicom --classes-from`` rules file) lets DICOM
inputs' tags decide classes first (:mod:`spineauto.pipeline.header`; BIDS suffixes and the affine's
view need no file). Relative paths are relative to the YAML file. Unknown keys, a missing model and a gate
naming a class the model does not have are one-line errors (the last when the models load).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from spineauto.errors import SpineautoError
from spineauto.pipeline.qc import QcConfig
from spineauto.schema import from_dict, load_yaml_mapping

CLASSIFICATION_STAGES = ("anatomy", "location_view", "sequence")
STAGE_HEADS = {"anatomy": ("anatomy",), "location_view": ("location", "view"), "sequence": ("sequence",)}
STAGES = (*CLASSIFICATION_STAGES, "cord", "lesion")


@dataclass
class ModelRef:
    folder: str | None = None
    bundle: str | None = None
    dataset: str | int | None = None  # an id (11) or a name (Dataset011_Anatomy); YAML's bare 11 is read as "11"
    configuration: str | None = None  # default: the one in the folder name, else "2d"
    folds: list[str | int] | None = None  # [0, 1] or ["all"]; numbers are read as their text
    checkpoint: str = "final"

    def __post_init__(self) -> None:
        if isinstance(self.dataset, int):
            self.dataset = str(self.dataset)
        if self.folds is not None:
            self.folds = [str(f) for f in self.folds]

    def describe(self) -> str:
        return self.folder or self.bundle or f"dataset {self.dataset} / {self.configuration or '2d'}"


@dataclass
class Gate:
    classes: list[str]
    head: str | None = None  # default: the model's only head
    min_probability: float = 0.0


@dataclass
class ClassifyStage:
    model: ModelRef
    gate: Gate | None = None
    heads: list[str] | None = None  # the heads this stage reports (default: those named like the stage, else all)


@dataclass
class CordStage:
    model: ModelRef | None = None  # the model, or the fallback when select_by's class has no model
    select_by: str | None = None  # a classification stage whose predicted class picks the model
    head: str | None = None  # that stage's head (default: its only head)
    models: dict[str, ModelRef] = field(default_factory=dict)  # class -> model
    min_voxels: int = 10  # fewer cord voxels: "no cord found", the lesion stage is skipped


@dataclass
class LesionStage:
    model: ModelRef
    remove_outside_mm: float | None = None  # lesion voxels farther from the cord are removed (default: the plan's, else 5 mm)


@dataclass
class PipelineConfig:
    description: str = ""
    anatomy: ClassifyStage | None = None
    location_view: ClassifyStage | None = None
    sequence: ClassifyStage | None = None
    cord: CordStage | None = None
    lesion: LesionStage | None = None
    tta: bool = True
    qc: QcConfig = field(default_factory=QcConfig)
    header_rules: str | None = None  # a `convert dicom --classes-from` rules file: DICOM inputs' classes from their tags

    def stages(self) -> list[str]:
        return [s for s in STAGES if getattr(self, s) is not None]

    def model_refs(self) -> dict[str, ModelRef]:
        """Every model the definition names: ``stage`` (and ``cord:<class>`` for a cord chosen by class)."""
        refs = {}
        for name in self.stages():
            stage = getattr(self, name)
            if getattr(stage, "model", None) is not None:
                refs[name] = stage.model
            if name == "cord":
                refs.update({f"cord:{k}": v for k, v in stage.models.items()})
        return refs


def load_pipeline_config(path: Path) -> PipelineConfig:
    """Read and check a pipeline YAML; model paths become absolute (relative to the file)."""
    path = Path(path)
    data = load_yaml_mapping(path, "pipeline definition", "start from plans/pipelines/spine_pipeline.yaml")
    config = from_dict(PipelineConfig, data, str(path))
    check_config(config, str(path), base=path.parent)
    return config


def check_config(config: PipelineConfig, where: str, base: Path | None = None) -> None:
    """What can be checked before loading any model; resolves relative model paths against ``base``."""
    if not config.stages():
        raise SpineautoError(f"{where}: no stage defined; give at least one of {', '.join(STAGES)}")
    for name in config.stages():
        stage = getattr(config, name)
        refs = [stage.model] if getattr(stage, "model", None) is not None else []
        if isinstance(stage, CordStage):
            refs += list(stage.models.values())
            if stage.select_by is None and (stage.models or stage.model is None):
                raise SpineautoError(f"{where}.cord: give `model`, or `select_by` (a classification stage) with `models`")
            if stage.select_by is not None:
                if stage.select_by not in CLASSIFICATION_STAGES:
                    raise SpineautoError(f"{where}.cord.select_by: {stage.select_by!r} is not a classification stage "
                                         f"({', '.join(CLASSIFICATION_STAGES)})")
                if getattr(config, stage.select_by) is None:
                    raise SpineautoError(f"{where}.cord.select_by: stage {stage.select_by!r} is not defined, so it cannot "
                                         "choose the cord model; add it or give cord a single `model`")
                if not stage.models:
                    raise SpineautoError(f"{where}.cord: `select_by` needs `models` (class -> model)")
        for ref in refs:
            _check_ref(ref, f"{where}.{name}", base)
    for level, bounds in config.qc.csa_mm2.items():
        if len(bounds) != 2 or not 0 <= bounds[0] < bounds[1]:
            raise SpineautoError(f"{where}.qc.csa_mm2.{level}: give [low, high] with 0 <= low < high, got {bounds}")
    if config.header_rules is not None:
        rules = Path(config.header_rules).expanduser()
        rules = base / rules if not rules.is_absolute() and base is not None else rules
        from spineauto.datasets.dicom_rules import load_rules

        load_rules(rules)  # checked now, with the file named
        config.header_rules = str(rules.resolve())
    if config.lesion is not None and config.cord is None:
        raise SpineautoError(f"{where}.lesion: the lesion stage segments inside the cord and needs a `cord` stage before it")


def _check_ref(ref: ModelRef, where: str, base: Path | None) -> None:
    given = [k for k in ("folder", "bundle", "dataset") if getattr(ref, k) is not None]
    if len(given) != 1:
        raise SpineautoError(f"{where}.model: give exactly one of folder, bundle or dataset (got {', '.join(given) or 'none'})")
    for key in ("folder", "bundle"):
        value = getattr(ref, key)
        if value is not None:
            p = Path(value).expanduser()
            if not p.is_absolute() and base is not None:
                p = base / p
            if not p.exists():
                raise SpineautoError(f"{where}.model.{key}: {p} not found")
            setattr(ref, key, str(p.resolve()))
