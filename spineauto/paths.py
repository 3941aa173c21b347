"""Where datasets, preprocessed data and results live.

Folders come from explicit arguments first, then from the environment variables
``SPINEAUTO_RAW``, ``SPINEAUTO_PREPROCESSED`` and ``SPINEAUTO_RESULTS``, read lazily (never at import
time), and finally default to ``./spineauto_data/{raw,preprocessed,results}`` in the working directory.
Datasets are folders ``DatasetXXX_Name`` addressed by id (``1``, ``001``) or by full name.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from spineauto.errors import SpineautoError

_DEFAULT_ROOT = "spineauto_data"
_ENV = {"raw": "SPINEAUTO_RAW", "preprocessed": "SPINEAUTO_PREPROCESSED", "results": "SPINEAUTO_RESULTS"}
_NAME = re.compile(r"^Dataset(\d{3})_(\w+)$")


def root(kind: str, override: Path | str | None = None) -> Path:
    """Root folder for ``kind`` in {'raw', 'preprocessed', 'results'}."""
    if override is not None:
        return Path(override)
    env = os.environ.get(_ENV[kind])
    return Path(env) if env else Path.cwd() / _DEFAULT_ROOT / kind


def dataset_name(dataset_id: int, name: str) -> str:
    if not 0 < dataset_id < 1000:
        raise SpineautoError(f"dataset id {dataset_id} is out of range: use 1..999")
    if not re.fullmatch(r"\w+", name):
        raise SpineautoError(f"dataset name {name!r} must be letters, digits and underscores only")
    return f"Dataset{dataset_id:03d}_{name}"


def resolve_dataset(dataset: str | int, raw: Path | str | None = None, preprocessed: Path | str | None = None) -> str:
    """Full dataset folder name from ``1``, ``'001'`` or ``'Dataset001_Name'``.

    Looks in the raw folder, then in the preprocessed folder (a model can be trained and used
    without the raw data present).
    """
    text = str(dataset)
    if _NAME.match(text):
        return text
    if not text.isdigit():
        raise SpineautoError(f"dataset {text!r} is neither an id (e.g. 1) nor a folder name (e.g. Dataset001_Spine)")
    prefix = f"Dataset{int(text):03d}_"
    searched = []
    for folder in (root("raw", raw), root("preprocessed", preprocessed), root("results")):
        searched.append(str(folder))
        if folder.is_dir():
            hits = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith(prefix))
            if len(hits) > 1:
                raise SpineautoError(f"dataset id {text} is ambiguous in {folder}: {', '.join(hits)}; pass the full name")
            if hits:
                return hits[0]
    raise SpineautoError(
        f"no dataset with id {int(text)} (Dataset{int(text):03d}_*) in {' or '.join(searched)}; "
        "set SPINEAUTO_RAW or create it with `spineauto convert` or `spineauto demo`"
    )


def raw_dataset(dataset: str | int, raw: Path | str | None = None) -> Path:
    return root("raw", raw) / resolve_dataset(dataset, raw=raw)


def preprocessed_dataset(dataset: str | int, preprocessed: Path | str | None = None) -> Path:
    return root("preprocessed", preprocessed) / resolve_dataset(dataset, preprocessed=preprocessed)


def results_dataset(dataset: str | int, results: Path | str | None = None) -> Path:
    return root("results", results) / resolve_dataset(dataset)


TRAINER_NAME = "spineautoTrainer"


def model_folder(dataset: str | int, configuration: str, plans_name: str = "spineautoPlans",
                 trainer: str = TRAINER_NAME, results: Path | str | None = None) -> Path:
    """``<results>/<Dataset>/<trainer>__<plans>__<configuration>``: a self-contained trained model."""
    return results_dataset(dataset, results) / f"{trainer}__{plans_name}__{configuration}"


def configuration_of(model_folder: Path | str) -> str:
    """The configuration a model folder ``<trainer>__<plans>__<configuration>`` was trained for."""
    return Path(model_folder).name.split("__")[-1]
