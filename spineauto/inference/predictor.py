"""2D sliding-window prediction of a whole case in the slice-first layout: one pass of the networks
gives every output the configuration has.

:func:`run_networks` tiles every slice of a preprocessed case ``(C, S, H, W)`` with the plan's patch
size (zero-padded, centred, where a slice is smaller; nnunetv2's step computation, half-patch
overlap). Tiles of many slices go through each network (fold) and each mirrored copy (test-time
augmentation over ``plan.augmentation.mirror_axes``) together, once; from that one forward pass:

- segmentation: each tile's softmax weighted by nnunetv2's Gaussian importance map, giving
  probabilities ``(K, S, H, W)``. Every slice has the same in-plane size, so the Gaussian weight
  sum is one 2D map shared by all slices;
- classification heads: each tile's softmax, averaged over the slice's tiles, giving ``(S, K)``
  slice probabilities per head (each slice seen as in training: patch-sized windows).

Networks (folds) and mirrors are averaged for both.
"""
from __future__ import annotations

import itertools
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from spineauto.networks.outputs import seg_probabilities
from spineauto.planning.plans import ConfigurationPlan

log = logging.getLogger(__name__)
STEP_SIZE = 0.5  # tile overlap, as nnU-Net (segmentation and classification windows alike)
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


@dataclass
class NetworkOutput:
    """Everything one pass of the networks gives for a case."""

    seg: torch.Tensor | None  # (K, S, H, W) float32 softmax probabilities, on the device
    cls: dict[str, np.ndarray] | None  # head -> (S, K) slice probabilities


def run_networks(networks: Sequence[torch.nn.Module], data: np.ndarray, plan: ConfigurationPlan, device: torch.device,
                 tta: bool = True, batch_slices: int | None = None, amp: bool = True) -> NetworkOutput:
    """One sliding-window pass over a preprocessed case (C, S, H, W): segmentation probabilities
    and/or slice probabilities per classification head, as the plan's task has them.

    Averaged over ``networks`` (folds, on ``device``) and, with ``tta``, over all mirror
    combinations. ``batch_slices``: tiles per forward pass (default from the patch size and device).
    ``amp``: float16 autocast on CUDA.
    """
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    if not networks:
        raise ValueError("run_networks needs at least one network")
    want_seg, want_cls = plan.has_segmentation, plan.has_classification
    patch = tuple(int(p) for p in plan.patch_size)
    device = torch.device(device)
    batch = batch_slices or default_batch(patch, device)
    mirrors = [()] + (mirror_combinations(plan.augmentation.mirror_axes) if tta else [])
    autocast = torch.autocast("cuda", dtype=torch.float16) if (amp and device.type == "cuda") else nullcontext()

    with torch.inference_mode(), eval_mode(networks):
        x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(device)
        x, slicer = pad_nd_image(x, patch, "constant", {"value": 0}, True)  # centred, as the training sampler pads
        _, n_slices, height, width = x.shape
        steps = compute_steps_for_sliding_window((height, width), patch, STEP_SIZE)
        offsets = list(itertools.product(steps[0], steps[1]))
        tiles = [(s, y, z) for s in range(n_slices) for y, z in offsets]
        scale = 1.0 / (len(networks) * len(mirrors))
        acc = weight = gauss = None
        if want_seg:
            gauss = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=device, dtype=torch.float32)
            weight = torch.zeros((height, width), device=device)
            for y, z in offsets:
                weight[y:y + patch[0], z:z + patch[1]] += gauss
        cls_sum: dict[str, torch.Tensor] = {}
        for start in range(0, len(tiles), batch):
            chunk = tiles[start:start + batch]
            xb = torch.stack([x[:, s, y:y + patch[0], z:z + patch[1]] for s, y, z in chunk])
            probs, heads = None, {}
            for net in networks:
                for dims in mirrors:
                    with autocast:
                        out = net(torch.flip(xb, dims) if dims else xb)
                    if want_seg:
                        p = seg_probabilities(_seg_logits(out), plan.network.output_activation)  # softmax, or sigmoid (> 0.5)
                        if dims:
                            p = torch.flip(p, dims)
                        probs = p if probs is None else probs.add_(p)
                    if want_cls:
                        for head, logits in out["cls"].items():
                            p = torch.softmax(logits.float(), dim=1)
                            heads[head] = p if head not in heads else heads[head].add_(p)
            if want_seg:
                probs.mul_(scale).mul_(gauss)
                if acc is None:
                    acc = torch.zeros((probs.shape[1], n_slices, height, width), device=device)
                if len(offsets) == 1:  # one tile per slice: a single strided add
                    first = chunk[0][0]
                    acc[:, first:first + len(chunk)] += probs.transpose(0, 1)
                else:
                    for i, (s, y, z) in enumerate(chunk):
                        acc[:, s, y:y + patch[0], z:z + patch[1]] += probs[i]
            for head, p in heads.items():
                if head not in cls_sum:
                    cls_sum[head] = torch.zeros((n_slices, p.shape[1]), dtype=torch.float64, device=device)
                index = torch.tensor([s for s, _, _ in chunk], device=device)
                cls_sum[head].index_add_(0, index, p.double() * scale)
        seg = None
        if want_seg:
            acc /= weight
            seg = acc[(slice(None), *slicer[1:])]
        cls = {h: (v / len(offsets)).float().cpu().numpy() for h, v in cls_sum.items()} if want_cls else None
    return NetworkOutput(seg=seg, cls=cls)


def predict_layout(networks: list[torch.nn.Module], data: np.ndarray, plan: ConfigurationPlan, device: torch.device,
                   tta: bool = True, batch_slices: int | None = None, amp: bool = True) -> np.ndarray:
    """Softmax segmentation probabilities (K, S, H, W) float32 of one preprocessed case, as numpy."""
    return run_networks(networks, data, plan, device, tta, batch_slices, amp).seg.cpu().numpy().astype(np.float32, copy=False)
