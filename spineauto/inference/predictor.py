"""2D sliding-window prediction of a whole case in the slice-first layout: one pass of the networks
gives every output the configuration has.

:func:`run_networks` tiles every slice of a preprocessed case ``(C, S, H, W)`` with the plan's patch
size (zero-padded, centred, where a slice is smaller; nnunetv2's step computation, half-patch
overlap). Tiles of many slices go through each network (fold) and each mirrored copy (test-time
augmentation over ``plan.augmentation.mirror_axes``) together, once; from that one forward pass:

- segmentation: each tile's logits weighted by nnunetv2's Gaussian importance map and averaged over
  networks (folds), mirrors and tiles, as nnunetv2's predictor averages them, then the softmax
  (sigmoid for regions), giving probabilities ``(K, S, H, W)``. Every slice has the same in-plane
  size, so the Gaussian weight sum is one 2D map shared by all slices;
- classification heads: each tile's softmax, averaged over the slice's tiles, giving ``(S, K)``
  slice probabilities per head (each slice seen as in training: patch-sized windows).

Networks (folds) and mirrors are averaged for both (segmentation logits, classification probabilities;
averaging logits left fewer false positives on whole necks than averaging probabilities: README,
"Averaging logits"). With ``pass_channel`` (the cord label), each
mirrored pass's own probability of that one channel (its logits averaged over the networks) is handed over
too, slab by slab, so that the cord choice can tell whether the passes agree
(:class:`spineauto.inference.restore.Restoration` keeps one bit per pass and voxel of it). The case runs in slabs of whole slices, so a
caller that takes the probabilities slab by slab (the case driver restores each into the mask at
once) never holds a whole case's probabilities: beyond the case itself, memory is bounded by the
slab and the tile batch, whatever the number of slices.
"""
from __future__ import annotations

import itertools
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from spineauto.networks.outputs import regions_to_labels, seg_probabilities
from spineauto.planning.plans import ConfigurationPlan

log = logging.getLogger(__name__)
STEP_SIZE = 0.5  # tile overlap, as nnU-Net (segmentation and classification windows alike)
# tiles per forward pass = this / patch pixels. CPU: 8 tiles of 80x96 (the phantom plan, 256x256x40 volume,
# TTA off, 2 cores): 31 s and 186 MB above the loaded model at its peak; 68 tiles (2 ** 19): 37 s and 753 MB
TILE_PIXELS_PER_BATCH = {"cuda": 2 ** 22, "cpu": 2 ** 16}
SLAB_PIXELS = 2 ** 22  # padded slice pixels run (and held as probabilities) at a time


def mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty subset of the spatial mirror axes, as tensor dims of a (B, C, H, W) batch."""
    dims = [int(a) + 2 for a in mirror_axes if 0 <= int(a) < 2]
    return [c for n in range(1, len(dims) + 1) for c in itertools.combinations(dims, n)]


def pass_names(mirror_axes: Sequence[int]) -> list[str]:
    """What to call each pass of a test-time-augmented prediction, in :func:`run_networks`' order."""
    return ["the unmirrored pass"] + [f"the pass mirrored on in-plane axis {' and '.join(str(d - 2) for d in dims)}"
                                      for dims in mirror_combinations(mirror_axes)]


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
                 tta: bool = True, batch_slices: int | None = None, amp: bool = True,
                 seg_sink: Callable[[int, torch.Tensor], None] | None = None, region_order: list[int] | None = None,
                 pass_channel: int | None = None, pass_sink: Callable[[int, torch.Tensor], None] | None = None) -> NetworkOutput:
    """One sliding-window pass over a preprocessed case (C, S, H, W): segmentation probabilities
    and/or slice probabilities per classification head, as the plan's task has them.

    ``region_order`` (region-based labels: ``Plans.region_order``): the region logits, averaged over
    networks, mirrors and tiles as nnU-Net averages them, through the sigmoid become per-label scores whose
    argmax paints the regions in that order (:func:`spineauto.networks.outputs.regions_to_labels`).

    Logits averaged over ``networks`` (folds, on ``device``) and, with ``tta``, over all mirror
    combinations, then the softmax (sigmoid). ``batch_slices``: tiles per forward pass (default from the patch size and device).
    ``amp``: float16 autocast on CUDA.

    The case runs in slabs of whole slices (about ``SLAB_PIXELS`` padded pixels each): one slab at a
    time is padded and accumulated. With ``seg_sink``, each finished slab's probabilities
    ``(K, n, H, W)`` go to ``seg_sink(first_slice, probabilities)`` and are not kept, so the memory
    the pass needs does not grow with the number of slices (``NetworkOutput.seg`` is then None);
    without it they are joined into the whole case's.

    ``pass_channel`` and ``pass_sink`` (test-time augmentation on, more than one pass): each slab's
    probability of output channel ``pass_channel`` per pass (the unmirrored one first, then
    :func:`mirror_combinations`' order), from that pass's logits averaged over the networks and tiles
    (not over the mirrors), go to ``pass_sink(first_slice, (passes, n, H, W))``; every channel's logits
    of every pass are held for one slab.
    """
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    if not networks:
        raise ValueError("run_networks needs at least one network")
    patch = tuple(int(p) for p in plan.patch_size)
    device = torch.device(device)
    mirrors = [()] + (mirror_combinations(plan.augmentation.mirror_axes) if tta else [])
    height, width = (max(s, p) for s, p in zip(data.shape[2:], patch))  # the padded slice
    steps = compute_steps_for_sliding_window((height, width), patch, STEP_SIZE)
    want_passes = pass_channel is not None and pass_sink is not None and len(mirrors) > 1 and plan.has_segmentation
    tiles = _TilePass(list(networks), plan, patch, list(itertools.product(steps[0], steps[1])), batch_slices or default_batch(patch, device),
                      mirrors, 1.0 / (len(networks) * len(mirrors)),
                      torch.autocast("cuda", dtype=torch.float16) if (amp and device.type == "cuda") else nullcontext(),
                      pass_channel=pass_channel if want_passes else None)
    per_slab = max(1, SLAB_PIXELS // (height * width))
    slabs: list[torch.Tensor] = []
    heads: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode(), eval_mode(networks):
        weight = None
        if plan.has_segmentation:
            tiles.gauss = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=device, dtype=torch.float32)
            weight = torch.zeros((height, width), device=device)
            for y, z in tiles.offsets:
                weight[y:y + patch[0], z:z + patch[1]] += tiles.gauss
        for first in range(0, data.shape[1], per_slab):
            x, crop = _padded_slab(data[:, first:first + per_slab], patch, device)
            acc, slab_heads, passes = tiles(x)
            for head, p in slab_heads.items():
                heads.setdefault(head, []).append(p)
            if passes is not None:
                passes = passes.div_(weight).unflatten(0, (len(tiles.mirrors), -1))[(slice(None), slice(None), slice(None), *crop)]
                pass_sink(first, seg_probabilities(passes, plan.network.output_activation)[:, pass_channel])
            if acc is not None:
                logits = acc.div_(weight)[(slice(None), slice(None), *crop)]
                probs = seg_probabilities(logits.transpose(0, 1), plan.network.output_activation).transpose(0, 1)
                if region_order:
                    probs = regions_to_labels(probs[None], region_order)[0]
                if seg_sink is not None:
                    seg_sink(first, probs)
                else:
                    slabs.append(probs)
        seg = (slabs[0] if len(slabs) == 1 else torch.cat(slabs, dim=1)) if slabs else None
        cls = {h: (torch.cat(v) / len(tiles.offsets)).float().cpu().numpy() for h, v in heads.items()} if plan.has_classification else None
    return NetworkOutput(seg=seg, cls=cls)


