"""Robustness of `spineauto plan_and_preprocess` (and of `train` reading what it wrote) on generated cases.

Every scenario copies a small phantom dataset (6 cases; some scenarios also its finished
preprocessed folder), breaks one thing, runs the real command in-process and checks the exit code,
exactly one `error:` line (or none) without a traceback, the words of the error and of the log, and
that no file outside the expected outputs changed (every file and folder of the scenario hashed
before and after; the raw dataset never changes). Classes: 1 the preprocessed folder is the plan's
case list (manifest, removed cases, crashed runs, truncated or corrupt cases), 2 --no-verify never
stores NaN, 3 geometry, memory and plan values checked before use, 4 one run per dataset (lock), 5
permission and path errors as one line. Permission scenarios run as `nobody` (seteuid) when the
tests run as root, which ignores permission bits.

The kill test SIGKILLs (or SIGTERMs) `plan_and_preprocess -np 2` in a subprocess at seeded moments,
starting from the finished plan of the dataset with one more case: no worker survives its parent,
no plan that looks finished is left unless it is the old, intact one, and a rerun writes exactly
what an uninterrupted run writes (byte-identical arrays, equal plans.json and manifest).

Generated cases: 74 scenarios + 4 kill moments (the count is asserted below).
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest

from conftest import remove_tree, run_cli
from test_predict_robustness import snapshot, unprivileged  # hashes of a tree; seteuid(nobody) for permission scenarios

DATASET = "Dataset001_Ph"
REMOVED = "phantom_006"  # in the 7-case dataset only
CASE = "phantom_002"
TEMPORARY = re.compile(r"^\..+\.tmp")  # io.atomic's temporary names
TRAIN = ["train", "-d", "1", "-f", "0", "--device", "cpu", "--wandb", "disabled", "--num-workers", "0", "--epochs", "1",
         "--iters-per-epoch", "1", "--val-iters", "0", "--no-validate"]


@dataclass
class World:
    root: Path  # readable by everyone, so that a scenario can run as an unprivileged user
    raw6: Path  # raw/ with the 6-case dataset
    ref6: Path  # preprocessed/ of raw6, uninterrupted
    raw7: Path  # raw/ with REMOVED as a seventh case
    ref7: Path  # preprocessed/ of raw7


@pytest.fixture(scope="module")
def world():
    from spineauto.datasets.phantoms import write_phantom_dataset
    from spineauto.plan_and_preprocess import plan_and_preprocess

    root = Path(tempfile.mkdtemp(prefix="spineauto_plan_robustness_"))
    root.chmod(0o755)
    try:
        w = World(root, root / "raw6", root / "ref6", root / "raw7", root / "ref7")
        write_phantom_dataset(w.raw7 / DATASET, n_train=7, n_test=0, seed=0)
        shutil.copytree(w.raw7, w.raw6)
        remove_case(w.raw6 / DATASET, REMOVED)
        for raw, ref in ((w.raw6, w.ref6), (w.raw7, w.ref7)):
            plan_and_preprocess(1, workers=1, raw=raw, preprocessed=ref)
        (root / "s").mkdir()
        yield w
    finally:
        remove_tree(root)  # scenarios may leave unreadable files behind on failure


# ---------------------------------------------------------------------------------------------
# helpers


def remove_case(folder: Path, case: str) -> None:
    (folder / "imagesTr" / f"{case}_0000.nii.gz").unlink()
    (folder / "labelsTr" / f"{case}.nii.gz").unlink()
    ds = json.loads((folder / "dataset.json").read_text())
    ds["numTraining"] -= 1
    ds["cases"].pop(case, None)
    (folder / "dataset.json").write_text(json.dumps(ds, indent=2))


def fresh(w: World, d: Path, planned: bool = False) -> Path:
    """``d/raw`` (the 6 cases), ``d/results`` and ``d/pre`` (empty, or the finished plan); returns the dataset's raw folder."""
    shutil.copytree(w.raw6, d / "raw")
    if planned:
        shutil.copytree(w.ref6, d / "pre")
    else:
        (d / "pre").mkdir()
    (d / "results").mkdir()
    return d / "raw" / DATASET


