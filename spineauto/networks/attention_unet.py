"""Attention U-Net: additive attention gates on the skip connections (Oktay et al., 2018).

The encoder and decoder stages are dynamic-network-architectures' own; only the gates are ours:
before each skip is concatenated, it is weighted by a per-pixel gate computed from the skip and the
upsampled decoder features.
"""
from __future__ import annotations

import torch
from torch import nn

from spineauto.networks.registry import common_kwargs, register
from spineauto.planning.plans import NetworkPlan


class AttentionGate(nn.Module):
    def __init__(self, skip_channels: int, gate_channels: int):
        super().__init__()
        inter = max(skip_channels // 2, 1)
        self.theta = nn.Conv2d(skip_channels, inter, 1, bias=False)
        self.phi = nn.Conv2d(gate_channels, inter, 1, bias=True)
        self.psi = nn.Conv2d(inter, 1, 1, bias=True)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.theta(skip) + self.phi(gate))
        return skip * torch.sigmoid(self.psi(a))


def _attention_decoder_forward(self, skips):
    lres = skips[-1]
    outputs = []
    for s in range(len(self.stages)):
        x = self.transpconvs[s](lres)
        skip = self.gates[s](skips[-(s + 2)], x)
        x = self.stages[s](torch.cat((x, skip), 1))
        if self.deep_supervision:
            outputs.append(self.seg_layers[s](x))
        elif s == len(self.stages) - 1:
            outputs.append(self.seg_layers[-1](x))
        lres = x
    outputs = outputs[::-1]
    return outputs if self.deep_supervision else outputs[0]


@register("attention_unet")
def _attention_unet(p: NetworkPlan, in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    net = PlainConvUNet(in_channels, p.n_stages, p.features_per_stage, kernel_sizes=p.kernel_sizes, strides=p.strides,
                        n_conv_per_stage=p.n_conv_per_stage, num_classes=num_classes,
                        n_conv_per_stage_decoder=p.n_conv_per_stage_decoder, deep_supervision=deep_supervision, **common_kwargs(p))
    dec = net.decoder
    feats = p.features_per_stage
    dec.gates = nn.ModuleList(AttentionGate(feats[-(s + 2)], feats[-(s + 2)]) for s in range(len(dec.stages)))
    dec.forward = _attention_decoder_forward.__get__(dec)
    return net
