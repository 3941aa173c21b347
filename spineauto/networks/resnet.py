"""ResNet encoders (torchvision's ResNet-18/34/50, 2D, any number of input channels): a
classification backbone (``resnet``) and the encoder of a U-Net (``resnet_unet``).

The encoder *is* torchvision's ResNet without its ``avgpool``/``fc``: its tensors carry torchvision's
names (``encoder.conv1.weight``, ``encoder.layer1.0.bn1.running_mean`` ...), so a torchvision or
RadImageNet ResNet state dict saved to a file loads with ``--pretrained FILE``
(:func:`torchvision_to_encoder`; the RGB first convolution is folded to the input's channels by
timm's ``adapt_input_conv``: summed over RGB for one channel, repeated and scaled by 3/C for C).

Skips (what the decoder and the classification heads read), largest first:
``[input, stem (1/2, 64), layer1 (1/4), layer2 (1/8), layer3 (1/16), layer4 (1/32)]``. The input
itself is the full-resolution skip (no parameters of ours in the encoder). An input whose size is
not a multiple of 32 is zero-padded at the bottom/right inside the encoder and the decoder crops
its outputs back, so any patch size of the plan works. Deep supervision is supported: the decoder
gives ``min(network.n_stages - 1, 5)`` outputs (full, 1/2, 1/4, ...), as many as the plan's loss
weights expect.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from spineauto.errors import SpineautoError
from spineauto.networks.registry import register
from spineauto.planning.plans import NetworkPlan

DEPTHS = (18, 34, 50)
BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}
DECODER_CHANNELS = (256, 128, 64, 32, 16)  # from 1/16 up to full resolution (segmentation_models_pytorch's U-Net)
STEM = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def torchvision_resnet(depth: int, in_channels: int) -> nn.Module:
    """torchvision's ResNet of ``depth`` with random weights (no download) and ``in_channels`` inputs."""
    from torchvision import models

    if depth not in DEPTHS:
        raise SpineautoError(f"network.depth {depth}: ResNet depths are {', '.join(map(str, DEPTHS))}")
    net = getattr(models, f"resnet{depth}")(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


class ResNetEncoder(nn.Module):
    """torchvision's ResNet trunk; ``forward`` returns the skips (see the module docstring)."""

    def __init__(self, depth: int, in_channels: int):
        super().__init__()
        net = torchvision_resnet(depth, in_channels)
        for name in STEM:
            setattr(self, name, getattr(net, name))
        widths = [64, 128, 256, 512] if depth < 50 else [256, 512, 1024, 2048]
        self.depth = depth
        self.output_channels = [in_channels, 64, *widths]
        self.strides = [1, 2, 4, 8, 16, 32]
        self.return_skips = True

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        padded = F.pad(x, (0, -w % 32, 0, -h % 32)) if (h % 32 or w % 32) else x
        stem = self.relu(self.bn1(self.conv1(padded)))
        skips = [x, stem]
        y = self.maxpool(stem)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            y = layer(y)
            skips.append(y)
        return skips


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: type[nn.Module]):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm(cout, affine=True), nn.LeakyReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), norm(cout, affine=True), nn.LeakyReLU(inplace=True))


class ResNetDecoder(nn.Module):
    """Transposed convolution up, concatenate the skip, two conv-norm-LeakyReLU; five levels up to the
    input's resolution; a 1x1 segmentation layer per level (deep supervision) or on the last one."""

    def __init__(self, encoder: ResNetEncoder, num_classes: int, deep_supervision: bool, n_outputs: int,
                 norm: type[nn.Module]):
        super().__init__()
        chans = encoder.output_channels
        ups, stages, below = [], [], chans[-1]
        for level, out in enumerate(DECODER_CHANNELS):
            skip = chans[-(level + 2)]
            ups.append(nn.ConvTranspose2d(below, out, 2, stride=2))
            stages.append(_Block(out + skip, out, norm))
            below = out
        self.transpconvs, self.stages = nn.ModuleList(ups), nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in DECODER_CHANNELS)
        self.deep_supervision = deep_supervision
        self.n_outputs = max(1, min(n_outputs, len(DECODER_CHANNELS)))

    def forward(self, skips: list[torch.Tensor]):
        h, w = skips[0].shape[-2:]
        y, outputs = skips[-1], []
        last = len(self.stages) - 1
        for level in range(len(self.stages)):
            y = self.transpconvs[level](y)
            skip = skips[-(level + 2)]
            if skip.shape[-2:] != y.shape[-2:]:  # the unpadded input (full resolution)
                skip = F.pad(skip, (0, y.shape[-1] - skip.shape[-1], 0, y.shape[-2] - skip.shape[-2]))
            y = self.stages[level](torch.cat((y, skip), 1))
            if level == last or (self.deep_supervision and level > last - self.n_outputs):
                scale = 2 ** (last - level)
                out = self.seg_layers[level](y)
                outputs.append(out[..., :math.ceil(h / scale), :math.ceil(w / scale)])
        outputs = outputs[::-1]
        return outputs if self.deep_supervision else outputs[0]


