"""DICOM as a training source: generated MR series with header tags, DICOM-SEG and NIfTI masks ->
`convert dicom --classes-from` (imagesTr/labelsTr, classes from the headers with their reasons) ->
training -> `predict --dicom-seg` (a DICOM-SEG that highdicom reads back onto the source series)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from spineauto.errors import SpineautoError

SAGITTAL, AXIAL = (0, 1, 0, 0, 0, -1), (1, 0, 0, 0, 1, 0)
RULES = """
sequence:
  T2w: {SeriesDescription: "(?i)t2"}
  T1w:
    - SeriesDescription: "(?i)t1"
    - ProtocolName: "(?i)mprage"
view:
  sagittal: {orientation: sagittal}
  axial: {orientation: axial}
"""


def write_series(folder: Path, pixels: np.ndarray, description: str, orientation=SAGITTAL, patient="P1", protocol="",
                 spacing=(0.8, 0.8, 2.0)) -> tuple[str, list[str]]:
    """An MR series of ``pixels`` (slices, rows, columns), one file per slice: (SeriesInstanceUID, files)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    normal = np.cross(orientation[:3], orientation[3:])
    files = []
    for k, plane in enumerate(pixels):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID = MRImageStorage, ExplicitVRLittleEndian
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient, f"{patient}^Test", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "1", "1", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 3, k + 1
        ds.SeriesDescription, ds.ProtocolName = description, protocol
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in np.array([-20.0, -30.0, 10.0]) + k * spacing[2] * normal]
        ds.PixelSpacing, ds.SliceThickness = [spacing[0], spacing[1]], spacing[2]
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(plane.astype(np.uint16)).tobytes()
        files.append(str(folder / f"IM{k:04d}.dcm"))
        ds.save_as(files[-1], enforce_file_format=True)
    return str(series), files


