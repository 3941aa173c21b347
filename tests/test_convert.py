"""BIDS and DICOM conversion into the raw dataset layout, on real spinal-cord MRI and real DICOM files."""
from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_cli
from spineauto.datasets.bids import convert_bids
from spineauto.datasets.dataset_json import load_dataset_json
from spineauto.datasets.dicom import convert_dicom, read_dicom_series
from spineauto.errors import SpineautoError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sct_testing_data"


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing")
    pytest.skip(f"{what} is missing")


@pytest.fixture(scope="module")
def sct() -> Path:
    if not (DATA / "t2" / "t2.nii.gz").is_file():
        _missing(f"real test data {DATA}")
    return DATA


@pytest.fixture(scope="module")
def dicom_dir() -> Path:
    import pydicom

    folder = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"
    if not (folder / "98892003" / "MR1").is_dir():
        _missing(f"pydicom's bundled DICOM test files {folder}")
    return folder


def _put(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.name.endswith(".nii") and source.name.endswith(".nii.gz"):
        with gzip.open(source, "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
        shutil.copyfile(source, target)
    return target


@pytest.fixture
def bids(tmp_path: Path, sct: Path) -> Path:
    """sub-01: T2w + T1w with masks; sub-02/ses-01: T2starw with mask, dwi without; sub-03: .nii MTS."""
    root = tmp_path / "bids"
    labels = root / "derivatives" / "labels"
    _put(sct / "t2/t2.nii.gz", root / "sub-01/anat/sub-01_T2w.nii.gz")
    _put(sct / "t2/t2_seg-manual.nii.gz", labels / "sub-01/anat/sub-01_T2w_seg-manual.nii.gz")
    (root / "sub-01/anat/sub-01_T2w.json").write_text(
        json.dumps({"SeriesDescription": "T2 SPACE sag", "Manufacturer": "Siemens", "EchoTime": 0.12})
    )
    _put(sct / "t1/t1w.nii.gz", root / "sub-01/anat/sub-01_T1w.nii.gz")
    _put(sct / "t1/t1w_seg-manual.nii.gz", labels / "sub-01/anat/sub-01_T1w_seg-manual.nii.gz")
    _put(sct / "t2s/t2s.nii.gz", root / "sub-02/ses-01/anat/sub-02_ses-01_T2starw.nii.gz")
    _put(sct / "t2s/t2s_seg.nii.gz", labels / "sub-02/ses-01/anat/sub-02_ses-01_T2starw_seg-manual.nii.gz")
    # a mask with another suffix is not a cord mask and must be ignored
    _put(sct / "t2s/t2s_gmseg_manual.nii.gz", labels / "sub-02/ses-01/anat/sub-02_ses-01_T2starw_gmseg.nii.gz")
    _put(sct / "dmri/dwi_mean.nii.gz", root / "sub-02/ses-01/anat/sub-02_ses-01_dwi.nii.gz")
    _put(sct / "mt/mt1.nii.gz", root / "sub-03/anat/sub-03_acq-MTon_MTS.nii")
    _put(sct / "mt/mt1_seg.nii.gz", labels / "sub-03/anat/sub-03_acq-MTon_MTS_seg-manual.nii.gz")
    (root / "dataset_description.json").write_text('{"Name": "test", "BIDSVersion": "1.8.0"}')
    return root


ORIGINALS = {  # case -> (image, mask) in the real data
    "sub-01_T1w": ("t1/t1w.nii.gz", "t1/t1w_seg-manual.nii.gz"),
    "sub-01_T2w": ("t2/t2.nii.gz", "t2/t2_seg-manual.nii.gz"),
    "sub-02_ses-01_T2starw": ("t2s/t2s.nii.gz", "t2s/t2s_seg.nii.gz"),
    "sub-03_acq-MTon_MTS": ("mt/mt1.nii.gz", "mt/mt1_seg.nii.gz"),
}


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_bids_layout_classes_and_metadata(bids: Path, tmp_path: Path) -> None:
    out = convert_bids(bids, tmp_path / "raw" / "Dataset002_Spine")
    assert out == (tmp_path / "raw" / "Dataset002_Spine").resolve()
    assert _names(tmp_path / "raw") == ["Dataset002_Spine"]  # no staging folder left behind
    meta = json.loads((out / "dataset.json").read_text())

    assert list(meta) == [
        "name", "description", "channel_names", "labels", "numTraining", "file_ending", "heads", "cases"
    ]
    assert meta["name"] == "Dataset002_Spine"
    assert str(bids.resolve()) in meta["description"]
    assert meta["channel_names"] == {"0": "MRI"}
    assert meta["labels"] == {"background": 0, "cord": 1}
    assert meta["numTraining"] == 4
    assert meta["file_ending"] == ".nii.gz"
    assert meta["heads"] == {"sequence": ["MTS", "T1w", "T2starw", "T2w", "dwi"]}

    assert _names(out / "imagesTr") == sorted(f"{c}_0000.nii.gz" for c in ORIGINALS)
    assert _names(out / "labelsTr") == sorted(f"{c}.nii.gz" for c in ORIGINALS)
    assert _names(out / "imagesTs") == ["sub-02_ses-01_dwi_0000.nii.gz"]

    cases = meta["cases"]
    assert sorted(cases) == sorted([*ORIGINALS, "sub-02_ses-01_dwi"])
    assert {c: e["subject"] for c, e in cases.items()} == {
        "sub-01_T1w": "sub-01", "sub-01_T2w": "sub-01", "sub-02_ses-01_T2starw": "sub-02",
        "sub-02_ses-01_dwi": "sub-02", "sub-03_acq-MTon_MTS": "sub-03",
    }
    assert {c: e["classes"] for c, e in cases.items()} == {
        "sub-01_T1w": {"sequence": "T1w"}, "sub-01_T2w": {"sequence": "T2w"},
        "sub-02_ses-01_T2starw": {"sequence": "T2starw"}, "sub-02_ses-01_dwi": {"sequence": "dwi"},
        "sub-03_acq-MTon_MTS": {"sequence": "MTS"},
    }
    t2 = cases["sub-01_T2w"]["metadata"]
    assert t2["source"] == "sub-01/anat/sub-01_T2w.nii.gz"
    assert t2["SeriesDescription"] == "T2 SPACE sag" and t2["Manufacturer"] == "Siemens"
    assert "EchoTime" not in t2 and "session" not in t2
    dwi = cases["sub-02_ses-01_dwi"]["metadata"]
    assert dwi == {"source": "sub-02/ses-01/anat/sub-02_ses-01_dwi.nii.gz", "session": "ses-01"}
    assert cases["sub-03_acq-MTon_MTS"]["metadata"]["source"] == "sub-03/anat/sub-03_acq-MTon_MTS.nii"


def test_bids_images_and_masks_are_unchanged(bids: Path, sct: Path, tmp_path: Path) -> None:
    out = convert_bids(bids, tmp_path / "Dataset002_Spine")
    for case, (image_name, mask_name) in ORIGINALS.items():
        original, converted = nib.load(sct / image_name), nib.load(out / "imagesTr" / f"{case}_0000.nii.gz")
        assert converted.shape == original.shape
        assert converted.get_data_dtype() == original.get_data_dtype()
        np.testing.assert_array_equal(converted.affine, original.affine)
        np.testing.assert_array_equal(np.asanyarray(converted.dataobj), np.asanyarray(original.dataobj))
        assert converted.header.get_sform(coded=True)[1] == original.header.get_sform(coded=True)[1]

        mask, label = nib.load(sct / mask_name), nib.load(out / "labelsTr" / f"{case}.nii.gz")
        assert label.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(label.affine, mask.affine)
        labels = np.asanyarray(label.dataobj)
        np.testing.assert_array_equal(labels, np.rint(mask.get_fdata()).astype(np.uint8))
        assert set(np.unique(labels)) == {0, 1} and labels.sum() > 0
    # the uncompressed .nii input is stored gzipped with the very same bytes
    with gzip.open(out / "imagesTr" / "sub-03_acq-MTon_MTS_0000.nii.gz") as f:
        assert f.read() == (bids / "sub-03/anat/sub-03_acq-MTon_MTS.nii").read_bytes()
    test_image = nib.load(out / "imagesTs" / "sub-02_ses-01_dwi_0000.nii.gz")
    np.testing.assert_array_equal(test_image.get_fdata(), nib.load(sct / "dmri/dwi_mean.nii.gz").get_fdata())


def test_bids_contrast_filter(bids: Path, tmp_path: Path) -> None:
    two = json.loads((convert_bids(bids, tmp_path / "Dataset003_A", contrasts=["T2w", "T1w"]) / "dataset.json").read_text())
    assert sorted(two["cases"]) == ["sub-01_T1w", "sub-01_T2w"]
    assert two["numTraining"] == 2 and two["heads"] == {"sequence": ["T1w", "T2w"]}
    assert _names(tmp_path / "Dataset003_A" / "imagesTs") == []

    # one contrast: a single-class head is no head at all
    one = json.loads((convert_bids(bids, tmp_path / "Dataset004_B", contrasts=["T2starw"]) / "dataset.json").read_text())
    assert sorted(one["cases"]) == ["sub-02_ses-01_T2starw"]
    assert one["heads"] == {} and one["cases"]["sub-02_ses-01_T2starw"]["classes"] == {}
    assert one["cases"]["sub-02_ses-01_T2starw"]["metadata"]["session"] == "ses-01"

    with pytest.raises(SpineautoError, match="contrast FLAIR.*found: MTS, T1w, T2starw, T2w, dwi"):
        convert_bids(bids, tmp_path / "Dataset005_C", contrasts=["FLAIR"])
    assert not (tmp_path / "Dataset005_C").exists()


def test_bids_label_suffix_and_name(bids: Path, tmp_path: Path) -> None:
    meta = json.loads(
        (convert_bids(bids, tmp_path / "Dataset006_Gm", label_suffix="gmseg", label_name="grey_matter") / "dataset.json").read_text()
    )
    assert meta["numTraining"] == 1 and meta["labels"] == {"background": 0, "grey_matter": 1}
    assert meta["cases"]["sub-02_ses-01_T2starw"]["metadata"]["mask"].endswith("_T2starw_gmseg.nii.gz")
    assert len(list((tmp_path / "Dataset006_Gm" / "imagesTs").iterdir())) == 4


def test_bids_multilabel_and_float_masks(bids: Path, sct: Path, tmp_path: Path) -> None:
    labels = bids / "derivatives/labels"
    # cord 1 + synthetic lesion 3 in one mask (2 never occurs but must be declared: labels are consecutive)
    cord = nib.load(sct / "t2/t2_fake_lesion_sc_seg.nii.gz")
    lesion = nib.load(sct / "t2/t2_fake_lesion_lesion_seg.nii.gz").get_fdata() > 0.5
    multi = np.where(lesion, 3, np.rint(cord.get_fdata())).astype(np.int16)
    _put(sct / "t2/t2_fake_lesion.nii.gz", bids / "sub-04/anat/sub-04_T2w.nii.gz")
    (labels / "sub-04/anat").mkdir(parents=True)
    nib.save(nib.Nifti1Image(multi, cord.affine, cord.header), labels / "sub-04/anat/sub-04_T2w_seg-manual.nii.gz")
    # a binary float mask (0.0/1.0 in float32) is an ordinary cord mask
    t2 = labels / "sub-01/anat/sub-01_T2w_seg-manual.nii.gz"
    mask = nib.load(t2)
    as_float = nib.Nifti1Image(mask.get_fdata().astype(np.float32), mask.affine, mask.header)
    as_float.set_data_dtype(np.float32)
    nib.save(as_float, t2)

    out = convert_bids(bids, tmp_path / "Dataset007_Lesion")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "label_1": 1, "label_2": 2, "label_3": 3}
    converted = np.asanyarray(nib.load(out / "labelsTr/sub-04_T2w.nii.gz").dataobj)
    assert converted.dtype == np.uint8
    np.testing.assert_array_equal(converted, multi)
    assert (converted == 3).sum() == lesion.sum() > 0
    float_converted = nib.load(out / "labelsTr/sub-01_T2w.nii.gz")
    assert float_converted.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(float_converted.dataobj), np.rint(mask.get_fdata()))


