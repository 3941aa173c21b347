"""Robustness of `spineauto evaluate` and `spineauto find_best_configuration` on generated broken inputs.

Every broken input must end in exit code 1 with exactly one `error:` line that names the culprit and
no traceback, and leave every file as it was (the whole tmp tree is hashed before and after). The
inputs that are not broken (a false-positive label, an incomplete cross-validation with
--allow-incomplete) must succeed and change only the expected outputs.
test_dicom_robustness.py uses this file's harness (`tree`, `changed`, `fails_cleanly`, `writable_again`).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import run_cli


def _permissions_ignored() -> bool:
    """True where a read-only folder can be written anyway (root with CAP_DAC_OVERRIDE): such folders are then simulated."""
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o555)
        try:
            Path(folder, "probe").write_text("")
            return True
        except PermissionError:
            return False
        finally:
            os.chmod(folder, 0o755)


ROOT = _permissions_ignored()


# ------------------------------------------------------------------------------------------ harness
def tree(root: Path) -> dict[str, str]:
    """Every path below ``root`` -> sha1 of a file's bytes, 'dir', or 'unreadable' and its mode."""
    return {str(p): "dir" if p.is_dir() else _digest(p) for p in sorted(Path(root).rglob("*")) if p.is_dir() or p.is_file()}


def _digest(path: Path) -> str:
    try:
        return hashlib.sha1(path.read_bytes()).hexdigest()
    except PermissionError:
        return f"unreadable {path.stat().st_mode:o}"


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {p for p in set(before) | set(after) if before.get(p) != after.get(p)}


def fails_cleanly(capsys, root: Path, args: list, names: str) -> str:
    """Run the CLI; exit 1, one `error:` line naming ``names``, no traceback, nothing below ``root`` changed."""
    before = tree(root)
    code, out, err = run_cli(capsys, *args)
    errors = [line for line in (out + err).splitlines() if line.startswith("error:")]
    assert code == 1, (code, out, err)
    assert len(errors) == 1 and "Traceback" not in out + err, out + err
    assert names in errors[0], errors[0]
    assert changed(before, tree(root)) == set()
    return errors[0]


def read_only(monkeypatch, folder: Path) -> None:
    """Make ``folder`` read-only: chmod, or where permissions do not stop us (root) an os.access that says no."""
    if not ROOT:
        folder.chmod(0o555)
        return
    from spineauto.evaluation import files

    real = os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode, **kw: False if Path(p) == folder else real(p, mode, **kw))


@pytest.fixture(autouse=True)
def writable_again(tmp_path):
    yield
    for p in [tmp_path, *tmp_path.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)


def _save(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.eye(4)), str(path))
    return path


def _mask(extra: int = 0) -> np.ndarray:
    m = np.zeros((8, 8, 8), np.uint8)
    m[2:6, 2:6, 2:6] = 1
    if extra:
        m[0, 0, 0:2] = extra
    return m


# ------------------------------------------------------------------------------------- evaluate
@pytest.fixture
def folders(tmp_path):
    for case in ("a", "b"):
        _save(tmp_path / "gt" / f"{case}.nii.gz", _mask())
        _save(tmp_path / "pred" / f"{case}.nii.gz", _mask())
    return tmp_path / "pred", tmp_path / "gt"


def _rows(csv_path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(csv_path, newline="") as f:
        return {(r["case"], r["label"]): r for r in csv.DictReader(f)}


@pytest.mark.parametrize("where", ["prediction", "reference"])
def test_eval_a_label_in_one_side_only_gets_its_row(folders, tmp_path, capsys, where):
    pred, gt = folders
    _save((pred if where == "prediction" else gt) / "a.nii.gz", _mask(extra=2))
    before = tree(tmp_path)
    code, out, err = run_cli(capsys, "evaluate", pred, gt)
    assert code == 0, err
    assert changed(before, tree(tmp_path)) == {str(pred / "summary.json"), str(pred / "summary.csv")}
    summary = json.loads((pred / "summary.json").read_text())
    assert summary["labels"] == {"label_1": 1, "label_2": 2}
    assert summary["metric_per_case"]["a"]["label_2"]["dice"] == 0.0  # in one mask only: Dice 0
    assert summary["metric_per_case"]["b"]["label_2"]["dice"] is None  # in neither: nan, written as null
    assert summary["mean"]["label_2"]["dice"] == 0.0
    rows = _rows(pred / "summary.csv")
    assert float(rows[("a", "label_2")]["dice"]) == 0.0 and float(rows[("mean", "label_2")]["dice"]) == 0.0


def test_eval_an_undeclared_predicted_value_is_evaluated_with_the_dataset_labels(folders, capsys, spineauto_env):
    pred, gt = folders
    ds = spineauto_env["raw"] / "Dataset005_Eval"
    ds.mkdir()
    (ds / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "cord": 1}}))
    _save(pred / "b.nii.gz", _mask(extra=3))
    code, out, err = run_cli(capsys, "evaluate", pred, gt, "-d", "5")
    assert code == 0, err
    summary = json.loads((pred / "summary.json").read_text())
    assert summary["labels"] == {"cord": 1, "label_3": 3}
    assert summary["metric_per_case"]["b"]["label_3"]["dice"] == 0.0
    assert "not declared by the dataset" in " ".join(err.split())