class ResNetUNet(nn.Module):
    def __init__(self, encoder: ResNetEncoder, decoder: ResNetDecoder | None):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder


def _norm(p: NetworkPlan) -> type[nn.Module]:
    return nn.InstanceNorm2d if p.norm == "instance" else nn.BatchNorm2d


@register("resnet_unet")
def _resnet_unet(p: NetworkPlan, in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    encoder = ResNetEncoder(p.depth, in_channels)
    return ResNetUNet(encoder, ResNetDecoder(encoder, num_classes, deep_supervision, p.n_stages - 1, _norm(p)))


@register("resnet")
def _resnet(p: NetworkPlan, in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    """The encoder alone (classification); a segmentation plan needs ``resnet_unet``."""
    return ResNetUNet(ResNetEncoder(p.depth, in_channels), None)


# -- torchvision / RadImageNet state dicts -------------------------------------------------------

_SEQUENTIAL = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}  # nn.Sequential(*children)
_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.", "resnet.", "net.")


def is_torchvision_resnet(state: dict) -> bool:
    """A bare ResNet state dict (torchvision names, possibly under a prefix or as ``nn.Sequential``
    children), as opposed to a spineauto checkpoint whose tensors are ``encoder.*``/``decoder.*``/``heads.*``."""
    names = {_strip(k) for k in state}
    return "conv1.weight" in names and any(k.startswith("layer1.") for k in names) and not any(
        k.startswith(("decoder.", "heads.")) for k in state)


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    head, _, rest = key.partition(".")
    return f"{_SEQUENTIAL[head]}.{rest}" if head in _SEQUENTIAL and rest else key


def resnet_depth_of(state: dict) -> int | None:
    """18, 34 or 50 from the block counts and bottlenecks of a torchvision-named state dict."""
    names = {_strip(k) for k in state}
    bottleneck = any(k.startswith("layer1.0.conv3.") for k in names)
    blocks = tuple(len({k.split(".")[1] for k in names if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    for depth in DEPTHS:
        if BLOCKS[depth] == blocks and bottleneck == (depth == 50):
            return depth
    return None


def adapt_pretrained(state: dict, target: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """A torchvision/RadImageNet ResNet state dict as the ``encoder.*`` tensors of ``target`` (the
    network's state dict), its first convolution folded from RGB to the target's input channels;
    any other state dict unchanged. Returns (state, notes for the report); ``fc.*`` is left out."""
    from timm.models import adapt_input_conv

    if not is_torchvision_resnet(state):
        return state, []
    out = {f"encoder.{_strip(k)}": v for k, v in state.items() if not _strip(k).startswith("fc.")}
    src = resnet_depth_of(state)
    dst = resnet_depth_of({k: v for k, v in target.items() if k.startswith("encoder.")})
    kind = "spineauto pretrain" if all(k.startswith("encoder.") for k in state) else "torchvision-style"
    notes = [f"a {kind} ResNet-{src or '?'} state dict" + (f" for a ResNet-{dst} encoder" if dst else "")]
    first, want = out.get("encoder.conv1.weight"), target.get("encoder.conv1.weight")
    if first is not None and want is not None and first.ndim == want.ndim == 4 and first.shape[1] == 3 != want.shape[1]:
        out["encoder.conv1.weight"] = adapt_input_conv(want.shape[1], first)
        notes.append(f"conv1 folded from 3 (RGB) to {want.shape[1]} input channel(s)")
    return out, notes
