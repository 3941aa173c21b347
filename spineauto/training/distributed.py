"""DDP: process group from torchrun's environment (gloo on CPU, NCCL on CUDA), and a launcher.

``torchrun --nproc_per_node N -m spineauto train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; a run
without them is a single process. ``--num-gpus N`` relaunches the same command through torchrun.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from spineauto.errors import SpineautoError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def rank_batch_size(global_batch: int, info: DistInfo) -> int:
    """nnU-Net's split of the global batch over ranks (the first ranks take the remainder)."""
    if global_batch < info.world_size:
        raise SpineautoError(f"batch size {global_batch} is smaller than the {info.world_size} DDP processes; "
                             "use fewer processes or raise batch_size in plans.json")
    base, extra = divmod(global_batch, info.world_size)
    return base + (1 if info.rank < extra else 0)


def relaunch_with_torchrun(n: int, argv: list[str]) -> int:
    """Run ``spineauto <argv>`` under ``torchrun --nproc_per_node n``; returns its exit code."""
    if n < 2:
        raise SpineautoError(f"--num-gpus {n}: use 2 or more for DDP (1 trains in this process)")
    if torch.cuda.is_available() and torch.cuda.device_count() < n:
        raise SpineautoError(f"--num-gpus {n}: only {torch.cuda.device_count()} CUDA device(s) visible")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "spineauto", *argv]
    return subprocess.call(cmd)
