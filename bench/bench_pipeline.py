"""`spineauto pipeline` against the same stages run as separate `spineauto predict` calls.

Phantoms of spines (with lesions) and limbs; small models trained briefly (the segmentation models'
quality is not what is measured; the classifier is trained long enough for its anatomy gate to work): `cls` (anatomy, sequence, view, location heads), `2d` (cord) and, when the
plans have it, `2d_cord_roi` (lesions around the predicted cord; else `2d` again). The same
stages are then run on the held-out phantoms
- as one `spineauto pipeline` call (every model loaded once, each case read once, the shared
  preprocessing done once, measurements and the report included), once with an anatomy gate that
  lets every case through and once with the gate a user would set (spine only: the limbs stop after
  the classification), and
- as the separate calls a user would otherwise make: `predict -c cls`, `predict -c 2d`,
  `predict -c 2d_cord_roi --roi <cord masks>` (no measurements, no report).
Wall time per volume (process start included: it is what a user pays) and the peak RSS of the
process tree, median of --repeats runs.

    python bench/bench_pipeline.py            # 12 held-out volumes, 3 repeats
    python bench/bench_pipeline.py --quick    # 4 held-out volumes, 1 repeat
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import VENV_BIN, bench_env, check_run, command_line, format_table, run_measured  # noqa: E402

DATASET_ID = 903
DATASET = f"Dataset{DATASET_ID:03d}_BenchPipeline"
PRESET = Path(__file__).resolve().parents[1] / "plans" / "demo_pipeline_cpu.yaml"


def spineauto(*args: str) -> list[str]:
    return [str(VENV_BIN / "python"), "-m", "spineauto", *args]


def prepare(work: Path, n_test: int, iters: int, cls_iters: int, env: dict) -> tuple[Path, dict[str, Path]]:
    from spineauto.datasets.phantoms import write_phantom_dataset

    raw = work / "raw" / DATASET
    write_phantom_dataset(raw, n_train=12, n_test=n_test, seed=5, anatomies=("spine", "limb"))
    check_run(run_measured(spineauto("plan_and_preprocess", "-d", str(DATASET_ID), "--preset", str(PRESET), "-np", "2"), env=env),
              "plan_and_preprocess")
    plans = json.loads((work / "sa_preprocessed" / DATASET / "plans.json").read_text())
    lesion = "2d_cord_roi" if "2d_cord_roi" in plans["configurations"] else "2d"
    folders = {}
    for configuration in dict.fromkeys(("cls", "2d", lesion)):
        check_run(run_measured(spineauto("train", "-d", str(DATASET_ID), "-f", "0", "-c", configuration, "--epochs", "1",
                                         "--iters-per-epoch", str(cls_iters if configuration == "cls" else iters),
                                         "--val-iters", "1", "--no-validate",
                                         "--wandb", "disabled", "--device", "cpu"), env=env), f"train {configuration}")
        folders[configuration] = work / "sa_results" / DATASET / f"spineautoTrainer__spineautoPlans__{configuration}"
    folders["lesion"] = folders[lesion]
    return raw / "imagesTs", folders


def pipeline_yaml(work: Path, folders: dict[str, Path], gate: list[str], name: str) -> Path:
    cls = {"model": {"folder": str(folders["cls"])}}
    config = {"anatomy": {**cls, "gate": {"head": "anatomy", "classes": gate}},
              "location_view": cls, "sequence": cls, "cord": {"model": {"folder": str(folders["2d"])}},
              "lesion": {"model": {"folder": str(folders["lesion"])}}}
    path = work / name
    path.write_text(yaml.safe_dump(config))
    return path


def separate_calls(images: Path, out: Path, folders: dict[str, Path]) -> list[list[str]]:
    calls = [spineauto("predict", "-d", str(DATASET_ID), "-m", str(folders["cls"]), "-c", "cls", "-i", str(images),
                       "-o", str(out / "cls"), "--device", "cpu"),
             spineauto("predict", "-d", str(DATASET_ID), "-m", str(folders["2d"]), "-c", "2d", "-i", str(images),
                       "-o", str(out / "cord"), "--device", "cpu")]
    lesion = ["-c", folders["lesion"].name.split("__")[-1]]
    roi = ["--roi", str(out / "cord")] if lesion[1] == "2d_cord_roi" else []
    calls.append(spineauto("predict", "-d", str(DATASET_ID), "-m", str(folders["lesion"]), *lesion, "-i", str(images),
                           "-o", str(out / "lesion"), "--device", "cpu", *roi))
    return calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=12, help="held-out volumes")
    ap.add_argument("--iters", type=int, default=10, help="training iterations of the segmentation models (speed only is measured)")
    ap.add_argument("--cls-iters", type=int, default=300, help="training iterations of the classifier (enough for the anatomy gate to work)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="4 volumes, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.cases, args.repeats = 4, 1
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        work = Path(tmp)
        env = bench_env(work, "cpu", 1, args.iters)
        images, folders = prepare(work, args.cases, args.iters, args.cls_iters, env)
        configs = {"spineauto pipeline (every case through every stage)": pipeline_yaml(work, folders, ["spine", "limb"], "all.yaml"),
                   "spineauto pipeline (anatomy gate: spine only)": pipeline_yaml(work, folders, ["spine"], "gated.yaml")}
        n = len(list(images.glob("*.nii.gz")))
        rows = {**{name: [] for name in configs}, "separate spineauto predict calls": []}
        stopped: dict[str, int] = {}
        for r in range(args.repeats):
            for i, (name, config) in enumerate(configs.items()):
                run = run_measured(spineauto("pipeline", "-i", str(images), "-o", str(work / f"pipe{r}_{i}"), "--config",
                                             str(config), "--device", "cpu"), env=env)
                check_run(run, "spineauto pipeline")
                rows[name].append((run.wall_s, run.peak_rss_mb))
                csv_rows = (work / f"pipe{r}_{i}" / "pipeline.csv").read_text().splitlines()[1:]
                stopped[name] = sum(row.split(",")[1] == "stopped" for row in csv_rows)
            runs = [run_measured(cmd, env=env) for cmd in separate_calls(images, work / f"sep{r}", folders)]
            for run in runs:
                check_run(run, " ".join(run.cmd[3:5]))
            rows["separate spineauto predict calls"].append((sum(x.wall_s for x in runs), max(x.peak_rss_mb for x in runs)))
    table = [[name, f"{statistics.median(w for w, _ in v) / n:.2f}", f"{max(m for _, m in v):.0f}", stopped.get(name, "-")]
             for name, v in rows.items()]
    base = statistics.median(w for w, _ in rows["separate spineauto predict calls"])
    ratios = ", ".join(f"{statistics.median(w for w, _ in rows[name]) / base:.2f}" for name in configs)
    print(format_table(["run", "s/volume", "peak RSS MB", "cases stopped by the gate"], table))
    print(f"\npipeline / separate calls time: {ratios} (without / with the gate; {n} volumes of spines and limbs, {args.repeats} repeat(s), CPU; lesion model "
          f"{folders['lesion'].name.split('__')[-1]}; the pipeline also measures and writes overlays and the report)")
    print(f"command: {command_line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