def _assert_nothing_written(parent: Path, expected: list[str]) -> None:
    assert (_names(parent) if parent.exists() else []) == expected


def test_bids_errors_name_the_file(bids: Path, sct: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    with pytest.raises(SpineautoError, match=str(tmp_path / "nowhere")):
        convert_bids(tmp_path / "nowhere", raw / "Dataset010_X")
    _assert_nothing_written(raw, [])

    (tmp_path / "empty/sub-01/anat").mkdir(parents=True)
    (tmp_path / "empty/README").write_text("nothing here")
    with pytest.raises(SpineautoError, match=f"empty BIDS tree.*{tmp_path / 'empty'}"):
        convert_bids(tmp_path / "empty", raw / "Dataset010_X")
    _assert_nothing_written(raw, [])

    orphan = _put(sct / "t2/t2_seg-manual.nii.gz", bids / "derivatives/labels/sub-09/anat/sub-09_T2w_seg-manual.nii.gz")
    with pytest.raises(SpineautoError, match=f"mask {orphan} has no image.*sub-09/anat/sub-09_T2w.nii.gz"):
        convert_bids(bids, raw / "Dataset010_X")
    _assert_nothing_written(raw, [])
    orphan.unlink()

    dwi = nib.load(sct / "dmri/dwi_mean.nii.gz")
    four_d = bids / "sub-05/anat/sub-05_dwi.nii.gz"
    four_d.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.stack([dwi.get_fdata()] * 3, axis=-1), dwi.affine), four_d)
    with pytest.raises(SpineautoError, match=rf"{four_d} has shape \(40, 42, 5, 3\): a 3D image is expected"):
        convert_bids(bids, raw / "Dataset010_X")
    _assert_nothing_written(raw, [])
    four_d.unlink()


