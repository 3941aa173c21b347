"""The CUDA paths: fp16 with grad scaling, bf16, channels-last, torch.compile, NCCL DDP (torchrun with
one process, and with two when two GPUs are visible), pinned host memory and GPU prediction with TTA.

Every test here runs wherever torch sees a CUDA device and is skipped with the reason elsewhere;
``bash bench/gpu_check.sh`` runs them (``pytest -m cuda``) on a GPU machine before its benchmarks.
A few phantoms are planned once for the module and trained with a tiny U-Net, so the whole file
takes about a minute on a GPU (most of it torch.compile's first step).
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import fold_history, run_cli, tiny_phantom_env, torchrun_training

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible: the CUDA paths run where torch sees a GPU "
                                 "(bash bench/gpu_check.sh on a GPU machine)")]
DATASET = "Dataset001_Ph"
FAST = dict(val_iters=1, wandb="disabled", num_workers=0, validate=False, device="cuda")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    yield from tiny_phantom_env(tmp_path_factory.mktemp("cuda"), 6, 2, 3)


def _train(root: Path, results: str, **kw) -> Path:
    from spineauto.training.trainer import TrainOptions, train_fold

    args = {**FAST, **kw}
    fold = args.pop("fold", "all")
    return train_fold(1, "2d", fold, TrainOptions(results=root / results, **args))


@pytest.fixture(scope="module")
def fp16_fold(phantoms) -> Path:
    """The CUDA default: fp16 autocast with a GradScaler, channels-last, pinned batches from a worker."""
    return _train(phantoms, "fp16", epochs=3, iters_per_epoch=8, num_workers=1)


def test_fp16_with_grad_scaler_is_the_cuda_default(fp16_fold):
    runtime = json.loads((fp16_fold / "config.json").read_text())["runtime"]
    assert runtime["device"].startswith("cuda") and runtime["amp"] is True and runtime["amp_dtype"] == "float16"
    assert runtime["channels_last"] is True
    state = torch.load(fp16_fold / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert state["grad_scaler"] is not None and state["grad_scaler"]["scale"] > 0  # the scaler stepped the optimiser
    losses = [r["train_loss"] for r in fold_history(fp16_fold)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(), reason="this GPU has no bf16")
def test_bf16_on_cuda_needs_no_scaler(phantoms):
    fold = _train(phantoms, "bf16", epochs=1, iters_per_epoch=4, amp=True, amp_dtype="bfloat16")
    runtime = json.loads((fold / "config.json").read_text())["runtime"]
    assert runtime["amp_dtype"] == "bfloat16"
    state = torch.load(fold / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert state["grad_scaler"] is None and np.isfinite(fold_history(fold)[0]["train_loss"])


def _top(out) -> torch.Tensor:
    seg = out["seg"] if isinstance(out, dict) else out
    return seg[0] if isinstance(seg, (list, tuple)) else seg


def test_channels_last_gives_the_same_outputs_and_gradients(phantoms):
    from spineauto.networks.build import build_network
    from spineauto.planning.plans import Plans

    plans = Plans.load(phantoms / "preprocessed" / DATASET / "plans.json")
    torch.manual_seed(0)
    a = build_network(plans.configurations["2d"], 1, plans.num_classes).cuda()
    b = build_network(plans.configurations["2d"], 1, plans.num_classes).cuda().to(memory_format=torch.channels_last)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 1, *plans.configurations["2d"].patch_size, device="cuda")
    ya, yb = _top(a(x)), _top(b(x.contiguous(memory_format=torch.channels_last)))
    assert yb.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ya, yb, atol=1e-3, rtol=1e-3)
    ya.square().mean().backward()
    yb.square().mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-3, rtol=1e-2, msg=name)


def test_compile_trains_and_reports_its_time(phantoms):
    fold = _train(phantoms, "compiled", epochs=2, iters_per_epoch=3, compile=True)
    history = fold_history(fold)
    assert json.loads((fold / "config.json").read_text())["runtime"]["compile"] is True
    assert history[0]["compile_s"] > 0 and "compile_s" not in history[1]
    assert all(np.isfinite(r["train_loss"]) for r in history)


def test_pinned_batches_reach_the_gpu(phantoms, monkeypatch):
    from spineauto.training import trainer as T

    seen = []
    to_device = T.Trainer._to_device

    def spy(self, batch):
        seen.append(batch["data"].is_pinned())
        return to_device(self, batch)

    monkeypatch.setattr(T.Trainer, "_to_device", spy)
    _train(phantoms, "pinned", epochs=1, iters_per_epoch=3, num_workers=1)
    assert seen and all(seen)


_NCCL_OPTIONS = 'epochs=2, iters_per_epoch=3, val_iters=1, device="cuda", wandb="disabled", num_workers=0, results=r"{results}", validate=False'


def test_nccl_ddp_with_one_process(phantoms, tmp_path):
    torchrun_training(tmp_path, 1, "all", _NCCL_OPTIONS.format(results=phantoms / "nccl1"))
    fold = phantoms / "nccl1" / DATASET / "spineautoTrainer__spineautoPlans__2d" / "fold_all"
    runtime = json.loads((fold / "config.json").read_text())["runtime"]
    assert runtime["ddp_backend"] == "nccl" and runtime["world_size"] == 1
    assert len(fold_history(fold)) == 2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="fewer than 2 CUDA devices visible")
def test_nccl_ddp_with_two_gpus_keeps_weights_identical(phantoms, tmp_path):
    r0, r1 = torchrun_training(tmp_path, 2, "all", _NCCL_OPTIONS.format(results=phantoms / "nccl2"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    fold = phantoms / "nccl2" / DATASET / "spineautoTrainer__spineautoPlans__2d" / "fold_all"
    runtime = json.loads((fold / "config.json").read_text())["runtime"]
    assert runtime["ddp_backend"] == "nccl" and runtime["world_size"] == 2


def test_gpu_prediction_with_tta_matches_the_cpu(phantoms, fp16_fold, capsys, tmp_path):
    """The same model predicts the held-out phantoms on the GPU (fp16 autocast, TTA) and on the CPU
    (float32, TTA): masks in the input's grid that agree on all but a few boundary voxels."""
    images = phantoms / "raw" / DATASET / "imagesTs"
    model = fp16_fold.parent
    outs = {}
    for dev in ("cuda", "cpu"):
        outs[dev] = tmp_path / dev
        code, _, err = run_cli(capsys, "predict", "-d", "1", "-m", model, "-f", "all", "-i", images, "-o", outs[dev], "--device", dev)
        assert code == 0, err
    cases = sorted(p.name.replace("_0000", "") for p in images.glob("*_0000.nii.gz"))
    assert cases and sorted(p.name for p in outs["cuda"].glob("*.nii.gz")) == cases
    for name in cases:
        g, c = nib.load(outs["cuda"] / name), nib.load(outs["cpu"] / name)
        ref = nib.load(images / name.replace(".nii.gz", "_0000.nii.gz"))
        assert g.shape == ref.shape and np.allclose(g.affine, ref.affine)
        a, b = np.asarray(g.dataobj), np.asarray(c.dataobj)
        assert (a != b).mean() < 1e-3, f"{name}: {(a != b).sum()} voxels differ between GPU and CPU"
