"""The pipeline's cord quality checks on real manual cord masks: do right masks pass, do broken ones fail?

For every image/cord-mask pair of ``../shared/data/sct_testing_data`` (cervical scans): the manual
mask, and the same mask cut to its right-left quarter (the failure of a cord found in the right place
but a quarter filled), measured (``measure_cord``) and checked (``qc.cord_flags``) at the cervical
level and at an unknown level. No model runs: this checks the checks. Run:
``PYTHONPATH=$PWD python bench/bench_qc_masks.py``.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from spineauto.pipeline.measurements import measure_cord
from spineauto.pipeline.qc import QcConfig, cord_flags

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sct_testing_data"
MASKS = ("t2/t2_seg-manual", "t1/t1w_seg-manual", "t2s/t2s_seg", "mt/mt1_seg", "mt/mt0_seg", "t2/t2_fake_lesion_sc_seg")


def quarter(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The cord voxels in the right-left quarter of its extent with the lowest voxel index."""
    rl = int(np.argmax(np.abs(affine[0, :3])))
    idx = np.argwhere(mask)[:, rl]
    return mask & (np.indices(mask.shape)[rl] < idx.min() + (idx.max() - idx.min() + 1) / 4)


def main() -> None:
    qc = QcConfig()
    print("| mask | CSA median (mm²) | flags (cervical) | flags (level unknown) | quarter: CSA median | quarter: flags (cervical) |")
    print("|---|---|---|---|---|---|")
    for name in MASKS:
        img = nib.load(str(DATA / f"{name}.nii.gz"))
        mask, affine = np.asarray(img.dataobj) > 0, img.affine
        whole, cut = measure_cord(mask, affine), quarter(mask, affine)
        part = measure_cord(cut, affine)
        codes = [" ".join(f["code"] for f in cord_flags(qc, m, affine, meas, level)) or "none"
                 for m, meas, level in ((mask, whole, "cervical"), (mask, whole, None), (cut, part, "cervical"))]
        print(f"| {name} | {whole['csa_mm2']['median']:.1f} | {codes[0]} | {codes[1]} | {part['csa_mm2']['median']:.1f} | {codes[2]} |")


if __name__ == "__main__":
    main()
