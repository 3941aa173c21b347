"""Rich views for the CLI: progress bars and readable tables."""
from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
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


def plan_summary(console: Console, result) -> None:
    fp = result.fingerprint
    cases = Table(title=f"{fp.dataset_name}: {len(fp.cases)} training cases", title_justify="left")
    for col in ("case", "subject", "orientation", "plane", "spacing (mm)", "shape", "classes"):
        cases.add_column(col)
    for c in fp.cases:
        cases.add_row(c.case, c.subject, c.orientation, c.plane, "x".join(f"{s:.3g}" for s in c.spacing),
                      "x".join(map(str, c.shape)), ", ".join(f"{k}={v}" for k, v in c.classes.items()))
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
    console.print(f"plans: {result.folder / 'plans.json'}  ({result.written} case(s) preprocessed, others up to date)")
