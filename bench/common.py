"""Shared helpers for the benchmarks in bench/: real data as a raw dataset, timing and peak memory of a
subprocess tree, and a plain-text table.

Memory is measured without psutil (not a dependency): while the command runs, every
``POLL_S`` seconds we walk /proc for the whole process tree (the child and all its descendants,
found through /proc/<pid>/task/*/children) and sum, over the processes alive at that instant,
VmRSS and RssAnon from /proc/<pid>/status; the peaks are the largest such sums seen. The RSS sum
counts pages shared between processes (shared libraries: torch alone is several hundred MB per
process) once per process, so it overstates what a tree of worker processes really occupies;
the RssAnon sum (memory the processes allocated themselves, without file-backed pages) shows how
much of it is the tools' own data. PSS (/proc/<pid>/smaps_rollup) would be exact but costs ~10 ms
per process per read, which would load a small machine while it is being measured. Processes
that live less than one poll interval can be missed.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "sct_testing_data"
VENV_BIN = Path(sys.executable).parent
POLL_S = 0.05

# case -> (image, cord mask), relative to SHARED_DATA (see shared/data/README.md)
REAL_CASES: dict[str, tuple[str, str]] = {
    "t2": ("t2/t2.nii.gz", "t2/t2_seg-manual.nii.gz"),
    "t1w": ("t1/t1w.nii.gz", "t1/t1w_seg-manual.nii.gz"),
    "t2s": ("t2s/t2s.nii.gz", "t2s/t2s_seg.nii.gz"),
    "mt1": ("mt/mt1.nii.gz", "mt/mt1_seg.nii.gz"),
    "mt0": ("mt/mt0.nii.gz", "mt/mt0_seg.nii.gz"),
    "t2_fake_lesion": ("t2/t2_fake_lesion.nii.gz", "t2/t2_fake_lesion_sc_seg.nii.gz"),
}


def write_real_dataset(raw_root: Path, dataset_id: int = 901, name: str = "SCTReal", data: Path = SHARED_DATA,
                       cases: Sequence[str] | None = None, permute: dict[str, Sequence[int]] | None = None) -> Path:
    """Copy the real image/cord-mask pairs into ``raw_root/DatasetXXX_Name`` (nnU-Net v2 raw layout).

    Labels are background/cord; one channel named MRI. ``permute`` stores the named cases (image
    and mask alike) with their array axes in another order, the affine permuted to match: the
    same physical image in another legal storage order. Raises FileNotFoundError naming the first
    missing file. Returns the dataset folder.
    """
    cases = list(cases or REAL_CASES)
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for case in cases:
        image, mask = (Path(data) / p for p in REAL_CASES[case])
        for src in (image, mask):
            if not src.is_file():
                raise FileNotFoundError(f"{src}: real data missing; see shared/data/README.md")
        for src, dst in ((image, folder / "imagesTr" / f"{case}_0000.nii.gz"), (mask, folder / "labelsTr" / f"{case}.nii.gz")):
            if permute and case in permute:
                write_permuted(src, dst, permute[case])
            else:
                shutil.copyfile(src, dst)
    meta = {"name": name, "channel_names": {"0": "MRI"}, "labels": {"background": 0, "cord": 1},
            "numTraining": len(cases), "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    return folder


def write_permuted(src: Path, dst: Path, order: Sequence[int]) -> None:
    """Store the NIfTI ``src`` with its voxel axes in ``order`` (no resampling; the affine follows)."""
    import nibabel as nib
    import numpy as np

    img = nib.load(str(src))
    order = [int(a) for a in order]
    affine = img.affine.copy()
    affine[:, :3] = img.affine[:, order]
    data = np.transpose(np.asanyarray(img.dataobj), order)
    out = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    nib.save(out, str(dst))


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += _children(p)
    return tree


def _status_kb(pid: int, keys: Sequence[str]) -> list[int]:
    """Values (kB) of ``keys`` in /proc/<pid>/status; 0 for a process that is gone."""
    values = dict.fromkeys(keys, 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0] + ":"
                if key in values:
                    values[key] = int(line.split()[1])
    except OSError:
        pass
    return [values[k] for k in keys]


@dataclass
class Run:
    cmd: list[str]
    returncode: int
    wall_s: float
    peak_rss_mb: float
    peak_anon_mb: float
    max_processes: int
    output: str = ""


def run_measured(cmd: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None,
                 timeout_s: float = 3600.0) -> Run:
    """Run ``cmd``; wall time and peak tree RSS / RssAnon (see the module docstring). Output is captured."""
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        peak_rss = peak_anon = 0
        most = 0
        while proc.poll() is None:
            tree = process_tree(proc.pid)
            most = max(most, len(tree))
            status = [_status_kb(p, ("VmRSS:", "RssAnon:")) for p in tree]
            peak_rss = max(peak_rss, sum(s[0] for s in status))
            peak_anon = max(peak_anon, sum(s[1] for s in status))
            if time.perf_counter() - t0 > timeout_s:
                proc.kill()
            time.sleep(POLL_S)
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read().decode(errors="replace")
    return Run(list(cmd), proc.returncode, wall, peak_rss / 1024, peak_anon / 1024, most, text)


@dataclass
class Summary:
    tool: str
    runs: list[Run] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.returncode == 0 for r in self.runs)

    @property
    def wall_s(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def peak_rss_mb(self) -> float:
        return max(r.peak_rss_mb for r in self.runs)

    @property
    def peak_anon_mb(self) -> float:
        return max(r.peak_anon_mb for r in self.runs)


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Markdown table of preformatted cells (pastes into a README as is)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def command_line() -> str:
    """The command that started this process, as one would type it from the repository root."""
    try:
        script = str(Path(sys.argv[0]).resolve().relative_to(Path.cwd()))
    except ValueError:
        script = sys.argv[0]
    return shlex.join(["python", script, *sys.argv[1:]])
