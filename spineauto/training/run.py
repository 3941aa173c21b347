"""Everything a training session needs before the first step: plans, cases, folds, folders, config.

Checks every user input at the edge (plans present, fold in range, ``--continue`` compatible), so
the loop can trust what it is given. :func:`open_run` holds the fold's lock for the whole session
(one ``train`` per fold at a time); :meth:`RunContext.start`, called once every input has been
checked, makes the fold folder the run's: nothing on disk changes before it. A fresh run never
replaces an earlier run's checkpoints unless asked (``--overwrite``), and then only moves it aside
until the new run has written its first checkpoint.
"""
from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from spineauto import paths
from spineauto.errors import SpineautoError
from spineauto.io.atomic import read_json, write_json
from spineauto.io.locks import exclusive_lock
from spineauto.datasets.dataset_json import load_dataset_json
from spineauto.planning.fingerprint import TRAINING_RANGE_FILE, Fingerprint, training_range
from spineauto.planning.plans import ConfigurationPlan, Plans
from spineauto.preprocessing.manifest import MANIFEST, load_manifest, raw_changes
from spineauto.training.checkpoint import LATEST, TOP_INDEX, copy_checkpoint, load_checkpoint, network_state
from spineauto.training.config import RunConfig, check_same_run, plan_sha, resolve
from spineauto.training.data import CaseStore
from spineauto.training.run_config import RunSpec, resolve_run
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
    resumed_from: Path | None = None  # its file: checkpoint_latest.pt, or the newest intact one when that is unreadable
    previous_run: Path | None = None  # an --overwrite'n run, moved aside until this run's first checkpoint

    @property
    def aside(self) -> Path:
        return _aside(self.fold_dir)

    def start(self, overwrite: bool = False) -> None:
        """Make the fold folder this run's (main process, under the fold's lock, after every input was checked)."""
        if self.fold_dir.exists() and not self.fold_dir.is_dir():
            raise SpineautoError(f"{self.fold_dir}: a file stands where the fold folder goes; move it away")
        if self.resume is None:
            self._make_room(overwrite)
        _remove_temporaries(self.fold_dir)
        if self.resumed_from is not None and self.resumed_from.name != LATEST:
            copy_checkpoint(self.resumed_from, self.fold_dir / LATEST)  # replaces the unreadable one
        _write_model_folder(self.preprocessed_dir, self.model_dir, self.plans, self.plan)

    def checkpoint_written(self) -> None:
        """The run has a checkpoint of its own: the run it replaced can go."""
        if self.previous_run is None:
            return
        previous, self.previous_run = self.previous_run, None
        try:
            shutil.rmtree(previous)
            log.info("%s: deleted the run that --overwrite replaced (this run has its first checkpoint)", previous)
        except OSError as e:
            log.warning("%s: could not delete the replaced run (%s); delete it by hand", previous, e.strerror)

    def _make_room(self, overwrite: bool) -> None:
        fold_dir, aside = self.fold_dir, self.aside
        kept = sorted(p.name for p in fold_dir.glob("checkpoint_*.pt")) if fold_dir.is_dir() else []
        if kept and not overwrite:
            raise SpineautoError(
                f"{fold_dir}: holds an earlier run ({', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''}); "
                "resume it with --continue, or replace it with --overwrite")
        if kept:
            if aside.exists():  # left by an --overwrite whose own run then got checkpoints: older than the run replaced now
                shutil.rmtree(aside)
            log.warning("%s: --overwrite moves the earlier run to %s; it is deleted once this run writes its first "
                        "checkpoint (if this run stops before, move it back to %s to keep it)", fold_dir, aside, fold_dir.name)
            os.replace(fold_dir, aside)
        else:
            _clear_previous_run(fold_dir)  # outputs of a run stopped before its first checkpoint
        if aside.exists():
            if overwrite:
                self.previous_run = aside
            else:
                log.warning("%s: holds the run an interrupted --overwrite replaced; move it back to %s to keep it, or delete it",
                            aside, fold_dir.name)