def pre(d: Path) -> Path:
    return d / "pre" / DATASET


def image(raw: Path, case: str = CASE) -> Path:
    return raw / "imagesTr" / f"{case}_0000.nii.gz"


def label(raw: Path, case: str = CASE) -> Path:
    return raw / "labelsTr" / f"{case}.nii.gz"


def rewrite(path: Path, change: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]], dtype=None) -> None:
    img = nib.load(str(path))
    data, affine = change(np.asarray(img.dataobj, dtype=np.float32).copy(), img.affine.copy())
    dtype = dtype or img.get_data_dtype()
    header = img.header.copy()
    header.set_data_dtype(dtype)
    nib.save(nib.Nifti1Image(data.astype(dtype), affine, header), str(path))


def plan_args(*extra) -> list:
    return ["plan_and_preprocess", "-d", "1", "-np", "1", *extra]


def arrays_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.npy"))}


def same_as_reference(folder: Path, reference: Path) -> None:
    """Byte-identical arrays and case properties, equal plans, fingerprint and manifest (but its times)."""
    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}

    assert files(folder) == files(reference)
    for rel in sorted(files(reference)):
        a, b = (folder / rel).read_bytes(), (reference / rel).read_bytes()
        if rel == "manifest.json":
            a, b = (re.sub(rb'"mtime_ns": \d+', b"", x) for x in (a, b))
        assert a == b, rel
    assert not [p for p in folder.rglob("*") if TEMPORARY.match(p.name)]


@dataclass
class Expect:
    code: int
    error: tuple[str, ...] | None = None  # words of the single `error:` line (and the lines it holds); None: no error line
    logged: tuple[str, ...] = ()  # words that must appear in the log
    changes: tuple[str, ...] = ()  # paths relative to the scenario folder that may change (and everything below them)
    check: Callable[[], None] | None = None  # more checks afterwards
    as_user: bool = False  # run as an unprivileged user (permission scenarios)
    restore: tuple[Path, ...] = ()  # chmod 0o755 afterwards
    cleanup: Callable[[], None] | None = None


SCENARIOS: dict[str, Callable[[World, Path], tuple[list, Expect]]] = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


# ---------------------------------------------------------------------------------------------
# class 1: the preprocessed folder is the plan's case list


def _written(d: Path, n: int) -> Callable[[], None]:
    def check():
        m = json.loads((pre(d) / "manifest.json").read_text())
        assert sorted(m["data"]["2d"]["cases"]) == sorted(p.name[:-12] for p in (d / "raw" / DATASET / "imagesTr").iterdir())
    return check


@scenario
def rerun_keeps_every_case(w, d):
    fresh(w, d, planned=True)
    return plan_args(), Expect(0, logged=("0 case(s) preprocessed",), changes=("pre",), check=lambda: same_as_reference(pre(d), w.ref6 / DATASET))


@scenario
def removed_case_disappears(w, d):
    shutil.copytree(w.raw6, d / "raw")
    shutil.copytree(w.ref7, d / "pre")  # planned while it had a seventh case
    (d / "results").mkdir()

    def check():
        same_as_reference(pre(d), w.ref6 / DATASET)
        assert not list(pre(d).rglob(f"{REMOVED}*"))
    return plan_args(), Expect(0, changes=("pre",), check=check)


@scenario
def stale_splits_are_kept_with_a_warning(w, d):  # splits_final.json may be edited by hand: kept, but said to be stale
    shutil.copytree(w.raw6, d / "raw")
    shutil.copytree(w.ref7, d / "pre")
    (d / "results").mkdir()
    cases = sorted(json.loads((pre(d) / "manifest.json").read_text())["data"]["2d"]["cases"])
    (pre(d) / "splits_final.json").write_text(json.dumps([{"train": cases[:4], "val": cases[4:]}, {"train": cases[3:], "val": cases[:3]}]))
    return plan_args(), Expect(0, logged=("splits_final.json", "1 case(s) listed there are no longer preprocessed", REMOVED,
                                          "delete it to split the dataset again"), changes=("pre/Dataset001_Ph/2d", "pre/Dataset001_Ph/2d_cord_roi",
                                          "pre/Dataset001_Ph/plans.json", "pre/Dataset001_Ph/manifest.json", "pre/Dataset001_Ph/fingerprint.json",
                                          "pre/Dataset001_Ph/dataset.json"))


