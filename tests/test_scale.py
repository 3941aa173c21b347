"""Speed and scale: the planner's GPU memory target, multi-node training through torchrun's rendezvous
(two launchers on localhost, gloo), cohort sharding of `spineauto predict`, the CPU speed options
(channels-last, torch.compile with its fallback, native-bf16 detection), and the dry runs of
bench/gpu_check.sh and bench/bench_scaling.py.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fold_history, require_real_data, run_cli, tiny_phantom_env
from test_training import tiny_plan
from spineauto.errors import SpineautoError

REPO = Path(__file__).resolve().parents[1]
DATASET = "Dataset001_Ph"
FAST = dict(val_iters=1, wandb="disabled", num_workers=0, validate=False, device="cpu")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    torch.set_num_threads(1)
    yield from tiny_phantom_env(tmp_path_factory.mktemp("scale"), 4, 5, 5)


def _train(root: Path, results: str, **kw) -> Path:
    from spineauto.training.trainer import TrainOptions, train_fold

    args = {**FAST, **kw}
    return train_fold(1, "2d", args.pop("fold", "all"), TrainOptions(results=root / results, **args))


@pytest.fixture(scope="module")
def model(phantoms) -> Path:
    return _train(phantoms, "model", epochs=1, iters_per_epoch=2).parent


# -- planner: the GPU memory target ------------------------------------------------------------------

def test_batch_size_follows_the_gpu_memory_target(phantoms):
    from spineauto.planning.fingerprint import Fingerprint
    from spineauto.planning.planner import GPU_ACTIVATION_FRACTION, MEMORY_BUDGET_GB, estimate_activation_bytes, plan_dataset

    fp = Fingerprint.load(phantoms / "preprocessed" / DATASET / "fingerprint.json")
    fp.cases = fp.cases * 400  # enough training pixels that memory, not the dataset, limits the batch
    cpu = plan_dataset(fp).configurations["2d"]
    assert "no CUDA device visible: the CPU budget" in cpu.reasons["batch_size"]
    per_sample = estimate_activation_bytes(cpu.patch_size, cpu.network.features_per_stage, cpu.network.n_conv_per_stage)
    assert cpu.batch_size == min(64, int(MEMORY_BUDGET_GB * 1024**3 // per_sample))
    sizes = {}
    for gb in (0.5, 1.0, 2.0):
        plan = plan_dataset(fp, gpu_memory_gb=gb).configurations["2d"]
        sizes[gb] = plan.batch_size
        assert plan.batch_size == max(2, min(64, int(gb * GPU_ACTIVATION_FRACTION * 1024**3 // per_sample)))
        assert f"--gpu-memory-gb {gb:g}" in plan.reasons["batch_size"]
    assert sizes[0.5] < sizes[1.0] < sizes[2.0]


def test_gpu_memory_option_on_the_command_line(phantoms, capsys):
    code, _, err = run_cli(capsys, "plan_and_preprocess", "-d", "1", "-np", "1", "--gpu-memory-gb", "-3")
    assert code == 1 and err.count("error:") == 1 and "--gpu-memory-gb -3" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "plan_and_preprocess", "-d", "1", "-np", "1", "--gpu-memory-gb", "0.25")
    assert code == 0, err
    plans = json.loads((phantoms / "preprocessed" / DATASET / "plans.json").read_text())
    assert "--gpu-memory-gb 0.25" in plans["configurations"]["2d"]["reasons"]["batch_size"]
    tiny_plan(phantoms / "preprocessed" / DATASET / "plans.json")  # as the other tests expect it


# -- sharding a cohort ---------------------------------------------------------------------------------

def test_shards_are_disjoint_and_cover_every_case():
    from spineauto.parallel import shard

    cases = [f"case{i:03d}" for i in range(23)]
    for n in (1, 2, 5, 23, 30):
        parts = [shard(cases, n, k) for k in range(n)]
        assert sorted(c for p in parts for c in p) == cases  # union: every case, none twice
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    for n, k in ((0, 0), (3, 3), (3, -1)):
        with pytest.raises(SpineautoError, match="--num-parts|--part-id"):
            shard(cases, n, k)


def test_predict_shards_merge_into_the_whole_cohort(phantoms, model, capsys, tmp_path):
    images = phantoms / "raw" / DATASET / "imagesTs"
    cases = sorted(p.name.replace("_0000", "") for p in images.glob("*_0000.nii.gz"))
    assert len(cases) == 5
    seen = []
    for k in range(3):
        out = tmp_path / f"part{k}"
        code, _, err = run_cli(capsys, "predict", "-d", "1", "-m", model, "-f", "all", "-i", images, "-o", out, "--device", "cpu",
                               "--no-tta", "--num-parts", "3", "--part-id", str(k))
        assert code == 0, err
        seen.append(sorted(p.name for p in out.glob("*.nii.gz")))
    assert [len(s) for s in seen] == [2, 2, 1]
    assert sorted(c for s in seen for c in s) == cases  # no case twice, none missing
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-m", model, "-i", images, "-o", tmp_path / "bad", "--num-parts", "3", "--part-id", "3")
    assert code == 1 and err.count("error:") == 1 and "--part-id 3" in err and not (tmp_path / "bad").exists()


# -- multi-node training: two launchers meet at a rendezvous on localhost ---------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_through_the_rendezvous(phantoms, tmp_path):
    """`spineauto train --nnodes 2 --rdzv-endpoint` run twice (two "nodes" on this machine): one DDP job
    of two processes (gloo), the model written once by global rank 0."""
    endpoint = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", SPINEAUTO_RESULTS=str(tmp_path / "results"))
    cmd = [sys.executable, "-m", "spineauto", "train", "-d", "1", "-f", "all", "--device", "cpu", "--epochs", "2",
           "--iters-per-epoch", "2", "--val-iters", "1", "--num-workers", "0", "--no-validate", "--wandb", "disabled",
           "--nnodes", "2", "--rdzv-endpoint", endpoint, "--rdzv-id", "scale-test"]
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    fold = tmp_path / "results" / DATASET / "spineautoTrainer__spineautoPlans__2d" / "fold_all"
    runtime = json.loads((fold / "config.json").read_text())["runtime"]
    assert runtime["world_size"] == 2 and runtime["ddp_backend"] == "gloo"
    assert [r["epoch"] for r in fold_history(fold)] == [0, 1] and (fold / "checkpoint_final.pt").is_file()


def test_launch_commands():
    from spineauto.training.distributed import strip_launch_options, torchrun_command

    argv = ["train", "-d", "1", "--num-gpus", "2", "--nnodes=3", "--rdzv-endpoint", "h:29500", "-f", "0", "--rdzv-id=7"]
    assert strip_launch_options(argv) == ["train", "-d", "1", "-f", "0"]
    cmd = torchrun_command(1, ["train"], nnodes=3, rdzv_endpoint="node1:29500", rdzv_id="job9")
    assert "--nnodes=3" in cmd and "--rdzv-endpoint=node1:29500" in cmd and "--rdzv-id=job9" in cmd and "--standalone" not in cmd
    assert "--standalone" in torchrun_command(2, ["train"])
    with pytest.raises(SpineautoError, match="--rdzv-endpoint"):
        torchrun_command(1, ["train"], nnodes=2)
    with pytest.raises(SpineautoError, match="use 2 or more"):
        torchrun_command(1, ["train"])


# -- speed options on the CPU ----------------------------------------------------------------------------

def test_native_bf16_detection(tmp_path):
    from spineauto.devices import cpu_native_bf16

    for flags, expected in (("fpu avx2 avx512f", False), ("fpu avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert cpu_native_bf16(str(tmp_path / "cpuinfo")) is expected
    assert cpu_native_bf16(str(tmp_path / "missing")) is False


def test_channels_last_and_compile_fallback_on_cpu(phantoms, monkeypatch):
    fold = _train(phantoms, "channels_last", epochs=1, iters_per_epoch=2, channels_last=True)
    runtime = json.loads((fold / "config.json").read_text())["runtime"]
    assert runtime["channels_last"] is True and runtime["compile"] is False and runtime["ddp_backend"] is None
    assert np.isfinite(fold_history(fold)[0]["train_loss"])

    class Broken(torch.nn.Module):  # a compiled model that fails at its first call, as one without a C++ toolchain does
        def forward(self, *args, **kwargs):
            raise RuntimeError("no C++ compiler found")

    def broken_compile(model, *a, **kw):
        return Broken()

    monkeypatch.setattr(torch, "compile", broken_compile)
    fold = _train(phantoms, "compile_fallback", epochs=2, iters_per_epoch=2, compile=True)
    history = fold_history(fold)
    assert history[0]["compile_s"] >= 0 and "compile_s" not in history[1]
    assert all(np.isfinite(r["train_loss"]) for r in history)


# -- the benchmarks' dry runs ------------------------------------------------------------------------------

def test_gpu_check_dry_run_writes_its_results(tmp_path):
    require_real_data()
    out = tmp_path / "results.md"
    env = dict(os.environ, GPU_CHECK_TRAIN_ARGS="--tp-epochs 2 --iters 2 --budget 0",
               GPU_CHECK_PREDICT_ARGS="--quick --test mt0 --nnunet-processes 1", PYTHON=sys.executable)
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "dry run on the CPU" in text and "card: none (CPU dry run)" in text
    assert text.count("| ok |") == 3
    assert "SKIPPED" in text and "no CUDA device visible" in text  # the CUDA tests skip here, with their reason
    assert "| spineauto |" in text and "| nnunet |" in text and "samples/s:" in text and "time per volume:" in text


def test_bench_scaling_quick_run(tmp_path):
    """bench/bench_scaling.py end to end at toy sizes: a row per size, growth exponents, the plot."""
    out = tmp_path / "scaling.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_scaling.py"), "--quick", "--cases", "3", "6", "--volumes", "24", "32x32x40",
                           "--patches", "32", "48", "--repeats", "2", "--train-iters", "1", "--workers", "1", "--workdir", str(tmp_path / "w"),
                           "--spacing-factor", "1.5",
                           "--plot", str(tmp_path / "scaling.png"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["cases"] for r in result["datasets"]] == [3, 6] and all(r["wall_s"] > 0 and r["peak_rss_mb"] > 0 for r in result["datasets"])
    assert [r["shape"] for r in result["volumes"]] == ["24x24x24", "32x32x40"]
    # predict's own time and its exact peak above the loaded model, on volumes it resamples (1.5 x the plan's spacing)
    assert all(r["case_s"] > 0 and r["peak_above_model_mb"] > 0 and r["model_loaded_mb"] > 100 for r in result["volumes"])
    assert all(r["spacing_factor"] == 1.5 for r in result["volumes"])
    assert [r["patch"] for r in result["patches"]] == [32, 48] and all(r["step_s"] > 0 for r in result["patches"])
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
    assert done.stdout.count("least-squares line:") == 3
