"""Benchmark: the cord -> lesion cascade (``2d`` cord, then ``2d_cord_roi`` lesions in crops around
it) against one ``2d`` model on whole slices, at the same training budget, on the lesion data we have.

Data: synthetic phantoms with lesions (spineauto.datasets.phantoms: cord=1, lesion=2; ``--train``
training and ``--test`` held-out cases, subjects never split), plus, when ../shared/data is present
and ``--no-real`` is not given, the five real image/cord pairs as cord-only training cases and the
real ``t2_fake_lesion`` scan (a synthetic lesion painted into a real cord; its cord and lesion masks
merged, lesion over cord) as a held-out case, reported in its own columns. Planned with
plans/lesion_segmentation.yaml (the lesion settings for both configurations); then both plans get
the same batch size (``--batch``), the same feature widths (16, 32, ... up to 256) and Adam at
``--lr`` in plans.json (the preset's SGD learns no lesion in either configuration at these budgets;
``--sgd`` keeps it), and both train ``--epochs`` x ``--iters`` iterations on fold ``all``: the same
number of samples. Each network keeps its planned depth (the crops are smaller: fewer stages).

Prediction, through the CLI as a user would run it:

1. ``spineauto predict -c 2d`` on the test images: the whole-slice result, and the cord masks;
2. ``spineauto predict -c 2d_cord_roi --roi <masks of 1>``: the cascade (a case whose predicted
   cord is empty gets an empty lesion mask: the cascade has nothing to crop);
3. ``spineauto predict -c 2d_cord_roi --roi <reference labels>``: the cascade with a perfect cord,
   what the lesion stage can do when the cord stage makes no error.

``spineauto evaluate`` scores each folder (lesion Dice and lesion-wise F1: means over cases from
summary.json, and pooled over all test cases: Dice from the summed voxel counts, F1 from the summed
lesion counts). The script also measures what the RoiPlan defaults stand on: the box-edge error of
the cord predicted in step 1 against the reference cord (mm), how many reference lesion voxels the
crop (margin) and the removal (remove_outside_mm) lose with it, and the farthest lesion voxel from it.

    .venv/bin/python bench/bench_cascade.py --quick   # about 2 minutes on 2 CPU cores
    .venv/bin/python bench/bench_cascade.py           # the README numbers, about 10 minutes
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REAL_CASES, REPO, SHARED_DATA, VENV_BIN, bench_env, check_run, command_line, format_table,  # noqa: E402
                    run_measured)

DATASET_ID = 961
NAME = "CascadeBench"
DATASET = f"Dataset{DATASET_ID:03d}_{NAME}"
REAL_TRAIN = ("t2", "t1w", "t2s", "mt1", "mt0")  # cord-only real cases added to the training set
REAL_TEST = "t2_fake_lesion"
REAL_LESION = "t2/t2_fake_lesion_lesion_seg.nii.gz"
CONFIGS = ("2d", "2d_cord_roi")


def write_dataset(raw_root: Path, n_train: int, n_test: int, seed: int, real: bool) -> tuple[Path, list[str]]:
    """Phantoms with lesions (+ the real cases); returns the raw folder and the real test case ids."""
    from spineauto.datasets.phantoms import write_phantom_dataset

    folder = write_phantom_dataset(raw_root / DATASET, n_train=n_train, n_test=n_test, seed=seed)
    meta = json.loads((folder / "dataset.json").read_text())
    meta.pop("heads", None)  # segmentation only: no class labels needed for the real cases
    cases = {c: {"subject": v["subject"]} for c, v in meta["cases"].items()}
    real_test: list[str] = []
    if real:
        for case in REAL_TRAIN:
            image, mask = (SHARED_DATA / p for p in REAL_CASES[case])
            shutil.copy(image, folder / "imagesTr" / f"real_{case}_0000.nii.gz")
            shutil.copy(mask, folder / "labelsTr" / f"real_{case}.nii.gz")
            cases[f"real_{case}"] = {"subject": f"real_{case}"}
        image, cord = (SHARED_DATA / p for p in REAL_CASES[REAL_TEST])
        cord_img = nib.load(str(cord))
        labels = (np.asarray(cord_img.dataobj) > 0).astype(np.uint8)
        labels[np.asarray(nib.load(str(SHARED_DATA / REAL_LESION)).dataobj) > 0] = 2
        shutil.copy(image, folder / "imagesTs" / f"real_{REAL_TEST}_0000.nii.gz")
        nib.save(nib.Nifti1Image(labels, cord_img.affine, cord_img.header), str(folder / "labelsTs" / f"real_{REAL_TEST}.nii.gz"))
        real_test.append(f"real_{REAL_TEST}")
    meta.update(cases=cases, lesion_labels=["lesion"], numTraining=len(list((folder / "imagesTr").glob("*_0000.nii.gz"))))
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    return folder, real_test


def equalise_plans(path: Path, batch: int, adam_lr: float | None) -> dict:
    """Both configurations: the same batch size and feature widths (16, 32, ... at most 256), and
    Adam at ``adam_lr`` instead of the preset's SGD when given."""
    plans = json.loads(path.read_text())
    out = {}
    for name in CONFIGS:
        cfg = plans["configurations"][name]
        if adam_lr:
            cfg["optim"].update(optimizer="adam", initial_lr=adam_lr, weight_decay=0.0)
        n = len(cfg["network"]["features_per_stage"])
        cfg["network"]["features_per_stage"] = [min(16 * 2 ** i, 256) for i in range(n)]
        cfg["batch_size"] = batch
        out[name] = {"patch_size": cfg["patch_size"], "features": cfg["network"]["features_per_stage"], "batch_size": batch,
                     "optim": cfg["optim"], "roi": cfg.get("roi")}
    path.write_text(json.dumps(plans, indent=1))
    return out


def fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def spineauto(*args: object) -> list[str]:
    return [str(VENV_BIN / "python"), "-m", "spineauto", *map(str, args)]


def predict_cascade(env: dict, images: Path, roi: Path, out: Path, device: str, tta: list[str]) -> list[str]:
    """``predict -c 2d_cord_roi --roi roi`` for the cases whose ROI mask has voxels; empty masks for the others."""
    out.mkdir(parents=True, exist_ok=True)
    with_cord, empty = out.parent / f"{out.name}_inputs", []
    shutil.rmtree(with_cord, ignore_errors=True)
    with_cord.mkdir()
    for f in sorted(images.glob("*_0000.nii.gz")):
        case = f.name[: -len("_0000.nii.gz")]
        if (np.asarray(nib.load(str(roi / f"{case}.nii.gz")).dataobj) > 0).any():
            (with_cord / f.name).symlink_to(f.resolve())
        else:
            empty.append(case)
            img = nib.load(str(f))
            nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine, img.header), str(out / f"{case}.nii.gz"))
    if any(with_cord.iterdir()):
        cmd = spineauto("predict", "-d", DATASET_ID, "-c", "2d_cord_roi", "-f", "all", "-i", with_cord, "-o", out, "--roi", roi,
                        "--device", device, *tta)
        check_run(run_measured(cmd, env=env), "cascade predict")
    return empty


def evaluate(env: dict, pred: Path, gt: Path, name: str) -> dict:
    summary = pred / f"summary_{name}.json"
    check_run(run_measured(spineauto("evaluate", pred, gt, "-d", DATASET_ID, "-o", summary), env=env), f"evaluate {pred.name}")
    s = json.loads(summary.read_text())
    les = [c["lesion"] for c in s["metric_per_case"].values()]
    tp, fp, fn = (sum(c[k] for c in les) for k in ("tp", "fp", "fn"))
    n_ref, n_pred, hit = (sum(c.get(k, 0) for c in les) for k in ("lesions_ref", "lesions_pred", "lesions_detected"))
    hit_pred = sum(round((c["lesion_precision"] or 0) * c["lesions_pred"]) for c in les if c["lesions_pred"])
    p, r = (hit_pred / n_pred if n_pred else float("nan")), (hit / n_ref if n_ref else float("nan"))
    return {"lesion_dice": s["mean"]["lesion"]["dice"], "lesion_f1": s["mean"]["lesion"]["lesion_f1"],
            "cord_dice": s["mean"]["cord"]["dice"], "pooled_dice": 2 * tp / max(1, 2 * tp + fp + fn),
            "pooled_f1": 2 * p * r / (p + r) if p + r > 0 else 0.0, "lesions": f"{hit}/{n_ref}", "lesions_pred": n_pred,
            "false_lesions": n_pred - hit_pred}


