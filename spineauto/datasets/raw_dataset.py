"""Writing an nnU-Net v2 raw dataset folder (``DatasetXXX_Name/``): the one writer every converter uses.

The dataset is built in a temporary folder beside ``dataset_dir`` (:func:`staged_dataset_dir`) and
renamed into place at the end, so a failure never leaves a half-written dataset behind, and an
existing dataset is only replaced with ``overwrite``. :func:`write_dataset_json` writes nnU-Net v2's
``dataset.json`` plus spineauto's ``heads`` and ``cases``.
"""
from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from spineauto.errors import SpineautoError
from spineauto.io.atomic import write_json
from spineauto.io.outputs import check_output_apart

logger = logging.getLogger(__name__)


def check_output_free(dataset_dir: Path, overwrite: bool, source: Path | Sequence[Path] | None = None) -> None:
    """Refuse to replace an existing, non-empty dataset folder unless ``overwrite``; with it, refuse
    one that is not a raw dataset (``overwrite`` deletes only what a conversion wrote) and a
    ``source`` the dataset folder is, holds or lies inside (:func:`~spineauto.io.outputs.check_output_apart`)."""
    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    check_output_apart(sources, dataset_dir, protect=(), what="the dataset folder", hint="choose another dataset id/name")
    if dataset_dir.exists() and (not dataset_dir.is_dir() or any(dataset_dir.iterdir())):
        if not overwrite:
            raise SpineautoError(
                f"{dataset_dir} already exists; choose another dataset id/name or pass --overwrite to replace it"
            )
        if not (dataset_dir / "dataset.json").is_file():
            raise SpineautoError(f"{dataset_dir}: exists and is not a raw dataset (no dataset.json); "
                                 "--overwrite replaces only a dataset spineauto wrote: move it away or choose another dataset id/name")


@contextmanager
def staged_dataset_dir(dataset_dir: Path, overwrite: bool = False, source: Path | Sequence[Path] | None = None) -> Iterator[Path]:
    """Yield ``<dataset_dir>.tmp-<pid>`` (with empty imagesTr, labelsTr, imagesTs) to build the dataset in.

    On success it replaces ``dataset_dir``; on failure it is removed and ``dataset_dir`` is left as it was.
    """
    check_output_free(dataset_dir, overwrite, source)
    dataset_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = dataset_dir.with_name(f"{dataset_dir.name}.tmp-{os.getpid()}")
    if stage.exists():
        shutil.rmtree(stage)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (stage / sub).mkdir(parents=True)
    try:
        yield stage
        if dataset_dir.exists():
            old = dataset_dir.with_name(f"{dataset_dir.name}.old-{os.getpid()}")
            os.replace(dataset_dir, old)
            os.replace(stage, dataset_dir)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(stage, dataset_dir)
    finally:
        if stage.exists():
            shutil.rmtree(stage)


def write_dataset_json(
    folder: Path,
    name: str,
    description: str,
    labels: dict[str, int],
    num_training: int,
    cases: dict[str, dict[str, Any]],
    channel_names: dict[str, str] | None = None,
    class_order: dict[str, Sequence[str]] | None = None,
    lesion_labels: Sequence[str] | None = None,
    file_ending: str = ".nii.gz",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``folder/dataset.json``: nnU-Net v2's keys plus ``heads`` and ``cases``.

    ``lesion_labels`` (label names), when given and not empty, is written after ``labels``;
    ``extra`` keys (e.g. ``pixel_spacing``) after ``file_ending``.

    A head is declared only when at least two classes of it occur in ``cases``; the per-case classes
    of a head that is dropped are removed too (``cases[id]['classes']`` is edited in place). Heads and
    their classes are sorted by name, or follow ``class_order`` (head -> classes in order) when given.
    """
    seen: dict[str, set[str]] = {}
    for entry in cases.values():
        for head, value in entry.get("classes", {}).items():
            seen.setdefault(head, set()).add(value)
    if class_order is None:
        class_order = {head: sorted(values) for head, values in sorted(seen.items())}
    heads = {head: [c for c in classes if c in seen.get(head, ())] for head, classes in class_order.items()}
    heads = {head: classes for head, classes in heads.items() if len(classes) >= 2}
    for head, values in seen.items():
        if head not in heads:
            logger.info("not declaring head %r: a head needs two classes, found %s", head, ", ".join(sorted(values)))
    for entry in cases.values():
        entry["classes"] = {h: v for h, v in entry.get("classes", {}).items() if h in heads}
    return write_json(folder / "dataset.json", {
        "name": name,
        "description": description,
        "channel_names": channel_names or {"0": "MRI"},
        "labels": labels,
        **({"lesion_labels": list(lesion_labels)} if lesion_labels else {}),
        "numTraining": num_training,
        "file_ending": file_ending,
        **(extra or {}),
        "heads": heads,
        "cases": cases,
    })
