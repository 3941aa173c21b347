"""`spineauto predict`: cases in, masks out in each input's exact geometry.

The networks are loaded once; cases run one after another in this process (no worker pool to
spawn): read -> preprocess (the training transform) -> sliding window over all folds -> restore
-> argmax -> postprocessing -> atomic write. A failing case leaves no output file behind; the other
cases still run and the failures are reported together at the end.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


from spineauto.errors import SpineautoError
from spineauto.inference.export import check_writable, write_mask, write_probabilities
from spineauto.inference.inputs import InputCase, discover_cases
from spineauto.inference.model import TrainedModel
from spineauto.inference.postprocessing import apply_postprocessing
from spineauto.inference.predictor import predict_probabilities
from spineauto.inference.restore import restore_labels, restore_probabilities

log = logging.getLogger(__name__)


@dataclass
class PredictResult:
    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def predict_case(model: TrainedModel, case: InputCase, output: Path, tta: bool = True, save_probabilities: bool = False,
                 batch_slices: int | None = None) -> Path:
    """Predict one case and write ``<output>/<case>.nii.gz`` (and ``.npz``); returns the mask path."""
    from spineauto.preprocessing.preprocess import preprocess_array

    data, affine = case.read()
    if data.shape[0] != model.num_channels:
        raise SpineautoError(f"{case.source}: {data.shape[0]} channel(s) but the model expects {model.num_channels}")
    layout, _, props = preprocess_array(data, affine, model.plan, model.intensity)
    del data
    probs = predict_probabilities(model.networks, layout, model.plan, model.device, tta=tta, batch_slices=batch_slices)
    labels = restore_labels(probs, props)
    labels = apply_postprocessing(labels, model.postprocessing)
    target = output / f"{case.name}.nii.gz"
    if case.files:
        write_mask(target, labels, header=case.reference_header(), shape=case.reference_shape())
    else:
        write_mask(target, labels, sitk_reference=case.dicom)
    if save_probabilities:
        full = restore_probabilities(probs, props)
        write_probabilities(output / f"{case.name}.npz", full, target, model.label_values)
    return target


def predict_folder(model: TrainedModel, source: Path, output: Path, tta: bool = True, save_probabilities: bool = False,
                   batch_slices: int | None = None, progress: Callable[[str, int, int], None] | None = None) -> PredictResult:
    """Predict every case found in ``source`` into ``output``."""
    cases = discover_cases(source, model.num_channels)
    if not cases:
        raise SpineautoError(f"{source}: no input cases found")
    if any(c.dicom is not None for c in cases) and model.num_channels != 1:
        raise SpineautoError(f"{source}: DICOM series give one channel but the model expects {model.num_channels}")
    output = Path(output)
    check_writable(output)
    if any(c.dicom is not None for c in cases):  # which series each series_XXX mask belongs to
        from spineauto.io.atomic import write_json

        write_json(output / "dicom_series.json", {c.name: c.metadata for c in cases if c.dicom is not None})
    result = PredictResult()
    for i, case in enumerate(cases):
        if progress:
            progress(case.name, i, len(cases))
        t0 = time.perf_counter()
        try:
            result.written.append(predict_case(model, case, output, tta, save_probabilities, batch_slices))
        except SpineautoError as e:
            result.failed[case.name] = str(e)
            log.error("%s: %s", case.name, e)
            for stale in (output / f"{case.name}.nii.gz", output / f"{case.name}.npz"):
                stale.unlink(missing_ok=True)
        result.seconds[case.name] = time.perf_counter() - t0
    if progress:
        progress("", len(cases), len(cases))
    if result.failed:
        first = next(iter(result.failed.items()))
        raise SpineautoError(f"{len(result.failed)} of {len(cases)} case(s) failed (first: {first[0]}: {first[1]}); "
                             f"{len(result.written)} written to {output}")
    return result