def cord_box_errors(pred_dir: Path, gt: Path, margin: float, remove_mm: float) -> dict:
    """Predicted vs reference cord box (mm per edge, + = predicted looser), and the reference lesion
    voxels that the predicted cord's crop (``margin``) and removal (``remove_mm``) lose, over ``gt``."""
    from scipy import ndimage

    from spineauto.io.geometry import voxel_sizes
    from spineauto.preprocessing.preprocess import roi_box

    errors, lesion, cropped, removed, farthest, no_cord = [], 0, 0, 0, 0.0, 0
    for f in sorted(gt.glob("*.nii.gz")):
        ref_img = nib.load(str(f))
        ref = np.asarray(ref_img.dataobj)
        pred = np.asarray(nib.load(str(pred_dir / f.name)).dataobj) > 0
        sp = voxel_sizes(ref_img.affine)
        les = ref == 2
        lesion += int(les.sum())
        if not pred.any():
            no_cord += 1
            cropped += int(les.sum())
            continue
        for (plo, phi), (rlo, rhi), s in zip(roi_box(pred, sp, 0.0), roi_box(ref > 0, sp, 0.0), sp):
            errors += [float((rlo - plo) * s), float((phi - rhi) * s)]
        inside = np.zeros(ref.shape, bool)
        inside[tuple(slice(a, b) for a, b in roi_box(pred, sp, margin))] = True
        cropped += int((les & ~inside).sum())
        if les.any():
            dist = ndimage.distance_transform_edt(~pred, sampling=sp)[les]
            removed += int(((dist > remove_mm) & inside[les]).sum())
            farthest = max(farthest, float(dist.max()))
    e = np.array(errors) if errors else np.array([np.nan])
    return {"edges": len(errors), "exact": int((np.abs(e) < 1e-6).sum()), "looser": int((e > 1e-6).sum()),
            "tighter": int((e < -1e-6).sum()), "most_looser_mm": max(0.0, float(e.max())), "most_tighter_mm": max(0.0, float(-e.min())),
            "p90_abs_mm": float(np.percentile(np.abs(e), 90)), "tighter_than_margin": int((e < -margin).sum()), "no_cord": no_cord,
            "lesion_voxels": lesion, "lost_to_crop": cropped, "lost_to_removal": removed, "farthest_lesion_mm": farthest}


ROW_NAMES = {"whole": "2d, whole slices (lesion + cord)", "cascade": "2d cord -> 2d_cord_roi (cascade)",
             "cascade_refcord": "reference cord -> 2d_cord_roi (upper bound)"}


