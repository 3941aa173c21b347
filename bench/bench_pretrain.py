"""Benchmark: stage-1 pretraining. Two parts.

**transfer** (default): does a self-supervised encoder help cord segmentation with little data?
On the real volumes of ../shared/data (never copied into the repository):

1. ``spineauto pretrain --self-supervised`` (SimCLR, ResNet-18, 1 channel) on the unlabeled slices
   of every real image volume: the six labelled ones (their images only: no mask is read) and the
   unlabeled dmri/dwi_mean, fmri/fmri_tsnr and t2s/t2s_uncropped;
2. a ``2d_resnet`` configuration (the planned ``2d`` with ``network: {architecture: resnet_unet,
   depth: 18}``, Adam, constant rate) trained on 1 volume (t2) and on 3 (t2, mt1, t2_fake_lesion)
   and validated on the held-out t1w and t2s (splits_final.json: fold 0 and fold 1), from scratch
   and from the SimCLR encoder (``--pretrained``), the same ``--epochs`` x ``--iters`` budget, over
   ``--seeds`` seeds (the seed sets the downstream initialisation of what is not pretrained and the
   batches; the pretraining itself runs once, seed 0);
3. the table: held-out cord Dice (mean over t1w and t2s, from the final validation's
   summary.json) per setting, mean +- standard deviation over the seeds, and the gain.

Caveats printed with the table: t2_fake_lesion is t2 with a painted lesion (resampled), so the
3-volume setting holds two distinct acquisitions of one anatomy plus mt1; all volumes come from
the SCT testing subject(s): the held-out volumes are other contrasts/planes, not other people.

**convert** (``--convert N``): a synthetic nested folder of N PNG images (modality/anatomy/class,
mixed sizes 48-160 px, grey and RGB), converted by ``spineauto pretrain --convert-only`` (images/s,
wall), then the loader alone (images/s, memory-mapped batches) against a training step of the
supervised pretraining (images/s) on this machine.

    nice -n 15 .venv/bin/python bench/bench_pretrain.py                    # transfer, ~15 min on 2 shared CPU cores
    nice -n 15 .venv/bin/python bench/bench_pretrain.py --convert 100000   # conversion + loader rate
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, VENV_BIN, command_line, format_table, run_measured, write_real_dataset  # noqa: E402

DATASET_ID = 913
NAME = "PretrainBench"
TRAIN_SETS = {"1 volume (t2)": ["t2"], "3 volumes (t2, mt1, t2_fake_lesion)": ["t2", "mt1", "t2_fake_lesion"]}
HELD_OUT = ["t1w", "t2s"]
UNLABELED = ["dmri/dwi_mean.nii.gz", "fmri/fmri_tsnr.nii.gz", "t2s/t2s_uncropped.nii.gz"]
PRESET = """description: pretraining benchmark, ResNet-18 U-Net
configurations:
  2d_resnet:
    inherit: 2d
    batch_size: {batch}
    network: {{architecture: resnet_unet, depth: 18}}
    optim: {{optimizer: adam, initial_lr: {lr}, schedule: constant}}
