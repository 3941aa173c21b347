"""bench/common.py (bench_predict.py, bench_train.py): nnU-Net's 2d plan is given spineauto's network and patch size exactly."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common  # noqa: E402


def test_match_nnunet_plan(tmp_path):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    import torch

    ours = {"configurations": {"2d": {"patch_size": [64, 96], "network": {
        "architecture": "unet", "features_per_stage": [8, 16, 32], "kernel_sizes": [[3, 3]] * 3,
        "strides": [[1, 1], [2, 2], [2, 2]], "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2]}}}}
    theirs = {"configurations": {"2d": {"patch_size": [128, 128], "architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 512, 512], "conv_op": "torch.nn.modules.conv.Conv2d",
                        "kernel_sizes": [[3, 3]] * 6, "strides": [[1, 1]] + [[2, 2]] * 5, "n_conv_per_stage": [2] * 6,
                        "n_conv_per_stage_decoder": [2] * 5, "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}
    (tmp_path / "sa.json").write_text(json.dumps(ours))
    (tmp_path / "nn.json").write_text(json.dumps(theirs))
    common.match_nnunet_plan(tmp_path / "sa.json", tmp_path / "nn.json")
    cfg = json.loads((tmp_path / "nn.json").read_text())["configurations"]["2d"]
    assert cfg["patch_size"] == [64, 96]
    arch = cfg["architecture"]
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 2,
                                 allow_init=True, deep_supervision=False)
    assert isinstance(net, PlainConvUNet)

    from spineauto.networks.build import build_network
    from spineauto.planning.plans import ConfigurationPlan, NetworkPlan

    kw = dict(name="2d", task="segmentation", data_identifier="2d", slicing="per_case", target_spacing=[1, 1],
              patch_size=[64, 96], batch_size=2, normalization=["ZScoreNormalization"], use_mask_for_norm=[False],
              network=NetworkPlan(**ours["configurations"]["2d"]["network"]))
    if "isotropic_plane" in ConfigurationPlan.__dataclass_fields__:
        kw["isotropic_plane"] = "axial"
    mine = build_network(ConfigurationPlan(**kw), 1, 2)
    n_theirs = sum(p.numel() for p in net.parameters())
    n_mine = sum(p.numel() for n, p in mine.named_parameters() if not n.startswith("heads."))
    assert n_mine == n_theirs  # the same network, parameter for parameter

