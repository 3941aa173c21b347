"""Stage 1: pretrain a ResNet encoder on shards, supervised (classes) or self-supervised (SimCLR).

Self-supervised method: SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020, arXiv:2002.05709) with lightly's ``NTXentLoss`` and
``SimCLRProjectionHead`` (https://docs.lightly.ai). It suits CNN encoders, needs no momentum encoder
or queue, and its loss gathers negatives across DDP processes (``gather_distributed``). Two views of
each slice are drawn on the device, batched: random resized crops (torchvision's ``roi_align``,
area 20-100 %, aspect 3/4-4/3), flips, and contrast, brightness, gamma and noise changes; every view
is then z-scored per image, as ``ZScoreNormalization`` does per case downstream.

Supervised: the same encoder, a linear head on the pooled deepest features, cross-entropy with
label smoothing 0.1; crops of 50-100 % area and flips.

The checkpoint (``OUT/checkpoint_final.pt``, ``checkpoint_latest.pt`` every epoch, atomic) holds the
encoder as ``network: {"encoder.<torchvision name>": tensor}``: ``spineauto train --pretrained`` loads
it into any ``resnet``/``resnet_unet`` configuration of the same depth (cls, multitask, 2d ...).
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spineauto.devices import resolve_device
from spineauto.errors import SpineautoError
from spineauto.io.atomic import write_json
from spineauto.io.checkpoints import copy_checkpoint, load_checkpoint, save_checkpoint
from spineauto.networks.resnet import ResNetEncoder
from spineauto.pretraining.shards import ShardSet
from spineauto.training.distributed import DistInfo, init_distributed, shutdown

log = logging.getLogger(__name__)
METHODS = ("supervised", "simclr")


@dataclass
class PretrainOptions:
    method: str = "simclr"
    depth: int = 18
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    crop: int | None = None  # network input size (default: the shards' size)
    temperature: float = 0.1  # NT-Xent
    device: str = "auto"
    amp: bool | None = None
    num_workers: int = 2
    seed: int = 0
    max_iters_per_epoch: int | None = None  # cap an epoch (benchmarks, tests)
    continue_training: bool = False
    overwrite: bool = False
    progress: Callable[[int, int, str], None] | None = None  # (done, total, description)
    history: list = field(default_factory=list)


class _Batches(torch.utils.data.Dataset):
    """Whole batches as items (one memory-mapped read per batch, sorted by shard and row)."""

    def __init__(self, shards: ShardSet, batches: list[np.ndarray]):
        self.shards, self.batches = shards, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        idx = self.batches[i]
        return torch.from_numpy(self.shards.images(idx)), torch.from_numpy(self.shards.labels[idx])


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, info: DistInfo) -> list[np.ndarray]:
    """This rank's batches of one epoch: a seeded permutation, cut into global batches, split across ranks."""
    perm = np.random.default_rng(seed * 100003 + epoch).permutation(n)
    per = batch_size * info.world_size
    out = []
    for start in range(0, n - per + 1 if n >= per else 0, per):
        out.append(np.sort(perm[start:start + per][info.rank::info.world_size]))
    if not out:  # fewer images than one batch: one (smaller) batch
        out.append(np.sort(perm[info.rank::info.world_size]))
    return out


def make_loader(shards: ShardSet, batches: list[np.ndarray], num_workers: int, pin: bool):
    return torch.utils.data.DataLoader(_Batches(shards, batches), batch_size=None, shuffle=False, num_workers=num_workers,
                                       pin_memory=pin, persistent_workers=False, prefetch_factor=4 if num_workers else None)


# -- augmentation (batched, on the device) -----------------------------------------------------------

