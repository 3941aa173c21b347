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
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REAL_CASES, REPO, VENV_BIN, command_line, format_table, run_measured, write_real_dataset  # noqa: E402

DATASET_ID = 902
NAME = "SCTPredict"
DATASET = f"Dataset{DATASET_ID:03d}_{NAME}"
TEST_CASES = ("t1w", "mt0")


class GpuPeak:
    """Peak used GPU memory (MiB) above the level seen at start, polled with nvidia-smi."""

    def __init__(self):
        self.available = shutil.which("nvidia-smi") is not None
        self.base = self._used() if self.available else 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _used(self) -> int:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return sum(int(x) for x in out.split())
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return 0

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used() - self.base)
            time.sleep(0.2)

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()


def _check(run, what: str) -> None:
    if run.returncode != 0:
        sys.stderr.write(run.output[-4000:])
        raise SystemExit(f"{what} failed (exit {run.returncode}): {' '.join(map(str, run.cmd))}")


def _env(work: Path, device: str, epochs: int, iters: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(SPINEAUTO_RAW=str(work / "raw"), SPINEAUTO_PREPROCESSED=str(work / "sa_preprocessed"),
               SPINEAUTO_RESULTS=str(work / "sa_results"), WANDB_MODE="disabled",
               nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "nn_preprocessed"),
               nnUNet_results=str(work / "nn_results"), nnUNet_extTrainer=str(REPO / "bench" / "nnunet_trainers"),
               BENCH_EPOCHS=str(epochs), BENCH_ITERS=str(iters), BENCH_VAL_ITERS=str(max(1, iters // 10)),
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def match_nnunet_plan(sa_plans: Path, nn_plans: Path, batch_size: bool = False) -> dict:
    """Give nnU-Net's 2d configuration spineauto's patch size and U-Net topology (and batch size when
    asked); returns what was set."""
    ours = json.loads(sa_plans.read_text())["configurations"]["2d"]
    net = ours["network"]
    if net["architecture"] != "unet":
        raise SystemExit(f"spineauto planned {net['architecture']}; this benchmark matches the plain U-Net only")
    plans = json.loads(nn_plans.read_text())
    cfg = plans["configurations"]["2d"]
    kw = cfg["architecture"]["arch_kwargs"]
    if not cfg["architecture"]["network_class_name"].endswith("PlainConvUNet"):
        raise SystemExit(f"nnU-Net planned {cfg['architecture']['network_class_name']}; expected PlainConvUNet")
    kw.update(n_stages=len(net["features_per_stage"]), features_per_stage=net["features_per_stage"],
              kernel_sizes=net["kernel_sizes"], strides=net["strides"], n_conv_per_stage=net["n_conv_per_stage"],
              n_conv_per_stage_decoder=net["n_conv_per_stage_decoder"])
    cfg["patch_size"] = list(ours["patch_size"])
    matched = {"patch_size": cfg["patch_size"], "features_per_stage": kw["features_per_stage"], "strides": kw["strides"]}
    if batch_size:
        cfg["batch_size"] = matched["batch_size"] = int(ours["batch_size"])
    nn_plans.write_text(json.dumps(plans, indent=2))
    return matched


def train_both(work: Path, env: dict, device: str, epochs: int, iters: int, workers: int) -> dict:
    sa = [str(VENV_BIN / "python"), "-m", "spineauto"]
    nn = lambda tool: str(VENV_BIN / tool)  # noqa: E731
    steps = [("spineauto plan_and_preprocess", [*sa, "plan_and_preprocess", "-d", str(DATASET_ID), "-np", str(workers)]),
             ("nnUNetv2_plan_and_preprocess", [nn("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d",
                                               "-np", str(workers), "-npfp", str(workers)])]
    for what, cmd in steps:
        _check(run_measured(cmd, env=env), what)
    matched = match_nnunet_plan(work / "sa_preprocessed" / DATASET / "plans.json",
                                work / "nn_preprocessed" / DATASET / "nnUNetPlans.json")
    dev = "cuda" if device in ("cuda", "auto") and _has_cuda() else "cpu"
    train = {
        "spineauto": [*sa, "train", "-d", str(DATASET_ID), "-c", "2d", "-f", "all", "--epochs", str(epochs),
                      "--iters-per-epoch", str(iters), "--val-iters", str(max(1, iters // 10)), "--wandb", "disabled",
                      "--device", dev],
        "nnunet": [nn("nnUNetv2_train"), str(DATASET_ID), "2d", "all", "-tr", "nnUNetTrainerBench", "-device", dev],
    }
    seconds = {}
    for tool, cmd in train.items():
        run = run_measured(cmd, env=env)
        _check(run, f"{tool} training")
        seconds[tool] = run.wall_s
    return {"matched_plan": matched, "train_seconds": seconds}


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def predict_both(work: Path, env: dict, device: str, tta: bool, images: Path, nnunet_processes: int | None = None) -> dict:
    dev = "cuda" if device in ("cuda", "auto") and _has_cuda() else "cpu"
    out = {"spineauto": work / "pred_spineauto", "nnunet": work / "pred_nnunet"}
    cmds = {
        "spineauto": [str(VENV_BIN / "python"), "-m", "spineauto", "predict", "-d", str(DATASET_ID), "-c", "2d", "-f", "all",
                      "-i", str(images), "-o", str(out["spineauto"]), "--device", dev] + ([] if tta else ["--no-tta"]),
        "nnunet": [str(VENV_BIN / "nnUNetv2_predict"), "-d", str(DATASET_ID), "-c", "2d", "-f", "all", "-tr", "nnUNetTrainerBench",
                   "-i", str(images), "-o", str(out["nnunet"]), "-device", dev] + ([] if tta else ["--disable_tta"])
                  + ([] if nnunet_processes is None else ["-npp", str(nnunet_processes), "-nps", str(nnunet_processes)]),
    }
    results = {}
    for tool, cmd in cmds.items():
        shutil.rmtree(out[tool], ignore_errors=True)
        with GpuPeak() as gpu:
            run = run_measured(cmd, env=env)
        _check(run, f"{tool} predict")
        results[tool] = {"wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb, "peak_anon_mb": run.peak_anon_mb,
                         "peak_gpu_mb": gpu.peak if gpu.available else None, "processes": run.max_processes,
                         "folder": str(out[tool]), "command": " ".join(cmd), "device": dev}
    return results


def dice_of(pred: Path, labels: Path, cases: list[str]) -> float:
    import logging

    from spineauto.evaluation.evaluate import LabelSet, evaluate_folders

    logging.getLogger("spineauto.evaluation.evaluate").setLevel(logging.ERROR)  # predictions of other cases: expected

    with tempfile.TemporaryDirectory() as tmp:
        for c in cases:
            shutil.copy(labels / f"{c}.nii.gz", Path(tmp) / f"{c}.nii.gz")
        s = evaluate_folders(pred, Path(tmp), LabelSet({"cord": 1}, []))
    return float(s["mean"]["cord"]["dice"])


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
    env = _env(work, args.device, args.epochs, args.iters)
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
