"""The manifest of a preprocessed dataset: exactly which files training may read.

``<preprocessed>/<Dataset>/manifest.json`` is written by ``plan_and_preprocess`` after every case is
preprocessed, just before ``plans.json`` (the last file of a run): per data identifier (one
preprocessed folder) its configurations and its cases, and per file of a case (``<case>.npy``,
``<case>_seg.npy``, ``<case>.json``) its size, SHA-1 and modification time. A run that stops before the
end leaves neither file, so a half-done folder is never taken for a plan.

Training (:func:`verified_props`, from ``CaseStore.load``) reads the cases the manifest lists, not
whatever lies in the folder, and checks them first, cheaply: every file's size always, and every
file's SHA-1 when the data are at most ``AUTO_HASH_BYTES`` (512 MiB: under half a second); above
that, the SHA-1 of each ``<case>.json`` (read anyway) and of the arrays whose modification time is not
the manifest's (rewritten since). ``SPINEAUTO_VERIFY_PREPROCESSED=hash`` hashes everything, ``=size``
never more than that. Measured on the real data (6 cases, 4.5 MiB, 2 cores): 2.9 ms without array
hashes, 6.3 ms with; SHA-1 runs at about 1.4 GB/s. ``plan_and_preprocess`` hashes every file it keeps
(it reads the whole raw dataset anyway), so a truncated or corrupt case is redone there.

The manifest also records the raw dataset's training files as they were planned (``raw``: per case
its images and label, relative to the dataset folder, with size, modification time and SHA-1).
Training compares them with the raw dataset first (:func:`raw_changes`): sizes and modification
times of every file (a stat each), a file's SHA-1 only where its modification time moved, so a case
removed, added or edited since ``plan_and_preprocess`` is named instead of trained on as it was.

SHA-1 of the file bytes: at these sizes (MB per case) hashing runs at disk speed (about 1 GB/s on one
core), is in the standard library, and catches any change, not just a truncation.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from spineauto.datasets.dataset_json import DatasetInfo
from spineauto.errors import SpineautoError
from spineauto.io.atomic import write_json

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
VERIFY_ENV = "SPINEAUTO_VERIFY_PREPROCESSED"  # "hash": every file's SHA-1; "size": sizes (+ SHA-1 of changed files); else auto
AUTO_HASH_BYTES = 512 * 2**20  # auto: every file's SHA-1 up to this much data (about 0.4 s at 1.4 GB/s), sizes above
_CHUNK = 1 << 20


def sha1_file(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path, sha1: str | None = None) -> dict:
    """What the manifest records of one file (``sha1`` when already known for its current bytes)."""
    st = os.stat(path)
    return {"size": st.st_size, "sha1": sha1 or sha1_file(path), "mtime_ns": st.st_mtime_ns}


def file_problem(path: Path, entry: dict, full_hash: bool = True, data: bytes | None = None) -> str | None:
    """Why ``path`` is not the file ``entry`` describes, or None. Without ``full_hash`` a file whose
    size and modification time are the recorded ones is trusted without reading it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not isinstance(entry, dict) or "size" not in entry or "sha1" not in entry:
        return "has no size and hash in the manifest"
    if st.st_size != entry["size"]:
        return f"has {st.st_size} bytes, the manifest {entry['size']} (truncated or rewritten)"
    if data is None and not full_hash and st.st_mtime_ns == entry.get("mtime_ns"):
        return None
    try:
        digest = hashlib.sha1(data).hexdigest() if data is not None else sha1_file(path)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if digest != entry["sha1"]:
        return "does not match its SHA-1 in the manifest (corrupt or rewritten)"
    return None


def write_manifest(dataset_folder: Path, data: dict[str, dict], raw: dict[str, dict] | None = None) -> Path:
    """``data``: data identifier -> {"configurations": [...], "cases": {case: {file name: file_entry}}};
    ``raw``: case -> {path in the raw dataset: file_entry} (:func:`raw_entries`)."""
    return write_json(Path(dataset_folder) / MANIFEST, {"manifest_version": MANIFEST_VERSION, "hash": "sha1",
                                                         "dataset": Path(dataset_folder).name, "data": data,
                                                         **({"raw": raw} if raw is not None else {})})


def _raw_files(info: DatasetInfo, case: str) -> list[Path]:
    return info.image_files(case) + ([info.label_file(case)] if info.has_segmentation else [])