def results_table(results: dict) -> str:
    """One row per prediction: the test phantoms, then the real case when there is one."""
    rows, real = [], any("real" in r for r in results.values())
    for name, r in results.items():
        ph = r["phantoms"]
        row = [ROW_NAMES[name], fmt(ph["lesion_dice"]), fmt(ph["lesion_f1"]), fmt(ph["pooled_dice"]), fmt(ph["pooled_f1"]),
               ph["lesions"], ph["false_lesions"], fmt(ph["cord_dice"])]
        if real:
            rl = r["real"]
            row += [fmt(rl["lesion_dice"]), fmt(rl["lesion_f1"]), rl["false_lesions"], fmt(rl["cord_dice"])]
        rows.append(row)
    header = ["prediction", "lesion Dice", "lesion F1", "pooled lesion Dice", "pooled lesion F1", "lesions found", "false lesions",
              "cord Dice"] + (["real: lesion Dice", "real: lesion F1", "real: false lesions", "real: cord Dice"] if real else [])
    return format_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="script check: 4 x 25 iterations, 12 training phantoms, TTA off")
    ap.add_argument("--epochs", type=int, default=20, help="training epochs of each configuration")
    ap.add_argument("--iters", type=int, default=50, help="iterations per epoch")
    ap.add_argument("--batch", type=int, default=12, help="batch size of both configurations")
    ap.add_argument("--train", type=int, default=16, help="training phantoms")
    ap.add_argument("--test", type=int, default=6, help="held-out phantoms")
    ap.add_argument("--seed", type=int, default=0, help="phantom seed")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of both configurations")
    ap.add_argument("--sgd", action="store_true", help="keep the preset's SGD (lr 0.01, poly): at these budgets it learns "
                    "no lesion in either configuration (measured: 12 x 50 x 12 samples, lesion pseudo-Dice 0 every epoch)")
    ap.add_argument("--no-real", action="store_true", help="phantoms only (no ../shared/data cases)")
    ap.add_argument("--no-tta", action="store_true", help="predict without mirroring")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--workers", type=int, default=2, help="worker processes for planning/preprocessing")
    ap.add_argument("--workdir", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.iters, args.train, args.no_tta = 4, 25, 12, True
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_cascade_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        info = run(args, work)
        if args.json:
            args.json.write_text(json.dumps(info, indent=2, default=str))
    finally:  # a temporary work folder goes, also after a failed step, unless asked to keep it
        if args.keep or args.workdir is not None:
            print(f"work folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def run(args: argparse.Namespace, work: Path) -> dict:
    """Every step in ``work``; prints the tables and returns what was measured."""
    real = not args.no_real and SHARED_DATA.is_dir()
    env = bench_env(work, args.device, args.epochs, args.iters)
    raw, real_test = write_dataset(work / "raw", args.train, args.test, args.seed, real)
    info: dict = {"command": command_line(), "epochs": args.epochs, "iters": args.iters, "batch": args.batch,
                  "samples": args.epochs * args.iters * args.batch, "train_cases": len(list((raw / "imagesTr").glob("*_0000.nii.gz"))),
                  "real": real, "tta": not args.no_tta}
    check_run(run_measured(spineauto("plan_and_preprocess", "-d", DATASET_ID, "-np", args.workers,
                                     "--preset", REPO / "plans" / "lesion_segmentation.yaml"), env=env), "plan_and_preprocess")
    info["plans"] = equalise_plans(work / "sa_preprocessed" / DATASET / "plans.json", args.batch, None if args.sgd else args.lr)
    info["train_s"] = {}
    for cfg in CONFIGS:
        run = run_measured(spineauto("train", "-d", DATASET_ID, "-c", cfg, "-f", "all", "--epochs", args.epochs,
                                     "--iters-per-epoch", args.iters, "--val-iters", 2, "--no-validate", "--device", args.device,
                                     "--wandb", "disabled"), env=env)
        check_run(run, f"{cfg} training")
        info["train_s"][cfg] = run.wall_s
    # test images, and reference folders for the phantoms and for the real case
    images, gts = work / "test_images", {"phantoms": work / "gt_phantoms", "real": work / "gt_real"}
    for folder in (images, *gts.values()):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    for f in sorted((raw / "imagesTs").glob("*_0000.nii.gz")):
        (images / f.name).symlink_to(f.resolve())
    for f in sorted((raw / "labelsTs").glob("*.nii.gz")):
        shutil.copy(f, gts["real" if f.name[: -len(".nii.gz")] in real_test else "phantoms"] / f.name)
    all_gt = work / "gt_all"
    shutil.copytree(raw / "labelsTs", all_gt, dirs_exist_ok=True)
    tta = ["--no-tta"] if args.no_tta else []
    pred = {name: work / "pred" / name for name in ("whole", "cascade", "cascade_refcord")}
    shutil.rmtree(work / "pred", ignore_errors=True)
    check_run(run_measured(spineauto("predict", "-d", DATASET_ID, "-c", "2d", "-f", "all", "-i", images, "-o", pred["whole"],
                                     "--device", args.device, *tta), env=env), "2d predict")
    info["no_cord_cases"] = predict_cascade(env, images, pred["whole"], pred["cascade"], args.device, tta)
    predict_cascade(env, images, all_gt, pred["cascade_refcord"], args.device, tta)
    roi = info["plans"]["2d_cord_roi"]["roi"]
    info["cord_box"] = {part: cord_box_errors(pred["whole"], gt, roi["margin_mm"], roi["remove_outside_mm"])
                        for part, gt in gts.items() if any(gt.iterdir())}
    results = {name: {part: evaluate(env, folder, gt, part) for part, gt in gts.items() if any(gt.iterdir())}
               for name, folder in pred.items()}
    info["results"] = results
    print(results_table(results))
    p = info["plans"]
    print(f"\nsame budget: {args.epochs} epochs x {args.iters} iterations x batch {args.batch} = {info['samples']} samples each; "
          f"{'SGD' if args.sgd else f'Adam {args.lr:g}'}; training s: 2d {info['train_s']['2d']:.0f}, "
          f"2d_cord_roi {info['train_s']['2d_cord_roi']:.0f}; patch 2d {p['2d']['patch_size']}, 2d_cord_roi {p['2d_cord_roi']['patch_size']}; "
          f"{info['train_cases']} training cases{' (5 real, cord only)' if real else ''}; {args.test} test phantoms; "
          f"TTA {'off' if args.no_tta else 'on'}")
    print(f"cord predicted by 2d vs reference (roi: margin {roi['margin_mm']:g} mm, jitter {roi['jitter_mm']:g} mm, "
          f"remove_outside {roi['remove_outside_mm']:g} mm):")
    for part, b in info["cord_box"].items():
        print(f"  {part}: box edges exact {b['exact']}/{b['edges']}, looser {b['looser']} (up to {b['most_looser_mm']:.1f} mm), "
              f"tighter {b['tighter']} (up to {b['most_tighter_mm']:.1f} mm; {b['tighter_than_margin']} beyond the margin), "
              f"|error| 90th percentile {b['p90_abs_mm']:.1f} mm; no cord predicted: {b['no_cord']} case(s); reference lesion voxels "
              f"lost to the crop {b['lost_to_crop']}/{b['lesion_voxels']}, to the removal {b['lost_to_removal']}; farthest lesion voxel "
              f"from the predicted cord {b['farthest_lesion_mm']:.1f} mm")
    print(f"command: {info['command']}")
    return info


if __name__ == "__main__":
    raise SystemExit(main())
