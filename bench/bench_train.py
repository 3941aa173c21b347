"""Benchmark: `spineauto train` against nnU-Net v2's trainer at the same plan, on the real data.

Same real volumes (shared/data: the 6 image/cord pairs), laid out once as an nnU-Net v2 raw dataset
that both tools plan and preprocess their own way; ``--test`` cases are held out (imagesTs). Both
networks are the same: nnU-Net's 2d plan is edited to spineauto's patch size, batch size and U-Net
topology (dynamic-network-architectures PlainConvUNet, instance norm, leaky ReLU, deep supervision).
nnU-Net trains through ``bench/nnunet_trainers/nnUNetTrainerBench`` (found via
``nnUNet_extTrainer``: epochs/iterations from the environment, end-of-training validation skipped),
spineauto through ``spineauto train --no-validate``; both fold ``all``, same device, W&B off.

1. Throughput: both train ``--tp-epochs`` x ``--iters`` (validation ``iters // 10`` per epoch).
   samples/s = iterations x batch / median epoch time, an epoch's time being start to next start
   (training and validation iterations, checkpoints, plots: the same for both; spineauto's
   metrics.jsonl, nnU-Net's checkpoint logging timestamps), the warm-up epoch 0 left out. Peak RSS / RssAnon of the whole process tree (bench/common.py)
   and peak GPU memory (nvidia-smi) of that run.
   The compute floor: the same network's forward, deep-supervised Dice+CE loss, backward, gradient
   clipping and SGD step alone, on a batch already in memory (``--floor-steps`` timed steps, in this
   process, torch's default threads): no data loading, augmentation or logging. No trainer of this
   network at this precision can pass it, so floor / nnU-Net is the most any trainer can gain here.
2. Equal wall-clock budget: each tool gets ``--budget`` seconds of training at its own measured
   throughput (epochs = budget x samples/s / samples per epoch, so each schedule runs to its end),
   then predicts the held-out cases with its own CLI (no mirroring for either); cord Dice of each.

    .venv/bin/python bench/bench_train.py --quick                # script check, a few minutes on a CPU
    .venv/bin/python bench/bench_train.py --iters 100 --budget 900   # numbers (quiet machine or GPU)
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REAL_CASES, GpuPeak, bench_classification, bench_env, check_run, classification_table,  # noqa: E402
                    command_line, dice_of, format_table, match_nnunet_plan, pick_device, plan_commands, predict_command,
                    run_measured, train_commands, write_real_dataset)

DATASET_ID = 903
NAME = "SCTTrain"
DATASET = f"Dataset{DATASET_ID:03d}_{NAME}"
TEST_CASES = ("mt0",)  # t1w is the only T1 contrast: a held-out T1 tests contrast transfer, not training
SA_MODEL = f"spineautoTrainer__spineautoPlans__2d/fold_all"
NN_MODEL = f"nnUNetTrainerBench__nnUNetPlans__2d/fold_all"


def _train_cmds(dev: str, epochs: int, iters: int) -> dict[str, list[str]]:
    cmds = train_commands(DATASET_ID, dev, epochs, iters)
    sa = cmds["spineauto"] + ["--no-validate"]
    return {
        "spineauto": sa,
        "spineauto --amp": sa + ["--amp"],  # bf16 autocast on CPU, fp16 on CUDA (spineauto's CUDA default)
        "nnunet": cmds["nnunet"],
    }


def epoch_times(tool: str, results: Path) -> list[float]:
    """Start-to-start seconds of each epoch but the last: training, validation, checkpoints and plots, for both tools."""
    if tool.startswith("spineauto"):
        lines = (results / DATASET / SA_MODEL / "metrics.jsonl").read_text().splitlines()
        starts = [json.loads(x)["started"] for x in lines]
    else:
        import torch

        log = torch.load(results / DATASET / NN_MODEL / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
        starts = list(log["epoch_start_timestamps"])
    return [b - a for a, b in zip(starts, starts[1:])]


def train(tool: str, work: Path, env: dict, dev: str, epochs: int, iters: int, tag: str) -> dict:
    env = dict(env, BENCH_EPOCHS=str(epochs), BENCH_ITERS=str(iters), BENCH_VAL_ITERS=str(max(1, iters // 10)))
    results = work / f"{tag}_{tool.replace(' --', '_')}"
    env["SPINEAUTO_RESULTS" if tool.startswith("spineauto") else "nnUNet_results"] = str(results)
    cmd = _train_cmds(dev, epochs, iters)[tool]
    with GpuPeak() as gpu:
        run = run_measured(cmd, env=env)
    check_run(run, f"{tool} training")
    times = epoch_times(tool, results)
    steady = times[1:] or times or [run.wall_s / epochs]
    return {"results": results, "env": env, "wall_s": run.wall_s, "epochs": epochs, "epoch_times": times,
            "median_epoch_s": statistics.median(steady), "peak_rss_mb": run.peak_rss_mb, "peak_anon_mb": run.peak_anon_mb,
            "peak_gpu_mb": gpu.peak if gpu.available else None, "processes": run.max_processes}


def compute_floor(plans_json: Path, batch: int, steps: int) -> dict:
    """samples/s of the planned 2d network's training step alone, on an in-memory batch (median of ``steps``)."""
    import torch

    from spineauto.networks.build import build_network
    from spineauto.planning.plans import Plans
    from spineauto.training.losses import build_segmentation_loss
    from spineauto.training.optim import build_optimizer

    plans = Plans.load(plans_json)
    plan = plans.configurations["2d"]
    torch.manual_seed(0)
    net = build_network(plan, len(plans.channel_names), plans.num_classes)
    loss_fn = build_segmentation_loss(plans, plan, False)
    opt = build_optimizer(net.parameters(), plan.optim)
    x = torch.randn(batch, len(plans.channel_names), *plan.patch_size)
    y = torch.randint(0, plans.num_classes, (batch, 1, *plan.patch_size))

    def step() -> None:
        loss = loss_fn(net(x)["seg"], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), plan.optim.grad_clip)
        opt.step()

    times = []
    for i in range(steps + 3):  # 3 warm-up steps
        t0 = time.perf_counter()
        step()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:  # where a step's time goes
        for _ in range(3):
            step()
    ops = prof.key_averages()
    conv = sum(e.self_cpu_time_total for e in ops if "convolution" in e.key) / max(1e-9, sum(e.self_cpu_time_total for e in ops))
    median = statistics.median(times)
    return {"step_s": median, "samples_per_s": batch / median, "spread_s": [min(times), max(times)], "steps": steps,
            "convolution_share": conv}


