"""`spineauto demo`: the whole main job on synthetic spine phantoms, with no data of your own.

Writes a phantom dataset, then runs the same commands a user would: plan_and_preprocess, a short
training of fold 0, predict on the held-out phantoms, evaluate against their masks.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from rich.console import Console

log = logging.getLogger(__name__)
DATASET_ID = 900
DATASET = f"Dataset{DATASET_ID:03d}_DemoPhantoms"
DEMO_PRESET = Path(__file__).resolve().parents[1] / "plans" / "demo_cpu.yaml"


def run_demo(run: Callable[..., None], workdir: Path, n_train: int = 16, n_test: int = 6, seed: int = 0, epochs: int = 10,
             iters_per_epoch: int = 25, console: Console | None = None) -> Path:
    """``run(*args)`` runs one ``spineauto`` command (the CLI passes its own app: the demo runs
    exactly what a user would type)."""
    from spineauto.datasets.phantoms import write_phantom_dataset

    console = console or Console(stderr=True)
    workdir = workdir.resolve()
    for kind in ("raw", "preprocessed", "results"):
        os.environ[f"SPINEAUTO_{kind.upper()}"] = str(workdir / kind)
    os.environ.setdefault("WANDB_MODE", "disabled")
    raw = workdir / "raw" / DATASET
    if not (raw / "dataset.json").is_file():
        console.print(f"writing {n_train} + {n_test} synthetic spine phantoms to {raw}")
        write_phantom_dataset(raw, n_train=n_train, n_test=n_test, seed=seed)
    run("plan_and_preprocess", "-d", str(DATASET_ID), "--preset", str(DEMO_PRESET))
    run("train", "-d", str(DATASET_ID), "-f", "0", "-c", "2d", "--epochs", str(epochs),
        "--iters-per-epoch", str(iters_per_epoch), "--wandb", "disabled", "--seed", str(seed))
    predictions = workdir / "predictions"
    run("predict", "-d", str(DATASET_ID), "-i", str(raw / "imagesTs"), "-o", str(predictions), "-f", "0")
    run("evaluate", str(predictions), str(raw / "labelsTs"), "-d", str(DATASET_ID),
        "-o", str(workdir / "evaluation" / "summary.json"))
    console.print(f"[green]demo finished[/]: predictions in {predictions}, metrics in {workdir / 'evaluation'}")
    return workdir
