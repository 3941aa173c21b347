"""`spineauto find_best_configuration`: pick the configuration (or ensemble) to predict with.

Segmentation: every trained configuration with masks in ``fold_<k>/validation/`` (``fold_all`` is
not a cross-validation) is scored against the raw ``labelsTr`` (mean foreground Dice), with and
without the postprocessing decided on it (written to the model folder's ``postprocessing.json``).
Ensembles of two or more configurations are scored from the averaged ``validation/<case>.npz``
probabilities that training wrote (``spineauto train --npz``); configurations without them are
skipped with a note. Classification: configurations with heads are ranked by the balanced accuracy
(mean over heads) of their cross-validation ``<case>.json`` against the dataset's classes.
The winners and the exact commands go to ``best_configuration.json`` and ``inference_instructions.txt``.

The cross-validation must be complete: every fold of the model folder's ``splits_final.json`` (0..4
without it) validated, each with a prediction for every validation case the splits give it (of the
cases the configuration holds: ``2d_cord_roi`` only has those with a cord). An incomplete one is
refused unless ``allow_incomplete``; either way the result says how many of the dataset's cases
were used. Nothing is written until every score is computed.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from spineauto import paths
from spineauto.datasets.dataset_json import IGNORE
from spineauto.errors import SpineautoError
from spineauto.evaluation.files import check_writable, read_json_file, writing
from spineauto.evaluation.metrics import dice
from spineauto.inference.postprocessing import POSTPROCESSING_FILE, apply_postprocessing, keep_cord_component, keep_largest_component
from spineauto.io.atomic import write_atomic, write_json
from spineauto.io.images import read_volume

log = logging.getLogger(__name__)
SPLITS_FILE = "splits_final.json"  # the folds training used, copied beside them (training/splits.py)
N_FOLDS = 5  # folds expected of a model folder without splits_final.json
WRITE_HINT = "make the results folder writable or point SPINEAUTO_RESULTS at a writable copy"


@dataclass
class Candidate:
    name: str
    members: list[str]  # configurations
    dice: float
    dice_postprocessed: float
    postprocessing: dict
    postprocessing_file: str
    cases: int
    metric: str = "Dice"  # or "balanced accuracy" (classification); ``dice`` holds the score either way

    @property
    def best_dice(self) -> float:
        return max(self.dice, self.dice_postprocessed)


@dataclass
class BestConfiguration:
    dataset: str
    candidates: list[Candidate]
    best: Candidate  # segmentation when any configuration segments, else classification
    notes: list[str] = field(default_factory=list)
    best_classification: Candidate | None = None
    commands: list[str] = field(default_factory=list)
    dataset_cases: int | None = None  # cases of the dataset's folds (splits_final.json); None when unknown
    cases_used: list[str] = field(default_factory=list)  # how many of them each comparison used, in words


@dataclass
class Coverage:
    """How much of its cross-validation one configuration's model folder holds."""

    configuration: str
    kind: str  # segmentation or classification
    folds_missing: list[int]
    cases_missing: dict[int, list[str]]  # fold -> validation cases of the splits without a prediction
    dataset_cases: set[str] | None  # every case of the splits; None without splits_final.json

    def problems(self) -> list[str]:
        out = []
        if self.folds_missing:
            out.append(f"{self.configuration}: no {self.kind} validation predictions in fold(s) {', '.join(map(str, self.folds_missing))}")
        for fold, cases in self.cases_missing.items():
            out.append(f"{self.configuration} fold {fold}: {len(cases)} validation case(s) of {SPLITS_FILE} have no {self.kind} "
                       f"prediction (first: {cases[0]})")
        return out


def trained_configurations(results: Path, pattern: str = "*.nii.gz") -> dict[str, Path]:
    """configuration -> model folder, for folders whose cross-validation wrote ``validation/<pattern>``."""
    out = {}
    if results.is_dir():
        for folder in sorted(results.iterdir()):
            if folder.is_dir() and "__" in folder.name and any(folder.glob(f"fold_[0-9]*/validation/{pattern}")):
                out[paths.configuration_of(folder)] = folder
    return out


def _validation_files(folder: Path, ending: str, fold: str = "[0-9]*") -> dict[str, Path]:
    files = {}
    for p in sorted(folder.glob(f"fold_{fold}/validation/*{ending}")):
        if p.is_file() and not p.name.startswith("."):
            files[p.name[: -len(ending)]] = p
    return files


