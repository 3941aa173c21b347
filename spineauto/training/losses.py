"""Segmentation losses by name (``loss.name`` in the plan or a run YAML); a user's own as ``package.module:Name``.

Every loss takes one resolution's logits ``(B, C, H, W)`` (C = label values, background included)
and the label map ``(B, 1, H, W)``; :func:`build_segmentation_loss` adds deep supervision around it.
A loss declares the output activation it trains (``activation``: softmax or sigmoid); the run
configuration copies it into ``network.output_activation`` so that validation and prediction turn
logits into labels the same way (sigmoid: a label where its probability exceeds 0.5).

Built-ins: ``dice_ce`` (nnU-Net's Dice + cross-entropy, the default), ``dice_focal``, ``tversky`` and
``focal_tversky`` (small lesions: false negatives weigh more), ``dice_bce`` (sigmoid outputs, nnU-Net's
region loss). Soft Dice and cross-entropy come from nnunetv2; focal and Tversky terms are written
here on the same batch-level statistics.

A dataset with an ignore label (``plans.ignore_label``, nnU-Net's sparse labels): every built-in loss
leaves the voxels of that value out, Dice and cross-entropy alike (nnunetv2's own ``ignore_label`` /
``use_ignore_label`` for ``dice_ce`` and ``dice_bce``, a loss mask here for the others); deep supervision
downsamples the label map by nearest neighbour, so an ignore voxel stays ignore at every resolution.
A plug-in loss receives the label map with the ignore value in it: it must say it masks it
(``handles_ignore_label = True``), else training is refused.

A plug-in loss is a ``torch.nn.Module`` subclass, built as ``Name(**loss.kwargs)`` and called as
``loss(logits, target)``; a class attribute ``activation = "sigmoid"`` makes it a sigmoid loss.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from spineauto.errors import SpineautoError
from spineauto.planning.plans import ConfigurationPlan, Plans
from spineauto.plugins import Registry, bind_kwargs, subclass_check

LOSSES = Registry("loss", subclass_check(nn.Module), key="loss")
SMOOTH = 1e-5


def loss_activation(factory) -> str:
    return getattr(factory, "activation", "softmax")


def _register(name: str, activation: str = "softmax"):
    def deco(fn: Callable):
        fn.activation = activation
        LOSSES[name] = fn
        return fn
    return deco


def ignore_mask(target: torch.Tensor, ignore: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(target with the ignore value set to 0, the mask of labelled voxels), or (target, None) without an ignore label."""
    if ignore is None:
        return target, None
    mask = target != ignore
    return torch.where(mask, target, torch.zeros_like(target)), mask


def _dice(ddp: bool, nonlin) -> nn.Module:
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    return MemoryEfficientSoftDiceLoss(apply_nonlin=nonlin, batch_dice=True, do_bg=False, smooth=SMOOTH, ddp=ddp)


def _softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, 1)


@_register("dice_ce")
def _dice_ce(plans: Plans, plan: ConfigurationPlan, ddp: bool) -> nn.Module:
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    return DC_and_CE_loss({"batch_dice": True, "smooth": SMOOTH, "do_bg": False, "ddp": ddp}, {},
                          weight_ce=plan.loss.ce_weight, weight_dice=plan.loss.dice_weight, ignore_label=plans.ignore_label,
                          dice_class=MemoryEfficientSoftDiceLoss)


class DiceFocal(nn.Module):
    """dice_weight * soft Dice + ce_weight * focal loss (cross-entropy weighted by (1 - p_true)^gamma)."""

    def __init__(self, dice: nn.Module, gamma: float, dice_weight: float, focal_weight: float, ignore: int | None = None):
        super().__init__()
        self.dice, self.gamma, self.dice_weight, self.focal_weight, self.ignore = dice, gamma, dice_weight, focal_weight, ignore

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target, mask = ignore_mask(target.long(), self.ignore)
        t = target[:, 0]
        logp = torch.log_softmax(logits.float(), 1).gather(1, t[:, None])[:, 0]
        focal = -(1 - logp.exp()) ** self.gamma * logp
        focal = focal.mean() if mask is None else (focal * mask[:, 0]).sum() / mask.sum().clamp(min=1)
        return self.dice_weight * self.dice(logits, target, loss_mask=mask) + self.focal_weight * focal


