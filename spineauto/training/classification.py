"""The classification task (``-c cls``): slice-level cross-entropy with label smoothing per head,
weighted by ``head.loss_weight``, class-balanced slice sampling, per-head metrics.

It plugs into the one training loop through the task seam of :mod:`spineauto.training.tasks`
(``make_sampler``, ``loss``, ``val_stats``, ``metrics``, ``monitor``, ``example``). Validation
statistics are each head's confusion matrix, a summable tensor, so DDP ranks and iterations add up
exactly; every metric (accuracy, balanced accuracy, macro-F1, per-class recall) derives from it.
``monitor`` is ``balanced_accuracy``: the mean over heads, robust to class imbalance.

The last validation's confusion matrices are kept on the task (``last_confusion``);
``epoch_images`` draws them for the loop (``fold_k/confusion_<head>.png`` and W&B).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from spineauto.evaluation.classification import HeadMetrics, metrics_from_confusion, plot_confusion
from spineauto.planning.plans import ConfigurationPlan, Plans
from spineauto.training.tasks import register_task

log = logging.getLogger(__name__)


def head_losses(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], criterion: nn.Module) -> dict[str, torch.Tensor]:
    return {h: criterion(logits[h].float(), targets[h].long()) for h in targets}


def confusion_tensor(logits: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    """(n, n) float64 counts [true, predicted] of one batch, on the logits' device."""
    pred = logits.argmax(1).long()
    idx = target.long().to(pred.device) * n + pred
    return torch.bincount(idx, minlength=n * n).reshape(n, n).to(torch.float64)


@register_task("classification")
class ClassificationTask:
    """Cross-entropy (label smoothing from ``plan.loss``) summed over heads with their ``loss_weight``."""

    name = "classification"
    monitor = "balanced_accuracy"

    def __init__(self, plans: Plans, plan: ConfigurationPlan, ddp: bool = False):
        self.plan = plan
        self.heads = list(plan.heads)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=float(plan.loss.label_smoothing))
        self.last_confusion: dict[str, HeadMetrics] = {}

    def make_sampler(self, store):
        from spineauto.training.class_sampling import ClassBalancedSliceSampler

        return ClassBalancedSliceSampler(store, self.heads)

    def loss(self, output: dict, batch: dict) -> torch.Tensor:
        losses = head_losses(output["cls"], batch["cls"], self.criterion)
        return sum(h.loss_weight * losses[h.name] for h in self.heads)

    def val_stats(self, output: dict, batch: dict) -> dict[str, torch.Tensor]:
        return {f"confusion/{h.name}": confusion_tensor(output["cls"][h.name], batch["cls"][h.name], len(h.classes)) for h in self.heads}

    def metrics(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        out: dict[str, float] = {}
        per_head = {}
        for h in self.heads:
            cm = stats[f"confusion/{h.name}"].double().cpu().numpy().round().astype(np.int64)
            m = metrics_from_confusion(cm, h.classes, h.name)
            per_head[h.name] = m
            out.update(m.scalars())
        self.last_confusion = per_head
        for key in ("accuracy", "balanced_accuracy", "macro_f1"):
            out[key] = float(np.mean([getattr(m, key) for m in per_head.values()])) if per_head else 0.0
        return out

    def example(self, batch: dict, output: dict) -> dict | None:
        return None

    def epoch_images(self, folder: Path) -> dict[str, Path]:
        """The last validation's slice-level confusion matrices, ``folder/confusion_<head>.png``
        (redrawn every epoch; the loop sends them to W&B), as ``{"confusion/<head>": path}``."""
        return write_confusion_pngs(self.last_confusion, folder)


def write_confusion_pngs(per_head: dict[str, HeadMetrics], folder: Path) -> dict[str, Path]:
    return {f"confusion/{h}": plot_confusion(m, Path(folder) / f"confusion_{h}.png",
                                             title=f"{h} (validation slices): bal. acc {m.balanced_accuracy:.3f}, n={m.n}")
            for h, m in per_head.items()}
