"""Sparse labels as nnU-Net v2 (>= 2.2) trains them: a label named ``ignore`` (the highest value) marks
voxels nobody labelled; they are no class, count in no loss, sampling centre, pseudo-Dice or metric,
and ``convert sparse`` makes such a case of a whole-field-of-view scan from a cropped scan's mask."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import run_cli
from spineauto.errors import SpineautoError

LABELS = {"background": 0, "cord": 1, "lesion": 2, "ignore": 3}


def _dataset_json(folder: Path, **keys) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz", **keys}))
    return folder


# -- dataset.json ------------------------------------------------------------------------------------
def test_ignore_is_no_class_but_a_value_label_maps_may_hold(tmp_path):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from spineauto.datasets.dataset_json import load_dataset_json

    info = load_dataset_json(_dataset_json(tmp_path / "D", labels=LABELS))
    nnunet = LabelManager(LABELS, None)
    assert info.ignore_label == nnunet.ignore_label == 3
    assert info.labels == {"background": 0, "cord": 1, "lesion": 2} and info.class_values == nnunet.all_labels == [0, 1, 2]
    assert info.label_values == [0, 1, 2, 3]
    regions = load_dataset_json(_dataset_json(tmp_path / "R", labels={"background": 0, "cord": [1, 2], "lesion": 2, "ignore": 3},
                                              regions_class_order=[1, 2]))
    assert regions.ignore_label == 3 and regions.regions == {"cord": [1, 2], "lesion": [2]}  # as nnU-Net: regions may have one


@pytest.mark.parametrize("labels,message", [
    ({"background": 0, "ignore": 1, "cord": 2}, r"label 'ignore' = 1 must be the highest value, 3 \(every other label value \+ 1"),
    ({"background": 0, "cord": 1, "ignore": 5}, r"label 'ignore' = 5 must be the highest value, 2"),
    ({"background": 0, "cord": 1, "ignore": [2, 3]}, r"label 'ignore' must be one integer value > 0 .*not \[2, 3\]"),
    ({"background": 0, "cord": [1, 2], "lesion": 2, "ignore": 2}, r"label 'ignore' = 2 must be the highest value, 3"),
])
def test_a_bad_ignore_declaration_is_refused_in_one_line(tmp_path, labels, message):
    from spineauto.datasets.dataset_json import load_dataset_json

    keys = {"labels": labels, **({"regions_class_order": [1, 2]} if isinstance(labels.get("cord"), list) else {})}
    with pytest.raises(SpineautoError, match=message) as e:
        load_dataset_json(_dataset_json(tmp_path / "D", **keys))
    assert "\n" not in str(e.value) and str(tmp_path / "D" / "dataset.json") in str(e.value)


# -- losses ------------------------------------------------------------------------------------------
def _plans(loss: str, ignore: int | None = 3, regions: bool = False):
    from spineauto.planning.plans import ConfigurationPlan, LossPlan, NetworkPlan, Plans

    net = NetworkPlan(architecture="unet", features_per_stage=[8, 16, 32], kernel_sizes=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]],
                      n_conv_per_stage=[2] * 3, n_conv_per_stage_decoder=[2] * 2)
    plan = ConfigurationPlan(name="2d", task="segmentation", data_identifier="d", slicing="axial", isotropic_plane="axial",
                             target_spacing=[1, 1], patch_size=[16, 16], batch_size=2, normalization=["ZScoreNormalization"],
                             use_mask_for_norm=[False], network=net, loss=LossPlan(name=loss))
    labels = {"background": 0, "cord": 1, "lesion": 2}
    return Plans(dataset_name="D", channel_names={"0": "MRI"}, labels=labels, heads={}, lesion_labels=["lesion"],
                 configurations={"2d": plan}, regions={"cord": [1, 2], "lesion": [2]} if regions else {}, ignore_label=ignore), plan


@pytest.mark.parametrize("loss", ["dice_ce", "dice_focal", "tversky", "focal_tversky", "dice_bce", "dice_bce regions"])
def test_every_builtin_loss_is_blind_inside_ignore_and_sees_outside(loss):
    from spineauto.training.losses import build_segmentation_loss

    name, regions = loss.split()[0], loss.endswith("regions")
    plans, plan = _plans(name, regions=regions)
    criterion = build_segmentation_loss(plans, plan, ddp=False)
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 1, 16, 16), generator=g)
    target[:, :, :, 8:] = 3  # the right half unlabelled
    outputs = [torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 8, 8, generator=g)]  # deep supervision: 2 resolutions
    base = criterion(outputs, target)
    inside = [o.clone() for o in outputs]
    for o in inside:
        o[..., o.shape[-1] // 2:] += 5 * torch.randn(o[..., o.shape[-1] // 2:].shape, generator=g)
    outside = [o.clone() for o in outputs]
    outside[0][:, 1, :, :4] += 5.0  # one channel: a shift of all channels is no change for a softmax
    assert torch.isfinite(base)
    assert torch.allclose(criterion(inside, target), base, atol=1e-6), "the prediction changed only where the label is ignore"
    assert not torch.allclose(criterion(outside, target), base, atol=1e-3)
    unmasked, _ = _plans(name, ignore=None, regions=regions)
    assert not torch.allclose(build_segmentation_loss(unmasked, plan, False)(inside, target.clamp(max=2)),
                              build_segmentation_loss(unmasked, plan, False)(outputs, target.clamp(max=2)), atol=1e-3)


def test_deep_supervision_targets_keep_ignore_where_it_was():
    from spineauto.training.losses import DeepSupervision

    seen = []

    def capture(out, target):
        seen.append(target.clone())
        return out.sum() * 0

    target = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    target[..., 4:12, 4:8] = 1
    target[..., :, 8:] = 3
    DeepSupervision(capture, [0.5, 0.3, 0.2])([torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 4)], target)
    assert [t.shape[-1] for t in seen] == [16, 8, 4]
    for t in seen[1:]:
        assert set(t.unique().tolist()) <= {0, 1, 3}
        assert (t[..., :, t.shape[-1] // 2:] == 3).all() and not (t[..., :, : t.shape[-1] // 2] == 3).any()


def test_a_plugin_loss_that_would_train_ignore_as_a_class_is_refused():
    from spineauto.training.losses import build_base_loss

    plans, plan = _plans("dice_ce")
    plan.loss.name = "torch.nn:CrossEntropyLoss"
    with pytest.raises(SpineautoError, match=r"dataset D has an ignore label \(value 3.*handles_ignore_label = True"):
        build_base_loss(plans, plan, False)
    plans.ignore_label = None
    assert isinstance(build_base_loss(plans, plan, False), torch.nn.CrossEntropyLoss)


def test_pseudo_dice_counts_nothing_inside_ignore():
    from spineauto.training.tasks import SegmentationTask

    plans, plan = _plans("dice_ce")
    task = SegmentationTask(plans, plan)
    ref = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    ref[..., 2:4, 2:4] = 1
    ref[..., :, 6:] = 3
    logits = torch.zeros(1, 3, 8, 8)
    logits[:, 1, 2:4, 2:4] = 5  # the cord right
    logits[:, 1, :, 6:] = 5  # and "cord" all over the unlabelled columns
    stats = task.val_stats({"seg": logits}, {"seg": ref})
    assert task.metrics(stats)["pseudo_dice_cord"] == 1.0
    plans.ignore_label = None
    assert SegmentationTask(plans, plan).metrics(SegmentationTask(plans, plan).val_stats({"seg": logits}, {"seg": ref}))["pseudo_dice_cord"] < 0.5


# -- sampling ----------------------------------------------------------------------------------------
def test_oversampling_never_targets_ignore_and_other_patches_centre_on_labelled_voxels():
    from spineauto.preprocessing.preprocess import annotated_locations, class_locations
    from spineauto.training.data import CaseStore, SegmentationPatchSampler

    seg = np.full((1, 3, 40, 40), 2, np.int8)  # all unlabelled ...
    seg[0, 1, 10:14, 20:24] = 1  # ... but a cord
    seg[0, 1, 30:, :] = 0  # and background rows
    rng = np.random.default_rng(0)
    locations = class_locations(seg, [0, 1], rng)
    assert list(locations) == ["1"]
    labelled = annotated_locations(seg, 2, rng)
    assert labelled and all(seg[0, s, y, x] in (0, 1) for s, y, x in labelled)
    store = CaseStore(Path("."), {"c": {"class_locations": locations, "annotated_locations": labelled}})
    sampler = SegmentationPatchSampler(store, 0.5)
    for i in range(40):
        s, y0, x0 = sampler._window("c", seg.shape[1:], [8, 8], np.random.default_rng(i), force_fg=i % 2 == 0)
        centre = seg[0, s, y0 + 4, x0 + 4]
        assert centre == 1 if i % 2 == 0 else centre in (0, 1)


# -- evaluate ----------------------------------------------------------------------------------------
def _masks(tmp_path: Path, ref: np.ndarray, pred: np.ndarray) -> tuple[Path, Path]:
    for name, arr in (("gt", ref), ("pred", pred)):
        (tmp_path / name).mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(arr.astype(np.uint8), np.eye(4)), str(tmp_path / name / "case.nii.gz"))
    return tmp_path / "pred", tmp_path / "gt"


def test_evaluate_counts_nothing_inside_ignore(tmp_path, spineauto_env, capsys):
    from spineauto.evaluation.evaluate import evaluate_folders, labels_from_dataset_json

    ref = np.zeros((20, 20, 4), np.uint8)
    ref[5:10, 5:10] = 1
    ref[:, 12:] = 3  # unlabelled
    pred = ref.copy()
    pred[:, 12:] = 0
    pred[2:18, 14:18] = 1  # a big false "cord" where nobody labelled: no metric may see it
    pred[1:3, 16:19] = 2  # and a lesion there
    pred_dir, gt_dir = _masks(tmp_path, ref, pred)
    labels = labels_from_dataset_json({"labels": LABELS})
    assert labels.ignore == 3
    summary = evaluate_folders(pred_dir, gt_dir, labels)
    row = summary["metric_per_case"]["case"]
    assert set(row) == {"cord", "lesion"}  # the ignore value gets no row
    assert row["cord"]["dice"] == 1.0 and row["cord"]["fp"] == 0 and row["cord"]["hd95"] == 0.0 and row["cord"]["rvd"] == 0.0
    assert np.isnan(row["lesion"]["dice"]) and row["lesion"]["lesions_pred"] == 0
    assert summary["ignore_label"] == 3
    blind = evaluate_folders(pred_dir, gt_dir, labels_from_dataset_json({"labels": {k: v for k, v in LABELS.items() if k != "ignore"}}))
    assert blind["metric_per_case"]["case"]["cord"]["dice"] < 0.5 and "label_3" in blind["metric_per_case"]["case"]
    # the CLI: --ignore-label without a dataset, and a bad value in one line
    code, out, err = run_cli(capsys, "evaluate", str(pred_dir), str(gt_dir), "--ignore-label", "3", "-o", str(tmp_path / "s.json"))
    assert code == 0, err
    written = json.loads((tmp_path / "s.json").read_text())
    assert written["metric_per_case"]["case"]["label_1"]["dice"] == 1.0 and "label_3" not in written["labels"]
    raw = _dataset_json(spineauto_env["raw"] / "Dataset007_Sparse", labels=LABELS)
    code, out, err = run_cli(capsys, "evaluate", str(pred_dir), str(gt_dir), "-d", "7", "--ignore-label", "1", "-o", str(tmp_path / "t.json"))
    assert code != 0 and err.count("error") == 1 and "--ignore-label 1: is a class of the dataset" in err and "Traceback" not in err
    assert raw.is_dir()


def test_find_best_configuration_scores_nothing_inside_ignore():
    from spineauto.evaluation.best_configuration import decide_postprocessing, labelled_dice

    ref = np.zeros((30, 30, 6), np.int16)
    ref[10:14, 10:14] = 1
    ref[:, 20:] = 2  # unlabelled
    pred = np.where(ref == 1, 1, 0).astype(np.int16)
    pred[2:28, 22:29, 1:5] = 1  # a bigger blob where nobody labelled
    assert labelled_dice(pred, ref, 1, 2) == 1.0 and labelled_dice(pred, ref, 1, None) < 0.5
    pp = decide_postprocessing({"a": pred}, {"a": ref}, {"background": 0, "cord": 1}, ignore=2)
    assert pp["per_label"]["cord"]["dice_before"] == 1.0 and pp["largest_component_labels"] == []


# -- convert sparse ----------------------------------------------------------------------------------
def _wide_and_crop(tmp_path: Path) -> tuple[Path, Path]:
    """A 60x60x6 'wide' scan (1 x 1 x 5 mm) and the mask of a crop of it on slices 1..4 (a 5 mm disc
    at voxel (40, 20)), on the crop's own grid (offset by (30, 10, 1) voxels)."""
    rng = np.random.default_rng(0)
    affine = np.diag([1.0, 1.0, 5.0, 1.0])
    wide = tmp_path / "wide.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(100, 10, (60, 60, 6)).astype(np.float32), affine), str(wide))
    crop_affine = affine.copy()
    crop_affine[:3, 3] = affine[:3, :3] @ [30, 10, 1]
    yy, xx = np.mgrid[:20, :20]
    mask = np.zeros((20, 20, 4), np.uint8)
    mask[(yy - 10) ** 2 + (xx - 10) ** 2 <= 4] = 1
    path = tmp_path / "crop_seg.nii.gz"
    nib.save(nib.Nifti1Image(mask, crop_affine), str(path))
    return wide, path