@scenario
def added_case_is_planned(w, d):
    shutil.copytree(w.raw7, d / "raw")
    shutil.copytree(w.ref6, d / "pre")
    (d / "results").mkdir()
    return plan_args(), Expect(0, changes=("pre",), check=lambda: same_as_reference(pre(d), w.ref7 / DATASET))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_props(path: Path) -> None:
    props = json.loads(path.read_text())
    props["classes"] = {k: "T1w" for k in props["classes"]}
    path.write_text(json.dumps(props, indent=2))


BREAKS = {  # file -> how it is broken, what `train` says about it
    "truncated_array": (f"2d/{CASE}.npy", _truncate, "truncated or rewritten"),
    "corrupt_array_same_size": (f"2d/{CASE}.npy", _flip, "does not match its SHA-1"),
    "corrupt_label_array": (f"2d/{CASE}_seg.npy", _flip, "does not match its SHA-1"),
    "missing_label_array": (f"2d/{CASE}_seg.npy", lambda p: p.unlink(), "is missing"),
    "edited_properties": (f"2d/{CASE}.json", _edit_props, "rewritten"),
    "empty_properties": (f"2d/{CASE}.json", lambda p: p.write_bytes(b""), "truncated or rewritten"),
}


def _break_scenarios():
    for kind, (rel, damage, why) in BREAKS.items():
        def train_refuses(w, d, rel=rel, damage=damage, why=why):
            fresh(w, d, planned=True)
            damage(pre(d) / rel)
            return TRAIN, Expect(1, (CASE, why, "rerun `spineauto plan_and_preprocess -d Dataset001_Ph`"))

        def replan_redoes(w, d, rel=rel, damage=damage):
            fresh(w, d, planned=True)
            damage(pre(d) / rel)
            return plan_args(), Expect(0, logged=("1 case(s) preprocessed",), changes=("pre",),
                                       check=lambda: same_as_reference(pre(d), w.ref6 / DATASET))

        SCENARIOS[f"train_refuses_{kind}"] = train_refuses
        SCENARIOS[f"replan_redoes_{kind}"] = replan_redoes


_break_scenarios()


@scenario
def train_refuses_without_manifest(w, d):  # e.g. a plan of a run that crashed before manifests existed
    fresh(w, d, planned=True)
    (pre(d) / "manifest.json").unlink()
    return TRAIN, Expect(1, ("manifest.json: missing", "did not finish", "plan_and_preprocess -d Dataset001_Ph"))


@scenario
def train_refuses_truncated_manifest(w, d):
    fresh(w, d, planned=True)
    _truncate(pre(d) / "manifest.json")
    return TRAIN, Expect(1, ("manifest.json: unreadable", "plan_and_preprocess -d Dataset001_Ph"))


@scenario
def train_refuses_data_the_manifest_lacks(w, d):
    fresh(w, d, planned=True)
    plans = json.loads((pre(d) / "plans.json").read_text())
    plans["configurations"]["2d"]["data_identifier"] = "2d_other"
    (pre(d) / "plans.json").write_text(json.dumps(plans))
    return TRAIN, Expect(1, ("lists no preprocessed data '2d_other'",))


@scenario
def files_outside_the_manifest_are_not_read_and_removed(w, d):
    from spineauto.training.data import CaseStore

    fresh(w, d, planned=True)
    for suffix in (".npy", "_seg.npy", ".json"):  # a case that is not in the plan's list
        shutil.copy(pre(d) / "2d" / f"{CASE}{suffix}", pre(d) / "2d" / f"stray{suffix}")
    assert "stray" not in CaseStore.load(pre(d) / "2d").props
    return plan_args(), Expect(0, logged=("removing 3 file(s)",), changes=("pre",), check=lambda: same_as_reference(pre(d), w.ref6 / DATASET))


