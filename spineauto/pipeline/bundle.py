"""`spineauto export`: a trained model, or a whole pipeline with its models, as one zip.

A model bundle is ``<model folder name>/`` with ``plans.json``, ``dataset.json``,
``postprocessing.json`` (when decided), ``training_range.json`` and the chosen checkpoint
of the chosen folds with their ``run_config.yaml`` (the plan each fold was trained with). A pipeline
bundle is ``pipeline/`` with ``pipeline.yaml`` (its models rewritten to the bundled folders) and
``models/<stage>/<model folder name>/`` for every model it names (a model that serves several
stages with the same folds and checkpoint is stored once, under the first), and its
``header_rules.yaml`` when it names one. Both open directly in
``predict -m`` / ``pipeline --config`` (:mod:`spineauto.inference.bundle`), on a machine without
the raw or preprocessed data.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Sequence

import yaml

from spineauto import paths
from spineauto.errors import SpineautoError
from spineauto.inference.bundle import model_folder_of, write_zip
from spineauto.inference.model import CHECKPOINTS, RUN_CONFIG_FILE, select_folds
from spineauto.inference.postprocessing import POSTPROCESSING_FILE
from spineauto.planning.fingerprint import TRAINING_RANGE_FILE
from spineauto.pipeline.config import ModelRef, load_pipeline_config
from spineauto.schema import to_dict

MODEL_FILES = ("plans.json", "dataset.json", POSTPROCESSING_FILE, TRAINING_RANGE_FILE)


def model_files(folder: Path, folds: Sequence[str] | None, checkpoint: str, prefix: str) -> list[tuple[Path, str]]:
    """(file, name in the zip) for what predicting with ``folder`` needs."""
    if checkpoint not in CHECKPOINTS:
        raise SpineautoError(f"--checkpoint {checkpoint!r} is not one of {', '.join(CHECKPOINTS)}")
    if not (folder / "plans.json").is_file():
        raise SpineautoError(f"{folder}: not a model folder (no plans.json); pass a <trainer>__<plans>__<configuration> folder")
    checkpoints = select_folds(folder, folds, checkpoint)
    own_plans = [c.parent / RUN_CONFIG_FILE for c in checkpoints if (c.parent / RUN_CONFIG_FILE).is_file()]  # each fold's plan
    files = [folder / n for n in MODEL_FILES if (folder / n).is_file()] + checkpoints + own_plans
    return [(f, f"{prefix}{folder.name}/{f.relative_to(folder).as_posix()}") for f in files]


def _zip(target: Path, entries: list[tuple[Path | bytes, str]]) -> Path:
    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for src, name in entries:
                z.writestr(name, src) if isinstance(src, bytes) else z.write(src, name)
    return write_zip(Path(target), write)


def export_model(folder: Path, target: Path, folds: Sequence[str] | None = None, checkpoint: str = "final") -> Path:
    return _zip(target, model_files(model_folder_of(Path(folder)), folds, checkpoint, ""))


def export_pipeline(config_path: Path, target: Path) -> Path:
    """``pipeline/pipeline.yaml`` + every model it names, with only the checkpoints it uses."""
    config = load_pipeline_config(config_path)
    entries: list[tuple[Path | bytes, str]] = []
    stored: dict[tuple, str] = {}  # (folder, folds, checkpoint) -> its folder in the bundle: a model serving several stages once
    for key, ref in config.model_refs().items():
        folder = _folder(ref)
        identity = (str(folder.resolve()), tuple(ref.folds or ()), ref.checkpoint)
        if identity not in stored:
            stored[identity] = f"models/{key.replace(':', '_')}/{folder.name}"
            entries += model_files(folder, ref.folds, ref.checkpoint, f"pipeline/{stored[identity].rsplit('/', 1)[0]}/")
        ref.folder, ref.bundle, ref.dataset = stored[identity], None, None
        ref.configuration = ref.configuration or paths.configuration_of(folder)
    if config.header_rules is not None:  # the DICOM tag rules travel with the pipeline
        entries.append((Path(config.header_rules), "pipeline/header_rules.yaml"))
        config.header_rules = "header_rules.yaml"
    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    entries.append((text.encode(), "pipeline/pipeline.yaml"))
    return _zip(target, entries)


def _folder(ref: ModelRef) -> Path:
    if ref.dataset is not None:
        return paths.model_folder(ref.dataset, ref.configuration or "2d")
    return model_folder_of(Path(ref.folder or ref.bundle))
