"""`spineauto find_best_configuration`: pick the configuration (or ensemble) to predict with.

Segmentation: every trained configuration with masks in ``fold_<k>/validation/`` (``fold_all`` is
not a cross-validation) is scored against the raw ``labelsTr`` (mean foreground Dice), with and
without the postprocessing decided on it (written to the model folder's ``postprocessing.json``).
Ensembles of two or more configurations are scored from the averaged ``validation/<case>.npz``
probabilities that training wrote (``spineauto train --npz``); configurations without them are
skipped with a note. Classification: configurations with heads are ranked by the balanced accuracy
(mean over heads) of their cross-validation ``<case>.json`` against the dataset's classes.
The winners and the exact commands go to ``best_configuration.json`` and ``inference_instructions.txt``.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from spineauto import paths
from spineauto.errors import SpineautoError
from spineauto.evaluation.metrics import dice
from spineauto.inference.postprocessing import POSTPROCESSING_FILE, apply_postprocessing, keep_largest_component
from spineauto.io.atomic import read_json, write_atomic, write_json
from spineauto.io.images import read_volume

log = logging.getLogger(__name__)


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


def trained_configurations(results: Path, pattern: str = "*.nii.gz") -> dict[str, Path]:
    """configuration -> model folder, for folders whose cross-validation wrote ``validation/<pattern>``."""
    out = {}
    if results.is_dir():
        for folder in sorted(results.iterdir()):
            if folder.is_dir() and "__" in folder.name and any(folder.glob(f"fold_[0-9]*/validation/{pattern}")):
                out[paths.configuration_of(folder)] = folder
    return out


def _validation_files(folder: Path, ending: str) -> dict[str, Path]:
    files = {}
    for p in sorted(folder.glob(f"fold_[0-9]*/validation/*{ending}")):
        files[p.name[: -len(ending)]] = p
    return files


def _mean_fg_dice(preds: dict[str, np.ndarray], refs: dict[str, np.ndarray], labels: dict[str, int]) -> float:
    vals = []
    for v in labels.values():
        per = [dice(preds[c] == v, refs[c] == v) for c in refs]
        per = [d for d in per if np.isfinite(d)]
        if per:
            vals.append(float(np.mean(per)))
    return float(np.mean(vals)) if vals else float("nan")


def _score(name: str, members: list[str], preds: dict[str, np.ndarray], refs: dict[str, np.ndarray],
           labels: dict[str, int], pp_file: Path) -> Candidate:
    pp = decide_postprocessing(preds, refs, labels)
    write_json(pp_file, pp)
    post = {c: apply_postprocessing(p, pp) for c, p in preds.items()}
    return Candidate(name, members, _mean_fg_dice(preds, refs, labels), _mean_fg_dice(post, refs, labels), pp, str(pp_file), len(refs))


def decide_postprocessing(preds: dict[str, np.ndarray], refs: dict[str, np.ndarray], labels: dict[str, int]) -> dict:
    """nnU-Net's rule: a label keeps only its largest component if that raises its mean Dice over the cases."""
    def mean(values: list[float]) -> float:
        vals = [v for v in values if np.isfinite(v)]
        return float(np.mean(vals)) if vals else float("nan")

    chosen, report = [], {}
    for name, v in labels.items():
        if v == 0:
            continue
        b = mean([dice(preds[c] == v, refs[c] == v) for c in refs])
        a = mean([dice(keep_largest_component(preds[c], v) == v, refs[c] == v) for c in refs])
        use = bool(np.isfinite(a) and np.isfinite(b) and a > b)
        report[name] = {"dice_before": b, "dice_after": a, "largest_component": use}
        if use:
            chosen.append(v)
    return {"largest_component_labels": chosen, "cases": len(refs), "per_label": report,
            "rule": "keep the largest 26-connected component of a label if it raises the label's mean cross-validation Dice"}


def find_best_configuration(dataset: str | int, configurations: Sequence[str] | None = None, ensembles: bool = True,
                            reference_dir: Path | None = None) -> BestConfiguration:
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
    candidates, notes = [], []
    if segmenting:
        candidates += _segmentation_candidates(name, results, segmenting, ensembles, reference_dir, notes)
    ranked_cls = _classification_candidates(classifying, notes)
    best_cls = max(ranked_cls, key=lambda c: (np.nan_to_num(c.dice, nan=-1.0), -len(c.members))) if ranked_cls else None
    candidates += ranked_cls
    seg = [c for c in candidates if c.metric == "Dice"]
    best = max(seg, key=lambda c: (np.nan_to_num(c.best_dice, nan=-1.0), -len(c.members))) if seg else best_cls
    commands = inference_commands(name, best, {**classifying, **segmenting})
    if best_cls is not None and best_cls is not best:
        commands += inference_commands(name, best_cls, classifying)
    result = BestConfiguration(name, candidates, best, notes=notes, commands=commands, best_classification=best_cls)
    write_json(results / "best_configuration.json", asdict(result))
    lines = [f"Best for {name}: {best.name} (mean {best.metric} {best.best_dice:.4f} over {best.cases} cross-validation cases)"]
    if best_cls is not None and best_cls is not best:
        lines.append(f"Best classification: {best_cls.name} (balanced accuracy {best_cls.dice:.4f} over {best_cls.cases} cases)")
    write_atomic(results / "inference_instructions.txt", lambda p: p.write_text("\n".join([*lines, "", *commands, ""])))
    return result


def _segmentation_candidates(name: str, results: Path, trained: dict[str, Path], ensembles: bool, reference_dir: Path | None,
                             notes: list[str]) -> list[Candidate]:
    ref_dir = Path(reference_dir) if reference_dir else paths.raw_dataset(name) / "labelsTr"
    first = next(iter(trained.values()))
    labels = {k: int(v) for k, v in read_json(first / "dataset.json")["labels"].items() if int(v) != 0}
    preds = {cfg: {c: read_volume(p)[0].round().astype(np.int16) for c, p in _validation_files(folder, ".nii.gz").items()}
             for cfg, folder in trained.items()}
    cases = sorted(set.intersection(*(set(p) for p in preds.values())))
    if not cases:
        raise SpineautoError(f"{results}: the configurations share no validation case; compare them one at a time with -c")
    refs = {c: load_reference(c, ref_dir, name, first) for c in cases}
    candidates = [_score(cfg, [cfg], {c: preds[cfg][c] for c in cases}, refs, labels, folder / POSTPROCESSING_FILE)
                  for cfg, folder in trained.items()]
    if ensembles and len(trained) > 1:
        probs = {cfg: _validation_files(folder, ".npz") for cfg, folder in trained.items()}
        for k in range(2, len(trained) + 1):
            for combo in itertools.combinations(trained, k):
                lacking = [cfg for cfg in combo if not all(c in probs[cfg] for c in cases)]
                if lacking:
                    notes.append(f"ensemble {'+'.join(combo)} skipped: {', '.join(lacking)} saved no validation probabilities "
                                 "(train with `spineauto train --npz` to compare ensembles)")
                    continue
                candidates.append(_score_ensemble(combo, probs, cases, refs, labels, results))
    return candidates


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
    return restore_label_map(np.load(seg_file), read_json(props_file))


def _score_ensemble(combo, probs, cases, refs, labels, results: Path) -> Candidate:
    from spineauto.inference.ensemble import average_probabilities

    preds = {c: average_probabilities([probs[cfg][c] for cfg in combo])[0].argmax(0).astype(np.int16) for c in cases}
    name = "+".join(combo)
    return _score(name, list(combo), preds, refs, labels, results / f"ensemble__{name}__{POSTPROCESSING_FILE}")


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
