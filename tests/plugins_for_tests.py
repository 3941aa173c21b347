"""A user's plug-ins of every kind, named from run YAMLs as ``plugins_for_tests:Name`` (tests/ is on
sys.path in the tests; a subprocess gets it through PYTHONPATH). Each leaves a trace the tests check."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from spineauto.training.callbacks import Callback
from spineauto.training.tasks import SegmentationTask

CALLS: dict[str, int] = {}


def _count(name: str) -> None:
    CALLS[name] = CALLS.get(name, 0) + 1


class TinyNet(nn.Module):
    """Two convolutions at full resolution and one at half: segmentation logits (B, num_classes, H, W)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 8):
        super().__init__()
        self.inc = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.LeakyReLU(), nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU())
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.LeakyReLU())
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.out = nn.Conv2d(2 * width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.inc(x)
        b = self.up(self.down(a))
        return self.out(torch.cat([a, b[..., : a.shape[-2], : a.shape[-1]]], 1))


class CrossEntropyPlusOne(nn.Module):
    """Cross-entropy on label maps, offset by ``offset`` (so that a test sees it was this loss)."""

    def __init__(self, offset: float = 0.0):
        super().__init__()
        self.offset = offset

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _count("loss")
        return nn.functional.cross_entropy(logits.float(), target[:, 0].long()) + self.offset


class SigmoidLoss(nn.Module):
    """A sigmoid loss (declares it): binary cross-entropy per foreground label."""

    activation = "sigmoid"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = torch.arange(1, logits.shape[1], device=logits.device).view(1, -1, 1, 1)
        return nn.functional.binary_cross_entropy_with_logits(logits[:, 1:].float(), (target.long() == k).float())


class CountingSGD(torch.optim.SGD):
    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9):
        super().__init__(params, lr=lr, weight_decay=weight_decay, momentum=momentum)

    def step(self, closure=None):
        _count("optimizer")
        return super().step(closure)


class HalvingSchedule(torch.optim.lr_scheduler.LambdaLR):
    """The rate halves every ``every`` steps."""

    def __init__(self, optimizer, total_steps: int, every: int = 2):
        self.total_steps = total_steps
        super().__init__(optimizer, lambda step: 0.5 ** (step // every))


class RecordingCallback(Callback):
    """Writes every epoch's record and its hooks to ``fold_k/<file>``."""

    def __init__(self, file: str = "plugin_callback.jsonl"):
        self.file = file
        self.epochs: list[int] = []

    def on_epoch_end(self, trainer, record: dict) -> None:
        self.epochs.append(int(record["epoch"]))
        with open(Path(trainer.run.fold_dir) / self.file, "a") as f:
            f.write(json.dumps({"epoch": record["epoch"], "train_loss": record["train_loss"]}) + "\n")

    def state_dict(self) -> dict:
        return {"epochs": self.epochs}

    def load_state_dict(self, state: dict) -> None:
        self.epochs = list(state["epochs"])


class CountingTask(SegmentationTask):
    """The segmentation task, counting its loss calls."""

    def loss(self, output: dict, batch: dict) -> torch.Tensor:
        _count("task")
        return super().loss(output, batch)


class InvertTransform:
    """A batchgenerators-style transform: flips the intensity sign of the batch with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, **batch):
        if np.random.uniform() < self.p:
            batch["data"] = -batch["data"]
        return batch


class NotAPlugin:
    """A class of no plug-in kind."""


not_a_class = 42