def raw_entries(info: DatasetInfo) -> dict[str, dict]:
    """case -> {``imagesTr/<file>``: file_entry} of every training case of the raw dataset."""
    return {case: {f.relative_to(info.folder).as_posix(): file_entry(f) for f in _raw_files(info, case)}
            for case in info.training_cases()}


def raw_changes(manifest: dict, info: DatasetInfo) -> dict[str, list[str]] | None:
    """{"removed", "added", "changed"} case lists (changed: ``case (file)``) of the raw dataset since the
    manifest was written; None when the manifest predates raw records."""
    recorded = manifest.get("raw")
    if not isinstance(recorded, dict):
        return None
    now = set(info.training_cases())
    changes: dict[str, list[str]] = {"removed": sorted(set(recorded) - now), "added": sorted(now - set(recorded)), "changed": []}
    for case in sorted(set(recorded) & now):
        files = recorded[case] if isinstance(recorded[case], dict) else {}
        names = {f.relative_to(info.folder).as_posix() for f in _raw_files(info, case)}
        for name in sorted(names | set(files)):
            why = file_problem(info.folder / name, files[name], full_hash=False) if name in files else "is new"
            if why:
                changes["changed"].append(f"{case} ({name} {why})")
                break
    return changes


def load_manifest(dataset_folder: Path) -> dict:
    path = Path(dataset_folder) / MANIFEST
    fix = f"rerun `spineauto plan_and_preprocess -d {Path(dataset_folder).name}`"
    if not path.is_file():
        raise SpineautoError(f"{path}: missing: plan_and_preprocess did not finish (or predates manifests), so the "
                             f"preprocessed data are not known to be complete; {fix}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SpineautoError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e}); {fix}") from None
    if not isinstance(manifest, dict) or manifest.get("manifest_version") != MANIFEST_VERSION or not isinstance(manifest.get("data"), dict):
        raise SpineautoError(f"{path}: not a spineauto manifest of version {MANIFEST_VERSION}; {fix}")
    return manifest


def verified_props(folder: Path, cases: list[str] | None = None, full_hash: bool | None = None) -> dict[str, dict]:
    """The properties of the cases of one preprocessed folder (``<Dataset>/<data identifier>``), as
    its manifest lists them (or ``cases`` of them), after checking their files against it; one line
    naming the first case that does not match and the command that fixes it."""
    folder = Path(folder)
    manifest = load_manifest(folder.parent)
    fix = f"rerun `spineauto plan_and_preprocess -d {folder.parent.name}`"
    entry = manifest["data"].get(folder.name)
    if not isinstance(entry, dict) or not isinstance(entry.get("cases"), dict):
        raise SpineautoError(f"{folder.parent / MANIFEST}: lists no preprocessed data {folder.name!r} (the plans name it); {fix}")
    listed = entry["cases"]
    names = cases if cases is not None else sorted(listed)
    if full_hash is None:
        mode = os.environ.get(VERIFY_ENV, "auto").strip().lower()
        total = sum(f.get("size", 0) for c in names if isinstance(listed.get(c), dict)
                    for f in listed[c].values() if isinstance(f, dict) and isinstance(f.get("size", 0), int))
        full_hash = mode == "hash" or (mode not in ("size", "hash") and total <= AUTO_HASH_BYTES)
    props = {}
    for case in names:
        files = listed.get(case)
        if not isinstance(files, dict) or f"{case}.json" not in files or f"{case}.npy" not in files:
            raise SpineautoError(f"{folder}: case {case} is not in the manifest of this preprocessed data; {fix}")
        props_path = folder / f"{case}.json"
        try:
            text = props_path.read_bytes()
        except FileNotFoundError:
            text = None
        except OSError as e:
            raise SpineautoError(f"{props_path}: preprocessed case {case} cannot be read ({e.strerror}); {fix}") from None
        for name, recorded in files.items():
            if text is None and name == props_path.name:
                why = "is missing"
            else:
                why = file_problem(folder / name, recorded, full_hash, data=text if name == props_path.name else None)
            if why:
                raise SpineautoError(f"{folder / name}: preprocessed case {case} {why}; {fix}")
        try:
            props[case] = json.loads(text)
        except ValueError:  # matched its hash, so written so: not ours
            raise SpineautoError(f"{props_path}: preprocessed case {case} is not valid JSON; {fix}") from None
    return props
