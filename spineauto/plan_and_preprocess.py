"""`plan_and_preprocess`: integrity check + fingerprint, plans, preprocessing, in that order.

The orchestrator above planning and preprocessing (neither imports the other): the plans are made
first and carry everything preprocessing reads (including the per-channel intensity statistics).

One run per dataset at a time (a lock file in its preprocessed folder; a killed run's lock is taken
over). Nothing in the preprocessed folder changes until the raw data are checked, the plans are
valid, every case fits in memory and every output folder is writable. Then the old ``plans.json``
and ``manifest.json`` are removed first and written again last (``plans.json`` the very last): a run
that stops half-way leaves no plan that looks complete, and ``train`` refuses the folder until a
rerun finishes (the rerun keeps every intact case it finds and redoes the others).
"""
from __future__ import annotations

import errno
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from spineauto import paths
from spineauto.datasets.dataset_json import DatasetInfo, load_dataset_json
from spineauto.errors import SpineautoError
from spineauto.io.atomic import read_json, write_json
from spineauto.io.locks import exclusive_lock, holder_alive, read_lock
from spineauto.planning.fingerprint import Fingerprint, fingerprint_dataset
from spineauto.planning.planner import memory_target, plan_dataset
from spineauto.planning.plans import ConfigurationPlan, Plans
from spineauto.planning.resources import check_memory
from spineauto.preprocessing.manifest import MANIFEST, raw_entries, write_manifest
from spineauto.preprocessing.preprocess import preprocess_dataset

log = logging.getLogger(__name__)
LOCK = ".plan_and_preprocess.lock"
PLANS = "plans.json"
SPLITS = "splits_final.json"


@dataclass
class PlanResult:
    plans: Plans
    fingerprint: Fingerprint
    folder: Path
    written: int


def plan_and_preprocess(dataset: str | int, verify: bool = True, preset: Path | None = None, workers: int = 2,
                        raw: Path | None = None, preprocessed: Path | None = None,
                        progress: Callable[[str, str], None] | None = None, gpu_memory_gb: float | None = None) -> PlanResult:
    """``gpu_memory_gb``: the card the batch sizes are planned for (default: the visible CUDA card, else the CPU budget)."""
    if gpu_memory_gb is not None:
        memory_target(gpu_memory_gb)  # a bad value is refused before anything is read
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SpineautoError(f"-np/--num-processes must be a whole number >= 1, got {workers!r}")
    raw_dir = paths.raw_dataset(dataset, raw)
    info = load_dataset_json(raw_dir)
    out = paths.root("preprocessed", preprocessed) / raw_dir.name
    made = [p for p in (out, *out.parents) if not p.exists()]
    try:
        with exclusive_lock(out / LOCK, f"plan_and_preprocess of {raw_dir.name}"):
            return _run(info, raw_dir, out, verify, preset, workers, progress, gpu_memory_gb)
    except OSError as e:
        raise SpineautoError(_os_line(e)) from None
    except BaseException:
        for p in made:  # a refused run leaves no empty folders behind (deepest first)
            try:
                p.rmdir()
            except OSError:
                break
        raise


def _run(info: DatasetInfo, raw_dir: Path, out: Path, verify: bool, preset: Path | None, workers: int,
         progress: Callable[[str, str], None] | None, gpu_memory_gb: float | None = None) -> PlanResult:
    fp = fingerprint_dataset(info, verify=verify, workers=workers, progress=(lambda c: progress("fingerprint", c)) if progress else None)
    plans = plan_dataset(fp, preset, gpu_memory_gb)
    workers = check_memory(fp, plans, workers)
    folders: dict[str, list[ConfigurationPlan]] = {}
    for cfg in plans.configurations.values():
        folders.setdefault(cfg.data_identifier, []).append(cfg)
    for folder in (out, *(out / d for d in folders)):
        _check_writable(folder)
    _check_no_training(raw_dir.name)
    _withdraw(out)
    written, data = 0, {}
    for identifier, cfgs in folders.items():
        done = preprocess_dataset(info, cfgs[0], plans.intensity, out / identifier, workers=workers,
                                  progress=(lambda c: progress("preprocess", c)) if progress else None)
        written += done.written
        data[identifier] = {"configurations": [c.name for c in cfgs], "cases": done.cases}
    _remove_unplanned(out, set(folders))
    _check_splits(out, {case for d in data.values() for case in d["cases"]})
    fp.save(out / "fingerprint.json")
    write_json(out / "dataset.json", read_json(raw_dir / "dataset.json"))
    write_manifest(out, data, raw_entries(info))
    plans.save(out / PLANS)  # the last file: its presence says the run finished
    log.info("plans written to %s", out / PLANS)
    return PlanResult(plans=plans, fingerprint=fp, folder=out, written=written)


