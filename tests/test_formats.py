"""Every image format nnU-Net reads: the readers/writers of io/formats.py on their own, then a PNG
dataset laid out as nnU-Net's Dataset120 (RGB imagesTr/x_0000.png, labelsTr/x.png) and an .nrrd
dataset through plan_and_preprocess, a short training and predict (masks in the input's format)."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from spineauto.errors import SpineautoError
from spineauto.io.images import image_header, read_channels, read_image, read_volume, write_label_map


def _oblique_sitk(shape=(7, 9, 5)) -> sitk.Image:
    """(X, Y, Z) = shape, anisotropic spacing, a rotated direction and an origin away from 0."""
    arr = np.arange(np.prod(shape), dtype=np.int16).reshape(shape[::-1])
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.6, 3.0))
    img.SetOrigin((10.0, -20.5, 33.0))
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, -1.0))
    return img


@pytest.mark.parametrize("ending", [".nrrd", ".mha"])
def test_simpleitk_formats_read_with_the_nifti_geometry_and_masks_keep_it(tmp_path, ending):
    img = _oblique_sitk()
    sitk.WriteImage(img, str(tmp_path / f"x{ending}"))
    sitk.WriteImage(img, str(tmp_path / "x.nii.gz"))  # the same image as NIfTI: nibabel's affine is the reference
    data, affine = read_image(tmp_path / f"x{ending}")
    ref = nib.load(str(tmp_path / "x.nii.gz"))
    assert data.shape == (1, 7, 9, 5) and data.dtype == np.float32
    np.testing.assert_allclose(affine, ref.affine, atol=1e-5)
    np.testing.assert_array_equal(data[0], np.asarray(ref.dataobj))
    shape, header_affine, _ = image_header(tmp_path / f"x{ending}")
    assert shape == (7, 9, 5)
    np.testing.assert_allclose(header_affine, affine, atol=1e-9)

    labels = (data[0] % 3).astype(np.uint8)
    out = write_label_map(tmp_path / f"mask{ending}", labels, tmp_path / f"x{ending}")
    back = sitk.ReadImage(str(out))
    assert back.GetOrigin() == img.GetOrigin() and back.GetSpacing() == img.GetSpacing()
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=1e-12)
    np.testing.assert_array_equal(read_volume(out)[0], labels)


def test_a_2d_simpleitk_image_is_one_slice_and_its_mask_stays_2d(tmp_path):
    img = sitk.GetImageFromArray(np.arange(12, dtype=np.int16).reshape(3, 4))  # 3 rows, 4 columns
    img.SetSpacing((0.5, 0.7))
    img.SetOrigin((3.0, 4.0))
    sitk.WriteImage(img, str(tmp_path / "x.mha"))
    data, affine = read_image(tmp_path / "x.mha")
    shape, header_affine, _ = image_header(tmp_path / "x.mha")
    assert data.shape == (1, 4, 3, 1) and shape == (4, 3, 1) and data[0, 3, 2, 0] == 11
    np.testing.assert_allclose(header_affine, affine)
    np.testing.assert_allclose(np.diag(affine)[:2], [-0.5, -0.7])  # LPS -> RAS
    mask = sitk.ReadImage(str(write_label_map(tmp_path / "m.mha", (data[0] > 5).astype(np.uint8), tmp_path / "x.mha")))
    assert mask.GetDimension() == 2 and mask.GetSpacing() == (0.5, 0.7) and mask.GetOrigin() == (3.0, 4.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(img) > 5)


def test_rgb_png_is_three_channels_with_the_declared_spacing_and_a_png_mask_round_trips(tmp_path):
    from skimage import io

    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[0, 1] = (10, 20, 30)  # top row, second column
    io.imsave(tmp_path / "x_0000.png", rgb, check_contrast=False)
    data, affine = read_channels([tmp_path / "x_0000.png"], pixel_spacing=(0.5, 0.25))
    assert data.shape == (3, 6, 4, 1)  # X = columns, Y = rows bottom-up
    assert data[:, 1, 3, 0].tolist() == [10.0, 20.0, 30.0]
    np.testing.assert_allclose(np.diag(affine), [0.25, 0.5, 0.5, 1.0])
    shape, header_affine, _ = image_header(tmp_path / "x_0000.png", (0.5, 0.25))
    assert shape[:3] == (6, 4, 1)
    np.testing.assert_allclose(header_affine, affine)

    labels = np.zeros((6, 4, 1), np.uint8)
    labels[1, 3, 0] = 2
    out = write_label_map(tmp_path / "x.png", labels, tmp_path / "x_0000.png")
    mask = io.imread(out)
    assert mask.shape == (4, 6) and mask[0, 1] == 2 and mask.sum() == 2  # the same pixel as the image's
    np.testing.assert_array_equal(read_volume(out)[0], labels)
    with pytest.raises(SpineautoError, match="3 channels .* where one is expected"):
        read_volume(tmp_path / "x_0000.png")


def test_3d_tif_reads_its_spacing_file_as_nnunet_and_refuses_without_it(tmp_path):
    import tifffile

    vol = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4)  # (Z, Y, X)
    tifffile.imwrite(tmp_path / "c_0000.tif", vol, photometric="minisblack")  # a stack of 2 slices, not an RGBA picture
    with pytest.raises(SpineautoError, match=r"c_0000.tif: a 3D .tif needs its spacing in c.json"):
        read_image(tmp_path / "c_0000.tif")
    (tmp_path / "c.json").write_text(json.dumps({"spacing": [3.0, 0.5, 0.25]}))
    data, affine = read_image(tmp_path / "c_0000.tif")
    assert data.shape == (1, 4, 3, 2) and data[0, 3, 2, 1] == vol[1, 2, 3]
    np.testing.assert_allclose(np.diag(affine), [0.25, 0.5, 3.0, 1.0])
    (tmp_path / "out").mkdir()
    out = write_label_map(tmp_path / "out" / "c.tif", (data[0] > 10).astype(np.uint8), tmp_path / "c_0000.tif")
    assert json.loads((tmp_path / "out" / "c.json").read_text())["spacing"] == [3.0, 0.5, 0.25]
    np.testing.assert_array_equal(read_volume(out)[0], data[0] > 10)
    # cases whose names end in four digits: each mask keeps its own spacing file (not one shared "scan.json")
    for case, spacing in (("scan_0012", [3.0, 0.5, 0.25]), ("scan_0013", [2.0, 1.0, 1.0])):
        tifffile.imwrite(tmp_path / f"{case}_0000.tif", vol, photometric="minisblack")
        (tmp_path / f"{case}.json").write_text(json.dumps({"spacing": spacing}))
        write_label_map(tmp_path / "out" / f"{case}.tif", (data[0] > 10).astype(np.uint8), tmp_path / f"{case}_0000.tif")
    assert not (tmp_path / "out" / "scan.json").exists()
    np.testing.assert_allclose(np.diag(read_volume(tmp_path / "out" / "scan_0012.tif")[1])[:3], [0.25, 0.5, 3.0])
    np.testing.assert_allclose(np.diag(read_volume(tmp_path / "out" / "scan_0013.tif")[1])[:3], [1.0, 1.0, 2.0])


def test_unknown_ending_is_refused_in_one_line(tmp_path):
    from spineauto.io.formats import read_file

    (tmp_path / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(SpineautoError, match=r"x.jpg: not an image format spineauto reads"):
        read_file(tmp_path / "x.jpg")


# -- whole datasets ----------------------------------------------------------------------------------


def write_png_dataset(folder: Path, n_train: int = 8, n_test: int = 2, seed: int = 0, size=(40, 56)) -> None:
    """nnU-Net's Dataset120 layout: RGB imagesTr/<case>_0000.png, labelsTr/<case>.png (0/1), imagesTs/."""
    from skimage import io

    rng = np.random.default_rng(seed)
    for d in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / d).mkdir(parents=True, exist_ok=True)
    h, w = size
    for i in range(n_train + n_test):
        mask = np.zeros((h, w), np.uint8)
        r0, c0 = rng.integers(4, h // 2), rng.integers(4, w // 2)
        mask[r0:r0 + 14, c0:c0 + 18] = 1
        img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
        img[mask == 1] += np.array([150, 90, 40], np.uint8)
        split = "Tr" if i < n_train else "Ts"
        io.imsave(folder / f"images{split}" / f"img-{i}_0000.png", img, check_contrast=False)
        io.imsave(folder / f"labels{split}" / f"img-{i}.png", mask, check_contrast=False)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "road": 1},
        "numTraining": n_train, "file_ending": ".png", "pixel_spacing": 0.5}))