def labelled_dice(pred: np.ndarray, ref: np.ndarray, v: int, ignore: int | None = None) -> float:
    """Dice of label ``v``, voxels the reference marks ``ignore`` (unlabelled) left out."""
    return dice((pred == v) & (ref != ignore), ref == v)


def _mean_fg_dice(preds: dict[str, np.ndarray], refs: dict[str, np.ndarray], labels: dict[str, int], ignore: int | None = None) -> float:
    vals = []
    for v in labels.values():
        per = [labelled_dice(preds[c], refs[c], v, ignore) for c in refs]
        per = [d for d in per if np.isfinite(d)]
        if per:
            vals.append(float(np.mean(per)))
    return float(np.mean(vals)) if vals else float("nan")


def _score(name: str, members: list[str], preds: dict[str, np.ndarray], refs: dict[str, np.ndarray],
           labels: dict[str, int], pp_file: Path, outputs: dict[Path, dict], affines: dict[str, np.ndarray],
           ignore: int | None = None) -> Candidate:
    pp = decide_postprocessing(preds, refs, labels, affines, ignore)
    outputs[pp_file] = pp
    post = {c: apply_postprocessing(p, pp, affines.get(c)) for c, p in preds.items()}
    return Candidate(name, members, _mean_fg_dice(preds, refs, labels, ignore), _mean_fg_dice(post, refs, labels, ignore), pp,
                     str(pp_file), len(refs))


def decide_postprocessing(preds: dict[str, np.ndarray], refs: dict[str, np.ndarray], labels: dict[str, int],
                          affines: dict[str, np.ndarray] | None = None, ignore: int | None = None) -> dict:
    """nnU-Net's rule, with a spine-aware option: per label, keep only its largest component, or
    (with ``affines``, the cases' voxel-to-world matrices) only its cord component (a tube along
    S-I: :func:`~spineauto.inference.postprocessing.keep_cord_component`), whichever raises the
    label's mean Dice over the cases most; neither when none raises it. Voxels a reference marks
    ``ignore`` (unlabelled) count in no Dice."""
    def mean(values: list[float]) -> float:
        vals = [v for v in values if np.isfinite(v)]
        return float(np.mean(vals)) if vals else float("nan")

    options = {"largest_component": lambda seg, v, c: keep_largest_component(seg, v)}
    if affines is not None and all(c in affines for c in refs):
        options["cord_component"] = lambda seg, v, c: keep_cord_component(seg, v, affines[c])
    chosen: dict[str, list[int]] = {k: [] for k in options}
    report = {}
    for name, v in labels.items():
        if v == 0:
            continue
        b = mean([labelled_dice(preds[c], refs[c], v, ignore) for c in refs])
        after = {k: mean([labelled_dice(fn(preds[c], v, c), refs[c], v, ignore) for c in refs]) for k, fn in options.items()}
        best = max(after, key=lambda k: np.nan_to_num(after[k], nan=-1.0))
        use = bool(np.isfinite(after[best]) and np.isfinite(b) and after[best] > b)
        report[name] = {"dice_before": b, **{f"dice_{k}": a for k, a in after.items()}, "dice_after": after["largest_component"],
                        "largest_component": use and best == "largest_component", "chosen": best if use else "none"}
        if use:
            chosen[best].append(v)
    return {"largest_component_labels": chosen["largest_component"], "cord_component_labels": chosen.get("cord_component", []),
            "cases": len(refs), "per_label": report,
            "rule": "per label: keep its largest 26-connected component, or its cord component (the tube along S-I), whichever "
                    "raises the label's mean cross-validation Dice most; neither if none raises it"}