def test_convert_sparse_labels_background_far_from_the_carried_mask_and_ignore_near_it(tmp_path, spineauto_env, capsys):
    from spineauto.datasets.dataset_json import load_dataset_json

    wide, crop = _wide_and_crop(tmp_path)
    ds = _dataset_json(spineauto_env["raw"] / "Dataset005_Wide", labels={"background": 0, "cord": 1}, numTraining=0)
    code, out, err = run_cli(capsys, "convert", "sparse", str(wide), str(crop), "-d", "5", "--case", "neck", "--margin-mm", "6",
                             "--overlay", str(tmp_path / "look.png"))
    assert code == 0, err
    assert (tmp_path / "look.png").read_bytes()[:4] == b"\x89PNG"
    info = load_dataset_json(ds)
    assert info.ignore_label == 2 and info.labels == {"background": 0, "cord": 1} and info.training_cases() == ["neck"]
    assert json.loads((ds / "dataset.json").read_text())["numTraining"] == 1
    labels = np.asanyarray(nib.load(str(ds / "labelsTr" / "neck.nii.gz")).dataobj)
    assert set(np.unique(labels).tolist()) == {0, 2}  # nothing is labelled cord: the carried mask is not trusted to be it
    yy, xx = np.mgrid[:60, :60]
    distance = np.hypot(yy - 40, xx - 20)  # from the disc's centre (radius 2 mm, margin 6 mm)
    for k in range(6):  # slices 0 and 5: not covered, the nearest slice's disc ("nearest")
        assert (labels[..., k][distance <= 7.5] == 2).all() and (labels[..., k][distance >= 8.5] == 0).all()
    assert np.array_equal(np.asanyarray(nib.load(str(ds / "imagesTr" / "neck_0000.nii.gz")).dataobj),
                          np.asanyarray(nib.load(str(wide)).dataobj))
    # whole unreached slices ignored, on request; an existing case is refused without --overwrite
    code, out, err = run_cli(capsys, "convert", "sparse", str(wide), str(crop), "-d", "5", "--case", "neck")
    assert code != 0 and "case 'neck' is already in Dataset005_Wide; choose another --case or pass --overwrite" in err
    code, out, err = run_cli(capsys, "convert", "sparse", str(wide), str(crop), "-d", "5", "--case", "neck", "--uncovered", "ignore",
                             "--overwrite")
    assert code == 0, err
    labels = np.asanyarray(nib.load(str(ds / "labelsTr" / "neck.nii.gz")).dataobj)
    assert (labels[..., 0] == 2).all() and (labels[..., 5] == 2).all() and (labels[..., 2] == 0).sum() > 2500  # 15 mm by default
    assert load_dataset_json(ds).ignore_label == 2  # declared once, kept


