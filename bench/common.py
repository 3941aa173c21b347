"""Shared helpers for the benchmarks in bench/: real data as a raw dataset, timing and peak memory of a
subprocess tree (and peak GPU memory), the two tools' commands and environment, nnU-Net's plan matched
to spineauto's, cord Dice, the classification benchmark, and a plain-text table. The bench scripts
import from here only, never from one another.

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
import threading
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


# ---------------------------------------------------------------------------------------------- both tools


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pick_device(device: str) -> str:
    """'cuda' for ``cuda`` or ``auto`` when torch sees a GPU, else 'cpu'."""
    return "cuda" if device in ("cuda", "auto") and has_cuda() else "cpu"


class GpuPeak:
    """Peak used GPU memory (MiB) above the level seen at start, polled with nvidia-smi."""

    def __init__(self):
        self.available = shutil.which("nvidia-smi") is not None
        self.base = self._used() if self.available else 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _used(self) -> int:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return sum(int(x) for x in out.split())
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return 0

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used() - self.base)
            time.sleep(0.2)

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()


def check_run(run: Run, what: str) -> None:
    """Stop the benchmark, with the tail of the output, when ``run`` failed."""
    if run.returncode != 0:
        sys.stderr.write(run.output[-4000:])
        raise SystemExit(f"{what} failed (exit {run.returncode}): {' '.join(map(str, run.cmd))}")


def bench_env(work: Path, device: str, epochs: int, iters: int) -> dict[str, str]:
    """Environment of both tools under ``work`` (one raw folder, each tool its own outputs), nnU-Net's
    trainer nnUNetTrainerBench (bench/nnunet_trainers) with ``epochs`` x ``iters``, W&B off."""
    env = dict(os.environ)
    env.update(SPINEAUTO_RAW=str(work / "raw"), SPINEAUTO_PREPROCESSED=str(work / "sa_preprocessed"),
               SPINEAUTO_RESULTS=str(work / "sa_results"), WANDB_MODE="disabled",
               nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "nn_preprocessed"),
               nnUNet_results=str(work / "nn_results"), nnUNet_extTrainer=str(REPO / "bench" / "nnunet_trainers"),
               BENCH_EPOCHS=str(epochs), BENCH_ITERS=str(iters), BENCH_VAL_ITERS=str(max(1, iters // 10)),
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def plan_commands(dataset_id: int, workers: int) -> list[tuple[str, list[str]]]:
    """(name, command) of each tool's plan_and_preprocess (nnU-Net: 2d only)."""
    return [("spineauto plan_and_preprocess", [str(VENV_BIN / "python"), "-m", "spineauto", "plan_and_preprocess",
                                               "-d", str(dataset_id), "-np", str(workers)]),
            ("nnUNetv2_plan_and_preprocess", [str(VENV_BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "2d",
                                              "-np", str(workers), "-npfp", str(workers)])]


def train_commands(dataset_id: int, device: str, epochs: int, iters: int) -> dict[str, list[str]]:
    """Each tool's 2d training on fold ``all``: ``epochs`` x ``iters`` (nnU-Net's through bench_env), W&B off."""
    return {
        "spineauto": [str(VENV_BIN / "python"), "-m", "spineauto", "train", "-d", str(dataset_id), "-c", "2d", "-f", "all",
                      "--epochs", str(epochs), "--iters-per-epoch", str(iters), "--val-iters", str(max(1, iters // 10)),
                      "--wandb", "disabled", "--device", device],
        "nnunet": [str(VENV_BIN / "nnUNetv2_train"), str(dataset_id), "2d", "all", "-tr", "nnUNetTrainerBench", "-device", device],
    }


def predict_command(tool: str, dataset_id: int, images: Path, out: Path, device: str, tta: bool = True,
                    nnunet_processes: int | None = None) -> list[str]:
    """``tool`` ("spineauto" or "nnunet") predicts ``images`` into ``out`` with its 2d fold ``all`` model."""
    if tool == "spineauto":
        return ([str(VENV_BIN / "python"), "-m", "spineauto", "predict", "-d", str(dataset_id), "-c", "2d", "-f", "all",
                 "-i", str(images), "-o", str(out), "--device", device] + ([] if tta else ["--no-tta"]))
    return ([str(VENV_BIN / "nnUNetv2_predict"), "-d", str(dataset_id), "-c", "2d", "-f", "all", "-tr", "nnUNetTrainerBench",
             "-i", str(images), "-o", str(out), "-device", device] + ([] if tta else ["--disable_tta"])
            + ([] if nnunet_processes is None else ["-npp", str(nnunet_processes), "-nps", str(nnunet_processes)]))


def match_nnunet_plan(sa_plans: Path, nn_plans: Path, batch_size: bool = False) -> dict:
    """Give nnU-Net's 2d configuration spineauto's patch size and U-Net topology (and batch size when
    asked); returns what was set."""
    ours = json.loads(sa_plans.read_text())["configurations"]["2d"]
    net = ours["network"]
    if net["architecture"] != "unet":
        raise SystemExit(f"spineauto planned {net['architecture']}; this benchmark matches the plain U-Net only")
    plans = json.loads(nn_plans.read_text())
    cfg = plans["configurations"]["2d"]
    kw = cfg["architecture"]["arch_kwargs"]
    if not cfg["architecture"]["network_class_name"].endswith("PlainConvUNet"):
        raise SystemExit(f"nnU-Net planned {cfg['architecture']['network_class_name']}; expected PlainConvUNet")
    kw.update(n_stages=len(net["features_per_stage"]), features_per_stage=net["features_per_stage"],
              kernel_sizes=net["kernel_sizes"], strides=net["strides"], n_conv_per_stage=net["n_conv_per_stage"],
              n_conv_per_stage_decoder=net["n_conv_per_stage_decoder"])
    cfg["patch_size"] = list(ours["patch_size"])
    matched = {"patch_size": cfg["patch_size"], "features_per_stage": kw["features_per_stage"], "strides": kw["strides"]}
    if batch_size:
        cfg["batch_size"] = matched["batch_size"] = int(ours["batch_size"])
    nn_plans.write_text(json.dumps(plans, indent=2))
    return matched


def dice_of(pred: Path, labels: Path, cases: list[str]) -> float:
    """Mean cord Dice of the predictions in ``pred`` against ``labels``/<case>.nii.gz over ``cases``."""
    import logging

    from spineauto.evaluation.evaluate import LabelSet, evaluate_folders

    logging.getLogger("spineauto.evaluation.evaluate").setLevel(logging.ERROR)  # predictions of other cases: expected

    with tempfile.TemporaryDirectory() as tmp:
        for c in cases:
            shutil.copy(labels / f"{c}.nii.gz", Path(tmp) / f"{c}.nii.gz")
        s = evaluate_folders(pred, Path(tmp), LabelSet({"cord": 1}, []))
    return float(s["mean"]["cord"]["dice"])


# ---------------------------------------------------------------------------------------------- classification

CLS_DATASET_ID = 902
CLS_NAME = "SCTRealCls"
# case (REAL_CASES) -> (sequence, view)
CLS_CLASSES = {"t2": ("T2w", "sagittal"), "t1w": ("T1w", "sagittal"), "t2s": ("T2starw", "axial"), "mt1": ("MT", "axial"),
               "mt0": ("MT", "axial"), "t2_fake_lesion": ("T2w", "sagittal")}


def write_classification_dataset(raw_root: Path) -> Path:
    folder = write_real_dataset(raw_root, CLS_DATASET_ID, CLS_NAME, cases=list(CLS_CLASSES))
    meta = json.loads((folder / "dataset.json").read_text())
    meta["heads"] = {"sequence": ["T1w", "T2w", "T2starw", "MT"], "view": ["axial", "sagittal"]}
    meta["cases"] = {c: {"subject": c, "classes": {"sequence": s, "view": v}} for c, (s, v) in CLS_CLASSES.items()}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    return folder


def bench_classification(workdir: Path, configurations=("cls",), epochs: int = 3, iters: int = 10, amp: bool = False,
                         threads: int | None = None) -> list[dict]:
    """Plan the real data with heads, train each configuration on CPU; one result dict per configuration."""
    env = dict(os.environ, SPINEAUTO_RAW=str(workdir / "raw"), SPINEAUTO_PREPROCESSED=str(workdir / "preprocessed"),
               SPINEAUTO_RESULTS=str(workdir / "results"), WANDB_MODE="disabled")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    write_classification_dataset(workdir / "raw")
    spineauto = str(VENV_BIN / "spineauto")
    check_run(run_measured([spineauto, "plan_and_preprocess", "-d", str(CLS_DATASET_ID), "-np", "2"], env=env), "plan_and_preprocess")
    plans = json.loads((workdir / "preprocessed" / f"Dataset{CLS_DATASET_ID:03d}_{CLS_NAME}" / "plans.json").read_text())
    results = []
    for cfg in configurations:
        cmd = [spineauto, "train", "-d", str(CLS_DATASET_ID), "-f", "all", "-c", cfg, "--device", "cpu", "--wandb", "disabled",
               "--epochs", str(epochs), "--iters-per-epoch", str(iters), "--val-iters", "2", "--no-validate",
               "--amp" if amp else "--no-amp"]
        run = run_measured(cmd, env=env)
        check_run(run, f"{cfg} training")
        fold = workdir / "results" / f"Dataset{CLS_DATASET_ID:03d}_{CLS_NAME}" / f"spineautoTrainer__spineautoPlans__{cfg}" / "fold_all"
        records = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
        rates = [r["samples_per_s"] for r in records[1:]] or [records[0]["samples_per_s"]]
        p = plans["configurations"][cfg]
        results.append({"configuration": cfg, "architecture": p["network"]["architecture"], "patch_size": p["patch_size"],
                        "batch_size": p["batch_size"], "features": p["network"]["features_per_stage"],
                        "samples_per_s": statistics.median(rates), "peak_rss_mb": run.peak_rss_mb,
                        "peak_anon_mb": run.peak_anon_mb, "wall_s": run.wall_s, "epochs": epochs, "iters": iters, "amp": amp})
    return results


def classification_table(results: list[dict]) -> str:
    rows = [[r["configuration"], r["architecture"], "x".join(map(str, r["patch_size"])), r["batch_size"], f"{r['samples_per_s']:.1f}",
             f"{r['peak_rss_mb']:.0f}", f"{r['peak_anon_mb']:.0f}", f"{r['wall_s']:.0f}"] for r in results]
    return format_table(["configuration", "network", "patch", "batch", "samples/s", "peak RSS MB", "peak anon MB", "wall s"], rows)
