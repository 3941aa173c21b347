"""ResNet encoders: torchvision names, any input channels, any patch size; torchvision/RadImageNet
state dicts through ``--pretrained`` (first convolution folded, depth mismatches named); a
``resnet_unet`` segmentation plan trains, checkpoints, predicts and bundles like the other networks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from conftest import planned_phantoms, remove_tree, run_cli
from spineauto.errors import SpineautoError
from spineauto.networks.build import build_network
from spineauto.planning.plans import ConfigurationPlan, HeadPlan, NetworkPlan


def _plan(task: str, architecture: str = "resnet_unet", depth: int = 18, n_stages: int = 5) -> ConfigurationPlan:
    net = NetworkPlan(architecture=architecture, depth=depth, features_per_stage=[8] * n_stages, kernel_sizes=[[3, 3]] * n_stages,
                      strides=[[1, 1]] + [[2, 2]] * (n_stages - 1), n_conv_per_stage=[2] * n_stages,
                      n_conv_per_stage_decoder=[2] * (n_stages - 1))
    heads = [HeadPlan("view", ["axial", "sagittal", "coronal"], [1.0] * 3)] if task != "segmentation" else []
    return ConfigurationPlan(name="x", task=task, data_identifier="d", slicing="axial", isotropic_plane="axial", target_spacing=[1, 1],
                             patch_size=[64, 64], batch_size=2, normalization=["ZScoreNormalization"], use_mask_for_norm=[False],
                             network=net, heads=heads)


def test_resnet_unet_any_patch_size_and_deep_supervision():
    torch.manual_seed(0)
    net = build_network(_plan("multitask", n_stages=4), in_channels=2, num_classes=3).eval()
    out = net(torch.randn(2, 2, 70, 45))  # not a multiple of 32: padded inside, cropped back
    assert [tuple(o.shape) for o in out["seg"]] == [(2, 3, 70, 45), (2, 3, 35, 23), (2, 3, 18, 12)]  # n_stages - 1 outputs
    assert tuple(out["cls"]["view"].shape) == (2, 3)
    net.set_deep_supervision(False)
    assert tuple(net(torch.randn(1, 2, 64, 64))["seg"].shape) == (1, 3, 64, 64)
    # torchvision's names, nothing of ours in the encoder: a torchvision state dict covers it exactly
    tv = {f"encoder.{k}" for k in torchvision.models.resnet50(weights=None).state_dict() if not k.startswith("fc.")}
    r50 = build_network(_plan("classification", "resnet", depth=50), 3, 2)
    assert {k for k in r50.state_dict() if k.startswith("encoder.")} == tv
    assert r50.encoder.output_channels[-1] == 2048 and r50.decoder is None


def _torchvision_file(tmp_path: Path, depth: int, form: str = "plain") -> tuple[Path, dict]:
    torch.manual_seed(depth)
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    state = model.state_dict()
    if form == "sequential":  # RadImageNet-style: nn.Sequential(*children()[:-2]) under a "backbone." prefix
        state = {f"backbone.{k}": v for k, v in torch.nn.Sequential(*list(model.children())[:-2]).state_dict().items()}
    path = tmp_path / f"resnet{depth}_{form}.pth"
    torch.save(state, path)
    return path, model.state_dict()


@pytest.mark.parametrize("form", ["plain", "sequential"])
def test_torchvision_state_dict_loads_with_rgb_folded(tmp_path, form, caplog):
    from spineauto.training.checkpoint import load_pretrained

    path, ref = _torchvision_file(tmp_path, 18, form)
    net = build_network(_plan("segmentation"), in_channels=1, num_classes=2)
    with caplog.at_level("INFO"):
        loaded, skipped = load_pretrained(net, path)
    state = net.state_dict()
    assert torch.allclose(state["encoder.conv1.weight"], ref["conv1.weight"].sum(1, keepdim=True))  # RGB summed into 1 channel
    assert torch.equal(state["encoder.layer4.1.conv2.weight"], ref["layer4.1.conv2.weight"])
    assert torch.equal(state["encoder.bn1.running_var"], ref["bn1.running_var"])
    assert len(loaded) == len([k for k in ref if not k.startswith("fc.")])  # every encoder tensor, fc left out
    assert skipped and all(k.startswith("decoder.") for k in skipped)
    assert "ResNet-18 state dict for a ResNet-18 encoder" in caplog.text and "conv1 folded from 3 (RGB) to 1" in caplog.text
    # three channels as in the file: copied unchanged; two: repeated and scaled by 3/2
    net3 = build_network(_plan("classification", "resnet"), in_channels=3, num_classes=2)
    load_pretrained(net3, path)
    assert torch.equal(net3.state_dict()["encoder.conv1.weight"], ref["conv1.weight"])
    net2 = build_network(_plan("classification", "resnet"), in_channels=2, num_classes=2)
    load_pretrained(net2, path)
    assert torch.allclose(net2.state_dict()["encoder.conv1.weight"], ref["conv1.weight"][:, :2] * 1.5)


def test_depth_mismatch_and_non_checkpoint_refused_in_one_line(tmp_path):
    from spineauto.training.checkpoint import load_pretrained

    path, _ = _torchvision_file(tmp_path, 18)
    net = build_network(_plan("classification", "resnet", depth=50), 1, 2)
    with pytest.raises(SpineautoError) as e:
        load_pretrained(net, path)
    msg = str(e.value)
    assert "\n" not in msg and "ResNet-18 state dict for a ResNet-50 encoder" in msg
    assert "encoder.layer1.0.conv1.weight (64, 64, 3, 3) vs (64, 64, 1, 1)" in msg  # the mismatched tensors named
    junk = tmp_path / "notes.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(SpineautoError, match="not a readable checkpoint") as e:
        load_pretrained(net, junk)
    assert "\n" not in str(e.value)


def test_plan_refuses_bad_depth_and_resnet_without_decoder(tmp_path):
    from spineauto.planning.plans import Plans, _check_configuration

    plans = Plans(dataset_name="D", channel_names={"0": "MRI"}, labels={"background": 0, "cord": 1}, heads={}, lesion_labels=[],
                  configurations={})
    with pytest.raises(SpineautoError, match=r"network.depth: must be 18, 34 or 50"):
        _check_configuration(_plan("segmentation", depth=20), plans, "x")
    with pytest.raises(SpineautoError, match=r"network.architecture: must be resnet_unet for a segmentation task"):
        _check_configuration(_plan("segmentation", "resnet"), plans, "x")
    _check_configuration(_plan("segmentation", depth=34), plans, "x")  # any patch size: resnet_unet pads itself


@pytest.fixture(scope="module")
def resnet_phantoms(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("resnet")
    env = planned_phantoms(root, n_train=10, n_test=2, seed=3)
    yield root, env
    remove_tree(root)


def test_resnet_unet_trains_predicts_and_bundles_with_pretrained_encoder(resnet_phantoms, capsys, monkeypatch, tmp_path):
    root, env = resnet_phantoms
    for k, p in env.items():
        monkeypatch.setenv(f"SPINEAUTO_{k.upper()}", str(p))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    preset = tmp_path / "resnet.yaml"
    preset.write_text("configurations:\n  2d_resnet:\n    inherit: 2d\n    batch_size: 2\n"
                      "    network: {architecture: resnet_unet, depth: 18}\n")
    from spineauto.plan_and_preprocess import plan_and_preprocess

    plan_and_preprocess(1, workers=1, preset=preset)
    pretrained, ref = _torchvision_file(tmp_path, 18)
    code, _, err = run_cli(capsys, "train", "-d", "1", "-c", "2d_resnet", "-f", "0", "--epochs", "1", "--iters-per-epoch", "2",
                           "--val-iters", "1", "--num-workers", "0", "--wandb", "disabled", "--pretrained", str(pretrained))
    assert code == 0, err
    model_dir = next((env["results"] / "Dataset001_Ph").glob("*__2d_resnet"))
    ckpt = torch.load(model_dir / "fold_0" / "checkpoint_final.pt", weights_only=False)
    assert ckpt["plans"]["configurations"]["2d_resnet"]["network"]["architecture"] == "resnet_unet"
    assert ckpt["run_config"]["runtime"]["pretrained"] == str(pretrained)
    assert "cord" in json.loads((model_dir / "fold_0" / "validation" / "summary.json").read_text())["mean"]
    bundle = tmp_path / "resnet.zip"
    code, _, err = run_cli(capsys, "export", "-m", str(model_dir), "-o", str(bundle))
    assert code == 0, err
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-m", str(bundle), "-c", "2d_resnet", "-i",
                           str(env["raw"] / "Dataset001_Ph" / "imagesTs"), "-o", str(tmp_path / "pred"), "--no-tta")
    assert code == 0, err
    import nibabel as nib

    masks = sorted((tmp_path / "pred").glob("*.nii.gz"))
    images = sorted((env["raw"] / "Dataset001_Ph" / "imagesTs").glob("*.nii.gz"))
    assert len(masks) == 2 and nib.load(masks[0]).shape == nib.load(images[0]).shape