def test_bids_failure_while_writing_leaves_nothing(bids: Path, sct: Path, tmp_path: Path) -> None:
    # the T1w mask under the T2w image: found only once images are being written
    wrong = bids / "derivatives/labels/sub-01/anat/sub-01_T2w_seg-manual.nii.gz"
    shutil.copyfile(sct / "t1/t1w_seg-manual.nii.gz", wrong)
    with pytest.raises(SpineautoError, match=rf"mask {wrong} has shape \(42, 76, 77\).*\(60, 55, 52\)"):
        convert_bids(bids, tmp_path / "raw" / "Dataset011_Y")
    _assert_nothing_written(tmp_path / "raw", [])


def test_bids_refuses_to_overwrite(bids: Path, tmp_path: Path) -> None:
    target = tmp_path / "raw" / "Dataset012_Z"
    target.mkdir(parents=True)
    (target / "dataset.json").write_text("{}")
    with pytest.raises(SpineautoError, match=f"{target} already exists.*--overwrite"):
        convert_bids(bids, target)
    assert _names(tmp_path / "raw") == ["Dataset012_Z"] and _names(target) == ["dataset.json"]
    assert (target / "dataset.json").read_text() == "{}"

    convert_bids(bids, target, overwrite=True)
    assert _names(tmp_path / "raw") == ["Dataset012_Z"]
    assert json.loads((target / "dataset.json").read_text())["numTraining"] == 4