def _bad_dataset_json(pred, gt, tmp, env):
    ds = env["raw"] / "Dataset006_Bad"
    ds.mkdir()
    (ds / "dataset.json").write_text("{not json")
    return ["evaluate", pred, gt, "-d", "6"], str(ds / "dataset.json")


def _output_is_a_folder(pred, gt, tmp, env):
    (tmp / "out.json").mkdir()
    return ["evaluate", pred, gt, "-o", tmp / "out.json"], str(tmp / "out.json")


def _output_below_a_file(pred, gt, tmp, env):
    (tmp / "afile").write_text("x")
    return ["evaluate", pred, gt, "-o", tmp / "afile" / "summary.json"], str(tmp / "afile")


def _labels_file_is_a_folder(pred, gt, tmp, env):
    (tmp / "labels.csv").mkdir()
    return ["evaluate", pred, tmp / "labels.csv"], str(tmp / "labels.csv")


def _labels_csv_binary(pred, gt, tmp, env):
    _classified(pred)
    (tmp / "labels.csv").write_bytes(b"\xff\xfe\x00\x81garbage\x00")
    return ["evaluate", pred, tmp / "labels.csv"], str(tmp / "labels.csv")


def _labels_csv_short_row(pred, gt, tmp, env):
    _classified(pred)
    (tmp / "labels.csv").write_text("case,head,class\na,view\n")
    return ["evaluate", pred, tmp / "labels.csv"], str(tmp / "labels.csv")


def _labels_json_invalid(pred, gt, tmp, env):
    _classified(pred)
    (tmp / "labels.json").write_text("[1, 2")
    return ["evaluate", pred, tmp / "labels.json"], str(tmp / "labels.json")


def _labels_json_cases_a_list(pred, gt, tmp, env):
    _classified(pred)
    (tmp / "labels.json").write_text(json.dumps({"cases": ["a", "b"]}))
    return ["evaluate", pred, tmp / "labels.json"], str(tmp / "labels.json")


def _prediction_folder_missing(pred, gt, tmp, env):
    return ["evaluate", tmp / "nowhere", gt], str(tmp / "nowhere")


def _prediction_is_a_folder(pred, gt, tmp, env):
    (pred / "b.nii.gz").unlink()
    (pred / "b.nii.gz").mkdir()
    return ["evaluate", pred, gt], "b.nii.gz"


def _prediction_damaged(pred, gt, tmp, env):
    (pred / "b.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    return ["evaluate", pred, gt], str(pred / "b.nii.gz")


def _classification_prediction_damaged(pred, gt, tmp, env):
    (pred / "a.json").write_text(json.dumps({"kind": _prediction_kind(), "heads": []}))
    (tmp / "labels.csv").write_text("case,head,class\na,view,axial\n")
    return ["evaluate", pred, tmp / "labels.csv"], str(pred / "a.json")


def _prediction_kind() -> str:
    from spineauto.inference.classify import PREDICTION_KIND

    return PREDICTION_KIND


def _classified(pred: Path) -> None:
    """A classification prediction of case a, as `spineauto predict` writes it."""
    (pred / "a.json").write_text(json.dumps({"kind": _prediction_kind(), "case": "a", "heads": {"view": {"class": "axial"}}}))


BROKEN_EVALUATE = [_bad_dataset_json, _output_is_a_folder, _output_below_a_file, _labels_file_is_a_folder, _labels_csv_binary,
                   _labels_csv_short_row, _labels_json_invalid, _labels_json_cases_a_list, _prediction_folder_missing,
                   _prediction_is_a_folder, _prediction_damaged, _classification_prediction_damaged]


@pytest.mark.parametrize("make", BROKEN_EVALUATE, ids=lambda f: f.__name__.strip("_"))
def test_eval_broken_input_fails_in_one_line(folders, tmp_path, capsys, spineauto_env, make):
    args, names = make(*folders, tmp_path, spineauto_env)
    fails_cleanly(capsys, tmp_path, args, names)


@pytest.mark.parametrize("branch", ["segmentation", "classification"])
def test_eval_read_only_output_folder(folders, tmp_path, capsys, monkeypatch, branch):
    pred, gt = folders
    out = tmp_path / "out"
    out.mkdir()
    labels = gt
    if branch == "classification":
        _classified(pred)
        labels = tmp_path / "labels.csv"
        labels.write_text("case,head,class\na,view,axial\n")
    read_only(monkeypatch, out)
    line = fails_cleanly(capsys, tmp_path, ["evaluate", pred, labels, "-o", out / "summary.json"], str(out))
    assert "not writable" in line


def test_eval_write_refused_while_writing(folders, tmp_path, capsys, monkeypatch):
    """A folder that passes the check but refuses the write (a permission set in between, a full disk)."""
    import tempfile

    from spineauto.io import atomic

    pred, gt = folders
    real = tempfile.mkstemp

    def refuse(*a, dir=None, **kw):
        if Path(dir) == pred:
            raise PermissionError(13, "Permission denied", str(dir))
        return real(*a, dir=dir, **kw)

    monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)
    fails_cleanly(capsys, tmp_path, ["evaluate", pred, gt], f"{pred / 'summary.json'}: cannot write the summary (Permission denied)")


