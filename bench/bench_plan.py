"""Benchmark: `spineauto plan_and_preprocess` against `nnUNetv2_plan_and_preprocess -c 2d`.

Same real cases (shared/data: t2, t1w, t2s, mt1, mt0, t2_fake_lesion with their cord masks), laid out
once as an nnU-Net v2 raw dataset that both tools read unchanged; same machine, same run, same
number of worker processes. Each tool runs as a subprocess through its CLI, cold (new process,
fresh output folders), ``--repeats`` times, alternating tools. Wall time is the median over repeats,
peak memory the largest over repeats of the process tree's summed RSS and RssAnon (bench/common.py).
spineauto runs with its default integrity check on; nnU-Net without --verify_dataset_integrity
(its default).

Second part, the 2D slicing rule: for each case, the anatomical plane of each tool's 2D slices and
their in-plane spacing as acquired (before resampling), read from the tools' own outputs:
nnU-Net's plans (``transpose_forward``, one for the whole dataset) with the image read through
SimpleITK as nnU-Net reads it, and spineauto's per-case ``<case>.json`` props. nnU-Net's reading is
verified against its preprocessed arrays (shape before cropping, shape after resampling). Unless
``--quick``, the slicing part is repeated on a "mixed storage" copy of the dataset, where the two MT
scans are stored with their 17 mm axis first (same voxels, same physical image, another legal axis
order, as happens when sites or converters differ).

    .venv/bin/python bench/bench_plan.py [--repeats 3] [--workers 2] [--quick] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REAL_CASES, REPO, VENV_BIN, Run, Summary, command_line, format_table, run_measured, write_real_dataset  # noqa: E402

DATASET_ID = 901
DATASET = f"Dataset{DATASET_ID:03d}_SCTReal"
PLANE_OF_AXIS = {0: "sagittal", 1: "coronal", 2: "axial"}  # physical axis (RAS or LPS index) normal to the plane
ANISOTROPY_RATIO = 1.5  # a spacing this many times the next largest is a through-plane (slice) axis
MIXED_STORAGE = {"mt0": (2, 0, 1), "mt1": (2, 0, 1)}  # case -> stored axis order for the mixed-storage copy


def executable(name: str) -> str:
    found = shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)
    if not found:
        raise SystemExit(f"{name}: not found beside {sys.executable} nor on PATH; install the project into this venv")
    return found


def tool_commands(workers: int) -> dict[str, list[str]]:
    n = str(workers)
    return {
        "spineauto": [executable("spineauto"), "plan_and_preprocess", "-d", str(DATASET_ID), "-np", n],
        "nnU-Net v2": [executable("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d", "-np", n, "-npfp", n],
    }


def tool_env(raw: Path, out: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(SPINEAUTO_RAW=str(raw), SPINEAUTO_PREPROCESSED=str(out / "preprocessed"), SPINEAUTO_RESULTS=str(out / "results"),
               nnUNet_raw=str(raw), nnUNet_preprocessed=str(out / "preprocessed"), nnUNet_results=str(out / "results"))
    return env


# ---------------------------------------------------------------------------------------------- slicing


@dataclass
class Slicing:
    plane: str
    slice_mm: float  # spacing between the 2D slices
    in_plane_mm: tuple[float, float]  # as acquired, before in-plane resampling
    stored_px: tuple[int, int]  # in-plane size of the stored (preprocessed) slices

    @property
    def anisotropy(self) -> float:
        return max(self.in_plane_mm) / min(self.in_plane_mm)

    @property
    def contains_through_plane(self) -> bool:
        """The slices' in-plane axes include the acquisition's coarse (through-plane) axis."""
        return max(self.in_plane_mm) >= ANISOTROPY_RATIO * max(min(self.in_plane_mm), self.slice_mm)


def _sitk_geometry(image: Path) -> tuple[list[int], list[float], np.ndarray]:
    """(shape, spacing) in nnU-Net's array order (z, y, x: SimpleITK's reversed) and the LPS direction matrix."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(image))
    reader.ReadImageInformation()
    return list(reader.GetSize())[::-1], list(reader.GetSpacing())[::-1], np.array(reader.GetDirection()).reshape(3, 3)


def nnunet_slicing(image: Path, transpose_forward: list[int], stored_px: tuple[int, int] = (0, 0)) -> tuple[Slicing, list[int]]:
    """nnU-Net 2D: array (z, y, x) transposed by ``transpose_forward``, slices cut along axis 0.

    Returns the slicing and the transposed shape (what nnU-Net records as shape_before_cropping).
    """
    shape, spacing, direction = _sitk_geometry(image)
    tf = [int(a) for a in transpose_forward]
    normal = direction[:, 2 - tf[0]]  # array axis a is SimpleITK index axis 2 - a; its direction is that column
    plane = PLANE_OF_AXIS[int(np.argmax(np.abs(normal)))]
    sl = Slicing(plane, spacing[tf[0]], (spacing[tf[1]], spacing[tf[2]]), stored_px)
    return sl, [shape[a] for a in tf]


