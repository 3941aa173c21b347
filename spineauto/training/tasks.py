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

Register a new task with ``@register_task("name")`` (or name your own class in a run YAML as
``trainer.task: package.module:Name``); classification and multitask plug in here
(multitask = a weighted sum of the segmentation and classification tasks' losses, merged metrics),
and the trainer imports them (:func:`spineauto.training.trainer.build_task`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from spineauto.errors import SpineautoError
from spineauto.networks.outputs import seg_labels
from spineauto.planning.plans import ConfigurationPlan, Plans
from spineauto.plugins import Registry, describe

def _task_check(obj) -> str | None:
    missing = [m for m in ("make_sampler", "loss", "val_stats", "metrics", "example", "epoch_images") if not hasattr(obj, m)]
    return f"{describe(obj)} without {', '.join(missing)} of the Task protocol" if missing or not callable(obj) else None


TASKS = Registry("task", _task_check, key="task")  # name -> factory(plans, plan, ddp) -> Task; trainer.task may name package.module:Name


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


@register_task("segmentation")
class SegmentationTask:
    """The plan's loss (training/losses.py; default nnunetv2's Dice + cross-entropy), deep supervision,
    pseudo-Dice per foreground label (voxels of the dataset's ignore label counted nowhere)."""

    name = "segmentation"
    monitor = "pseudo_dice"

    def __init__(self, plans: Plans, plan: ConfigurationPlan, ddp: bool = False):
        from spineauto.training.losses import build_segmentation_loss

        self.plan = plan
        self.num_classes = max(plans.num_classes, 2)
        names = {v: k for k, v in plans.labels.items()}
        self.label_names = [names.get(v, str(v)) for v in range(1, self.num_classes)]
        self.activation = plan.network.output_activation
        self.order = plans.region_order  # region-based labels: the painting order of their sigmoid channels
        self.members = [plans.members(k) for k in range(1, self.num_classes)]  # what channel k's Dice counts
        self.ignore = plans.ignore_label
        if self.order and self.activation != "sigmoid":
            raise SpineautoError(f"configuration {plan.name!r}: dataset {plans.dataset_name} has region labels {plans.regions}, which "
                                 f"train sigmoid outputs; loss {plan.loss.name!r} trains {self.activation} ones (use dice_bce)")
        self.criterion: nn.Module = build_segmentation_loss(plans, plan, ddp)  # plan.loss.name, deep supervision around it

    def make_sampler(self, store):
        from spineauto.training.data import SegmentationPatchSampler

        return SegmentationPatchSampler(store, self.plan.foreground_oversampling)

    def loss(self, output: dict, batch: dict) -> torch.Tensor:
        return self.criterion(output["seg"], batch["seg"].long())

    @staticmethod
    def _top(output: dict) -> torch.Tensor:
        seg = output["seg"]
        return seg[0] if isinstance(seg, (list, tuple)) else seg

    def val_stats(self, output: dict, batch: dict) -> dict[str, torch.Tensor]:
        pred = seg_labels(self._top(output), self.activation, self.order)
        ref = batch["seg"][:, 0].long()
        labelled = ref != self.ignore if self.ignore is not None else torch.ones_like(ref, dtype=torch.bool)
        stats = torch.zeros(3, self.num_classes - 1, dtype=torch.float64, device=pred.device)
        for k in range(1, self.num_classes):  # per label, or per region (a region's Dice counts all its values)
            members = torch.tensor(self.members[k - 1], device=pred.device)
            p, r = torch.isin(pred, members) & labelled, torch.isin(ref, members)
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
        i = int(self._foreground(seg).flatten(1).sum(1).argmax())
        pred = seg_labels(self._top(output)[i:i + 1], self.activation, self.order)[0]
        return {"image": batch["data"][i, 0].float().cpu().numpy(), "truth": seg[i].cpu().numpy(),
                "prediction": pred.cpu().numpy(), "key": batch["keys"][i] if batch.get("keys") else ""}

    def examples(self, batch: dict, output: dict, n: int) -> list[dict]:
        """Up to ``n`` samples of the batch, most foreground first (the segmentation sampler's images)."""
        seg = batch["seg"][:, 0]
        pred = seg_labels(self._top(output), self.activation, self.order)
        order = self._foreground(seg).flatten(1).sum(1).argsort(descending=True)[:n].tolist()
        keys = batch.get("keys") or [""] * len(seg)
        return [{"image": batch["data"][i, 0].float().cpu().numpy(), "truth": seg[i].cpu().numpy(),
                 "prediction": pred[i].cpu().numpy(), "key": keys[i]} for i in order]

    def _foreground(self, seg: torch.Tensor) -> torch.Tensor:
        return (seg > 0) & (seg != self.ignore) if self.ignore is not None else seg > 0

    def epoch_images(self, folder: Path) -> dict[str, Path]:
        return {}