@contextmanager
def open_run(dataset: str | int, configuration: str, fold: str | int, *, seed: int | None, epochs: int | None,
             iters_per_epoch: int | None, val_iters: int | None, continue_training: bool, preprocessed: Path | None,
             results: Path | None, is_main: bool = True, run_spec: RunSpec | None = None, allow_stale: bool = False) -> Iterator[RunContext]:
    """The checked run, with the fold locked (main process) until the block ends; writes nothing but the lock file."""
    fold = parse_fold(fold)
    pre_dir = paths.preprocessed_dataset(dataset, preprocessed)
    plans_path = pre_dir / "plans.json"
    if not plans_path.is_file():
        raise SpineautoError(f"{plans_path}: no plans yet; run `spineauto plan_and_preprocess -d {dataset}` first")
    check_raw_unchanged(pre_dir, allow_stale)
    plans = Plans.load(plans_path)
    if not run_spec:
        plan = plans.configuration(configuration)
    else:  # check the run configuration before the data: its errors come first
        plan = resolve_run(plans, configuration, run_spec, None, pre_dir.name)[0].configuration(configuration)
    store = CaseStore.load(pre_dir / plan.data_identifier)
    if not store.props:
        raise SpineautoError(f"{pre_dir / plan.data_identifier}: no preprocessed cases; run `spineauto plan_and_preprocess -d {dataset}`")
    if fold == "all":
        train_cases, val_cases = cases_for_fold([], "all", sorted(store.props), pre_dir / SPLITS_FILE)
    else:
        splits = load_or_create_splits(pre_dir, _dataset_props(pre_dir, plans, store), write=is_main)
        train_cases, val_cases = cases_for_fold(splits, fold, sorted(store.props), pre_dir / SPLITS_FILE)

    model_dir = paths.model_folder(pre_dir.name, configuration, plans.plans_name, results=results)
    trial = sweep_trial()
    if trial is not None:  # every trial of a W&B sweep its own model folder: they would all write the same fold
        model_dir = model_dir.parent / trial / model_dir.name
        if is_main:
            log.info("W&B sweep trial: training into %s", model_dir)
    fold_dir = model_dir / f"fold_{fold}"
    lock = exclusive_lock(model_dir / f".{fold_dir.name}.lock", f"training of {fold_dir}") if is_main else nullcontext()
    with lock:
        resume, resumed_from, previous = None, None, None
        saved = {}
        if continue_training:
            resume, resumed_from = _resume_state(fold_dir)
            saved = resume["run_config"]
            previous = RunConfig(**{k: saved[k] for k in saved if k in RunConfig.__dataclass_fields__})
        plans, overrides = resolve_run(plans, configuration, run_spec, saved.get("overrides"), pre_dir.name)
        plan = plans.configuration(configuration)
        if continue_training:
            if saved.get("plan_sha") != plan_sha(plan) or resume.get("configuration") != plan.name:
                raise SpineautoError(f"{resumed_from}: was trained from another plan ({saved.get('configuration')}, plan "
                                     f"{saved.get('plan_sha')}) than {plans_path} ({plan.name}, plan {plan_sha(plan)}); "
                                     "restore that plan or start over with --overwrite")
        config = resolve(plan, pre_dir.name, str(fold), plans.plans_name, seed, epochs, iters_per_epoch, val_iters, previous)
        config.overrides = overrides
        if previous is not None:
            check_same_run(config, previous, fold_dir)
        yield RunContext(plans, plan, store, train_cases, val_cases, pre_dir, model_dir, fold_dir, config, resume, resumed_from)


def check_raw_unchanged(pre_dir: Path, allow_stale: bool = False) -> None:
    """Refuse (or with ``allow_stale`` warn) when the raw dataset's training cases were removed, added or
    edited since ``plan_and_preprocess`` (:func:`~spineauto.preprocessing.manifest.raw_changes`); a model
    trained without the raw dataset at hand skips this."""
    raw_dir = paths.root("raw") / pre_dir.name
    if not (raw_dir / "dataset.json").is_file() or not (pre_dir / MANIFEST).is_file():
        return
    changes = raw_changes(load_manifest(pre_dir), load_dataset_json(raw_dir))
    if not changes or not any(changes.values()):
        return
    said = "; ".join(f"{len(v)} {k} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})" for k, v in changes.items() if v)
    line = f"{raw_dir}: the raw dataset changed since plan_and_preprocess: {said}"
    if allow_stale:
        log.warning("%s; training on the data as they were preprocessed (--allow-stale-data)", line)
        return
    raise SpineautoError(f"{line}; rerun `spineauto plan_and_preprocess -d {pre_dir.name}` (with the same --preset; it redoes only "
                         "the changed cases), or pass --allow-stale-data to train on the data as they were preprocessed")


def sweep_trial() -> str | None:
    """``sweep_<id>/trial_<run id>`` under a ``wandb agent`` (it sets WANDB_SWEEP_ID and WANDB_RUN_ID per trial), else None."""
    sweep, run = os.environ.get("WANDB_SWEEP_ID", ""), os.environ.get("WANDB_RUN_ID", "")
    if not sweep:
        return None
    if not run:
        raise SpineautoError("WANDB_SWEEP_ID is set but WANDB_RUN_ID is not: run sweep trials through `wandb agent`")
    for name, value in (("WANDB_SWEEP_ID", sweep), ("WANDB_RUN_ID", run)):
        if not value.replace("-", "").replace("_", "").isalnum():
            raise SpineautoError(f"{name}={value!r}: not a W&B id (letters, digits, - and _)")
    return f"sweep_{sweep}/trial_{run}"


