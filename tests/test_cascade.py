"""The cord -> lesion cascade (configuration ``2d_cord_roi``): planning, crops around the cord with
margin and seeded jitter, the restore path back to the full grid, removal of lesions far from the
cord, and ``spineauto predict --roi`` end to end with its bad inputs."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import run_cli
from test_inference import _one_line_error, env, planned  # noqa: F401 - the phantom dataset fixtures
from test_inference_support import OracleNet, make_model_folder

DATASET = "Dataset001_Ph"

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def plans(planned):
    """The plans of test_inference's phantom dataset (phantoms have lesions: cord=1, lesion=2)."""
    from spineauto.planning.plans import Plans

    return Plans.load(planned[0]["preprocessed"] / DATASET / "plans.json")


def test_cord_roi_is_planned_with_a_cord_and_a_lesion_label_only(planned, plans, tmp_path):
    from spineauto.datasets.dataset_json import load_dataset_json
    from spineauto.datasets.phantoms import write_phantom_dataset
    from spineauto.planning.fingerprint import fingerprint_dataset
    from spineauto.planning.planner import plan_dataset

    cfg, whole = plans.configuration("2d_cord_roi"), plans.configuration("2d")
    assert cfg.task == "segmentation" and cfg.data_identifier == "2d_cord_roi" and cfg.roi.label == "cord"
    assert whole.roi is None
    assert cfg.roi.jitter_mm < cfg.roi.margin_mm  # the reference cord always stays inside its jittered box
    assert np.prod(cfg.patch_size) < np.prod(whole.patch_size)
    assert "cord" in cfg.reasons["patch_size"] and cfg.reasons["roi"]
    assert (planned[0]["preprocessed"] / DATASET / "2d_cord_roi").is_dir()
    raw = write_phantom_dataset(tmp_path / "Dataset002_NoLes", n_train=2, n_test=0, seed=2, lesions=False)
    assert "2d_cord_roi" not in plan_dataset(fingerprint_dataset(load_dataset_json(raw), workers=1)).configurations


def test_plans_without_roi_still_load_and_a_bad_roi_label_is_refused(plans):
    from spineauto.errors import SpineautoError
    from spineauto.planning.plans import Plans

    d = plans.to_dict()
    for cfg in d["configurations"].values():
        if cfg["roi"] is None:
            del cfg["roi"]  # plans written before the field existed
    assert Plans.from_dict(d).configurations["2d"].roi is None
    d["configurations"]["2d_cord_roi"]["roi"]["label"] = "spine"
    with pytest.raises(SpineautoError, match="roi.label: 'spine' is not a foreground label"):
        Plans.from_dict(d)