# ------------------------------------------------------------------------- find_best_configuration
CASES = [f"c{i}" for i in range(10)]
SPLITS = [{"train": [c for c in CASES if c not in CASES[2 * k:2 * k + 2]], "val": CASES[2 * k:2 * k + 2]} for k in range(5)]
PLAN = {"name": "x", "task": "segmentation", "data_identifier": "2d", "slicing": "per_case", "isotropic_plane": "axial",
        "target_spacing": [1.0, 1.0], "patch_size": [32, 32], "batch_size": 2, "normalization": ["ZScoreNormalization"],
        "use_mask_for_norm": [False], "network": {}}


def _model(env, cfg: str, folds=range(5), drop=(), data_identifier: str | None = None) -> Path:
    """A model folder with the five folds' validation masks (less ``drop``), its splits and dataset.json."""
    folder = env["results"] / "Dataset007_Cv" / f"spineautoTrainer__spineautoPlans__{cfg}"
    folder.mkdir(parents=True)
    (folder / "splits_final.json").write_text(json.dumps(SPLITS))
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "cord": 1}}))
    if data_identifier:
        plans = {"dataset_name": "Dataset007_Cv", "channel_names": {"0": "T2w"}, "labels": {"background": 0, "cord": 1},
                 "heads": {}, "lesion_labels": [], "configurations": {cfg: {**PLAN, "name": cfg, "data_identifier": data_identifier}},
                 "foreground_intensity_properties_per_channel": {"0": dict(mean=0, std=1, median=0, p00_5=0, p99_5=1, min=0, max=1)},
                 "schema_version": 2}
        (folder / "plans.json").write_text(json.dumps(plans))
    for k in folds:
        for case in SPLITS[k]["val"]:
            if case not in drop:
                _save(folder / f"fold_{k}" / "validation" / f"{case}.nii.gz", _mask(extra=1 if case == "c3" else 0))
    return folder


@pytest.fixture
def cv(spineauto_env):
    for case in CASES:
        _save(spineauto_env["raw"] / "Dataset007_Cv" / "labelsTr" / f"{case}.nii.gz", _mask())
    return spineauto_env


def _outputs(env, *folders: Path) -> set[str]:
    results = env["results"] / "Dataset007_Cv"
    return {str(results / "best_configuration.json"), str(results / "inference_instructions.txt"),
            *(str(f / "postprocessing.json") for f in folders)}


def test_eval_complete_cross_validation_says_how_many_cases(cv, tmp_path, capsys):
    folder = _model(cv, "2d")
    before = tree(tmp_path)
    code, out, err = run_cli(capsys, "find_best_configuration", "-d", "7")
    assert code == 0, err
    assert "cases used: segmentation: 10 of the dataset's 10 cases" in " ".join(out.split())
    assert changed(before, tree(tmp_path)) == _outputs(cv, folder)


def test_eval_incomplete_cross_validation_with_allow_incomplete(cv, tmp_path, capsys):
    folder = _model(cv, "2d", folds=[0, 1])
    before = tree(tmp_path)
    code, out, err = run_cli(capsys, "find_best_configuration", "-d", "7", "--allow-incomplete")
    assert code == 0, err
    assert "cases used: segmentation: 4 of the dataset's 10 cases" in " ".join(out.split())
    assert "incomplete cross-validation" in " ".join(err.split())
    assert changed(before, tree(tmp_path)) == _outputs(cv, folder)
    best = json.loads((cv["results"] / "Dataset007_Cv" / "best_configuration.json").read_text())
    assert best["dataset_cases"] == 10 and best["best"]["cases"] == 4


