"""`spineauto pipeline`: a cohort of scans in, one folder per case out, a CSV and an HTML report.

Input: a NIfTI file, a folder of them (``<case>.nii.gz`` or ``<case>_0000.nii.gz``), a folder of
DICOM series, or a BIDS root (every ``sub-*/[ses-*/]anat/*.nii.gz``, derivatives excluded).
Output, per case, ``OUT/<case>/``: ``<case>_cord.nii.gz`` and ``<case>_lesion.nii.gz`` in the input's
exact geometry, ``<case>.json`` (every stage's classes and probabilities, the model that served it,
why a case stopped, measurements, versions) and PNG overlays. A case's folder is written under a
temporary name and renamed when complete, so a failed or killed case leaves nothing behind; the
other cases go on. ``--num-parts N --part-id K`` runs every N-th case from the K-th, so the shards of
a job array write disjoint case folders that merge by copying; ``spineauto report OUT`` rebuilds
``report.html`` and ``pipeline.csv`` from the case JSONs.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from spineauto.errors import SpineautoError
from spineauto.inference.export import check_output_apart
from spineauto.inference.inputs import InputCase, discover_cases, strip_ending
from spineauto.io.atomic import current_umask, write_json
from spineauto.parallel import shard  # noqa: F401 (also `spineauto pipeline`'s option check)
from spineauto.pipeline.runner import CaseResult, Pipeline, ScanInput

log = logging.getLogger(__name__)


@dataclass
class CohortResult:
    done: list[str] = field(default_factory=list)
    check: list[str] = field(default_factory=list)  # ran through, with quality flags to look at
    stopped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    report: Path | None = None


def find_inputs(source: Path, num_channels: int = 1) -> list[InputCase]:
    """Cases under ``source``: a BIDS root, NIfTI file(s) or DICOM series."""
    source = Path(source).expanduser()
    if source.is_dir() and ((source / "dataset_description.json").is_file() or any(source.glob("sub-*/"))):
        files = sorted(p for p in source.glob("sub-*/**/anat/*.nii*") if p.name.endswith((".nii", ".nii.gz"))
                       and "derivatives" not in p.relative_to(source).parts)
        if not files:
            raise SpineautoError(f"{source}: a BIDS root without sub-*/anat/*.nii.gz images")
        return [InputCase(strip_ending(p.name), [p]) for p in files]
    return discover_cases(source, num_channels)


def run_pipeline(pipeline: Pipeline, source: Path, output: Path, num_parts: int = 1, part_id: int = 0,
                 progress: Callable[[str, int, int], None] | None = None) -> CohortResult:
    """Run ``pipeline`` on every case of ``source`` (this shard of it) into ``output``; build the report."""
    from spineauto.pipeline.report import build_report

    check_output_apart(source, output)
    cases = shard(find_inputs(source, pipeline.num_channels), num_parts, part_id)
    names = [c.name for c in cases]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise SpineautoError(f"{source}: several inputs give the case name(s) {clash}; rename them so each case is unique")
    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpineautoError(f"{output}: cannot create the output folder ({e.strerror})") from None
    result = CohortResult()
    for i, case in enumerate(cases):
        if progress:
            progress(case.name, i, len(cases))
        try:
            res = run_case(pipeline, case, output)
        except Exception as e:  # noqa: BLE001 - one failing case must not stop the cohort
            message = str(e) if isinstance(e, SpineautoError) else f"{type(e).__name__}: {e}"
            log.error("%s: %s", case.name, message)
            log.debug("%s", traceback.format_exc())
            result.failed[case.name] = message
            _publish(output, case.name, lambda stage: write_json(stage / f"{case.name}.json", CaseResult(
                case.name, case.source, status="failed", reason=message).to_dict()))
            continue
        if res.status == "failed":
            result.failed[case.name] = str(res.reason)
        else:
            getattr(result, res.status).append(case.name)
    if progress:
        progress("", len(cases), len(cases))
    result.report = build_report(output)
    return result


def run_case(pipeline: Pipeline, case: InputCase, output: Path) -> CaseResult:
    """One case, written to ``output/<case>/`` only when every file of it is written."""
    from spineauto.pipeline.overlays import sagittal_left_out, write_overlays

    data, affine = case.read()
    scan = ScanInput(case.name, data, affine, case.source, header=pipeline.header_of(case, affine, data.shape))
    res = pipeline.run(scan)

    def write(stage: Path) -> None:
        masks = {}
        for name, mask in (("cord", res.cord), ("lesion", res.lesion)):
            if mask is not None:
                masks[name] = case.write_mask(stage / f"{case.name}_{name}{case.mask_ending}", mask).name  # the input's format
        images = write_overlays(data[0], affine, res.cord, res.lesion, stage, case.name)
        left_out = sagittal_left_out(affine, data.shape[1:])
        write_json(stage / f"{case.name}.json", res.to_dict(masks, images, {"sagittal": left_out} if left_out else None))
    _publish(output, case.name, write)
    return res


def _publish(output: Path, case: str, write: Callable[[Path], None]) -> Path:
    """Fill a temporary folder beside ``output/<case>``, then swap it in whole."""
    stage = Path(tempfile.mkdtemp(prefix=f".{case}.", suffix=".partial", dir=output))
    stage.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700: colleagues could not open what the report links
    final = output / case
    try:
        write(stage)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{case}.", suffix=".old", dir=output))
            final.rename(old / case)
            stage.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            stage.rename(final)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return final


def summary_line(result: CohortResult, output: Path) -> str:
    total = len(result.done) + len(result.check) + len(result.stopped) + len(result.failed)
    return (f"{total} case(s): {len(result.done)} done, {len(result.check)} to check (quality flags), "
            f"{len(result.stopped)} stopped by a gate, {len(result.failed)} failed; "
            f"report {result.report or Path(output) / 'report.html'}")

