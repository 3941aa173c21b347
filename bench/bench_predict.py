"""Benchmark: `spineauto predict` against `nnUNetv2_predict` for the same 2D configuration.

Same real volumes (shared/data: t2, t1w, t2s, mt1, mt0, t2_fake_lesion with their cord masks), laid
out once as an nnU-Net v2 raw dataset that both tools read. Both models are the same network: the
nnU-Net 2d plan is edited to spineauto's patch size and U-Net topology (stages, features, kernels,
strides, convolutions per stage; both are dynamic-network-architectures PlainConvUNet with instance
norm and leaky ReLU), both trained on the same cases (fold ``all``) for the same short budget
(``--epochs`` x ``--iters``; nnU-Net through ``bench/nnunet_trainers/nnUNetTrainerBench`` found via
``nnUNet_extTrainer``), or taken from existing model folders (``--spineauto-results``,
``--nnunet-results``). Held-out cases (``--test``) are not trained on.

Prediction: each tool runs once, cold (a new process: imports, model loading and, for nnU-Net, its
worker processes count), through its CLI, on every volume, with the same test-time mirroring
(on, or off with ``--no-tta``) and the same device. Reported: seconds per volume (wall / volumes),
peak RSS / RssAnon of the process tree (bench/common.py), peak GPU memory (nvidia-smi, when
present), the ratio spineauto / nnU-Net, and the mean cord Dice of each tool on the held-out
cases and on all cases (spineauto's evaluate, which agrees with nnunetv2's Dice to 1e-6).

    .venv/bin/python bench/bench_predict.py --quick                  # correctness of the script, minutes on a CPU
    .venv/bin/python bench/bench_predict.py --epochs 50 --iters 250  # numbers for the README (GPU machine)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REAL_CASES, GpuPeak, bench_env, check_run, command_line, dice_of, format_table, match_nnunet_plan,  # noqa: E402
                    pick_device, plan_commands, predict_command, run_measured, train_commands, write_real_dataset)

DATASET_ID = 902
NAME = "SCTPredict"
DATASET = f"Dataset{DATASET_ID:03d}_{NAME}"
TEST_CASES = ("t1w", "mt0")


def train_both(work: Path, env: dict, device: str, epochs: int, iters: int, workers: int) -> dict:
    for what, cmd in plan_commands(DATASET_ID, workers):
        check_run(run_measured(cmd, env=env), what)
    matched = match_nnunet_plan(work / "sa_preprocessed" / DATASET / "plans.json",
                                work / "nn_preprocessed" / DATASET / "nnUNetPlans.json")
    seconds = {}
    for tool, cmd in train_commands(DATASET_ID, pick_device(device), epochs, iters).items():
        run = run_measured(cmd, env=env)
        check_run(run, f"{tool} training")
        seconds[tool] = run.wall_s
    return {"matched_plan": matched, "train_seconds": seconds}


def predict_both(work: Path, env: dict, device: str, tta: bool, images: Path, nnunet_processes: int | None = None) -> dict:
    dev = pick_device(device)
    out = {"spineauto": work / "pred_spineauto", "nnunet": work / "pred_nnunet"}
    cmds = {tool: predict_command(tool, DATASET_ID, images, out[tool], dev, tta, nnunet_processes) for tool in out}
    results = {}
    for tool, cmd in cmds.items():
        shutil.rmtree(out[tool], ignore_errors=True)
        with GpuPeak() as gpu:
            run = run_measured(cmd, env=env)
        check_run(run, f"{tool} predict")
        results[tool] = {"wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb, "peak_anon_mb": run.peak_anon_mb,
                         "peak_gpu_mb": gpu.peak if gpu.available else None, "processes": run.max_processes,
                         "folder": str(out[tool]), "command": " ".join(cmd), "device": dev}
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="check the script end to end: 1 epoch x 5 iterations, TTA off, only the held-out volumes predicted")
    ap.add_argument("--epochs", type=int, default=20, help="training budget of both tools: epochs")
    ap.add_argument("--iters", type=int, default=100, help="training budget of both tools: iterations per epoch")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--no-tta", action="store_true", help="both tools without mirroring")
    ap.add_argument("--test", nargs="*", default=list(TEST_CASES), help="held-out cases (not trained on)")
    ap.add_argument("--nnunet-processes", type=int, default=None,
                    help="nnUNetv2_predict -npp/-nps (default: nnU-Net's own, 3 each)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes for planning/preprocessing")
    ap.add_argument("--workdir", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--spineauto-results", type=Path, help=f"existing SPINEAUTO_RESULTS with {DATASET}/..._2d/fold_all")
    ap.add_argument("--nnunet-results", type=Path, help=f"existing nnUNet_results with {DATASET}/nnUNetTrainerBench__nnUNetPlans__2d/fold_all")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.iters, args.no_tta = 1, 5, True
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_predict_"))
    work.mkdir(parents=True, exist_ok=True)
    env = bench_env(work, args.device, args.epochs, args.iters)
    train_cases = [c for c in REAL_CASES if c not in args.test]
    raw = write_real_dataset(work / "raw", DATASET_ID, NAME, cases=train_cases)
    # every volume is predicted (timing); the held-out ones are the fair Dice
    images, labels = work / "images", work / "labels"
    write_real_dataset(work / "all", 1, "All")
    shutil.copytree(work / "all" / "Dataset001_All" / "labelsTr", labels, dirs_exist_ok=True)
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir()
    for f in sorted((work / "all" / "Dataset001_All" / "imagesTr").glob("*_0000.nii.gz")):
        if not args.quick or f.name[: -len("_0000.nii.gz")] in args.test:
            shutil.copy(f, images / f.name)
    info: dict = {"command": command_line(), "train_cases": train_cases, "test_cases": args.test,
                  "epochs": args.epochs, "iters": args.iters, "tta": not args.no_tta}
    if args.spineauto_results or args.nnunet_results:
        if not (args.spineauto_results and args.nnunet_results):
            raise SystemExit("pass both --spineauto-results and --nnunet-results, or neither (then both are trained)")
        env.update(SPINEAUTO_RESULTS=str(args.spineauto_results), nnUNet_results=str(args.nnunet_results))
        info["models"] = {"spineauto": str(args.spineauto_results), "nnunet": str(args.nnunet_results)}
    else:
        info.update(train_both(work, env, args.device, args.epochs, args.iters, args.workers))
    res = predict_both(work, env, args.device, not args.no_tta, images, args.nnunet_processes)
    n = len(list(images.glob("*.nii.gz")))
    for tool, r in res.items():
        r["s_per_volume"] = r["wall_s"] / n
        r["dice_test"] = dice_of(Path(r["folder"]), labels, args.test)
        r["dice_all"] = dice_of(Path(r["folder"]), labels, [f.name[: -len("_0000.nii.gz")] for f in images.glob("*.nii.gz")])
    ratio = res["spineauto"]["s_per_volume"] / res["nnunet"]["s_per_volume"]
    info.update(volumes=n, results=res, time_ratio=ratio)
    rows = [[tool, f"{r['s_per_volume']:.2f}", f"{r['peak_rss_mb']:.0f}", f"{r['peak_anon_mb']:.0f}",
             "-" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:.0f}", f"{r['dice_test']:.4f}", f"{r['dice_all']:.4f}"]
            for tool, r in res.items()]
    print(format_table(["tool", "s/volume", "peak RSS MB", "peak anon MB", "peak GPU MB", "Dice held-out", "Dice predicted"], rows))
    print(f"\nspineauto / nnU-Net time per volume: {ratio:.2f} ({n} volumes, device {res['spineauto']['device']}, "
          f"TTA {'on' if not args.no_tta else 'off'}, {args.epochs} epochs x {args.iters} iterations)")
    print(f"command: {info['command']}")
    if args.json:
        args.json.write_text(json.dumps(info, indent=2, default=str))
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work folder: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
