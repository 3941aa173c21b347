"""Volume-level classification: every slice of a preprocessed case through the network(s), slice
probabilities averaged into one probability vector per head, folds (and mirrored copies) averaged.

Each slice is seen as in training: patch-sized windows (zero-padded, centred, where the slice is
smaller, as the training sampler pads), overlapping by half a patch and averaged, so the globally
pooled features have the statistics the heads were trained on. Written per case: ``<case>.json``
(``kind: spineauto.classification``, each head's class and probabilities, slice count) and one
``classification.csv`` row per case with ``<head>`` and ``<head>_p_<class>`` columns.
"""
from __future__ import annotations

import csv
import io
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from spineauto.io.atomic import write_atomic, write_json
from spineauto.planning.plans import ConfigurationPlan

log = logging.getLogger(__name__)
PREDICTION_KIND = "spineauto.classification"
PIXELS_PER_BATCH = {"cuda": 2 ** 23, "cpu": 2 ** 20}


@dataclass
class CaseClassification:
    case: str
    probabilities: dict[str, np.ndarray]  # head -> (K,) summing to 1
    classes: dict[str, list[str]]  # head -> class names in output order
    n_slices: int

    def predicted(self, head: str) -> str:
        return self.classes[head][int(np.argmax(self.probabilities[head]))]

    def to_dict(self) -> dict:
        return {"kind": PREDICTION_KIND, "case": self.case, "n_slices": self.n_slices, "heads": {
            h: {"class": self.predicted(h), "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes[h], self.probabilities[h])}}
            for h in self.classes}}


TILE_STEP = 0.5  # window overlap, as the segmentation sliding window


def slice_tiles(x: torch.Tensor, patch: Sequence[int]) -> tuple[torch.Tensor, int]:
    """(S, C, H, W) -> ((S * T, C, *patch), T): every slice, zero-padded (centred) to at least the patch,
    cut into the same T overlapping patch-sized windows (nnunetv2's sliding-window steps)."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    ph, pw = (int(p) for p in patch)
    h, w = x.shape[-2:]
    dh, dw = max(0, ph - h), max(0, pw - w)
    if dh or dw:
        x = torch.nn.functional.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
    steps = compute_steps_for_sliding_window(tuple(x.shape[-2:]), (ph, pw), TILE_STEP)
    tiles = torch.stack([x[:, :, y:y + ph, z:z + pw] for y in steps[0] for z in steps[1]], 1)
    return tiles.reshape(-1, *tiles.shape[2:]), tiles.shape[1]


def aggregate_slices(slice_probs: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(S, K) slice probabilities -> (K,) volume probabilities: their (weighted) mean, renormalised."""
    p = np.asarray(slice_probs, dtype=np.float64)
    w = np.ones(len(p)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        w = np.ones(len(p))
    v = (p * w[:, None]).sum(axis=0) / w.sum()
    return (v / v.sum()).astype(np.float32)


def slice_probabilities(networks: Sequence[torch.nn.Module], data: np.ndarray, plan: ConfigurationPlan, device: torch.device,
                        tta: bool = False, amp: bool = True, batch_slices: int | None = None) -> dict[str, np.ndarray]:
    """head -> (S, K) softmax probabilities of every slice of one preprocessed case (C, S, H, W),
    averaged over the slice's windows, ``networks`` and, with ``tta``, mirrored copies.
    ``batch_slices``: windows per forward pass (default from the patch size and device)."""
    from spineauto.inference.predictor import eval_mode, mirror_combinations

    device = torch.device(device)
    mirrors = [()] + (mirror_combinations(plan.augmentation.mirror_axes) if tta else [])
    autocast = torch.autocast("cuda", dtype=torch.float16) if (amp and device.type == "cuda") else nullcontext()
    x_all = torch.from_numpy(np.array(np.moveaxis(data, 1, 0), dtype=np.float32, order="C"))  # (S, C, H, W), a writable copy
    per_batch = batch_slices or max(1, PIXELS_PER_BATCH["cuda" if device.type == "cuda" else "cpu"] // int(np.prod(plan.patch_size)))
    out: dict[str, list[torch.Tensor]] = {}
    scale = 1.0 / (len(networks) * len(mirrors))
    n_slices = x_all.shape[0]
    group = n_slices  # slices cut into windows at once: bounded so that the windows stay about one batch
    with torch.inference_mode(), eval_mode(list(networks)):
        s0 = 0
        while s0 < n_slices:
            tiles, per_slice = slice_tiles(x_all[s0:s0 + group], plan.patch_size)
            if tiles.shape[0] > 4 * per_batch and group > 1:
                group = max(1, per_batch // per_slice)
                continue
            s0 += group
            for start in range(0, tiles.shape[0], per_batch):
                xb = tiles[start:start + per_batch].to(device)
                acc: dict[str, torch.Tensor] = {}
                for net in networks:
                    for dims in mirrors:
                        with autocast:
                            res = net(torch.flip(xb, dims) if dims else xb)
                        for head, logits in res["cls"].items():
                            p = torch.softmax(logits.float(), dim=1) * scale
                            acc[head] = p if head not in acc else acc[head] + p
                for head, p in acc.items():
                    out.setdefault(head, []).append(p.cpu())
    return {h: torch.cat(v).reshape(n_slices, per_slice, -1).mean(1).numpy() for h, v in out.items()}


def classify_layout(networks: Sequence[torch.nn.Module], data: np.ndarray, plan: ConfigurationPlan, device: torch.device,
                    case: str = "case", tta: bool = False, amp: bool = True) -> CaseClassification:
    """One preprocessed case (C, S, H, W) -> volume-level probabilities per head."""
    per_slice = slice_probabilities(networks, data, plan, device, tta=tta, amp=amp)
    classes = {h.name: list(h.classes) for h in plan.heads}
    return CaseClassification(case=case, probabilities={h: aggregate_slices(per_slice[h]) for h in classes},
                              classes=classes, n_slices=int(data.shape[1]))


def write_case_json(out_dir: Path, result: CaseClassification, extra: dict | None = None) -> Path:
    return write_json(Path(out_dir) / f"{result.case}.json", {**result.to_dict(), **(extra or {})})


def csv_header(classes: dict[str, list[str]]) -> list[str]:
    cols = ["case"]
    for h, cs in classes.items():
        cols += [h] + [f"{h}_p_{c}" for c in cs]
    return cols


def write_classification_csv(out_dir: Path, results: Sequence[CaseClassification]) -> Path | None:
    """``classification.csv``: one row per case; rows of cases not in ``results`` are kept (reruns)."""
    if not results:
        return None
    path = Path(out_dir) / "classification.csv"
    header = csv_header(results[0].classes)
    rows: dict[str, dict] = {}
    if path.is_file():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames == header:
                rows = {r["case"]: r for r in reader}
    for r in results:
        row = {"case": r.case}
        for h, cs in r.classes.items():
            row[h] = r.predicted(h)
            row.update({f"{h}_p_{c}": f"{float(p):.6f}" for c, p in zip(cs, r.probabilities[h])})
        rows[r.case] = row
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for case in sorted(rows):
        writer.writerow(rows[case])
    text = buf.getvalue()
    return write_atomic(path, lambda p: p.write_text(text))


# ----------------------------------------------------------------------------- model folder level


def predict_classification(model, source: Path, output: Path, tta: bool = False, save_probabilities: bool = False,
                           progress=None) -> list[CaseClassification]:
    """``spineauto predict`` for a cls or multitask model: ``<case>.json`` per case and
    ``classification.csv`` (plus the masks of a multitask model, through the segmentation predictor).

    ``model`` is a :class:`spineauto.inference.model.TrainedModel` (its folds are averaged).
    """
    from spineauto.errors import SpineautoError
    from spineauto.inference.export import check_writable
    from spineauto.inference.inputs import discover_cases
    from spineauto.preprocessing.preprocess import preprocess_array

    cases = discover_cases(source, model.num_channels)
    if not cases:
        raise SpineautoError(f"{source}: no input cases found")
    output = Path(output)
    check_writable(output)
    results, failed = [], {}
    for i, case in enumerate(cases):
        if progress:
            progress(case.name, i, len(cases))
        try:
            data, affine = case.read()
            if data.shape[0] != model.num_channels:
                raise SpineautoError(f"{case.source}: {data.shape[0]} channel(s) but the model expects {model.num_channels}")
            layout, _, _ = preprocess_array(data, affine, model.plan, model.intensity)
            result = classify_layout(model.networks, layout, model.plan, model.device, case=case.name, tta=tta)
            extra = {"source": case.source, "folds": list(model.folds), "configuration": model.plan.name}
            if model.plan.has_segmentation:
                from spineauto.inference.predict import predict_case

                extra["mask"] = predict_case(model, case, output, tta=tta, save_probabilities=save_probabilities).name
            write_case_json(output, result, extra)
            results.append(result)
        except SpineautoError as e:
            failed[case.name] = str(e)
            log.error("%s: %s", case.name, e)
    write_classification_csv(output, results)
    if progress:
        progress("", len(cases), len(cases))
    if failed:
        first = next(iter(failed.items()))
        raise SpineautoError(f"{len(failed)} of {len(cases)} case(s) failed (first: {first[0]}: {first[1]}); "
                             f"{len(results)} written to {output}")
    return results


def validate_classification(network: torch.nn.Module, plan: ConfigurationPlan, store, cases: Sequence[str], out_dir: Path,
                            device: torch.device, tta: bool = False) -> dict:
    """End-of-training volume-level validation of a fold's held-out preprocessed cases.

    Writes ``<case>.json``, ``classification.csv``, ``summary_classification.json`` and
    ``confusion_<head>.png`` into ``out_dir``; returns ``{head: metrics dict}``.
    """
    from spineauto.evaluation.classification import evaluate_classification, write_report
    from spineauto.schema import to_dict

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, labels = [], {}
    for case in cases:
        r = classify_layout([network], np.asarray(store.data(case)), plan, device, case=case, tta=tta)
        write_case_json(out_dir, r)
        results.append(r)
        labels[case] = dict(store.props[case].get("classes") or {})
    write_classification_csv(out_dir, results)
    report = evaluate_classification({r.case: {h: r.predicted(h) for h in r.classes} for r in results}, labels,
                                     {h.name: list(h.classes) for h in plan.heads})
    write_report(report, out_dir)
    return {h: to_dict(m) for h, m in report.heads.items()}