def spineauto_slicing(props: dict, stored_px: tuple[int, int] = (0, 0)) -> Slicing:
    sp = props["spacing"]  # (slice, row, column) in the slice-first RAS layout, mm
    return Slicing(PLANE_OF_AXIS[int(props["geometry"]["slice_axis"])], sp[0], (sp[1], sp[2]), stored_px)


def _nnunet_array_shape(folder: Path, case: str) -> list[int] | None:
    if (folder / f"{case}.b2nd").is_file():
        import blosc2

        return list(blosc2.open(str(folder / f"{case}.b2nd"), mode="r").shape)
    if (folder / f"{case}.npz").is_file():
        return list(np.load(folder / f"{case}.npz")["data"].shape)
    if (folder / f"{case}.npy").is_file():
        return list(np.load(folder / f"{case}.npy", mmap_mode="r").shape)
    return None


def check_nnunet_reading(nn_pre: Path, case: str, transposed: list[int], spacing_t: list[float], target: list[float]) -> str:
    """'' when nnU-Net's stored case agrees with the predicted transpose, else what disagrees."""
    folder = nn_pre / "nnUNetPlans_2d"
    with open(folder / f"{case}.pkl", "rb") as f:
        props = pickle.load(f)
    if list(props["shape_before_cropping"]) != transposed:
        return f"{case}: predicted transposed shape {transposed}, nnU-Net stored {list(props['shape_before_cropping'])}"
    cropped = list(props["shape_after_cropping_and_before_resampling"])
    expected = [cropped[0]] + [int(round(n * s / t)) for n, s, t in zip(cropped[1:], spacing_t[1:], target)]
    stored = _nnunet_array_shape(folder, case)
    if stored is None or stored[1:] != expected:
        return f"{case}: predicted preprocessed shape {expected}, nnU-Net stored {stored and stored[1:]}"
    return ""


@dataclass
class SlicingReport:
    transpose_forward: list[int]
    rows: list[list[str]]
    nnunet_through: int  # cases whose nnU-Net 2D slices contain the through-plane axis
    ours_through: int
    problems: list[str]  # disagreements between the predicted and the stored nnU-Net arrays


def slicing_report(raw_dataset: Path, nn_pre: Path, sa_pre: Path, nn_plans: dict | None = None) -> SlicingReport:
    """Per case: the plane and in-plane spacing of spineauto's and nnU-Net's 2D slices.

    ``nn_pre`` is nnU-Net's preprocessed dataset folder (plans are read from it unless ``nn_plans``
    is given; its stored arrays, when present, verify the reading); ``sa_pre`` is spineauto's.
    """
    if nn_plans is None:
        nn_plans = json.loads((nn_pre / "nnUNetPlans.json").read_text())
    tf = [int(a) for a in nn_plans["transpose_forward"]]
    target = nn_plans["configurations"]["2d"]["spacing"]
    nn_arrays = nn_pre / "nnUNetPlans_2d"
    report = SlicingReport(tf, [], 0, 0, [])
    if not nn_arrays.is_dir():
        report.problems.append(f"{nn_arrays}: no preprocessed arrays to verify the reading against")
    for image in sorted((raw_dataset / "imagesTr").glob("*_0000.nii.gz")):
        case = image.name[: -len("_0000.nii.gz")]
        props = json.loads((sa_pre / "2d" / f"{case}.json").read_text())
        ours = spineauto_slicing(props, tuple(props["shape"][1:]))
        theirs, transposed = nnunet_slicing(image, tf)
        if nn_arrays.is_dir():
            _, spacing, _ = _sitk_geometry(image)
            problem = check_nnunet_reading(nn_pre, case, transposed, [spacing[a] for a in tf], target)
            if problem:
                report.problems.append(problem)
            stored = _nnunet_array_shape(nn_arrays, case)
            theirs.stored_px = tuple(stored[2:]) if stored else (0, 0)
        report.nnunet_through += theirs.contains_through_plane
        report.ours_through += ours.contains_through_plane
        report.rows.append([case] + _cells(ours) + _cells(theirs) + ["yes" if theirs.contains_through_plane else "no"])
    return report


def _cells(s: Slicing) -> list[str]:
    a, b = s.in_plane_mm
    return [s.plane, f"{a:.3g} x {b:.3g}", f"{s.anisotropy:.1f}", f"{s.stored_px[0]}x{s.stored_px[1]}"]


SLICING_HEADER = ["case", "ours: plane", "ours: in-plane mm", "ours: aniso", "ours: slice px",
                  "nnU-Net: plane", "nnU-Net: in-plane mm", "nnU-Net: aniso", "nnU-Net: slice px",
                  "nnU-Net slice holds through-plane axis"]