def _aside(fold_dir: Path) -> Path:
    """Where ``--overwrite`` keeps the run it replaces (not ``fold_*``: never taken for a fold)."""
    return fold_dir.parent / f"previous_{fold_dir.name}"


def _resume_state(fold_dir: Path) -> tuple[dict, Path]:
    """``checkpoint_latest.pt``; when it is unreadable (or gone), the intact checkpoint of the latest epoch."""
    latest, aside = fold_dir / LATEST, _aside(fold_dir)
    others = [p for p in sorted(fold_dir.glob("checkpoint_*.pt")) if p.name != LATEST]
    if not latest.is_file() and not others:
        hint = (f" ({aside} holds the run an interrupted --overwrite replaced: move it back to {fold_dir.name} to continue it)"
                if aside.is_dir() else "")
        raise SpineautoError(f"{latest}: no checkpoint to continue from; start the run without --continue{hint}")
    try:
        if latest.is_file():
            return _training_checkpoint(latest), latest
        why = "missing"
    except SpineautoError as e:
        why = str(e).split("; ")[0].removeprefix(f"{latest}: ")
    best: tuple[int, Path, dict] | None = None
    for p in others:  # top-k, best, final: copies of an earlier latest
        try:
            state = _training_checkpoint(p)
        except SpineautoError:
            continue
        if best is None or int(state["epoch"]) > best[0]:
            best = (int(state["epoch"]), p, state)
    if best is None:
        raise SpineautoError(f"{latest}: {why}, and none of the {len(others)} other checkpoint(s) of {fold_dir} is intact; "
                             "start over with --overwrite")
    log.warning("%s: %s; continuing from %s (epoch %d), the newest intact checkpoint", latest, why, best[1].name, best[0])
    return best[2], best[1]


def _training_checkpoint(path: Path) -> dict:
    state = load_checkpoint(path)
    saved = state.get("run_config") if isinstance(state, dict) else None
    if not isinstance(saved, dict) or "plan_sha" not in saved or "epoch" not in state:
        raise SpineautoError(f"{path}: not a spineauto training checkpoint (no run configuration); start over with --overwrite")
    epoch, epochs = state["epoch"], saved.get("epochs")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0 or (isinstance(epochs, int) and epoch > epochs):
        raise SpineautoError(f"{path}: damaged: epoch {str(epoch)[:40]!r} is not a count of finished epochs (0..{epochs}); "
                             "start over with --overwrite")
    for key, kind in (("optimizer", dict), ("rng", dict), ("history", list)):
        if not isinstance(state.get(key), kind):
            raise SpineautoError(f"{path}: damaged: its {key} is not a {kind.__name__}; start over with --overwrite")
    network_state(state, path)  # NaN or infinite weights: a diverged run is not continued
    return state


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
    """A fresh run never mixes with the logs of a run stopped before its first checkpoint."""
    if not fold_dir.is_dir():
        return
    stale = [p for pattern in RUN_OUTPUTS for p in fold_dir.glob(pattern)]
    stale += [p for p in (fold_dir / "overlays", fold_dir / "validation", fold_dir / "wandb") if p.exists()]
    if stale:
        log.info("%s: removing the outputs of a run stopped before its first checkpoint", fold_dir)
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _remove_temporaries(fold_dir: Path) -> None:
    """Half-written files of a killed process (atomic writes leave them under a hidden temporary name);
    the fold's lock says no other process is writing here."""
    if fold_dir.is_dir():
        for p in fold_dir.rglob(".*.tmp*"):
            if p.is_file():
                p.unlink()


def _write_model_folder(pre_dir: Path, model_dir: Path, plans: Plans, plan: ConfigurationPlan) -> None:
    """plans.json (with the intensity statistics), dataset.json, splits and the training scans' range of voxel
    sizes and fields of view beside the folds: the folder predicts (and checks its inputs) on its own."""
    model_dir.mkdir(parents=True, exist_ok=True)
    old = model_dir / "plans.json"
    if old.is_file():
        try:
            other = Plans.load(old).configurations.get(plan.name)
        except SpineautoError:
            other = None
        if other is not None and plan_sha(other) != plan_sha(plan):
            log.warning("%s: the plan changed; folds trained before keep predicting with their own (fold_k/run_config.yaml), "
                        "but folds whose plans differ in what prediction shares (patch size, preprocessing) cannot be ensembled", old)
    plans.save(old)
    if (pre_dir / "fingerprint.json").is_file():  # what the pipeline's QC compares a new scan with
        write_json(model_dir / TRAINING_RANGE_FILE, training_range(Fingerprint.load(pre_dir / "fingerprint.json")))
    for name in ("dataset.json", SPLITS_FILE):
        if (pre_dir / name).is_file():
            write_json(model_dir / name, read_json(pre_dir / name))
