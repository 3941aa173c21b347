"""Robustness of `spineauto convert dicom` on generated broken DICOM series.

A series with a slice missing (a hole in the slice positions) or a slice that cannot be read
(truncated, damaged, empty, unreadable) is refused with one `error:` line naming the file or the gap,
never converted with the rest spaced evenly; output folders that cannot be written end the same way.
Nothing below the test's folder may change on a refusal (hashed before and after), and a conversion
that succeeds only adds the dataset folder. The harness is test_eval_robustness.py's.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from test_eval_robustness import ROOT, changed, fails_cleanly, tree, writable_again  # noqa: F401 - writable_again: autouse fixture


def write_series(folder: Path, n: int = 6, step: float = 2.0, skip=(), echoes: int = 1, positions=None) -> list[Path]:
    """An axial MR series of ``n`` 8x10 slices ``step`` mm apart (less the indices in ``skip``), one file
    per slice and echo, named slice<echo><index>.dcm, instance numbers counting up across echoes."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series, study = generate_uid(prefix="1.2.826.0.1.3680043.8.498."), generate_uid(prefix="1.2.826.0.1.3680043.8.498.")
    files = []
    for echo in range(echoes):
        for k in range(n):
            if (echo, k) in skip or k in skip:
                continue
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
            ds.Modality, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "MR", "sub-01", study, series
            ds.SeriesNumber, ds.InstanceNumber, ds.EchoNumbers = 1, echo * n + k + 1, echo + 1
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [0, 0, positions[k] if positions is not None else k * step]
            ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], step
            ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 8, 10, 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.PixelData = np.full((8, 10), 100 * echo + k, np.uint16).tobytes()
            path = folder / f"slice{echo}{k:02d}.dcm"
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
            files.append(path)
    return files


@pytest.fixture
def scans(tmp_path, spineauto_env) -> Path:
    root = tmp_path / "dicom"
    write_series(root / "good")
    return root


def _convert(root: Path, dataset: int = 40) -> list:
    return ["convert", "dicom", root, "-d", str(dataset), "--name", "Scans"]


# ----------------------------------------------------------------------------------- broken series
def _middle_slice_missing(root, monkeypatch):
    write_series(root / "holey", skip=(2,))
    return "about 1 slice(s) missing between slice001.dcm (instance 2, 2 mm along the slice normal) and slice003.dcm (instance 4, 6 mm)"


def _two_slices_missing(root, monkeypatch):
    write_series(root / "holey", n=8, skip=(3, 4))
    return "about 2 slice(s) missing between slice002.dcm"


def _slice_missing_in_the_second_echo(root, monkeypatch):
    write_series(root / "echoes", echoes=2, skip=((1, 3),))
    return "slice(s) missing between slice102.dcm (instance 9"


def _uneven_reversed_order(root, monkeypatch):
    write_series(root / "reversed", n=5, positions=[40.0, 38.0, 36.0, 30.0, 28.0])
    return "a gap of 6 mm where the slices are 2 mm apart"


def _truncated_pixel_data(root, monkeypatch):
    files = write_series(root / "cut")
    files[3].write_bytes(files[3].read_bytes()[:-60])
    return f"{files[3]}: a DICOM image that cannot be read (truncated or damaged"


def _last_slice_truncated(root, monkeypatch):
    """No hole in the positions that are left: only the file check finds it."""
    files = write_series(root / "cut")
    files[-1].write_bytes(files[-1].read_bytes()[:-60])
    return str(files[-1])


def _header_only(root, monkeypatch):
    files = write_series(root / "cut")
    files[2].write_bytes(files[2].read_bytes()[:200])
    return str(files[2])


def _empty_slice(root, monkeypatch):
    files = write_series(root / "cut")
    files[0].write_bytes(b"")
    return f"{files[0]}: the DICOM file is empty"


def _garbage_after_the_preamble(root, monkeypatch):
    files = write_series(root / "cut")
    files[4].write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 300)
    return str(files[4])


def _slice_of_another_size(root, monkeypatch):
    import pydicom

    files = write_series(root / "mixed")
    ds = pydicom.dcmread(files[2])
    ds.Rows, ds.PixelData = 6, np.zeros((6, 10), np.uint16).tobytes()
    ds.save_as(files[2])
    return "slice slice002.dcm (instance 3) is 10x6 pixels where the other slices are 10x8"


def _text_named_like_dicom(root, monkeypatch):
    write_series(root / "cut")
    (root / "cut" / "notes.dcm").write_text("scanned on a Tuesday")
    return str(root / "cut" / "notes.dcm")


