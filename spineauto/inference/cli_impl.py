"""The predict and ensemble commands' glue: resolve the model, show progress, print a summary."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from rich.console import Console

from spineauto.errors import SpineautoError


def _progress_callback(progress, label: str):
    task = {}

    def step(case: str, done: int, total: int) -> None:
        if "id" not in task:
            task["id"] = progress.add_task(label, total=total)
        progress.update(task["id"], completed=done, description=f"{label} {case}".rstrip())
    return step


def run_predict(console: Console, dataset: str, source: Path, output: Path, configuration: str, folds: Sequence[str] | None,
                checkpoint: str, tta: bool, save_probabilities: bool, device: str, model_folder: Path | None = None) -> None:
    from spineauto import paths
    from spineauto.cli_views import make_progress
    from spineauto.inference.model import load_model, resolve_device
    from spineauto.inference.predict import predict_folder

    import torch

    torch.backends.cudnn.benchmark = True  # every forward pass has the same tile shape
    folder = Path(model_folder) if model_folder else paths.model_folder(dataset, configuration)
    model = load_model(folder, folds, checkpoint, resolve_device(device), configuration=configuration)
    if model.plan.has_classification:  # cls and multitask: <case>.json + classification.csv (+ masks)
        from spineauto.inference.classify import predict_classification

        with make_progress(console) as progress:
            results = predict_classification(model, source, output, tta=tta, save_probabilities=save_probabilities,
                                             progress=_progress_callback(progress, "predict"))
        console.print(f"[green]wrote[/] {len(results)} case(s) to {Path(output) / 'classification.csv'} and <case>.json"
                      f"{' with masks' if model.plan.has_segmentation else ''} ({', '.join(model.folds)}, {model.device})")
        return
    with make_progress(console) as progress:
        result = predict_folder(model, source, output, tta=tta, save_probabilities=save_probabilities,
                                progress=_progress_callback(progress, "predict"))
    secs = list(result.seconds.values())
    console.print(f"[green]wrote[/] {len(result.written)} mask(s) to {output} with {', '.join(model.folds)} "
                  f"({'TTA' if tta else 'no TTA'}, {model.device}, {sum(secs) / max(1, len(secs)):.2f} s/case)")


def run_ensemble(console: Console, inputs: Sequence[Path], output: Path, save_probabilities: bool, postprocessing: Path | None) -> None:
    from spineauto.cli_views import make_progress
    from spineauto.inference.ensemble import ensemble_folders
    from spineauto.io.atomic import read_json

    pp = None
    if postprocessing is not None:
        if not Path(postprocessing).is_file():
            raise SpineautoError(f"{postprocessing}: postprocessing file not found")
        pp = read_json(postprocessing)
    with make_progress(console) as progress:
        written = ensemble_folders(inputs, output, save_probabilities, pp, progress=_progress_callback(progress, "ensemble"))
    console.print(f"[green]wrote[/] {len(written)} ensembled mask(s) to {output}")