def find_best_configuration(dataset: str | int, configurations: Sequence[str] | None = None, ensembles: bool = True,
                            reference_dir: Path | None = None, allow_incomplete: bool = False) -> BestConfiguration:
    name = paths.resolve_dataset(dataset)
    results = paths.results_dataset(name)
    segmenting = trained_configurations(results)
    classifying = {c: f for c, f in trained_configurations(results, "classification.csv").items()}
    if configurations:
        known = {**segmenting, **classifying}
        unknown = [c for c in configurations if c not in known]
        if unknown:
            raise SpineautoError(f"{results}: no cross-validation predictions for {', '.join(unknown)}; trained: {', '.join(known) or 'none'}")
        segmenting = {c: f for c, f in segmenting.items() if c in configurations}
        classifying = {c: f for c, f in classifying.items() if c in configurations}
    if not (segmenting or classifying):
        raise SpineautoError(f"{results}: no configuration with cross-validation predictions (fold_<k>/validation; fold_all validates on its own training cases and does not count); train folds 0..4 first")
    notes: list[str] = []
    coverage = [cross_validation_coverage(cfg, folder, name, "segmentation") for cfg, folder in segmenting.items()]
    coverage += [cross_validation_coverage(cfg, folder, name, "classification") for cfg, folder in classifying.items()]
    problems = list(dict.fromkeys(p for c in coverage for p in c.problems()))
    if problems and not allow_incomplete:
        raise SpineautoError(f"{results}: incomplete cross-validation ({'; '.join(problems)}); train and validate what is missing "
                             f"(`spineauto train -d {name} -c CONFIGURATION -f FOLD`) or pass --allow-incomplete to rank on the cases "
                             "validated so far")
    if problems:
        notes.append(f"incomplete cross-validation, ranked on the cases validated so far: {'; '.join(problems)}")
    notes += [f"{cfg}: no {SPLITS_FILE} beside its folds; its validation cases were not checked against the folds"
              for cfg in dict.fromkeys(c.configuration for c in coverage if c.dataset_cases is None)]
    targets = [results / "best_configuration.json", results / "inference_instructions.txt",
               *(folder / POSTPROCESSING_FILE for folder in segmenting.values())]
    for target in targets:  # before any work: a read-only results folder fails now, not after scoring
        check_writable(target, "the comparison", WRITE_HINT)

    outputs: dict[Path, dict] = {}  # postprocessing files, written once everything is scored
    candidates = []
    if segmenting:
        candidates += _segmentation_candidates(name, results, segmenting, ensembles, reference_dir, notes, outputs)
    ranked_cls = _classification_candidates(classifying, notes)
    best_cls = max(ranked_cls, key=lambda c: (np.nan_to_num(c.dice, nan=-1.0), -len(c.members))) if ranked_cls else None
    candidates += ranked_cls
    seg = [c for c in candidates if c.metric == "Dice"]
    best = max(seg, key=lambda c: (np.nan_to_num(c.best_dice, nan=-1.0), -len(c.members))) if seg else best_cls
    commands = inference_commands(name, best, {**classifying, **segmenting})
    if best_cls is not None and best_cls is not best:
        commands += inference_commands(name, best_cls, classifying)
    total = _dataset_cases(coverage, name)
    of = f"of the dataset's {total}" if total is not None else f"of an unknown number (no {SPLITS_FILE} beside the folds)"
    used = [f"segmentation: {seg[0].cases} {of} cases (those every compared configuration validated)"] if seg else []
    used += [f"classification {c.name}: {c.cases} {of} cases" for c in ranked_cls]
    result = BestConfiguration(name, candidates, best, notes=notes, commands=commands, best_classification=best_cls,
                               dataset_cases=total, cases_used=used)
    lines = [f"Best for {name}: {best.name} (mean {best.metric} {best.best_dice:.4f} over {best.cases} cross-validation cases, {of})"]
    if best_cls is not None and best_cls is not best:
        lines.append(f"Best classification: {best_cls.name} (balanced accuracy {best_cls.dice:.4f} over {best_cls.cases} cases, {of})")
    for target, data in [*outputs.items(), (results / "best_configuration.json", asdict(result))]:
        with writing(target, "the comparison", WRITE_HINT):
            write_json(target, data)
    target = results / "inference_instructions.txt"
    with writing(target, "the comparison", WRITE_HINT):
        write_atomic(target, lambda p: p.write_text("\n".join([*lines, "", *commands, ""])))
    return result


def cross_validation_coverage(cfg: str, folder: Path, dataset: str, kind: str) -> Coverage:
    """Which folds of ``folder`` (a model folder) validated, and which validation cases of the splits lack a prediction."""
    from spineauto.evaluation.classification import read_predictions

    found: dict[int, set[str]] = {}
    for validation in sorted(folder.glob("fold_[0-9]*/validation")):
        fold = validation.parent.name[len("fold_"):]
        if fold.isdigit():
            names = (set(_validation_files(folder, ".nii.gz", fold)) if kind == "segmentation"
                     else set(read_predictions(validation)))
            if names:
                found[int(fold)] = names
    splits = read_splits(folder / SPLITS_FILE)
    n_folds = len(splits) if splits is not None else N_FOLDS
    held = _configuration_cases(folder, cfg, dataset) if splits is not None else None
    missing_cases = {}
    for k in range(n_folds):
        if splits is not None and k in found:
            lacking = sorted(c for c in splits[k]["val"] if (held is None or c in held) and c not in found[k])
            if lacking:
                missing_cases[k] = lacking
    everyone = {c for s in splits for c in (*s["train"], *s["val"])} if splits is not None else None
    return Coverage(cfg, kind, [k for k in range(n_folds) if k not in found], missing_cases, everyone)


