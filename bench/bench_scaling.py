"""Benchmark: how spineauto's cost grows with the size of a dataset, of a volume, and of a patch.

1. **Dataset size**: ``spineauto plan_and_preprocess`` on 10, 100 (and with ``--large`` 1,000) synthetic
   spine phantoms (datasets/phantoms.py: 10-16 slices of about 50-100 x 50-100 voxels each), in a new
   process each time: wall time and peak RSS / RssAnon of the process tree (bench/common.py). Linear
   time means a flat s/case; memory should not grow with the number of cases.
2. **Volume size**: spineauto's predict (``predict_folder``, what ``spineauto predict`` runs after loading
   the model) of one synthetic volume (a bright cord-like tube in noise, at ``--spacing-factor`` x the
   plan's in-plane spacing, default 1: no resampling, and twice that across slices, so the volume is
   cut into its last-axis slices) of each size in ``--volumes`` (default 64^3 up to 128x128x128;
   ``--large`` adds 256x256x200 and 512x512x400), with a model of the phantoms' plan trained for a few
   iterations (speed only), TTA off, in a new process each: wall time of the process (start, model
   load and writing included, so the smallest volumes carry a fixed cost), predict's own time, and
   memory: the process tree's peak RSS (polled) and, exactly, the peak above the loaded model (the
   process's VmHWM, reset through /proc/self/clear_refs once the model is loaded). Linear time means
   a flat µs per voxel; memory bounded by chunking means a peak above the model that grows only by
   what a case must hold (its input and its output mask, a few bytes per voxel).
3. **Patch size**: one training step (forward, Dice + CE with deep supervision, backward, SGD step) of
   the phantoms' planned U-Net for square patches of ``--patches`` pixels, batch ``--batch``, in this
   process: median of ``--repeats`` steps after a warm-up. The network is the same for every patch
   (the planner would add stages for larger ones), so linear time means a flat µs per pixel.

A table per part is printed (Markdown, for the README) and a plot of the three curves written (PNG).

    nice -n 15 .venv/bin/python bench/bench_scaling.py                       # about 10 minutes on 2 CPU cores
    nice -n 15 .venv/bin/python bench/bench_scaling.py --large               # adds 1,000 cases and 512x512x400
    .venv/bin/python bench/bench_scaling.py --quick --workdir /tmp/s         # script check, 1-2 minutes
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import VENV_BIN, check_run, command_line, format_table, run_measured  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL_DATASET_ID = 950


def _env(work: Path) -> dict[str, str]:
    env = dict(os.environ, SPINEAUTO_RAW=str(work / "raw"), SPINEAUTO_PREPROCESSED=str(work / "preprocessed"),
               SPINEAUTO_RESULTS=str(work / "results"), WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _spineauto(*args: str) -> list[str]:
    return [str(VENV_BIN / "python"), "-m", "spineauto", *args]


# -- 1. dataset size -------------------------------------------------------------------------------

def bench_dataset_sizes(work: Path, sizes: list[int], workers: int) -> list[dict]:
    from spineauto.datasets.phantoms import write_phantom_dataset

    rows = []
    for i, n in enumerate(sizes):
        dataset_id = 960 + i
        folder = work / "raw" / f"Dataset{dataset_id:03d}_Scale{n}"
        t0 = time.perf_counter()
        write_phantom_dataset(folder, n_train=n, n_test=0, seed=n)
        made = time.perf_counter() - t0
        voxels = sum(int(np.prod(_shape(p))) for p in (folder / "imagesTr").glob("*.nii.gz"))
        run = run_measured(_spineauto("plan_and_preprocess", "-d", str(dataset_id), "-np", str(workers)), env=_env(work))
        check_run(run, f"plan_and_preprocess of {n} cases")
        rows.append({"cases": n, "voxels": voxels, "wall_s": run.wall_s, "s_per_case": run.wall_s / n,
                     "peak_rss_mb": run.peak_rss_mb, "peak_anon_mb": run.peak_anon_mb, "write_s": made})
        shutil.rmtree(work / "preprocessed" / folder.name, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        print(f"plan_and_preprocess {n} cases: {run.wall_s:.1f} s, peak RSS {run.peak_rss_mb:.0f} MB", flush=True)
    return rows


def _shape(path: Path) -> tuple[int, ...]:
    import nibabel as nib

    return tuple(nib.load(str(path)).shape)


# -- 2. volume size --------------------------------------------------------------------------------

def train_model(work: Path, workers: int, iters: int) -> Path:
    """Phantoms planned as spineauto plans them, trained ``iters`` iterations (speed only); the model folder."""
    from spineauto.datasets.phantoms import write_phantom_dataset

    folder = work / "raw" / f"Dataset{MODEL_DATASET_ID:03d}_ScaleModel"
    write_phantom_dataset(folder, n_train=8, n_test=0, seed=0)
    env = _env(work)
    check_run(run_measured(_spineauto("plan_and_preprocess", "-d", str(MODEL_DATASET_ID), "-np", str(workers)), env=env), "plan")
    check_run(run_measured(_spineauto("train", "-d", str(MODEL_DATASET_ID), "-f", "all", "--device", "cpu", "--epochs", "1",
                                      "--iters-per-epoch", str(iters), "--val-iters", "1", "--no-validate", "--wandb", "disabled"),
                           env=env), "train")
    return work / "results" / folder.name / "spineautoTrainer__spineautoPlans__2d"


def write_volume(path: Path, shape: tuple[int, int, int], spacing: float, seed: int = 0) -> None:
    """A tube brighter than its noisy surroundings along the last axis, at ``spacing`` in-plane and twice across slices."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    x, y, z = shape
    img = rng.normal(100.0, 10.0, size=shape).astype(np.float32)
    yy, xx = np.mgrid[:x, :y]
    tube = (xx - y / 2) ** 2 + (yy - x / 2) ** 2 < (min(x, y) / 10) ** 2
    img[tube] += 150.0
    affine = np.diag([spacing, spacing, 2 * spacing, 1.0])
    nib.save(nib.Nifti1Image(img, affine), str(path))


