"""Memory that preprocessing a case will need, from its fingerprint and its plan, checked before any
case is preprocessed: a voxel spacing far from the dataset's (a wrong header) resamples to an array
that no machine holds, and is refused naming the case instead of ending in the kernel's OOM killer.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from spineauto.errors import SpineautoError
from spineauto.parallel import human_bytes, machine_memory
from spineauto.planning.fingerprint import CaseFingerprint, Fingerprint
from spineauto.planning.plans import ConfigurationPlan, Plans

log = logging.getLogger(__name__)

# Copies of the arrays alive at once while one case is preprocessed (float32): the read (file dtype,
# float32, stacked channels), the reoriented and cropped copies, the resampled image and the
# resampling's own buffers, and the label map. Rough on purpose: it catches errors of orders of magnitude.
INPUT_COPIES = 3
OUTPUT_COPIES = 3


@dataclass
class CaseMemory:
    case: str
    data_identifier: str
    resampled_shape: list[int]  # (channels, slices, rows, columns) at the target spacing
    bytes: float


def resampled_shape(case: CaseFingerprint, plan: ConfigurationPlan, channels: int) -> list[int]:
    """(C, S, H, W) of the case's preprocessed array: its nonzero crop, slices kept, in-plane at the target spacing."""
    s, h, w = case.cropped_shape
    (sh, sw), (th, tw) = case.layout_spacing[1:], plan.target_spacing
    return [channels, int(s), max(1, int(round(h * sh / th))), max(1, int(round(w * sw / tw)))]


def case_memory(case: CaseFingerprint, plan: ConfigurationPlan, channels: int) -> CaseMemory:
    shape = resampled_shape(case, plan, channels)
    voxels_in = float(np.prod(case.shape, dtype=float)) * channels
    voxels_out = float(np.prod(shape, dtype=float))
    return CaseMemory(case.case, plan.data_identifier, shape, 4.0 * (INPUT_COPIES * voxels_in + OUTPUT_COPIES * voxels_out))


def check_memory(fp: Fingerprint, plans: Plans, workers: int, ram: int | None = None) -> int:
    """Refuse (one line naming the case and the estimate) a case whose preprocessing needs more memory
    than the machine has; returns the number of workers whose cases fit in memory together (<= ``workers``)."""
    ram = machine_memory() if ram is None else ram
    if ram is None:
        return workers
    channels = len(fp.channel_names)
    plans_by_data = {cfg.data_identifier: cfg for cfg in reversed(list(plans.configurations.values()))}
    estimates = [case_memory(c, cfg, channels) for cfg in plans_by_data.values() for c in fp.cases]
    if not estimates:
        return workers
    worst = max(estimates, key=lambda e: e.bytes)
    if worst.bytes > ram:
        over = len({e.case for e in estimates if e.bytes > ram})
        case = next(c for c in fp.cases if c.case == worst.case)
        others = f" ({over - 1} other case(s) too)" if over > 1 else ""
        raise SpineautoError(
            f"{worst.case}: preprocessing would need about {human_bytes(worst.bytes)} of memory, more than this machine's "
            f"{human_bytes(ram)}: at the planned in-plane spacing {_mm(plans_by_data[worst.data_identifier].target_spacing)} mm its "
            f"voxels of {_mm(case.spacing)} mm and shape {'x'.join(map(str, case.shape))} resample to "
            f"{'x'.join(map(str, worst.resampled_shape))}{others}; check the voxel spacing in its header, or exclude the case")
    fit = max(1, int(ram // worst.bytes))
    if fit < workers:
        log.warning("-np %d: %d worker(s) at once fit in this machine's %s (the largest case needs about %s); using %d",
                    workers, fit, human_bytes(ram), human_bytes(worst.bytes), fit)
        return fit
    return workers


def _mm(values) -> str:
    return "x".join(f"{v:.3g}" for v in values)
