"""`plan_and_preprocess`: integrity check + fingerprint, plans, preprocessing, in that order.

The orchestrator above planning and preprocessing (neither imports the other): the plans are written
first and carry everything preprocessing reads (including the per-channel intensity statistics).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from spineauto import paths
from spineauto.datasets.dataset_json import load_dataset_json
from spineauto.planning.fingerprint import Fingerprint, fingerprint_dataset
from spineauto.planning.planner import plan_dataset
from spineauto.planning.plans import Plans
from spineauto.preprocessing.preprocess import preprocess_dataset

log = logging.getLogger(__name__)


@dataclass
class PlanResult:
    plans: Plans
    fingerprint: Fingerprint
    folder: Path
    written: int


def plan_and_preprocess(dataset: str | int, verify: bool = True, preset: Path | None = None, workers: int = 2,
                        raw: Path | None = None, preprocessed: Path | None = None,
                        progress: Callable[[str, str], None] | None = None) -> PlanResult:
    raw_dir = paths.raw_dataset(dataset, raw)
    info = load_dataset_json(raw_dir)
    out = paths.root("preprocessed", preprocessed) / raw_dir.name
    fp = fingerprint_dataset(info, verify=verify, workers=workers, progress=(lambda c: progress("fingerprint", c)) if progress else None)
    plans = plan_dataset(fp, preset)
    out.mkdir(parents=True, exist_ok=True)
    fp.save(out / "fingerprint.json")
    plans.save(out / "plans.json")
    write_dataset_json_copy(raw_dir, out)
    written = 0
    done: set[str] = set()
    for cfg in plans.configurations.values():
        if cfg.data_identifier in done:
            continue
        done.add(cfg.data_identifier)
        written += preprocess_dataset(info, cfg, plans.intensity, out / cfg.data_identifier, workers=workers,
                                      progress=(lambda c: progress("preprocess", c)) if progress else None)
    log.info("plans written to %s", out / "plans.json")
    return PlanResult(plans=plans, fingerprint=fp, folder=out, written=written)


def write_dataset_json_copy(raw_dir: Path, out: Path) -> None:
    from spineauto.io.atomic import read_json, write_json

    write_json(out / "dataset.json", read_json(raw_dir / "dataset.json"))