def test_convert_sparse_declares_ignore_before_any_label_file_holds_it(tmp_path, spineauto_env, capsys, monkeypatch):
    """A run killed while the files are written never leaves a label map with a value dataset.json does not declare."""
    from spineauto.datasets import sparse

    wide, crop = _wide_and_crop(tmp_path)
    ds = _dataset_json(spineauto_env["raw"] / "Dataset005_Wide", labels={"background": 0, "cord": 1}, numTraining=0)
    declared_at_write = []
    real_save = sparse.save_nifti

    def save_and_look(path, img):
        declared_at_write.append(json.loads((ds / "dataset.json").read_text())["labels"].get("ignore"))
        real_save(path, img)
        raise KeyboardInterrupt  # killed right after the label file is written

    monkeypatch.setattr(sparse, "save_nifti", save_and_look)
    with pytest.raises(KeyboardInterrupt):
        sparse.add_sparse_case(ds, wide, crop, "neck")
    labels = np.asanyarray(nib.load(str(ds / "labelsTr" / "neck.nii.gz")).dataobj)
    assert declared_at_write == [2] and json.loads((ds / "dataset.json").read_text())["labels"]["ignore"] == 2 == labels.max()


@pytest.mark.parametrize("args,message", [
    (["--margin-mm", "0"], "--margin-mm 0.0: must be a number of mm > 0"),
    (["--uncovered", "all"], "uncovered slices: 'all' is none of nearest, ignore"),
    (["--case", "a/b"], "--case 'a/b': letters, digits"),
    (["--overlay", "look.jpg"], "--overlay look.jpg: a .png file to write"),
])
def test_convert_sparse_refuses_bad_values_in_one_line(tmp_path, spineauto_env, capsys, args, message):
    wide, crop = _wide_and_crop(tmp_path)
    _dataset_json(spineauto_env["raw"] / "Dataset005_Wide", labels={"background": 0, "cord": 1})
    base = ["convert", "sparse", str(wide), str(crop), "-d", "5"]
    code, out, err = run_cli(capsys, *base, *(args if "--case" in args else ["--case", "neck", *args]))
    assert code != 0 and message in err and err.count("error") == 1 and "Traceback" not in err