def random_views(x: torch.Tensor, out: int, scale: tuple[float, float], gen: torch.Generator, intensity: bool) -> torch.Tensor:
    """Random resized crops (+ flips, + intensity changes) of a float batch in [0, 1]; z-scored per image."""
    from torchvision.ops import roi_align

    b, _, h, w = x.shape
    dev = x.device
    u = lambda *s: torch.rand(*s, generator=gen).to(dev)  # noqa: E731 - the CPU generator keeps runs reproducible
    area = (scale[0] + (scale[1] - scale[0]) * u(b)) * h * w
    aspect = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u(b))
    cw = torch.sqrt(area * aspect).clamp(4, w)
    ch = torch.sqrt(area / aspect).clamp(4, h)
    x0, y0 = u(b) * (w - cw), u(b) * (h - ch)
    boxes = torch.stack([torch.arange(b, device=dev, dtype=x.dtype), x0, y0, x0 + cw, y0 + ch], 1)
    v = roi_align(x, boxes.to(x.dtype), (out, out), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    v = torch.where((u(b) < 0.5).view(b, 1, 1, 1), v.flip(-1), v)
    v = torch.where((u(b) < 0.5).view(b, 1, 1, 1), v.flip(-2), v)
    if intensity:
        gamma = torch.exp((u(b) - 0.5) * 2 * math.log(1.5)).view(b, 1, 1, 1)
        v = v.clamp(0, 1) ** gamma
        mean = v.mean(dim=(1, 2, 3), keepdim=True)
        v = (v - mean) * (0.6 + 0.8 * u(b)).view(b, 1, 1, 1) + mean + (u(b) - 0.5).view(b, 1, 1, 1) * 0.4
        v = v + torch.randn(v.shape, generator=gen).to(dev) * (0.1 * u(b)).view(b, 1, 1, 1)
    return zscore(v)


def zscore(v: torch.Tensor) -> torch.Tensor:
    mean = v.mean(dim=(1, 2, 3), keepdim=True)
    std = v.std(dim=(1, 2, 3), keepdim=True)
    return (v - mean) / (std + 1e-5)


# -- the model ----------------------------------------------------------------------------------------

class PretrainNet(nn.Module):
    def __init__(self, depth: int, in_channels: int, method: str, n_classes: int):
        super().__init__()
        self.encoder = ResNetEncoder(depth, in_channels)
        width = self.encoder.output_channels[-1]
        if method == "simclr":
            from lightly.models.modules import SimCLRProjectionHead

            self.head = SimCLRProjectionHead(width, 512, 128)
        else:
            self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(width, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)[-1].mean(dim=(2, 3)))


def check_options(o: PretrainOptions) -> None:
    """The training values, checked before any image is converted."""
    if o.batch_size < (2 if o.method == "simclr" else 1) or o.epochs < 1 or not 0 < o.lr < float("inf"):
        raise SpineautoError(f"--batch-size {o.batch_size} / --epochs {o.epochs} / --lr {o.lr}: batch >= 2 (SimCLR contrasts "
                             "the batch), epochs >= 1, lr > 0")


def pretrain(shard_folder: Path, out: Path, o: PretrainOptions) -> Path:
    """Train and write ``out/checkpoint_final.pt``; returns its path."""
    if o.method not in METHODS:
        raise SpineautoError(f"method {o.method!r}: use {' or '.join(METHODS)}")
    shards = ShardSet(shard_folder)
    if o.method == "supervised" and not shards.classes:
        raise SpineautoError(f"{shard_folder}: unlabeled images; supervised pretraining needs a class-folder tree")
    check_options(o)
    out = Path(out)
    latest, final = out / "checkpoint_latest.pt", out / "checkpoint_final.pt"
    if (latest.is_file() or final.is_file()) and not (o.continue_training or o.overwrite):
        raise SpineautoError(f"{out}: holds an earlier pretraining; resume it with --continue or replace it with --overwrite")
    if o.continue_training and not latest.is_file():
        raise SpineautoError(f"{latest}: no checkpoint to continue from; start without --continue")
    dev = resolve_device(o.device)
    info = init_distributed(dev.type)
    try:
        if info.enabled and dev.type == "cuda":
            dev = torch.device("cuda", info.local_rank)
        return _run(shards, out, o, dev, info)
    finally:
        shutdown(info)