# ------------------------------------------------------------------------------- several labels (lesions)


@pytest.fixture
def lesion_bids(tmp_path: Path, sct: Path) -> Path:
    """sub-01: cord + lesion masks (the lesion reaching outside the cord); sub-02: cord mask only;
    sub-03: a lesion mask but no cord mask."""
    root = tmp_path / "lesion_bids"
    labels = root / "derivatives" / "labels"
    cord = nib.load(sct / "t2/t2_fake_lesion_sc_seg.nii.gz")
    lesion = nib.load(sct / "t2/t2_fake_lesion_lesion_seg.nii.gz").get_fdata() > 0.5
    lesion[5:8, 5:8, 10:12] = True  # a lesion blob far from the cord
    for sub in ("sub-01", "sub-02", "sub-03"):
        _put(sct / "t2/t2_fake_lesion.nii.gz", root / f"{sub}/anat/{sub}_T2w.nii.gz")
    for sub in ("sub-01", "sub-02"):
        _put(sct / "t2/t2_fake_lesion_sc_seg.nii.gz", labels / f"{sub}/anat/{sub}_T2w_seg-manual.nii.gz")
    for sub in ("sub-01", "sub-03"):
        (labels / f"{sub}/anat").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(lesion.astype(np.uint8), cord.affine), labels / f"{sub}/anat/{sub}_T2w_lesion-manual.nii.gz")
    return root


