"""`train` on preprocessed data that no longer match the raw dataset: a case removed, added or
edited after plan_and_preprocess was trained on as it had been, with no word. The manifest now
records the raw training files (size, mtime, SHA-1) and training compares them first.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import planned_phantoms, remove_tree, run_cli
from test_security import _one_error_line

DATASET = "Dataset001_Ph"


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("stale")
    planned_phantoms(root, n_train=4, n_test=0, seed=1)
    yield root
    remove_tree(root)


@pytest.fixture()
def env(planned, tmp_path, monkeypatch):
    for k in ("raw", "preprocessed"):
        shutil.copytree(planned / k, tmp_path / k)  # copy2: modification times kept, as a moved dataset
        monkeypatch.setenv(f"SPINEAUTO_{k.upper()}", str(tmp_path / k))
    monkeypatch.setenv("SPINEAUTO_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return tmp_path / "raw" / DATASET


def _train_refusal(capsys) -> str:
    code, _, err = run_cli(capsys, "train", "-d", "1", "-f", "all", "--device", "cpu", "--epochs", "1")
    assert code == 1, err
    return _one_error_line(err)


def test_unchanged_or_only_touched_raw_data_trains(env):
    from spineauto.training.run import check_raw_unchanged

    check_raw_unchanged(env.parent.parent / "preprocessed" / DATASET)
    image = sorted((env / "imagesTr").glob("*.nii.gz"))[0]
    os.utime(image, None)  # a new modification time, the same bytes: the hash says unchanged
    check_raw_unchanged(env.parent.parent / "preprocessed" / DATASET)


def test_removed_case_is_named(env, capsys):
    case = sorted((env / "labelsTr").glob("*.nii.gz"))[0].name.removesuffix(".nii.gz")
    (env / "labelsTr" / f"{case}.nii.gz").unlink()
    (env / "imagesTr" / f"{case}_0000.nii.gz").unlink()
    line = _train_refusal(capsys)
    assert "1 removed" in line and case in line and "plan_and_preprocess" in line and "--allow-stale-data" in line, line


def test_edited_label_and_added_case_are_named(env, capsys):
    labels = sorted((env / "labelsTr").glob("*.nii.gz"))
    img = nib.load(labels[1])
    data = np.asarray(img.dataobj).copy()
    data[data == 1] = 0  # the cord erased: same shape, other content
    nib.save(nib.Nifti1Image(data, img.affine, img.header), labels[1])
    shutil.copy(labels[0], env / "labelsTr" / "extra_case.nii.gz")
    shutil.copy(env / "imagesTr" / labels[0].name.replace(".nii.gz", "_0000.nii.gz"), env / "imagesTr" / "extra_case_0000.nii.gz")
    line = _train_refusal(capsys)
    assert "1 added (extra_case)" in line and "1 changed" in line and labels[1].name in line, line


def test_allow_stale_data_goes_on_with_a_warning(env, caplog):
    from spineauto.training.run import check_raw_unchanged

    sorted((env / "imagesTr").glob("*.nii.gz"))[0].write_bytes(b"not the image any more")
    with caplog.at_level("WARNING"):
        check_raw_unchanged(env.parent.parent / "preprocessed" / DATASET, allow_stale=True)
    assert "does not match its SHA-1" in caplog.text or "bytes, the manifest" in caplog.text