@scenario
def unplanned_data_folder_is_removed(w, d):
    fresh(w, d, planned=True)
    shutil.copytree(pre(d) / "2d_cord_roi", pre(d) / "2d_old")

    def check():
        assert not (pre(d) / "2d_old").exists()
        same_as_reference(pre(d), w.ref6 / DATASET)
    return plan_args(), Expect(0, logged=("no planned configuration",), changes=("pre",), check=check)


@scenario
def stale_temporaries_are_swept(w, d):
    fresh(w, d, planned=True)
    (pre(d) / "2d" / f".{CASE}.npy.abc123.tmp").write_bytes(b"half")
    return plan_args(), Expect(0, changes=("pre",), check=lambda: same_as_reference(pre(d), w.ref6 / DATASET))


@scenario
def failed_check_keeps_the_finished_plan(w, d):  # nothing changes before the raw data pass
    raw = fresh(w, d, planned=True)
    rewrite(label(raw), lambda a, aff: (np.where(a > 0, 7, a), aff))
    return plan_args(), Expect(1, ("label values [7] not declared",))


# ---------------------------------------------------------------------------------------------
# class 2: --no-verify never stores NaN


def _finite(d: Path) -> Callable[[], None]:
    def check():
        for p in pre(d).rglob(f"{CASE}.npy"):
            assert np.isfinite(np.load(p)).all(), p
    return check


def _bad_voxels(value):
    def build(w, d):
        rewrite(image(fresh(w, d)), lambda a, aff: (np.where(np.arange(a.size).reshape(a.shape) % 50 == 0, value, a), aff))
        return plan_args("--no-verify"), Expect(0, logged=(CASE, "NaN/Inf voxels", "set to 0", "--no-verify"), changes=("pre",),
                                                check=_finite(d))
    return build


SCENARIOS["nan_voxels_no_verify"] = _bad_voxels(np.nan)
SCENARIOS["inf_voxels_no_verify"] = _bad_voxels(np.inf)
SCENARIOS["minus_inf_voxels_no_verify"] = _bad_voxels(-np.inf)


@scenario
def nan_voxels_verified(w, d):
    rewrite(image(fresh(w, d)), lambda a, aff: (np.where(a > a.mean(), np.nan, a), aff))
    return plan_args(), Expect(1, ("NaN/Inf voxels", f"{CASE}_0000.nii.gz"))


@scenario
def nan_label_no_verify(w, d):
    rewrite(label(fresh(w, d)), lambda a, aff: (np.where(a > 0, np.nan, a), aff), dtype=np.float32)
    return plan_args("--no-verify"), Expect(1, ("label has non-integer values", "--no-verify does not skip these"))


@scenario
def all_nan_image_no_verify(w, d):
    rewrite(image(fresh(w, d)), lambda a, aff: (np.full_like(a, np.nan), aff))
    return plan_args("--no-verify"), Expect(0, logged=(CASE, "set to 0"), changes=("pre",), check=_finite(d))


# ---------------------------------------------------------------------------------------------
# class 3: geometry, memory and plan values checked before use


@scenario
def spacing_needs_more_memory_than_the_machine(w, d):
    raw = fresh(w, d)
    for f in (image(raw), label(raw)):  # voxels of metres: at the dataset's target spacing, an array of terabytes
        rewrite(f, lambda a, aff: (a, np.diag([1e4, 1e4, 1e4, 1.0]) @ aff))
    return plan_args(), Expect(1, (CASE, "would need about", "TiB", "more than this machine's", "check the voxel spacing"))


def _header_only(path: Path, shape: tuple[int, ...]) -> None:
    hdr = nib.load(str(path)).header.copy()
    hdr.set_data_shape(shape)
    with gzip.open(path, "wb") as f:
        hdr.write_to(f)
        f.write(b"\0" * 64)


@scenario
def header_shape_larger_than_memory(w, d):
    _header_only(image(fresh(w, d)), (30000, 30000, 30000))
    return plan_args(), Expect(1, (f"{CASE}_0000.nii.gz", "shape (30000, 30000, 30000) needs about", "TiB", "memory to read"))


@scenario
def header_shape_larger_than_memory_no_verify(w, d):
    _header_only(image(fresh(w, d)), (30000, 30000, 30000))
    return plan_args("--no-verify"), Expect(1, ("memory to read", "--no-verify does not skip these"))