def test_convert_sparse_refuses_a_mask_of_another_place(tmp_path, spineauto_env, capsys):
    wide, crop = _wide_and_crop(tmp_path)
    far = nib.load(str(crop))
    moved = far.affine.copy()
    moved[:3, 3] += 500
    nib.save(nib.Nifti1Image(np.asanyarray(far.dataobj), moved), str(tmp_path / "far.nii.gz"))
    _dataset_json(spineauto_env["raw"] / "Dataset005_Wide", labels={"background": 0, "cord": 1})
    code, out, err = run_cli(capsys, "convert", "sparse", str(wide), str(tmp_path / "far.nii.gz"), "-d", "5", "--case", "x")
    assert code != 0 and "does not reach" in err and "same session" in err


def test_the_real_uncropped_t2s_keeps_its_whole_canal_out_of_the_background(real_data):
    """The real pair: t2s_seg carried onto t2s_uncropped lies up to ~10 mm off the cord (a shear between the
    headers); with the default 15 mm margin every voxel within 4 mm of the carried cord is ignore on
    every slice, reached or not, and most of the neck is background."""
    from spineauto.datasets.sparse import carry_mask, sparse_labels

    wide = nib.load(str(real_data / "t2s" / "t2s_uncropped.nii.gz"))
    carried = carry_mask(nib.load(str(real_data / "t2s" / "t2s_seg.nii.gz")), wide)
    spacing = np.linalg.norm(wide.affine[:3, :3], axis=0)
    labels, axis, covered = sparse_labels(carried, spacing, 15.0, 2)
    assert axis == 2 and covered == 8 and labels.shape == wide.shape
    assert (labels[carried] == 2).all()
    assert 0.85 < np.mean(labels == 0) < 0.99
    assert all((labels[..., k] == 2).sum() > 3000 for k in range(11))  # an ignore disc on every slice


