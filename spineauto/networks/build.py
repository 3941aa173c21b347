"""Networks built from a configuration plan, found through an explicit registry (no crawling,
:mod:`spineauto.networks.registry`).

Every network is a :class:`SpineNet`: an ``encoder`` (dynamic-network-architectures), an optional
segmentation ``decoder`` and optional classification ``heads`` on the deepest features, in the
shape of segmentation_models_pytorch. ``forward`` returns a dict: ``{"seg": logits or a list of
logits (deep supervision, largest first), "cls": {head: logits}}``. Encoder tensors are named
``encoder.*`` in every architecture, which is what ``--pretrained`` transfers.
"""
from __future__ import annotations

import torch
from torch import nn

from spineauto.errors import SpineautoError
from spineauto.networks import attention_unet, resnet  # noqa: F401 (register "attention_unet", "resnet_unet", "resnet")
from spineauto.networks.registry import REGISTRY
from spineauto.planning.plans import ConfigurationPlan

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
    p = plan.network
    if p.architecture not in REGISTRY:
        raise SpineautoError(f"unknown architecture {p.architecture!r}; available: {', '.join(sorted(REGISTRY))}")
    unet = REGISTRY[p.architecture](p, in_channels, max(num_classes, 2), p.deep_supervision and plan.has_segmentation)
    encoder = unet.encoder
    encoder.return_skips = True
    decoder = unet.decoder if plan.has_segmentation else None
    heads = {h.name: len(h.classes) for h in plan.heads} if plan.has_classification else {}
    return SpineNet(encoder, decoder, heads)
