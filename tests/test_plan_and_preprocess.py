"""plan_and_preprocess on real spinal-cord MRI and on broken datasets."""
from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from conftest import REAL_PAIRS, layout_real_dataset, run_cli
from spineauto.plan_and_preprocess import plan_and_preprocess
from spineauto.planning.plans import Plans
from spineauto.inference.restore import restore_label_map


@pytest.fixture
def real_planned(spineauto_env):
    layout_real_dataset(spineauto_env["raw"])
    return plan_and_preprocess(1, workers=2)


def test_real_data_is_sliced_in_each_acquisition_plane(real_planned):
    fp = real_planned.fingerprint
    planes = {c.case: c.plane for c in fp.cases}
    # t2 is a near-isotropic block (1 mm, 52-60 voxels a side): it takes the dataset's isotropic plane,
    # the majority of the cases with a clear through-plane axis (3 axial MT/T2* vs 2 sagittal slabs)
    assert fp.isotropic_plane == "axial" and real_planned.plans.configurations["2d"].isotropic_plane == "axial"
    expected = {case: view for case, (_, _, view, _) in REAL_PAIRS.items()}
    expected["t2"] = "axial"
    assert planes == expected
    t2s = next(c for c in real_planned.fingerprint.cases if c.case == "t2s")
    assert t2s.orientation == "LAS" and t2s.layout_spacing[0] == pytest.approx(7.5, rel=1e-3)
    # every stored slice is an in-plane acquisition slice: slices of axial scans keep their count
    data = np.load(real_planned.folder / "2d" / "t2s.npy", mmap_mode="r")
    assert data.shape[1] == 9
    mt = np.load(real_planned.folder / "2d" / "mt1.npy", mmap_mode="r")
    assert mt.shape[1] == 5


def test_slicing_does_not_depend_on_the_storage_order(real_data):
    from spineauto.io.geometry import choose_slice_axis

    for f in ("t2/t2.nii.gz", "t2s/t2s.nii.gz", "t1/t1w.nii.gz"):
        img = nib.load(str(real_data / f))
        axes = [choose_slice_axis(img.affine, img.shape, "sagittal")[0]]
        for perm in ((1, 2, 0), (2, 0, 1)):
            affine = img.affine.copy()
            affine[:, :3] = img.affine[:, list(perm)]
            axes.append(choose_slice_axis(affine, tuple(img.shape[p] for p in perm), "sagittal")[0])
        assert len(set(axes)) == 1, (f, axes)


def test_real_plan_values_come_from_the_fingerprint(real_planned):
    plans = real_planned.plans
    assert set(plans.configurations) == {"2d", "cls", "multitask"}
    cfg = plans.configurations["2d"]
    in_plane = sorted(s for c in real_planned.fingerprint.cases for s in c.layout_spacing[1:])
    assert cfg.target_spacing[0] == pytest.approx(float(np.median(in_plane)))
    assert all(p % 2 ** (cfg.network.n_stages - 1) == 0 for p in cfg.patch_size)
    assert 2 <= cfg.batch_size <= 64
    for key in ("slicing", "target_spacing", "patch_size", "batch_size", "network"):
        assert cfg.reasons[key]
    assert plans.configurations["cls"].heads[0].classes == ["axial", "sagittal"]
    # 3 axial, 3 sagittal cases: balanced weights
    assert plans.configurations["cls"].heads[0].class_weights == [1.0, 1.0]


def test_preprocessed_cases_are_normalised_and_restore_to_the_input_grid(real_planned):
    folder = real_planned.folder / "2d"
    for case, (img, seg_file, _, _) in REAL_PAIRS.items():
        data = np.load(folder / f"{case}.npy")
        seg = np.load(folder / f"{case}_seg.npy")
        props = json.loads((folder / f"{case}.json").read_text())
        assert data.dtype == np.float32 and seg.dtype == np.int8
        assert data.shape[1:] == seg.shape[1:] == tuple(props["shape"])
        assert abs(float(data.mean())) < 0.2 and 0.8 < float(data.std()) < 1.2
        assert set(np.unique(seg).tolist()) == {0, 1}
        # one-hot of the stored mask, restored, must overlay the original mask
        restored = restore_label_map(seg, props)
        original = nib.load(str(layout_dir(real_planned) / "labelsTr" / f"{case}.nii.gz"))
        truth = np.asanyarray(original.dataobj) > 0
        assert restored.shape == truth.shape
        dice = 2 * (restored.astype(bool) & truth).sum() / (restored.astype(bool).sum() + truth.sum())
        assert dice > 0.85, (case, dice)


