"""The multitask task (``-c multitask``): one encoder shared by the segmentation decoder and the
classification heads, trained through the same loop as the other tasks."""
from __future__ import annotations

from pathlib import Path

import torch

from spineauto.evaluation.classification import HeadMetrics
from spineauto.planning.plans import ConfigurationPlan, Plans
from spineauto.training.classification import ClassificationTask
from spineauto.training.tasks import register_task


@register_task("multitask")
class MultitaskTask:
    """Segmentation loss * ``segmentation_weight`` + summed head losses * ``classification_weight``.

    Data: the segmentation sampler's patches (foreground oversampling) with the case classes.
    Metrics: both families; ``monitor`` is ``multitask_score``, the mean of the pseudo-Dice and the
    heads' mean balanced accuracy, so neither output is sacrificed for the other.
    """

    name = "multitask"
    monitor = "multitask_score"

    def __init__(self, plans: Plans, plan: ConfigurationPlan, ddp: bool = False):
        from spineauto.training.tasks import SegmentationTask

        self.plan = plan
        self.seg = SegmentationTask(plans, plan, ddp)
        self.cls = ClassificationTask(plans, plan, ddp)

    @property
    def last_confusion(self) -> dict[str, HeadMetrics]:
        return self.cls.last_confusion

    def make_sampler(self, store):
        from spineauto.training.class_sampling import MultitaskSampler

        return MultitaskSampler(store, list(self.plan.heads), self.plan.foreground_oversampling)

    def loss(self, output: dict, batch: dict) -> torch.Tensor:
        w = self.plan.loss
        return w.segmentation_weight * self.seg.loss(output, batch) + w.classification_weight * self.cls.loss(output, batch)

    def val_stats(self, output: dict, batch: dict) -> dict[str, torch.Tensor]:
        return {**self.seg.val_stats(output, batch), **self.cls.val_stats(output, batch)}

    def metrics(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        out = {**self.seg.metrics(stats), **self.cls.metrics(stats)}
        out["multitask_score"] = 0.5 * (out["pseudo_dice"] + out["balanced_accuracy"])
        return out

    def example(self, batch: dict, output: dict) -> dict | None:
        return self.seg.example(batch, output)

    def epoch_images(self, folder: Path) -> dict[str, Path]:
        return self.cls.epoch_images(folder)
