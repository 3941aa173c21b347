"""Benchmark: is the cord's cross-sectional area (CSA) the same whatever the contrast?

One trained cord model (``-m``, a model folder or bundle) predicts, with ``--save-probabilities`` and
the defaults (TTA, the model's postprocessing):

- *phantoms of one anatomy in several contrasts*: ``--anatomies`` subjects
  (:mod:`spineauto.datasets.phantoms`, alternately cervical and thoracic), each rendered as an axial
  T1w, T2*w and T2w scan on the same grid with the bench's shift (2.5x the field of view: the whole
  neck outline; a strong bias field and 2x noise, as ``bench_generalisation.py``). The phantom's cord
  mask is the cord ellipse sampled at voxel centres, while the image has partial volume (sub-slices
  averaged through the slice, a 0.6-voxel blur in-plane); the table's first lines compare the mask's
  mean CSA with the continuous one (pi x semi-axes), so the reference's own error is known;
- *the real pair on one grid*: ``mt/mt0`` (MT off) and ``mt/mt1`` (MT on), the same cord in two
  contrasts, each against its own manual mask. A model trained on them (the ``full`` scenario) has seen
  them: pass ``--mt-model`` trained without them (``bench_generalisation.py --scenarios loco-MT``);
- *the labels* (``--labels``, no model): the real manual cord masks' mean CSA on the S-I levels each shares
  with ``t2``'s, against ``t2``'s there: one subject, so the differences are the contrasts' outlining habits,
  which a model trained on those masks learns with the cord;
- *probes* (on unless ``--no-probes``): the same anatomies once more, each in a contrast with one tissue's
  intensity changed (PROBES), to tell a contrast's deficit from the CSF's polarity: a T2w whose CSF is
  darker than the cord, a T1w whose CSF is brighter than it.

Per contrast: the mean CSA error against the reference (over the reference's slices) of the mask as
written, of the cord probability thresholded at other values (then the cord component), and of the
soft CSA (sum of the cord probabilities x voxel area, inside the written cord dilated by 2 voxels
in-plane), of an area from the image's own partial volume around the written cord
(:func:`image_partial_volume`); and the inter-contrast coefficient of variation (sample standard deviation / mean of the
contrasts' mean CSA, per subject, then averaged). The Dice of the masks as written closes the output.

    python bench/bench_csa.py -m /tmp/bench-csa/full_seed0/spineauto_plan_seed0/sa_results/Dataset930_SCTReal/spineautoTrainer__spineautoPlans__2d
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generalisation import shift_image, through_axis  # noqa: E402
from common import REAL_CASES, REPO, SHARED_DATA, VENV_BIN, check_run, command_line, format_table, run_measured  # noqa: E402

sys.path.insert(0, str(REPO))
from spineauto.datasets.phantoms import CSF  # noqa: E402
from spineauto.inference.postprocessing import keep_cord_component  # noqa: E402

CONTRASTS = ("T1w", "T2starw", "T2w")
# probe: (contrast, {tissue code: mean intensity}) over the phantom's table (datasets/phantoms.py _INTENSITY)
PROBES = {"T2w_darkCSF": ("T2w", {CSF: 0.10}), "T1w_brightCSF": ("T1w", {CSF: 0.95})}
MT = ("mt0", "mt1")
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
SOFT_MARGIN_VOXELS = 2


# ----------------------------------------------------------------------------------------------- test data

@contextlib.contextmanager
def tissue_table(contrast: str, overrides: dict[int, float]):
    """The phantoms' mean intensities of ``contrast`` with ``overrides`` (tissue code: intensity) while inside."""
    from spineauto.datasets import phantoms

    saved = phantoms._INTENSITY[contrast]
    phantoms._INTENSITY[contrast] = tuple(overrides.get(t, v) for t, v in enumerate(saved))
    try:
        yield
    finally:
        phantoms._INTENSITY[contrast] = saved