# -- a training run on sparse labels ------------------------------------------------------------------
def test_a_model_trained_with_half_of_every_label_map_ignored_still_learns_the_cord(tmp_path, capsys):
    """Phantoms with the first half (array axis 0) of every training label map set to ignore: the run plans
    two output classes, trains, validates and predicts; the held-out test phantoms (fully labelled) get the
    cord, and no prediction ever holds the ignore value."""
    from conftest import planned_phantoms
    from test_training import tiny_plan

    from spineauto.datasets.phantoms import write_phantom_dataset
    from spineauto.evaluation.evaluate import evaluate_folders, labels_from_dataset_json
    from spineauto.plan_and_preprocess import plan_and_preprocess
    from spineauto.planning.plans import Plans
    from spineauto.training.trainer import TrainOptions, train_fold

    torch.set_num_threads(1)
    raw = tmp_path / "raw" / "Dataset001_Ph"
    write_phantom_dataset(raw, n_train=8, n_test=2, seed=3, lesions=False)
    meta = json.loads((raw / "dataset.json").read_text())
    meta["labels"]["ignore"] = 2
    (raw / "dataset.json").write_text(json.dumps(meta))
    cord_labelled = 0
    for f in sorted((raw / "labelsTr").glob("*.nii.gz")):
        img = nib.load(str(f))
        seg = np.asanyarray(img.dataobj).copy()
        seg[: seg.shape[0] // 2] = 2
        cord_labelled += int((seg == 1).sum())
        nib.save(nib.Nifti1Image(seg, img.affine, img.header), str(f))
    assert cord_labelled > 0
    with pytest.MonkeyPatch.context() as mp:
        for kind in ("raw", "preprocessed", "results"):
            (tmp_path / kind).mkdir(exist_ok=True)
            mp.setenv(f"SPINEAUTO_{kind.upper()}", str(tmp_path / kind))
        mp.setenv("WANDB_MODE", "disabled")
        plan_and_preprocess(1, workers=1)
        plans_path = tmp_path / "preprocessed" / "Dataset001_Ph" / "plans.json"
        tiny_plan(plans_path)
        plans = Plans.load(plans_path)
        assert plans.ignore_label == 2 and plans.num_classes == 2  # background and cord: ignore is no output
        fold = train_fold(1, "2d", "all", TrainOptions(epochs=5, iters_per_epoch=20, val_iters=1, wandb="disabled", num_workers=0,
                                                       validate=False))
        code, out, err = run_cli(capsys, "predict", "-d", "1", "-c", "2d", "-f", "all", "-i", str(raw / "imagesTs"),
                                 "-o", str(tmp_path / "pred"), "--device", "cpu", "--no-tta")
        assert code == 0, err
    history = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    preds = sorted((tmp_path / "pred").glob("*.nii.gz"))
    assert len(preds) == 2 and all(2 not in np.unique(np.asanyarray(nib.load(str(p)).dataobj)) for p in preds)
    summary = evaluate_folders(tmp_path / "pred", raw / "labelsTs", labels_from_dataset_json(meta))
    assert summary["mean"]["cord"]["dice"] > 0.6, summary["mean"]
