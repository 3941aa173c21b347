"""2D sliding-window prediction of a whole case in the slice-first layout.

:func:`predict_layout` turns a preprocessed case ``(C, S, H, W)`` into softmax probabilities
``(K, S, H, W)``: every slice is tiled with the plan's patch size (nnunetv2's step computation,
half-patch overlap), tiles of many slices go through the network together, each tile's softmax is
weighted by nnunetv2's Gaussian importance map, mirrored copies (test-time augmentation over
``plan.augmentation.mirror_axes``) and networks (folds) are averaged.

Because every slice of a case has the same in-plane size, the Gaussian weight sum is one 2D map
shared by all slices: the accumulator is only ``(K, S, H, W)``.
"""
from __future__ import annotations

import itertools
import logging
from contextlib import contextmanager, nullcontext
from typing import Iterator, Sequence

import numpy as np
import torch

from spineauto.planning.plans import ConfigurationPlan

log = logging.getLogger(__name__)
STEP_SIZE = 0.5  # tile overlap, as nnU-Net
TILE_PIXELS_PER_BATCH = {"cuda": 2 ** 22, "cpu": 2 ** 19}  # batch size = this / patch pixels


def mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty subset of the spatial mirror axes, as tensor dims of a (B, C, H, W) batch."""
    dims = [int(a) + 2 for a in mirror_axes if 0 <= int(a) < 2]
    return [c for n in range(1, len(dims) + 1) for c in itertools.combinations(dims, n)]


def default_batch(patch_size: Sequence[int], device: torch.device) -> int:
    budget = TILE_PIXELS_PER_BATCH["cuda" if device.type == "cuda" else "cpu"]
    return max(1, int(budget // int(np.prod(patch_size))))


@contextmanager
def eval_mode(networks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Eval mode and deep supervision off; both restored afterwards (the trainer validates mid-run)."""
    states = []
    for net in networks:
        ds = getattr(getattr(net, "decoder", None), "deep_supervision", None)
        states.append((net.training, ds))
        net.eval()
        if hasattr(net, "set_deep_supervision"):
            net.set_deep_supervision(False)
    try:
        yield
    finally:
        for net, (training, ds) in zip(networks, states):
            net.train(training)
            if ds is not None:
                net.set_deep_supervision(ds)


def _seg_logits(out) -> torch.Tensor:
    seg = out["seg"] if isinstance(out, dict) else out
    if isinstance(seg, (list, tuple)):
        seg = seg[0]
    return seg


def predict_layout(networks: list[torch.nn.Module], data: np.ndarray, plan: ConfigurationPlan, device: torch.device,
                   tta: bool = True, batch_slices: int | None = None, amp: bool = True) -> np.ndarray:
    """Softmax probabilities (K, S, H, W) float32 of one preprocessed case (C, S, H, W).

    Averaged over ``networks`` (folds) and, with ``tta``, over all mirror combinations. Networks
    must live on ``device``. ``batch_slices`` is the number of tiles per forward pass (default from
    the patch size and device). ``amp`` uses float16 autocast on CUDA.
    """
    probs = predict_probabilities(networks, data, plan, device, tta, batch_slices, amp)
    return probs.cpu().numpy().astype(np.float32, copy=False)


def predict_probabilities(networks: list[torch.nn.Module], data: np.ndarray, plan: ConfigurationPlan, device: torch.device,
                          tta: bool = True, batch_slices: int | None = None, amp: bool = True) -> torch.Tensor:
    """As :func:`predict_layout`, but the (K, S, H, W) float32 tensor stays on ``device``."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    if not networks:
        raise ValueError("predict_layout needs at least one network")
    patch = tuple(int(p) for p in plan.patch_size)
    device = torch.device(device)
    batch = batch_slices or default_batch(patch, device)
    mirrors = [()] + (mirror_combinations(plan.augmentation.mirror_axes) if tta else [])
    autocast = torch.autocast("cuda", dtype=torch.float16) if (amp and device.type == "cuda") else nullcontext()

    with torch.inference_mode(), eval_mode(networks):
        x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(device)
        x, slicer = pad_nd_image(x, patch, "constant", {"value": 0}, True)
        _, n_slices, height, width = x.shape
        steps = compute_steps_for_sliding_window((height, width), patch, STEP_SIZE)
        offsets = list(itertools.product(steps[0], steps[1]))
        gauss = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=device, dtype=torch.float32)
        weight = torch.zeros((height, width), device=device)
        for y, z in offsets:
            weight[y:y + patch[0], z:z + patch[1]] += gauss
        tiles = [(s, y, z) for s in range(n_slices) for y, z in offsets]
        acc = None
        scale = 1.0 / (len(networks) * len(mirrors))
        for start in range(0, len(tiles), batch):
            chunk = tiles[start:start + batch]
            xb = torch.stack([x[:, s, y:y + patch[0], z:z + patch[1]] for s, y, z in chunk])
            probs = None
            for net in networks:
                for dims in mirrors:
                    inp = torch.flip(xb, dims) if dims else xb
                    with autocast:
                        logits = _seg_logits(net(inp))
                    p = torch.softmax(logits.float(), dim=1)
                    if dims:
                        p = torch.flip(p, dims)
                    probs = p if probs is None else probs.add_(p)
            probs.mul_(scale).mul_(gauss)
            if acc is None:
                acc = torch.zeros((probs.shape[1], n_slices, height, width), device=device)
            if len(offsets) == 1:  # one tile per slice: a single strided add
                first = chunk[0][0]
                acc[:, first:first + len(chunk)] += probs.transpose(0, 1)
            else:
                for i, (s, y, z) in enumerate(chunk):
                    acc[:, s, y:y + patch[0], z:z + patch[1]] += probs[i]
        acc /= weight
        return acc[(slice(None), *slicer[1:])]
