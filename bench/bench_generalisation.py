"""Benchmark: does the cord model survive shift we can see? spineauto and nnU-Net v2 side by side.

Training data: the six real image/cord pairs of ../shared/data (one subject, one scanner, mostly
cropped near the cord). Every model trains on fold ``all`` for the same number of samples
(``--samples``; nnU-Net's default budget is 30 x 250 x 4 = 30,000), one model per scenario and seed:

- ``full``: all six cases; tested on shift no training case has:
  * ``t2s_uncropped`` (320x320, the whole neck at 0.5 mm): the ``t2s`` cord mask carried over
    through the affines (nearest neighbour; the two headers disagree by a shear: the carried cord lies
    4-8 mm beside the cord on levels 3-6, less above, so recall stays low for every model and exact
    Dice means nothing): cord recall, false-positive volume farther than 5 mm from the carried cord on
    the slices it covers, and the number of connected components;
  * ``dwi_mean`` and ``fmri_tsnr`` (no masks): components, the share of slices with cord, and
    whether the result is one tube through every slice;
  * axial phantoms (``spineauto.datasets.phantoms``) of T1w, T2w and T2*w rendered with 2.5x the
    field of view (the whole neck outline), a stronger bias field and more noise: Dice;
  * whole-neck phantoms (``neck_*``): cervical, 3x the field of view, centred on the vertebral body as
    a whole-neck scan is (the cord ~15 mm behind the centre): Dice, false-positive mm^3 farther than
    5 mm from the cord and components.
- ``loco-<contrast>``: leave one contrast out (T2w: t2 + t2_fake_lesion, T1w, T2starw, MT: mt0 + mt1):
  train on the rest, Dice on the left-out cases (and, for T2starw, the uncropped metrics above).

Each spineauto prediction is scored as written (the model's own postprocessing) and with two
postprocessings applied here: keep the largest component, and keep the cord component
(:func:`spineauto.inference.postprocessing.keep_cord_component`). nnU-Net's masks the same way.
A *variant* is a preset applied to spineauto's plan (``--variants``, see VARIANTS; a few add
train options, TRAIN_ARGS): the levers measured one at a time. ``sparse-uncropped`` changes the data instead: the plan, trained on the six
cases plus ``t2s_uncropped`` as a sparse case (``spineauto convert sparse``: background farther than
15 mm from the carried ``t2s`` cord, nnU-Net's ignore label near it) whose levels SPARSE_HELD_OUT
(slices along S-I) are all ignore. The uncropped scan is then scored twice for every model: on all
the levels the carried cord reaches, and on the held-out levels only (``held-out`` columns), the
only fair comparison for a model that trained on the other levels.
"One pass" is a copy of the model without its localise plan (in plans.json and each fold's
run_config.yaml): the network's raw output. ``--no-tta`` predicts and scores every model a second time
without test-time mirroring.

    .venv/bin/python bench/bench_generalisation.py --quick      # 1 seed, full scenario, 3,000 samples
    .venv/bin/python bench/bench_generalisation.py --samples 12000 --scenarios full loco-T1w loco-T2starw
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REAL_CASES, REPO, SHARED_DATA, VENV_BIN, bench_env, check_run, command_line, format_table,  # noqa: E402
                    run_measured, write_real_dataset)

sys.path.insert(0, str(REPO))
from spineauto.inference.postprocessing import keep_cord_component, keep_largest_component  # noqa: E402

GROUPS = {"T2w": ("t2", "t2_fake_lesion"), "T1w": ("t1w",), "T2starw": ("t2s",), "MT": ("mt0", "mt1")}
UNLABELLED = {"t2s_uncropped": "t2s/t2s_uncropped.nii.gz", "dwi_mean": "dmri/dwi_mean.nii.gz", "fmri_tsnr": "fmri/fmri_tsnr.nii.gz"}
PHANTOM_CONTRASTS = ("T1w", "T2w", "T2starw")
FP_DISTANCE_MM = 5.0
# Levers, one at a time: presets over spineauto's planned 2d configuration ({} = the plan as it is).
VARIANTS: dict[str, dict] = {
    "plan": {},
    "no-intensity-aug": {"augmentation": {"intensity_curves": 0.0, "bias_field": 0.0, "inversion": 0.0}},
    "batch4": {"batch_size": 4},
    "strong-remap": {"augmentation": {"intensity_curves": 0.8, "inversion": 0.5}},
    "monotone-curves": {"augmentation": {"non_monotone": 0.0}},
    "second-pass": {"localise": {"second_pass": True}},
    "no-whole-neck": {"augmentation": {"whole_neck": 0.0}},
    "whole-neck": {"augmentation": {"whole_neck": 0.25}},
    "whole-neck-half": {"augmentation": {"whole_neck": 0.5}},
    # nnU-Net's base recipe, one difference at a time (README "Benchmarks against nnU-Net v2 2.8.1")
    "he-init": {"network": {"init": "he"}},
    "torch-init": {"network": {"init": "torch"}},
    "fp32": {},  # trained without bf16 autocast on a CPU that has it (nnU-Net autocasts on CUDA only): TRAIN_ARGS
    "sparse-uncropped": {},  # a data variant: see SPARSE_VARIANTS
    "cord-contrast": {"augmentation": {"cord_contrast": 0.5}},  # half the samples: the cord's and its surround's levels redrawn
    "cord-contrast-quarter": {"augmentation": {"cord_contrast": 0.25, "intensity_curves": 1 / 3}},  # as many samples remapped as the plan
    "sparse-cord-contrast": {"augmentation": {"cord_contrast": 0.5}},  # both: the sparse case and cord-contrast curves
    "weight-average": {"optim": {"weight_average": 0.5}},  # the final weights: the mean over the last half of training
    "sparse-weight-average": {"optim": {"weight_average": 0.5}},  # the recipe (sparse case) with it
    "sparse-weight-average-quarter": {"optim": {"weight_average": 0.25}},  # the same over the last quarter
    "sparse-cord-contrast-average": {"augmentation": {"cord_contrast": 0.5}, "optim": {"weight_average": 0.5}},  # all three
    "sparse-cortex": {"augmentation": {"vertebral_cortex": 0.5}},  # the recipe, half the neck phantoms' vertebral bodies in a cortical shell
    "sparse-no-whole-neck": {"augmentation": {"whole_neck": 0.0}},  # the recipe without the whole-neck phantoms: real context only
    "sparse-no-intensity-aug": {"augmentation": {"intensity_curves": 0.0, "bias_field": 0.0, "inversion": 0.0}},  # the recipe without remapping
    "sparse-margin-10": {},  # the sparse case with background from 10 mm of the carried cord (SPARSE_MARGINS)
    "sparse-curves-quarter": {"augmentation": {"intensity_curves": 0.25}},  # the recipe, half as many samples through a curve
    "sparse-monotone": {"augmentation": {"non_monotone": 0.0}},  # the recipe, monotone curves only (tissues keep or invert their order)
}
TRAIN_ARGS: dict[str, list[str]] = {"fp32": ["--no-amp"]}  # spineauto train options of a variant
SPARSE_VARIANTS = {"sparse-uncropped", "sparse-cord-contrast", "sparse-weight-average", "sparse-weight-average-quarter",
                   "sparse-cord-contrast-average", "sparse-margin-10", "sparse-cortex", "sparse-no-whole-neck",
                   "sparse-no-intensity-aug", "sparse-curves-quarter", "sparse-monotone"}  # the plan, with t2s_uncropped added as a sparse case (its held-out levels all ignore)
SPARSE_MARGIN_MM = 15.0  # spineauto convert sparse's default: the carried cord lies up to ~10 mm off on this pair
SPARSE_MARGINS = {"sparse-margin-10": 10.0}  # variants with another margin (the carried cord's offset here: up to ~8.5 mm)
SPARSE_HELD_OUT = tuple(range(6, 11))  # levels (slices) of t2s_uncropped never labelled in training, scored in the held-out columns
POSTPROCESSINGS = {  # (mask, affine) -> mask
    "as written": lambda m, affine: m,
    "largest": lambda m, affine: keep_largest_component(m.astype(np.uint8), 1) > 0,
    "cord": lambda m, affine: keep_cord_component(m.astype(np.uint8), 1, affine) > 0,
}


# ----------------------------------------------------------------------------------------------- test data

def carried_mask(mask_path: Path, target: nib.Nifti1Image) -> np.ndarray:
    """The mask of ``mask_path`` on ``target``'s grid through both affines (nearest neighbour)."""
    from scipy import ndimage

    src = nib.load(str(mask_path))
    vox = np.linalg.inv(src.affine) @ target.affine  # target voxel -> source voxel
    m = ndimage.affine_transform(np.asanyarray(src.dataobj).astype(np.float32), vox[:3, :3], vox[:3, 3],
                                 output_shape=target.shape[:3], order=0, mode="constant", cval=0)
    return m > 0.5