def _check_no_training(dataset: str) -> None:
    """Refuse while a live ``train`` of this dataset reads the preprocessed data (its fold lock says so):
    its data workers open cases as they go and would mix the old data with the new."""
    for lock in sorted((paths.root("results") / dataset).glob("*/.fold_*.lock")):
        holder = read_lock(lock)
        if holder is not None and holder_alive(holder):
            raise SpineautoError(f"{holder.get('what', lock.parent)} (pid {holder.get('pid')}, since {holder.get('started')}) reads "
                                 f"this dataset's preprocessed data; wait for it to finish before planning again (lock file {lock})")


def _withdraw(out: Path) -> None:
    """Remove the previous run's plans and manifest before anything else changes: until this run
    writes them again, nothing here looks like a finished plan."""
    for name in (PLANS, MANIFEST):
        if (out / name).is_file():
            (out / name).unlink()
            log.debug("%s: removed; written again when this run finishes", out / name)


def _check_writable(folder: Path) -> None:
    """A folder we can create files in, or one line naming it."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise SpineautoError(f"{blocker}: a file stands where the preprocessed folder {folder} needs a folder; move it away "
                             "or set SPINEAUTO_PREPROCESSED to another folder")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".spineauto_write_test"):
            pass
    except OSError as e:
        raise SpineautoError(f"{folder}: cannot write there ({e.strerror}); make it writable or set SPINEAUTO_PREPROCESSED "
                             "to another folder") from None


def _remove_unplanned(out: Path, planned: set[str]) -> None:
    """Preprocessed data of configurations that are no longer planned (e.g. 2d_cord_roi after the lesion
    label left the dataset): folders holding nothing but preprocessed cases."""
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and p.name not in planned and not p.name.startswith(".")):
        files = [p for p in folder.rglob("*")]
        if files and all(p.is_file() and (p.suffix in (".npy", ".json") or ".tmp" in p.name) for p in files):
            log.info("%s: preprocessed data of no planned configuration; removed", folder)
            shutil.rmtree(folder)


def _check_splits(out: Path, cases: set[str]) -> None:
    """splits_final.json is written once and may be edited, so it is kept; say when it no longer fits the cases."""
    try:
        splits = read_json(out / SPLITS)
        listed = {c for fold in splits for part in ("train", "val") for c in fold[part]}
    except (OSError, ValueError, TypeError, KeyError):
        return
    gone, new = sorted(listed - cases), sorted(cases - listed)
    if gone or new:
        log.warning("%s: %d case(s) listed there are no longer preprocessed%s and %d new case(s) are in no fold%s; "
                    "delete it to split the dataset again", out / SPLITS, len(gone), f" ({', '.join(gone[:3])}...)" if gone else "",
                    len(new), f" ({', '.join(new[:3])}...)" if new else "")


def _os_line(e: OSError) -> str:
    """One line naming the path of an OS error (a worker's too: its errors are re-raised here)."""
    where = e.filename2 or e.filename or "(unknown path)"  # os.replace(temporary, target): the target
    reason = e.strerror or str(e) or type(e).__name__
    if e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return f"{where}: {reason}: a file and a folder are in each other's place; move the one in the way"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}: {reason}; make it writable (or readable), or set SPINEAUTO_PREPROCESSED to another folder"
    if e.errno == errno.ENOSPC:
        return f"{where}: no space left on the device; free some space and rerun (cases already preprocessed are kept)"
    return f"{where}: {reason}; fix it and rerun plan_and_preprocess"
