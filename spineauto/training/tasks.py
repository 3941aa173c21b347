"""Tasks: what the one training loop optimises and measures, chosen by ``plan.task``.

A task owns everything task-specific, so the loop never branches on the task:

- ``make_sampler(store)``: the data side (a :class:`~spineauto.training.data.BatchSampler`);
- ``loss(output, batch)``: the training loss from the network's output dict and a device batch;
- ``val_stats(output, batch)``: a dict of summable tensors for one validation batch (summed over
  iterations and, in DDP, over ranks);
- ``metrics(stats)``: plain floats from the summed stats; ``monitor`` names the one that decides
  ``checkpoint_best`` and top-k (higher is better; the loop smooths it with an EMA, as nnU-Net);
- ``example(batch, output)``: one 2D sample for the epoch's overlay image (or None);
- ``epoch_images(folder)``: extra images the task draws after an epoch (name -> PNG path; may be empty).

Register a new task with ``@register_task("name")``; classification and multitask plug in here
(multitask = a weighted sum of the segmentation and classification tasks' losses, merged metrics),
and the trainer imports them (:func:`spineauto.training.trainer.build_task`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn

from spineauto.planning.plans import ConfigurationPlan, Plans

TASKS: dict[str, Callable[..., "Task"]] = {}


class Task(Protocol):
    name: str
    monitor: str

    def make_sampler(self, store): ...
    def loss(self, output: dict, batch: dict) -> torch.Tensor: ...
    def val_stats(self, output: dict, batch: dict) -> dict[str, torch.Tensor]: ...
    def metrics(self, stats: dict[str, torch.Tensor]) -> dict[str, float]: ...
    def example(self, batch: dict, output: dict) -> dict | None: ...
    def epoch_images(self, folder: Path) -> dict[str, Path]: ...


def register_task(name: str):
    def deco(factory):
        TASKS[name] = factory
        return factory
    return deco


def deep_supervision_weights(n: int, ddp: bool) -> list[float]:
    """nnU-Net's: 1/2^i, the lowest resolution off (1e-6 under DDP so every parameter gets a gradient)."""
    w = np.array([1 / 2 ** i for i in range(n)])
    if n > 1:
        w[-1] = 1e-6 if ddp else 0.0
    return (w / w.sum()).tolist()


def downsample_targets(seg: torch.Tensor, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Nearest-neighbour targets matching each deep-supervision output (on the device, cheap)."""
    targets = []
    for out in outputs:
        size = out.shape[-2:]
        targets.append(seg if tuple(seg.shape[-2:]) == tuple(size) else
                       torch.nn.functional.interpolate(seg.float(), size=size, mode="nearest").to(seg.dtype))
    return targets


@register_task("segmentation")
class SegmentationTask:
    """Dice + cross-entropy (nnunetv2), deep supervision, pseudo-Dice per foreground label."""

    name = "segmentation"
    monitor = "pseudo_dice"

    def __init__(self, plans: Plans, plan: ConfigurationPlan, ddp: bool = False):
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

        self.plan = plan
        self.num_classes = max(plans.num_classes, 2)
        names = {v: k for k, v in plans.labels.items()}
        self.label_names = [names.get(v, str(v)) for v in range(1, self.num_classes)]
        base = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": ddp}, {},
                              weight_ce=plan.loss.ce_weight, weight_dice=plan.loss.dice_weight,
                              dice_class=MemoryEfficientSoftDiceLoss)
        self.deep_supervision = plan.network.deep_supervision
        n_out = plan.network.n_stages - 1
        self.criterion: nn.Module = DeepSupervisionWrapper(base, deep_supervision_weights(n_out, ddp)) if self.deep_supervision else base

    def make_sampler(self, store):
        from spineauto.training.data import SegmentationPatchSampler

        return SegmentationPatchSampler(store, self.plan.foreground_oversampling)

    def loss(self, output: dict, batch: dict) -> torch.Tensor:
        seg = output["seg"]
        target = batch["seg"].long()
        if isinstance(seg, (list, tuple)):
            return self.criterion(seg, downsample_targets(target, seg))
        return self.criterion(seg, target)

    @staticmethod
    def _top(output: dict) -> torch.Tensor:
        seg = output["seg"]
        return seg[0] if isinstance(seg, (list, tuple)) else seg

    def val_stats(self, output: dict, batch: dict) -> dict[str, torch.Tensor]:
        pred = self._top(output).argmax(1)
        ref = batch["seg"][:, 0].long()
        stats = torch.zeros(3, self.num_classes - 1, dtype=torch.float64, device=pred.device)
        for k in range(1, self.num_classes):
            p, r = pred == k, ref == k
            tp = (p & r).sum()
            stats[0, k - 1] = tp
            stats[1, k - 1] = p.sum() - tp
            stats[2, k - 1] = r.sum() - tp
        return {"tp_fp_fn": stats}

    def metrics(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        tp, fp, fn = stats["tp_fp_fn"].double().cpu().numpy()
        denom = 2 * tp + fp + fn
        dice = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
        out = {f"pseudo_dice_{n}": float(d) for n, d in zip(self.label_names, dice)}
        valid = dice[~np.isnan(dice)]
        out["pseudo_dice"] = float(valid.mean()) if len(valid) else 0.0
        return out

    def example(self, batch: dict, output: dict) -> dict | None:
        seg = batch["seg"][:, 0]
        i = int((seg > 0).flatten(1).sum(1).argmax())
        pred = self._top(output)[i].argmax(0)
        return {"image": batch["data"][i, 0].float().cpu().numpy(), "truth": seg[i].cpu().numpy(),
                "prediction": pred.cpu().numpy(), "key": batch["keys"][i] if batch.get("keys") else ""}

    def epoch_images(self, folder: Path) -> dict[str, Path]:
        return {}