def _padded_slab(part: np.ndarray, patch: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(C, n, h, w) -> float32 on ``device``, zero-padded (centred) in-plane to at least ``patch``, and the in-plane crop back."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    x = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32)).to(device)
    x, slicer = pad_nd_image(x, patch, "constant", {"value": 0}, True)  # centred, as the training sampler pads
    return x, tuple(slicer[2:])


@dataclass
class _TilePass:
    """Every tile of a padded slab through every network and mirror, ``batch`` tiles at a time."""

    networks: list[torch.nn.Module]
    plan: ConfigurationPlan
    patch: tuple[int, ...]
    offsets: list[tuple[int, int]]  # in-plane tile corners, the same for every slice
    batch: int
    mirrors: list[tuple[int, ...]]
    scale: float  # 1 / (networks x mirrors)
    autocast: Any
    gauss: torch.Tensor | None = None  # the importance map (segmentation)
    pass_channel: int | None = None  # also sum the logits per mirror (pass), over the networks

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, torch.Tensor], torch.Tensor | None]:
        """(C, n, H, W) -> the Gaussian-weighted logit sum (K, n, H, W) (None without segmentation),
        per classification head the sum of its tiles' probabilities per slice (n, K), and with
        ``pass_channel`` the Gaussian-weighted logit sum per pass (passes x K, n, H, W) (else None)."""
        ph, pw = self.patch
        want_seg, want_cls = self.plan.has_segmentation, self.plan.has_classification
        n = x.shape[1]
        tiles = [(s, y, z) for s in range(n) for y, z in self.offsets]
        acc, cls_sum, pass_acc = None, {}, None
        ch = self.pass_channel
        for start in range(0, len(tiles), self.batch):
            chunk = tiles[start:start + self.batch]
            xb = torch.stack([x[:, s, y:y + ph, z:z + pw] for s, y, z in chunk])
            seg_sum, heads, per_pass = None, {}, None
            for net in self.networks:
                for m, dims in enumerate(self.mirrors):
                    with self.autocast:
                        out = net(torch.flip(xb, dims) if dims else xb)
                    if want_seg:
                        logits = _seg_logits(out).float()
                        if dims:
                            logits = torch.flip(logits, dims)
                        if ch is not None:  # this pass's own logits
                            if per_pass is None:
                                per_pass = torch.zeros((len(self.mirrors), *logits.shape), device=logits.device)
                            per_pass[m] += logits
                        seg_sum = logits if seg_sum is None else seg_sum.add_(logits)
                    if want_cls:
                        for head, logits in out["cls"].items():
                            p = torch.softmax(logits.float(), dim=1)
                            heads[head] = p if head not in heads else heads[head].add_(p)
            if want_seg:
                seg_sum.mul_(self.scale).mul_(self.gauss)
                if acc is None:
                    acc = torch.zeros((seg_sum.shape[1], n, *x.shape[2:]), device=x.device)
                _add_tiles(acc, seg_sum.transpose(0, 1), chunk, self.offsets, self.patch)
                if per_pass is not None:  # (passes, B, K, h, w) -> (passes x K, B, h, w)
                    per_pass = per_pass.mul_(self.gauss / len(self.networks)).transpose(1, 2).flatten(0, 1)
                    if pass_acc is None:
                        pass_acc = torch.zeros((per_pass.shape[0], n, *x.shape[2:]), device=x.device)
                    _add_tiles(pass_acc, per_pass, chunk, self.offsets, self.patch)
            if heads:
                index = torch.tensor([s for s, _, _ in chunk], device=x.device)
            for head, p in heads.items():
                if head not in cls_sum:
                    cls_sum[head] = torch.zeros((n, p.shape[1]), dtype=torch.float64, device=x.device)
                cls_sum[head].index_add_(0, index, p.double() * self.scale)
        return acc, cls_sum, pass_acc


def _add_tiles(acc: torch.Tensor, tiles: torch.Tensor, chunk: list[tuple[int, int, int]], offsets: list[tuple[int, int]],
               patch: tuple[int, ...]) -> None:
    """Add tiles (C, B, ph, pw) at their (slice, y, z) corners of ``chunk`` into ``acc`` (C, n, H, W)."""
    ph, pw = patch
    if len(offsets) == 1:  # one tile per slice: a single strided add
        s0 = chunk[0][0]
        acc[:, s0:s0 + len(chunk)] += tiles
    else:
        for i, (s, y, z) in enumerate(chunk):
            acc[:, s, y:y + ph, z:z + pw] += tiles[:, i]


def predict_layout(networks: list[torch.nn.Module], data: np.ndarray, plan: ConfigurationPlan, device: torch.device,
                   tta: bool = True, batch_slices: int | None = None, amp: bool = True) -> np.ndarray:
    """Softmax segmentation probabilities (K, S, H, W) float32 of one preprocessed case, as numpy."""
    return run_networks(networks, data, plan, device, tta, batch_slices, amp).seg.cpu().numpy().astype(np.float32, copy=False)
