"""bench/: the real data laid out as a raw dataset, and the 2D slicing report (without nnU-Net's planning)."""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_plan  # noqa: E402
import common  # noqa: E402

from spineauto.datasets.dataset_json import load_dataset_json  # noqa: E402


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    if not (common.SHARED_DATA / "mt" / "mt1.nii.gz").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"real test data {common.SHARED_DATA} is missing")
        pytest.skip(f"real test data {common.SHARED_DATA} is missing")
    root = tmp_path_factory.mktemp("raw")
    return common.write_real_dataset(root, 901, "SCTReal", cases=["mt1", "t2"])


def test_real_dataset_layout_reads_as_a_raw_dataset(raw, tmp_path):
    info = load_dataset_json(raw)
    assert info.training_cases() == ["mt1", "t2"]
    assert info.labels == {"background": 0, "cord": 1} and info.channel_names == {"0": "MRI"}
    mask = np.asanyarray(nib.load(raw / "labelsTr" / "mt1.nii.gz").dataobj)
    assert set(np.unique(mask)) == {0, 1}
    # the permuted copy is the same physical image stored with its axes in another order
    orig = nib.load(common.SHARED_DATA / "t2" / "t2.nii.gz")
    permuted = common.write_real_dataset(tmp_path, 902, "Permuted", cases=["t2"], permute={"t2": (2, 0, 1)})
    perm = nib.load(permuted / "imagesTr" / "t2_0000.nii.gz")
    assert perm.shape == (orig.shape[2], orig.shape[0], orig.shape[1])
    assert np.allclose(perm.affine @ [7, 3, 5, 1], orig.affine @ [3, 5, 7, 1], atol=1e-3)
    assert np.asanyarray(perm.dataobj)[7, 3, 5] == np.asanyarray(orig.dataobj)[3, 5, 7]


def test_slicing_report_reads_planes_and_in_plane_spacing(raw, tmp_path):
    from spineauto.plan_and_preprocess import plan_and_preprocess

    sa = plan_and_preprocess(raw.name, workers=1, raw=raw.parent, preprocessed=tmp_path / "sa").folder
    nn_pre = tmp_path / "nn"  # no nnU-Net arrays: the reading cannot be verified, and says so
    plans = {"transpose_forward": [2, 0, 1], "configurations": {"2d": {"spacing": [1.0, 1.0]}}}
    rep = bench_plan.slicing_report(raw, nn_pre, sa, nn_plans=plans)
    rows = {r[0]: r for r in rep.rows}
    # axial MT (0.84 x 0.84 x 17 mm): ours cuts axial slices; nnU-Net's [2, 0, 1] cuts across x, so its
    # slices hold the 17 mm axis, the "17 mm x 0.84 mm" slices of an axial scan sliced the wrong way
    assert rows["mt1"][1:4] == ["axial", "0.844 x 0.844", "1.0"]
    assert rows["mt1"][5:8] == ["sagittal", "17 x 0.844", "20.1"] and rows["mt1"][9] == "yes"
    # T2 (1 mm iso block): ours takes the dataset's isotropic plane (axial: 3 axial scans vs 2 sagittal
    # slabs here); nnU-Net's axis 0 after [2, 0, 1] is SimpleITK's x, here anterior-posterior
    assert rows["t2"][1] == "axial" and rows["t2"][5] == "coronal" and rows["t2"][9] == "no"
    assert (rep.nnunet_through, rep.ours_through) == (1, 0)
    assert len(rep.problems) == 1 and "no preprocessed arrays" in rep.problems[0]


def test_nnunet_reading_check_compares_stored_shapes(raw, tmp_path):
    image = raw / "imagesTr" / "mt1_0000.nii.gz"
    sl, transposed = bench_plan.nnunet_slicing(image, [0, 1, 2])
    assert (sl.plane, sl.slice_mm, transposed) == ("axial", 17.0, [5, 40, 40]) and not sl.contains_through_plane
    folder = tmp_path / "nnUNetPlans_2d"
    folder.mkdir()
    with open(folder / "mt1.pkl", "wb") as f:
        pickle.dump({"shape_before_cropping": (5, 40, 40), "shape_after_cropping_and_before_resampling": (5, 40, 38)}, f)
    np.save(folder / "mt1.npy", np.zeros((1, 5, 20, 19), np.float32))  # 40 x 38 px at 0.84375 mm -> 1.6875 mm
    spacing = [17.0, 0.84375, 0.84375]
    assert bench_plan.check_nnunet_reading(tmp_path, "mt1", transposed, spacing, [1.6875, 1.6875]) == ""
    assert "predicted preprocessed shape" in bench_plan.check_nnunet_reading(tmp_path, "mt1", transposed, spacing, [0.84375, 0.84375])
    assert "predicted transposed shape" in bench_plan.check_nnunet_reading(tmp_path, "mt1", [40, 40, 5], spacing, [1.6875, 1.6875])


def test_bench_scores_the_uncropped_scan_on_held_out_levels_only():
    import bench_generalisation as B

    affine = np.diag([0.5, 0.5, 7.5, 1.0])
    carried = np.zeros((40, 40, 6), bool)
    carried[18:22, 18:22] = True
    mask = carried.copy()
    mask[2:6, 2:6, 1] = True  # a false positive on a training level (1)
    mask[30:34, 30:34, 4] = True  # and one on a held-out level (4)
    every = B.uncropped_stats(mask, carried, affine)
    held = B.uncropped_stats(mask, carried, affine, levels=(3, 4, 5))
    assert every["fp_mm3"] == 2 * 16 * 0.5 * 0.5 * 7.5 and every["components"] == 3
    assert held["fp_mm3"] == 16 * 0.5 * 0.5 * 7.5 and held["components"] == 2 and held["recall"] == 1.0