CORD_AND_LESION = ("--label", "cord=seg-manual", "--label", "lesion=lesion-manual")


def _flat(text: str) -> str:
    return " ".join(text.split())  # log lines are wrapped to the console width


def test_bids_cord_and_lesion_labels(lesion_bids: Path, sct: Path, spineauto_env, capsys) -> None:
    code, _, err = run_cli(capsys, "convert", "bids", lesion_bids, "-d", 30, "--name", "Lesion", *CORD_AND_LESION)
    assert code == 0, err
    out = spineauto_env["raw"] / "Dataset030_Lesion"
    assert _names(spineauto_env["raw"]) == ["Dataset030_Lesion"]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "cord": 1, "lesion": 2}
    assert meta["lesion_labels"] == ["lesion"] and list(meta).index("lesion_labels") == list(meta).index("labels") + 1
    assert load_dataset_json(out).lesion_labels == ["lesion"]
    assert meta["numTraining"] == 2
    assert _names(out / "labelsTr") == ["sub-01_T2w.nii.gz", "sub-02_T2w.nii.gz"]
    assert _names(out / "imagesTs") == ["sub-03_T2w_0000.nii.gz"]  # a lesion mask alone makes no training case

    cord = np.rint(nib.load(sct / "t2/t2_fake_lesion_sc_seg.nii.gz").get_fdata()).astype(np.uint8)
    lesion = np.asanyarray(nib.load(lesion_bids / "derivatives/labels/sub-01/anat/sub-01_T2w_lesion-manual.nii.gz").dataobj) == 1
    one = nib.load(out / "labelsTr/sub-01_T2w.nii.gz")
    assert one.get_data_dtype() == np.uint8
    one = np.asanyarray(one.dataobj)
    np.testing.assert_array_equal(one, np.where(lesion, 2, cord))
    assert (one[lesion & (cord == 1)] == 2).all() and (lesion & (cord == 1)).sum() > 0  # painted over the cord
    assert (one[lesion & (cord == 0)] == 2).all() and (lesion & (cord == 0)).sum() == 18  # outside the cord: kept
    assert ((one == 1) == ((cord == 1) & ~lesion)).all()

    # no lesion mask: no lesion, said per case and recorded in the case's metadata
    np.testing.assert_array_equal(np.asanyarray(nib.load(out / "labelsTr/sub-02_T2w.nii.gz").dataobj), cord)
    two = meta["cases"]["sub-02_T2w"]["metadata"]
    assert two["assumed_empty"] == ["lesion"] and list(two["masks"]) == ["cord"]
    first = meta["cases"]["sub-01_T2w"]["metadata"]
    assert "assumed_empty" not in first
    assert first["masks"] == {"cord": "derivatives/labels/sub-01/anat/sub-01_T2w_seg-manual.nii.gz",
                              "lesion": "derivatives/labels/sub-01/anat/sub-01_T2w_lesion-manual.nii.gz"}
    assert "masks" not in meta["cases"]["sub-03_T2w"]["metadata"]
    flat = _flat(err)
    assert "sub-02_T2w: no lesion mask (_lesion-manual): no lesion in this case" in flat
    assert "sub-01_T2w: 18 lesion voxels lie outside the cord mask; kept as lesion" in flat
    assert "sub-03_T2w: ignoring lesion mask" in flat and "goes to imagesTs" in flat
    assert "Traceback" not in err


def _multi_valued(bids: Path, sct: Path, top: int = 2) -> np.ndarray:
    """sub-04: one mask with cord 1 and lesion ``top``."""
    cord = nib.load(sct / "t2/t2_fake_lesion_sc_seg.nii.gz")
    lesion = nib.load(sct / "t2/t2_fake_lesion_lesion_seg.nii.gz").get_fdata() > 0.5
    multi = np.where(lesion, top, np.rint(cord.get_fdata())).astype(np.int16)
    _put(sct / "t2/t2_fake_lesion.nii.gz", bids / "sub-04/anat/sub-04_T2w.nii.gz")
    (bids / "derivatives/labels/sub-04/anat").mkdir(parents=True)
    nib.save(nib.Nifti1Image(multi, cord.affine, cord.header), bids / "derivatives/labels/sub-04/anat/sub-04_T2w_seg-manual.nii.gz")
    return multi


