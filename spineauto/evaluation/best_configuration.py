"""`spineauto find_best_configuration`: pick the configuration (or ensemble) to predict with.

For every trained configuration (a model folder with ``fold_<k>/validation/*.nii.gz``; ``fold_all`` is not a cross-validation) the
cross-validation predictions are scored against the raw ``labelsTr`` (mean foreground Dice), with and
without the postprocessing decided on them (written to the model folder's ``postprocessing.json``).
Ensembles of two or more configurations are scored from the averaged ``validation/<case>.npz``
probabilities when every member saved them; otherwise they are skipped with a note. The winner and
the exact commands go to ``best_configuration.json`` and ``inference_instructions.txt``.
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
from spineauto.inference.postprocessing import POSTPROCESSING_FILE, apply_postprocessing, decide_postprocessing
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

    @property
    def best_dice(self) -> float:
        return max(self.dice, self.dice_postprocessed)


@dataclass
class BestConfiguration:
    dataset: str
    candidates: list[Candidate]
    best: Candidate
    notes: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


def trained_configurations(results: Path) -> dict[str, Path]:
    """configuration -> model folder, for folders that hold cross-validation predictions."""
    out = {}
    if results.is_dir():
        for folder in sorted(results.iterdir()):
            if folder.is_dir() and "__" in folder.name and any(folder.glob("fold_[0-9]*/validation/*.nii.gz")):
                out[folder.name.split("__")[-1]] = folder
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
    pairs = [(lambda c=c: preds[c], lambda c=c: refs[c]) for c in refs]
    pp = decide_postprocessing(pairs, {"background": 0, **labels})
    write_json(pp_file, pp)
    post = {c: apply_postprocessing(p, pp) for c, p in preds.items()}
    return Candidate(name, members, _mean_fg_dice(preds, refs, labels), _mean_fg_dice(post, refs, labels), pp, str(pp_file), len(refs))


def find_best_configuration(dataset: str | int, configurations: Sequence[str] | None = None, ensembles: bool = True,
                            reference_dir: Path | None = None) -> BestConfiguration:
    name = paths.resolve_dataset(dataset)
    results = paths.results_dataset(name)
    trained = trained_configurations(results)
    if configurations:
        unknown = [c for c in configurations if c not in trained]
        if unknown:
            raise SpineautoError(f"{results}: no cross-validation predictions for {', '.join(unknown)}; trained: {', '.join(trained) or 'none'}")
        trained = {c: trained[c] for c in configurations}
    if not trained:
        raise SpineautoError(f"{results}: no configuration with cross-validation predictions (fold_<k>/validation; fold_all validates on its own training cases and does not count); train folds 0..4 first")
    ref_dir = Path(reference_dir) if reference_dir else paths.raw_dataset(name) / "labelsTr"
    first = next(iter(trained.values()))
    labels = {k: int(v) for k, v in read_json(first / "dataset.json")["labels"].items() if int(v) != 0}
    preds = {cfg: {c: read_volume(p)[0].round().astype(np.int16) for c, p in _validation_files(folder, ".nii.gz").items()}
             for cfg, folder in trained.items()}
    cases = sorted(set.intersection(*(set(p) for p in preds.values())))
    if not cases:
        raise SpineautoError(f"{results}: the configurations share no validation case; compare them one at a time with -c")
    refs = {c: load_reference(c, ref_dir, name, first) for c in cases}
    candidates, notes = [], []
    for cfg, folder in trained.items():
        candidates.append(_score(cfg, [cfg], {c: preds[cfg][c] for c in cases}, refs, labels, folder / POSTPROCESSING_FILE))
    if ensembles and len(trained) > 1:
        probs = {cfg: _validation_files(folder, ".npz") for cfg, folder in trained.items()}
        for k in range(2, len(trained) + 1):
            for combo in itertools.combinations(trained, k):
                lacking = [cfg for cfg in combo if not all(c in probs[cfg] for c in cases)]
                if lacking:
                    notes.append(f"ensemble {'+'.join(combo)} skipped: {', '.join(lacking)} saved no validation probabilities "
                                 "(train with validation probabilities saved to compare ensembles)")
                    continue
                candidates.append(_score_ensemble(combo, probs, cases, refs, labels, results))
    best = max(candidates, key=lambda c: (np.nan_to_num(c.best_dice, nan=-1.0), -len(c.members)))
    result = BestConfiguration(name, candidates, best, notes, inference_commands(name, best, trained))
    write_json(results / "best_configuration.json", asdict(result))
    text = "\n".join([f"Best for {name}: {best.name} (mean foreground Dice {best.best_dice:.4f} over {best.cases} "
                      "cross-validation cases)", "", *result.commands, ""])
    write_atomic(results / "inference_instructions.txt", lambda p: p.write_text(text))
    return result


def load_reference(case: str, ref_dir: Path, dataset: str, model_folder: Path) -> np.ndarray:
    """Ground truth of a training case in its image's grid: the raw label file, else the preprocessed
    segmentation restored to the original grid (the model folder's plans say where it is)."""
    raw = ref_dir / f"{case}.nii.gz"
    if raw.is_file():
        return read_volume(raw)[0].round().astype(np.int16)
    from spineauto.planning.plans import Plans
    from spineauto.preprocessing.preprocess import restore_segmentation

    plan = Plans.load(model_folder / "plans.json").configuration(model_folder.name.split("__")[-1])
    folder = paths.root("preprocessed") / dataset / plan.data_identifier
    seg_file, props_file = folder / f"{case}_seg.npy", folder / f"{case}.json"
    if not (seg_file.is_file() and props_file.is_file()):
        raise SpineautoError(f"{raw}: no ground truth for validation case {case} (nor {seg_file}); "
                             "set SPINEAUTO_RAW or SPINEAUTO_PREPROCESSED to the dataset's folders")
    return restore_segmentation(np.load(seg_file), read_json(props_file))


def _score_ensemble(combo, probs, cases, refs, labels, results: Path) -> Candidate:
    from spineauto.inference.ensemble import average_probabilities

    preds = {c: average_probabilities([probs[cfg][c] for cfg in combo])[0].argmax(0).astype(np.int16) for c in cases}
    name = "+".join(combo)
    return _score(name, list(combo), preds, refs, labels, results / f"ensemble__{name}__{POSTPROCESSING_FILE}")


def inference_commands(dataset: str, best: Candidate, trained: dict[str, Path]) -> list[str]:
    if len(best.members) == 1:
        return [f"spineauto predict -d {dataset} -c {best.members[0]} -i INPUT_FOLDER -o OUTPUT_FOLDER",
                f"(postprocessing from {trained[best.members[0]] / POSTPROCESSING_FILE} is applied automatically)"]
    cmds = [f"spineauto predict -d {dataset} -c {cfg} -i INPUT_FOLDER -o OUTPUT_FOLDER_{cfg} --save-probabilities"
            for cfg in best.members]
    dirs = " ".join(f"-i OUTPUT_FOLDER_{cfg}" for cfg in best.members)
    cmds.append(f"spineauto ensemble {dirs} -o OUTPUT_FOLDER --postprocessing {best.postprocessing_file}")
    return cmds