@_register("dice_focal")
def _dice_focal(plans: Plans, plan: ConfigurationPlan, ddp: bool) -> nn.Module:
    lo = plan.loss
    return DiceFocal(_dice(ddp, _softmax), lo.focal_gamma, lo.dice_weight, lo.ce_weight, plans.ignore_label)


class Tversky(nn.Module):
    """1 - Tversky index, per foreground label over the whole batch, averaged; ``gamma`` != 1: focal
    Tversky, mean of (1 - TI)^gamma (Abraham & Khan, 2019). alpha weighs false positives, beta false negatives."""

    def __init__(self, alpha: float, beta: float, gamma: float = 1.0, ddp: bool = False, ignore: int | None = None):
        super().__init__()
        self.alpha, self.beta, self.gamma, self.ddp, self.ignore = alpha, beta, gamma, ddp, ignore

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), 1)[:, 1:]
        target, mask = ignore_mask(target.long(), self.ignore)
        if mask is not None:
            probs = probs * mask
        onehot = torch.zeros_like(probs)
        t = target[:, 0]
        onehot.scatter_(1, (t - 1).clamp(min=0)[:, None], (t > 0)[:, None].to(probs.dtype))
        dims = (0, *range(2, probs.ndim))
        tp = (probs * onehot).sum(dims)
        fp = (probs * (1 - onehot)).sum(dims)
        fn = ((1 - probs) * onehot).sum(dims)  # onehot is 0 where ignored: no false negatives there
        if self.ddp and torch.distributed.is_available() and torch.distributed.is_initialized():
            from nnunetv2.utilities.ddp_allgather import AllGatherGrad

            tp, fp, fn = (AllGatherGrad.apply(x).sum(0) for x in (tp, fp, fn))
        index = (tp + SMOOTH) / (tp + self.alpha * fp + self.beta * fn + SMOOTH)
        return ((1 - index) ** self.gamma).mean()


@_register("tversky")
def _tversky(plans: Plans, plan: ConfigurationPlan, ddp: bool) -> nn.Module:
    return Tversky(plan.loss.tversky_alpha, plan.loss.tversky_beta, 1.0, ddp, plans.ignore_label)


@_register("focal_tversky")
def _focal_tversky(plans: Plans, plan: ConfigurationPlan, ddp: bool) -> nn.Module:
    return Tversky(plan.loss.tversky_alpha, plan.loss.tversky_beta, plan.loss.tversky_gamma, ddp, plans.ignore_label)


class RegionTargets(nn.Module):
    """Sigmoid losses train channel k (k >= 1) on its region: the label-map values ``members[k - 1]``
    (a region of dataset.json, e.g. cord = {1, 2}), by default ``label == k``; channel 0 is unused.
    With ``ignore``: the mask of ignored voxels goes last, where nnunetv2's ``DC_and_BCE_loss(use_ignore_label=True)`` reads it."""

    def __init__(self, loss: nn.Module, members: list[list[int]] | None = None, ignore: int | None = None):
        super().__init__()
        self.loss = loss
        self.members = members
        self.ignore = ignore

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        members = self.members or [[k] for k in range(1, logits.shape[1])]
        channels = [torch.isin(target, torch.tensor(m, device=target.device)) for m in members]  # (B, 1, ...) each
        if self.ignore is not None:
            channels.append(target == self.ignore)
        return self.loss(logits[:, 1:], torch.cat(channels, dim=1).to(logits.dtype))