def read_splits(path: Path) -> list[dict[str, list[str]]] | None:
    """A model folder's ``splits_final.json`` (None when there is none), checked for nnU-Net's shape."""
    if not path.exists():
        return None
    splits = read_json_file(path, "the cross-validation folds")
    if not (isinstance(splits, list) and splits and all(
            isinstance(s, dict) and isinstance(s.get("train"), list) and isinstance(s.get("val"), list) for s in splits)):
        raise SpineautoError(f"{path}: expected a list of {{\"train\": [...], \"val\": [...]}}, one per fold; "
                             "copy the preprocessed dataset's splits_final.json beside the folds")
    return splits


def _configuration_cases(folder: Path, cfg: str, dataset: str) -> set[str] | None:
    """The cases a configuration holds (``2d_cord_roi``: only those with a cord), from its preprocessed
    data when at hand; None (every case of the splits) otherwise."""
    from spineauto.planning.plans import Plans

    if not (folder / "plans.json").is_file():
        return None
    try:
        identifier = Plans.load(folder / "plans.json").configuration(cfg).data_identifier
    except SpineautoError:
        return None
    pre = paths.root("preprocessed") / dataset / identifier
    if not pre.is_dir():
        return None
    return {p.stem for p in pre.glob("*.json") if (pre / f"{p.stem}.npy").is_file()}


def _dataset_cases(coverage: list[Coverage], dataset: str) -> int | None:
    """How many cases the dataset's folds hold (the splits of the model folders, else the raw labelsTr)."""
    splits = [c.dataset_cases for c in coverage if c.dataset_cases is not None]
    if splits:
        return len(set().union(*splits))
    labels = paths.root("raw") / dataset / "labelsTr"
    return len([p for p in labels.glob("*.nii.gz") if not p.name.startswith(".")]) if labels.is_dir() else None


def _segmentation_candidates(name: str, results: Path, trained: dict[str, Path], ensembles: bool, reference_dir: Path | None,
                             notes: list[str], outputs: dict[Path, dict]) -> list[Candidate]:
    ref_dir = Path(reference_dir) if reference_dir else paths.raw_dataset(name) / "labelsTr"
    first = next(iter(trained.values()))
    labels, ignore = _model_labels(first / "dataset.json")
    volumes = {cfg: {c: read_volume(p) for c, p in _validation_files(folder, ".nii.gz").items()} for cfg, folder in trained.items()}
    preds = {cfg: {c: v[0].round().astype(np.int16) for c, v in vols.items()} for cfg, vols in volumes.items()}
    affines = {c: v[1] for vols in volumes.values() for c, v in vols.items()}
    cases = sorted(set.intersection(*(set(p) for p in preds.values())))
    if not cases:
        raise SpineautoError(f"{results}: the configurations share no validation case; compare them one at a time with -c")
    refs = {c: load_reference(c, ref_dir, name, first) for c in cases}
    candidates = [_score(cfg, [cfg], {c: preds[cfg][c] for c in cases}, refs, labels, folder / POSTPROCESSING_FILE, outputs, affines,
                         ignore) for cfg, folder in trained.items()]
    if ensembles and len(trained) > 1:
        probs = {cfg: _validation_files(folder, ".npz") for cfg, folder in trained.items()}
        for k in range(2, len(trained) + 1):
            for combo in itertools.combinations(trained, k):
                lacking = [cfg for cfg in combo if not all(c in probs[cfg] for c in cases)]
                if lacking:
                    notes.append(f"ensemble {'+'.join(combo)} skipped: {', '.join(lacking)} saved no validation probabilities "
                                 "(train with `spineauto train --npz` to compare ensembles)")
                    continue
                candidates.append(_score_ensemble(combo, probs, cases, refs, labels, results, outputs, affines, ignore))
    return candidates


