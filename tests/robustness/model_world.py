"""A planned phantom dataset with a tiny trained-looking model folder, shared by the robustness tests
that attack a model (security, hostile inputs), and the one-error-line check they all make."""
from __future__ import annotations

import pytest

from conftest import planned_phantoms, remove_tree
from test_inference_support import make_model_folder
from test_training import tiny_plan

MODEL = "spineautoTrainer__spineautoPlans__2d"


def one_error_line(err: str) -> str:
    """The single `error:` line of a refusal (no traceback, no second error)."""
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def model_world(tmp_path_factory, name: str):
    """Yield SPINEAUTO_* folders (set in the environment meanwhile) holding Dataset001_Ph and a model folder."""
    root = tmp_path_factory.mktemp(name)
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