def _run(shards: ShardSet, out: Path, o: PretrainOptions, dev: torch.device, info: DistInfo) -> Path:
    torch.manual_seed(o.seed)
    n_classes = len(shards.classes or [])
    net = PretrainNet(o.depth, shards.channels, o.method, n_classes).to(dev)
    if info.enabled and dev.type == "cuda":
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    crop = o.crop or shards.size
    iters = len(epoch_batches(len(shards), o.batch_size, 0, o.seed, info))
    if o.max_iters_per_epoch:
        iters = min(iters, o.max_iters_per_epoch)
    opt = torch.optim.AdamW(net.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    total_steps, warmup = o.epochs * iters, max(1, o.epochs * iters // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up over 5 % of the steps, then cosine to 0
        opt, lambda t: (t + 1) / warmup if t < warmup else 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, total_steps - warmup))))
    amp = (dev.type == "cuda") if o.amp is None else bool(o.amp)
    amp_dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if amp and dev.type == "cuda" else None
    if o.method == "simclr":
        from lightly.loss import NTXentLoss

        criterion = NTXentLoss(temperature=o.temperature, gather_distributed=info.enabled)
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    start, history = 0, []
    if o.continue_training:
        state = load_checkpoint(out / "checkpoint_latest.pt")
        saved = state.get("pretrain", {})
        if saved.get("method") != o.method or saved.get("depth") != o.depth or saved.get("shards") != shards.index["plan_sha"]:
            raise SpineautoError(f"{out / 'checkpoint_latest.pt'}: was pretrained with other settings ({saved.get('method')}, "
                                 f"ResNet-{saved.get('depth')}, shards {saved.get('shards')}); start over with --overwrite")
        net.load_state_dict({**{k: v for k, v in state["network"].items()}, **{f"head.{k}": v for k, v in state["head"].items()}})
        opt.load_state_dict(state["optimizer"])
        start, history = int(state["epoch"]), list(saved.get("history", []))
        sched.last_epoch = start * iters  # the schedule of this run's --epochs, at the step reached
    model = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None) if info.enabled else net
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        log.info("pretraining ResNet-%d (%s) on %d images, %d epoch(s) x %d iterations of batch %d, %s, AMP %s, %d process(es)",
                 o.depth, o.method, len(shards), o.epochs, iters, o.batch_size, dev, "on" if amp else "off", info.world_size)
    gen = torch.Generator().manual_seed(o.seed * 7919 + info.rank)
    autocast = (lambda: torch.autocast(dev.type, dtype=amp_dtype)) if amp else nullcontext
    for epoch in range(start, o.epochs):
        model.train()
        gen.manual_seed(o.seed * 7919 + info.rank + 104729 * epoch)
        loader = make_loader(shards, epoch_batches(len(shards), o.batch_size, epoch, o.seed, info)[:iters], o.num_workers,
                             dev.type == "cuda")
        total, wait, step_time, seen = 0.0, 0.0, 0.0, 0
        t_data = time.perf_counter()
        for i, (images, labels) in enumerate(loader):
            t0 = time.perf_counter()
            wait += t0 - t_data
            x = images.to(dev, non_blocking=True).float() / 255.0
            if o.method == "simclr":
                v0, v1 = (random_views(x, crop, (0.2, 1.0), gen, True) for _ in range(2))
                with autocast():
                    loss = criterion(model(v0).float(), model(v1).float())
            else:
                v0 = random_views(x, crop, (0.5, 1.0), gen, False)
                with autocast():
                    loss = criterion(model(v0).float(), labels.to(dev))
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise SpineautoError(f"{out}: the pretraining loss became NaN/inf in epoch {epoch}; lower --lr or turn AMP off "
                                     f"({out / 'checkpoint_latest.pt'} holds the last good epoch)")
            total += lv
            seen += len(images)
            t_data = time.perf_counter()
            step_time += t_data - t0
            if o.progress is not None and info.is_main:
                o.progress(epoch * iters + i + 1, o.epochs * iters, f"pretraining epoch {epoch} (loss {lv:.3f})")
        record = {"epoch": epoch, "loss": total / max(1, i + 1), "images": seen, "loader_wait_s": wait, "step_s": step_time,
                  "images_per_s": seen / max(wait + step_time, 1e-9), "lr": opt.param_groups[0]["lr"]}
        history.append(record)
        if info.is_main:
            log.info("epoch %d: loss %.4f, %.1f images/s (data wait %.1fs, steps %.1fs)", epoch, record["loss"], record["images_per_s"],
                     wait, step_time)
            state = {"network": {f"encoder.{k}": v for k, v in net.encoder.state_dict().items()},
                     "head": net.head.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "epoch": epoch + 1, "pretrain": {"method": o.method, "depth": o.depth, "in_channels": shards.channels,
                                                      "size": shards.size, "crop": crop, "classes": shards.classes,
                                                      "shards": shards.index["plan_sha"], "history": history,
                                                      "options": {k: v for k, v in asdict(o).items() if k not in ("progress", "history")}}}
            save_checkpoint(out / "checkpoint_latest.pt", state)
            write_json(out / "pretrain_history.json", history)
    if info.is_main:
        copy_checkpoint(out / "checkpoint_latest.pt", out / "checkpoint_final.pt")
    o.history = history
    return out / "checkpoint_final.pt"


def measure_loader(shard_folder: Path, batch_size: int, num_workers: int, batches: int = 50) -> float:
    """Images/s of the loader alone (memory-mapped reads, batching), for comparison with a training step."""
    shards = ShardSet(shard_folder)
    loader = make_loader(shards, epoch_batches(len(shards), batch_size, 0, 0, DistInfo())[:batches], num_workers, False)
    t0, n = time.perf_counter(), 0
    for images, _ in loader:
        n += len(images)
    return n / max(time.perf_counter() - t0, 1e-9)
