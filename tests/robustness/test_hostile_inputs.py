"""A third round of hostile but realistic inputs and faults (cases the first rounds did not list):
diverged checkpoints, signals and killed runs around bundles, ... Each case failed before its fix;
every refusal is one line naming the path and the cause.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import planned_phantoms, remove_tree, run_cli
from test_inference_support import make_model_folder
from test_training import tiny_plan

MODEL = "spineautoTrainer__spineautoPlans__2d"


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    env = planned_phantoms(root, n_train=4, n_test=1, seed=0)
    tiny_plan(env["preprocessed"] / "Dataset001_Ph" / "plans.json")
    make_model_folder(env["preprocessed"] / "Dataset001_Ph", env["results"])
    mp = pytest.MonkeyPatch()
    for k, p in env.items():
        mp.setenv(f"SPINEAUTO_{k.upper()}", str(p))
    mp.setenv("WANDB_MODE", "disabled")
    yield env
    mp.undo()
    remove_tree(root)


def test_checkpoint_with_nan_weights_is_refused_by_predict_and_pretrained(world, tmp_path, capsys):
    """A diverged run's checkpoint predicted empty masks with exit 0, and was a --pretrained start."""
    model = tmp_path / MODEL
    shutil.copytree(world["results"] / "Dataset001_Ph" / MODEL, model)
    ckpt = model / "fold_0" / "checkpoint_final.pt"
    state = torch.load(ckpt, weights_only=True)
    key = next(k for k, v in state["network"].items() if v.is_floating_point())
    state["network"][key] = torch.full_like(state["network"][key], float("nan"))
    torch.save(state, ckpt)
    scans = world["raw"] / "Dataset001_Ph" / "imagesTs"
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-m", str(model), "-i", str(scans), "-o", str(tmp_path / "out"),
                           "--device", "cpu", "--no-tta")
    line = _one_error_line(err)
    assert code == 1 and str(ckpt) in line and "NaN" in line and key in line, line
    assert not any((tmp_path / "out").glob("*.nii.gz"))
    code, _, err = run_cli(capsys, "train", "-d", "1", "-f", "all", "--epochs", "1", "--iters-per-epoch", "1", "--val-iters", "1",
                           "--num-workers", "0", "--device", "cpu", "--wandb", "disabled", "--no-validate", "--pretrained", str(ckpt))
    line = _one_error_line(err)
    assert code == 1 and str(ckpt) in line and "NaN" in line, line