def _model_labels(path: Path) -> tuple[dict[str, int], int | None]:
    """Foreground labels of a model folder's dataset.json, and its ignore value (None without one)."""
    data = read_json_file(path, "the model's dataset.json")
    labels = data.get("labels") if isinstance(data, dict) else None
    try:
        ignore = labels.get(IGNORE)
        return {str(k): int(v) for k, v in labels.items() if int(v) != 0 and k != IGNORE}, None if ignore is None else int(ignore)
    except (AttributeError, TypeError, ValueError):
        raise SpineautoError(f"{path}: expected \"labels\": {{name: integer value}}; copy the dataset's dataset.json into the model folder") from None


def _classification_candidates(trained: dict[str, Path], notes: list[str]) -> list[Candidate]:
    """Balanced accuracy (mean over heads) of each configuration's pooled cross-validation predictions."""
    from spineauto.evaluation.classification import evaluate_classification, read_labels, read_predictions
    from spineauto.planning.plans import Plans

    out = []
    for cfg, folder in trained.items():
        predictions = {}
        for fold in sorted(folder.glob("fold_[0-9]*/validation")):
            predictions.update(read_predictions(fold))
        plan = Plans.load(folder / "plans.json").configuration(cfg)
        report = evaluate_classification(predictions, read_labels(folder / "dataset.json"), {h.name: h.classes for h in plan.heads})
        if not report.heads:
            notes.append(f"{cfg}: no cross-validation case has a class label in {folder / 'dataset.json'}; not ranked")
            continue
        score = float(np.mean([m.balanced_accuracy for m in report.heads.values()]))
        out.append(Candidate(cfg, [cfg], score, float("nan"), {}, "", len(predictions), metric="balanced accuracy"))
    return out


def load_reference(case: str, ref_dir: Path, dataset: str, model_folder: Path) -> np.ndarray:
    """Ground truth of a training case in its image's grid: the raw label file, else the preprocessed
    segmentation restored to the original grid (the model folder's plans say where it is)."""
    raw = ref_dir / f"{case}.nii.gz"
    if raw.is_file():
        return read_volume(raw)[0].round().astype(np.int16)
    from spineauto.inference.restore import restore_label_map
    from spineauto.planning.plans import Plans

    plan = Plans.load(model_folder / "plans.json").configuration(paths.configuration_of(model_folder))
    folder = paths.root("preprocessed") / dataset / plan.data_identifier
    seg_file, props_file = folder / f"{case}_seg.npy", folder / f"{case}.json"
    if not (seg_file.is_file() and props_file.is_file()):
        raise SpineautoError(f"{raw}: no ground truth for validation case {case} (nor {seg_file}); "
                             "set SPINEAUTO_RAW or SPINEAUTO_PREPROCESSED to the dataset's folders")
    return restore_label_map(np.load(seg_file), read_json_file(props_file, "the preprocessed case's properties"))


def _score_ensemble(combo, probs, cases, refs, labels, results: Path, outputs: dict[Path, dict], affines: dict,
                    ignore: int | None = None) -> Candidate:
    from spineauto.inference.ensemble import average_probabilities

    preds = {c: average_probabilities([probs[cfg][c] for cfg in combo])[0].argmax(0).astype(np.int16) for c in cases}
    name = "+".join(combo)
    return _score(name, list(combo), preds, refs, labels, results / f"ensemble__{name}__{POSTPROCESSING_FILE}", outputs, affines, ignore)


def inference_commands(dataset: str, best: Candidate, trained: dict[str, Path]) -> list[str]:
    if best.metric != "Dice":
        return [f"spineauto predict -d {dataset} -c {best.members[0]} -i INPUT_FOLDER -o OUTPUT_FOLDER"]
    if len(best.members) == 1:
        return [f"spineauto predict -d {dataset} -c {best.members[0]} -i INPUT_FOLDER -o OUTPUT_FOLDER",
                f"(postprocessing from {trained[best.members[0]] / POSTPROCESSING_FILE} is applied automatically)"]
    cmds = [f"spineauto predict -d {dataset} -c {cfg} -i INPUT_FOLDER -o OUTPUT_FOLDER_{cfg} --save-probabilities"
            for cfg in best.members]
    dirs = " ".join(f"-i OUTPUT_FOLDER_{cfg}" for cfg in best.members)
    cmds.append(f"spineauto ensemble {dirs} -o OUTPUT_FOLDER --postprocessing {best.postprocessing_file}")
    return cmds
