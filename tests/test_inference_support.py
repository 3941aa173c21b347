"""Helpers for the inference tests: phantom datasets and model folders built without the trainer."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from spineauto.io.atomic import write_json
from spineauto.planning.fingerprint import TRAINING_RANGE_FILE, Fingerprint, training_range
from spineauto.planning.plans import Plans

SMALL_FEATURES = [4, 8, 16, 32, 64]


def make_model_folder(preprocessed: Path, results: Path, configuration: str = "2d", folds=(0,), seed: int = 0,
                      normalization: str | None = None, features=SMALL_FEATURES, one_pass: bool = False) -> Path:
    """A model folder (plans, dataset.json, fold_k/checkpoint_final.pt) with random small networks;
    ``one_pass``: without the plan's localise-then-segment second pass."""
    from spineauto.networks.build import build_network

    plans = Plans.load(preprocessed / "plans.json")
    cfg = plans.configurations[configuration]
    n = cfg.network.n_stages
    cfg.network.features_per_stage = list(features[:n]) + [features[-1]] * max(0, n - len(features))
    if normalization:  # every configuration preprocessed alike must stay alike (plans validation)
        for other in plans.configurations.values():
            if other.data_identifier == cfg.data_identifier:
                other.normalization = [normalization] * len(other.normalization)
    if one_pass:
        cfg.localise = None
    folder = results / preprocessed.name / f"spineautoTrainer__spineautoPlans__{configuration}"
    folder.mkdir(parents=True, exist_ok=True)
    plans.save(folder / "plans.json")
    shutil.copy(preprocessed / "dataset.json", folder / "dataset.json")
    write_json(folder / TRAINING_RANGE_FILE, training_range(Fingerprint.load(preprocessed / "fingerprint.json")))  # as training does
    for k in folds:
        torch.manual_seed(seed + (k if isinstance(k, int) else 99))
        net = build_network(cfg, len(plans.channel_names), plans.num_classes)
        (folder / f"fold_{k}").mkdir(exist_ok=True)
        torch.save({"network": net.state_dict(), "configuration": configuration, "epoch": 0, "plans": plans.to_dict()},
                   folder / f"fold_{k}" / "checkpoint_final.pt")
    return folder


class OracleNet(nn.Module):
    """Reads the label off an input whose intensity is the label value (no normalisation): a perfect model."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def set_deep_supervision(self, enabled: bool) -> None:
        pass

    def forward(self, x):
        values = torch.arange(self.num_classes, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return {"seg": -20.0 * (x[:, :1] - values).abs()}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


def softmax_of_mean_log(probs: list[np.ndarray]) -> np.ndarray:
    """The softmax of averaged logits, from each pass's softmax probabilities (K, ...): each pass's
    per-voxel log-sum-exp cancels, so the mean log-probability gives it."""
    t = torch.from_numpy(np.mean([np.log(np.clip(p, 1e-30, None)) for p in probs], axis=0))
    return torch.softmax(t.double(), dim=0).numpy()