def _cord_scan(rng, n=5, size=32) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (slices, rows, columns), cord mask (X, Y, Z) as SimpleITK stacks the series): a bright bar."""
    pixels = rng.integers(50, 120, (n, size, size))
    c = int(rng.integers(10, 20))
    mask = np.zeros((n, size, size), np.uint8)
    mask[:, :, c:c + 5] = 1
    mask[n // 2, 12:15, c + 1:c + 3] = 2  # a lesion inside the cord
    pixels[mask == 1] += 300
    pixels[mask == 2] += 500
    return pixels, np.ascontiguousarray(mask.transpose(2, 1, 0))


def _dicom_tree(root: Path, n_subjects: int = 4) -> dict[str, np.ndarray]:
    """Per subject a sagittal T2 with a DICOM-SEG beside it (the last: a NIfTI mask) and an axial T1; one localizer."""
    import SimpleITK as sitk

    from spineauto.datasets.dicom import find_dicom_stacks, read_stack
    from spineauto.io.dicom_seg import write_dicom_seg

    rng = np.random.default_rng(0)
    truth = {}
    for s in range(n_subjects):
        pixels, mask = _cord_scan(rng)
        folder = root / f"sub{s}" / "t2_sag"
        _, files = write_series(folder, pixels, "T2 SAG", patient=f"P{s}")
        if s < n_subjects - 1:
            write_dicom_seg(root / f"sub{s}" / "seg" / "mask.dcm", mask, files, {1: "cord", 2: "lesion"})
        else:
            stack = find_dicom_stacks(folder)[0]
            image = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0)))
            image.CopyInformation(read_stack(stack))
            sitk.WriteImage(image, str(folder / "mask.nii.gz"))
        truth[f"P{s}"] = mask
        write_series(root / f"sub{s}" / "t1_ax", rng.integers(0, 200, (4, 32, 32)), "sag-free MPRAGE", AXIAL, f"P{s}", protocol="MPRAGE")
    write_series(root / "sub0" / "loc", rng.integers(0, 200, (1, 32, 32)), "LOCALIZER", AXIAL, "P0")
    return truth


def test_dicom_series_with_masks_and_header_rules_convert_to_a_training_dataset(tmp_path, capsys, monkeypatch):
    import nibabel as nib

    from spineauto.datasets.dataset_json import load_dataset_json
    from spineauto.datasets.dicom import convert_dicom_dataset
    from spineauto.datasets.integrity import check_layout

    truth = _dicom_tree(tmp_path / "dicom")
    (tmp_path / "rules.yaml").write_text(RULES)
    monkeypatch.setenv("SPINEAUTO_RAW", str(tmp_path / "raw"))
    code, _, err = run_cli(capsys, "convert", "dicom", tmp_path / "dicom", "-d", "9", "--name", "Clinic", "--classes-from", tmp_path / "rules.yaml")
    assert code == 0, err
    assert "1 series matched no rule for some head (imagesTs): LOCALIZER (sequence)" in " ".join(err.split())
    ds = tmp_path / "raw" / "Dataset009_Clinic"
    # the table of what each series got and why (the same rows, on a console wide enough not to wrap them)
    table = _summary(convert_dicom_dataset(tmp_path / "dicom", tmp_path / "again" / "Dataset009_Clinic", classes_from=tmp_path / "rules.yaml"))
    row = next(line for line in table.splitlines() if "sag-free_MPRAGE" in line)
    assert "imagesTs (no mask)" in row and "sequence=T1w (ProtocolName='MPRAGE' ~ /(?i)mprage/); view=axial (orientation='axial' ~ /axial/)" in row
    row = next(line for line in table.splitlines() if "T2_SAG " in line)
    assert "imagesTr" in row and "sub0/seg/mask.dcm" in row and "sequence=T2w (SeriesDescription='T2 SAG' ~ /(?i)t2/)" in row
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "cord": 1, "lesion": 2}
    assert meta["heads"] == {"sequence": ["T2w", "T1w"], "view": ["sagittal", "axial"]}
    cases = meta["cases"]
    t2 = sorted(c for c in cases if c.startswith("T2_SAG"))
    assert len(t2) == 4 and all(cases[c]["classes"] == {"sequence": "T2w", "view": "sagittal"} for c in t2)
    assert cases["sag-free_MPRAGE"]["classes"] == {"sequence": "T1w", "view": "axial"}  # not sagittal: the header's orientation decides
    # the series with masks train; the T1 series (no mask) and the localizer (no sequence rule) are test cases
    assert sorted(p.name for p in (ds / "labelsTr").iterdir()) == sorted(f"{c}.nii.gz" for c in t2)
    assert "LOCALIZER_0000.nii.gz" in {p.name for p in (ds / "imagesTs").iterdir()}
    for case in t2:
        label = np.asarray(nib.load(ds / "labelsTr" / f"{case}.nii.gz").dataobj)
        np.testing.assert_array_equal(label, truth[cases[case]["subject"]])  # the DICOM-SEG and the NIfTI mask alike
    assert check_layout(load_dataset_json(ds)) == []


def _summary(result) -> str:
    import io

    from rich.console import Console

    from spineauto.cli_views import dicom_summary

    out = io.StringIO()
    dicom_summary(Console(file=out, width=400), result)
    return out.getvalue()


def test_bad_dicom_masks_and_rules_are_refused_in_one_line(tmp_path):
    from spineauto.datasets.dicom import convert_dicom_dataset
    from spineauto.io.dicom_seg import write_dicom_seg

    rng = np.random.default_rng(1)
    pixels, mask = _cord_scan(rng)
    _, files = write_series(tmp_path / "elsewhere" / "s", pixels, "T2 SAG")
    write_dicom_seg(tmp_path / "root" / "seg.dcm", mask, files, {1: "cord", 2: "lesion"})
    write_series(tmp_path / "root" / "t2", pixels, "T2 SAG")
    with pytest.raises(SpineautoError, match=r"root/seg.dcm: DICOM-SEG references series .*, which is not among the series under"):
        convert_dicom_dataset(tmp_path / "root", tmp_path / "raw" / "Dataset001_A")
    (tmp_path / "root" / "seg.dcm").unlink()

    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((32, 31, 5), np.uint8), np.eye(4)), str(tmp_path / "root" / "t2" / "mask.nii.gz"))
    with pytest.raises(SpineautoError, match=r"t2/mask.nii.gz: mask grid does not match series .*: shape \(32, 31, 5\) vs \(32, 32, 5\)"):
        convert_dicom_dataset(tmp_path / "root", tmp_path / "raw" / "Dataset001_A")
    (tmp_path / "root" / "t2" / "mask.nii.gz").unlink()

    (tmp_path / "rules.yaml").write_text("sequence:\n  T2w: {SeriesDescription: T2}\n  sagittal: {SeriesDescription: SAG}\n")
    with pytest.raises(SpineautoError, match=r"the rules of head 'sequence' match two classes, 'T2w' \(SeriesDescription='T2 SAG' ~ /T2/\) "
                                             r"and 'sagittal' \(SeriesDescription='T2 SAG' ~ /SAG/\); make the rules exclusive"):
        convert_dicom_dataset(tmp_path / "root", tmp_path / "raw" / "Dataset001_A", classes_from=tmp_path / "rules.yaml")
    (tmp_path / "rules.yaml").write_text("sequence:\n  T2w: {SeriesDescription: '('}\n  T1w: {SeriesDescription: T1}\n")
    with pytest.raises(SpineautoError, match=r"rules.yaml: sequence.T2w.SeriesDescription: invalid regular expression '\('"):
        convert_dicom_dataset(tmp_path / "root", tmp_path / "raw" / "Dataset001_A", classes_from=tmp_path / "rules.yaml")
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


def test_a_cord_model_trained_from_dicom_predicts_a_dicom_seg_on_the_source_series(tmp_path, spineauto_env, capsys):
    import highdicom as hd
    import nibabel as nib
    import pydicom
    import torch

    from spineauto.datasets.dicom import convert_dicom_dataset
    from spineauto.plan_and_preprocess import plan_and_preprocess
    from spineauto.training.trainer import TrainOptions, train_fold
    from test_training import tiny_plan

    torch.set_num_threads(1)
    _dicom_tree(tmp_path / "dicom", n_subjects=5)
    convert_dicom_dataset(tmp_path / "dicom", spineauto_env["raw"] / "Dataset010_Dicom")
    plan_and_preprocess(10, workers=1)
    tiny_plan(spineauto_env["preprocessed"] / "Dataset010_Dicom" / "plans.json")
    train_fold(10, "2d", "all", TrainOptions(epochs=2, iters_per_epoch=8, val_iters=1, num_workers=0, validate=False, wandb="disabled"))
    rng = np.random.default_rng(7)
    pixels, _ = _cord_scan(rng)
    uid, files = write_series(tmp_path / "new" / "t2", pixels, "T2 SAG follow-up", patient="P9")
    code, _, err = run_cli(capsys, "predict", "-d", "10", "-i", tmp_path / "new", "-o", tmp_path / "out", "-f", "all", "--no-tta",
                           "--device", "cpu", "--dicom-seg")
    assert code == 0, err
    seg = hd.seg.segread(str(tmp_path / "out" / "T2_SAG_follow-up.seg.dcm"))
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == uid
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["cord", "lesion"]
    sops = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=sops, combine_segments=True, skip_overlap_checks=True)
    nifti = np.asarray(nib.load(tmp_path / "out" / "T2_SAG_follow-up.nii.gz").dataobj)
    np.testing.assert_array_equal(frames.transpose(2, 1, 0), nifti)  # the DICOM-SEG is the NIfTI mask, slice by slice
    with pytest.raises(SpineautoError, match="holds image files, not DICOM series; leave --dicom-seg out"):
        from spineauto.inference.model import load_model
        from spineauto.inference.predict import predict_folder

        model = load_model(spineauto_env["results"] / "Dataset010_Dicom" / "spineautoTrainer__spineautoPlans__2d", folds=["all"])
        predict_folder(model, spineauto_env["raw"] / "Dataset010_Dicom" / "imagesTs", tmp_path / "out2", dicom_seg=True)


def write_rtstruct(path: Path, files: list[str], rois: dict[int, tuple[str, list[tuple[int, float, float, float, float]]]],
                   reference_images: bool = True) -> None:
    """An RT Structure Set on the series of ``files``: per ROI number (name, rectangles (slice, row0, row1, col0, col1)
    in pixel coordinates), each a closed planar contour in patient mm; ``reference_images``: contours name their slice."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    slices = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    first = slices[0]
    row_dir, col_dir = np.array(first.ImageOrientationPatient[:3], float), np.array(first.ImageOrientationPatient[3:], float)
    dr, dc = (float(v) for v in first.PixelSpacing)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "RTSTRUCT", generate_uid(), first.StudyInstanceUID
    ds.PatientID, ds.StructureSetLabel = first.PatientID, "cord"
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    study = Dataset()
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID, frame.RTReferencedStudySequence = first.FrameOfReferenceUID, Sequence([study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    ds.StructureSetROISequence, ds.ROIContourSequence = Sequence(), Sequence()
    for number, (name, rectangles) in rois.items():
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, first.FrameOfReferenceUID
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber, item.ContourSequence = number, Sequence()
        for k, r0, r1, c0, c1 in rectangles:
            origin = np.array(slices[k].ImagePositionPatient, float)
            corners = [origin + c * dc * row_dir + r * dr * col_dir for r, c in ((r0, c0), (r0, c1), (r1, c1), (r1, c0))]
            contour = Dataset()
            contour.ContourGeometricType, contour.NumberOfContourPoints = "CLOSED_PLANAR", 4
            contour.ContourData = [round(float(v), 4) for p in corners for v in p]
            if reference_images:
                image = Dataset()
                image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = slices[k].SOPClassUID, slices[k].SOPInstanceUID
                contour.ContourImageSequence = Sequence([image])
            item.ContourSequence.append(contour)
        ds.ROIContourSequence.append(item)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)


def test_rtstruct_masks_are_rasterised_onto_their_series_and_another_series_is_refused(tmp_path):
    import nibabel as nib

    from spineauto.datasets.dicom import convert_dicom_dataset

    rng = np.random.default_rng(3)
    truth = {}
    for s in range(2):
        pixels, mask = _cord_scan(rng)
        _, files = write_series(tmp_path / "root" / f"sub{s}" / "t2", pixels, "T2 SAG", patient=f"P{s}")
        cols = np.nonzero(mask[:, 0, 0])[0]  # the cord's columns (X), every row and slice
        c0, c1 = cols[0] - 0.5, cols[-1] + 0.5  # around pixel edges: these pixels and no others
        hole = (2, 14.5, 17.5, c0 + 1, c1 - 1) if s == 1 else None  # a contour inside another of one ROI: a hole
        cord = [(k, -0.5, 31.5, c0, c1) for k in range(5)] + ([hole] if hole else [])
        lesion = [(2, 11.5, 14.5, cols[0] + 0.5, cols[0] + 2.5)]
        # the lesion's contours name no image: they are placed by their position along the slice normal
        write_rtstruct(tmp_path / "root" / f"sub{s}" / "rt" / "rs.dcm", files, {1: ("cord", cord), 2: ("lesion", lesion)},
                       reference_images=s == 0)
        if hole:
            mask[cols[1]:cols[-1], 15:18, 2] = 0
        truth[f"P{s}"] = mask
    result = convert_dicom_dataset(tmp_path / "root", tmp_path / "raw" / "Dataset011_Rt")
    ds = tmp_path / "raw" / "Dataset011_Rt"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "cord": 1, "lesion": 2}
    assert sorted(r.mask for r in result.rows) == ["sub0/rt/rs.dcm", "sub1/rt/rs.dcm"]
    for case, info in meta["cases"].items():
        label = np.asarray(nib.load(ds / "labelsTr" / f"{case}.nii.gz").dataobj)
        assert (label == 2).sum() == 6 and (label == 0).sum() == truth[info["subject"]].size - (truth[info["subject"]] > 0).sum()
        np.testing.assert_array_equal(label, truth[info["subject"]])

    pixels, _ = _cord_scan(rng)
    _, files = write_series(tmp_path / "elsewhere" / "t2", pixels, "T2 SAG")
    write_rtstruct(tmp_path / "root" / "sub0" / "rt" / "rs.dcm", files, {1: ("cord", [(0, 0, 4, 0, 4)])})
    with pytest.raises(SpineautoError, match=r"sub0/rt/rs.dcm: RTSTRUCT references series .*, which is not among the series under"):
        convert_dicom_dataset(tmp_path / "root", tmp_path / "raw" / "Dataset012_Rt")