def predict_dice(tool: str, work: Path, run: dict, dev: str, test: list[str]) -> float:
    out = work / f"pred_{tool.replace(' --', '_')}"
    shutil.rmtree(out, ignore_errors=True)
    images = work / "raw" / DATASET / "imagesTs"
    cmd = predict_command(tool.split()[0], DATASET_ID, images, out, dev, tta=False, nnunet_processes=1)
    # not timed: both predict with sleeping OpenMP threads (nnU-Net's spinning ones took >10 min per volume on a busy CPU)
    check_run(run_measured(cmd, env=dict(run["env"], OMP_WAIT_POLICY="PASSIVE")), f"{tool} predict")
    return dice_of(out, work / "raw" / DATASET / "labelsTs", test)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="check the script end to end: 3 epochs x 4 iterations, 30 s budget")
    ap.add_argument("--tp-epochs", type=int, default=5, help="epochs of the throughput runs (the first is warm-up, the last has no end mark)")
    ap.add_argument("--iters", type=int, default=50, help="iterations per epoch (both tools)")
    ap.add_argument("--budget", type=float, default=600.0, help="training seconds each tool gets for the Dice comparison (0: skip)")
    ap.add_argument("--floor-steps", type=int, default=20, help="timed steps of the compute floor (0: skip; CPU only)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--test", nargs="*", default=list(TEST_CASES), help="held-out cases (not trained on)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes for planning/preprocessing")
    ap.add_argument("--workdir", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--amp", action="store_true", help="add a row: spineauto with --amp (bf16 on CPU: not the equal-precision comparison)")
    ap.add_argument("--reuse", action="store_true", help="with --workdir: keep its planned/preprocessed data from an earlier run")
    ap.add_argument("--same-omp", action="store_true",
                    help="give nnU-Net spineauto's OpenMP setting too (OMP_WAIT_POLICY=PASSIVE), to separate that effect")
    ap.add_argument("--classification", action="store_true",
                    help="also the classification configurations (cls, multitask) on CPU: samples/s, peak memory (bench/classification.py)")
    args = ap.parse_args(argv)
    if args.quick:
        args.tp_epochs, args.iters, args.budget = 3, 4, 30.0
    dev = pick_device(args.device)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    env = bench_env(work, dev, 1, args.iters)
    if args.same_omp:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    train_cases = [c for c in REAL_CASES if c not in args.test]
    raw = write_real_dataset(work / "raw", DATASET_ID, NAME, cases=train_cases)
    held = write_real_dataset(work / "held", 1, "Held", cases=args.test)
    shutil.copytree(held / "imagesTr", raw / "imagesTs", dirs_exist_ok=True)
    shutil.copytree(held / "labelsTr", raw / "labelsTs", dirs_exist_ok=True)
    planned = (work / "sa_preprocessed" / DATASET / "plans.json").is_file() and (work / "nn_preprocessed" / DATASET / "nnUNetPlans.json").is_file()
    for what, cmd in plan_commands(DATASET_ID, args.workers):
        if not (planned and args.reuse):
            check_run(run_measured(cmd, env=env), what)
    matched = match_nnunet_plan(work / "sa_preprocessed" / DATASET / "plans.json", work / "nn_preprocessed" / DATASET / "nnUNetPlans.json",
                                batch_size=True)
    per_epoch = args.iters * matched["batch_size"]
    info: dict = {"command": command_line(), "device": dev, "matched_plan": matched, "train_cases": train_cases,
                  "nnunet_omp_wait_policy": env.get("OMP_WAIT_POLICY", "default"),
                  "test_cases": args.test, "iters": args.iters, "tools": {}}
    tools = ("spineauto", "nnunet") + (("spineauto --amp",) if args.amp else ())
    for old in [p for p in work.iterdir() if p.name.split("_")[0] in ("tp", "budget", "pred")]:
        shutil.rmtree(old)
    for tool in tools:
        r = train(tool, work, env, dev, args.tp_epochs, args.iters, "tp")
        r["samples_per_s"] = per_epoch / r["median_epoch_s"]
        info["tools"][tool] = r
    t = info["tools"]
    ratio = t["spineauto"]["samples_per_s"] / t["nnunet"]["samples_per_s"]
    if args.floor_steps > 0 and dev == "cpu":
        info["floor"] = compute_floor(work / "sa_preprocessed" / DATASET / "plans.json", matched["batch_size"], args.floor_steps)
    if args.budget > 0:
        for tool in tools:
            epochs = max(1, round(args.budget * t[tool]["samples_per_s"] / per_epoch))
            r = train(tool, work, env, dev, epochs, args.iters, "budget")
            t[tool]["budget_epochs"], t[tool]["budget_train_s"] = epochs, sum(r["epoch_times"])
            t[tool]["dice_held_out"] = predict_dice(tool, work, r, dev, args.test)
    rows = [[tool, f"{r['samples_per_s']:.1f}", f"{r['median_epoch_s']:.2f}", f"{r['peak_rss_mb']:.0f}", f"{r['peak_anon_mb']:.0f}",
             "-" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:.0f}", str(r["processes"]),
             str(r.get("budget_epochs", "-")), f"{r['dice_held_out']:.4f}" if "dice_held_out" in r else "-"]
            for tool, r in t.items()]
    print(format_table(["tool", "samples/s", "s/epoch", "peak RSS MB", "peak anon MB", "peak GPU MB", "processes",
                        f"epochs in {args.budget:.0f} s", "Dice held-out"], rows))
    print(f"\nspineauto / nnU-Net training throughput: {ratio:.2f}x (device {dev}, patch {matched['patch_size']}, "
          f"batch {matched['batch_size']}, features {matched['features_per_stage']}, {args.iters} iterations/epoch, "
          f"nnU-Net OMP_WAIT_POLICY {info['nnunet_omp_wait_policy']})")
    if "floor" in info:
        f = info["floor"]
        share = {tool: r["samples_per_s"] / f["samples_per_s"] for tool, r in t.items()}
        print(f"compute floor (the network's step alone, in memory): {f['samples_per_s']:.1f} samples/s, {1000 * f['step_s']:.0f} ms/step "
              f"(min-max {1000 * f['spread_s'][0]:.0f}-{1000 * f['spread_s'][1]:.0f}; {100 * f['convolution_share']:.0f}% of it in convolutions); "
              + ", ".join(f"{tool} runs at {100 * v:.0f}% of it" for tool, v in share.items())
              + f"; no trainer at this precision can exceed {f['samples_per_s'] / t['nnunet']['samples_per_s']:.2f}x nnU-Net here")
    print(f"command: {info['command']}")
    info["throughput_ratio"] = ratio
    if args.classification:
        info["classification"] = bench_classification(work / "cls", ("cls", "multitask"), args.tp_epochs, args.iters)
        print("\nclassification configurations (CPU, real data with sequence/view heads):\n" + classification_table(info["classification"]))
    if args.json:
        args.json.write_text(json.dumps(info, indent=2, default=str))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
