"""DDP: process group from torchrun's environment (gloo on CPU, NCCL on CUDA), and a launcher.

``torchrun --nproc_per_node N -m spineauto train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; a run
without them is a single process. ``--num-gpus N`` relaunches the same command through torchrun;
``--nnodes M --rdzv-endpoint HOST:PORT`` (run on each of M nodes) joins them through torchrun's
rendezvous into one job of N x M processes.
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
    backend: str | None = None  # "nccl" or "gloo" when a process group is up (every run torchrun launched)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """The process group of a torchrun launch (also of one process: ``--nproc_per_node=1`` runs DDP
    over NCCL/gloo as a larger job would); a plain run is a single process without one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return DistInfo()
    backend = "nccl" if device_type == "cuda" else "gloo"
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")), backend)
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    info.backend = dist.get_backend()
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


# options of `spineauto train` that choose the launch; the relaunched command runs without them
LAUNCH_OPTIONS = ("--num-gpus", "--nnodes", "--rdzv-endpoint", "--rdzv-id")


def strip_launch_options(argv: list[str]) -> list[str]:
    """``argv`` without the launch options (``--num-gpus 2`` and ``--num-gpus=2`` forms alike)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in LAUNCH_OPTIONS:
            skip = True
        elif not a.startswith(tuple(f"{o}=" for o in LAUNCH_OPTIONS)):
            out.append(a)
    return out


def torchrun_command(n: int, argv: list[str], nnodes: int = 1, rdzv_endpoint: str | None = None,
                     rdzv_id: str | None = None) -> list[str]:
    """``torchrun`` running ``spineauto <argv>`` in ``n`` processes per node on ``nnodes`` nodes.

    One node: ``--standalone``. Several: every node runs the same command and they meet at
    ``rdzv_endpoint`` (host:port of one of them; torchrun's c10d rendezvous, the first launcher there
    hosts it), under ``rdzv_id`` (default ``$SLURM_JOB_ID``, else "spineauto"). Ranks are global:
    rank 0 writes the model folder, so the results folder must be the same shared path on every node.
    """
    if n < 1 or nnodes < 1:
        raise SpineautoError(f"--num-gpus {n} --nnodes {nnodes}: both must be at least 1")
    if n < 2 and nnodes < 2:
        raise SpineautoError(f"--num-gpus {n}: use 2 or more for DDP (1 trains in this process), or --nnodes N with --rdzv-endpoint")
    if torch.cuda.is_available() and torch.cuda.device_count() < n:
        raise SpineautoError(f"--num-gpus {n}: only {torch.cuda.device_count()} CUDA device(s) visible")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        if not rdzv_endpoint or ":" not in rdzv_endpoint:
            raise SpineautoError(f"--nnodes {nnodes}: give --rdzv-endpoint HOST:PORT (a port open on one of the nodes, e.g. "
                                 "the first host of $SLURM_JOB_NODELIST and 29500)")
        rid = rdzv_id or os.environ.get("SLURM_JOB_ID") or "spineauto"
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rid}"]
    return cmd + ["-m", "spineauto", *argv]


def relaunch_with_torchrun(n: int, argv: list[str], nnodes: int = 1, rdzv_endpoint: str | None = None,
                           rdzv_id: str | None = None) -> int:
    """Run ``spineauto <argv>`` (launch options removed) under torchrun; returns its exit code."""
    return subprocess.call(torchrun_command(n, strip_launch_options(argv), nnodes, rdzv_endpoint, rdzv_id))


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; every rank's total depends on every rank's part, so the gradient is summed too."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class CpuSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm (statistics of the whole global batch, every rank alike) for CPU training under
    gloo, where ``torch.nn.SyncBatchNorm`` refuses to run: the per-channel sums and counts are
    all-reduced (gradients through them too). Its state-dict keys are
    BatchNorm's; outside a process group (or in eval mode) it is plain BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        xf = x.float()  # statistics in float32 whatever the autocast dtype: E[x^2] - mean^2 cancels in bfloat16
        count = torch.full((1,), x.numel() / c, dtype=xf.dtype, device=x.device)
        totals = _AllReduceSum.apply(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        n = totals[-1]
        mean = totals[:c] / n
        var = (totals[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        y = y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y
        return y.to(x.dtype)


def convert_sync_batchnorm(network: torch.nn.Module) -> int:
    """Make every BatchNorm layer of ``network`` (in place) normalise over the global DDP batch:
    ``torch.nn.SyncBatchNorm`` on accelerators, :class:`CpuSyncBatchNorm` on the CPU; the same
    parameters, running statistics and state-dict keys. Returns how many layers it converted."""
    bn = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bn:
        return 0
    if next(network.parameters()).device.type != "cpu":
        converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
        assert converted is network  # the network itself is never a BatchNorm layer
        return len(bn)
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(child, CpuSyncBatchNorm):
                sync = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
                if child.affine:
                    sync.weight, sync.bias = child.weight, child.bias
                if child.track_running_stats:
                    sync.running_mean, sync.running_var, sync.num_batches_tracked = child.running_mean, child.running_var, child.num_batches_tracked
                setattr(parent, name, sync.train(child.training))
    return len(bn)