def test_eval_configuration_of_fewer_cases_is_complete(cv, tmp_path, capsys):
    """A configuration that holds fewer cases (2d_cord_roi: those with a cord) validates only those."""
    pre = cv["preprocessed"] / "Dataset007_Cv" / "2d_roi"
    pre.mkdir(parents=True)
    held = [c for c in CASES if c != "c5"]
    for case in held:
        (pre / f"{case}.json").write_text("{}")
        (pre / f"{case}.npy").write_bytes(b"")
    _model(cv, "2d_cord_roi", drop=("c5",), data_identifier="2d_roi")
    code, out, err = run_cli(capsys, "find_best_configuration", "-d", "7")
    assert code == 0, err
    assert "cases used: segmentation: 9 of the dataset's 10 cases" in " ".join(out.split())


def _folds_missing(env):
    _model(env, "2d", folds=[0, 2])
    return [], "2d: no segmentation validation predictions in fold(s) 1, 3, 4"


def _case_missing(env):
    _model(env, "2d", drop=("c5",))
    return [], "2d fold 2: 1 validation case(s) of splits_final.json have no segmentation prediction (first: c5)"


def _one_of_two_incomplete(env):
    _model(env, "2d")
    _model(env, "multitask", folds=[0, 1, 2, 3])
    return [], "multitask: no segmentation validation predictions in fold(s) 4"


def _only_the_named_configuration_counts(env):
    _model(env, "2d")
    _model(env, "multitask", folds=[0])
    return ["-c", "multitask"], "multitask: no segmentation validation predictions in fold(s) 1, 2, 3, 4"


def _classification_incomplete(env):
    from spineauto.inference.classify import CaseClassification, write_case_json, write_classification_csv

    folder = _model(env, "cls", folds=[])
    for k in (0, 1):
        out = folder / f"fold_{k}" / "validation"
        out.mkdir(parents=True)
        rs = [CaseClassification(c, {"view": np.array([0.9, 0.1])}, {"view": ["axial", "sagittal"]}, 3) for c in SPLITS[k]["val"]]
        for r in rs:
            write_case_json(out, r)
        write_classification_csv(out, rs)
    return [], "cls: no classification validation predictions in fold(s) 2, 3, 4"


def _splits_is_a_folder(env):
    folder = _model(env, "2d")
    (folder / "splits_final.json").unlink()
    (folder / "splits_final.json").mkdir()
    return [], str(folder / "splits_final.json")


def _splits_not_a_list(env):
    folder = _model(env, "2d")
    (folder / "splits_final.json").write_text(json.dumps({"train": CASES}))
    return [], str(folder / "splits_final.json")


def _model_dataset_json_invalid(env):
    folder = _model(env, "2d")
    (folder / "dataset.json").write_text("{")
    return [], str(folder / "dataset.json")


def _model_dataset_json_missing(env):
    folder = _model(env, "2d")
    (folder / "dataset.json").unlink()
    return [], str(folder / "dataset.json")


def _model_labels_not_numbers(env):
    folder = _model(env, "2d")
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "cord": "one"}}))
    return [], str(folder / "dataset.json")


BROKEN_CROSS_VALIDATION = [_folds_missing, _case_missing, _one_of_two_incomplete, _only_the_named_configuration_counts,
                           _classification_incomplete, _splits_is_a_folder, _splits_not_a_list, _model_dataset_json_invalid,
                           _model_dataset_json_missing, _model_labels_not_numbers]


@pytest.mark.parametrize("make", BROKEN_CROSS_VALIDATION, ids=lambda f: f.__name__.strip("_"))
def test_eval_find_best_configuration_refuses(cv, tmp_path, capsys, make):
    extra, names = make(cv)
    line = fails_cleanly(capsys, tmp_path, ["find_best_configuration", "-d", "7", *extra], names)
    if "fold" in names:
        assert "--allow-incomplete" in line


def test_eval_find_best_configuration_read_only_results(cv, tmp_path, capsys, monkeypatch):
    _model(cv, "2d")
    results = cv["results"] / "Dataset007_Cv"
    read_only(monkeypatch, results)
    line = fails_cleanly(capsys, tmp_path, ["find_best_configuration", "-d", "7"], str(results))
    assert "not writable" in line
