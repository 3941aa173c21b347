"""Probe: would a ring of cerebrospinal fluid around the cord tell it from the false tubes a network marks?

For each large connected component of a predicted mask (the raw network output, e.g.
``bench_cord_choice.py``'s ``choice_raw_tta/t2s_uncropped.nii.gz``), in every axial level it crosses:
the mean image intensity in a ring 1-3 mm outside it (voxels the mask does not mark) minus the mean
inside it, in units of the inside's standard deviation; and the share of the component on the
reference cord. A usable cue would give the cord a contrast of one sign and size on every level
and the false components another.

    .venv/bin/python bench/bench_csf_ring.py ../shared/data/sct_testing_data/t2s/t2s_uncropped.nii.gz \
        W/full_seed0/spineauto_plan_seed0/choice_raw_tta/t2s_uncropped.nii.gz \
        ../shared/data/sct_testing_data/t2s/t2s_seg.nii.gz
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generalisation import carried_mask  # noqa: E402 (puts the repository on the path too)

from spineauto.inference.postprocessing import superior_axis  # noqa: E402

RING_MM = (1.0, 3.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image", type=Path)
    ap.add_argument("prediction", type=Path)
    ap.add_argument("reference", type=Path, help="a cord mask, carried onto the image's grid through the affines")
    ap.add_argument("--components", type=int, default=6, help="the largest this many components")
    args = ap.parse_args()
    import cc3d

    img = nib.load(str(args.image))
    data = np.asarray(img.dataobj, dtype=np.float32)
    pred = np.asarray(nib.load(str(args.prediction)).dataobj) > 0
    ref = carried_mask(args.reference, img)
    axis = superior_axis(img.affine)
    spacing = np.delete(np.linalg.norm(img.affine[:3, :3], axis=0), axis)
    comps = cc3d.connected_components(pred.astype(np.uint8), connectivity=26)
    sizes = np.bincount(comps.ravel())
    sizes[0] = 0
    for c in np.argsort(-sizes)[:args.components]:
        if not sizes[c]:
            break
        comp = comps == c
        contrast = []
        for k in range(data.shape[axis]):
            at = tuple(k if a == axis else slice(None) for a in range(3))
            inside = comp[at]
            if inside.sum() < 5:
                continue
            d = ndimage.distance_transform_edt(~inside, sampling=spacing)
            ring = (d > RING_MM[0]) & (d <= RING_MM[1]) & ~pred[at]
            if ring.sum() >= 5:
                values = data[at][inside]
                contrast.append((data[at][ring].mean() - values.mean()) / max(float(values.std()), 1e-6))
        print(f"component of {sizes[c]} voxels, {(comp & ref).sum() / sizes[c]:.0%} on the cord: ring - inside "
              f"median {np.median(contrast):+.2f}, levels {min(contrast):+.1f} .. {max(contrast):+.1f} ({len(contrast)} levels)"
              if contrast else f"component of {sizes[c]} voxels: no level with a ring")


if __name__ == "__main__":
    main()
