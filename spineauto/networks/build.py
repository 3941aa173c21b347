"""Networks built from a configuration plan, found through an explicit registry (no crawling).

Every network is a :class:`SpineNet`: an ``encoder`` (dynamic-network-architectures), an optional
segmentation ``decoder`` and optional classification ``heads`` on the deepest features, in the
shape of segmentation_models_pytorch. ``forward`` returns a dict: ``{"seg": logits or a list of
logits (deep supervision, largest first), "cls": {head: logits}}``. Encoder tensors are named
``encoder.*`` in every architecture, which is what ``--pretrained`` transfers.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from spineauto.errors import SpineautoError
from spineauto.planning.plans import ConfigurationPlan, NetworkPlan

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Record a U-Net builder ``fn(net_plan, in_channels, num_classes, deep_supervision) -> nn.Module``
    whose result has ``.encoder`` and ``.decoder``."""
    def deco(fn):
        _REGISTRY[name] = fn
        return fn
    return deco


def architectures() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _common_kwargs(p: NetworkPlan) -> dict:
    norm = nn.InstanceNorm2d if p.norm == "instance" else nn.BatchNorm2d
    return dict(conv_op=nn.Conv2d, conv_bias=True, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True},
                dropout_op=nn.Dropout2d if p.dropout > 0 else None, dropout_op_kwargs={"p": p.dropout} if p.dropout > 0 else None,
                nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


@register("unet")
def _unet(p: NetworkPlan, in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(in_channels, p.n_stages, p.features_per_stage, kernel_sizes=p.kernel_sizes, strides=p.strides,
                         n_conv_per_stage=p.n_conv_per_stage, num_classes=num_classes,
                         n_conv_per_stage_decoder=p.n_conv_per_stage_decoder, deep_supervision=deep_supervision, **_common_kwargs(p))


@register("resenc_unet")
def _resenc(p: NetworkPlan, in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    blocks = [max(1, n - 1) if i == 0 else n for i, n in enumerate(p.n_conv_per_stage)]
    return ResidualEncoderUNet(in_channels, p.n_stages, p.features_per_stage, kernel_sizes=p.kernel_sizes, strides=p.strides,
                               n_blocks_per_stage=blocks, num_classes=num_classes,
                               n_conv_per_stage_decoder=p.n_conv_per_stage_decoder, deep_supervision=deep_supervision, **_common_kwargs(p))


def _load_builtin() -> None:
    from spineauto.networks import attention_unet  # noqa: F401 - registers "attention_unet"


class SpineNet(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module | None, heads: dict[str, int]):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.heads = nn.ModuleDict({
            name: nn.Sequential(nn.Dropout(0.2), nn.Linear(encoder.output_channels[-1], n)) for name, n in heads.items()
        })

    def set_deep_supervision(self, enabled: bool) -> None:
        if self.decoder is not None:
            self.decoder.deep_supervision = enabled

    def forward(self, x: torch.Tensor) -> dict:
        skips = self.encoder(x)
        out: dict = {}
        if self.decoder is not None:
            out["seg"] = self.decoder(skips)
        if len(self.heads):
            pooled = skips[-1].mean(dim=(2, 3))
            out["cls"] = {name: head(pooled) for name, head in self.heads.items()}
        return out


def build_network(plan: ConfigurationPlan, in_channels: int, num_classes: int) -> SpineNet:
    """The network of one configuration. ``num_classes`` counts background; ignored without segmentation."""
    _load_builtin()
    p = plan.network
    if p.architecture not in _REGISTRY:
        raise SpineautoError(f"unknown architecture {p.architecture!r}; available: {', '.join(architectures())}")
    unet = _REGISTRY[p.architecture](p, in_channels, max(num_classes, 2), p.deep_supervision and plan.has_segmentation)
    encoder = unet.encoder
    encoder.return_skips = True
    decoder = unet.decoder if plan.has_segmentation else None
    heads = {h.name: len(h.classes) for h in plan.heads} if plan.has_classification else {}
    return SpineNet(encoder, decoder, heads)
