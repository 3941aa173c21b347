"""`spineauto predict`: cases in, masks and/or classes out in each input's exact geometry.

The networks are loaded once; cases run one after another in this process (no worker pool to
spawn) through the one case driver (:mod:`spineauto.inference.driver`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from spineauto.errors import SpineautoError
from spineauto.inference.driver import PredictResult, predict_cases
from spineauto.inference.export import check_output_apart, check_writable, writing
from spineauto.inference.inputs import attach_roi_masks, discover_cases
from spineauto.inference.model import TrainedModel
from spineauto.parallel import shard

log = logging.getLogger(__name__)


def predict_folder(model: TrainedModel, source: Path, output: Path, tta: bool = True, save_probabilities: bool = False,
                   batch_slices: int | None = None, progress: Callable[[str, int, int], None] | None = None,
                   roi: Path | None = None, num_parts: int = 1, part_id: int = 0, dicom_seg: bool = False) -> PredictResult:
    """Predict every case found in ``source`` (an image file or folder of any format spineauto reads, DICOM
    series) into ``output``; masks are written in each input's own format.

    ``roi``: a folder of ``<case>.nii.gz`` masks (value > 0), required by a configuration with an
    roi (``2d_cord_roi``: the cord predicted by another model) and refused by the others.
    ``output`` must lie apart from ``source``, ``roi`` and the model folder
    (:func:`~spineauto.inference.export.check_output_apart`).
    ``num_parts``/``part_id``: predict only this shard of the cases (:func:`spineauto.parallel.shard`), so
    that a job array spreads a cohort over machines; the shards' outputs merge by copying (a sharded
    run names its ``classification.csv`` and ``dicom_series.json`` after its part).
    ``dicom_seg``: DICOM series also get ``<case>.seg.dcm``, a DICOM-SEG referencing the source series
    (one segment per label); refused for other inputs and for models without segmentation.
    """
    shard([], num_parts, part_id)  # the options checked before any case is read
    check_output_apart([source, roi], output, within=[model.folder])
    cases = discover_cases(source, model.num_channels, model.pixel_spacing)
    if not cases:
        raise SpineautoError(f"{source}: no input cases found")
    found, cases = len(cases), shard(cases, num_parts, part_id)
    part = f".part{part_id}of{num_parts}" if num_parts > 1 else ""
    if num_parts > 1:
        log.info("part %d of %d: %d of the %d case(s)", part_id, num_parts, len(cases), found)
    attach_roi_masks(cases, model.plan, roi)
    if dicom_seg:
        if not model.plan.has_segmentation:
            raise SpineautoError(f"--dicom-seg: configuration {model.plan.name} writes no masks; leave --dicom-seg out")
        if any(c.dicom is None for c in cases):
            raise SpineautoError(f"--dicom-seg: {source} holds image files, not DICOM series; leave --dicom-seg out")
        names = {v: k for k, v in model.plans.labels.items()}
        for c in cases:
            c.dicom_seg_labels = names
    if any(c.dicom is not None for c in cases) and model.num_channels != 1:
        raise SpineautoError(f"{source}: DICOM series give one channel but the model expects {model.num_channels}")
    output = Path(output)
    check_writable(output)
    if any(c.dicom is not None for c in cases):  # which series each series_XXX mask belongs to
        from spineauto.io.atomic import write_json

        with writing(output / f"dicom_series{part}.json"):
            write_json(output / f"dicom_series{part}.json", {c.name: c.metadata for c in cases if c.dicom is not None})
    return predict_cases(model, cases, output, tta, save_probabilities, batch_slices, progress, csv_name=f"classification{part}.csv")