def shift_image(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A phantom image with the shift of the bench: a strong linear in-plane bias field and 2x noise (Rician)."""
    u, v = np.meshgrid(np.linspace(-1, 1, img.shape[0]), np.linspace(-1, 1, img.shape[1]), indexing="ij")
    img = img * np.exp(rng.uniform(-0.6, 0.6) * u + rng.uniform(-0.6, 0.6) * v)[..., None]
    return np.hypot(img + rng.normal(0, 0.05 * img.max(), img.shape), rng.normal(0, 0.05 * img.max(), img.shape))


def shifted_phantoms(folder: Path, n_per_contrast: int, seed: int, neck: bool = False) -> list[str]:
    """Axial phantoms unlike any training case: 2.5x field of view, stronger bias, 2x noise. With
    ``neck``: 3x field of view, cervical, cropped so that the field of view is centred on the vertebral
    body, as a whole-neck scan is (the cord lies ~15 mm behind the centre; cases ``neck_<contrast>_<i>``)."""
    from spineauto.datasets.phantoms import BONE, DISC, PhantomSpec, render_phantom

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases = []
    for contrast in PHANTOM_CONTRASTS:
        for i in range(n_per_contrast):
            location = "cervical" if neck else str(rng.choice(["cervical", "thoracic"]))
            spec = PhantomSpec(contrast, "axial", location, 0, int(rng.integers(2**31 - 1)), fov_scale=3.0 if neck else 2.5)
            p = render_phantom(spec)
            img = shift_image(np.asarray(p.image.dataobj, dtype=np.float32), rng)
            label, affine = (np.asarray(p.label.dataobj) > 0).astype(np.uint8), p.image.affine.copy()
            if neck:  # centre the in-plane field of view on the vertebral body
                c = np.round(np.argwhere(np.isin(p.tissues, (BONE, DISC))).mean(0)).astype(int)
                half = np.minimum(c, np.array(img.shape) - 1 - c)
                box = (slice(c[0] - half[0], c[0] + half[0] + 1), slice(c[1] - half[1], c[1] + half[1] + 1), slice(None))
                img, label = img[box], label[box]
                affine[:3, 3] = affine[:3, :3] @ np.array([box[0].start, box[1].start, 0]) + affine[:3, 3]
            name = f"{'neck' if neck else 'phantom'}_{contrast}_{i}"
            nib.save(nib.Nifti1Image(img.astype(np.float32), affine), str(folder / f"{name}_0000.nii.gz"))
            nib.save(nib.Nifti1Image(label, affine), str(folder / f"{name}_ref.nii.gz"))
            cases.append(name)
    return cases


# ------------------------------------------------------------------------------------------------- metrics

def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def components(mask: np.ndarray) -> int:
    import cc3d

    return int(cc3d.connected_components(mask.astype(np.uint8), connectivity=26).max()) if mask.any() else 0


def csa_error(mask: np.ndarray, ref: np.ndarray, affine: np.ndarray) -> float:
    """Mean cross-sectional area of ``mask`` over the slices where ``ref`` has cord, relative to ``ref``'s
    (-0.1: 10% too small); slices along the thickest axis, as the CSA of an axial scan."""
    ax = through_axis(affine)
    other = tuple(i for i in range(3) if i != ax)
    on = ref.any(axis=other)
    return float(mask.sum(axis=other)[on].sum() / max(1, ref.sum(axis=other)[on].sum()) - 1.0)


def through_axis(affine: np.ndarray) -> int:
    return int(np.argmax(np.linalg.norm(affine[:3, :3], axis=0)))


def tube_stats(mask: np.ndarray, affine: np.ndarray) -> dict:
    """Components, share of slices (along the thickest axis) with cord, one tube through all slices."""
    ax = through_axis(affine)
    per_slice = mask.any(axis=tuple(i for i in range(3) if i != ax))
    n = components(mask)
    return {"components": n, "slice_share": float(per_slice.mean()), "one_tube": bool(n == 1 and per_slice.all())}


def uncropped_stats(mask: np.ndarray, carried: np.ndarray, affine: np.ndarray, levels: tuple[int, ...] | None = None) -> dict:
    """Recall of the carried cord; false-positive mm^3 over FP_DISTANCE_MM from it on its slices; with
    ``levels``, all three on those slices only (the rest of the scan cut away first)."""
    from scipy import ndimage

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    ax = through_axis(affine)
    if levels is not None:
        keep = np.zeros(mask.shape[ax], bool)
        keep[list(levels)] = True
        shape = [1, 1, 1]
        shape[ax] = -1
        mask, carried = mask & keep.reshape(shape), carried & keep.reshape(shape)
    covered = carried.any(axis=tuple(i for i in range(3) if i != ax))
    far = np.zeros_like(mask)
    for k in np.flatnonzero(covered):
        sl = [slice(None)] * 3
        sl[ax] = k
        d = ndimage.distance_transform_edt(~carried[tuple(sl)], sampling=np.delete(spacing, ax))
        far[tuple(sl)] = mask[tuple(sl)] & (d > FP_DISTANCE_MM)
    return {"recall": float((mask & carried).sum() / max(1, carried.sum())), "fp_mm3": float(far.sum() * np.prod(spacing)),
            "components": components(mask)}


def score_folder(pred: Path, tests: dict) -> list[dict]:
    """One row per (case, postprocessing) for the predictions in ``pred``."""
    rows = []
    for case, info in tests.items():
        f = pred / f"{case}.nii.gz"
        if not f.is_file():
            rows.append({"case": case, "pp": "as written", "missing": True})
            continue
        img = nib.load(str(f))
        written = np.asanyarray(img.dataobj) > 0
        for pp, fn in POSTPROCESSINGS.items():
            mask = fn(written, img.affine)
            row = {"case": case, "kind": info["kind"], "pp": pp}
            if info["kind"] in ("dice", "neck"):
                row["dice"] = dice(mask, info["ref"])
                row["csa_error"] = csa_error(mask, info["ref"], img.affine)
                if info["kind"] == "neck":  # and what lies outside the cord in a whole neck
                    row.update({f"neck_{k}": v for k, v in uncropped_stats(mask, info["ref"], img.affine).items()})
            elif info["kind"] == "uncropped":
                row.update(uncropped_stats(mask, info["ref"], img.affine))
                row.update({f"heldout_{k}": v for k, v in uncropped_stats(mask, info["ref"], img.affine, SPARSE_HELD_OUT).items()})
            else:
                row.update(tube_stats(mask, img.affine))
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------- runs

def build_tests(work: Path, held_out: tuple[str, ...], phantoms: int, seed: int) -> tuple[Path, dict]:
    """Images to predict (one folder) and what each is scored against."""
    images = work / "test_images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    tests: dict[str, dict] = {}
    for case in held_out:
        img, seg = (SHARED_DATA / p for p in REAL_CASES[case])
        shutil.copy(img, images / f"{case}_0000.nii.gz")
        tests[case] = {"kind": "dice", "ref": np.asanyarray(nib.load(str(seg)).dataobj) > 0}
    if not held_out or "t2s" in held_out:
        target = nib.load(str(SHARED_DATA / UNLABELLED["t2s_uncropped"]))
        shutil.copy(SHARED_DATA / UNLABELLED["t2s_uncropped"], images / "t2s_uncropped_0000.nii.gz")
        tests["t2s_uncropped"] = {"kind": "uncropped", "ref": carried_mask(SHARED_DATA / REAL_CASES["t2s"][1], target)}
    if not held_out:
        for case in ("dwi_mean", "fmri_tsnr"):  # the tSNR map has NaN where the signal is 0: 0 there
            img = nib.load(str(SHARED_DATA / UNLABELLED[case]))
            data = np.nan_to_num(np.asanyarray(img.dataobj).astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
            nib.save(nib.Nifti1Image(data, img.affine), str(images / f"{case}_0000.nii.gz"))
            tests[case] = {"kind": "tube"}
        if phantoms:
            pdir = work / "phantoms"
            for case in shifted_phantoms(pdir, phantoms, seed=1000) + shifted_phantoms(pdir, phantoms, seed=2000, neck=True):
                shutil.copy(pdir / f"{case}_0000.nii.gz", images / f"{case}_0000.nii.gz")
                tests[case] = {"kind": "neck" if case.startswith("neck") else "dice",
                               "ref": np.asanyarray(nib.load(str(pdir / f"{case}_ref.nii.gz")).dataobj) > 0}
    return images, tests


def write_preset(path: Path, override: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"description": "bench_generalisation variant", "configurations": {"2d": override}}))
    return path


def _model_folder(run_dir: Path) -> Path:
    return next((run_dir / "sa_results").glob("Dataset*/spineautoTrainer__spineautoPlans__2d"))


def localising(run_dir: Path) -> bool:
    return json.loads((_model_folder(run_dir) / "plans.json").read_text())["configurations"]["2d"].get("localise") is not None


def one_pass_model(run_dir: Path) -> Path:
    """A copy of the run's model folder without its localise plan (one pass, no cord component), in
    ``plans.json`` and in every fold's ``run_config.yaml`` (the plan the fold predicts with)."""
    import yaml

    src, dst = _model_folder(run_dir), run_dir / "one_pass_model"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    plans = json.loads((dst / "plans.json").read_text())
    plans["configurations"]["2d"]["localise"] = None
    (dst / "plans.json").write_text(json.dumps(plans, indent=1))
    for run_config in dst.glob("fold_*/run_config.yaml"):  # each fold predicts with its own plan: that one too
        data = yaml.safe_load(run_config.read_text())
        data["configuration"]["localise"] = None
        run_config.write_text(yaml.safe_dump(data, sort_keys=False))
    return dst


def _with_output(cmd: list[str], out: Path) -> list[str]:
    cmd = list(cmd)
    cmd[cmd.index("-o") + 1] = str(out)
    return cmd


def train_model(run_dir: Path, tool: str, variant: str, train_cases: list[str], dataset_id: int, samples: int, seed: int) -> dict:
    """Plan, preprocess and train one model on fold ``all`` for ``samples`` samples; what it took."""
    folder = write_real_dataset(run_dir / "raw", dataset_id, cases=train_cases)
    batch = 4
    env = bench_env(run_dir, "cpu", 1, 1)
    if variant in SPARSE_VARIANTS:
        add_sparse_uncropped(folder, dataset_id, env, SPARSE_MARGINS.get(variant, SPARSE_MARGIN_MM))
    if tool == "spineauto":
        cmd = [str(VENV_BIN / "python"), "-m", "spineauto", "plan_and_preprocess", "-d", str(dataset_id), "-np", "2"]
        if VARIANTS[variant]:
            cmd += ["--preset", str(write_preset(run_dir / "preset.yaml", VARIANTS[variant]))]
        check_run(run_measured(cmd, env), f"{variant}: plan_and_preprocess")
        plans = json.loads(next((run_dir / "sa_preprocessed").glob("Dataset*/plans.json")).read_text())
        batch = int(plans["configurations"]["2d"]["batch_size"])
    else:
        check_run(run_measured([str(VENV_BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "2d",
                                "-np", "2", "-npfp", "2"], env), "nnU-Net plan_and_preprocess")
        plans = json.loads(next((run_dir / "nn_preprocessed").glob("Dataset*/nnUNetPlans.json")).read_text())
        batch = int(plans["configurations"]["2d"]["batch_size"])  # 4 for the six cases; 24 with the sparse case
    iters = max(1, round(samples / batch))
    epochs = max(1, min(30, iters // 50))
    per_epoch = max(1, round(iters / epochs))
    env = bench_env(run_dir, "cpu", epochs, per_epoch)
    env["nnUNet_def_n_proc"] = "2"
    if tool == "spineauto":
        train = [str(VENV_BIN / "python"), "-m", "spineauto", "train", "-d", str(dataset_id), "-c", "2d", "-f", "all",
                 "--epochs", str(epochs), "--iters-per-epoch", str(per_epoch), "--val-iters", "2", "--wandb", "disabled",
                 "--device", "cpu", "--seed", str(seed), "--no-validate", *TRAIN_ARGS.get(variant, [])]
    else:
        train = [str(VENV_BIN / "nnUNetv2_train"), str(dataset_id), "2d", "all", "-tr", "nnUNetTrainerBench", "-device", "cpu"]
    t = run_measured(train, env, timeout_s=7200)
    check_run(t, f"{tool} {variant} train")
    return {"batch": batch, "iters": epochs * per_epoch, "train_s": round(t.wall_s, 1)}


def add_sparse_uncropped(folder: Path, dataset_id: int, env: dict, margin_mm: float = SPARSE_MARGIN_MM) -> None:
    """t2s_uncropped into the raw dataset as a sparse case (the CLI, as a user would), then its
    SPARSE_HELD_OUT levels set to ignore: no label of theirs reaches training."""
    check_run(run_measured([str(VENV_BIN / "python"), "-m", "spineauto", "convert", "sparse", str(SHARED_DATA / UNLABELLED["t2s_uncropped"]),
                            str(SHARED_DATA / REAL_CASES["t2s"][1]), "-d", str(dataset_id), "--case", "t2s_uncropped",
                            "--margin-mm", str(margin_mm)], env), "convert sparse")
    label_file = folder / "labelsTr" / "t2s_uncropped.nii.gz"
    img = nib.load(str(label_file))
    labels = np.asanyarray(img.dataobj).copy()
    ignore = json.loads((folder / "dataset.json").read_text())["labels"]["ignore"]
    sl = [slice(None)] * 3
    sl[through_axis(img.affine)] = list(SPARSE_HELD_OUT)
    labels[tuple(sl)] = ignore
    nib.save(nib.Nifti1Image(labels, img.affine, img.header), str(label_file))


def run_scenario(work: Path, scenario: str, variants: list[str], tools: list[str], seed: int, samples: int, phantoms: int,
                 dataset_id: int, reuse: bool = False, one_pass_only: bool = False, no_tta: bool = False) -> list[dict]:
    held_out = () if scenario == "full" else GROUPS[scenario.split("-", 1)[1]]
    train_cases = [c for c in REAL_CASES if c not in held_out]
    work.mkdir(parents=True, exist_ok=True)
    images, tests = build_tests(work, held_out, phantoms, seed)
    rows = []
    for tool in tools:
        for variant in (variants if tool == "spineauto" else ["nnU-Net default"]):
            run_dir = work / f"{tool}_{variant}_seed{seed}"
            info_file = run_dir / "trained.json"
            if not (reuse and info_file.is_file()):
                shutil.rmtree(run_dir, ignore_errors=True)
                info = train_model(run_dir, tool, variant, train_cases, dataset_id, samples, seed)
                info_file.write_text(json.dumps(info))
            info = json.loads(info_file.read_text())
            env = bench_env(run_dir, "cpu", 1, 1)
            env["nnUNet_def_n_proc"] = "2"
            if tool == "spineauto":
                predict = [str(VENV_BIN / "python"), "-m", "spineauto", "predict", "-d", str(dataset_id), "-c", "2d", "-f", "all",
                           "-i", str(images), "-o", str(run_dir / "pred"), "--device", "cpu"]
            else:
                predict = [str(VENV_BIN / "nnUNetv2_predict"), "-d", str(dataset_id), "-c", "2d", "-f", "all", "-tr",
                           "nnUNetTrainerBench", "-i", str(images), "-o", str(run_dir / "pred"), "-device", "cpu",
                           "-npp", "1", "-nps", "1"]
            todo = [(run_dir / "pred", predict)]
            preds = {"one pass" if tool == "nnunet" else "as planned": run_dir / "pred"}
            if tool == "spineauto" and localising(run_dir):  # the same model without its localise plan (no cord component)
                todo.append((run_dir / "pred_one_pass", _with_output(predict, run_dir / "pred_one_pass") + ["-m", str(one_pass_model(run_dir))]))
                preds = {"as planned": run_dir / "pred", "one pass": run_dir / "pred_one_pass"}
                if one_pass_only:  # its "cord" rows are what the plan predicts (one pass + the same cord choice)
                    todo, preds = todo[1:], {"one pass": run_dir / "pred_one_pass"}
            if no_tta:  # every prediction again without test-time mirroring
                flag = "--no-tta" if tool == "spineauto" else "--disable_tta"
                for (folder, cmd), inference in zip(list(todo), list(preds)):
                    todo.append((folder.with_name(folder.name + "_no_tta"), _with_output(cmd, folder.with_name(folder.name + "_no_tta")) + [flag]))
                    preds[f"{inference}, no TTA"] = folder.with_name(folder.name + "_no_tta")
            for folder, cmd in todo:
                if not (reuse and all((folder / f"{c}.nii.gz").is_file() for c in tests)):
                    shutil.rmtree(folder, ignore_errors=True)
                    check_run(run_measured(cmd, env), f"{tool} {variant} predict into {folder.name}")
            for inference, folder in preds.items():
                for r in score_folder(folder, tests):
                        rows.append({**r, "scenario": scenario, "tool": tool, "variant": variant, "inference": inference, "seed": seed, **info})
            print(f"  {scenario} {tool} {variant} seed {seed}: batch {info['batch']} x {info['iters']} iterations, "
                  f"train {info['train_s']:.0f} s", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------- tables

def _fmt(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    m = statistics.mean(values)
    return f"{m:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def _column(case: str) -> str:
    """phantom_T1w_0 -> T1w, neck_T1w_0 -> neck T1w, a real case -> its name."""
    kind, _, rest = case.partition("_")
    return {"phantom": rest.split("_")[0], "neck": f"neck {rest.split('_')[0]}"}.get(kind, case)


def tables(rows: list[dict]) -> str:
    out = []
    keys = sorted({(r["tool"], r["variant"], r["inference"], r["pp"]) for r in rows if "missing" not in r},
                  key=lambda k: (k[0] != "spineauto", k))
    header = ["tool", "variant", "inference", "postprocessing"]
    dice_cols = sorted({(r["scenario"], _column(r["case"])) for r in rows if r.get("kind") in ("dice", "neck")})
    body = []
    for key in keys:
        sel = [r for r in rows if (r["tool"], r["variant"], r["inference"], r["pp"]) == key and "missing" not in r]
        line = list(key)
        for scen, col in dice_cols:
            vals = {}
            for r in sel:
                if r.get("kind") in ("dice", "neck") and r["scenario"] == scen and _column(r["case"]) == col:
                    vals.setdefault(r["seed"], []).append(r["dice"])
            line.append(_fmt([statistics.mean(v) for v in vals.values()]))
        for scen, col in dice_cols:  # mean CSA error, in %, per contrast of the phantoms
            if col.split(" ")[-1] in PHANTOM_CONTRASTS:
                vals = {}
                for r in sel:
                    if r.get("kind") in ("dice", "neck") and r["scenario"] == scen and _column(r["case"]) == col:
                        vals.setdefault(r["seed"], []).append(100 * r["csa_error"])
                line.append(_fmt([statistics.mean(v) for v in vals.values()], 0))
        for case in ("t2s_uncropped",):
            for scen in sorted({r["scenario"] for r in sel if r["case"] == case}):
                u = [r for r in sel if r["case"] == case and r["scenario"] == scen]
                line += [_fmt([r["recall"] for r in u]), _fmt([r["fp_mm3"] for r in u], 0), _fmt([r["components"] for r in u], 1),
                         _fmt([r["heldout_recall"] for r in u]), _fmt([r["heldout_fp_mm3"] for r in u], 0),
                         _fmt([r["heldout_components"] for r in u], 1)]
        u = [r for r in sel if r.get("kind") == "neck"]
        if u:
            line += [_fmt([r["neck_fp_mm3"] for r in u], 0), _fmt([r["neck_components"] for r in u], 1)]
        for case in ("dwi_mean", "fmri_tsnr"):
            u = [r for r in sel if r["case"] == case]
            if u:
                line += [f"{_fmt([r['components'] for r in u], 1)} / {_fmt([r['slice_share'] for r in u])} / "
                         f"{sum(r['one_tube'] for r in u)}/{len(u)}"]
        body.append(line)
    header += [f"{s}: {c} Dice" for s, c in dice_cols]
    header += [f"{c} CSA error %" for _, c in dice_cols if c.split(" ")[-1] in PHANTOM_CONTRASTS]
    for scen in sorted({r["scenario"] for r in rows if r["case"] == "t2s_uncropped"}):
        header += [f"{scen}: uncropped recall", f"{scen}: FP mm³ > {FP_DISTANCE_MM:g} mm", f"{scen}: components",
                   f"{scen}: held-out levels recall", f"{scen}: held-out FP mm³", f"{scen}: held-out components"]
    if any(r.get("kind") == "neck" for r in rows):
        header += [f"neck phantoms: FP mm³ > {FP_DISTANCE_MM:g} mm", "neck phantoms: components"]
    header += [f"{c}: components / slice share / one tube" for c in ("dwi_mean", "fmri_tsnr") if any(r["case"] == c for r in rows)]
    width = max(len(b) for b in body) if body else 0
    out.append(format_table(header[:width], [b + ["-"] * (width - len(b)) for b in body]))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=30000, help="training samples per model (nnU-Net default: 30 x 250 x 4)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--scenarios", nargs="+", default=["full"] + [f"loco-{g}" for g in GROUPS])
    ap.add_argument("--variants", nargs="+", default=["plan"], choices=list(VARIANTS))
    ap.add_argument("--tools", nargs="+", default=["spineauto", "nnunet"], choices=["spineauto", "nnunet"])
    ap.add_argument("--phantoms", type=int, default=2, help="shifted phantoms per contrast (full scenario)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_generalisation"))
    ap.add_argument("--quick", action="store_true", help="1 seed, the full scenario, 3,000 samples")
    ap.add_argument("--json", type=Path, help="also write every row here")
    ap.add_argument("--reuse", action="store_true", help="keep models and predictions already in --work (rescore them)")
    ap.add_argument("--one-pass-only", action="store_true",
                    help="predict each spineauto model once, without its localise plan (half the prediction time): raw rows, and "
                         "as the default prediction the cord postprocessing of them (one pass + the same cord choice)")
    ap.add_argument("--no-tta", action="store_true", help="also predict and score every model without test-time mirroring")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.scenarios, args.samples = [0], ["full"], 3000
    if not SHARED_DATA.is_dir():
        raise SystemExit(f"{SHARED_DATA}: real data missing; see shared/data/README.md")
    rows: list[dict] = []
    for seed in args.seeds:
        for i, scenario in enumerate(args.scenarios):
            rows += run_scenario(args.work / f"{scenario}_seed{seed}", scenario, args.variants, args.tools, seed, args.samples,
                                 args.phantoms, 930 + i, args.reuse, args.one_pass_only, args.no_tta)
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items()} for r in rows], indent=1, default=str))
    print(f"\n{command_line()}\n{args.samples} training samples per model; seeds {args.seeds}\n")
    print(tables(rows))


if __name__ == "__main__":
    main()