def _train_and_predict(env: dict[str, Path], dataset: str, tmp_path: Path, fold="0", validate=True) -> tuple[Path, Path]:
    from spineauto.inference.model import load_model
    from spineauto.inference.predict import predict_folder
    from spineauto.plan_and_preprocess import plan_and_preprocess
    from spineauto.training.trainer import TrainOptions, train_fold
    from test_training import tiny_plan

    torch.set_num_threads(1)
    plan_and_preprocess(int(dataset[7:10]), workers=1)
    tiny_plan(env["preprocessed"] / dataset / "plans.json")
    trained = train_fold(int(dataset[7:10]), "2d", fold, TrainOptions(epochs=3, iters_per_epoch=8, val_iters=1, num_workers=0,
                                                                 validate=validate, wandb="disabled"))
    model = load_model(trained.parent, folds=[fold])
    out = tmp_path / "pred"
    predict_folder(model, env["raw"] / dataset / "imagesTs", out, tta=False, save_probabilities=True)
    return trained, out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_an_nnunet_png_dataset_trains_and_predicts_png_masks(tmp_path, spineauto_env):
    from skimage import io

    env = spineauto_env
    raw = env["raw"] / "Dataset120_Road"
    write_png_dataset(raw)
    fold, out = _train_and_predict(env, "Dataset120_Road", tmp_path)
    props = json.loads(next((env["preprocessed"] / "Dataset120_Road" / "2d").glob("img-0.json")).read_text())
    assert props["geometry"]["shape"] == [56, 40, 1]  # one slice: X = columns, Y = rows
    np.testing.assert_allclose(np.diag(props["geometry"]["affine"])[:2], [0.5, 0.5])  # the declared pixel spacing
    assert json.loads((fold / "validation" / "summary.json").read_text())["reference"] == "raw labels"
    for case in ("img-8", "img-9"):
        mask = io.imread(out / f"{case}.png")
        truth = io.imread(raw / "labelsTs" / f"{case}.png")
        assert mask.shape == truth.shape == (40, 56)
        assert _dice(mask == 1, truth == 1) > 0.7, case  # a bright rectangle: wrong orientation or channels would miss it
    from spineauto.evaluation.evaluate import evaluate_folders

    summary = evaluate_folders(out, raw / "labelsTs")  # `spineauto evaluate` reads the PNG masks too
    assert set(summary["metric_per_case"]) == {"img-8", "img-9"} and summary["mean"]["label_1"]["dice"] > 0.7
    from spineauto.inference.ensemble import ensemble_folders

    ensembled = ensemble_folders([out], tmp_path / "ens")  # the probabilities carry the picture's grid: a NIfTI mask of it
    np.testing.assert_array_equal(read_volume(ensembled[0])[0], read_volume(out / "img-8.png")[0])