def render_subjects(folder: Path, refs: Path, n: int, seed: int, probes: dict | None = None) -> dict[str, dict]:
    """``n`` anatomies x CONTRASTS (and x ``probes``: {name: (contrast, overrides)}), shifted, into ``folder``
    (their masks into ``refs``); {case: {subject, contrast (a probe's name), continuous (mm^2 per slice)}}."""
    from spineauto.datasets.phantoms import PhantomSpec, _sampled_anatomy, render_phantom

    folder.mkdir(parents=True, exist_ok=True)
    refs.mkdir(parents=True, exist_ok=True)
    cases = {}
    looks = {c: (c, {}) for c in CONTRASTS} | dict(probes or {})
    for i in range(n):
        location = ("cervical", "thoracic")[i % 2]
        s = seed * 1000 + i
        for look, (contrast, overrides) in looks.items():
            spec = PhantomSpec(contrast, "axial", location, 0, s, subject_seed=s, fov_scale=2.5)
            with tissue_table(contrast, overrides):
                p = render_phantom(spec)
            img = shift_image(np.asarray(p.image.dataobj, dtype=np.float32), np.random.default_rng([s, 7]))
            name = f"csa{seed}_{i}_{look}"
            nib.save(nib.Nifti1Image(img.astype(np.float32), p.image.affine), str(folder / f"{name}_0000.nii.gz"))
            nib.save(nib.Nifti1Image((np.asarray(p.label.dataobj) > 0).astype(np.uint8), p.image.affine), str(refs / f"{name}.nii.gz"))
            a = _sampled_anatomy(spec)[0]
            cases[name] = {"subject": f"phantom {i}", "contrast": look, "continuous": float(np.pi * a.cord[0] * a.cord[1])}
    return cases


def real_pair(folder: Path, refs: Path) -> dict[str, dict]:
    cases = {}
    for c in MT:
        shutil.copyfile(SHARED_DATA / "mt" / f"{c}.nii.gz", folder / f"{c}_0000.nii.gz")
        shutil.copyfile(SHARED_DATA / "mt" / f"{c}_seg.nii.gz", refs / f"{c}.nii.gz")
        cases[c] = {"subject": "mt", "contrast": c}
    return cases


def predict(model: Path, images: Path, out: Path, reuse: bool, cases) -> None:
    """Predict ``cases`` of ``images`` into ``out`` (with ``reuse``: only those without probabilities there)."""
    if not reuse:
        shutil.rmtree(out, ignore_errors=True)
    todo = [c for c in cases if not (out / f"{c}.npz").is_file()]
    if not todo:
        return
    src = out.parent / f"{out.name}_todo"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    for c in todo:
        (src / f"{c}_0000.nii.gz").symlink_to((images / f"{c}_0000.nii.gz").resolve())
    images = src
    cmd = [str(VENV_BIN / "python"), "-m", "spineauto", "predict", "-d", "1", "-m", str(model), "-f", "all", "-i", str(images),
           "-o", str(out), "--save-probabilities", "--device", "cpu"]
    check_run(run_measured(cmd, timeout_s=3600), f"predict with {model}")


# ------------------------------------------------------------------------------------------------- measures

def slice_area(affine: np.ndarray) -> tuple[int, float]:
    """(through axis, mm^2 of one voxel in the slice plane)."""
    ax = through_axis(affine)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    return ax, float(abs(np.linalg.det(affine[:3, :3])) / zooms[ax])


def mean_csa(values: np.ndarray, ref: np.ndarray, affine: np.ndarray) -> float:
    """Mean CSA (mm^2) of ``values`` (a mask or probabilities) over the slices where ``ref`` has cord."""
    ax, area = slice_area(affine)
    other = tuple(i for i in range(3) if i != ax)
    on = ref.any(axis=other)
    return float(np.asarray(values, dtype=np.float64).sum(axis=other)[on].mean() * area)