@pytest.mark.parametrize("args", [("--label-names", "cord,lesion"),
                                  ("--label", "cord=seg-manual", "--label-names", "cord,lesion"),
                                  ("--label-suffix", "seg-manual", "--label-names", "cord , lesion")])
def test_bids_multivalued_mask_with_label_names(bids: Path, sct: Path, spineauto_env, capsys, args) -> None:
    multi = _multi_valued(bids, sct)
    code, _, err = run_cli(capsys, "convert", "bids", bids, "-d", 31, "--name", "Multi", *args)
    assert code == 0, err
    out = spineauto_env["raw"] / "Dataset031_Multi"
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "cord": 1, "lesion": 2} and meta["lesion_labels"] == ["lesion"]
    assert meta["numTraining"] == 5
    np.testing.assert_array_equal(np.asanyarray(nib.load(out / "labelsTr/sub-04_T2w.nii.gz").dataobj), multi)
    assert "--label-names" not in err  # no warning: every value is named


def test_bids_multivalued_mask_without_names_warns(bids: Path, sct: Path, spineauto_env, capsys) -> None:
    _multi_valued(bids, sct, top=3)
    code, _, err = run_cli(capsys, "convert", "bids", bids, "-d", 32, "--name", "Generic")
    assert code == 0, err
    meta = json.loads((spineauto_env["raw"] / "Dataset032_Generic" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "label_1": 1, "label_2": 2, "label_3": 3}  # today's names
    assert "lesion_labels" not in meta
    flat = _flat(err)
    assert "mask values 1, 3" in flat and "declared as label_1, label_2, label_3" in flat
    assert "--label-names cord,lesion,name3" in flat

    # a name given with --label names value 1; the others stay generic, with the warning
    code, _, err = run_cli(capsys, "convert", "bids", bids, "-d", 33, "--name", "Named", "--label", "cord=seg-manual")
    assert code == 0, err
    meta = json.loads((spineauto_env["raw"] / "Dataset033_Named" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "cord": 1, "label_2": 2, "label_3": 3}
    assert "mask values 3" in _flat(err) and "declared as label_2, label_3" in _flat(err)


def _lesion_file(root: Path) -> Path:
    return root / "derivatives/labels/sub-01/anat/sub-01_T2w_lesion-manual.nii.gz"


def _three_valued_lesion(root: Path, sct: Path) -> None:
    mask = nib.load(_lesion_file(root))
    data = np.asanyarray(mask.dataobj).copy()
    data[0, 0, 0] = 2
    nib.save(nib.Nifti1Image(data, mask.affine), _lesion_file(root))


def _three_valued_cord(root: Path, sct: Path) -> None:
    cord = root / "derivatives/labels/sub-02/anat/sub-02_T2w_seg-manual.nii.gz"
    data = nib.load(cord).get_fdata()
    data[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(data, nib.load(cord).affine), cord)


BAD = {  # name -> (extra arguments, edit of the tree, what the one error line says)
    "no =": (("--label", "cord"), None, "bad --label 'cord': expected NAME=SUFFIX"),
    "empty name": (("--label", "=seg-manual"), None, "bad --label '=seg-manual': expected NAME=SUFFIX"),
    "empty suffix": (("--label", "cord="), None, "bad --label 'cord=': expected NAME=SUFFIX"),
    "duplicate name": (("--label", "cord=seg-manual", "--label", "cord=lesion-manual"), None,
                       "label name 'cord' is given twice"),
    "duplicate suffix": (("--label", "cord=seg-manual", "--label", "lesion=seg-manual"), None,
                         "mask suffix 'seg-manual' is given twice in --label (for cord and lesion)"),
    "not an identifier": (("--label", "cord=seg-manual", "--label", "ms-lesion=lesion-manual"), None,
                          "label name 'ms-lesion' (--label ms-lesion=lesion-manual) is not an identifier"),
    "background": (("--label", "background=seg-manual"), None, "'background' (--label background=seg-manual) is reserved"),
    "suffix with ending": (("--label", "cord=seg-manual.nii.gz"), None, "bad mask suffix 'seg-manual.nii.gz'"),
    "both": (("--label", "cord=seg-manual", "--label-suffix", "seg-manual"), None,
             "give either --label NAME=SUFFIX (repeatable) or --label-suffix SUFFIX, not both"),
    "names not identifiers": (("--label-names", "cord,2lesion"), None, "label name '2lesion' (--label-names) is not an identifier"),
    "names twice": (("--label-names", "cord,cord"), None, "--label-names cord,cord gives a name twice"),
    "names with several labels": ((*CORD_AND_LESION, "--label-names", "cord,lesion"), None,
                                  "--label-names names the values of one multi-valued mask"),
    "names disagree": (("--label", "sc=seg-manual", "--label-names", "cord,lesion"), None,
                       "name value 1 differently (sc vs cord)"),
    "later mask not 0/1": (CORD_AND_LESION, _three_valued_lesion,
                           "sub-01_T2w_lesion-manual.nii.gz holds values 0, 1, 2, but the mask of --label "
                           "lesion=lesion-manual must be 0/1 (it becomes value 2)"),
    "base mask not 0/1": (CORD_AND_LESION, _three_valued_cord,
                          "sub-02_T2w_seg-manual.nii.gz holds values 0, 1, 3, but the mask of --label cord=seg-manual must be 0/1"),
    "later mask on another grid": (CORD_AND_LESION, lambda root, sct: shutil.copyfile(sct / "t2/t2_seg-manual.nii.gz", _lesion_file(root)),
                                   r"sub-01_T2w_lesion-manual.nii.gz has shape (60, 55, 52) but its image"),
    "too few value names": (("--label-names", "cord"), lambda root, sct: _three_valued_cord(root, sct),
                            "sub-02_T2w_seg-manual.nii.gz holds values up to 3 but --label-names names only 1 (cord)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bids_bad_labels_fail_in_one_line(lesion_bids: Path, sct: Path, spineauto_env, capsys, case) -> None:
    args, edit, expected = BAD[case]
    if edit is not None:
        edit(lesion_bids, sct)
    code, out, err = run_cli(capsys, "convert", "bids", lesion_bids, "-d", 34, "--name", "Bad", *args)
    assert code == 1, err
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], err
    if edit is not None:
        assert str(lesion_bids) in errors[0]  # the file is named in full
    assert _names(spineauto_env["raw"]) == []  # nothing half-written, no staging folder


# --------------------------------------------------------------------------------------------- DICOM


def _assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


def test_dicom_mr_series(dicom_dir: Path, tmp_path: Path) -> None:
    mr = dicom_dir / "98892003"
    out = convert_dicom(mr, tmp_path / "raw" / "Dataset020_Dicom")
    assert _names(tmp_path / "raw") == ["Dataset020_Dicom"]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 0 and meta["heads"] == {}
    assert _names(out / "imagesTr") == [] and _names(out / "labelsTr") == []
    cases = meta["cases"]
    # 17 single-slice images: 7 series, of which the T/S/C localizers (3 orientations each) and the
    # radial angiography projections (7 orientations) are split into one stack per orientation
    # cases named after their series (SeriesDescription, filesystem-safe, unique; a split series' stacks numbered)
    names = (["FAST_LOCALIZER", "FAST_LOCALIZER_2", "FAST_LOCALIZER_3"] + [f"T_S_C_RF_FAST_PILOT_stack{k}{r}" for r in ("", "_2") for k in range(3)]
             + ["FAST_LOCALIZER_4"] + [f"ANGIO_Projected_from_C_stack{k}" for k in range(7)])
    assert list(cases) == names
    assert _names(out / "imagesTs") == sorted(f"{n}_0000.nii.gz" for n in names)
    assert len({c["metadata"]["SeriesInstanceUID"] for c in cases.values()}) == 7
    assert {c["metadata"]["Modality"] for c in cases.values()} == {"MR"}
    assert {c["subject"] for c in cases.values()} == {"98890234"}
    assert [c["metadata"]["source"] for c in cases.values()] == ["MR1"] * 3 + ["MR2"] * 7 + ["MR700"] * 7
    assert cases["ANGIO_Projected_from_C_stack6"]["metadata"]["SeriesDescription"] == "ANGIO Projected from   C"

    # every converted stack is one DICOM file, with its geometry and pixels, and every file is used
    files = {f: sitk.ReadImage(str(f)) for f in sorted(mr.glob("MR*/*"))}
    used = set()
    for case, entry in cases.items():
        nifti = sitk.ReadImage(str(out / "imagesTs" / f"{case}_0000.nii.gz"))
        assert nifti.GetSize()[2] == 1
        match = [
            f for f, img in files.items()
            if f.parent.name == entry["metadata"]["source"]
            and np.allclose(img.GetDirection(), nifti.GetDirection(), atol=1e-5)
            and np.allclose(img.GetOrigin(), nifti.GetOrigin(), atol=1e-4)
            and np.array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(nifti))
        ]
        assert len(match) == 1, case
        _assert_same_geometry(nifti, files[match[0]])
        used.add(match[0])
    assert used == set(files)


def test_dicom_multislice_geometry(dicom_dir: Path, tmp_path: Path) -> None:
    series = dicom_dir / "98892001" / "CT5N"
    out = convert_dicom(series, tmp_path / "Dataset021_Ct")
    uid = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(series))[0]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series), uid))
    expected = reader.Execute()
    converted = sitk.ReadImage(str(out / "imagesTs" / "SmartScore_-_Gated_0.5_sec_0000.nii.gz"))
    assert converted.GetSize() == (16, 16, 5) and converted.GetSpacing()[2] == pytest.approx(2.5)
    _assert_same_geometry(converted, expected)
    case = json.loads((out / "dataset.json").read_text())["cases"]["SmartScore_-_Gated_0.5_sec"]
    assert case["metadata"]["SeriesInstanceUID"] == uid and case["metadata"]["num_files"] == 5