def _status_mb(key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def predict_one(model_dir: Path, src: Path, out: Path) -> None:
    """In a process of its own: load the model, reset the peak RSS, predict ``src``; print what it cost as JSON."""
    import torch

    from spineauto.inference.model import load_model
    from spineauto.inference.predict import predict_folder

    model = load_model(model_dir, ["all"], "final", torch.device("cpu"))
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    loaded = _status_mb("VmRSS")
    t0 = time.perf_counter()
    predict_folder(model, src, out, tta=False)
    print("PREDICT_ONE " + json.dumps({"case_s": time.perf_counter() - t0, "model_loaded_mb": loaded,
                                       "peak_above_model_mb": _status_mb("VmHWM") - loaded}), flush=True)


def bench_volumes(work: Path, model: Path, volumes: list[tuple[int, int, int]], spacing_factor: float = 1.0) -> list[dict]:
    plans = json.loads((model / "plans.json").read_text())["configurations"]["2d"]
    spacing = float(plans["target_spacing"][0]) * spacing_factor
    rows = []
    for shape in volumes:
        name = "x".join(map(str, shape))
        src, out = work / "volumes" / name, work / "predicted" / name
        src.mkdir(parents=True, exist_ok=True)
        write_volume(src / f"vol_{name}_0000.nii.gz", shape, spacing)
        run = run_measured([str(VENV_BIN / "python"), __file__, "--predict-one", str(model), str(src), str(out)], env=_env(work))
        check_run(run, f"predict {name}")
        voxels = int(np.prod(shape))
        one = json.loads(run.output.split("PREDICT_ONE ", 1)[1].splitlines()[0])
        rows.append({"shape": name, "voxels": voxels, "wall_s": run.wall_s, **one, "us_per_voxel": one["case_s"] / voxels * 1e6,
                     "peak_rss_mb": run.peak_rss_mb, "peak_anon_mb": run.peak_anon_mb,
                     "input_mb": voxels * 4 / 2**20, "spacing_factor": spacing_factor})
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        print(f"predict {name}: {one['case_s']:.1f} s, {one['peak_above_model_mb']:.0f} MB above the loaded model", flush=True)
    return rows


# -- 3. patch size ---------------------------------------------------------------------------------

def bench_patches(model: Path, patches: list[int], batch: int, repeats: int) -> list[dict]:
    import torch

    from spineauto.networks.build import build_network
    from spineauto.planning.plans import Plans
    from spineauto.training.tasks import SegmentationTask

    plans = Plans.load(model / "plans.json")
    plan = plans.configurations["2d"]
    torch.manual_seed(0)
    net = build_network(plan, len(plans.channel_names), plans.num_classes)
    task = SegmentationTask(plans, plan)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    rows = []
    for p in patches:
        x = torch.randn(batch, len(plans.channel_names), p, p)
        seg = (torch.rand(batch, 1, p, p) > 0.9).float()
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = task.loss(net(x), {"seg": seg})
            loss.backward()
            opt.step()
            if i:  # the first step of a shape is warm-up
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        rows.append({"patch": p, "pixels": p * p, "batch": batch, "step_s": med, "spread_s": [min(times), max(times)],
                     "us_per_pixel": med / (batch * p * p) * 1e6})
        print(f"training step, patch {p}x{p}: {med * 1000:.0f} ms", flush=True)
    return rows


# -- report ----------------------------------------------------------------------------------------

def marginal(xs: list[float], ys: list[float], scale: float = 1.0) -> list[str]:
    """Cost of each step up in size per unit of size: (y_i - y_(i-1)) / (x_i - x_(i-1)); fixed costs (process start,
    imports, model load) cancel out, so a linear cost shows as a constant."""
    return ["-"] + [f"{(b - a) / (xb - xa) * scale:.3g}" for xa, xb, a, b in zip(xs, xs[1:], ys, ys[1:])]


def fit_line(xs: list[float], ys: list[float], unit: str, scale: float = 1.0) -> str:
    """Least-squares y = a + b x over the sizes: the fixed part, the part per unit, and how far the worst
    point is from the line (a cost growing faster than linearly leaves the largest sizes above it)."""
    if len(xs) < 2:
        return ""
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    worst = max(abs(y - (a + b * x)) / y for x, y in zip(xs, ys))
    return f"least-squares line: {a:.3g} s fixed + {b * scale:.3g} s per {unit}; the farthest point is {worst:.0%} off it"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    parts = [("datasets", "cases", "wall_s", "plan_and_preprocess: wall s", "cases"),
             ("volumes", "voxels", "case_s", "predict (TTA off): s per case", "voxels"),
             ("patches", "pixels", "step_s", "training step: s", "patch pixels")]
    for ax, (key, x, y, title, xlabel) in zip(axes, parts):
        rows = result.get(key) or []
        if not rows:
            ax.set_visible(False)
            continue
        xs, ys = [r[x] for r in rows], [r.get(y) or r["wall_s"] for r in rows]
        ax.loglog(xs, ys, "o-", label="measured")
        ax.loglog(xs, [ys[-1] * v / xs[-1] for v in xs], "--", color="grey", label="linear through the largest")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=8)
        if key != "patches":
            ax2 = ax.twinx()
            rss = [r["peak_rss_mb"] for r in rows]
            ax2.semilogx(xs, rss, "s:", color="tab:red")
            ax2.set_ylim(0, max(rss) * 1.3)  # from zero: a flat memory looks flat
            ax2.set_ylabel("peak RSS MB (red)", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def tables(result: dict) -> str:
    out = []
    d = result.get("datasets") or []
    if d:
        extra = marginal([r["cases"] for r in d], [r["wall_s"] for r in d])
        out.append(format_table(["cases", "voxels", "wall s", "s/case", "marginal s/case", "peak RSS MB", "peak anon MB"],
                                [[r["cases"], f"{r['voxels']:.3g}", f"{r['wall_s']:.1f}", f"{r['s_per_case']:.3f}", m,
                                  f"{r['peak_rss_mb']:.0f}", f"{r['peak_anon_mb']:.0f}"] for r, m in zip(d, extra)]))
        out.append(fit_line([r["cases"] for r in d], [r["wall_s"] for r in d], "case"))
    v = result.get("volumes") or []
    if v:
        case = [r.get("case_s") or r["wall_s"] for r in v]
        out.append(format_table(["volume", "voxels", "wall s (process)", "s in predict", "µs/voxel in predict", "peak RSS MB (tree)",
                                 "peak MB above the loaded model", "input float32 MB"],
                                [[r["shape"], f"{r['voxels']:.3g}", f"{r['wall_s']:.1f}", f"{c:.1f}", f"{c / r['voxels'] * 1e6:.1f}",
                                  f"{r['peak_rss_mb']:.0f}", f"{r['peak_above_model_mb']:.0f}" if "peak_above_model_mb" in r else "-",
                                  f"{r['input_mb']:.0f}"] for r, c in zip(v, case)]))
        out.append(fit_line([r["voxels"] for r in v], [r.get("case_s") or r["wall_s"] for r in v], "million voxels", 1e6))
    p = result.get("patches") or []
    if p:
        out.append(format_table(["patch", "batch", "ms/step (median)", "min-max ms", "µs/pixel"],
                                [[f"{r['patch']}x{r['patch']}", r["batch"], f"{r['step_s'] * 1000:.0f}",
                                  f"{r['spread_s'][0] * 1000:.0f}-{r['spread_s'][1] * 1000:.0f}", f"{r['us_per_pixel']:.2f}"] for r in p]))
        out.append(fit_line([r["pixels"] for r in p], [r["step_s"] for r in p], "1000 patch pixels", 1e3))
    return "\n\n".join(out)


def _shape_arg(text: str) -> tuple[int, int, int]:
    parts = [int(x) for x in text.lower().split("x")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or min(parts) < 8:
        raise argparse.ArgumentTypeError(f"{text}: give a volume as N or XxYxZ (each at least 8)")
    return tuple(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, nargs="*", default=None, help="dataset sizes for plan_and_preprocess (default 10 100)")
    ap.add_argument("--volumes", type=_shape_arg, nargs="*", default=None,
                    help="volumes to predict, N or XxYxZ (the last axis is the slice axis; default 64 96x96x64 128x128x64 128x128x128)")
    ap.add_argument("--patches", type=int, nargs="*", default=None, help="square training patch edges (default 32 64 128 256)")
    ap.add_argument("--large", action="store_true", help="also 1,000 cases and 256x256x200 and 512x512x400 volumes")
    ap.add_argument("--quick", action="store_true", help="script check: 4 and 8 cases, 32^3 and 48^3 volumes, patches 32 and 64 (unless given)")
    ap.add_argument("--spacing-factor", type=float, default=1.0,
                    help="volumes at this x the plan's in-plane spacing (not 1: preprocessing resamples them)")
    ap.add_argument("--from-json", type=Path, nargs="+", metavar="JSON",
                    help="measure nothing: print the tables and draw the plot of earlier --json results, a part taken from the last file that has it")
    ap.add_argument("--predict-one", nargs=3, type=Path, metavar=("MODEL", "SRC", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=2, help="training batch for the patch-size part")
    ap.add_argument("--repeats", type=int, default=5, help="timed training steps per patch size")
    ap.add_argument("--train-iters", type=int, default=5, help="training iterations of the model used for prediction")
    ap.add_argument("--workers", type=int, default=2, help="plan_and_preprocess -np")
    ap.add_argument("--workdir", type=Path, help="work folder (default: a temporary one, removed at the end)")
    ap.add_argument("--plot", type=Path, default=Path("bench_scaling.png"), help="PNG to write")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.spacing_factor <= 0:
        ap.error(f"--spacing-factor {args.spacing_factor}: give a positive factor (1: the plan's spacing)")
    if args.predict_one:
        predict_one(*args.predict_one)
        return 0
    if args.from_json:
        result = {}
        for path in args.from_json:
            result.update({k: v for k, v in json.loads(path.read_text()).items() if v or k not in result})
        print(tables(result))
        plot(result, args.plot)
        print(f"plot: {args.plot}")
        return 0
    quick = {"cases": [4, 8], "volumes": [(32, 32, 32), (48, 48, 48)], "patches": [32, 64]}
    full = {"cases": [10, 100], "volumes": [(64, 64, 64), (96, 96, 64), (128, 128, 64), (128, 128, 128)], "patches": [32, 64, 128, 256]}
    for key, value in (quick if args.quick else full).items():  # what the command line leaves out
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.repeats, args.train_iters = min(args.repeats, 2), min(args.train_iters, 2)
    if args.large:
        args.cases = sorted(set(args.cases) | {1000})
        args.volumes = list(dict.fromkeys([*args.volumes, (256, 256, 200), (512, 512, 400)]))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    result: dict = {"command": command_line(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average": os.getloadavg()}
    def save() -> None:  # after every part: a long run stopped half-way keeps what it measured
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=str))

    result["datasets"] = bench_dataset_sizes(work, sorted(args.cases), args.workers) if args.cases else []
    save()
    model = train_model(work, args.workers, args.train_iters) if (args.volumes or args.patches) else None
    result["patches"] = bench_patches(model, sorted(args.patches), args.batch, args.repeats) if args.patches else []
    save()
    result["volumes"] = bench_volumes(work, model, sorted(args.volumes, key=np.prod), args.spacing_factor) if args.volumes else []
    save()
    text = tables(result)
    print("\n" + text + f"\n\ncommand: {result['command']}")
    png = args.plot
    plot(result, png)
    print(f"plot: {png}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
