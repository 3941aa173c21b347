"""Classification building blocks: metrics, labels files, slice aggregation, CSV, templates, the 2D
image-folder converter and the bad-input checks of plan_and_preprocess (fast, no training)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from spineauto.datasets.dataset_json import load_dataset_json
from spineauto.evaluation.classification import (evaluate_classification, head_metrics, plot_confusion, read_labels,
                                                  read_predictions)
from spineauto.inference.classify import CaseClassification, aggregate_slices, write_case_json, write_classification_csv

REPO = Path(__file__).resolve().parents[1]


def test_metrics_match_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    t = rng.integers(0, 4, 200)
    p = np.where(rng.random(200) < 0.6, t, rng.integers(0, 4, 200))
    t[t == 3] = 2  # class 3 absent from the truth: excluded from balanced accuracy and macro-F1
    m = head_metrics(t, p, ["a", "b", "c", "d"], "h")
    assert m.accuracy == pytest.approx(sk.accuracy_score(t, p))
    assert m.balanced_accuracy == pytest.approx(sk.balanced_accuracy_score(t, p))
    assert m.macro_f1 == pytest.approx(sk.f1_score(t, p, labels=[0, 1, 2], average="macro"))
    assert np.array_equal(m.confusion, sk.confusion_matrix(t, p, labels=[0, 1, 2, 3]))
    assert m.per_class_recall["d"] is None and sum(map(sum, m.confusion)) == 200


def test_hand_computed_metrics_and_png(tmp_path):
    # truth a a a b, predicted a a b b: recall a 2/3, b 1; precision a 1, b 1/2
    m = head_metrics([0, 0, 0, 1], [0, 0, 1, 1], ["a", "b"], "view")
    assert m.accuracy == 0.75 and m.balanced_accuracy == pytest.approx((2 / 3 + 1) / 2)
    assert m.macro_f1 == pytest.approx((0.8 + 2 / 3) / 2)
    assert m.confusion == [[2, 1], [0, 1]]
    png = plot_confusion(m, tmp_path / "cm.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_aggregation_json_csv_and_evaluation_round_trip(tmp_path):
    slices = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    v = aggregate_slices(slices)
    assert v.sum() == pytest.approx(1.0) and v[0] == pytest.approx(1.7 / 3)
    results = [CaseClassification(f"c{i}", {"view": np.array([p, 1 - p], np.float32)}, {"view": ["axial", "sagittal"]}, 3)
               for i, p in enumerate([0.9, 0.2, 0.7])]
    for r in results:
        write_case_json(tmp_path, r)
    write_classification_csv(tmp_path, results[:2])
    write_classification_csv(tmp_path, results[2:])  # a rerun adds rows, keeps the others
    rows = list(csv.DictReader(open(tmp_path / "classification.csv")))
    assert [r["case"] for r in rows] == ["c0", "c1", "c2"] and rows[1]["view"] == "sagittal"
    assert float(rows[0]["view_p_axial"]) + float(rows[0]["view_p_sagittal"]) == pytest.approx(1.0)
    assert read_predictions(tmp_path) == {"c0": {"view": "axial"}, "c1": {"view": "sagittal"}, "c2": {"view": "axial"}}
    (tmp_path / "labels.csv").write_text("case,head,class\nc0,view,axial\nc1,view,axial\nc2,view,axial\nc9,view,axial\n")
    report = evaluate_classification(read_predictions(tmp_path), read_labels(tmp_path / "labels.csv"), {"view": ["axial", "sagittal"]})
    assert report.heads["view"].confusion == [[2, 1], [0, 0]] and report.missing == ["c9"]


@pytest.mark.parametrize("template", sorted(p.name for p in (REPO / "raw_data_templates").iterdir() if p.is_dir()))
def test_templates_are_valid_dataset_json(template):
    info = load_dataset_json(REPO / "raw_data_templates" / template)
    for case in info.cases.values():
        assert set(case.classes) == set(info.heads) and all(case.classes[h] in info.heads[h] for h in info.heads)
    assert info.has_segmentation == ("segmentation" in template or template == "multitask")


def _write_pictures(root: Path, classes=("disc", "square"), n=4, test=1):
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :48]
    for split, k in (("train", n), ("test", test)):
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(k):
                a = (rng.random((40, 48)) * 60).astype(np.uint8)
                if cls == "disc":
                    a[(yy - 20) ** 2 + (xx - 24) ** 2 < 100] = 220
                else:
                    a[10:30, 14:34] = 220
                Image.fromarray(a).save(d / f"img{i}.{'png' if i % 2 else 'jpg'}")


@pytest.fixture
def picture_dataset(tmp_path, spineauto_env, capsys):
    _write_pictures(tmp_path / "pictures")
    code, _, err = run_cli(capsys, "convert", "images", tmp_path / "pictures", "-d", 7, "--name", "Pictures", "--head", "shape")
    assert code == 0, err
    return spineauto_env["raw"] / "Dataset007_Pictures"


def test_image_folder_converts_and_plans_a_cls_configuration(picture_dataset, spineauto_env, capsys):
    info = load_dataset_json(picture_dataset)
    assert info.heads == {"shape": ["disc", "square"]} and len(info.training_cases()) == 8 and len(info.test_cases()) == 2
    code, _, err = run_cli(capsys, "plan_and_preprocess", "-d", 7, "-np", 1)
    assert code == 0, err
    plans = json.loads((spineauto_env["preprocessed"] / "Dataset007_Pictures" / "plans.json").read_text())
    assert list(plans["configurations"]) == ["cls"]
    case = info.training_cases()[0]
    data = np.load(spineauto_env["preprocessed"] / "Dataset007_Pictures" / "2d" / f"{case}.npy")
    assert data.shape[:2] == (1, 1)  # one slice: the picture
    props = json.loads((spineauto_env["preprocessed"] / "Dataset007_Pictures" / "2d" / f"{case}.json").read_text())
    assert props["classes"]["shape"] == info.cases[case].classes["shape"]


def _edit_cases(folder: Path, fn) -> None:
    ds = json.loads((folder / "dataset.json").read_text())
    fn(ds)
    (folder / "dataset.json").write_text(json.dumps(ds))


@pytest.mark.parametrize("edit,expected", [
    (lambda ds: ds["cases"][sorted(ds["cases"])[0]]["classes"].update(shape="triangle"), "'triangle' for head 'shape', not declared"),
    (lambda ds: ds["cases"][sorted(ds["cases"])[0]]["classes"].pop("shape"), "has no label for head 'shape'"),
    (lambda ds: ds["heads"].update(shape=["disc"]), "single class"),
])
def test_bad_class_labels_fail_in_one_line(picture_dataset, capsys, edit, expected):
    _edit_cases(picture_dataset, edit)
    code, out, err = run_cli(capsys, "plan_and_preprocess", "-d", 7, "-np", 1)
    assert code == 1 and expected in err and "Traceback" not in err + out
    assert "error:" in err


def test_single_class_folder_is_refused(tmp_path, spineauto_env, capsys):
    _write_pictures(tmp_path / "one", classes=("disc",))
    code, _, err = run_cli(capsys, "convert", "images", tmp_path / "one", "-d", 8, "--name", "One")
    assert code == 1 and "only one class folder" in err and "Traceback" not in err


def _cls_plan(task="classification"):
    from spineauto.planning.plans import ConfigurationPlan, HeadPlan, NetworkPlan

    return ConfigurationPlan(name="cls", task=task, data_identifier="2d", slicing="per_case", isotropic_plane="axial",
                             target_spacing=[1.0, 1.0], patch_size=[32, 32], batch_size=2, normalization=["ZScoreNormalization"],
                             use_mask_for_norm=[False], network=NetworkPlan(), heads=[HeadPlan("view", ["axial", "sagittal"], [1.0, 1.0])])


class _Fixed:
    """A stand-in network: classification logits (slice-window mean * scale, 0); with ``seg``, the
    window itself as foreground logits; counts the windows it sees."""

    def __new__(cls, scale, seg=False):
        import torch

        class Fixed(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.windows = 0

            def forward(self, x):
                assert tuple(x.shape[-2:]) == (32, 32)  # the training patch
                self.windows += x.shape[0]
                m = x.mean(dim=(1, 2, 3)) * scale
                out = {"cls": {"view": torch.stack([m, torch.zeros_like(m)], 1)}}
                if seg:
                    out["seg"] = torch.cat([torch.zeros_like(x[:, :1]), 4 * x[:, :1] - 2], 1)
                return out
        return Fixed()


def test_slice_probabilities_average_windows_and_folds():
    from spineauto.inference.classify import aggregate_slices
    from spineauto.inference.predictor import run_networks

    plan = _cls_plan()
    nets = [_Fixed(1.0), _Fixed(3.0)]
    data = np.zeros((1, 2, 20, 20), np.float32)
    data[0, 1] = 1.0  # slice 0: logits (0, 0); slice 1: (scale * 400/1024, 0) after centred padding to the patch
    out = run_networks(nets, data, plan, "cpu", tta=False)
    assert out.seg is None and all(n.windows == 2 for n in nets)  # one window per slice, each network once
    p = aggregate_slices(out.cls["view"])
    m = 400 / 1024
    p1 = [1 / (1 + np.exp(-m * s)) for s in (1.0, 3.0)]  # P(axial) of slice 1 per network
    assert p[0] == pytest.approx((0.5 + np.mean(p1)) / 2, abs=1e-5) and p.sum() == pytest.approx(1.0)
    big = np.zeros((1, 3, 40, 64), np.float32)
    big[0, :, :, :32] = 1.0  # windows at x 0, 16, 32 (and y 0, 8): their mean over the slice's windows
    one = _Fixed(1.0)
    cls = run_networks([one], big, plan, "cpu", tta=False, batch_slices=2).cls["view"]
    steps_mean = np.mean([1 / (1 + np.exp(-v)) for v in (1.0, 0.5, 0.0)])  # windows fully, half, not inside the bright part
    assert cls.shape == (3, 2) and cls[:, 0] == pytest.approx([steps_mean] * 3, abs=1e-5)
    assert one.windows == 3 * 2 * 3  # 3 slices x 2 x 3 windows
    # run a slice at a time (slabs of one slice): the same slice probabilities, in slice order
    from spineauto.inference import predictor

    big[0, 1] *= 2  # slice 1 differs from the others
    whole = run_networks([one], big, plan, "cpu", tta=False).cls["view"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(predictor, "SLAB_PIXELS", 40 * 64)
        sliced = run_networks([one], big, plan, "cpu", tta=False, batch_slices=4).cls["view"]
    np.testing.assert_allclose(sliced, whole, atol=1e-6)
    assert whole[1, 0] > whole[0, 0] + 0.05 and whole[0, 0] == pytest.approx(whole[2, 0], abs=1e-6)


def test_multitask_runs_each_window_through_the_networks_once():
    """Masks and classes of a multitask model come from one pass: every window is seen once per
    network and mirror, not once for the masks and again for the classes."""
    from spineauto.inference.predictor import mirror_combinations, run_networks

    plan = _cls_plan("multitask")
    net = _Fixed(1.0, seg=True)
    data = np.zeros((1, 4, 20, 20), np.float32)
    data[0, :, 5:15, 5:15] = 1.0
    out = run_networks([net], data, plan, "cpu", tta=True)
    assert net.windows == 4 * (1 + len(mirror_combinations(plan.augmentation.mirror_axes)))  # 4 slices, 1 window each
    assert out.seg.shape == (2, 4, 20, 20) and out.cls["view"].shape == (4, 2)
    fg = out.seg[1].numpy() > 0.5
    assert fg[:, 5:15, 5:15].all() and not fg[:, :5].any()  # the bright square is the foreground, in place