def test_an_nrrd_dataset_trains_and_predicts_nrrd_masks_in_the_input_grid(tmp_path, spineauto_env):
    from spineauto.datasets.phantoms import write_phantom_dataset

    env = spineauto_env
    nifti = tmp_path / "nifti"
    write_phantom_dataset(nifti, n_train=6, n_test=2, seed=3, views=("axial",), lesions=False)
    raw = env["raw"] / "Dataset002_Nrrd"
    for p in sorted(nifti.rglob("*.nii.gz")):
        target = raw / p.relative_to(nifti).with_name(p.name[: -len(".nii.gz")] + ".nrrd")
        target.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.ReadImage(str(p)), str(target), True)
    info = json.loads((nifti / "dataset.json").read_text())
    (raw / "dataset.json").write_text(json.dumps({**info, "file_ending": ".nrrd"}))
    _, out = _train_and_predict(env, "Dataset002_Nrrd", tmp_path, fold="all", validate=False)  # 3 subjects: too few for 5 folds
    written = sorted(p.name for p in out.iterdir() if not p.name.endswith((".csv", ".npz")))
    tests = sorted(p.name.replace("_0000", "") for p in (raw / "imagesTs").iterdir())
    assert written == tests and all(n.endswith(".nrrd") for n in written)
    for name in written:
        image = sitk.ReadImage(str(raw / "imagesTs" / name.replace(".nrrd", "_0000.nrrd")))
        mask = sitk.ReadImage(str(out / name))
        assert mask.GetSize() == image.GetSize() and mask.GetOrigin() == image.GetOrigin()
        assert mask.GetSpacing() == image.GetSpacing()
        np.testing.assert_allclose(mask.GetDirection(), image.GetDirection(), atol=1e-12)  # NRRD's text keeps ~17 digits
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTs" / name))) == 1
        assert _dice(sitk.GetArrayFromImage(mask) == 1, truth) > 0.5, name


