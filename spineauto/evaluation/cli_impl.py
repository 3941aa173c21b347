"""The evaluate and find_best_configuration commands' glue: labels, progress, tables."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table

from spineauto.errors import SpineautoError


def dataset_labels(dataset: str):
    """Labels of a dataset from the first dataset.json found in raw, preprocessed or a model folder."""
    from spineauto import paths
    from spineauto.evaluation.evaluate import labels_from_dataset_json
    from spineauto.io.atomic import read_json

    name = paths.resolve_dataset(dataset)
    candidates = [paths.root("raw") / name / "dataset.json", paths.root("preprocessed") / name / "dataset.json",
                  *sorted((paths.root("results") / name).glob("*/dataset.json"))]
    for c in candidates:
        if c.is_file():
            return labels_from_dataset_json(read_json(c))
    raise SpineautoError(f"dataset {name}: no dataset.json in {', '.join(str(c.parent) for c in candidates[:2])} or its model folders")


def _fmt(v) -> str:
    return "-" if v is None or v != v else f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"


def run_evaluate(console: Console, pred_dir: Path, gt_dir: Path, dataset: str | None, output: Path | None) -> None:
    from spineauto.cli_views import make_progress
    from spineauto.evaluation.evaluate import LESION_METRICS, VOXEL_METRICS, evaluate_folders, write_summary
    from spineauto.inference.cli_impl import _progress_callback

    if Path(gt_dir).is_file():  # a labels file (dataset.json cases, or CSV case,head,class): classification
        from spineauto.evaluation.classification import evaluate_prediction_folder, print_report

        out_dir = Path(output).parent if output else Path(pred_dir)
        print_report(console, evaluate_prediction_folder(pred_dir, gt_dir, out_dir=out_dir), out_dir / "summary_classification.json")
        return
    labels = dataset_labels(dataset) if dataset else None
    with make_progress(console) as progress:
        summary = evaluate_folders(pred_dir, gt_dir, labels, progress=_progress_callback(progress, "evaluate"))
    json_path, csv_path = write_summary(summary, output or Path(pred_dir) / "summary.json")
    table = Table(title=f"{len(summary['metric_per_case'])} case(s): mean per label", title_justify="left")
    cols = [*VOXEL_METRICS, *LESION_METRICS] if summary["lesion_labels"] else list(VOXEL_METRICS)
    short = {"lesion_precision": "lesion P", "lesion_recall": "lesion R", "lesion_f1": "lesion F1", "hd95": "HD95 mm", "asd": "ASD mm"}
    for c in ("label", *cols):
        table.add_column(short.get(c, c), justify="right" if c != "label" else "left", no_wrap=True)
    for name, row in summary["mean"].items():
        table.add_row(name, *(_fmt(row.get(c)) for c in cols))
    Console(width=max(120, Console().width)).print(table)
    console.print(f"[green]wrote[/] {json_path} and {csv_path}")


def run_find_best(console: Console, dataset: str, configurations: Sequence[str] | None, ensembles: bool) -> None:
    from spineauto.evaluation.best_configuration import find_best_configuration

    result = find_best_configuration(dataset, configurations, ensembles)
    table = Table(title=f"{result.dataset}: cross-validation, mean foreground Dice", title_justify="left")
    for c in ("candidate", "cases", "Dice", "Dice + postprocessing", "largest component for labels"):
        table.add_column(c)
    for c in result.candidates:
        mark = " *" if c is result.best else ""
        table.add_row(c.name + mark, str(c.cases), _fmt(c.dice), _fmt(c.dice_postprocessed),
                      ", ".join(map(str, c.postprocessing.get("largest_component_labels", []))) or "none")
    out = Console()
    out.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    out.print("predict with:")
    for cmd in result.commands:
        out.print(f"  {cmd}", highlight=False, soft_wrap=True)
