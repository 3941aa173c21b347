"""spineauto evaluate and find_best_configuration: numbers checked against nnunetv2 and by hand."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import require_real_data, run_cli
from spineauto.evaluation import metrics as M
from spineauto.evaluation.evaluate import evaluate_folders


def _save(path: Path, data: np.ndarray, zooms=(1.0, 1.0, 1.0), affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    aff = affine if affine is not None else np.diag([*zooms, 1.0])
    img = nib.Nifti1Image(data.astype(np.uint8), aff)
    img.set_qform(aff, 1)
    nib.save(img, str(path))
    return path


def _cases(rng: np.random.Generator, n: int = 3):
    """(reference, prediction) label maps: a cord tube with lesions, predictions perturbed."""
    out = []
    for i in range(n):
        ref = np.zeros((30, 32, 24), np.uint8)
        yy, xx = np.mgrid[:32, :24]
        for z in range(30):
            ref[z][(yy - 16 - 3 * np.sin(z / 8)) ** 2 / 36 + (xx - 12) ** 2 / 16 <= 1] = 1
        if i < 2:  # the last case has no lesion at all
            ref[5:8, 14:17, 11:13] = 2
            ref[20:22, 15:17, 12:14] = 2
        pred = ndimage.binary_dilation(ref > 0, iterations=1).astype(np.uint8) if i % 2 else (ref > 0).astype(np.uint8)
        pred = np.roll(pred, i, axis=0)
        if i < 2:
            pred[5:8, 14:17, 11:13] = 2  # first lesion found, second missed
        pred[25:27, 2:4, 2:4] = 2 * (i == 0)  # a false-positive lesion in case 0
        out.append((ref, pred))
    return out


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    for i, (ref, pred) in enumerate(_cases(rng)):
        zooms = (1.0, 0.5, 0.5) if i else (2.0, 1.0, 1.0)
        _save(tmp_path / "gt" / f"case_{i}.nii.gz", ref, zooms)
        _save(tmp_path / "pred" / f"case_{i}.nii.gz", pred, zooms)
    return tmp_path / "pred", tmp_path / "gt"


def test_dice_agrees_with_nnunetv2(folders, capsys, tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    pred, gt = folders
    code, _, err = run_cli(capsys, "evaluate", pred, gt, "-o", tmp_path / "summary.json")
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["labels"] == {"label_1": 1, "label_2": 2}
    for case, by_label in summary["metric_per_case"].items():
        ref = compute_metrics(str(gt / f"{case}.nii.gz"), str(pred / f"{case}.nii.gz"), SimpleITKIO(), [1, 2])
        for v in (1, 2):
            theirs, ours = ref["metrics"][v]["Dice"], by_label[f"label_{v}"]["dice"]
            if np.isnan(theirs):
                assert ours is None  # nan in JSON is null
            else:
                assert abs(ours - theirs) < 1e-6
            assert by_label[f"label_{v}"]["tp"] == ref["metrics"][v]["TP"]
    # a real mask against a shifted copy of itself
    data = require_real_data()
    real = nib.load(str(data / "t2" / "t2_seg-manual.nii.gz"))
    (tmp_path / "rg").mkdir()
    (tmp_path / "rp").mkdir()
    shutil.copy(data / "t2" / "t2_seg-manual.nii.gz", tmp_path / "rg" / "t2.nii.gz")
    shifted = np.roll(np.asarray(real.dataobj), 1, axis=1)
    nib.save(nib.Nifti1Image(shifted, real.affine, real.header), str(tmp_path / "rp" / "t2.nii.gz"))
    ours = evaluate_folders(tmp_path / "rp", tmp_path / "rg")["metric_per_case"]["t2"]["label_1"]["dice"]
    theirs = compute_metrics(str(tmp_path / "rg" / "t2.nii.gz"), str(tmp_path / "rp" / "t2.nii.gz"), SimpleITKIO(), [1])
    assert 0.5 < ours < 1 and abs(ours - theirs["metrics"][1]["Dice"]) < 1e-6


def test_metrics_by_hand():
    a = np.zeros((20, 20, 20), bool)
    a[5:15, 5:15, 5:15] = True
    assert M.dice(a, a) == 1 and M.iou(a, a) == 1
    assert np.isnan(M.dice(np.zeros_like(a), np.zeros_like(a)))
    b = np.roll(a, 2, axis=0)
    assert M.dice(a, b) == pytest.approx(2 * 800 / 2000)
    assert M.relative_volume_difference(b, a) == 0
    same = M.surface_metrics(a, a, (1, 1, 1))
    assert same.hd95 == 0 and same.asd == 0
    # a shift of 2 voxels along an axis of 3 mm spacing: the farthest surface points are 6 mm apart
    s = M.surface_metrics(a, b, (3.0, 1.0, 1.0))
    assert s.hd95 == pytest.approx(6.0) and 0 < s.asd < 6.0
    assert M.relative_volume_difference(a[:10], a) == pytest.approx(-0.5)
    ref = np.zeros((30, 30, 30), bool)
    ref[2:4, 2:4, 2:4] = ref[10:12, 10:12, 10:12] = ref[20:22, 20:22, 20:22] = True
    pred = np.zeros_like(ref)
    pred[3:5, 3:5, 3:5] = pred[10:11, 10:11, 10:11] = pred[26:28, 2:4, 2:4] = True
    det = M.lesion_detection(pred, ref)
    assert (det.n_true, det.n_pred, det.tp_true, det.tp_pred) == (3, 3, 2, 2)
    assert det.precision == det.recall == det.f1 == pytest.approx(2 / 3)


def test_lesion_labels_from_the_dataset_and_files_written(folders, capsys, tmp_path, spineauto_env):
    raw = spineauto_env["raw"] / "Dataset007_Les"
    raw.mkdir()
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2w"}, "labels": {"background": 0, "cord": 1, "lesion": 2},
                                                  "numTraining": 0, "file_ending": ".nii.gz"}))
    pred, gt = folders
    out = tmp_path / "res" / "summary.json"
    code, stdout, err = run_cli(capsys, "evaluate", pred, gt, "-d", "7", "-o", out)
    assert code == 0, err
    summary = json.loads(out.read_text())
    assert summary["lesion_labels"] == ["lesion"]
    les = summary["metric_per_case"]["case_0"]["lesion"]
    assert (les["lesions_ref"], les["lesions_pred"], les["lesions_detected"]) == (2, 2, 1)
    assert les["lesion_precision"] == les["lesion_recall"] == pytest.approx(0.5)
    assert summary["metric_per_case"]["case_1"]["lesion"]["lesion_precision"] == 1.0
    assert "lesion_f1" not in summary["metric_per_case"]["case_0"]["cord"]
    assert summary["mean"]["cord"]["dice"] == pytest.approx(np.mean([summary["metric_per_case"][c]["cord"]["dice"] for c in ("case_0", "case_1", "case_2")]))
    # the case without lesions in either file: Dice undefined (null), excluded from the mean
    assert summary["metric_per_case"]["case_2"]["lesion"]["dice"] is None and "NaN" not in out.read_text()
    csv_lines = out.with_suffix(".csv").read_text().splitlines()
    assert csv_lines[0].startswith("case,label,dice,iou,hd95,asd,rvd")
    assert len(csv_lines) == 1 + 3 * 2 + 2
    assert "cord" in stdout and "lesion F1" in stdout


def test_declared_lesion_labels_take_precedence():
    from spineauto.evaluation.evaluate import labels_from_dataset_json

    labels = {"background": 0, "cord": 1, "lesion": 2, "edema": 3}
    assert labels_from_dataset_json({"labels": labels}).lesion == ["lesion"]
    assert labels_from_dataset_json({"labels": labels, "lesion_labels": ["edema", "absent"]}).lesion == ["edema"]


def test_evaluate_errors(folders, capsys, tmp_path):
    pred, gt = folders
    (pred / "case_2.nii.gz").unlink()
    code, _, err = run_cli(capsys, "evaluate", pred, gt)
    assert code == 1 and "Traceback" not in err and "no prediction for 1 ground-truth case(s) (first: case_2.nii.gz)" in " ".join(err.split())
    _save(pred / "case_2.nii.gz", np.zeros((30, 32, 23)), (1.0, 0.5, 0.5))
    code, _, err = run_cli(capsys, "evaluate", pred, gt)
    assert code == 1 and "grid differs from the ground truth (prediction vs ground truth: shape (30, 32, 23) vs (30, 32, 24))" in " ".join(err.split())


def _write_validation(model: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]], probs: bool, seed: int):
    from spineauto.inference.export import write_probabilities

    rng = np.random.default_rng(seed)
    (model / "fold_0" / "validation").mkdir(parents=True)
    model.joinpath("dataset.json").write_text(json.dumps({"labels": {"background": 0, "cord": 1}}))
    for case, (ref, noisy) in cases.items():
        target = _save(model / "fold_0" / "validation" / f"{case}.nii.gz", noisy)
        if probs:
            p1 = np.clip((noisy == 1) * 0.6 + rng.uniform(0, 0.35, noisy.shape), 0, 1).astype(np.float32)
            write_probabilities(target.with_name(f"{case}.npz"), np.stack([1 - p1, p1]), target, [0, 1])


def test_find_best_configuration(spineauto_env, capsys):
    rng = np.random.default_rng(1)
    raw = spineauto_env["raw"] / "Dataset002_Cord"
    cases = {}
    for i in range(3):
        ref = np.zeros((16, 16, 16), np.uint8)
        ref[4:12, 5:11, 5:11] = 1
        _save(raw / "labelsTr" / f"c{i}.nii.gz", ref)
        noisy = ref.copy()
        noisy[0:2, 0:2, 0:2] = 1  # spurious islands: postprocessing should remove them
        cases[f"c{i}"] = (ref, noisy)
    results = spineauto_env["results"] / "Dataset002_Cord"
    a = results / "spineautoTrainer__spineautoPlans__2d"
    b = results / "spineautoTrainer__spineautoPlans__multitask"
    _write_validation(a, cases, probs=True, seed=0)
    worse = {c: (r, np.where(np.roll(r, 2, axis=0) > 0, 1, 0).astype(np.uint8)) for c, (r, _) in cases.items()}
    _write_validation(b, worse, probs=False, seed=1)
    code, stdout, err = run_cli(capsys, "find_best_configuration", "-d", "2", "--allow-incomplete")
    assert code == 0, err
    best = json.loads((results / "best_configuration.json").read_text())
    assert best["best"]["name"] == "2d"
    names = [c["name"] for c in best["candidates"]]
    assert names == ["2d", "multitask"]  # the ensemble is skipped: multitask saved no probabilities
    assert "ensemble 2d+multitask skipped" in " ".join(err.split())
    top = best["candidates"][0]
    assert top["dice_postprocessed"] == pytest.approx(1.0) and top["dice"] < 1.0
    assert json.loads((a / "postprocessing.json").read_text())["largest_component_labels"] == [1]
    assert "spineauto predict -d Dataset002_Cord -c 2d" in (results / "inference_instructions.txt").read_text()
    assert "spineauto predict -d Dataset002_Cord -c 2d" in stdout
    assert "cases used: segmentation: 3 of the dataset's 3 cases" in stdout  # no splits: the raw labelsTr count

    # with probabilities in both, the ensemble is scored too
    shutil.rmtree(b)
    _write_validation(b, cases, probs=True, seed=2)
    code, stdout, err = run_cli(capsys, "find_best_configuration", "-d", "2", "--allow-incomplete")
    assert code == 0, err
    best = json.loads((results / "best_configuration.json").read_text())
    assert [c["name"] for c in best["candidates"]] == ["2d", "multitask", "2d+multitask"]
    assert (results / "ensemble__2d+multitask__postprocessing.json").is_file()


def test_find_best_configuration_ranks_classification_by_balanced_accuracy(spineauto_env, capsys):
    """cls configurations are ranked from their cross-validation <case>.json against dataset.json."""
    from spineauto.inference.classify import CaseClassification, write_case_json, write_classification_csv

    results = spineauto_env["results"] / "Dataset003_View"
    truth = {"a": "axial", "b": "axial", "c": "sagittal", "d": "sagittal"}
    guesses = {"cls": {"a": "axial", "b": "axial", "c": "sagittal", "d": "axial"},  # balanced accuracy (1 + 0.5) / 2
               "multitask": {"a": "axial", "b": "sagittal", "c": "axial", "d": "axial"}}  # (0.5 + 0) / 2
    plan = {"name": "x", "task": "classification", "data_identifier": "2d", "slicing": "per_case", "isotropic_plane": "axial",
            "target_spacing": [1.0, 1.0], "patch_size": [32, 32], "batch_size": 2, "normalization": ["ZScoreNormalization"],
            "use_mask_for_norm": [False], "network": {}, "heads": [{"name": "view", "classes": ["axial", "sagittal"], "class_weights": [1, 1]}]}
    for cfg, guess in guesses.items():
        folder = results / f"spineautoTrainer__spineautoPlans__{cfg}"
        plans = {"dataset_name": "Dataset003_View", "channel_names": {"0": "T2w"}, "labels": {}, "heads": {"view": ["axial", "sagittal"]},
                 "lesion_labels": [], "configurations": {cfg: {**plan, "name": cfg}},
                 "foreground_intensity_properties_per_channel": {"0": dict(mean=0, std=1, median=0, p00_5=0, p99_5=1, min=0, max=1)},
                 "schema_version": 2}
        folder.mkdir(parents=True)
        (folder / "plans.json").write_text(json.dumps(plans))
        (folder / "dataset.json").write_text(json.dumps({"cases": {c: {"classes": {"view": v}} for c, v in truth.items()}}))
        for fold, cases in enumerate((["a", "c"], ["b", "d"])):
            out = folder / f"fold_{fold}" / "validation"
            out.mkdir(parents=True)
            rs = [CaseClassification(c, {"view": np.array([0.9, 0.1] if guess[c] == "axial" else [0.1, 0.9])},
                                     {"view": ["axial", "sagittal"]}, 3) for c in cases]
            for r in rs:
                write_case_json(out, r)
            write_classification_csv(out, rs)
    code, stdout, err = run_cli(capsys, "find_best_configuration", "-d", "3", "--allow-incomplete")
    assert code == 0, err
    best = json.loads((results / "best_configuration.json").read_text())
    rows = {c["name"]: c for c in best["candidates"]}
    assert rows["cls"]["dice"] == pytest.approx(0.75) and rows["multitask"]["dice"] == pytest.approx(0.25)
    assert rows["cls"]["metric"] == "balanced accuracy" and rows["cls"]["cases"] == 4
    assert best["best"]["name"] == "cls"
    assert "spineauto predict -d Dataset003_View -c cls" in stdout


def test_region_datasets_are_scored_per_region(tmp_path, capsys, spineauto_env):
    """cord = {1, 2} contains the lesion (2): a prediction that calls the lesion cord has the whole cord region right."""
    import nibabel as nib

    raw = spineauto_env["raw"] / "Dataset008_Reg"
    raw.mkdir()
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2w"}, "file_ending": ".nii.gz", "numTraining": 0,
                                                  "labels": {"background": 0, "cord": [1, 2], "lesion": 2},
                                                  "regions_class_order": [1, 2]}))
    ref = np.zeros((12, 12, 6), np.uint8)
    ref[3:9, 3:9, 1:5] = 1
    ref[5:7, 5:7, 2:4] = 2  # 8 lesion voxels inside the 144-voxel cord region
    pred = np.where(ref == 2, 1, ref).astype(np.uint8)  # the lesion called cord
    for folder, data in (("gt", ref), ("pred", pred)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / folder / "a.nii.gz"))
    code, _, err = run_cli(capsys, "evaluate", tmp_path / "pred", tmp_path / "gt", "-d", "8", "-o", tmp_path / "s.json")
    assert code == 0, err
    rows = json.loads((tmp_path / "s.json").read_text())["metric_per_case"]["a"]
    assert set(rows) == {"cord", "lesion"}
    assert rows["cord"]["dice"] == 1.0 and rows["cord"]["n_ref"] == 144  # the region, not the painted value 1 (136 voxels)
    assert rows["lesion"]["dice"] == 0.0 and rows["lesion"]["fn"] == 8


def test_picture_distances_are_in_the_datasets_pixel_spacing(tmp_path, capsys, spineauto_env):
    """PNG masks have no geometry: with -d their HD95/ASD are in mm of dataset.json's pixel_spacing, else pixels of 1 mm."""
    from PIL import Image

    raw = spineauto_env["raw"] / "Dataset009_Png"
    raw.mkdir()
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "R"}, "file_ending": ".png", "numTraining": 0,
                                                  "labels": {"background": 0, "cord": 1}, "pixel_spacing": 0.5}))
    ref = np.zeros((40, 40), np.uint8)
    ref[10:20, 10:20] = 1
    for folder, data in (("gt", ref), ("pred", np.roll(ref, 4, axis=1))):  # the prediction 4 columns to the right
        (tmp_path / folder).mkdir()
        Image.fromarray(data).save(tmp_path / folder / "a.png")
    cord = {}
    for args in ((), ("-d", "9")):
        code, _, err = run_cli(capsys, "evaluate", tmp_path / "pred", tmp_path / "gt", *args, "-o", tmp_path / f"s{len(args)}.json")
        assert code == 0, err
        cord[args] = json.loads((tmp_path / f"s{len(args)}.json").read_text())["metric_per_case"]["a"]["cord" if args else "label_1"]
    plain, spaced = cord[()], cord[("-d", "9")]
    assert plain["hd95"] == pytest.approx(4.0) and spaced["hd95"] == pytest.approx(2.0)  # 4 pixels of 0.5 mm
    assert spaced["asd"] == pytest.approx(plain["asd"] / 2) and plain["asd"] > 0
    assert spaced["dice"] == plain["dice"] == pytest.approx(0.6)