def _volume():
    """Labels 0/1/2 in an axial LAS grid (0.8 x 0.8 x 3 mm), a cord-like box, and the image = labels + 1."""
    labels = np.zeros((40, 48, 14), np.int16)
    labels[15:22, 20:27, 3:11] = 1
    labels[17:19, 22:24, 5:7] = 2
    labels[30:33, 5:8, 1:3] = 2  # a "lesion" outside the cord, in the margin's reach or not
    affine = np.diag([-0.8, 0.8, 3.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    return labels, affine


def _roi_plan(plans, margin: float, jitter: float = 0.0):
    cfg = copy.deepcopy(plans.configuration("2d_cord_roi"))
    cfg.normalization, cfg.use_mask_for_norm = ["NoNormalization"], [False]
    cfg.target_spacing = [0.8, 0.8]  # no resampling: the restore is exact
    cfg.roi.margin_mm, cfg.roi.jitter_mm = margin, jitter
    return cfg


def test_roi_crop_is_the_box_plus_margin_and_restores_to_the_input_grid(plans):
    from spineauto.inference.restore import restore_labels
    from spineauto.preprocessing.preprocess import preprocess_array

    labels, affine = _volume()
    cfg = _roi_plan(plans, margin=4.0)
    data, _, props = preprocess_array((labels + 1)[None].astype(np.float32), affine, cfg, plans.intensity, roi=labels == 1)
    # margin 4 mm: ceil(4 / 0.8) = 5 voxels in-plane, ceil(4 / 3) = 2 slices, clipped to the image
    box = np.zeros(labels.shape, bool)
    box[10:27, 15:32, 1:13] = True
    assert data.shape[1:] == (12, 17, 17)
    onehot = torch.from_numpy(np.stack([(data[0] - 1) == v for v in range(3)]).astype(np.float32))
    restored = restore_labels(onehot, props)  # an oracle's prediction, put back in the full grid
    np.testing.assert_array_equal(restored, np.where(box, labels, 0))


@pytest.mark.parametrize("slice_axis", [0, 2])
def test_preprocessing_normalises_its_own_copy_never_the_callers_array(plans, slice_axis):
    """Slices along the first axis in RAS order: the layout is the input itself (no copy), so the
    normalised array must be a copy; along the last axis the layout is already a reoriented copy,
    normalised in place. Either way the caller's array is left as it was."""
    from spineauto.preprocessing.preprocess import preprocess_array

    cfg = copy.deepcopy(plans.configuration("2d"))
    cfg.normalization, cfg.use_mask_for_norm = ["ZScoreNormalization"], [False]
    cfg.target_spacing = [0.8, 0.8]
    spacing = [0.8, 0.8, 0.8]
    spacing[slice_axis] = 3.0
    image = np.random.default_rng(0).normal(100.0, 10.0, size=(1, 12, 16, 20)).astype(np.float32)
    before = image.copy()
    data, _, props = preprocess_array(image, np.diag([*spacing, 1.0]), cfg, plans.intensity)
    np.testing.assert_array_equal(image, before)
    assert data.shape[1] == image.shape[1 + slice_axis] and abs(float(data.mean())) < 0.05 and abs(float(data.std()) - 1) < 0.05


def test_roi_errors_name_the_case(plans):
    from spineauto.errors import SpineautoError
    from spineauto.preprocessing.preprocess import preprocess_array

    labels, affine = _volume()
    cfg = _roi_plan(plans, margin=4.0)
    image = labels[None].astype(np.float32) + 1
    with pytest.raises(SpineautoError, match="no cord found: caseA"):
        preprocess_array(image, affine, cfg, plans.intensity, roi=np.zeros(labels.shape, bool), name="caseA")
    with pytest.raises(SpineautoError, match="no cord found: caseB"):
        preprocess_array(image, affine, cfg, plans.intensity, name="caseB")


def test_box_jitter_is_seeded_and_keeps_the_cord_inside(planned, plans):
    from spineauto.inference.restore import restore_label_map
    from spineauto.preprocessing.preprocess import preprocess_array

    labels, affine = _volume()
    cfg = _roi_plan(plans, margin=4.0, jitter=2.0)
    image = labels[None].astype(np.float32) + 1
    boxes = []
    for seed in (1, 1, 2, 3, 4, 5):
        _, _, props = preprocess_array(image, affine, cfg, plans.intensity, roi=labels == 1, jitter_seed=seed)
        boxes.append(props["geometry"]["bbox"])
    assert boxes[0] == boxes[1] and len({str(b) for b in boxes}) > 2
    _, _, plain = preprocess_array(image, affine, cfg, plans.intensity, roi=labels == 1)
    assert plain["geometry"]["bbox"] not in boxes[2:]
    # the stored training crops (reference cord, jittered box) hold every cord voxel of the raw labels
    env = planned[0]
    folder = env["preprocessed"] / DATASET / "2d_cord_roi"
    raw = env["raw"] / DATASET / "labelsTr"
    for f in sorted(raw.glob("*.nii.gz")):
        case = f.name[: -len(".nii.gz")]
        props = json.loads((folder / f"{case}.json").read_text())
        restored = restore_label_map(np.load(folder / f"{case}_seg.npy"), props)
        truth = np.asarray(nib.load(str(f)).dataobj)
        assert (restored > 0).sum() >= 0.9 * (truth > 0).sum(), case


def test_restrict_to_roi_removes_a_far_blob_and_keeps_a_near_one():
    from spineauto.inference.roi import restrict_to_roi

    affine = np.diag([0.5, 0.5, 4.0, 1.0])
    roi = np.zeros((60, 60, 10), bool)
    roi[20:30, 20:30, 3:7] = True
    labels = np.zeros(roi.shape, np.uint8)
    labels[31:33, 24:26, 4] = 2  # 0.5-1.5 mm beyond the roi edge
    labels[50:53, 50:53, 5] = 2  # ~10 mm away
    labels[25, 25, 9] = 2  # 2 slices past the roi = 8 mm across slices
    labels[22:24, 22:24, 4] = 1  # inside
    out = restrict_to_roi(labels, roi, affine, distance_mm=3.0)
    assert out[31:33, 24:26, 4].all() and out[22:24, 22:24, 4].all()
    assert not out[50:53, 50:53, 5].any() and out[25, 25, 9] == 0
    assert not restrict_to_roi(labels, roi, affine, 0.0)[31:33].any()
    assert not restrict_to_roi(labels, np.zeros_like(roi), affine, 3.0).any()


def _cord_roi_model(env, results: Path, **kw) -> Path:
    return make_model_folder(env["preprocessed"] / DATASET, results, configuration="2d_cord_roi", **kw)


def test_predict_with_roi_writes_masks_in_the_input_geometry(env, plans, capsys, tmp_path):
    _cord_roi_model(env, env["results"])
    images = env["raw"] / DATASET / "imagesTs"
    cords = env["raw"] / DATASET / "labelsTs"  # the reference as the "cord prediction": value > 0 counts
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-c", "2d_cord_roi", "--roi", cords, "-i", images,
                           "-o", tmp_path / "out", "--no-tta", "--device", "cpu")
    assert code == 0, err
    for img in sorted(images.glob("*_0000.nii.gz")):
        case = img.name[: -len("_0000.nii.gz")]
        a, b = nib.load(str(img)), nib.load(str(tmp_path / "out" / f"{case}.nii.gz"))
        assert b.shape == a.shape and np.array_equal(b.affine, a.affine)
        out = np.asarray(b.dataobj)
        cord = np.asarray(nib.load(str(cords / f"{case}.nii.gz")).dataobj) > 0
        dist = ndimage.distance_transform_edt(~cord, sampling=np.sqrt((a.affine[:3, :3] ** 2).sum(0)))
        assert not out[dist > plans.configuration("2d_cord_roi").roi.remove_outside_mm].any()  # nothing left far from the cord


def test_oracle_through_predict_roi_gives_back_the_labels_near_the_cord(env, capsys, tmp_path, monkeypatch):
    from spineauto.inference import model as model_mod

    results = tmp_path / "results"
    _cord_roi_model(env, results, normalization="NoNormalization")
    monkeypatch.setenv("SPINEAUTO_RESULTS", str(results))
    monkeypatch.setattr(model_mod, "load_checkpoint_network", lambda path, plan, c, k, device: OracleNet(k))
    inp, rois = tmp_path / "in", tmp_path / "roi"
    inp.mkdir()
    rois.mkdir()
    for f in sorted((env["raw"] / DATASET / "labelsTs").glob("*.nii.gz")):
        img = nib.load(str(f))
        ref = np.asarray(img.dataobj)
        nib.save(nib.Nifti1Image(ref.astype(np.float32), img.affine, img.header), str(inp / f.name))
        shutil.copy(f, rois / f.name)
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-c", "2d_cord_roi", "--roi", rois, "-i", inp, "-o", tmp_path / "out",
                           "--device", "cpu")
    assert code == 0, err
    for f in sorted(inp.glob("*.nii.gz")):
        ref = np.asarray(nib.load(str(rois / f.name)).dataobj)
        out = np.asarray(nib.load(str(tmp_path / "out" / f.name)).dataobj)
        interior = ndimage.binary_erosion(ref == 1, iterations=2) | ~ndimage.binary_dilation(ref > 0, iterations=2)
        np.testing.assert_array_equal(out[interior], ref[interior])


