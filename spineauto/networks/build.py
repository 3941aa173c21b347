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
from spineauto.plugins import bind_kwargs

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


class PluginNet(nn.Module):
    """A user's ``nn.Module`` (``network.architecture: package.module:Name``) with SpineNet's output dict."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def set_deep_supervision(self, enabled: bool) -> None:
        if hasattr(self.net, "set_deep_supervision"):
            self.net.set_deep_supervision(enabled)

    def forward(self, x: torch.Tensor) -> dict:
        out = self.net(x)
        return out if isinstance(out, dict) else {"seg": out}


def build_network(plan: ConfigurationPlan, in_channels: int, num_classes: int) -> nn.Module:
    """The network of one configuration. ``num_classes`` counts background; ignored without segmentation."""
    p = plan.network
    builder = REGISTRY.resolve(p.architecture, "network.architecture")
    if isinstance(builder, type):  # a user's nn.Module class
        kwargs = bind_kwargs(builder, p.kwargs, f"network.kwargs of {p.architecture}")
        try:
            net = builder(in_channels, max(num_classes, 2), **kwargs)
        except Exception as e:  # noqa: BLE001 - a user's constructor: one line naming it
            raise SpineautoError(f"network.architecture {p.architecture!r}: building it failed ({type(e).__name__}: {e})") from None
        return PluginNet(net)
    if p.kwargs and p.architecture in REGISTRY:
        raise SpineautoError(f"network.kwargs: the built-in architecture {p.architecture!r} takes no kwargs (got {sorted(p.kwargs)})")
    unet = builder(p, in_channels, max(num_classes, 2), p.deep_supervision and plan.has_segmentation)
    if p.init == "he" and hasattr(unet, "initialize"):  # nnU-Net's (dynamic-network-architectures' InitWeights_He(1e-2))
        unet.apply(unet.initialize)
    encoder = unet.encoder
    encoder.return_skips = True
    decoder = unet.decoder if plan.has_segmentation else None
    heads = {h.name: len(h.classes) for h in plan.heads} if plan.has_classification else {}
    return SpineNet(encoder, decoder, heads)


def checkpoint_activations(net: nn.Module) -> int:
    """Recompute every encoder and decoder stage in the backward pass instead of keeping its
    activations (torch.utils.checkpoint): less memory for more compute. Parameter names do not
    change (checkpoints stay interchangeable). Returns how many stages were wrapped."""
    from torch.utils.checkpoint import checkpoint

    inner = net.net if isinstance(net, PluginNet) else net
    stages = [s for part in ("encoder", "decoder") for s in getattr(getattr(inner, part, None), "stages", None) or []]
    if not stages:
        raise SpineautoError(f"trainer.activation_checkpointing: {type(inner).__name__} has no encoder.stages / decoder.stages to checkpoint")
    for stage in stages:
        plain = stage.forward

        def forward(*args, _plain=plain, _stage=stage):
            if _stage.training and torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False)
            return _plain(*args)
        stage.forward = forward
    return len(stages)
