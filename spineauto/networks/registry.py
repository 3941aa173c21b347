"""The architecture registry: a U-Net builder is recorded by name with ``@register("name")``; the
plan's ``network.architecture`` picks it. The built-ins (``unet``, ``resenc_unet`` from
dynamic-network-architectures) live here; ``attention_unet`` in its own module.

A user's network is named in the plan as ``package.module:Name`` (see networks/build.py): an
``nn.Module`` subclass built as ``Name(in_channels, num_classes, **network.kwargs)`` whose forward
returns segmentation logits (or SpineNet's output dict), or a builder function like the ones here that
its module registers with ``@register("name")`` when imported. Nothing else is accepted, and it is
refused before it is called: a plan (or a bundle's plans.json) naming ``os:system`` or
``builtins:print`` is one line, never a call."""
from __future__ import annotations


from torch import nn

from spineauto.planning.plans import NetworkPlan
from spineauto.plugins import Registry, subclass_check

_module_check = subclass_check(nn.Module)


def _check(obj) -> str | None:
    """An ``nn.Module`` subclass, or a builder function registered with ``@register`` (its module did on import)."""
    if not isinstance(obj, type) and any(obj is f for f in REGISTRY.values()):
        return None
    why = _module_check(obj)
    return why if why is None else why[:-1] + ', or a builder function registered with @spineauto.networks.registry.register)'


REGISTRY = Registry("network architecture", _check, key="network")  # also package.module:Name


def register(name: str):
    """Record a U-Net builder ``fn(net_plan, in_channels, num_classes, deep_supervision) -> nn.Module``
    whose result has ``.encoder`` and ``.decoder``."""
    def deco(fn):
        REGISTRY[name] = fn
        return fn
    return deco


def common_kwargs(p: NetworkPlan) -> dict:
    norm = nn.InstanceNorm2d if p.norm == "instance" else nn.BatchNorm2d
    return dict(conv_op=nn.Conv2d, conv_bias=True, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True},
                dropout_op=nn.Dropout2d if p.dropout > 0 else None, dropout_op_kwargs={"p": p.dropout} if p.dropout > 0 else None,
                nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


@register("unet")
def _unet(p: NetworkPlan, in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(in_channels, p.n_stages, p.features_per_stage, kernel_sizes=p.kernel_sizes, strides=p.strides,
                         n_conv_per_stage=p.n_conv_per_stage, num_classes=num_classes,
                         n_conv_per_stage_decoder=p.n_conv_per_stage_decoder, deep_supervision=deep_supervision, **common_kwargs(p))


@register("resenc_unet")
def _resenc(p: NetworkPlan, in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    blocks = [max(1, n - 1) if i == 0 else n for i, n in enumerate(p.n_conv_per_stage)]
    return ResidualEncoderUNet(in_channels, p.n_stages, p.features_per_stage, kernel_sizes=p.kernel_sizes, strides=p.strides,
                               n_blocks_per_stage=blocks, num_classes=num_classes,
                               n_conv_per_stage_decoder=p.n_conv_per_stage_decoder, deep_supervision=deep_supervision, **common_kwargs(p))
