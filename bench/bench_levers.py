"""Benchmark: what each training-speed lever gives on this machine, one at a time, side by side.

The network, loss and optimiser of a spineauto plan (default: the real data of ../shared/data planned
as ``spineauto plan_and_preprocess`` plans them; ``--plans`` for another plans.json), one training
step (forward, nnunetv2's Dice + CE with deep supervision, backward, gradient clipping, optimiser
step) on batches of the plan's patch and batch size, in this process. Every lever is a variant of
the baseline (float32, contiguous, the plan's optimiser with torch's CPU default for-loop). A shared
machine's load changes by the minute, so every lever is timed in pairs with the baseline, right
beside it (``--steps`` steps each, which one goes first alternating), ``--rounds`` times (the
levers' order shuffled per round); reported: the median ms per step, the median over the pairs of
baseline time / lever time (the speed-up) and its range. A torch.compile variant reports its
compile time (the first step).

    nice -n 15 .venv/bin/python bench/bench_levers.py                 # about 5 minutes on 2 CPU cores
    .venv/bin/python bench/bench_levers.py --quick                    # script check
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, format_table, write_real_dataset  # noqa: E402

LEVERS = ("baseline", "channels_last", "foreach", "fused", "ds_slicing", "no_item", "compile", "bf16")


def real_plans(work: Path) -> Path:
    import os

    os.environ.update(SPINEAUTO_RAW=str(work / "raw"), SPINEAUTO_PREPROCESSED=str(work / "pre"))
    from spineauto.plan_and_preprocess import plan_and_preprocess

    write_real_dataset(work / "raw", 904, "SCTLevers", cases=["t2", "t1w", "t2s", "mt1", "t2_fake_lesion"])
    return plan_and_preprocess(904, workers=1).folder / "plans.json"


class Variant:
    def __init__(self, name: str, plans, plan, batch: int):
        import torch

        from spineauto.networks.build import build_network
        from spineauto.training.tasks import SegmentationTask

        self.name = name
        torch.manual_seed(0)
        fmt = torch.channels_last if name == "channels_last" else torch.contiguous_format
        self.net = build_network(plan, len(plans.channel_names), plans.num_classes).to(memory_format=fmt)
        self.task = SegmentationTask(plans, plan)
        if name == "ds_slicing":
            self.task.loss = self._sliced_loss
        o = plan.optim
        kw = {"foreach": True} if name == "foreach" else {"fused": True} if name == "fused" else {"foreach": False}
        if o.optimizer == "adam":
            self.opt = torch.optim.Adam(self.net.parameters(), lr=o.initial_lr, weight_decay=o.weight_decay, **kw)
        else:
            self.opt = torch.optim.SGD(self.net.parameters(), lr=o.initial_lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                       nesterov=o.momentum > 0, **kw)
        self.model = torch.compile(self.net) if name == "compile" else self.net
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16" else nullcontext()
        self.clip = plan.optim.grad_clip
        self.x = torch.randn(batch, len(plans.channel_names), *plan.patch_size).contiguous(memory_format=fmt)
        self.seg = (torch.rand(batch, 1, *plan.patch_size) > 0.9).float()
        self.compile_s = None
        self.total = torch.zeros((), dtype=torch.float64)

    def _sliced_loss(self, output: dict, batch: dict):
        """Deep-supervision targets by strided slicing (every 2^k-th pixel: what nearest interpolation picks) instead of interpolate."""
        seg, target = output["seg"], batch["seg"].long()
        if not isinstance(seg, (list, tuple)):
            return self.task.criterion(seg, target)
        crit = self.task.criterion
        base = getattr(crit, "loss")
        weights = getattr(crit, "weights", None) or getattr(crit, "weight_factors")
        total = None
        for out, w in zip(seg, weights):
            if w == 0:
                continue
            f = target.shape[-1] // out.shape[-1]
            term = w * base(out, target[..., ::f, ::f] if f > 1 else target)
            total = term if total is None else total + term
        return total

    def step(self) -> None:
        import torch

        self.opt.zero_grad(set_to_none=True)
        with self.autocast:
            loss = self.task.loss(self.model(self.x), {"seg": self.seg})
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip)
        self.opt.step()
        self.total += loss.detach()
        if self.name != "no_item":  # the trainer's per-step host work: the progress bar's float(loss), a finiteness check
            float(loss.detach())
            bool(torch.isfinite(self.total))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plans", type=Path, help="plans.json to take the 2d configuration from (default: plan the real data)")
    ap.add_argument("--levers", nargs="*", default=list(LEVERS), choices=LEVERS)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per lever and round")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the plan's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="2 rounds x 1 step")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 2, 1
    import torch

    from spineauto.devices import cpu_native_bf16
    from spineauto.planning.plans import Plans

    if args.threads:
        torch.set_num_threads(args.threads)
    plans = Plans.load(args.plans or real_plans(Path(tempfile.mkdtemp(prefix="bench_levers_"))))
    plan = plans.configurations["2d"]
    batch = args.batch or plan.batch_size
    levers = ["baseline", *[v for v in args.levers if v != "baseline"]]
    variants = {name: Variant(name, plans, plan, batch) for name in levers}
    for v in variants.values():  # warm-up (compiles)
        t0 = time.perf_counter()
        v.step()
        if v.name == "compile":
            v.compile_s = time.perf_counter() - t0
    rounds: dict[str, list[float]] = {n: [] for n in levers}
    ratios: dict[str, list[float]] = {n: [] for n in levers}
    rng = random.Random(0)

    def timed(name: str) -> float:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            variants[name].step()
        return (time.perf_counter() - t0) / args.steps

    for r in range(args.rounds):
        order = [n for n in levers if n != "baseline"]
        rng.shuffle(order)
        for i, name in enumerate(order):  # each lever right beside a baseline run, which one first alternating
            if (r + i) % 2:
                lever, base_t = timed(name), timed("baseline")
            else:
                base_t, lever = timed("baseline"), timed(name)
            rounds[name].append(lever)
            rounds["baseline"].append(base_t)
            ratios[name].append(base_t / lever)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {ratios[n][-1]:.2f}x" for n in order), flush=True)
    base = statistics.median(rounds["baseline"])
    rows, result = [], {"command": command_line(), "patch_size": plan.patch_size, "batch": batch,
                        "features": plan.network.features_per_stage, "optimizer": plan.optim.optimizer,
                        "threads": torch.get_num_threads(), "native_bf16": cpu_native_bf16(), "levers": {}}
    for name in levers:
        med = statistics.median(rounds[name])
        speed = statistics.median(ratios[name]) if ratios[name] else 1.0
        spread = f"{min(ratios[name]):.2f}-{max(ratios[name]):.2f}x" if ratios[name] else "-"
        result["levers"][name] = {"ms_per_step": med * 1000, "step_ms": [t * 1000 for t in rounds[name]],
                                  "speedup_median": speed, "speedups": ratios[name], "compile_s": variants[name].compile_s}
        note = f"compile {variants[name].compile_s:.0f} s" if variants[name].compile_s else ""
        rows.append([name, f"{med * 1000:.0f}", f"{speed:.2f}x", spread, f"{batch / med:.1f}", note])
    print(format_table(["lever", "ms/step (median)", "speed-up (median of pairs)", "min-max of pairs", "samples/s", "note"], rows))
    print(f"\npatch {plan.patch_size}, batch {batch}, features {plan.network.features_per_stage}, {plan.optim.optimizer}, "
          f"{torch.get_num_threads()} threads, native bf16 {cpu_native_bf16()}, {args.rounds} rounds x {args.steps} steps")
    print(f"command: {result['command']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
