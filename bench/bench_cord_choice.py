"""Benchmark: does the cord choice keep the right tube, with and without test-time augmentation, and
does it say so when it may not have?

Takes the models ``bench_generalisation.py`` trained (its ``--work``, variant ``plan``; scenario
``full`` or a left-out contrast, ``--scenario``) and predicts that benchmark's test images with TTA
(the default) and without (``predict --no-tta``), each as planned (the cord component of the
localise plan) and in one pass without it (the raw network output). Per case with a reference
(``full``: ``t2s_uncropped`` against its carried-over cord, the shifted and whole-neck phantoms;
``loco-<contrast>``: the left-out real cases): raw Dice, the cord component's Dice and recall,
whether the kept tube is the cord (at least a quarter of its voxels on the reference: a wrong tube
has none), and the "uncertain cord" reasons of ``<case>.json``. ``--checkout`` runs another
checkout's ``predict`` on the same models (a snapshot of the code before a change), into folders
named by ``--tag``.

    .venv/bin/python bench/bench_generalisation.py --samples 3000 --scenarios full --tools spineauto --variants plan \\
        --seeds 0 --work /tmp/bench_generalisation
    .venv/bin/python bench/bench_cord_choice.py --work /tmp/bench_generalisation --seeds 0
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generalisation import GROUPS, build_tests, dice, localising, one_pass_model  # noqa: E402
from common import REPO, VENV_BIN, bench_env, check_run, command_line, format_table, run_measured  # noqa: E402

RIGHT_PRECISION = 0.25  # the kept tube is the cord when at least this share of it lies on the reference
SCORED = ("dice", "neck", "uncropped")  # bench_generalisation's kinds of test case with a reference


def predict(run_dir: Path, images: Path, out: Path, tta: bool, checkout: Path, model: Path | None, reuse: bool) -> None:
    if reuse and out.is_dir() and any(out.glob("*.nii.gz")):
        return
    shutil.rmtree(out, ignore_errors=True)
    env = bench_env(run_dir, "cpu", 1, 1)
    env["PYTHONPATH"] = str(checkout) + os.pathsep + os.environ.get("PYTHONPATH", "")
    dataset_id = int(next((run_dir / "sa_results").glob("Dataset*")).name[len("Dataset"):].split("_")[0])
    cmd = [str(VENV_BIN / "python"), "-m", "spineauto", "predict", "-d", str(dataset_id), "-c", "2d", "-f", "all",
           "-i", str(images), "-o", str(out), "--device", "cpu"] + ([] if tta else ["--no-tta"]) + (["-m", str(model)] if model else [])
    check_run(run_measured(cmd, env, cwd=checkout), f"predict into {out}")


def score(out: Path, raw: Path, tests: dict) -> list[dict]:
    rows = []
    for case, info in tests.items():
        ref = info["ref"]
        kept = np.asanyarray(nib.load(str(out / f"{case}.nii.gz")).dataobj) > 0
        whole = np.asanyarray(nib.load(str(raw / f"{case}.nii.gz")).dataobj) > 0
        record = out / f"{case}.json"
        qc = json.loads(record.read_text()).get("qc", []) if record.is_file() else []
        hit = int((kept & ref).sum())
        rows.append({"case": case, "raw_dice": dice(whole, ref), "cord_dice": dice(kept, ref), "recall": hit / max(1, int(ref.sum())),
                     "right": bool(kept.any() and hit >= RIGHT_PRECISION * kept.sum()), "qc": qc})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="bench_generalisation.py's --work (variant plan)")
    ap.add_argument("--scenario", default="full", choices=["full"] + [f"loco-{g}" for g in GROUPS],
                    help="which of its scenarios (loco-<contrast>: the left-out real cases)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--phantoms", type=int, default=2, help="as bench_generalisation.py's --phantoms")
    ap.add_argument("--checkout", type=Path, default=REPO, help="the checkout whose predict runs (default: this one)")
    ap.add_argument("--tag", default="", help="name the prediction folders (e.g. before / after)")
    ap.add_argument("--reuse", action="store_true", help="keep predictions already there")
    ap.add_argument("--json", type=Path, help="also write every row here")
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        work = args.work / f"{args.scenario}_seed{seed}"
        run_dir = work / f"spineauto_plan_seed{seed}"
        if not (run_dir / "trained.json").is_file():
            raise SystemExit(f"{run_dir}: no trained model; run bench_generalisation.py --scenarios {args.scenario} --variants plan first")
        if not localising(run_dir):
            raise SystemExit(f"{run_dir}: the plan has no localise plan (no cord component to check)")
        held_out = () if args.scenario == "full" else GROUPS[args.scenario.split("-", 1)[1]]
        everything, tests = build_tests(work, held_out, args.phantoms, seed)
        tests = {c: t for c, t in tests.items() if t["kind"] in SCORED}
        images = work / "choice_images"  # the scored cases only (not DWI / fMRI, which have no masks)
        shutil.rmtree(images, ignore_errors=True)
        images.mkdir()
        for case in tests:
            (images / f"{case}_0000.nii.gz").symlink_to(everything / f"{case}_0000.nii.gz")
        for tta in (True, False):
            mode = "tta" if tta else "no-tta"
            raw = run_dir / f"choice_raw_{mode}"
            predict(run_dir, images, raw, tta, REPO, one_pass_model(run_dir), args.reuse)
            out = run_dir / f"choice_{args.tag or 'current'}_{mode}"
            predict(run_dir, images, out, tta, args.checkout.resolve(), None, args.reuse)
            rows += [{**r, "seed": seed, "tta": mode, "tag": args.tag} for r in score(out, raw, tests)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"\n{command_line()}\n")
    body = [[args.scenario, r["seed"], r["tta"], r["case"], f"{r['raw_dice']:.2f}", f"{r['cord_dice']:.2f}", f"{r['recall']:.2f}",
             "yes" if r["right"] else "NO", "; ".join(q.removeprefix("uncertain cord: ") for q in r["qc"]) or "-"] for r in rows]
    print(format_table(["scenario", "seed", "TTA", "case", "raw Dice", "cord Dice", "cord recall", "right tube", "uncertain cord"], body))
    wrong = [r for r in rows if not r["right"]]
    print(f"\nright tube {len(rows) - len(wrong)}/{len(rows)}; wrong and not flagged: {sum(not r['qc'] for r in wrong)}; "
          f"flagged: {sum(bool(r['qc']) for r in rows)}")


if __name__ == "__main__":
    main()
