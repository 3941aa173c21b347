"""Rich views for the CLI: progress bars, readable tables and result summaries (no logic of their own)."""
from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def make_progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False)


@contextmanager
def stage_progress(console: Console):
    """Yield ``progress(stage, item)``: one bar per stage, advanced once per item."""
    bars = {}
    with make_progress(console) as progress:
        def step(stage: str, item: str) -> None:
            if stage not in bars:
                bars[stage] = progress.add_task(stage, total=None)
            progress.advance(bars[stage])
        yield step


def case_progress(progress: Progress, label: str):
    """A ``progress(case, done, total)`` callback drawing one bar on ``progress``."""
    task = {}

    def step(case: str, done: int, total: int) -> None:
        if "id" not in task:
            task["id"] = progress.add_task(label, total=total)
        progress.update(task["id"], completed=done, description=f"{label} {case}".rstrip())
    return step


class TrainingBar:
    """The trainer's progress reporter: one bar over every remaining iteration, with ETA."""

    def __init__(self, console: Console):
        self.console, self.bar, self.task = console, None, None

    def start(self, total: int) -> None:
        self.bar = make_progress(self.console)
        self.bar.__enter__()
        self.task = self.bar.add_task("training", total=total)

    def advance(self, description: str) -> None:
        self.bar.update(self.task, advance=1, description=description)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _fmt(v) -> str:
    return "-" if v is None or v != v else f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"


def predict_summary(console: Console, model, result, output, tta: bool) -> None:
    secs = list(result.seconds.values())
    what = []
    if model.plan.has_segmentation:
        what.append(f"{len(result.written)} mask(s)")
    if model.plan.has_classification:
        what.append(f"{len(result.classifications)} classification(s) (<case>.json, classification.csv)")
    console.print(f"[green]wrote[/] {escape(str(' and '.join(what)))} to {escape(str(output))} with {escape(str(', '.join(model.folds)))} "
                  f"({'TTA' if tta else 'no TTA'}, {model.device}, {sum(secs) / max(1, len(secs)):.2f} s/case)")


def evaluation_table(summary: dict) -> Table:
    from spineauto.evaluation.evaluate import LESION_METRICS, VOXEL_METRICS

    table = Table(title=f"{len(summary['metric_per_case'])} case(s): mean per label", title_justify="left")
    cols = [*VOXEL_METRICS, *LESION_METRICS] if summary["lesion_labels"] else list(VOXEL_METRICS)
    short = {"lesion_precision": "lesion P", "lesion_recall": "lesion R", "lesion_f1": "lesion F1", "hd95": "HD95 mm", "asd": "ASD mm"}
    for c in ("label", *cols):
        table.add_column(short.get(c, c), justify="right" if c != "label" else "left", no_wrap=True)
    for name, row in summary["mean"].items():
        table.add_row(escape(str(name)), *(_fmt(row.get(c)) for c in cols))
    return table


def best_configuration_table(result) -> Table:
    table = Table(title=f"{escape(str(result.dataset))}: cross-validation", title_justify="left")
    for c in ("candidate", "cases", "score", "score + postprocessing", "largest component for labels"):
        table.add_column(c)
    for c in result.candidates:
        mark = " *" if c is result.best else ""
        table.add_row(c.name + mark, str(c.cases), f"{_fmt(c.dice)} {c.metric}", _fmt(c.dice_postprocessed),
                      ", ".join(map(str, c.postprocessing.get("largest_component_labels", []))) or "none")
    return table


def plan_summary(console: Console, result) -> None:
    fp = result.fingerprint
    cases = Table(title=f"{escape(fp.dataset_name)}: {len(fp.cases)} training cases", title_justify="left")
    for col in ("case", "subject", "orientation", "plane", "spacing (mm)", "shape", "classes"):
        cases.add_column(col)
    for c in fp.cases:
        cases.add_row(escape(c.case), escape(str(c.subject)), c.orientation, c.plane, "x".join(f"{s:.3g}" for s in c.spacing),
                      "x".join(map(str, c.shape)), escape(", ".join(f"{k}={v}" for k, v in c.classes.items())))
    console.print(cases)
    for cfg in result.plans.configurations.values():
        t = Table(title=f"configuration {cfg.name} ({cfg.task})", title_justify="left")
        t.add_column("value")
        t.add_column("planned")
        t.add_column("because", overflow="fold")
        net = cfg.network
        rows = [
            ("slicing", cfg.slicing, "slicing"),
            ("target_spacing", "x".join(f"{s:.3g}" for s in cfg.target_spacing) + " mm", "target_spacing"),
            ("patch_size", "x".join(map(str, cfg.patch_size)), "patch_size"),
            ("batch_size", str(cfg.batch_size), "batch_size"),
            ("network", f"{net.architecture}, {net.n_stages} stages, {net.features_per_stage[0]}-{net.features_per_stage[-1]} features", "network"),
            ("normalization", ", ".join(cfg.normalization), "normalization"),
        ]
        if cfg.heads:
            rows.append(("heads", "; ".join(f"{h.name}: {len(h.classes)} classes" for h in cfg.heads), "heads"))
        for label, value, key in rows:
            t.add_row(label, value, cfg.reasons.get(key, ""))
        console.print(t)
    console.print(f"plans: {escape(str(result.folder / 'plans.json'))}  ({result.written} case(s) preprocessed, others up to date)")


def pairs_summary(console: Console, report) -> None:
    """What ``convert pairs`` matched: the pairs, the images without a mask (test cases), the labels."""
    table = Table(title=f"{len(report.pairs)} image/mask pair(s)")
    for col in ("case", "image", "mask"):
        table.add_column(col)
    for case, (image, mask) in report.pairs.items():
        table.add_row(*(escape(str(v)) for v in (case, image.name, mask.name)))
    console.print(table)
    if report.images_without_mask:
        console.print(f"[yellow]{len(report.images_without_mask)} image(s) without a mask[/] (imagesTs): "
                      + escape(", ".join(p.name for p in report.images_without_mask)))
    console.print("labels: " + ", ".join(f"{escape(str(k))}={escape(str(v))}" for k, v in report.labels.items()))
    console.print(f"[green]wrote[/] {escape(str(report.dataset))}")


def dicom_summary(console: Console, result) -> None:
    """What ``convert dicom`` made of each series: split, mask, classes and the rule that gave each."""
    table = Table(title=f"{len(result.rows)} DICOM series")
    for col in ("case", "folder", "split", "mask", "classes (why)"):
        table.add_column(col)
    for r in result.rows:
        classes = "; ".join(f"{h}={c} ({r.reasons[h]})" for h, c in r.classes.items())
        table.add_row(escape(r.case), escape(str(r.source)), f"images{r.split}" + (f" ({escape(r.why_test)})" if r.why_test else ""),
                      escape(str(r.mask or "-")), escape(classes or "-"))
    console.print(table)
    unmatched = [r for r in result.rows if r.unmatched]
    if unmatched:
        console.print(f"[yellow]{len(unmatched)} series matched no rule[/] for some head (imagesTs): "
                      + ", ".join(f"{escape(str(r.case))} ({escape(str(', '.join(r.unmatched)))})" for r in unmatched))
    if result.labels:
        console.print("labels: " + ", ".join(f"{escape(str(k))}={escape(str(v))}" for k, v in result.labels.items()))
    console.print(f"[green]wrote[/] {escape(str(result.dataset))}")
