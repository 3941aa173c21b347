"""Activation checkpointing (trainer.activation_checkpointing): memory of one training step with and
without it, on the default 2D plan's U-Net (5 stages, 32-512 features, deep supervision).

Each variant runs in a fresh process (so that peak resident memory is its own) and reports: the bytes
autograd keeps for the backward pass (saved tensors, counted with torch.autograd.graph.saved_tensors_hooks),
the peak resident set size (ru_maxrss) of the process, and the step's time. On CUDA it also reports
torch.cuda.max_memory_allocated.

    python bench/bench_activation_checkpointing.py [--batch 8] [--size 256] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(checkpointed: bool, batch: int, size: int, device: str) -> dict:
    import torch

    from spineauto.networks.build import build_network, checkpoint_activations
    from spineauto.planning.plans import ConfigurationPlan, NetworkPlan

    torch.manual_seed(0)
    plan = ConfigurationPlan(name="2d", task="segmentation", data_identifier="2d", slicing="per_case", isotropic_plane="sagittal",
                             target_spacing=[1.0, 1.0], patch_size=[size, size], batch_size=batch, normalization=["ZScoreNormalization"],
                             use_mask_for_norm=[False], network=NetworkPlan())
    net = build_network(plan, 1, 3).to(device).train()
    if checkpointed:
        checkpoint_activations(net)
    x = torch.randn(batch, 1, size, size, device=device)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x)["seg"]
        loss = sum(o.float().square().mean() for o in out)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return {"checkpointed": checkpointed, "saved_for_backward_mb": saved[0] / 2 ** 20, "step_s": time.perf_counter() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", choices=["plain", "checkpointed"])
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one == "checkpointed", a.batch, a.size, a.device)))
        return
    rows = []
    for variant in ("plain", "checkpointed"):
        out = subprocess.run([sys.executable, __file__, "--one", variant, "--batch", str(a.batch), "--size", str(a.size),
                              "--device", a.device], capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"U-Net 32-512, batch {a.batch} x {a.size}x{a.size}, {a.device}")
    for r in rows:
        print(f"{'checkpointed' if r['checkpointed'] else 'plain':>12}: saved for backward {r['saved_for_backward_mb']:8.1f} MB, "
              f"peak RSS {r['peak_rss_mb']:8.1f} MB" + (f", CUDA peak {r['cuda_peak_mb']:8.1f} MB" if r["cuda_peak_mb"] else "")
              + f", step {r['step_s']:.2f} s")


if __name__ == "__main__":
    main()