def test_rgb_pictures_in_a_one_channel_dataset_and_a_mask_in_another_grid_are_named(tmp_path):
    from skimage import io

    from spineauto.datasets.dataset_json import load_dataset_json
    from spineauto.datasets.integrity import check_layout, load_training_case

    write_png_dataset(tmp_path / "D", n_train=2, n_test=0)
    info = json.loads((tmp_path / "D" / "dataset.json").read_text())
    (tmp_path / "D" / "dataset.json").write_text(json.dumps({**info, "channel_names": {"0": "photo"}}))
    io.imsave(tmp_path / "D" / "labelsTr" / "img-1.png", np.zeros((10, 10), np.uint8), check_contrast=False)
    ds = load_dataset_json(tmp_path / "D")
    assert check_layout(ds) == []
    problems = load_training_case(ds, "img-0")[-1]
    assert problems == [f"{tmp_path}/D/imagesTr/img-0_0000.png: case img-0 has 3 channel(s) in its image file(s), "
                        "dataset.json declares 1 in channel_names"]
    from spineauto.datasets.integrity import check_case

    data, affine, seg, seg_affine, _ = load_training_case(ds, "img-1")
    assert check_case(ds, "img-1", data, affine, seg, seg_affine) == [
        f"{tmp_path}/D/labelsTr/img-1.png: label grid does not match image: shape (56, 40, 1) vs (10, 10, 1)"]


def test_a_bad_pixel_spacing_is_refused_in_one_line(tmp_path):
    from spineauto.datasets.dataset_json import load_dataset_json

    write_png_dataset(tmp_path / "D", n_train=1, n_test=0)
    info = json.loads((tmp_path / "D" / "dataset.json").read_text())
    (tmp_path / "D" / "dataset.json").write_text(json.dumps({**info, "pixel_spacing": 0}))
    with pytest.raises(SpineautoError, match=r"dataset.json: 'pixel_spacing' must be a number of mm > 0 or \[row, column\] mm, not 0"):
        load_dataset_json(tmp_path / "D")


def test_a_png_roi_mask_is_found_and_read_in_its_pictures_grid(tmp_path):
    from skimage import io

    from spineauto.inference.roi import read_roi, roi_file

    io.imsave(tmp_path / "x_0000.png", np.zeros((6, 8), np.uint8), check_contrast=False)
    (tmp_path / "rois").mkdir()
    roi = np.zeros((6, 8), np.uint8)
    roi[1, 2] = 1
    io.imsave(tmp_path / "rois" / "x.png", roi, check_contrast=False)
    data, affine = read_channels([tmp_path / "x_0000.png"], pixel_spacing=(0.5, 0.5))
    found = roi_file(tmp_path / "rois", "x")
    assert found.name == "x.png"
    mask = read_roi(found, data.shape[1:], affine, "x_0000.png", pixel_spacing=(0.5, 0.5))
    assert mask.shape == (8, 6, 1) and mask.sum() == 1 and mask[2, 4, 0]  # row 1 of 6 from the top: Y = 4
    with pytest.raises(SpineautoError, match=r"rois/x.png: ROI mask grid differs from the image x_0000.png \(spacing"):
        read_roi(found, data.shape[1:], affine, "x_0000.png")  # without the dataset's pixel spacing: 1 mm pixels


def test_a_missing_nifti_channel_file_is_named_but_one_rgb_picture_holds_three_channels(tmp_path):
    from skimage import io

    from spineauto.datasets.dataset_json import load_dataset_json
    from spineauto.datasets.integrity import check_layout

    nii = tmp_path / "N"
    (nii / "imagesTr").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), str(nii / "imagesTr" / "a_0000.nii.gz"))
    (nii / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"}, "file_ending": ".nii.gz", "labels": {}}))
    assert check_layout(load_dataset_json(nii)) == [f"{nii}/imagesTr/a_0001.nii.gz: missing channel file for case a"]
    png = tmp_path / "P"
    (png / "imagesTr").mkdir(parents=True)
    io.imsave(png / "imagesTr" / "a_0000.png", np.zeros((4, 4, 3), np.uint8), check_contrast=False)
    (png / "dataset.json").write_text(json.dumps({"channel_names": {"0": "R", "1": "G", "2": "B"}, "file_ending": ".png", "labels": {}}))
    info = load_dataset_json(png)
    assert check_layout(info) == [] and info.image_files("a") == [png / "imagesTr" / "a_0000.png"]