def _bad_affine(value):
    def build(w, d):
        raw = fresh(w, d)
        for f in (image(raw), label(raw)):
            img = nib.load(str(f))
            affine = img.affine.copy()
            affine[:3, 0] = value
            hdr = img.header.copy()
            hdr.set_sform(affine, code=1)
            hdr.set_qform(None, code=0)
            nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, header=hdr), str(f))
        return plan_args("--no-verify"), Expect(1, (f"{CASE}_0000.nii.gz", "unusable geometry", "voxel sizes"))
    return build


SCENARIOS["zero_voxel_size"] = _bad_affine(0.0)
SCENARIOS["nan_in_affine"] = _bad_affine(np.nan)

PRESETS = {  # preset text -> words of the error
    "patch_zero": ("2d: {patch_size: [0, 96]}", ("configurations.2d.patch_size", "must be > 0")),
    "patch_not_divisible": ("2d: {patch_size: [81, 96]}", ("configurations.2d.patch_size", "divisible by 16x16")),
    "batch_zero": ("2d: {batch_size: 0}", ("configurations.2d.batch_size", "must be >= 1")),
    "spacing_zero": ("2d: {target_spacing: [0.0, 0.5]}", ("configurations.2d.target_spacing", "must be > 0")),
    "spacing_negative": ("cls: {target_spacing: [-1.0, 0.5]}", ("configurations.cls.target_spacing", "must be > 0")),
    "lr_zero": ("2d: {optim: {initial_lr: 0}}", ("optim.initial_lr", "must be > 0")),
    "lr_negative": ("cls: {optim: {initial_lr: -0.01}}", ("optim.initial_lr", "must be > 0")),
    "momentum_one": ("2d: {optim: {momentum: 1.0}}", ("optim.momentum", "< 1")),
    "weight_decay_negative": ("2d: {optim: {weight_decay: -0.00001}}", ("optim.weight_decay", ">= 0")),
    "epochs_zero": ("2d: {optim: {epochs: 0}}", ("optim.epochs", "must be >= 1")),
    "iterations_zero": ("2d: {optim: {iters_per_epoch: 0}}", ("optim.iters_per_epoch", "must be >= 1")),
    "val_iterations_negative": ("2d: {optim: {val_iters: -1}}", ("optim.val_iters", "must be >= 0")),
    "probability_above_one": ("2d: {augmentation: {probability: 1.5}}", ("augmentation.probability", "<= 1")),
    "oversampling_negative": ("2d: {foreground_oversampling: -0.1}", ("foreground_oversampling", ">= 0")),
    "dropout_one": ("2d: {network: {dropout: 1.0}}", ("network.dropout", "< 1")),
    "label_smoothing_one": ("cls: {loss: {label_smoothing: 1.0}}", ("loss.label_smoothing", "< 1")),
    "scale_range_reversed": ("2d: {augmentation: {scale_range: [1.4, 0.7]}}", ("augmentation.scale_range", "low <= high")),
    "mirror_axis_three_d": ("2d: {augmentation: {mirror_axes: [2]}}", ("augmentation.mirror_axes", "axes 0 and 1")),
    "even_kernel": ("2d: {network: {kernel_sizes: [[2, 2], [3, 3], [3, 3], [3, 3], [3, 3]]}}", ("network.kernel_sizes[0]", "odd")),
    "stride_zero": ("2d: {network: {strides: [[1, 1], [0, 2], [2, 2], [2, 2], [2, 2]]}}", ("network.strides[1]", ">= 1")),
    "data_identifier_path": ("2d: {data_identifier: ../elsewhere}", ("data_identifier", "a folder name")),
    "shared_data_differs": ("2d_fine:\n    inherit: 2d\n    target_spacing: [0.25, 0.25]",
                            ("2d_fine", "shares data_identifier '2d' with 2d", "target_spacing", "its own data_identifier")),
}


def _preset_scenario(text: str, words: tuple[str, ...]):
    def build(w, d):
        fresh(w, d)
        preset = d / "preset.yaml"
        preset.write_text("configurations:\n  " + text + "\n")
        return plan_args("--preset", preset), Expect(1, ("preset.yaml", *words))
    return build