def _unreadable_slice(root, monkeypatch):
    files = write_series(root / "locked")
    files[5].chmod(0)
    if ROOT:  # permissions do not stop root: GDCM leaves the file out, the file check cannot open it
        from spineauto.datasets import dicom

        real_open = open
        monkeypatch.setattr(dicom, "open", lambda p, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied", p))
                            if str(p) == str(files[5]) else real_open(p, *a, **k), raising=False)
        real_ids = dicom.sitk.ImageSeriesReader.GetGDCMSeriesFileNames
        monkeypatch.setattr(dicom.sitk.ImageSeriesReader, "GetGDCMSeriesFileNames",
                            lambda d, uid, *a: tuple(f for f in real_ids(d, uid, *a) if f != str(files[5])))
    return f"{files[5]}: cannot read the file (Permission denied)"


def _unreadable_subfolder(root, monkeypatch):
    write_series(root / "locked")
    (root / "locked").chmod(0)
    if ROOT:
        real = os.scandir
        monkeypatch.setattr(os, "scandir", lambda p=".": (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(p)))
                            if str(p) == str(root / "locked") else real(p))
    return f"{root / 'locked'}: cannot list the folder (Permission denied)"


def _raw_folder_is_a_file(root, monkeypatch):
    raw = root.parent / "rawfile"
    raw.write_text("not a folder")
    monkeypatch.setenv("SPINEAUTO_RAW", str(raw))
    return f"{raw}: cannot write the dataset Dataset040_Scans there (not a folder)"


def _raw_folder_read_only(root, monkeypatch):
    raw = root.parent / "raw"
    raw.chmod(0o555)
    if ROOT:
        real = Path.mkdir

        def mkdir(self, *a, **k):
            if self.parent == raw:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    return f"{raw}: cannot write the dataset Dataset040_Scans there (Permission denied)"


def _disk_full_while_writing(root, monkeypatch):
    from spineauto.datasets import dicom

    def full(image, path, *a):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("ITK ERROR: NiftiImageIO(0x1): No space left on device")

    monkeypatch.setattr(dicom.sitk, "WriteImage", full)
    # the case is named after its series folder ("good"), not a running number
    return "Dataset040_Scans/imagesTs/good_0000.nii.gz: cannot write the converted series (No space left on device)"


BROKEN = [_middle_slice_missing, _two_slices_missing, _slice_missing_in_the_second_echo, _uneven_reversed_order,
          _truncated_pixel_data, _last_slice_truncated, _header_only, _empty_slice, _garbage_after_the_preamble,
          _slice_of_another_size, _text_named_like_dicom, _unreadable_slice, _unreadable_subfolder, _raw_folder_is_a_file, _raw_folder_read_only,
          _disk_full_while_writing]


@pytest.mark.parametrize("make", BROKEN, ids=lambda f: f.__name__.strip("_"))
def test_dicom_broken_series_fails_in_one_line(scans, tmp_path, capsys, monkeypatch, make):
    names = make(scans, monkeypatch)
    fails_cleanly(capsys, tmp_path, _convert(scans), names)


# ------------------------------------------------------------------------------ what still converts
def _with_other_files(root):
    """A complete series beside a note, a hidden file and a DICOMDIR (DICOM, but no image)."""
    import pydicom

    (root / "good" / "README.txt").write_text("protocol notes")
    (root / "good" / ".DS_Store").write_bytes(b"\0\1\2")
    dicomdir = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "DICOMDIR"
    if dicomdir.is_file():
        shutil.copy(dicomdir, root / "good" / "DICOMDIR")
    return 1


def _slightly_uneven(root):
    """Gaps within 1.5x of the smallest: a warning (the mean spacing), not a missing slice."""
    write_series(root / "uneven", n=5, positions=[0.0, 2.0, 4.0, 6.6, 8.6])
    return 2


def _two_complete_echoes(root):
    write_series(root / "echoes", echoes=2)
    return 3


@pytest.mark.parametrize("make", [_with_other_files, _slightly_uneven, _two_complete_echoes], ids=lambda f: f.__name__.strip("_"))
def test_dicom_complete_series_convert(scans, tmp_path, capsys, spineauto_env, make):
    n_cases = make(scans)
    before = tree(tmp_path)
    code, out, err = run_cli(capsys, *_convert(scans))
    assert code == 0, err
    dataset = spineauto_env["raw"] / "Dataset040_Scans"
    assert changed(before, tree(tmp_path)) == {str(dataset), *tree(dataset)}  # only the new dataset folder
    assert len(json.loads((dataset / "dataset.json").read_text())["cases"]) == n_cases
