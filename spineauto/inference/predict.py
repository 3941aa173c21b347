"""`spineauto predict`: cases in, masks and/or classes out in each input's exact geometry.

The networks are loaded once; cases run one after another in this process (no worker pool to
spawn) through the one case driver (:mod:`spineauto.inference.driver`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from spineauto.errors import SpineautoError
from spineauto.inference.driver import PredictResult, predict_cases
from spineauto.inference.export import check_output_apart, check_writable, writing
from spineauto.inference.inputs import attach_roi_masks, discover_cases
from spineauto.inference.model import TrainedModel


def predict_folder(model: TrainedModel, source: Path, output: Path, tta: bool = True, save_probabilities: bool = False,
                   batch_slices: int | None = None, progress: Callable[[str, int, int], None] | None = None,
                   roi: Path | None = None) -> PredictResult:
    """Predict every case found in ``source`` (NIfTI file or folder, DICOM series) into ``output``.

    ``roi``: a folder of ``<case>.nii.gz`` masks (value > 0), required by a configuration with an
    roi (``2d_cord_roi``: the cord predicted by another model) and refused by the others.
    ``output`` must lie apart from ``source``, ``roi`` and the model folder
    (:func:`~spineauto.inference.export.check_output_apart`).
    """
    check_output_apart([source, roi], output, within=[model.folder])
    cases = discover_cases(source, model.num_channels)
    if not cases:
        raise SpineautoError(f"{source}: no input cases found")
    attach_roi_masks(cases, model.plan, roi)
    if any(c.dicom is not None for c in cases) and model.num_channels != 1:
        raise SpineautoError(f"{source}: DICOM series give one channel but the model expects {model.num_channels}")
    output = Path(output)
    check_writable(output)
    if any(c.dicom is not None for c in cases):  # which series each series_XXX mask belongs to
        from spineauto.io.atomic import write_json

        with writing(output / "dicom_series.json"):
            write_json(output / "dicom_series.json", {c.name: c.metadata for c in cases if c.dicom is not None})
    return predict_cases(model, cases, output, tta, save_probabilities, batch_slices, progress)