for _name, (_text, _words) in PRESETS.items():
    SCENARIOS[f"preset_{_name}"] = _preset_scenario(_text, _words)


def _edited_plan(change: Callable[[dict], None], words: tuple[str, ...]):
    def build(w, d):
        fresh(w, d, planned=True)
        plans = json.loads((pre(d) / "plans.json").read_text())
        change(plans["configurations"]["2d"])
        (pre(d) / "plans.json").write_text(json.dumps(plans))
        return TRAIN, Expect(1, ("plans.json", *words))
    return build


SCENARIOS["plans_json_batch_zero"] = _edited_plan(lambda c: c.update(batch_size=0), ("batch_size", ">= 1"))
SCENARIOS["plans_json_lr_negative"] = _edited_plan(lambda c: c["optim"].update(initial_lr=-1.0), ("optim.initial_lr", "> 0"))
SCENARIOS["plans_json_probability"] = _edited_plan(lambda c: c["augmentation"].update(probability=2), ("augmentation.probability",))


@scenario
def processes_zero(w, d):
    fresh(w, d)
    return ["plan_and_preprocess", "-d", "1", "-np", "0"], Expect(1, ("-np/--num-processes", ">= 1", "got 0"))


@scenario
def processes_negative(w, d):
    fresh(w, d)
    return ["plan_and_preprocess", "-d", "1", "-np", "-3"], Expect(1, ("-np/--num-processes", ">= 1", "got -3"))


# ---------------------------------------------------------------------------------------------
# class 4: one run per dataset


def _lock(d: Path, pid: int, pid_start: int | None, started: str = "2026-01-01 00:00:00 +0000") -> Path:
    path = pre(d) / ".plan_and_preprocess.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"what": "plan_and_preprocess of Dataset001_Ph", "pid": pid, "host": socket.gethostname(),
                                "started": started, "pid_start": pid_start, "command": "spineauto plan_and_preprocess -d 1",
                                "token": "t"}))
    return path


def _pid_start(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rfind(")") + 2:].split()[19])


@scenario
def second_run_is_refused(w, d):
    fresh(w, d, planned=True)
    holder = subprocess.Popen(["sleep", "60"])
    _lock(d, holder.pid, _pid_start(holder.pid))

    def cleanup():
        holder.kill()
        holder.wait()
    return plan_args(), Expect(1, ("locked by pid", str(holder.pid), "wait for it to finish"), cleanup=cleanup)


@scenario
def refused_while_a_training_reads_the_data(w, d):
    fresh(w, d, planned=True)
    holder = subprocess.Popen(["sleep", "60"])
    lock = d / "results" / DATASET / "spineautoTrainer__spineautoPlans__2d" / ".fold_0.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"what": "training of .../fold_0", "pid": holder.pid, "host": socket.gethostname(),
                                "pid_start": _pid_start(holder.pid), "started": "2026-01-01 00:00:00 +0000", "token": "t"}))

    def cleanup():
        holder.kill()
        holder.wait()
    return plan_args(), Expect(1, ("training of .../fold_0", str(holder.pid), "wait for it to finish", ".fold_0.lock"),
                               cleanup=cleanup)


