"""Broken datasets: every problem is reported at once, as one line each, with a non-zero exit and
no traceback, and nothing is written to the preprocessed folder."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import run_cli

AFFINE = np.diag([0.5, 0.5, 3.0, 1.0])


def _save(path, array, affine=AFFINE, dtype=np.float32):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(dtype), affine), str(path))


def make_dataset(raw, n=3, heads=True):
    folder = raw / "Dataset007_Tiny"
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.normal(100, 10, (16, 16, 4))
        seg = np.zeros((16, 16, 4))
        seg[6:10, 6:10] = 1
        _save(folder / "imagesTr" / f"c{i}_0000.nii.gz", img)
        _save(folder / "labelsTr" / f"c{i}.nii.gz", seg, dtype=np.uint8)
    ds = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "cord": 1}, "numTraining": n, "file_ending": ".nii.gz"}
    if heads:
        ds["heads"] = {"view": ["axial", "sagittal"]}
        ds["cases"] = {f"c{i}": {"subject": f"s{i}", "classes": {"view": "axial"}} for i in range(n)}
    (folder / "dataset.json").write_text(json.dumps(ds))
    return folder


def plan(capsys, env):
    code, out, err = run_cli(capsys, "plan_and_preprocess", "-d", "7", "-np", "1")
    return code, err


def assert_clean_failure(code, err, env, *needles):
    assert code == 1
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    assert not (env["preprocessed"] / "Dataset007_Tiny" / "plans.json").exists()


def test_valid_tiny_dataset_plans(spineauto_env, capsys):
    make_dataset(spineauto_env["raw"])
    code, err = plan(capsys, spineauto_env)
    assert code == 0, err


def test_every_integrity_problem_is_reported_at_once(spineauto_env, capsys):
    folder = make_dataset(spineauto_env["raw"], n=6)
    # geometry mismatch: label origin moved by 2 mm
    shifted = AFFINE.copy()
    shifted[0, 3] = 2.0
    _save(folder / "labelsTr" / "c0.nii.gz", np.zeros((16, 16, 4)), shifted, np.uint8)
    # undeclared label value
    bad = np.zeros((16, 16, 4))
    bad[1, 1, 1] = 3
    _save(folder / "labelsTr" / "c1.nii.gz", bad, dtype=np.uint8)
    # NaN voxels
    img = np.ones((16, 16, 4))
    img[0, 0, 0] = np.nan
    _save(folder / "imagesTr" / "c2_0000.nii.gz", img)
    # empty file
    (folder / "imagesTr" / "c3_0000.nii.gz").write_bytes(b"")
    # an extra channel that dataset.json does not declare
    _save(folder / "imagesTr" / "c4_0001.nii.gz", np.ones((16, 16, 4)))
    # a label with no image
    _save(folder / "labelsTr" / "orphan.nii.gz", np.zeros((16, 16, 4)), dtype=np.uint8)
    # missing class label
    ds = json.loads((folder / "dataset.json").read_text())
    del ds["cases"]["c5"]["classes"]["view"]
    ds["numTraining"] = 9
    (folder / "dataset.json").write_text(json.dumps(ds))
    code, err = plan(capsys, spineauto_env)
    assert_clean_failure(code, err, spineauto_env, "label grid does not match image: origin", "label values [3] not declared",
                         "NaN/Inf voxels", "c3_0000.nii.gz: file is empty", "wrong channel count", "label with no image",
                         "no label for head 'view'", "numTraining is 9 but imagesTr holds 6")
    assert "8 problem(s)" in err


def test_direction_cosines_within_tolerance_are_accepted(spineauto_env, capsys):
    folder = make_dataset(spineauto_env["raw"])
    tiny = AFFINE.copy()
    tiny[0, 1] = 1e-8  # what a NIfTI qform round trip leaves behind on real masks
    _save(folder / "labelsTr" / "c0.nii.gz", np.zeros((16, 16, 4)), tiny, np.uint8)
    code, err = plan(capsys, spineauto_env)
    assert code == 0, err


@pytest.mark.parametrize("case,content,needle", [
    ("missing", None, "dataset.json is missing"),
    ("invalid", "{not json", "invalid JSON at line 1"),
    ("nokeys", "{}", "missing key 'channel_names'"),
    ("single_head", json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz", "heads": {"view": ["axial"]}}), "single class"),
])
def test_bad_dataset_json(spineauto_env, capsys, case, content, needle):
    folder = make_dataset(spineauto_env["raw"])
    if content is None:
        (folder / "dataset.json").unlink()
    else:
        (folder / "dataset.json").write_text(content)
    code, err = plan(capsys, spineauto_env)
    assert_clean_failure(code, err, spineauto_env, needle, "dataset.json")


def test_4d_image_is_rejected_with_a_fix(spineauto_env, capsys):
    folder = make_dataset(spineauto_env["raw"])
    _save(folder / "imagesTr" / "c0_0000.nii.gz", np.ones((16, 16, 4, 3)))
    code, err = plan(capsys, spineauto_env)
    assert_clean_failure(code, err, spineauto_env, "c0_0000.nii.gz: image has shape (16, 16, 4, 3), a 3D image is expected")


def test_unknown_dataset_id(spineauto_env, capsys):
    code, out, err = run_cli(capsys, "plan_and_preprocess", "-d", "42")
    assert code == 1 and "no dataset with id 42" in err and "Traceback" not in err


def test_class_not_declared(spineauto_env, capsys):
    folder = make_dataset(spineauto_env["raw"])
    ds = json.loads((folder / "dataset.json").read_text())
    ds["cases"]["c0"]["classes"]["view"] = "coronal"
    (folder / "dataset.json").write_text(json.dumps(ds))
    code, err = plan(capsys, spineauto_env)
    assert_clean_failure(code, err, spineauto_env, "class 'coronal' for head 'view', not declared")


def test_no_verify_skips_the_checks(spineauto_env, capsys):
    folder = make_dataset(spineauto_env["raw"])
    ds = json.loads((folder / "dataset.json").read_text())
    ds["numTraining"] = 99
    (folder / "dataset.json").write_text(json.dumps(ds))
    assert plan(capsys, spineauto_env)[0] == 1
    code, out, err = run_cli(capsys, "plan_and_preprocess", "-d", "7", "-np", "1", "--no-verify")
    assert code == 0, err
