"""Cross-validation folds: made once, deterministic, grouped by subject, stratified by class.

``splits_final.json`` (nnU-Net's format: a list of ``{"train": [...], "val": [...]}``) lives beside
``plans.json`` in the preprocessed dataset folder. It is written the first time a fold is trained and
read as-is afterwards, so a user may edit it; it is validated against the preprocessed cases.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from pathlib import Path

from spineauto.errors import SpineautoError
from spineauto.io.atomic import read_json, write_json

log = logging.getLogger(__name__)
N_FOLDS = 5
SPLITS_FILE = "splits_final.json"


def _stable(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16)


def make_splits(case_subjects: dict[str, str], case_strata: dict[str, str] | None = None,
                n_folds: int = N_FOLDS, seed: int = 12345) -> list[dict[str, list[str]]]:
    """``n_folds`` train/val splits; all cases of a subject share a fold; strata balanced across folds.

    Subjects are ordered by stratum (the subject's most common class), shuffled deterministically
    within a stratum, then dealt to the currently smallest fold (by cases, ties by fewer of that
    stratum), which balances both fold size and class frequencies.
    """
    subjects: dict[str, list[str]] = defaultdict(list)
    for case in sorted(case_subjects):
        subjects[case_subjects[case]].append(case)
    if len(subjects) < n_folds:
        raise SpineautoError(
            f"only {len(subjects)} subject(s) for {n_folds}-fold cross-validation (all cases of a subject share a fold); "
            f"train on all cases with `-f all`, or write {SPLITS_FILE} beside plans.json with at most {len(subjects)} folds")
    strata = case_strata or {}
    subj_stratum = {s: Counter(strata.get(c, "") for c in cases).most_common(1)[0][0] for s, cases in subjects.items()}
    order = sorted(subjects, key=lambda s: (subj_stratum[s], _stable(f"{seed}:{s}")))
    # larger subjects first inside a stratum keeps the folds' sizes even
    order = sorted(order, key=lambda s: (subj_stratum[s], -len(subjects[s])))
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    per_stratum = [Counter() for _ in range(n_folds)]
    for s in order:
        k = min(range(n_folds), key=lambda i: (per_stratum[i][subj_stratum[s]], len(folds[i]), i))
        folds[k].extend(subjects[s])
        per_stratum[k][subj_stratum[s]] += 1
    all_cases = sorted(case_subjects)
    return [{"train": [c for c in all_cases if c not in fs], "val": sorted(fs)} for fs in map(set, folds)]


def strata_of(props: dict[str, dict]) -> dict[str, str]:
    """Stratum per case: its classes (all heads) joined, '' without classes."""
    return {case: "|".join(f"{h}={v}" for h, v in sorted((p.get("classes") or {}).items())) for case, p in props.items()}


def load_or_create_splits(folder: Path, props: dict[str, dict], n_folds: int = N_FOLDS, write: bool = True) -> list[dict[str, list[str]]]:
    """Read ``folder/splits_final.json``, or create and write it from the cases' props."""
    path = Path(folder) / SPLITS_FILE
    if path.is_file():
        try:
            splits = read_json(path)
        except ValueError as e:
            raise SpineautoError(f"{path}: invalid JSON ({e}); fix it or delete it to recreate the folds") from None
        _validate(splits, path, set(props))
        return splits
    subjects = {case: str(p.get("subject") or case) for case, p in props.items()}
    splits = make_splits(subjects, strata_of(props), n_folds)
    if write:  # DDP: every rank computes the same split, rank 0 writes it
        write_json(path, splits)
    log.info("wrote %d-fold split (grouped by subject) to %s", n_folds, path)
    return splits


def _validate(splits, path: Path, known: set[str]) -> None:
    if not isinstance(splits, list) or not splits or not all(isinstance(s, dict) and set(s) >= {"train", "val"} for s in splits):
        raise SpineautoError(f"{path}: expected a list of {{\"train\": [...], \"val\": [...]}}; fix it or delete it to recreate the folds")
    for i, s in enumerate(splits):
        missing = sorted((set(s["train"]) | set(s["val"])) - known)
        if missing:
            raise SpineautoError(f"{path}: fold {i} names case(s) not in the preprocessed data: {missing[:5]}; "
                                 "fix the file or delete it to recreate the folds")
        if not s["train"]:
            raise SpineautoError(f"{path}: fold {i} has no training cases")


def cases_for_fold(splits: list[dict[str, list[str]]], fold: str | int, all_cases: list[str], path: Path) -> tuple[list[str], list[str]]:
    """(train, val) case lists for ``fold`` (an index or 'all': train on everything, validate on it too)."""
    if str(fold) == "all":
        return sorted(all_cases), sorted(all_cases)
    k = parse_fold(fold)
    if not 0 <= k < len(splits):
        raise SpineautoError(f"fold {k} is out of range: {path} has {len(splits)} folds (0..{len(splits) - 1}); or use `-f all`")
    present = set(all_cases)  # a configuration may hold fewer cases (2d_cord_roi: only cases with a cord)
    train, val = [c for c in splits[k]["train"] if c in present], [c for c in splits[k]["val"] if c in present]
    left = len(splits[k]["train"]) + len(splits[k]["val"]) - len(train) - len(val)
    if left:
        log.info("fold %d: %d case(s) of %s are not in this configuration's preprocessed data; left out", k, left, path.name)
    if not train:
        raise SpineautoError(f"fold {k}: none of its training cases in {path} is preprocessed for this configuration; "
                             "rerun `spineauto plan_and_preprocess` or train with `-f all`")
    if not val:
        log.warning("fold %d: none of its validation cases is in this configuration's data; validating on the training "
                    "cases (as -f all does): the validation figures of this fold are not held-out", k)
        val = list(train)
    return train, val


def parse_fold(fold: str | int) -> int | str:
    if str(fold) == "all":
        return "all"
    try:
        return int(fold)
    except ValueError:
        raise SpineautoError(f"fold {fold!r} is neither a number (0..4) nor 'all'") from None
