"""Calibrated thresholds (calibration.json): chosen so that the CSA matches a known truth, applied by
predict and carried by bundles; a model without the file predicts exactly as before."""
from __future__ import annotations

import json
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import planned_phantoms, run_cli
from spineauto.errors import SpineautoError
from spineauto.evaluation.calibration import CalibrationCase, choose_threshold, csa_errors, mean_csa
from spineauto.inference.calibration import CALIBRATION_FILE, labels_from_probabilities, load_calibration
from test_inference_support import make_model_folder

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A phantom dataset (labels background, cord, lesion) and a one-pass model folder of small random networks."""
    env = planned_phantoms(tmp_path_factory.mktemp("calibration"), n_train=4, n_test=1, seed=0)
    model = make_model_folder(env["preprocessed"] / "Dataset001_Ph", env["results"], folds=(0,), one_pass=True)
    return env, model


@pytest.fixture
def env(planned, monkeypatch):
    env, model = planned
    for k, p in env.items():
        monkeypatch.setenv(f"SPINEAUTO_{k.upper()}", str(p))
    (model / CALIBRATION_FILE).unlink(missing_ok=True)
    return env, model


def _tube(ramp_mm: float, radius_mm: float, spacing=(0.5, 0.5, 4.0)) -> CalibrationCase:
    """A straight axial cord of ``radius_mm`` and a probability falling linearly from 1 at its axis to 0 at
    ``ramp_mm``: thresholding at t keeps the disc of radius ramp_mm x (1 - t)."""
    affine = np.diag([*spacing, 1.0])
    x, y = np.meshgrid((np.arange(80) - 39.5) * spacing[0], (np.arange(80) - 39.5) * spacing[1], indexing="ij")
    d = np.hypot(x, y)[..., None].repeat(6, axis=2)
    return CalibrationCase("tube", "T", np.clip(1 - d / ramp_mm, 0, 1), d <= radius_mm, affine)


def test_chosen_threshold_makes_the_csa_match_the_truth():
    # truth radius 4 mm, probability ramp to 12 mm: the area matches where 12 (1 - t) = 4, t = 2/3
    case = _tube(12.0, 4.0)
    errors = csa_errors([case])
    t = choose_threshold(errors)
    assert abs(t - 2 / 3) < 0.025  # a grid step (0.025) away at most
    assert abs(errors[t]["T"]) < 0.05
    assert errors[0.5]["T"] > 0.9  # at the argmax's 0.5 the disc has radius 6 mm: 2.25x the area
    # two contrasts that pull apart: the threshold that is best for the worse of them
    u = _tube(6.0, 4.0)  # its own threshold: 1/3
    under = CalibrationCase("u", "U", u.probability, u.reference, u.affine)
    errors = csa_errors([case, under])
    t = choose_threshold(errors)
    worst = max(abs(e) for e in errors[t].values())
    assert worst == min(max(abs(e) for e in g.values()) for g in errors.values())
    assert errors[t]["T"] > 0 > errors[t]["U"]  # between the two contrasts' own thresholds (2/3 and 1/3)


def test_mean_csa_is_the_area_per_level_in_mm2_over_the_references_levels():
    case = _tube(12.0, 4.0)
    ref = case.reference.copy()
    ref[..., 0] = False  # the reference ends one level early: that level is not counted
    mask = case.reference.copy()
    mask[..., 0] = True
    per_level = case.reference[..., 1].sum() * 0.25  # voxels x 0.5 x 0.5 mm
    assert mean_csa(mask, ref, case.affine) == pytest.approx(per_level)
    assert per_level == pytest.approx(np.pi * 16, rel=0.05)  # the disc of radius 4 mm


def test_labels_follow_the_thresholds():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.35, 0.45], [0.1, 0.5, 0.4], [0.6, 0.25, 0.15]]).T[None]  # (1, K=3, 4)
    assert labels_from_probabilities(p).tolist() == [[0, 2, 1, 0]]
    assert labels_from_probabilities(p, {1: 0.28}).tolist() == [[1, 1, 1, 0]]  # cord wherever p(cord) >= 0.28
    assert labels_from_probabilities(p, {1: 0.6}).tolist() == [[0, 2, 2, 0]]  # else the most probable other label


@pytest.mark.parametrize("content, words", [
    ("[1]", "not a calibration file"),
    ('{"thresholds": {"1": 1.5}}', "between 0 and 1"),
    ('{"thresholds": {"1": true}}', "between 0 and 1"),
    ('{"thresholds": {"7": 0.4}}', "not a label value"),
    ('{"thresholds": {"cord": 0.4}}', "not a label value"),
    ("{", "unreadable calibration file"),
])
def test_a_bad_calibration_file_is_one_line_naming_it(tmp_path, content, words):
    path = tmp_path / CALIBRATION_FILE
    path.write_text(content)
    with pytest.raises(SpineautoError) as e:
        load_calibration(path, [0, 1, 2])
    assert str(path) in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


def _predict(capsys, src, out):
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", src, "-o", out, "--no-tta", "--device", "cpu", "--save-probabilities")
    assert code == 0, err
    mask = np.asarray(nib.load(str(out / "phantom_004.nii.gz")).dataobj)
    with np.load(out / "phantom_004.npz") as z:
        probs = z["probabilities"].reshape(-1, *mask.shape)
    return mask, probs


def test_predict_applies_the_calibration_and_a_model_without_it_is_unchanged(env, capsys, tmp_path):
    env, model = env
    src = env["raw"] / "Dataset001_Ph" / "imagesTs"
    mask, probs = _predict(capsys, src, tmp_path / "plain")
    np.testing.assert_array_equal(mask, probs.argmax(0))  # no calibration.json: the argmax, as before
    t = float(np.quantile(probs[1], 0.5))  # half the voxels reach it: the masks must differ
    (model / CALIBRATION_FILE).write_text(json.dumps({"thresholds": {"1": t}}))
    calibrated, probs2 = _predict(capsys, src, tmp_path / "calibrated")
    np.testing.assert_array_equal(probs2, probs)  # the probabilities do not depend on it
    others = probs.copy()
    others[1] = -1
    np.testing.assert_array_equal(calibrated, np.where(probs[1] >= t, 1, others.argmax(0)))
    assert (calibrated != mask).sum() > 0.05 * mask.size

    code, _, err = run_cli(capsys, "export", "-m", model, "-o", tmp_path / "model.zip")
    assert code == 0, err
    with zipfile.ZipFile(tmp_path / "model.zip") as z:
        assert json.loads(z.read(f"{model.name}/{CALIBRATION_FILE}"))["thresholds"] == {"1": t}
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-m", tmp_path / "model.zip", "-i", src, "-o", tmp_path / "bundled",
                           "--no-tta", "--device", "cpu")
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "bundled" / "phantom_004.nii.gz")).dataobj), calibrated)


def test_calibrate_writes_the_threshold_the_phantoms_choose(env, capsys, tmp_path):
    env, model = env
    code, out, err = run_cli(capsys, "calibrate", "-m", model, "--subjects", "1", "--no-tta", "--device", "cpu")
    assert code == 0, err
    data = json.loads((model / CALIBRATION_FILE).read_text())
    (t,) = data["thresholds"].values()
    assert 0.05 <= t <= 0.95 and set(data["mean_csa_error"]) == {"T1w", "T2starw", "T2w"}
    assert max(abs(e) for e in data["mean_csa_error"].values()) <= max(abs(e) for e in data["mean_csa_error_at_0.5"].values())
    assert load_calibration(model / CALIBRATION_FILE, [0, 1, 2]) == {1: t}
    code, _, err = run_cli(capsys, "calibrate", "-m", model, "--label", "vessel", "--device", "cpu")
    assert code == 1 and "no label 'vessel'" in err


def test_soft_targets_keep_each_labels_area_and_mix_only_the_boundary():
    from spineauto.training.losses import soft_targets

    x, y = np.meshgrid(np.arange(40) - 19.5, np.arange(40) - 19.5, indexing="ij")
    label = torch.from_numpy((np.hypot(x, y) <= 8).astype(np.int64))[None, None]  # (1, 1, 40, 40)
    soft = soft_targets(label, 3)
    assert soft.shape == (1, 3, 40, 40)
    torch.testing.assert_close(soft.sum(1), torch.ones(1, 40, 40))
    assert float(soft[0, 1].sum()) == pytest.approx(float(label.sum()), rel=1e-5)  # the area is kept
    assert float(soft[0, 2].abs().sum()) == 0.0  # an absent label stays absent
    inside, outside = np.hypot(x, y) <= 6, np.hypot(x, y) >= 10
    assert float(soft[0, 1][torch.from_numpy(inside)].min()) > 0.999 and float(soft[0, 1][torch.from_numpy(outside)].max()) < 1e-3
    ring = torch.from_numpy(np.abs(np.hypot(x, y) - 8) < 0.5)
    assert 0.2 < float(soft[0, 1][ring].mean()) < 0.8  # the boundary is a partial-volume mix