def soft_region(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The written cord dilated by SOFT_MARGIN_VOXELS in-plane: where its soft CSA is summed."""
    from scipy import ndimage

    ax = through_axis(affine)
    st = np.zeros((3, 3, 3), bool)
    idx = [slice(None)] * 3
    idx[ax] = 1
    st[tuple(idx)] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_dilation(mask, st, iterations=SOFT_MARGIN_VOXELS) if mask.any() else mask


def image_partial_volume(image: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Cord fractions from the image, per slice: (I - ring) / (cord - ring) clipped to [0, 1] within the mask
    dilated by 3 voxels, where cord is the median inside the eroded mask and ring the median 2-4 voxels
    outside it (CSF around a cord; a classical partial-volume area, tried as a contrast-free boundary)."""
    from scipy import ndimage

    ax = through_axis(affine)
    st = ndimage.generate_binary_structure(2, 1)
    out = np.zeros(mask.shape)
    for k in range(mask.shape[ax]):
        sl = tuple(k if i == ax else slice(None) for i in range(3))
        m, img = mask[sl], image[sl].astype(np.float64)
        if not m.any():
            continue
        inner = ndimage.binary_erosion(m, st)
        inner = inner if inner.any() else m
        ring = ndimage.binary_dilation(m, st, 4) & ~ndimage.binary_dilation(m, st, 2)
        cord, around = np.median(img[inner]), np.median(img[ring])
        frac = np.clip((img - around) / (cord - around), 0, 1) if cord != around else m.astype(float)
        out[sl] = frac * ndimage.binary_dilation(m, st, 3)
    return out


def measure_case(out: Path, images: Path, refs: Path, case: str, extra: tuple[float, ...] = ()) -> dict[str, float]:
    """Mean CSA (mm^2) of the reference and of each measure of one case (``extra``: more thresholds), and the
    Dice of the mask as written."""
    from spineauto.inference.export import read_probabilities

    ref_img = nib.load(str(refs / f"{case}.nii.gz"))
    ref, affine = np.asanyarray(ref_img.dataobj) > 0, ref_img.affine
    written = np.asanyarray(nib.load(str(out / f"{case}.nii.gz")).dataobj) == 1
    probs = read_probabilities(out / f"{case}.npz")[0]
    image = np.asanyarray(nib.load(str(images / f"{case}_0000.nii.gz")).dataobj)
    p = probs[1].reshape(ref.shape)
    res = {"reference": mean_csa(ref, ref, affine), "dice": 2 * float((written & ref).sum()) / max(1, int(written.sum() + ref.sum())),
           "as written": mean_csa(written, ref, affine),
           "soft": mean_csa(p * soft_region(written, affine), ref, affine),
           "image partial volume": mean_csa(image_partial_volume(image, written, affine), ref, affine)}
    for t in sorted(set(THRESHOLDS + tuple(extra))):
        res[f"t={t:g}"] = mean_csa(keep_cord_component((p >= t).astype(np.uint8), 1, affine) > 0, ref, affine)
    return res


def cv(values: list[float]) -> float:
    return statistics.stdev(values) / statistics.mean(values) if len(values) > 1 and statistics.mean(values) else float("nan")


def table(cases: dict[str, dict], csa: dict[str, dict[str, float]], mt: dict[str, dict[str, float]]) -> str:
    measures = [m for m in next(iter(csa.values())) if m not in ("reference", "dice")]
    header = ["measure"] + [f"{c} CSA error %" for c in CONTRASTS] + ["mean abs error %", "inter-contrast CV %",
                                                                      "mt0 error %", "mt1 error %", "mt0/mt1 CV %"]
    rows = []
    for m in measures:
        err = {c: [100 * (csa[k][m] / csa[k]["reference"] - 1) for k in csa if cases[k]["contrast"] == c] for c in CONTRASTS}
        subjects = sorted({cases[k]["subject"] for k in csa})
        cvs = [100 * cv([csa[k][m] for k in csa if cases[k]["subject"] == s and cases[k]["contrast"] in CONTRASTS]) for s in subjects]
        row = [m] + [f"{statistics.mean(err[c]):+.1f}" for c in CONTRASTS]
        row += [f"{statistics.mean(abs(statistics.mean(err[c])) for c in CONTRASTS):.1f}", f"{statistics.mean(cvs):.1f}"]
        if mt and all(m in mt[c] for c in MT):
            row += [f"{100 * (mt[c][m] / mt[c]['reference'] - 1):+.1f}" for c in MT] + [f"{100 * cv([mt[c][m] for c in MT]):.1f}"]
        elif mt:
            row += ["-"] * 3
        rows.append(row)
    return format_table(header[:len(rows[0])], rows)


def probe_table(cases: dict[str, dict], csa: dict[str, dict[str, float]]) -> str:
    """Per probe and its contrast as rendered: the mean CSA error of the mask as written, and its Dice."""
    rows = []
    for name, (contrast, overrides) in PROBES.items():
        for look in (contrast, name):
            keys = [k for k in csa if cases[k]["contrast"] == look]
            if keys:
                err = statistics.mean(100 * (csa[k]["as written"] / csa[k]["reference"] - 1) for k in keys)
                dice = statistics.mean(csa[k]["dice"] for k in keys)
                rows.append([look, ", ".join(f"tissue {t}: {v:g}" for t, v in overrides.items()) if look == name else "as rendered",
                             f"{err:+.1f}", f"{dice:.3f}"])
    return format_table(["phantoms", "intensities changed", "CSA error % (as written)", "Dice"], rows)


def reference_lines(cases: dict[str, dict], csa: dict[str, dict[str, float]]) -> str:
    """How the phantom's voxel mask compares with the continuous cord ellipse."""
    e = [100 * (csa[k]["reference"] / cases[k]["continuous"] - 1) for k in csa]
    return (f"phantom reference: voxel-centre mask vs continuous ellipse (pi a b): mean {statistics.mean(e):+.1f} %, "
            f"range {min(e):+.1f} .. {max(e):+.1f} % over {len(e)} cases; mean CSA {statistics.mean(c['reference'] for c in csa.values()):.1f} mm²")


def label_conventions(reference: str = "t2") -> str:
    """The training labels themselves: each real manual cord mask's mean CSA on the world levels (S-I) it shares
    with ``reference``'s mask, against ``reference``'s there. One subject, one session: the same cord, so what
    differs is how each contrast was outlined (a model that learns its labels learns that too)."""
    def profile(case: str) -> tuple[np.ndarray, np.ndarray]:
        img = nib.load(str(SHARED_DATA / REAL_CASES[case][1]))
        mask, affine = np.asanyarray(img.dataobj) > 0, img.affine
        ax = int(np.argmax(np.abs(affine[2, :3])))  # the voxel axis nearest to S-I
        other = tuple(i for i in range(3) if i != ax)
        area = mask.sum(axis=other) * float(np.prod(np.linalg.norm(affine[:3, :3], axis=0)[list(other)]))
        z = affine[2, ax] * np.arange(mask.shape[ax]) + affine[2, 3]  # world S of each level through the volume's corner
        return z[area > 0], area[area > 0]

    zr, ar = profile(reference)
    rows = []
    for case in REAL_CASES:
        z, a = profile(case)
        lo, hi = max(z.min(), zr.min()), min(z.max(), zr.max())
        if case == reference or lo >= hi:
            continue
        mine, ref = a[(z >= lo) & (z <= hi)].mean(), ar[(zr >= lo) & (zr <= hi)].mean()
        rows.append([case, f"{lo:.0f} .. {hi:.0f}", f"{mine:.1f}", f"{ref:.1f}", f"{100 * (mine / ref - 1):+.1f} %"])
    return format_table(["manual mask", "shared S-I range (mm)", "its mean CSA mm²", f"{reference}'s there", "difference"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path, help="cord model folder (or bundle) predicting the phantoms")
    ap.add_argument("--labels", action="store_true", help="only the training labels' own CSA per contrast on shared levels (no model)")
    ap.add_argument("--mt-model", type=Path, help="model for mt0/mt1 (default: --model; it should not have trained on them)")
    ap.add_argument("--anatomies", type=int, default=4, help="phantom subjects, each in 3 contrasts")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_csa"))
    ap.add_argument("--reuse", action="store_true", help="keep predictions already in --work")
    ap.add_argument("--thresholds", type=float, nargs="*", default=(), help="more thresholds to report")
    ap.add_argument("--no-probes", dest="probes", action="store_false", help="leave out the probes (PROBES: one tissue's intensity changed)")
    args = ap.parse_args()
    if args.labels:
        print(f"\n{command_line()}\n\nthe real manual masks against t2's on the levels they share (one subject):")
        print(label_conventions())
        return
    if args.model is None:
        ap.error("-m/--model is required (or --labels)")
    images, refs = args.work / "images", args.work / "refs"
    if not args.reuse:
        shutil.rmtree(images, ignore_errors=True)
    cases = render_subjects(images, refs, args.anatomies, args.seed, PROBES if args.probes else None)
    predict(args.model, images, args.work / "pred", args.reuse, cases)
    csa = {k: measure_case(args.work / "pred", images, refs, k, args.thresholds) for k in cases}
    mt = {}
    if SHARED_DATA.is_dir():
        mt_images = args.work / "mt_images"
        mt_images.mkdir(parents=True, exist_ok=True)
        real_pair(mt_images, refs)
        predict(args.mt_model or args.model, mt_images, args.work / "mt_pred", args.reuse, MT)
        mt = {k: measure_case(args.work / "mt_pred", mt_images, refs, k, args.thresholds) for k in MT}
    print(f"\n{command_line()}\n")
    print(reference_lines(cases, csa))
    if mt:
        print("mt reference: " + ", ".join(f"{k} {mt[k]['reference']:.1f} mm²" for k in MT)
              + f" (manual masks; CV {100 * cv([mt[k]['reference'] for k in MT]):.1f} %)")
    print(table(cases, csa, mt))
    if args.probes:
        print("\nprobes: the same anatomies with one tissue's intensity changed (is the deficit the contrast's or the CSF's?)")
        print(probe_table(cases, csa))
    dice = [f"{c} {statistics.mean(csa[k]['dice'] for k in csa if cases[k]['contrast'] == c):.3f}" for c in CONTRASTS]
    print("Dice of the masks as written: " + ", ".join(dice + [f"{k} {mt[k]['dice']:.3f}" for k in mt]))


if __name__ == "__main__":
    main()
