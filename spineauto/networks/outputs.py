"""Segmentation logits -> per-label probabilities, as the plan's ``network.output_activation`` says.

softmax: the usual, channels sum to 1. sigmoid (losses such as dice_bce): channel k >= 1 is the
probability of label k on its own; channel 0 becomes ``1 - max_k p_k``, so that the argmax the
predictor, the ensembles and the validation take labels a voxel k exactly where p_k > 0.5 (the
largest such k's probability wins where several exceed it).

Region-based labels (nnU-Net's): sigmoid channel k is region k's probability, and the regions are
painted in ``order`` (a later region over an earlier one where both exceed 0.5, e.g. lesion inside
cord). The probabilities become per-label scores whose argmax is exactly that painting:
``q_k = min(p_k, 1 - max(p of the regions painted after k))``, ``q_0 = 1 - max_k p_k``.
"""
from __future__ import annotations

import torch


def seg_probabilities(logits: torch.Tensor, activation: str = "softmax", order: list[int] | None = None) -> torch.Tensor:
    """(B, C, ...) logits -> (B, C, ...) float32 probabilities (``order``: the regions' painting order)."""
    if activation == "sigmoid":
        p = torch.sigmoid(logits.float())
        if order:
            return regions_to_labels(p, order)
        if p.shape[1] > 1:
            p[:, 0] = 1 - p[:, 1:].amax(1)
        return p
    return torch.softmax(logits.float(), dim=1)


def regions_to_labels(p: torch.Tensor, order: list[int]) -> torch.Tensor:
    """(B, C, ...) sigmoid region probabilities (channel 0 unused) -> per-label scores painted in ``order``."""
    q = torch.empty_like(p)
    q[:, 0] = 1 - p[:, 1:].amax(1)
    after = torch.zeros_like(p[:, 0])  # the largest probability of the regions painted later
    for k in reversed(order):
        q[:, k] = torch.minimum(p[:, k], 1 - after)
        after = torch.maximum(after, p[:, k])
    return q


def seg_labels(logits: torch.Tensor, activation: str = "softmax", order: list[int] | None = None) -> torch.Tensor:
    """(B, C, ...) logits -> (B, ...) label values."""
    if activation == "sigmoid":
        return seg_probabilities(logits, activation, order).argmax(1)
    return logits.argmax(1)
