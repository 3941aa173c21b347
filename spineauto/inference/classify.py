"""Volume-level classification results: slice probabilities (from
:func:`spineauto.inference.predictor.run_networks`, each slice seen as in training, through
patch-sized windows) averaged into one probability vector per head.

Written per case: ``<case>.json`` (``kind: spineauto.classification``, each head's class and
probabilities, slice count) and one ``classification.csv`` row per case with ``<head>`` and
``<head>_p_<class>`` columns.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from spineauto.io import csv_cells
from spineauto.io.atomic import write_atomic, write_json
from spineauto.io.csv_cells import unescape

PREDICTION_KIND = "spineauto.classification"


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


def aggregate_slices(slice_probs: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(S, K) slice probabilities -> (K,) volume probabilities: their (weighted) mean, renormalised."""
    p = np.asarray(slice_probs, dtype=np.float64)
    w = np.ones(len(p)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        w = np.ones(len(p))
    v = (p * w[:, None]).sum(axis=0) / w.sum()
    return (v / v.sum()).astype(np.float32)


def write_case_json(out_dir: Path, result: CaseClassification, extra: dict | None = None) -> Path:
    return write_json(Path(out_dir) / f"{result.case}.json", {**result.to_dict(), **(extra or {})})


def csv_header(classes: dict[str, list[str]]) -> list[str]:
    cols = ["case"]
    for h, cs in classes.items():
        cols += [h] + [f"{h}_p_{c}" for c in cs]
    return cols


def write_classification_csv(out_dir: Path, results: Sequence[CaseClassification], name: str = "classification.csv") -> Path | None:
    """``classification.csv`` (or ``name``): one row per case; rows of cases not in ``results`` are kept (reruns)."""
    if not results:
        return None
    path = Path(out_dir) / name
    header = csv_header(results[0].classes)
    rows: dict[str, dict] = {}
    if path.is_file():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames == header:
                rows = {unescape(r["case"]): {k: unescape(v) for k, v in r.items()} for r in reader}
    for r in results:
        row = {"case": r.case}
        for h, cs in r.classes.items():
            row[h] = r.predicted(h)
            row.update({f"{h}_p_{c}": f"{float(p):.6f}" for c, p in zip(cs, r.probabilities[h])})
        rows[r.case] = row
    buf = io.StringIO()
    writer = csv_cells.dict_writer(buf, header, lineterminator="\n")
    writer.writeheader()
    for case in sorted(rows):
        writer.writerow(rows[case])
    text = buf.getvalue()
    return write_atomic(path, lambda p: p.write_text(text))
