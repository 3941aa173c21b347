"""Region-based labels as nnU-Net trains them: dataset.json regions with regions_class_order, sigmoid
outputs (Dice + BCE per region), per-region Dice, predictions painted back into label values.
The spine example: cord = {1, 2} contains lesion = {2}."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spineauto.errors import SpineautoError

REGIONS = {"labels": {"background": 0, "cord": [1, 2], "lesion": 2}, "regions_class_order": [1, 2]}


def _dataset_json(folder: Path, **keys) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz", **keys}))
    return folder


def test_region_labels_are_read_with_their_painting_order(tmp_path):
    from spineauto.datasets.dataset_json import load_dataset_json

    info = load_dataset_json(_dataset_json(tmp_path / "D", **REGIONS))
    assert info.labels == {"background": 0, "cord": 1, "lesion": 2}
    assert info.regions == {"cord": [1, 2], "lesion": [2]} and info.label_values == [0, 1, 2]


@pytest.mark.parametrize("keys,message", [
    ({"labels": REGIONS["labels"]}, r"'regions_class_order' must list the value each of the 2 region\(s\) \['cord', 'lesion'\] is written as"),
    ({**REGIONS, "regions_class_order": [1, 3]}, r"each of 1..2 once .*not \[1, 3\]"),
    ({"labels": {"background": 0, "cord": [1, -2]}, "regions_class_order": [1]}, r"region 'cord' must be a value > 0 or a list of them"),
    ({"labels": {"background": 0, "cord": 1}, "regions_class_order": [1]}, r"'regions_class_order' is given but no label is a region"),
])
def test_bad_region_declarations_are_refused_in_one_line(tmp_path, keys, message):
    from spineauto.datasets.dataset_json import load_dataset_json

    with pytest.raises(SpineautoError, match=message):
        load_dataset_json(_dataset_json(tmp_path / "D", **keys))


def test_region_probabilities_paint_labels_exactly_as_nnunet():
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from spineauto.networks.outputs import regions_to_labels, seg_labels

    g = torch.Generator().manual_seed(0)
    p = torch.rand(1, 3, 40, 50, generator=g)  # channel 0 unused; 1 = cord, 2 = lesion
    ours = regions_to_labels(p, [1, 2]).argmax(1)[0]
    nnunet = LabelManager(REGIONS["labels"], REGIONS["regions_class_order"]).convert_probabilities_to_segmentation(p[0, 1:])
    assert torch.equal(ours, torch.as_tensor(nnunet).long())
    assert set(ours.unique().tolist()) == {0, 1, 2}
    # painted in the other order, a voxel of both regions becomes cord
    both = torch.tensor([0.0, 0.9, 0.8]).view(1, 3, 1, 1)
    assert regions_to_labels(both, [1, 2]).argmax(1).item() == 2 and regions_to_labels(both, [2, 1]).argmax(1).item() == 1
    assert seg_labels(torch.logit(both), "sigmoid", [1, 2]).item() == 2


def test_region_targets_train_each_channel_on_every_value_of_its_region():
    from spineauto.training.losses import RegionTargets

    seen = {}

    def capture(logits, target):
        seen["target"] = target
        return logits.sum() * 0

    target = torch.tensor([0, 1, 2]).view(1, 1, 1, 3)
    RegionTargets(capture, [[1, 2], [2]])(torch.zeros(1, 3, 1, 3), target)
    assert seen["target"][0, :, 0].tolist() == [[0, 1, 1], [0, 0, 1]]  # cord = {1, 2}, lesion = {2}


def test_a_region_dataset_trains_with_sigmoid_outputs_and_predicts_painted_labels(tmp_path, spineauto_env):
    import nibabel as nib

    from spineauto.datasets.phantoms import write_phantom_dataset
    from spineauto.inference.model import load_model
    from spineauto.inference.predict import predict_folder
    from spineauto.plan_and_preprocess import plan_and_preprocess
    from spineauto.planning.plans import Plans
    from spineauto.training.trainer import TrainOptions, train_fold
    from test_training import tiny_plan

    torch.set_num_threads(1)
    raw = spineauto_env["raw"] / "Dataset005_Regions"
    write_phantom_dataset(raw, n_train=6, n_test=2, seed=5, views=("axial",))
    meta = json.loads((raw / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "cord": 1, "lesion": 2}  # a lesion voxel is 2 inside the cord's 1
    (raw / "dataset.json").write_text(json.dumps({**meta, **REGIONS}))
    plan_and_preprocess(5, workers=1)
    plans_path = spineauto_env["preprocessed"] / "Dataset005_Regions" / "plans.json"
    plans = Plans.load(plans_path)
    cfg = plans.configuration("2d")
    assert plans.regions == {"cord": [1, 2], "lesion": [2]} and plans.region_order == [1, 2]
    assert cfg.loss.name == "dice_bce" and cfg.network.output_activation == "sigmoid" and "multitask" not in plans.configurations
    tiny_plan(plans_path)
    fold = train_fold(5, "2d", "all", TrainOptions(epochs=3, iters_per_epoch=10, val_iters=1, num_workers=0, validate=True, wandb="disabled"))
    history = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
    assert {"pseudo_dice_cord", "pseudo_dice_lesion"} <= set(history[-1])
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"cord", "lesion"} and summary["mean"]["cord"] > 0.5  # the cord region: values 1 and 2
    out = tmp_path / "pred"
    predict_folder(load_model(fold.parent, folds=["all"]), raw / "imagesTs", out, tta=False)
    for mask in sorted(out.glob("*.nii.gz")):
        labels = np.asarray(nib.load(mask).dataobj)
        truth = np.asarray(nib.load(raw / "labelsTs" / mask.name).dataobj)
        assert set(np.unique(labels).tolist()) <= {0, 1, 2}
        cord_p, cord_t = labels > 0, truth > 0
        assert 2 * (cord_p & cord_t).sum() / (cord_p.sum() + cord_t.sum()) > 0.5, mask.name
