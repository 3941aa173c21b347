"""The one output rule every command that writes follows (:func:`check_output_apart`).

An output (a folder, or a file such as ``evaluate``'s summary) may not be, lie inside or contain:
an input of the command (a scan folder, a BIDS or DICOM source, a pretraining source, the
folders an ensemble reads), a reference (``evaluate``'s ground truth), a raw dataset (its
``labelsTr``/``labelsTs`` are references too), a preprocessed dataset, a model folder or a trained
fold. A run must never overwrite what it (or a later run) reads, nor write where its outputs would be
taken for inputs. Protected folders are recognised by what they hold, wherever they are:

- raw dataset: ``dataset.json`` beside ``imagesTr/``, ``labelsTr/`` or ``imagesTs/``
- model folder: ``plans.json`` beside a ``fold_*/`` folder
- preprocessed dataset: ``plans.json`` beside ``fingerprint.json`` (or nnU-Net's ``dataset_fingerprint.json``)
- trained fold: ``fold_*`` holding a ``checkpoint_*.pt``
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from spineauto.errors import SpineautoError

KINDS = ("raw dataset", "preprocessed dataset", "model folder", "trained fold")


def protected_kind(folder: Path) -> str | None:
    """What ``folder`` is among :data:`KINDS`, or None."""
    try:
        if not folder.is_dir():
            return None
        if (folder / "dataset.json").is_file() and any((folder / s).is_dir() for s in ("imagesTr", "labelsTr", "imagesTs")):
            return "raw dataset"
        if (folder / "plans.json").is_file():
            if any(p.is_dir() for p in folder.glob("fold_*")):
                return "model folder"
            if any((folder / f).is_file() for f in ("dataset_fingerprint.json", "fingerprint.json")):
                return "preprocessed dataset"
        if folder.name.startswith("fold_") and any(folder.glob("checkpoint_*.pt")):
            return "trained fold"
    except OSError:
        return None
    return None


def _contained(out: Path, depth: int = 2) -> Iterable[Path]:
    """Folders below ``out`` down to ``depth`` levels (an output folder holding a dataset or a model)."""
    level = [out]
    for _ in range(depth):
        nxt = []
        for folder in level:
            try:
                nxt += [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()]
            except OSError:
                continue
        yield from nxt
        level = nxt


def _resolved(p: Path | str) -> Path:
    return Path(p).expanduser().resolve()


def check_output_apart(inputs: Path | str | Sequence[Path | str | None], output: Path, within: Sequence[Path | str] = (),
                       references: Sequence[Path | str | None] = (), protect: Sequence[str] = KINDS, what: str = "the output folder",
                       hint: str = "choose another -o folder", contain: bool = True) -> None:
    """Refuse an ``output`` that is, contains or lies inside an input folder, contains an input file,
    is or lies inside a reference or one of ``within`` (a model folder), or is, lies inside or contains
    a folder of the kinds ``protect`` names (see the module's docstring; with ``contain=False`` it may
    contain them: a work folder that holds the datasets and models it made). Paths that do not exist
    are skipped (the caller reports them)."""
    out = _resolved(output)
    sources = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    for source in [*sources, *references]:
        if source is None or not Path(source).expanduser().exists():
            continue
        src, role = _resolved(source), "reference" if source in references else "input"
        if src.is_dir() and (out == src or src in out.parents or out in src.parents):
            raise SpineautoError(f"{output}: {what} must lie outside the {role} {source} (and not contain it); {hint}")
        if not src.is_dir() and (out == src or out in src.parents):
            raise SpineautoError(f"{output}: {what} must lie outside the {role} {source} "
                                 f"({'it is that file' if out == src else 'it contains that file'}); {hint}")
    for folder in within:
        src = _resolved(folder)
        if out == src or src in out.parents:
            raise SpineautoError(f"{output}: {what} must lie outside the model folder {folder}; {hint}")
    if not protect:
        return
    for folder in [out, *out.parents]:
        kind = protected_kind(folder)
        if kind in protect:
            where = "is" if folder == out else "lies inside"
            raise SpineautoError(f"{output}: {what} {where} the {kind} {folder}, which spineauto never writes into; {hint}")
    if out.is_dir() and contain:
        for folder in _contained(out):
            kind = protected_kind(folder)
            if kind in protect:
                raise SpineautoError(f"{output}: {what} contains the {kind} {folder}, which spineauto never writes over; {hint}")