def test_bad_rtstructs_are_refused_in_one_line(tmp_path):
    from spineauto.datasets.dicom import convert_dicom_dataset

    pixels, _ = _cord_scan(np.random.default_rng(4))
    _, files = write_series(tmp_path / "root" / "t2", pixels, "T2 SAG")
    rs = tmp_path / "root" / "rt" / "rs.dcm"
    write_rtstruct(rs, files, {300: ("cord", [(0, 0, 4, 0, 4)])})
    with pytest.raises(SpineautoError, match=r"rt/rs.dcm: ROI number 300 \('cord'\) is not a label value 1..255; renumber the ROIs"):
        convert_dicom_dataset(tmp_path / "root", tmp_path / "raw" / "Dataset001_A")
    write_rtstruct(rs, files, {1: ("cord", [(0, 0, 4, 0, 4)])}, reference_images=False)
    import pydicom

    ds = pydicom.dcmread(rs)
    contour = ds.ROIContourSequence[0].ContourSequence[0]
    contour.ContourData = [v + 50.0 * (i % 3 == 0) for i, v in enumerate(contour.ContourData)]  # 50 mm off the sagittal slices
    ds.save_as(rs)
    with pytest.raises(SpineautoError, match=r"rt/rs.dcm: a contour of ROI 'cord' at .* mm along the slice normal lies on no slice of series"):
        convert_dicom_dataset(tmp_path / "root", tmp_path / "raw" / "Dataset001_A")
    del ds.ReferencedFrameOfReferenceSequence
    ds.save_as(rs)
    with pytest.raises(SpineautoError, match=r"rt/rs.dcm: RTSTRUCT references no image series \(ReferencedFrameOfReferenceSequence\)"):
        convert_dicom_dataset(tmp_path / "root", tmp_path / "raw" / "Dataset001_A")