@scenario
def stale_lock_of_a_killed_run_is_taken_over(w, d):
    fresh(w, d, planned=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    _lock(d, gone.pid, None)
    return plan_args(), Expect(0, logged=("taking over the lock", str(gone.pid)), changes=("pre",),
                               check=lambda: same_as_reference(pre(d), w.ref6 / DATASET))


@scenario
def empty_lock_of_a_run_killed_while_locking(w, d):
    fresh(w, d, planned=True)
    lock = pre(d) / ".plan_and_preprocess.lock"
    lock.write_text("")
    os.utime(lock, (time.time() - 60, time.time() - 60))
    return plan_args(), Expect(0, logged=("unreadable lock file",), changes=("pre",), check=lambda: same_as_reference(pre(d), w.ref6 / DATASET))


# ---------------------------------------------------------------------------------------------
# class 5: permission and path errors


@scenario
def readonly_preprocessed_dataset_folder(w, d):
    fresh(w, d, planned=True)
    pre(d).chmod(0o555)
    return plan_args(), Expect(1, (str(pre(d)), "Permission denied", "writable"), as_user=True, restore=(pre(d),))


@scenario
def readonly_configuration_folder(w, d):
    fresh(w, d, planned=True)
    pre(d).chmod(0o777)
    (pre(d) / "2d").chmod(0o555)
    return plan_args(), Expect(1, (str(pre(d) / "2d"), "cannot write there", "Permission denied"), as_user=True,
                               restore=(pre(d), pre(d) / "2d"))


@scenario
def readonly_preprocessed_root(w, d):
    fresh(w, d)
    (d / "pre").chmod(0o555)
    return plan_args(), Expect(1, (str(d / "pre"), "Permission denied"), as_user=True, restore=(d / "pre",))


@scenario
def preprocessed_root_is_a_file(w, d):
    fresh(w, d)
    shutil.rmtree(d / "pre")
    (d / "pre").write_text("not a folder")
    return plan_args(), Expect(1, (str(d / "pre"), "a file stands where a folder is needed"))


@scenario
def preprocessed_dataset_is_a_file(w, d):
    fresh(w, d)
    pre(d).write_text("not a folder")
    return plan_args(), Expect(1, (str(pre(d)), "a file stands where a folder is needed"))


@scenario
def configuration_folder_is_a_file(w, d):
    fresh(w, d)
    pre(d).mkdir()
    (pre(d) / "2d").write_text("not a folder")
    return plan_args(), Expect(1, (str(pre(d) / "2d"), "a file stands where the preprocessed folder"))


@scenario
def case_file_is_a_folder(w, d):  # found only while preprocessing: the plan is withdrawn, the error names the path
    fresh(w, d, planned=True)
    (pre(d) / "2d" / f"{CASE}.npy").unlink()
    (pre(d) / "2d" / f"{CASE}.npy").mkdir()

    def check():
        assert not (pre(d) / "plans.json").exists() and not (pre(d) / "manifest.json").exists()
    return plan_args(), Expect(1, (f"{CASE}.npy", "Is a directory"), changes=("pre",), check=check)


@scenario
def fingerprint_json_is_a_folder(w, d):  # found when the run writes its results: named, and the plan stays withdrawn
    fresh(w, d, planned=True)
    (pre(d) / "fingerprint.json").unlink()
    (pre(d) / "fingerprint.json").mkdir()

    def check():
        assert not (pre(d) / "plans.json").exists() and not [p for p in pre(d).iterdir() if TEMPORARY.match(p.name)]
    return plan_args(), Expect(1, (str(pre(d) / "fingerprint.json"), "Is a directory"), changes=("pre",), check=check)


@scenario
def unreadable_raw_image(w, d):
    raw = fresh(w, d)
    (d / "pre").chmod(0o777)
    image(raw).chmod(0o000)
    return plan_args(), Expect(1, (f"{CASE}_0000.nii.gz", "cannot be read (Permission denied)", "make it readable"), as_user=True,
                               restore=(image(raw),))


# ---------------------------------------------------------------------------------------------
# the runner


def test_scenario_count():
    assert len(SCENARIOS) == 74


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(world, name, capsys, monkeypatch):
    d = world.root / "s" / name
    d.mkdir()
    d.chmod(0o777)
    args, expect = SCENARIOS[name](world, d)
    for kind, folder in (("raw", "raw"), ("preprocessed", "pre"), ("results", "results")):
        monkeypatch.setenv(f"SPINEAUTO_{kind.upper()}", str(d / folder))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    before, raw_before = snapshot(d), snapshot(d / "raw")
    try:
        with unprivileged() if expect.as_user else contextlib.nullcontext():
            code, _, err = run_cli(capsys, *map(str, args))
    finally:
        for p in expect.restore:
            p.chmod(0o755)
        if expect.cleanup:
            expect.cleanup()
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.lstrip().startswith("error:")]
    assert code == expect.code, err
    if expect.error is None:
        assert errors == [], err
    else:
        assert len(errors) == 1, err
        line = " ".join(err[err.index("error:"):].split())  # the error, unwrapped
        for word in expect.error:
            assert word in line, (word, line)
    text = " ".join(err.split())
    for word in expect.logged:
        assert word in text, (word, text)
    after = snapshot(d)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    allowed = {k for k in changed if any(k == c or k.startswith(c.rstrip("/") + "/") for c in expect.changes)}
    assert changed == allowed, f"changed outside the expected outputs: {sorted(changed - allowed)}"
    assert snapshot(d / "raw") == raw_before
    if expect.check:
        expect.check()