# ---------------------------------------------------------------------------------------------- runs


def run_tools(raw: Path, work: Path, label: str, commands: dict[str, list[str]], repeats: int) -> tuple[dict[str, Summary], dict[str, Path]]:
    summaries = {tool: Summary(tool) for tool in commands}
    last: dict[str, Path] = {}
    for r in range(repeats):
        order = list(commands) if r % 2 == 0 else list(commands)[::-1]
        for tool in order:
            out = work / f"{label}_{tool.split()[0]}_{r}"
            run: Run = run_measured(commands[tool], env=tool_env(raw, out), cwd=work)
            summaries[tool].runs.append(run)
            last[tool] = out / "preprocessed" / DATASET
            print(f"  [{label} {r + 1}/{repeats}] {tool:<11} {run.wall_s:7.1f} s  peak RSS {run.peak_rss_mb:7.0f} MB  "
                  f"RssAnon {run.peak_anon_mb:7.0f} MB  {run.max_processes} processes  exit {run.returncode}", flush=True)
            if run.returncode != 0:
                print(f"  {tool} failed ({' '.join(run.cmd)}); last output:\n" + run.output[-3000:], flush=True)
    return summaries, last


def timing_table(ours: Summary, theirs: Summary) -> str:
    def row(s: Summary) -> list[str]:
        runs = ", ".join(f"{r.wall_s:.1f}" for r in s.runs)
        return [s.tool, f"{s.wall_s:.1f}", runs, f"{s.peak_rss_mb:.0f}", f"{s.peak_anon_mb:.0f}"]

    ratio = ["ratio ours / nnU-Net", f"{ours.wall_s / theirs.wall_s:.2f}", "",
             f"{ours.peak_rss_mb / theirs.peak_rss_mb:.2f}", f"{ours.peak_anon_mb / theirs.peak_anon_mb:.2f}"]
    return format_table(["tool", "median wall s", "runs s", "peak RSS MB", "peak anon MB"], [row(ours), row(theirs), ratio])


def print_slicing(title: str, raw_dataset: Path, last: dict[str, Path]) -> list[str]:
    rep = slicing_report(raw_dataset, last["nnU-Net v2"], last["spineauto"])
    n = len(rep.rows)
    print(f"\n{title}: nnU-Net transpose_forward {rep.transpose_forward} for the whole dataset (its 2D slices are cut "
          "along axis 0 of the transposed (z, y, x) array); in-plane mm as acquired; aniso = max/min in-plane spacing; "
          "slice px = stored slice size after in-plane resampling")
    print(format_table(SLICING_HEADER, rep.rows))
    print(f"cases whose 2D slices contain the through-plane axis: nnU-Net {rep.nnunet_through}/{n}, spineauto {rep.ours_through}/{n}")
    print("nnU-Net reading verified against its preprocessed arrays (shape before cropping, shape after resampling): "
          + ("yes" if not rep.problems else "NO\n  " + "\n  ".join(rep.problems)))
    return rep.problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per tool (median reported)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes for both tools (-np, and -npfp for nnU-Net)")
    ap.add_argument("--quick", action="store_true", help="1 repeat, no mixed-storage slicing run")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (printed) for inspection")
    args = ap.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    print(f"command: {command_line()}")
    from importlib.metadata import version

    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {platform.node()} {os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"python {platform.python_version()}, nnunetv2 {version('nnunetv2')}, spineauto {rev or '?'}; "
          f"{len(REAL_CASES)} real cases; {args.workers} workers; {repeats} repeat(s)")
    work = Path(tempfile.mkdtemp(prefix="bench_plan_"))
    failed = False
    try:
        raw = work / "raw"
        ds = write_real_dataset(raw, DATASET_ID, "SCTReal")
        commands = tool_commands(args.workers)
        summaries, last = run_tools(raw, work, "run", commands, repeats)
        ours, theirs = summaries["spineauto"], summaries["nnU-Net v2"]
        failed = not (ours.ok and theirs.ok)
        print("\nplan_and_preprocess, 2d, same real cases (wall: median over repeats; memory: largest tree peak)")
        print(timing_table(ours, theirs))
        if failed:
            print("a tool failed: see its output above")
            return 1
        problems = print_slicing("2D slicing, data as distributed", ds, last)
        if not args.quick:
            raw2 = work / "raw_mixed"
            ds2 = write_real_dataset(raw2, DATASET_ID, "SCTReal", permute=MIXED_STORAGE)
            print(f"\nmixed storage: {', '.join(f'{c} stored with axes {o}' for c, o in MIXED_STORAGE.items())} (same physical images)")
            summaries2, last2 = run_tools(raw2, work, "mixed", commands, 1)
            if not all(s.ok for s in summaries2.values()):
                return 1
            problems += print_slicing("2D slicing, mixed storage", ds2, last2)
        return 1 if problems else 0
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
