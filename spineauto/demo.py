"""`spineauto demo`: the whole main job on synthetic spine phantoms, with no data of your own.

Writes a phantom dataset, then runs the same commands a user would: plan_and_preprocess, a short
training of fold 0, predict on the held-out phantoms, evaluate against their masks; then the
lesion stage: ``2d_cord_roi`` trained on crops around the cord and predicted around the cord the
first model found (``predict --roi``), evaluated the same way.
``--pipeline``: the whole product instead: phantoms of spines (with lesions) and of non-spine
inputs (the anatomy class ``other``: limbs, brain-like heads, noise), small models for every stage
(anatomy, location/view and sequence heads, cord, lesions), a pipeline YAML, and ``spineauto
pipeline`` on the held-out phantoms with its HTML report; then what that budget found against the
phantoms' truth (anatomy, location, lesions), said plainly.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.markup import escape

log = logging.getLogger(__name__)
DATASET_ID = 900
DATASET = f"Dataset{DATASET_ID:03d}_DemoPhantoms"
DEMO_PRESET = Path(__file__).resolve().parents[1] / "plans" / "demo_cpu.yaml"
PIPELINE_DATASET_ID = 901
PIPELINE_DATASET = f"Dataset{PIPELINE_DATASET_ID:03d}_DemoPipeline"
PIPELINE_PRESET = Path(__file__).resolve().parents[1] / "plans" / "demo_pipeline_cpu.yaml"


def run_demo(run: Callable[..., None], workdir: Path, n_train: int = 16, n_test: int = 6, seed: int = 0, epochs: int = 10,
             iters_per_epoch: int = 25, lesion_iters: int = 300, console: Console | None = None) -> Path:
    """``run(*args)`` runs one ``spineauto`` command (the CLI passes its own app: the demo runs
    exactly what a user would type). With ``lesion_iters``, the lesion stage of the cord -> lesion
    cascade (``2d_cord_roi``) trains that many iterations and predicts in boxes around the cord
    the ``2d`` model found."""
    from spineauto.datasets.phantoms import write_phantom_dataset

    console = console or Console(stderr=True)
    workdir = _demo_env(workdir)
    raw = workdir / "raw" / DATASET
    if not (raw / "dataset.json").is_file():
        console.print(f"writing {n_train} + {n_test} synthetic spine phantoms to {escape(str(raw))}")
        write_phantom_dataset(raw, n_train=n_train, n_test=n_test, seed=seed)
    run("plan_and_preprocess", "-d", str(DATASET_ID), "--preset", str(DEMO_PRESET))
    run("train", "-d", str(DATASET_ID), "-f", "0", "-c", "2d", "--epochs", str(epochs),
        "--iters-per-epoch", str(iters_per_epoch), "--wandb", "disabled", "--seed", str(seed), "--overwrite")
    predictions = workdir / "predictions"
    run("predict", "-d", str(DATASET_ID), "-i", str(raw / "imagesTs"), "-o", str(predictions), "-f", "0")
    run("evaluate", str(predictions), str(raw / "labelsTs"), "-d", str(DATASET_ID),
        "-o", str(workdir / "evaluation" / "summary.json"))
    if lesion_iters:  # lesions are a few voxels of a whole slice: the cascade's second stage finds them in crops around the cord
        lesions = workdir / "lesion_predictions"
        run("train", "-d", str(DATASET_ID), "-f", "0", "-c", "2d_cord_roi", "--epochs", str(epochs),
            "--iters-per-epoch", str(max(1, lesion_iters // epochs)), "--wandb", "disabled", "--seed", str(seed), "--overwrite")
        run("predict", "-d", str(DATASET_ID), "-c", "2d_cord_roi", "-i", str(raw / "imagesTs"), "-o", str(lesions), "-f", "0",
            "--roi", str(predictions))
        run("evaluate", str(lesions), str(raw / "labelsTs"), "-d", str(DATASET_ID),
            "-o", str(workdir / "evaluation" / "summary_lesions.json"))
        console.print(f"cord: {escape(str(predictions))} (the 2d model on whole slices); lesions: {escape(str(lesions))} (2d_cord_roi in boxes around that cord)")
    console.print(f"[green]demo finished[/]: predictions in {escape(str(predictions))}, metrics in {escape(str(workdir / 'evaluation'))}")
    return workdir


def _demo_env(workdir: Path) -> Path:
    from spineauto.io.outputs import check_output_apart

    check_output_apart([], workdir, what="the demo's folder", hint="choose another --workdir", contain=False)
    workdir = workdir.resolve()
    for kind in ("raw", "preprocessed", "results"):
        os.environ[f"SPINEAUTO_{kind.upper()}"] = str(workdir / kind)
    os.environ.setdefault("WANDB_MODE", "disabled")
    return workdir


def run_pipeline_demo(run: Callable[..., None], workdir: Path, n_train: int = 24, n_test: int = 6, seed: int = 0,
                      iterations: dict[str, int] | None = None, console: Console | None = None) -> Path:
    """Train a small model per stage on phantoms, write the pipeline YAML, run it; returns the report path."""
    import yaml

    from spineauto import paths
    from spineauto.datasets.phantoms import write_phantom_dataset

    console = console or Console(stderr=True)
    workdir = _demo_env(workdir)
    iterations = {"cls": 300, "2d": 1000, **(iterations or {})}  # constant-rate Adam (the preset): a few hundred learn the phantoms
    raw = workdir / "raw" / PIPELINE_DATASET
    if not (raw / "dataset.json").is_file():
        console.print(f"writing {n_train} + {n_test} synthetic phantoms (spines with lesions; limbs, brain-like heads and noise "
                      f"as the anatomy class 'other') to {escape(str(raw))}")
        write_phantom_dataset(raw, n_train=n_train, n_test=n_test, seed=seed, anatomies=("spine", "other"))
    ds = str(PIPELINE_DATASET_ID)
    run("plan_and_preprocess", "-d", ds, "--preset", str(PIPELINE_PRESET))
    from spineauto.planning.plans import Plans

    if "2d_cord_roi" in Plans.load(paths.preprocessed_dataset(PIPELINE_DATASET) / "plans.json").configurations:
        iterations.setdefault("2d_cord_roi", 600)  # lesions in crops around the cord
    for configuration, iters in iterations.items():
        run("train", "-d", ds, "-f", "0", "-c", configuration, "--epochs", "5", "--iters-per-epoch", str(iters // 5),
            "--wandb", "disabled", "--seed", str(seed), "--no-validate", "--overwrite")
    folder = {c: str(paths.model_folder(PIPELINE_DATASET, c)) for c in iterations}
    lesion = folder.get("2d_cord_roi", folder["2d"])
    config = {
        "description": "spineauto demo: phantoms of spines, and of other inputs (limbs, brain-like heads, noise)",
        "anatomy": {"model": {"folder": folder["cls"]}, "gate": {"head": "anatomy", "classes": ["spine"], "min_probability": 0.5}},
        "location_view": {"model": {"folder": folder["cls"]}},
        "sequence": {"model": {"folder": folder["cls"]}},
        "cord": {"model": {"folder": folder["2d"]}},
        "lesion": {"model": {"folder": lesion}},
    }
    config_path = workdir / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = workdir / "pipeline_out"
    try:
        run("pipeline", "-i", str(raw / "imagesTs"), "-o", str(out), "--config", str(config_path))
    finally:
        for line in pipeline_verdict(raw, out, iterations):
            console.print(line)
    console.print(f"[green]pipeline demo finished[/]: open {escape(str(out / 'report.html'))} (pipeline definition {escape(str(config_path))})")
    return out / "report.html"


def pipeline_verdict(raw: Path, out: Path, iterations: dict[str, int]) -> list[str]:
    """What the demo's pipeline found against the phantoms' truth, and what its training budget cannot do."""
    import json

    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    truth = json.loads((raw / "dataset.json").read_text()).get("cases", {})
    anatomy = location = spines = lesions = found = 0
    checked = []
    for case, info in sorted(truth.items()):
        record_path = out / case / f"{case}.json"
        label_path = raw / "labelsTs" / f"{case}.nii.gz"
        if not label_path.is_file() or not record_path.is_file():
            continue
        record, classes = json.loads(record_path.read_text()), info.get("classes", {})
        heads = {h: v.get("class") for s in record.get("stages", []) for h, v in (s.get("heads") or {}).items()}
        anatomy += heads.get("anatomy") == classes.get("anatomy")
        checked.append(record.get("status"))
        if classes.get("anatomy", "spine") != "spine":
            continue
        spines += 1
        location += heads.get("location") == classes.get("location")
        components, n = ndimage.label(np.asarray(nib.load(str(label_path)).dataobj) == 2, np.ones((3, 3, 3)))
        lesions += n
        mask = out / case / f"{case}_lesion.nii.gz"
        if n and mask.is_file():
            hit = np.asarray(nib.load(str(mask)).dataobj) > 0
            found += len(set(np.unique(components[hit]).tolist()) - {0})
    budget = ", ".join(f"{c} {n} iterations" for c, n in iterations.items())
    lines = [f"against the phantoms' truth ({len(checked)} held-out cases; budget {budget} on this machine): "
             f"anatomy {anatomy}/{len(checked)} right, location {location}/{spines} spines right, lesions found {found}/{lesions}; "
             f"status: {', '.join(f'{checked.count(s)} {s}' for s in dict.fromkeys(checked))}"]
    if lesions and found < lesions or location < spines:
        lines.append("[yellow]this budget is too small to learn what it missed above[/] (lesions are a few voxels; location "
                     "needs many cases): the demo shows the pipeline's workings and its report, not a trained product. "
                     "Train on real data, or longer (README, \"The pipeline\").")
    return lines