# ---------------------------------------------------------------------------------------------
# kill and rerun


def _descendants(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (and theirs), from /proc."""
    parents = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                text = (p / "stat").read_text()
            except OSError:
                continue
            parents[int(p.name)] = int(text[text.rfind(")") + 2:].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _running(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rfind(")") + 2] not in "ZX"


def _fresh_files(folder: Path, since: float, pattern: str) -> list[Path]:
    out = []
    for p in folder.rglob(pattern) if folder.is_dir() else []:
        with contextlib.suppress(OSError):
            if p.stat().st_mtime >= since:
                out.append(p)
    return out


@pytest.mark.parametrize("seed,moment", [(0, "fingerprint"), (1, "preprocessing"), (2, "in a write"), (3, "sigterm")])
def test_kill_and_rerun(world, seed, moment, capsys, monkeypatch):
    """Kill `plan_and_preprocess -np 2` at a seeded moment (SIGKILL; SIGTERM for "sigterm"), starting from the
    finished plan of the dataset with one more case: every worker dies with it; a plans.json left behind
    is the old one with its intact manifest (a kill before anything was withdrawn), never a half run;
    a rerun takes the lock over and writes exactly what an uninterrupted run writes."""
    d = world.root / "kill" / str(seed)
    shutil.copytree(world.raw6, d / "raw")
    shutil.copytree(world.ref7, d / "pre")
    env = dict(os.environ, OMP_NUM_THREADS="1", SPINEAUTO_RAW=str(d / "raw"), SPINEAUTO_PREPROCESSED=str(d / "pre"))
    rng = random.Random(seed)
    after, delay = rng.randrange(1, 5), rng.uniform(0.0, 0.02)  # the fingerprint pass of 6 phantoms takes ~0.2 s
    raw_before = snapshot(d / "raw")
    start = time.time() - 0.01
    with open(d / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "spineauto", "plan_and_preprocess", "-d", "1", "-np", "2"], env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
    lock = pre(d) / ".plan_and_preprocess.lock"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if moment == "fingerprint" and lock.is_file():
            time.sleep(delay)
            break
        if moment in ("preprocessing", "sigterm") and len(_fresh_files(pre(d), start, "*.json")) >= after:
            break
        if moment == "in a write" and any(TEMPORARY.match(p.name) for p in _fresh_files(pre(d), start, ".*")):
            break
        time.sleep(0.0005)
    workers = _descendants(proc.pid)
    sig = signal.SIGTERM if moment == "sigterm" else signal.SIGKILL
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == -sig, f"plan_and_preprocess finished before the kill ({moment}): {(d / 'log.txt').read_text()}"
    deadline = time.monotonic() + 10
    while any(_running(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in workers if _running(p)], f"worker processes outlived their parent ({moment})"
    if (pre(d) / "plans.json").exists():  # killed before the run withdrew anything: the old finished plan, intact
        from spineauto.training.data import CaseStore

        assert (pre(d) / "plans.json").read_bytes() == (world.ref7 / DATASET / "plans.json").read_bytes()
        for identifier in ("2d", "2d_cord_roi"):
            CaseStore.load(pre(d) / identifier, full_hash=True)
    monkeypatch.setenv("SPINEAUTO_RAW", str(d / "raw"))
    monkeypatch.setenv("SPINEAUTO_PREPROCESSED", str(d / "pre"))
    code, _, err = run_cli(capsys, "plan_and_preprocess", "-d", "1", "-np", "2")
    assert code == 0, err
    same_as_reference(pre(d), world.ref6 / DATASET)
    assert not lock.exists()
    assert snapshot(d / "raw") == raw_before
