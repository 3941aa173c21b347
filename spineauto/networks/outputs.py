"""Segmentation logits -> per-label probabilities, as the plan's ``network.output_activation`` says.

softmax: the usual, channels sum to 1. sigmoid (losses such as dice_bce): channel k >= 1 is the
probability of label k on its own; channel 0 becomes ``1 - max_k p_k``, so that the argmax the
predictor, the ensembles and the validation take labels a voxel k exactly where p_k > 0.5 (the
largest such k's probability wins where several exceed it).
"""
from __future__ import annotations

import torch


def seg_probabilities(logits: torch.Tensor, activation: str = "softmax") -> torch.Tensor:
    """(B, C, ...) logits -> (B, C, ...) float32 probabilities."""
    if activation == "sigmoid":
        p = torch.sigmoid(logits.float())
        if p.shape[1] > 1:
            p[:, 0] = 1 - p[:, 1:].amax(1)
        return p
    return torch.softmax(logits.float(), dim=1)


def seg_labels(logits: torch.Tensor, activation: str = "softmax") -> torch.Tensor:
    """(B, C, ...) logits -> (B, ...) label values."""
    if activation == "sigmoid":
        return seg_probabilities(logits, activation).argmax(1)
    return logits.argmax(1)