def test_predict_roi_bad_inputs(env, capsys, tmp_path):
    _cord_roi_model(env, env["results"])
    images = env["raw"] / DATASET / "imagesTs"
    cords = env["raw"] / DATASET / "labelsTs"
    base = ["predict", "-d", "1", "-c", "2d_cord_roi", "-i", images, "-o", tmp_path / "out", "--no-tta", "--device", "cpu"]
    code, _, err = run_cli(capsys, *base)
    _one_line_error(code, err, "2d_cord_roi", "--roi")
    partial = tmp_path / "partial"
    shutil.copytree(cords, partial)
    missing = sorted(partial.glob("*.nii.gz"))[0]
    missing.unlink()
    code, _, err = run_cli(capsys, *base, "--roi", partial)
    _one_line_error(code, err, missing.name, "no ROI mask")
    shifted = tmp_path / "shifted"
    shutil.copytree(cords, shifted)
    bad = sorted(shifted.glob("*.nii.gz"))[0]
    img = nib.load(str(bad))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-1], img.affine), str(bad))
    code, _, err = run_cli(capsys, *base, "--roi", shifted)
    _one_line_error(code, err, bad.name, "grid differs")
    code, _, err = run_cli(capsys, *base, "--roi", tmp_path / "nowhere")
    _one_line_error(code, err, "nowhere", "not found")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.nii.gz"))
