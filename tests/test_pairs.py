"""`spineauto convert pairs`: a plain folder of images and a folder of masks -> a raw dataset."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import run_cli
from skimage import io

from spineauto.datasets.pairs import convert_pairs, parse_labels
from spineauto.errors import SpineautoError


def _pictures(tmp_path: Path) -> tuple[Path, Path]:
    images, masks = tmp_path / "photos", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for stem in ("lesion 01", "lesion-02", "no mask"):
        io.imsave(images / f"{stem}.png", rng.integers(0, 255, (12, 16, 3)).astype(np.uint8), check_contrast=False)
    for stem, value in (("lesion 01", 1), ("lesion-02", 2)):
        m = np.zeros((12, 16), np.uint8)
        m[2:5, 3:9] = value
        io.imsave(masks / f"{stem}_mask.png", m, check_contrast=False)
    return images, masks


def test_png_pairs_convert_by_stem_with_a_report_and_the_dataset_reads_back(tmp_path, capsys, monkeypatch):
    from spineauto.datasets.dataset_json import load_dataset_json
    from spineauto.datasets.integrity import check_layout, load_training_case

    images, masks = _pictures(tmp_path)
    monkeypatch.setenv("SPINEAUTO_RAW", str(tmp_path / "raw"))
    code, _, err = run_cli(capsys, "convert", "pairs", str(images), str(masks), "-d", "7", "--name", "Skin",
                             "--mask-suffix", "_mask", "--label", "nevus=1", "--label", "melanoma=2", "--spacing", "0.1")
    assert code == 0, err
    flat = " ".join(err.split())  # the console writes to stderr
    assert "2 image/mask pair(s)" in flat and "1 image(s) without a mask (imagesTs): no mask.png" in flat
    ds = tmp_path / "raw" / "Dataset007_Skin"
    assert sorted(p.name for p in (ds / "imagesTr").iterdir()) == ["lesion-02_0000.png", "lesion_01_0000.png"]
    assert sorted(p.name for p in (ds / "imagesTs").iterdir()) == ["no_mask_0000.png"]
    raw = json.loads((ds / "dataset.json").read_text())
    assert raw["labels"] == {"background": 0, "nevus": 1, "melanoma": 2} and raw["file_ending"] == ".png"
    assert raw["channel_names"] == {"0": "R", "1": "G", "2": "B"} and raw["pixel_spacing"] == 0.1
    info = load_dataset_json(ds)
    assert check_layout(info) == []
    data, affine, seg, _, problems = load_training_case(info, "lesion-02")
    assert problems == [] and data.shape == (3, 16, 12, 1) and np.unique(seg).tolist() == [0, 2]
    np.testing.assert_allclose(np.diag(affine)[:2], [0.1, 0.1])
    np.testing.assert_array_equal(io.imread(ds / "labelsTr" / "lesion-02.png"), io.imread(masks / "lesion-02_mask.png"))


def test_nifti_images_with_nrrd_masks_get_nifti_labels_in_the_image_grid(tmp_path):
    images, masks = tmp_path / "img", tmp_path / "seg"
    images.mkdir()
    masks.mkdir()
    affine = np.array([[0, 0, 2.0, -10], [-0.5, 0, 0, 20], [0, 0.5, 0, 5], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.ones((6, 5, 4), np.float32), affine), str(images / "sub1.nii.gz"))
    cube = np.zeros((6, 5, 4), np.uint8)
    cube[1:3, 1:3, 1:3] = 1
    nib.save(nib.Nifti1Image(cube, affine), str(tmp_path / "m.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "m.nii.gz")), str(masks / "sub1.nrrd"))
    report = convert_pairs(images, masks, tmp_path / "Dataset003_X")
    label = nib.load(str(tmp_path / "Dataset003_X" / "labelsTr" / "sub1.nii.gz"))
    np.testing.assert_allclose(label.affine, affine, atol=1e-6)
    assert int(np.asarray(label.dataobj).sum()) == 8 and report.labels == {"background": 0, "foreground": 1}


def _one_pair(tmp_path: Path, mask_shape=(12, 16), value=1) -> tuple[Path, Path]:
    images, masks = tmp_path / "i", tmp_path / "m"
    images.mkdir()
    masks.mkdir()
    io.imsave(images / "a.png", np.zeros((12, 16), np.uint8), check_contrast=False)
    io.imsave(masks / "a.png", np.full(mask_shape, value, np.uint8), check_contrast=False)
    return images, masks


def test_bad_pairs_are_refused_in_one_line_and_write_nothing(tmp_path):
    images, masks = _one_pair(tmp_path)
    io.imsave(masks / "b_seg.png", np.zeros((12, 16), np.uint8), check_contrast=False)
    with pytest.raises(SpineautoError, match=r"/m: 1 mask\(s\) match no image by name .*--mask-suffix.*: b_seg.png; rename or remove"):
        convert_pairs(images, masks, tmp_path / "D1")
    (masks / "b_seg.png").unlink()

    with pytest.raises(SpineautoError, match=r"m/a.png: label values \[1\] not given by --label \(cord=2\)"):
        convert_pairs(images, masks, tmp_path / "D2", labels=parse_labels(["cord=2"]))
    with pytest.raises(SpineautoError, match=r"--label 'cord': expected NAME=VALUE"):
        parse_labels(["cord"])
    io.imsave(masks / "a.png", np.full((12, 16), 300, np.uint16), check_contrast=False)  # would wrap to 44 in a uint8 label map
    with pytest.raises(SpineautoError, match=r"m/a.png: mask has non-integer, negative or > 255 values"):
        convert_pairs(images, masks, tmp_path / "D3")
    assert not any((tmp_path / d).exists() for d in ("D1", "D2", "D3"))


def test_a_mask_in_another_grid_is_refused_naming_both_files(tmp_path):
    images, masks = _one_pair(tmp_path, mask_shape=(12, 15))
    with pytest.raises(SpineautoError, match=r"m/a.png: mask grid does not match its image a.png: shape \(16, 12, 1\) vs \(15, 12, 1\)"):
        convert_pairs(images, masks, tmp_path / "D")
    assert not (tmp_path / "D").exists()
