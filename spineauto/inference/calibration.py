"""Per-label probability thresholds stored with a model (``calibration.json``), applied when the
probabilities become labels.

A network's 0.5 boundary is not where the cord's edge is on every contrast: a model that learned from
a few real scans draws the cord too small on one contrast and too large on another, and the
cross-sectional area follows. ``spineauto calibrate`` (:mod:`spineauto.evaluation.calibration`)
chooses, per label, the threshold at which the predicted volume matches the reference volume on
cases with a known truth, and writes it beside ``postprocessing.json``:

    {"thresholds": {"1": 0.3}, "chosen_on": "...", ...}

A label with a threshold ``t`` is predicted wherever its probability is at least ``t`` (elsewhere the
most probable of the other labels); labels without one keep the argmax. A model folder without the
file predicts exactly as before. Predict, validation, the pipeline and bundles read it through
:func:`load_calibration` (one line naming the file for any bad content).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from spineauto.errors import SpineautoError
from spineauto.io.atomic import read_json

CALIBRATION_FILE = "calibration.json"


def load_calibration(path: Path, label_values: Sequence[int] | None = None) -> dict[int, float]:
    """The thresholds of a ``calibration.json``: {label value: probability threshold in (0, 1)}."""
    path = Path(path)
    hint = "rerun `spineauto calibrate` or delete it"
    try:
        data = read_json(path)
    except (OSError, ValueError, RecursionError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        raise SpineautoError(f"{path}: unreadable calibration file ({reason}); {hint}") from None
    raw = data.get("thresholds") if isinstance(data, dict) else None
    if not isinstance(raw, dict):
        raise SpineautoError(f"{path}: not a calibration file (expected {{\"thresholds\": {{\"<label value>\": threshold}}}}); {hint}")
    known = {int(v) for v in label_values if int(v) > 0} if label_values is not None else None
    out: dict[int, float] = {}
    for key, t in raw.items():
        if not str(key).isdigit() or int(key) <= 0 or (known is not None and int(key) not in known):
            raise SpineautoError(f"{path}: threshold for {key!r}, which is not a label value of the model"
                                 + (f" ({sorted(known)})" if known is not None else "") + f"; {hint}")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < float(t) < 1.0:
            raise SpineautoError(f"{path}: threshold of label {key} must be a number between 0 and 1 (exclusive), got {t!r}; {hint}")
        out[int(key)] = float(t)
    return out


def labels_from_probabilities(probs: torch.Tensor, thresholds: Mapping[int, float] | None = None, dim: int = 1) -> torch.Tensor:
    """Label values from probabilities along ``dim`` (channel k = label value k): the argmax, except that a
    label with a threshold wins exactly where its probability reaches it."""
    if not thresholds:
        return probs.argmax(dim)
    others = probs.clone()
    for value in thresholds:
        others.select(dim, value).fill_(-1.0)
    labels = others.argmax(dim)
    for value, t in sorted(thresholds.items()):  # a later label wins where several reach their thresholds
        labels[probs.select(dim, value) >= t] = value
    return labels
