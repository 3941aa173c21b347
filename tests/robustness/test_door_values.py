"""Values checked at the door: a header voxel size of 0 (read as 1 mm by nibabel), complex voxels
(cast to their real part), a constant scan (87% "cord"), a voxel size 1e-4 mm (54% lesion), and
predictions holding 0.5 or NaN in `evaluate` (NaN scored Dice 1.0). Each gave a silent result
with exit 0; each is now one line naming the file and the cause.
"""
from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import run_cli
from test_security import _one_error_line, world  # noqa: F401 (the module fixture)


def _scan(world) -> Path:
    return sorted((world["raw"] / "Dataset001_Ph" / "imagesTs").glob("*_0000.nii.gz"))[0]


def _predict_refusal(capsys, folder: Path, out: Path) -> str:
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", str(folder), "-o", str(out), "--device", "cpu", "--no-tta")
    assert code == 1, err
    return _one_error_line(err)


def _write(folder: Path, img: nib.Nifti1Image, name: str = "case_0000.nii.gz") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(img, folder / name)
    return folder / name


def test_zero_pixdim_is_refused_not_read_as_1mm(world, tmp_path, capsys):
    src = nib.load(_scan(world))
    img = nib.Nifti1Image(np.asanyarray(src.dataobj), src.affine)
    img.header.set_sform(None, code=0)
    img.header.set_qform(src.affine, code=1)
    plain = tmp_path / "z.nii"
    nib.save(img, plain)
    data = bytearray(plain.read_bytes())
    struct.pack_into("<f", data, 80, 0.0)  # pixdim[1] = 0 (nibabel would mend it to 1 on load)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "case_0000.nii.gz").write_bytes(gzip.compress(bytes(data)))
    line = _predict_refusal(capsys, tmp_path / "in", tmp_path / "out")
    assert "case_0000.nii.gz" in line and "pixdim" in line and "0.0" in line, line
    assert not any((tmp_path / "out").glob("*.nii.gz"))


def test_complex_scan_is_refused(tmp_path):
    from spineauto.errors import SpineautoError
    from spineauto.io.images import read_volume

    path = _write(tmp_path, nib.Nifti1Image((np.ones((4, 4, 4)) * (1 + 2j)).astype(np.complex64), np.eye(4)))
    with pytest.raises(SpineautoError, match="complex voxel values"):
        read_volume(path)


def test_constant_and_absurd_spacing_scans_are_refused(world, tmp_path, capsys):
    src = nib.load(_scan(world))
    constant = np.full(src.shape, 123.0, np.float32)
    _write(tmp_path / "const", nib.Nifti1Image(constant, src.affine))
    line = _predict_refusal(capsys, tmp_path / "const", tmp_path / "o1")
    assert "constant image" in line and "123" in line, line
    tiny = src.affine.copy()
    tiny[:3, :3] *= 1e-4
    _write(tmp_path / "tiny", nib.Nifti1Image(np.asanyarray(src.dataobj), tiny))
    line = _predict_refusal(capsys, tmp_path / "tiny", tmp_path / "o2")
    assert "voxel size" in line and "10 times" in line, line
    for out in ("o1", "o2"):
        assert not any((tmp_path / out).glob("*.nii.gz"))


@pytest.mark.parametrize("value", [0.5, np.nan])
def test_evaluate_refuses_masks_that_are_not_label_values(tmp_path, capsys, value):
    ref = np.zeros((8, 8, 4), np.float32)
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    nib.save(nib.Nifti1Image(ref, np.eye(4)), tmp_path / "gt" / "a.nii.gz")
    pred = ref.copy()
    pred[2:4, 2:4, 1] = value
    nib.save(nib.Nifti1Image(pred, np.eye(4)), tmp_path / "pred" / "a.nii.gz")
    code, _, err = run_cli(capsys, "evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"))
    line = _one_error_line(err)
    assert code == 1 and "a.nii.gz" in line and ("NaN" in line if np.isnan(value) else "0.5" in line), line
    assert not (tmp_path / "pred" / "summary.json").exists()


def test_dicom_zero_pixel_spacing_is_refused_not_read_as_1mm(tmp_path, capsys, monkeypatch):
    import pydicom

    from test_dicom_robustness import write_series

    monkeypatch.setenv("SPINEAUTO_RAW", str(tmp_path / "raw"))
    for f in write_series(tmp_path / "dicom" / "s"):
        ds = pydicom.dcmread(f)
        ds.PixelSpacing = [0, 0]
        ds.save_as(f)
    code, _, err = run_cli(capsys, "convert", "dicom", str(tmp_path / "dicom"), "-d", "61", "--name", "D")
    line = _one_error_line(err)
    assert code == 1 and "PixelSpacing 0\\0" in line and "slice000.dcm" in line, line
    assert not (tmp_path / "raw" / "Dataset061_D").exists()
