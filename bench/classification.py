"""Benchmark of the classification configuration (``-c cls``, optionally ``multitask``): training
samples per second and peak memory on CPU, through ``spineauto train`` as a user runs it.

The real cases of shared/data (bench/common.py) become a raw dataset with two heads, sequence and
view (the contrasts and acquisition planes of the scans); ``spineauto plan_and_preprocess`` plans
its ``cls`` configuration as for any dataset (network, patch and batch size from the fingerprint,
unchanged). ``spineauto train -f all -c cls`` then runs ``--epochs`` x ``--iters`` iterations;
samples/s is the median over epochs after the first (warm-up) of the loop's own ``samples_per_s``
(iterations x batch / training time of the epoch, from metrics.jsonl), and peak memory the
process tree's summed RSS / RssAnon sampled during the run (bench/common.py).

    .venv/bin/python bench/classification.py [--epochs 3] [--iters 10] [--configurations cls multitask] [--amp]

``bench/bench_train.py`` calls :func:`bench_classification` for its classification rows.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REAL_CASES, VENV_BIN, command_line, format_table, run_measured, write_real_dataset  # noqa: E402

DATASET_ID = 902
NAME = "SCTRealCls"
# case (bench/common.py REAL_CASES) -> (sequence, view)
CLASSES = {"t2": ("T2w", "sagittal"), "t1w": ("T1w", "sagittal"), "t2s": ("T2starw", "axial"), "mt1": ("MT", "axial"),
           "mt0": ("MT", "axial"), "t2_fake_lesion": ("T2w", "sagittal")}


def write_classification_dataset(raw_root: Path) -> Path:
    folder = write_real_dataset(raw_root, DATASET_ID, NAME, cases=list(CLASSES))
    meta = json.loads((folder / "dataset.json").read_text())
    meta["heads"] = {"sequence": ["T1w", "T2w", "T2starw", "MT"], "view": ["axial", "sagittal"]}
    meta["cases"] = {c: {"subject": c, "classes": {"sequence": s, "view": v}} for c, (s, v) in CLASSES.items()}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    return folder


def bench_classification(workdir: Path, configurations=("cls",), epochs: int = 3, iters: int = 10, amp: bool = False,
                         threads: int | None = None) -> list[dict]:
    """Plan the real data with heads, train each configuration on CPU; one result dict per configuration."""
    env = dict(os.environ, SPINEAUTO_RAW=str(workdir / "raw"), SPINEAUTO_PREPROCESSED=str(workdir / "preprocessed"),
               SPINEAUTO_RESULTS=str(workdir / "results"), WANDB_MODE="disabled")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    write_classification_dataset(workdir / "raw")
    spineauto = str(VENV_BIN / "spineauto")
    plan = run_measured([spineauto, "plan_and_preprocess", "-d", str(DATASET_ID), "-np", "2"], env=env)
    if plan.returncode != 0:
        raise SystemExit(f"plan_and_preprocess failed:\n{plan.output[-3000:]}")
    plans = json.loads((workdir / "preprocessed" / f"Dataset{DATASET_ID:03d}_{NAME}" / "plans.json").read_text())
    results = []
    for cfg in configurations:
        cmd = [spineauto, "train", "-d", str(DATASET_ID), "-f", "all", "-c", cfg, "--device", "cpu", "--wandb", "disabled",
               "--epochs", str(epochs), "--iters-per-epoch", str(iters), "--val-iters", "2", "--no-validate",
               "--amp" if amp else "--no-amp"]
        run = run_measured(cmd, env=env)
        if run.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{run.output[-3000:]}")
        fold = workdir / "results" / f"Dataset{DATASET_ID:03d}_{NAME}" / f"spineautoTrainer__spineautoPlans__{cfg}" / "fold_all"
        records = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
        rates = [r["samples_per_s"] for r in records[1:]] or [records[0]["samples_per_s"]]
        p = plans["configurations"][cfg]
        results.append({"configuration": cfg, "architecture": p["network"]["architecture"], "patch_size": p["patch_size"],
                        "batch_size": p["batch_size"], "features": p["network"]["features_per_stage"],
                        "samples_per_s": statistics.median(rates), "peak_rss_mb": run.peak_rss_mb,
                        "peak_anon_mb": run.peak_anon_mb, "wall_s": run.wall_s, "epochs": epochs, "iters": iters, "amp": amp})
    return results


def table(results: list[dict]) -> str:
    rows = [[r["configuration"], r["architecture"], "x".join(map(str, r["patch_size"])), r["batch_size"], f"{r['samples_per_s']:.1f}",
             f"{r['peak_rss_mb']:.0f}", f"{r['peak_anon_mb']:.0f}", f"{r['wall_s']:.0f}"] for r in results]
    return format_table(["configuration", "network", "patch", "batch", "samples/s", "peak RSS MB", "peak anon MB", "wall s"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--configurations", nargs="+", default=["cls"])
    ap.add_argument("--amp", action="store_true", help="bf16 autocast on CPU")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spineauto_bench_cls_"))
    results = bench_classification(work, args.configurations, args.epochs, args.iters, args.amp)
    print(command_line())
    print(table(results))
    print(json.dumps(results))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