@_register("dice_bce", activation="sigmoid")
def _dice_bce(plans: Plans, plan: ConfigurationPlan, ddp: bool) -> nn.Module:
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    return RegionTargets(DC_and_BCE_loss({}, {"batch_dice": True, "do_bg": True, "smooth": SMOOTH, "ddp": ddp},
                                         weight_ce=plan.loss.ce_weight, weight_dice=plan.loss.dice_weight,
                                         use_ignore_label=plans.ignore_label is not None, dice_class=MemoryEfficientSoftDiceLoss),
                         [plans.members(k) for k in range(1, plans.num_classes)] if plans.regions else None, plans.ignore_label)


def resolve_loss(plan: ConfigurationPlan):
    """The loss factory or plug-in class of ``plan.loss.name``, checked against the task (one line otherwise)."""
    obj = LOSSES.resolve(plan.loss.name, "loss.name")
    if plan.loss.name not in LOSSES:
        bind_kwargs(obj, plan.loss.kwargs, f"loss.kwargs of {plan.loss.name}")
    elif plan.loss.kwargs:
        raise SpineautoError(f"loss.kwargs: the built-in loss {plan.loss.name!r} takes its settings from the loss section "
                             f"(dice_weight, ce_weight, focal_gamma, tversky_*), not kwargs {sorted(plan.loss.kwargs)}")
    activation = loss_activation(obj)
    if activation not in ("softmax", "sigmoid"):
        raise SpineautoError(f"loss.name {plan.loss.name!r}: activation {activation!r} is neither softmax nor sigmoid")
    if plan.has_classification and activation == "sigmoid":
        raise SpineautoError(f"loss.name {plan.loss.name!r} trains sigmoid outputs, which do not fit configuration {plan.name!r}: "
                             f"a {plan.task} task with classification heads (softmax); use dice_ce, dice_focal, tversky or focal_tversky")
    if plan.task == "classification" and plan.loss.name != "dice_ce":
        raise SpineautoError(f"loss.name {plan.loss.name!r} is a segmentation loss; configuration {plan.name!r} is a classification "
                             "task (its heads train with cross-entropy: set loss.label_smoothing and the heads' loss_weight)")
    return obj


def build_base_loss(plans: Plans, plan: ConfigurationPlan, ddp: bool) -> nn.Module:
    obj = resolve_loss(plan)
    if plan.loss.name in LOSSES:
        return obj(plans, plan, ddp)
    if plans.ignore_label is not None and not getattr(obj, "handles_ignore_label", False):
        raise SpineautoError(f"loss.name {plan.loss.name!r}: dataset {plans.dataset_name} has an ignore label (value {plans.ignore_label}: "
                             "unlabelled voxels), which this plug-in loss would train as a class; use a built-in loss, or mask "
                             "those voxels in it and set its class attribute handles_ignore_label = True")
    return obj(**plan.loss.kwargs)


class DeepSupervision(nn.Module):
    """Weighted sum of the loss at each output resolution (nnU-Net's weights), targets downsampled nearest."""

    def __init__(self, loss: nn.Module, weights: list[float]):
        super().__init__()
        self.loss, self.weights = loss, weights

    def forward(self, outputs, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, (list, tuple)):
            return self.loss(outputs, target)
        total = None
        for out, w in zip(outputs, self.weights):
            if w == 0:
                continue
            size = out.shape[-2:]
            t = target if tuple(target.shape[-2:]) == tuple(size) else \
                torch.nn.functional.interpolate(target.float(), size=size, mode="nearest").to(target.dtype)
            term = w * self.loss(out, t)
            total = term if total is None else total + term
        return total


def deep_supervision_weights(n: int, ddp: bool) -> list[float]:
    """nnU-Net's: 1/2^i, the lowest resolution off (1e-6 under DDP so every parameter gets a gradient)."""
    import numpy as np

    w = np.array([1 / 2 ** i for i in range(n)])
    if n > 1:
        w[-1] = 1e-6 if ddp else 0.0
    return (w / w.sum()).tolist()


def build_segmentation_loss(plans: Plans, plan: ConfigurationPlan, ddp: bool) -> nn.Module:
    return DeepSupervision(build_base_loss(plans, plan, ddp), deep_supervision_weights(max(plan.network.n_stages - 1, 1), ddp))
