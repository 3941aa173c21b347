"""Everything a training session needs before the first step: plans, cases, folds, folders, config.

Checks every user input at the edge (plans present, fold in range, ``--continue`` compatible), so
the loop can trust what it is given.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from spineauto import paths
from spineauto.errors import SpineautoError
from spineauto.io.atomic import read_json, write_json
from spineauto.planning.plans import ConfigurationPlan, Plans
from spineauto.training.checkpoint import LATEST, TOP_INDEX, load_checkpoint
from spineauto.training.config import RunConfig, check_same_run, plan_sha, resolve
from spineauto.training.data import CaseStore
from spineauto.training.splits import SPLITS_FILE, cases_for_fold, load_or_create_splits, parse_fold

log = logging.getLogger(__name__)
RUN_OUTPUTS = ("checkpoint_*.pt", "metrics.jsonl", "progress.png", "log.txt", TOP_INDEX, "config.json")


@dataclass
class RunContext:
    plans: Plans
    plan: ConfigurationPlan
    store: CaseStore
    train_cases: list[str]
    val_cases: list[str]
    preprocessed_dir: Path
    model_dir: Path
    fold_dir: Path
    config: RunConfig
    resume: dict | None  # the checkpoint to continue from


def prepare_run(dataset: str | int, configuration: str, fold: str | int, *, seed: int | None, epochs: int | None,
                iters_per_epoch: int | None, val_iters: int | None, continue_training: bool,
                preprocessed: Path | None, results: Path | None, is_main: bool = True) -> RunContext:
    fold = parse_fold(fold)
    pre_dir = paths.preprocessed_dataset(dataset, preprocessed)
    plans_path = pre_dir / "plans.json"
    if not plans_path.is_file():
        raise SpineautoError(f"{plans_path}: no plans yet; run `spineauto plan_and_preprocess -d {dataset}` first")
    plans = Plans.load(plans_path)
    plan = plans.configuration(configuration)
    store = CaseStore.load(pre_dir / plan.data_identifier)
    if not store.props:
        raise SpineautoError(f"{pre_dir / plan.data_identifier}: no preprocessed cases; run `spineauto plan_and_preprocess -d {dataset}`")
    if fold == "all":
        train_cases, val_cases = cases_for_fold([], "all", sorted(store.props), pre_dir / SPLITS_FILE)
    else:
        splits = load_or_create_splits(pre_dir, _dataset_props(pre_dir, plans, store), write=is_main)
        train_cases, val_cases = cases_for_fold(splits, fold, sorted(store.props), pre_dir / SPLITS_FILE)

    model_dir = paths.model_folder(pre_dir.name, configuration, plans.plans_name, results=results)
    fold_dir = model_dir / f"fold_{fold}"
    previous = RunConfig.load(fold_dir)
    resume = None
    if continue_training:
        latest = fold_dir / LATEST
        if not latest.is_file():
            raise SpineautoError(f"{latest}: no checkpoint to continue from; start the run without --continue")
        resume = load_checkpoint(latest)
        saved = resume.get("run_config")
        if not isinstance(saved, dict) or "plan_sha" not in saved:
            raise SpineautoError(f"{latest}: not a spineauto training checkpoint (no run configuration); start without --continue")
        previous = RunConfig(**{k: saved[k] for k in saved if k in RunConfig.__dataclass_fields__})
        if saved.get("plan_sha") != plan_sha(plan) or resume.get("configuration") != plan.name:
            raise SpineautoError(f"{latest}: was trained from another plan ({saved.get('configuration')}, plan {saved.get('plan_sha')}) "
                                 f"than {plans_path} ({plan.name}, plan {plan_sha(plan)}); restore that plan or start over without --continue")
    config = resolve(plan, pre_dir.name, str(fold), plans.plans_name, seed, epochs, iters_per_epoch, val_iters,
                     previous if continue_training else None)
    if continue_training:
        check_same_run(config, previous, fold_dir)
    elif is_main:
        _clear_previous_run(fold_dir)
    if is_main:
        _write_model_folder(pre_dir, model_dir, plans, plan)
    return RunContext(plans, plan, store, train_cases, val_cases, pre_dir, model_dir, fold_dir, config, resume)


def _dataset_props(pre_dir: Path, plans: Plans, store: CaseStore) -> dict[str, dict]:
    """The cases of every configuration's preprocessed data: the folds are the dataset's, and a
    configuration that holds fewer cases (2d_cord_roi: only those with a cord) trains on its part."""
    props = dict(store.props)
    for cfg in plans.configurations.values():
        folder = pre_dir / cfg.data_identifier
        if folder != store.folder and folder.is_dir():
            props = {**CaseStore.load(folder).props, **props}
    return props


def _clear_previous_run(fold_dir: Path) -> None:
    """A fresh run never mixes with an older one in the same folder."""
    if not fold_dir.is_dir():
        return
    stale = [p for pattern in RUN_OUTPUTS for p in fold_dir.glob(pattern)]
    stale += [p for p in (fold_dir / "overlays", fold_dir / "validation", fold_dir / "wandb") if p.exists()]
    if stale:
        log.warning("%s: starting over; removing the previous run's outputs (use --continue to resume it)", fold_dir)
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _write_model_folder(pre_dir: Path, model_dir: Path, plans: Plans, plan: ConfigurationPlan) -> None:
    """plans.json (with the intensity statistics), dataset.json and splits beside the folds: the folder predicts on its own."""
    model_dir.mkdir(parents=True, exist_ok=True)
    old = model_dir / "plans.json"
    if old.is_file():
        try:
            other = Plans.load(old).configurations.get(plan.name)
        except SpineautoError:
            other = None
        if other is not None and plan_sha(other) != plan_sha(plan):
            log.warning("%s: the plan changed; folds trained before with the old plan should be retrained", old)
    plans.save(old)
    for name in ("dataset.json", SPLITS_FILE):
        if (pre_dir / name).is_file():
            write_json(model_dir / name, read_json(pre_dir / name))