def layout_dir(result):
    import os

    return __import__("pathlib").Path(os.environ["SPINEAUTO_RAW"]) / result.folder.name


def test_rerun_skips_up_to_date_cases_and_redoes_changed_ones(real_planned):
    again = plan_and_preprocess(1, workers=1)
    assert again.written == 0
    img = layout_dir(real_planned) / "imagesTr" / "t2_0000.nii.gz"
    nib.save(nib.load(str(img)), str(img))  # new mtime
    assert plan_and_preprocess(1, workers=1).written == 1


def test_plans_round_trip_and_reject_bad_files(real_planned, tmp_path):
    path = real_planned.folder / "plans.json"
    plans = Plans.load(path)
    assert plans.to_dict() == json.loads(path.read_text())
    assert Plans.from_dict(plans.to_dict()) == plans
    from spineauto.errors import SpineautoError

    bad = plans.to_dict()
    bad["configurations"]["2d"]["batch_size"] = "four"
    with pytest.raises(SpineautoError, match=r"batch_size: expected an integer"):
        Plans.from_dict(bad)
    bad = plans.to_dict()
    del bad["configurations"]["2d"]["patch_size"]
    with pytest.raises(SpineautoError, match="missing key 'patch_size'"):
        Plans.from_dict(bad)
    bad = plans.to_dict()
    bad["schema_version"] = 0
    with pytest.raises(SpineautoError, match="schema_version"):
        Plans.from_dict(bad)
    # a plan written before non-monotone intensity curves existed keeps training (and resuming) without them
    assert plans.configurations["2d"].augmentation.non_monotone == 0.5
    older = plans.to_dict()
    for cfg in older["configurations"].values():
        del cfg["augmentation"]["non_monotone"]
    (tmp_path / "older.json").write_text(json.dumps(older))
    assert {c.augmentation.non_monotone for c in Plans.load(tmp_path / "older.json").configurations.values()} == {0.0}


def test_preset_overrides_by_name_and_adds_configurations(spineauto_env, tmp_path):
    layout_real_dataset(spineauto_env["raw"])
    preset = tmp_path / "p.yaml"
    preset.write_text("configurations:\n  2d:\n    batch_size: 3\n    network: {architecture: attention_unet}\n"
                      "  2d_resenc:\n    inherit: 2d\n    network: {architecture: resenc_unet}\n")
    plans = plan_and_preprocess(1, preset=preset, workers=1).plans
    assert plans.configurations["2d"].batch_size == 3
    assert plans.configurations["2d"].network.architecture == "attention_unet"
    assert plans.configurations["2d"].reasons["batch_size"] == "preset p.yaml"
    assert plans.configurations["2d_resenc"].network.architecture == "resenc_unet"
    assert plans.configurations["2d_resenc"].patch_size == plans.configurations["2d"].patch_size


def test_cli_plans_and_prints_a_summary(spineauto_env, capsys):
    layout_real_dataset(spineauto_env["raw"])
    code, out, err = run_cli(capsys, "plan_and_preprocess", "-d", "1", "-np", "1")
    assert code == 0, err
    assert "configuration 2d" in err and "per_case" in err
    assert (spineauto_env["preprocessed"] / "Dataset001_RealCord" / "plans.json").is_file()


def test_in_plane_resampling_by_slabs_equals_nnunet_on_the_whole_case():
    """resample_in_plane (RESAMPLE_SLAB slices at a time, in the input's dtype) gives exactly nnunetv2's values for
    the whole case, for images (cubic) and label maps, over slabs that do not divide the slices evenly."""
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg

    from spineauto.preprocessing.preprocess import RESAMPLE_SLAB, resample_in_plane

    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 2 * RESAMPLE_SLAB + 5, 20, 30)).astype(np.float32)
    seg = rng.integers(0, 3, size=(1, *data.shape[1:])).astype(np.int8)
    new_shape = [data.shape[1], 33, 41]
    ours = resample_in_plane(data, new_shape, is_seg=False, order=3)
    ref = resample_data_or_seg(data, new_shape, is_seg=False, axis=0, order=3, do_separate_z=True, order_z=0)
    assert ours.dtype == np.float32 and ours.shape == (2, *new_shape)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    assert np.abs(ours[:, :, ::2, ::2]).mean() > 0.1  # not zeros
    ours = resample_in_plane(seg, new_shape, is_seg=True, order=1)
    ref = resample_data_or_seg(seg, new_shape, is_seg=True, axis=0, order=1, do_separate_z=True, order_z=0)
    assert ours.dtype == np.int8
    np.testing.assert_array_equal(ours, ref)
    assert set(np.unique(ours)) == {0, 1, 2}
