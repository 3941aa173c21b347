"""SyncBatchNorm under DDP on the CPU: two gloo processes normalise with the statistics of the whole
global batch, as one BatchNorm on that batch would, and end with the same running statistics."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spineauto.training.distributed import CpuSyncBatchNorm, convert_sync_batchnorm


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(), torch.nn.Conv2d(3, 1, 1))


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 6, 6, generator=g)
    x[2:] = x[2:] * 3 + 5  # rank 1's half differs from rank 0's: per-rank statistics would differ
    return x


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    result = {}
    for sync in (True, False):
        net = _net()
        if sync:
            convert_sync_batchnorm(net)
        model = torch.nn.parallel.DistributedDataParallel(net)
        for _ in range(2):
            y = model(_batch()[2 * rank:2 * rank + 2])
            y.square().mean().backward()
        bn = net[1]
        result[sync] = {"y": y.detach(), "grad": bn.weight.grad.clone(), "mean": bn.running_mean.clone(),
                        "var": bn.running_var.clone(), "conv_grad": net[0].weight.grad.clone()}
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_ranks_normalise_as_one_batchnorm_on_the_global_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2)
    (r0, r1), (p0, p1) = ([torch.load(tmp_path / f"rank{r}.pt")[sync] for r in range(2)] for sync in (True, False))
    ref = _net()  # one process, the whole batch (DDP averages the ranks' gradients of their halves' means)
    for _ in range(2):
        ref.zero_grad()
        y = ref(_batch())
        y.square().mean().backward()
    bn = ref[1]
    for r in (r0, r1):
        torch.testing.assert_close(r["mean"], bn.running_mean)
        torch.testing.assert_close(r["var"], bn.running_var)
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), y.detach(), rtol=1e-4, atol=1e-5)
    # the ranks accumulate both backward passes (no zero_grad there): twice the reference's last gradient
    torch.testing.assert_close(r0["grad"], 2 * bn.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r0["conv_grad"], r1["conv_grad"])
    assert (p0["mean"] - p1["mean"]).abs().max() > 0.1  # plain BatchNorm: each rank its own half's statistics


def test_conversion_keeps_parameters_buffers_and_state_dict_keys():
    net = _net()
    keys = list(net.state_dict())
    weight = net[1].weight
    assert convert_sync_batchnorm(net) == 1
    assert isinstance(net[1], CpuSyncBatchNorm) and net[1].weight is weight and list(net.state_dict()) == keys
    x = _batch()
    net.eval()
    plain = _net().eval()
    torch.testing.assert_close(net(x), plain(x))  # no process group: plain BatchNorm
