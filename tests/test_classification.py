"""Classification and multitask through the real commands on phantoms: train (the one loop), predict,
evaluate, encoder transfer into a segmentation U-Net, presets applied to the planned configurations.

The phantoms' view head (axial vs sagittal slices) is easy: a short CPU run must classify held-out
phantoms correctly. The networks are shrunk in plans.json (a plan file is meant to be edited) so
the whole file runs in about a minute and a half on two cores.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from spineauto.planning.plans import Plans

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]


def shrink_plans(path: Path, batch_size: int = 8, lr: float = 2e-3) -> None:
    d = json.loads(path.read_text())
    for cfg in d["configurations"].values():
        cfg["network"]["features_per_stage"] = [min(8 * 2 ** i, 64) for i in range(len(cfg["network"]["features_per_stage"]))]
        cfg["batch_size"] = batch_size
        cfg["optim"].update(optimizer="adam", initial_lr=lr, weight_decay=0.0, schedule="constant")
    path.write_text(json.dumps(d, indent=1))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from spineauto.datasets.phantoms import write_phantom_dataset

    root = tmp_path_factory.mktemp("cls")
    mp = pytest.MonkeyPatch()
    for kind in ("raw", "preprocessed", "results"):
        (root / kind).mkdir()
        mp.setenv(f"SPINEAUTO_{kind.upper()}", str(root / kind))
    mp.setenv("WANDB_MODE", "disabled")
    raw = write_phantom_dataset(root / "raw" / "Dataset021_ClsPhantoms", n_train=12, n_test=6, seed=3)
    from spineauto.plan_and_preprocess import plan_and_preprocess

    plan_and_preprocess(21, workers=2)
    pre = root / "preprocessed" / "Dataset021_ClsPhantoms"
    shrink_plans(pre / "plans.json")
    yield {"root": root, "raw": raw, "pre": pre, "results": root / "results" / "Dataset021_ClsPhantoms"}
    mp.undo()


def _train(capsys, *args):
    code, out, err = run_cli(capsys, "train", "-d", 21, "--device", "cpu", "--wandb", "disabled", "--num-workers", 0, *args)
    assert code == 0, err[-3000:]
    return err


@pytest.fixture(scope="module")
def cls_model(phantoms):
    capsys = _NoCapture()
    _train(capsys, "-f", "all", "-c", "cls", "--epochs", 4, "--iters-per-epoch", 25, "--val-iters", 3)
    return phantoms["results"] / "spineautoTrainer__spineautoPlans__cls"


class _NoCapture:  # module-scoped fixtures cannot use capsys
    def readouterr(self):
        class R:
            out = err = ""
        return R()


def test_cls_trains_in_the_one_loop_with_classification_metrics(phantoms, cls_model):
    fold = cls_model / "fold_all"
    for name in ("checkpoint_final.pt", "checkpoint_best.pt", "checkpoints_top.json", "progress.png", "confusion_view.png",
                 "validation/summary_classification.json", "validation/classification.csv", "validation/confusion_view.png"):
        assert (fold / name).is_file(), name
    top = json.loads((fold / "checkpoints_top.json").read_text())
    assert top["monitor"] == "ema_balanced_accuracy" and 1 <= len(top["checkpoints"]) <= 4
    records = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and records[-1]["monitor"] == "balanced_accuracy"
    for key in ("view/balanced_accuracy", "view/macro_f1", "view/recall_axial", "sequence/accuracy", "balanced_accuracy"):
        assert 0.0 <= records[-1][key] <= 1.0, key
    ckpt = torch.load(fold / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert ckpt["task"] == "classification" and any(k.startswith("heads.view.") for k in ckpt["network"])
    assert not any(k.startswith("decoder.") for k in ckpt["network"])
    summary = json.loads((fold / "validation" / "summary_classification.json").read_text())
    cm = np.array(summary["heads"]["view"]["confusion"])
    assert cm.sum() == 12  # fold all: every training case validated as a whole volume


def test_cls_predicts_held_out_phantoms_and_evaluates(phantoms, cls_model, tmp_path, capsys):
    out = tmp_path / "pred"
    code, _, err = run_cli(capsys, "predict", "-d", 21, "-c", "cls", "-i", phantoms["raw"] / "imagesTs", "-o", out, "--device", "cpu")
    assert code == 0, err
    test_cases = sorted(p.name[:-12] for p in (phantoms["raw"] / "imagesTs").glob("*_0000.nii.gz"))
    rows = list(csv.DictReader(open(out / "classification.csv")))
    assert [r["case"] for r in rows] == test_cases
    heads = json.loads((phantoms["raw"] / "dataset.json").read_text())["heads"]
    for r in rows:
        for head, classes in heads.items():
            p = [float(r[f"{head}_p_{c}"]) for c in classes]
            assert sum(p) == pytest.approx(1.0, abs=1e-4) and r[head] == classes[int(np.argmax(p))]
    case_json = json.loads((out / f"{test_cases[0]}.json").read_text())
    assert case_json["kind"] == "spineauto.classification" and case_json["folds"] == ["fold_all"]
    assert not list(out.glob("*.nii.gz"))  # a classifier writes no masks

    code, _, err = run_cli(capsys, "evaluate", out, phantoms["raw"] / "dataset.json")
    assert code == 0, err
    summary = json.loads((out / "summary_classification.json").read_text())
    view = summary["heads"]["view"]
    assert np.array(view["confusion"]).sum() == len(test_cases)
    assert view["balanced_accuracy"] >= 0.8, view  # axial vs sagittal slices: easy
    assert (out / "confusion_view.png").is_file()
    # a CSV labels file works the same
    labels = tmp_path / "labels.csv"
    labels.write_text("case,head,class\n" + "".join(f"{c},view,{json.loads((out / f'{c}.json').read_text())['heads']['view']['class']}\n"
                                                    for c in test_cases))
    code, _, err = run_cli(capsys, "evaluate", out, labels, "-o", tmp_path / "csv_eval" / "summary.json")
    assert code == 0, err
    assert json.loads((tmp_path / "csv_eval" / "summary_classification.json").read_text())["heads"]["view"]["accuracy"] == 1.0


def test_cls_encoder_transfers_into_a_segmentation_unet(phantoms, cls_model, capsys):
    from spineauto.networks.build import build_network
    from spineauto.training.checkpoint import load_pretrained

    plans = Plans.load(phantoms["pre"] / "plans.json")
    net = build_network(plans.configuration("2d"), 1, plans.num_classes)
    source = torch.load(cls_model / "fold_all" / "checkpoint_final.pt", map_location="cpu", weights_only=False)["network"]
    loaded, skipped = load_pretrained(net, cls_model / "fold_all" / "checkpoint_final.pt")
    encoder = {k for k in net.state_dict() if k.startswith("encoder.")}
    assert set(loaded) == encoder  # exactly the encoder: nothing of the heads, nothing missing
    decoder_own = {k for k in net.state_dict() if k.startswith("decoder.") and not k.startswith("decoder.encoder.")}
    assert set(skipped) == decoder_own  # decoder.encoder.* are the same tensors as encoder.*: loaded, not skipped
    for k in sorted(encoder)[:5]:
        assert torch.equal(net.state_dict()[k], source[k])

    err = _train(capsys, "-f", "all", "-c", "2d", "--epochs", 1, "--iters-per-epoch", 2, "--val-iters", 1, "--no-validate",
                 "--pretrained", cls_model / "fold_all" / "checkpoint_final.pt")
    assert f"loaded {len(encoder)} tensors" in err.replace("\n", " ")
    fold = phantoms["results"] / "spineautoTrainer__spineautoPlans__2d" / "fold_all"
    assert json.loads((fold / "config.json").read_text())["runtime"]["pretrained"].endswith("checkpoint_final.pt")


def test_pretrained_encoder_that_does_not_fit_fails_in_one_line(phantoms, tmp_path, capsys):
    from spineauto.networks.build import build_network

    plans = Plans.load(phantoms["pre"] / "plans.json")
    other = plans.configuration("cls")
    other.network.features_per_stage = [max(1, f // 2) for f in other.network.features_per_stage]
    bad = tmp_path / "other.pt"
    torch.save({"network": build_network(other, 1, 0).state_dict()}, bad)
    code, out, err = run_cli(capsys, "train", "-d", 21, "-f", "all", "-c", "2d", "--device", "cpu", "--wandb", "disabled",
                             "--epochs", 1, "--iters-per-epoch", 1, "--pretrained", bad)
    assert code == 1 and "Traceback" not in out + err
    line = " ".join(err.split())
    assert "encoder tensor(s) do not match" in line and "encoder.stages.0.0.convs.0.conv.weight" in line

    shallow = Plans.load(phantoms["pre"] / "plans.json").configuration("cls")  # one stage fewer: the first stages fit, the last is absent
    net = shallow.network
    for name in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage"):
        setattr(net, name, getattr(net, name)[:-1])
    net.n_conv_per_stage_decoder = net.n_conv_per_stage_decoder[:-1]
    torch.save({"network": build_network(shallow, 1, 0).state_dict()}, bad)
    code, out, err = run_cli(capsys, "train", "-d", 21, "-f", "all", "-c", "2d", "--device", "cpu", "--wandb", "disabled",
                             "--epochs", 1, "--iters-per-epoch", 1, "--pretrained", bad)
    line = " ".join(err.split())
    assert code == 1 and "Traceback" not in out + err and "(absent)" in line and "encoder.stages.4" in line


def test_multitask_trains_and_predicts_masks_and_classes(phantoms, tmp_path, capsys):
    _train(capsys, "-f", "all", "-c", "multitask", "--epochs", 2, "--iters-per-epoch", 4, "--val-iters", 2, "--no-validate",
           "--amp")  # the AMP path (bf16 autocast on CPU) with both losses
    model = phantoms["results"] / "spineautoTrainer__spineautoPlans__multitask"
    assert json.loads((model / "fold_all" / "config.json").read_text())["runtime"]["amp_dtype"] == "bfloat16"
    records = [json.loads(line) for line in (model / "fold_all" / "metrics.jsonl").read_text().splitlines()]
    for key in ("pseudo_dice", "pseudo_dice_cord", "view/balanced_accuracy", "multitask_score"):
        assert key in records[-1], key
    assert json.loads((model / "fold_all" / "checkpoints_top.json").read_text())["monitor"] == "ema_multitask_score"
    out = tmp_path / "pred"
    code, _, err = run_cli(capsys, "predict", "-d", 21, "-c", "multitask", "-i", phantoms["raw"] / "imagesTs", "-o", out,
                           "--device", "cpu", "--no-tta")
    assert code == 0, err
    import nibabel as nib

    cases = sorted(p.name[:-12] for p in (phantoms["raw"] / "imagesTs").glob("*_0000.nii.gz"))
    for case in cases:
        mask = nib.load(out / f"{case}.nii.gz")
        assert mask.shape == nib.load(phantoms["raw"] / "imagesTs" / f"{case}_0000.nii.gz").shape
        info = json.loads((out / f"{case}.json").read_text())
        assert info["mask"] == f"{case}.nii.gz" and set(info["heads"]) == {"sequence", "view", "location"}
    assert len(list(csv.DictReader(open(out / "classification.csv")))) == len(cases)


@pytest.mark.parametrize("preset,configuration,check", [
    ("anatomy_classification", "cls", lambda c: c.network.architecture == "resenc_unet" and c.optim.optimizer == "adam"),
    ("spine_location_view", "cls", lambda c: c.augmentation.mirror_axes == [] and c.loss.label_smoothing == 0.1),
    ("sequence_classification", "cls", lambda c: c.augmentation.gamma_range == [0.9, 1.1]),
    ("spinal_cord_classification", "cls", lambda c: c.augmentation.mirror_axes == [1] and c.network.dropout == 0.1),
    ("spinal_cord_segmentation", "2d_resenc", lambda c: c.network.architecture == "resenc_unet" and c.optim.optimizer == "adam"),
    ("lesion_segmentation", "2d", lambda c: c.foreground_oversampling == 0.66 and c.loss.ce_weight == 0.5),
])
def test_presets_apply_to_the_planned_configurations(phantoms, preset, configuration, check):
    from spineauto.networks.build import build_network
    from spineauto.planning.presets import apply_preset

    plans = apply_preset(Plans.load(phantoms["pre"] / "plans.json"), REPO / "plans" / f"{preset}.yaml")
    cfg = plans.configuration(configuration)
    assert check(cfg) and plans.preset == f"{preset}.yaml"
    assert any(v == f"preset {preset}.yaml" for v in cfg.reasons.values())
    assert set(plans.configurations) >= {"2d", "cls", "multitask"}  # the others are kept
    net = build_network(cfg, 1, plans.num_classes)  # the preset yields a buildable network
    out = net(torch.zeros(1, 1, *cfg.patch_size))
    assert ("cls" in out) == cfg.has_classification and ("seg" in out) == cfg.has_segmentation


def test_foundation_pretraining_on_pictures_transfers_into_the_cord_preset(phantoms, tmp_path, capsys):
    """The original framework's foundation stage: a classifier on 2D pictures (image folder, anatomy
    preset), whose encoder initialises the spinal-cord preset's residual-encoder U-Net of another dataset."""
    from PIL import Image

    from spineauto.networks.build import build_network
    from spineauto.planning.presets import apply_preset
    from spineauto.training.checkpoint import load_pretrained

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    for cls in ("brain", "spine"):
        (tmp_path / "pictures" / cls).mkdir(parents=True)
        for i in range(3):
            a = (rng.random((64, 64)) * 60).astype(np.uint8)
            a[((yy - 32) ** 2 + (xx - 32) ** 2 < 400) if cls == "brain" else (np.abs(xx - 32) < 5)] = 220
            Image.fromarray(a).save(tmp_path / "pictures" / cls / f"{i}.png")
    assert run_cli(capsys, "convert", "images", tmp_path / "pictures", "-d", 22, "--name", "Foundation", "--head", "anatomy")[0] == 0
    code, _, err = run_cli(capsys, "plan_and_preprocess", "-d", 22, "-np", 1, "--preset", REPO / "plans" / "anatomy_classification.yaml")
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "-d", 22, "-f", "all", "-c", "cls", "--device", "cpu", "--wandb", "disabled",
                           "--num-workers", 0, "--epochs", 1, "--iters-per-epoch", 1, "--val-iters", 1, "--no-validate")
    assert code == 0, err[-2000:]
    ckpt = phantoms["root"] / "results" / "Dataset022_Foundation" / "spineautoTrainer__spineautoPlans__cls" / "fold_all" / "checkpoint_final.pt"

    cord = apply_preset(Plans.load(phantoms["pre"] / "plans.json"), REPO / "plans" / "spinal_cord_segmentation.yaml")
    net = build_network(cord.configuration("2d_resenc"), 1, cord.num_classes)
    loaded, skipped = load_pretrained(net, ckpt)
    assert set(loaded) == {k for k in net.state_dict() if k.startswith("encoder.")}
    assert skipped and all(k.startswith("decoder.") for k in skipped)