def test_read_dicom_series(dicom_dir: Path) -> None:
    import pydicom

    folder = dicom_dir / "98892003" / "MR1"
    series = read_dicom_series(folder)
    uids = sorted(str(pydicom.dcmread(f).SeriesInstanceUID) for f in folder.iterdir())
    assert [stack.series_uid for stack, _ in series] == uids
    assert [stack.name for stack, _ in series] == ["FAST_LOCALIZER", "FAST_LOCALIZER_2", "FAST_LOCALIZER_3"]
    for stack, image in series:
        uid, meta = stack.series_uid, stack.metadata
        assert image.GetDimension() == 3 and image.GetSize() == (16, 16, 1) and len(stack.files) == 1
        assert meta["SeriesInstanceUID"] == uid and meta["Modality"] == "MR" and meta["source"] == "."
        assert meta["SeriesDescription"] == "FAST LOCALIZER" and meta["PatientID"] == "98890234"


def test_dicom_errors(tmp_path: Path) -> None:
    with pytest.raises(SpineautoError, match=str(tmp_path / "nowhere")):
        convert_dicom(tmp_path / "nowhere", tmp_path / "raw" / "Dataset022_D")
    (tmp_path / "notdicom").mkdir()
    (tmp_path / "notdicom" / "scan.txt").write_text("not a DICOM file")
    with pytest.raises(SpineautoError, match=f"no DICOM series found in {tmp_path / 'notdicom'}"):
        convert_dicom(tmp_path / "notdicom", tmp_path / "raw" / "Dataset022_D")
    _assert_nothing_written(tmp_path / "raw", [])


def test_dicom_refuses_to_overwrite(dicom_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "Dataset023_D"
    (target / "imagesTs").mkdir(parents=True)
    (target / "imagesTs" / "keep.nii.gz").write_bytes(b"x")
    with pytest.raises(SpineautoError, match=f"{target} already exists"):
        convert_dicom(dicom_dir / "98892003" / "MR1", target)
    assert _names(tmp_path) == ["Dataset023_D"] and _names(target / "imagesTs") == ["keep.nii.gz"]