"""


def _spineauto(*args: str) -> list[str]:
    return [str(VENV_BIN / "python"), "-m", "spineauto", *args]


def _env(work: Path) -> dict:
    import os

    env = dict(os.environ)
    env.update(SPINEAUTO_RAW=str(work / "raw"), SPINEAUTO_PREPROCESSED=str(work / "pre"), SPINEAUTO_RESULTS=str(work / "results"),
               WANDB_MODE="disabled", OMP_NUM_THREADS=str(os.environ.get("OMP_NUM_THREADS", "2")))
    return env


def _check(run, what: str) -> None:
    if run.returncode != 0:
        raise SystemExit(f"{what} failed (exit {run.returncode}):\n{run.output[-3000:]}")


def transfer(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_pretrain_"))
    env = _env(work)
    raw = write_real_dataset(work / "raw", DATASET_ID, NAME)
    unlabeled = work / "unlabeled"
    unlabeled.mkdir()
    for rel in UNLABELED:
        (unlabeled / rel.replace("/", "_")).write_bytes((SHARED_DATA / rel).read_bytes())
    preset = work / "preset.yaml"
    preset.write_text(PRESET.format(batch=args.batch, lr=args.lr))
    t0 = time.perf_counter()
    _check(run_measured(_spineauto("plan_and_preprocess", "-d", str(DATASET_ID), "-np", "2", "--preset", str(preset)), env=env),
           "plan_and_preprocess")
    pre = work / "pre" / f"Dataset{DATASET_ID:03d}_{NAME}"
    plan = json.loads((pre / "plans.json").read_text())["configurations"]["2d_resnet"]
    (pre / "splits_final.json").write_text(json.dumps([{"train": cases, "val": HELD_OUT} for cases in TRAIN_SETS.values()]))
    # 1. self-supervised pretraining on the images only (labelsTr is never read: source_files takes imagesTr/imagesTs)
    ssl = work / "ssl"
    run = run_measured(_spineauto("pretrain", str(raw), str(unlabeled), "-o", str(ssl), "--self-supervised", "--depth", "18",
                                  "--size", str(args.size), "--epochs", str(args.ssl_epochs), "--batch-size", str(args.ssl_batch),
                                  "--lr", str(args.ssl_lr), "--num-workers", "1", "-np", "2", "--device", "cpu"), env=env)
    _check(run, "pretrain")
    index = json.loads((ssl / "shards" / "index.json").read_text())
    history = json.loads((ssl / "pretrain_history.json").read_text())
    print(f"pretraining: {index['images']} unlabeled slices, {len(history)} epochs, loss {history[0]['loss']:.3f} -> "
          f"{history[-1]['loss']:.3f}, {run.wall_s:.0f} s", flush=True)
    # 2. downstream trainings
    results: dict[tuple[str, str], list[float]] = {}
    for fold, setting in enumerate(TRAIN_SETS):
        for init in ("scratch", "SimCLR encoder"):
            for seed in range(args.seeds):
                res = work / "runs" / f"f{fold}_{init.split()[0]}_s{seed}"
                cmd = _spineauto("train", "-d", str(DATASET_ID), "-c", "2d_resnet", "-f", str(fold), "--epochs", str(args.epochs),
                                 "--iters-per-epoch", str(args.iters), "--val-iters", "1", "--seed", str(seed), "--num-workers", "1",
                                 "--device", "cpu", "--wandb", "disabled")
                if init != "scratch":
                    cmd += ["--pretrained", str(ssl / "checkpoint_final.pt")]
                run = run_measured(cmd, env={**env, "SPINEAUTO_RESULTS": str(res)})
                _check(run, f"train {setting} {init} seed {seed}")
                summary = next(res.rglob(f"fold_{fold}/validation/summary.json"))
                dice = json.loads(summary.read_text())["mean"]["cord"]
                results.setdefault((setting, init), []).append(float(dice))
                print(f"{setting:38s} {init:15s} seed {seed}: held-out Dice {dice:.3f} ({run.wall_s:.0f} s)", flush=True)
    rows = []
    for setting in TRAIN_SETS:
        s, p = results[(setting, "scratch")], results[(setting, "SimCLR encoder")]
        spread = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        rows.append([setting, f"{statistics.mean(s):.3f} +- {spread(s):.3f}", f"{statistics.mean(p):.3f} +- {spread(p):.3f}",
                     f"{statistics.mean(p) - statistics.mean(s):+.3f}", " ".join(f"{v:.2f}" for v in s), " ".join(f"{v:.2f}" for v in p)])
    print()
    print(f"command: {command_line()}")
    print(f"downstream: 2d_resnet (ResNet-18 U-Net), patch {plan['patch_size']}, batch {args.batch}, Adam {args.lr} constant, "
          f"{args.epochs} x {args.iters} iterations, seeds 0..{args.seeds - 1}; held-out: {', '.join(HELD_OUT)}; "
          f"pretraining: SimCLR on {index['images']} slices ({args.size} px), {args.ssl_epochs} epochs x batch {args.ssl_batch}; "
          f"total {time.perf_counter() - t0:.0f} s")
    print(format_table(["trained on", "from scratch (Dice, mean +- sd)", "from SimCLR encoder", "gain", "scratch per seed",
                        "SimCLR per seed"], rows))
    print("caveats: t2_fake_lesion is t2 with a painted lesion; every volume is from the SCT testing data, so the held-out "
          "volumes are other contrasts and planes, not other people")


def convert_bench(args) -> None:
    import numpy as np
    from PIL import Image

    work = Path(tempfile.mkdtemp(prefix="bench_pretrain_convert_"))
    root = work / "images"
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    classes = [(m, a, c) for m in ("MR", "CT", "US") for a in ("spine", "knee", "brain", "abdomen") for c in ("normal", "abnormal")]
    for i in range(args.convert):
        m, a, c = classes[i % len(classes)]
        d = root / m / a / c
        if i < len(classes):
            d.mkdir(parents=True)
        h, w = (int(x) for x in rng.integers(48, 161, 2))
        yy, xx = np.mgrid[:h, :w]
        img = (127 + 100 * np.sin(xx / (3 + i % 7)) * np.cos(yy / (4 + i % 5))).astype(np.uint8)
        Image.fromarray(np.stack([img] * 3, -1) if i % 4 == 0 else img).save(d / f"{i:07d}.png")
    print(f"wrote {args.convert} PNG images in {len(classes)} classes ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = work / "out"
    run = run_measured(_spineauto("pretrain", str(root), "-o", str(out), "--class-depth", "3", "--size", str(args.size),
                                  "--convert-only", "-np", str(args.np)), env=_env(work))
    _check(run, "convert")
    index = json.loads((out / "shards" / "index.json").read_text())
    size_mb = sum(p.stat().st_size for p in (out / "shards").glob("shard_*.npy")) / 2 ** 20
    print(f"conversion: {index['images']} images in {len(index['shards'])} shards ({size_mb:.0f} MB), {run.wall_s:.0f} s with "
          f"-np {args.np}: {index['images'] / run.wall_s:.0f} images/s (listing included)", flush=True)
    from spineauto.pretraining.train import PretrainOptions, measure_loader, pretrain

    loader = measure_loader(out / "shards", batch_size=64, num_workers=1, batches=60)
    print(f"loader alone (1 worker, batch 64, memory-mapped): {loader:.0f} images/s", flush=True)
    o = PretrainOptions(method="supervised", epochs=1, batch_size=64, max_iters_per_epoch=args.steps, num_workers=1, device="cpu")
    pretrain(out / "shards", work / "ckpt", o)
    h = o.history[-1]
    print(f"supervised ResNet-18 training on CPU: {h['images'] / h['step_s']:.0f} images/s in steps, "
          f"loader wait {h['loader_wait_s']:.1f} s of {h['loader_wait_s'] + h['step_s']:.1f} s", flush=True)
    print(f"command: {command_line()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--convert", type=int, default=0, help="Run the conversion part on a synthetic folder of N images instead.")
    ap.add_argument("--np", type=int, default=2, help="Conversion processes.")
    ap.add_argument("--steps", type=int, default=10, help="Convert part: training steps timed.")
    ap.add_argument("--size", type=int, default=64, help="Pixels of a stored image (pretrain --size).")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ssl-epochs", type=int, default=20)
    ap.add_argument("--ssl-batch", type=int, default=32)
    ap.add_argument("--ssl-lr", type=float, default=1e-3)
    args = ap.parse_args()
    if args.convert:
        convert_bench(args)
    else:
        transfer(args)


if __name__ == "__main__":
    main()
