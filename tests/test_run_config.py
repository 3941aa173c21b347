"""A configuration-driven, extensible trainer (`spineauto train --config run.yaml`): run YAMLs and
flags override the plan, built-in losses/optimisers/schedules learn on phantoms, user plug-ins of every
kind train, checkpoint and predict (also from a copied model folder), callbacks, accumulation,
activation checkpointing, W&B offline and TensorBoard.

One phantom dataset is planned per module and shrunk as tests/test_training.py's (a 4-stage U-Net
with 8-64 features); every run is a few iterations on CPU.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import fold_history, torchrun_training
from spineauto.errors import SpineautoError

REPO = Path(__file__).resolve().parents[1]
DATASET = "Dataset001_Phantoms"
MODEL = "spineautoTrainer__spineautoPlans__2d"
FAST = dict(val_iters=1, wandb="disabled", num_workers=0, validate=False, device="cpu")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from spineauto.datasets.phantoms import write_phantom_dataset
    from spineauto.plan_and_preprocess import plan_and_preprocess
    from test_training import tiny_plan

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("run_config")
    mp = pytest.MonkeyPatch()
    for kind in ("raw", "preprocessed", "results"):
        mp.setenv(f"SPINEAUTO_{kind.upper()}", str(root / kind))
    mp.setenv("WANDB_MODE", "disabled")
    write_phantom_dataset(root / "raw" / DATASET, n_train=12, n_test=0, seed=0)
    plan_and_preprocess(1, workers=2)
    shutil.copy(root / "preprocessed" / DATASET / "plans.json", root / "planned.json")  # as planned (presets apply to it)
    tiny_plan(root / "preprocessed" / DATASET / "plans.json")
    yield root
    mp.undo()


def _train(phantoms: Path, results: str, configuration: str = "2d", fold=0, **kw) -> Path:
    from spineauto.training.trainer import TrainOptions, train_fold

    return train_fold(1, configuration, fold, TrainOptions(results=phantoms / results, **{**FAST, **kw}))


def _yaml(tmp_path: Path, data: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _plans(phantoms: Path, planned: bool = False):
    from spineauto.planning.plans import Plans

    return Plans.load(phantoms / "planned.json" if planned else phantoms / "preprocessed" / DATASET / "plans.json")


def _batch(phantoms: Path, n: int = 8) -> dict:
    """One fixed validation-style batch of phantom patches (no augmentation)."""
    from spineauto.training.data import VAL, CaseStore, KeyedBatches, SegmentationPatchSampler

    plan = _plans(phantoms).configuration("2d")
    store = CaseStore.load(phantoms / "preprocessed" / DATASET / "2d")
    cases = sorted(store.props)
    return KeyedBatches(SegmentationPatchSampler(store, 1.0), None, cases, cases, n, plan.patch_size, plan.patch_size, 0, 0)[(VAL, 0, 0)]


def _fit(plan, plans, batch: dict, steps: int = 12) -> list[float]:
    """Losses of ``steps`` optimiser steps of the plan's network, loss, optimiser and schedule on one batch."""
    from spineauto.networks.build import build_network
    from spineauto.training.optim import build_optimizer, build_schedule
    from spineauto.training.trainer import build_task

    torch.manual_seed(0)
    net = build_network(plan, 1, plans.num_classes)
    task = build_task(plans, plan)
    opt = build_optimizer(net.parameters(), plan.optim)
    schedule = build_schedule(opt, plan.optim, 4, 3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = task.loss(net(batch["data"]), batch)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return losses


def _with(plan, **sections):
    """A copy of ``plan`` with section fields replaced: _with(plan, loss={"name": "tversky"})."""
    from spineauto.planning.plans import ConfigurationPlan
    from spineauto.schema import deep_merge, from_dict, to_dict

    return from_dict(ConfigurationPlan, deep_merge(to_dict(plan), sections))


# -- built-ins ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["dice_ce", "dice_focal", "tversky", "focal_tversky", "dice_bce"])
def test_each_builtin_loss_decreases_on_phantoms(phantoms, loss):
    plans = _plans(phantoms)
    plan = _with(plans.configuration("2d"), loss={"name": loss}, optim={"optimizer": "adam", "initial_lr": 0.003, "schedule": "constant"})
    losses = _fit(plan, plans, _batch(phantoms))
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.95 * np.mean(losses[:3]), losses  # every one falls by more than 5% in 12 steps


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_each_builtin_optimiser_decreases_the_loss(phantoms, optimizer):
    plans = _plans(phantoms)
    lr = 0.01 if optimizer == "sgd" else 0.003
    plan = _with(plans.configuration("2d"), optim={"optimizer": optimizer, "initial_lr": lr, "schedule": "constant"})
    losses = _fit(plan, plans, _batch(phantoms))
    assert np.mean(losses[-3:]) < 0.95 * np.mean(losses[:3]), losses


def test_builtin_schedules_follow_their_curves_and_resume():
    from spineauto.planning.plans import OptimPlan
    from spineauto.training.optim import build_schedule

    def rates(o: OptimPlan, epochs=4, iters=5, records=None) -> list[float]:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=o.initial_lr)
        s = build_schedule(opt, o, epochs, iters)
        out = []
        for e in range(epochs):
            for _ in range(iters):
                out.append(opt.param_groups[0]["lr"])
                opt.step()
                s.step()
            s.step_metric((records or [{}] * epochs)[e])
        return out

    poly = rates(OptimPlan(initial_lr=0.01, schedule="poly"))
    assert poly[::5] == pytest.approx([0.01 * (1 - e / 4) ** 0.9 for e in range(4)])  # nnU-Net's, per epoch
    assert len(set(poly[:5])) == 1
    cos = rates(OptimPlan(initial_lr=0.01, schedule="cosine", warmup_epochs=1, min_lr=0.001))
    assert cos[:5] == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.01])  # linear warm-up over one epoch
    assert cos[5] == pytest.approx(0.01) and cos[-1] < 0.0012 and all(a >= b for a, b in zip(cos[5:], cos[6:]))
    assert set(rates(OptimPlan(initial_lr=0.01, schedule="constant"))) == {0.01}
    plateau = rates(OptimPlan(initial_lr=0.01, schedule="reduce_on_plateau", plateau_patience=1, plateau_factor=0.5), epochs=4,
                    records=[{"val_loss": 1.0}, {"val_loss": 1.0}, {"val_loss": 1.0}, {"val_loss": 1.0}])
    assert plateau[::5] == pytest.approx([0.01, 0.01, 0.01, 0.005])  # worse twice in a row after the best: halved
    # the schedule's state is what the checkpoint keeps: a restored schedule continues the curve
    p = torch.nn.Parameter(torch.zeros(1))
    o = OptimPlan(initial_lr=0.01, schedule="cosine", warmup_epochs=1)
    opt = torch.optim.SGD([p], lr=0.01)
    s = build_schedule(opt, o, 4, 5)
    for _ in range(7):
        opt.step()
        s.step()
    opt2 = torch.optim.SGD([p], lr=0.01)
    s2 = build_schedule(opt2, o, 4, 5)
    opt2.load_state_dict(opt.state_dict())
    s2.load_state_dict(s.state_dict())
    opt.step(), s.step(), opt2.step(), s2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_accumulated_gradients_equal_the_larger_batch(phantoms):
    """accumulate: 2 micro-batches of 4 give the gradients of one batch of 8 (a mean loss, per-sample norm)."""
    from spineauto.networks.build import build_network
    from spineauto.training.optim import accumulated_backward
    from spineauto.training.trainer import build_task

    plans = _plans(phantoms)
    plan = _with(plans.configuration("2d"), loss={"dice_weight": 0.0})  # cross-entropy: a mean over voxels; instance norm
    batch = _batch(phantoms, 8)
    task = build_task(plans, plan)
    torch.manual_seed(0)
    net = build_network(plan, 1, plans.num_classes).double()
    micro = [{k: v[s] if k != "keys" else [] for k, v in batch.items()} for s in (slice(0, 4), slice(4, 8))]
    whole = {k: v for k, v in batch.items()}
    for b in (*micro, whole):
        b["data"] = b["data"].double()
    from contextlib import nullcontext

    loss_a = accumulated_backward(net, micro, task.loss, nullcontext)
    grads_a = [p.grad.clone() for p in net.parameters() if p.grad is not None]  # the lowest output's weight is 0: no gradient
    net.zero_grad()
    loss_b = accumulated_backward(net, [whole], task.loss, nullcontext)
    grads_b = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    assert len(grads_a) == len(grads_b) > 20
    assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-9)
    worst = max(float((a - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(grads_a, grads_b))
    assert worst < 1e-8, worst


def test_activation_checkpointing_keeps_gradients_and_parameter_names(phantoms):
    from spineauto.networks.build import build_network, checkpoint_activations

    plans = _plans(phantoms)
    plan = plans.configuration("2d")
    batch = _batch(phantoms, 4)
    nets = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        net = build_network(plan, 1, plans.num_classes)
        if checkpointed:
            assert checkpoint_activations(net) == 4 + 3  # encoder and decoder stages
        out = net(batch["data"])["seg"]
        sum(o.float().square().mean() for o in out).backward()
        nets.append(net)
    plain, ckpt = nets
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), n


# -- run configuration ---------------------------------------------------------------------------------
def test_run_yaml_and_flags_override_the_plan_and_are_written_beside_the_checkpoints(phantoms, tmp_path):
    config = _yaml(tmp_path, {"description": "a test run", "loss": {"name": "dice_focal", "focal_gamma": 1.5},
                              "optim": {"optimizer": "adamw", "schedule": "cosine", "warmup_epochs": 0.5},
                              "augmentation": {"rotation_degrees": 10.0},
                              "trainer": {"accumulate": 2, "val_every": 2}})
    fold = _train(phantoms, "yaml", config=config, lr="0.002", batch_size="4", config_set=["loss.focal_gamma=1.0", "foreground_oversampling=0.5"],
                  epochs=3, iters_per_epoch=2)
    resolved = yaml.safe_load((fold / "run_config.yaml").read_text())
    c = resolved["configuration"]
    assert (c["loss"]["name"], c["loss"]["focal_gamma"], c["optim"]["optimizer"], c["optim"]["schedule"]) == ("dice_focal", 1.0, "adamw", "cosine")
    assert (c["optim"]["initial_lr"], c["batch_size"], c["foreground_oversampling"], c["trainer"]["accumulate"]) == (0.002, 4, 0.5, 2)
    assert c["augmentation"]["rotation_degrees"] == 10.0 and c["network"]["features_per_stage"] == [8, 16, 32, 64]  # the plan's, kept
    assert resolved["run"]["batch_size"] == 4 and resolved["overrides"]["sources"][0] == str(config)
    hist = fold_history(fold)
    assert [r["val_loss"] is None for r in hist] == [True, False, False]  # val_every 2, and the last epoch (NaN is null)
    assert hist[0]["samples_per_s"] > 0
    # the checkpoint, the model folder and prediction see the resolved plan
    state = torch.load(fold / "checkpoint_final.pt", weights_only=False)
    assert state["plans"]["configurations"]["2d"]["loss"]["name"] == "dice_focal"
    model_plans = json.loads((fold.parent / "plans.json").read_text())
    assert model_plans["configurations"]["2d"]["optim"]["optimizer"] == "adamw"
    # --continue without the YAML resumes with the run's own overrides; another value is refused
    from spineauto.training.trainer import TrainOptions, train_fold

    assert train_fold(1, "2d", 0, TrainOptions(results=phantoms / "yaml", continue_training=True, **FAST)) == fold
    with pytest.raises(SpineautoError, match="another plan"):
        train_fold(1, "2d", 0, TrainOptions(results=phantoms / "yaml", continue_training=True, lr="0.001", **FAST))
    # the resolved file is itself a run configuration
    again = _train(phantoms, "again", config=fold / "run_config.yaml", epochs=1, iters_per_epoch=1)
    assert yaml.safe_load((again / "run_config.yaml").read_text())["configuration"] == c


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "plans").glob("*.yaml")))
def test_every_preset_applies_at_train_time(phantoms, preset):
    from spineauto.training.run_config import RunSpec, resolve_run

    plans = _plans(phantoms, planned=True)
    data = yaml.safe_load((REPO / "plans" / preset).read_text())
    applied = 0
    for name, entry in data["configurations"].items():
        parent = (entry or {}).get("inherit", name)
        if parent not in plans.configurations:
            continue
        out, record = resolve_run(plans, name, RunSpec(config=REPO / "plans" / preset), None, DATASET)
        cfg = out.configuration(name)
        for section, values in (entry or {}).items():
            if isinstance(values, dict):
                for k, v in values.items():
                    assert getattr(getattr(cfg, section), k) == v, (name, section, k)
            elif section != "inherit":
                assert getattr(cfg, section) == values
        assert cfg.data_identifier == plans.configuration(parent).data_identifier
        applied += 1
    assert applied, f"{preset}: no configuration of it is planned for the phantoms"


def test_focal_tversky_example_run_yaml_with_a_user_network_trains_resumes_and_predicts(phantoms, tmp_path, monkeypatch, capsys):
    """plans/runs/example_run.yaml as a new user would take it: its network lives in examples/my_network.py."""
    from conftest import run_cli

    monkeypatch.syspath_prepend(str(REPO / "examples"))
    example = yaml.safe_load((REPO / "plans" / "runs" / "example_run.yaml").read_text())
    assert example["loss"]["name"] == "focal_tversky" and example["optim"]["optimizer"] == "adamw"
    assert example["optim"]["schedule"] == "cosine" and example["network"]["architecture"] == "my_network:SmallUNet"
    stopping = next(c for c in example["trainer"]["callbacks"] if c["name"] == "early_stopping")
    stopping.update(patience=1, min_delta=10.0)  # no improvement by 10 after epoch 0: stops after epoch 1
    config = _yaml(tmp_path, example)
    monkeypatch.setenv("SPINEAUTO_RESULTS", str(tmp_path / "results"))
    args = ["train", "-d", "1", "-f", "0", "--config", str(config), "--epochs", "3", "--iters-per-epoch", "2", "--val-iters", "1",
            "--num-workers", "0", "--device", "cpu", "--no-validate", "--wandb", "disabled"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err[-3000:]
    fold = tmp_path / "results" / DATASET / MODEL / "fold_0"
    hist = fold_history(fold)
    assert "early stopping" in err and len(hist) == 2 and (fold / "checkpoint_final.pt").is_file()
    assert sorted(p.name for p in (fold / "checkpoints").iterdir()) == sorted(f"{r['epoch']:03d}-{r['pseudo_dice']:.6f}.pt" for r in hist)
    assert len(list((fold / "samples").glob("epoch_001_*.png"))) == 4
    state = torch.load(fold / "checkpoint_final.pt", weights_only=False)
    assert state["stopped"].startswith("early stopping") and state["plans"]["configurations"]["2d"]["network"]["architecture"] == "my_network:SmallUNet"
    code, out, err = run_cli(capsys, *args[:5], "--continue", *args[7:])
    assert code == 0 and "training already complete (early stopping" in " ".join(err.split()), err[-3000:]  # however rich wrapped the path before it
    # predict from a copy of the model folder: it records the import string and needs the module
    copy = tmp_path / "copied_model"
    shutil.copytree(fold.parent, copy)
    image = next((phantoms / "raw" / DATASET / "imagesTr").glob("*_0000.nii.gz"))
    (tmp_path / "in").mkdir()
    shutil.copy(image, tmp_path / "in" / image.name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(REPO / "examples")])
    monkeypatch.delitem(sys.modules, "my_network")
    code, out, err = run_cli(capsys, "predict", "-d", "1", "-m", str(copy), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                             "-f", "0", "--device", "cpu", "--no-tta")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "my_network" in lines[0] and "does not import" in lines[0], err[-2000:]
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    code, out, err = run_cli(capsys, "predict", "-d", "1", "-m", str(copy), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                             "-f", "0", "--device", "cpu", "--no-tta")
    assert code == 0, err[-3000:]
    assert (tmp_path / "out" / image.name.replace("_0000", "")).is_file()


def test_user_plugins_of_every_kind_train_checkpoint_and_predict(phantoms, tmp_path):
    import plugins_for_tests as plug
    from spineauto.inference.model import load_model
    from spineauto.inference.predictor import run_networks

    plug.CALLS.clear()
    config = _yaml(tmp_path, {
        "network": {"architecture": "plugins_for_tests:TinyNet", "kwargs": {"width": 6}},
        "loss": {"name": "plugins_for_tests:CrossEntropyPlusOne", "kwargs": {"offset": 1.0}},
        "optim": {"optimizer": "plugins_for_tests:CountingSGD", "initial_lr": 0.05, "optimizer_kwargs": {"momentum": 0.5},
                  "schedule": "plugins_for_tests:HalvingSchedule", "schedule_kwargs": {"every": 2}},
        "augmentation": {"transforms": [{"name": "plugins_for_tests:InvertTransform", "p": 0.5},
                                        {"name": "gaussian_noise", "noise_variance": [0.0, 0.01]}]},
        "trainer": {"task": "plugins_for_tests:CountingTask", "callbacks": [{"name": "plugins_for_tests:RecordingCallback"}]},
    })
    fold = _train(phantoms, "plugins", config=config, epochs=2, iters_per_epoch=2)
    assert plug.CALLS["optimizer"] == 4 and plug.CALLS["task"] >= 4 and plug.CALLS["loss"] >= 4
    hist = fold_history(fold)
    assert [r["lr"] for r in hist] == pytest.approx([0.05, 0.025])  # halved every 2 steps
    assert all(r["train_loss"] > 1.0 for r in hist)  # the offset loss was the one optimised
    assert [json.loads(line)["epoch"] for line in (fold / "plugin_callback.jsonl").read_text().splitlines()] == [0, 1]
    state = torch.load(fold / "checkpoint_final.pt", weights_only=False)
    assert state["callbacks"][0] == {"epochs": [0, 1]} and any(k.startswith("net.") for k in state["network"])
    model = load_model(fold.parent, ["0"], "final", "cpu")
    from spineauto.training.data import CaseStore

    store = CaseStore.load(phantoms / "preprocessed" / DATASET / "2d")
    case = sorted(store.props)[0]
    out = run_networks(model.networks, np.asarray(store.data(case)), model.plan, torch.device("cpu"), tta=False)
    assert out.seg.shape[0] == 3 and torch.allclose(out.seg.sum(0), torch.ones(()), atol=1e-4)


def test_entry_point_plugins_resolve_by_name(monkeypatch):
    """An installed package's `spineauto.plugins` entry point `<kind>.<name>` is found by its bare name."""
    from spineauto import plugins
    from spineauto.training.callbacks import CALLBACKS
    from spineauto.training.losses import LOSSES

    assert isinstance(plugins._entry_points(), dict)  # the installed ones (none here): the real lookup runs
    monkeypatch.setattr(plugins, "_entry_points", lambda: {"loss.plus_one": "plugins_for_tests:CrossEntropyPlusOne",
                                                          "callback.recording": "plugins_for_tests:NotAPlugin"})
    import plugins_for_tests

    assert LOSSES.resolve("plus_one", "loss.name") is plugins_for_tests.CrossEntropyPlusOne
    with pytest.raises(SpineautoError, match="'recording' is the class NotAPlugin .* not a callback"):
        CALLBACKS.resolve("recording", "trainer.callbacks[0].name")
    with pytest.raises(SpineautoError, match="unknown loss 'plus_two'"):
        LOSSES.resolve("plus_two", "loss.name")


def test_dice_bce_trains_sigmoid_outputs_and_prediction_thresholds_at_half(phantoms):
    from spineauto.inference.model import load_model
    from spineauto.networks.outputs import seg_labels, seg_probabilities

    fold = _train(phantoms, "bce", config_set=["loss.name=dice_bce"], epochs=1, iters_per_epoch=2)
    model = load_model(fold.parent, ["0"], "final", "cpu")
    assert model.plan.network.output_activation == "sigmoid"
    logits = torch.tensor([[[[-3.0]], [[0.1]], [[-0.2]]], [[[5.0]], [[-0.1]], [[-2.0]]], [[[0.0]], [[2.0]], [[3.0]]]])
    assert seg_labels(logits, "sigmoid").flatten().tolist() == [1, 0, 2]  # > 0.5 wins; background's score is ignored
    p = seg_probabilities(logits, "sigmoid")
    assert p[1, 0].item() == pytest.approx(1 - torch.sigmoid(torch.tensor(-0.1)).item())


def test_loss_that_does_not_fit_the_task_is_refused(phantoms):
    from spineauto.training.run_config import RunSpec, resolve_run

    plans = _plans(phantoms)
    with pytest.raises(SpineautoError, match="sigmoid outputs, which do not fit configuration 'multitask'"):
        resolve_run(plans, "multitask", RunSpec(sets=["loss.name=dice_bce"]), None, DATASET)
    with pytest.raises(SpineautoError, match="is a segmentation loss; configuration 'cls' is a classification"):
        resolve_run(plans, "cls", RunSpec(sets=["loss.name=tversky"]), None, DATASET)


def test_ddp_accumulates_and_stops_early_on_every_rank(phantoms, tmp_path):
    """Two CPU processes: accumulate 2 (no_sync before the last micro-batch) and early stopping decided on
    rank 0 end the run on both ranks after the same epoch, with identical weights."""
    r0, r1 = torchrun_training(tmp_path, 2, 0, f"""epochs=4, iters_per_epoch=2, val_iters=1, device="cpu", wandb="disabled",
             num_workers=0, results=r"{phantoms / 'ddp'}", validate=False, config_set=["trainer.accumulate=2",
             "trainer.callbacks=[{{name: early_stopping, monitor: val_loss, patience: 1, min_delta: 10.0}}]"]""")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    fold = phantoms / "ddp" / DATASET / MODEL / "fold_0"
    assert len(fold_history(fold)) == 2 and "early stopping" in torch.load(fold / "checkpoint_final.pt", weights_only=False)["stopped"]


# -- experiment tracking ----------------------------------------------------------------------------------
def _wandb_records(path: Path):
    """The protobuf records of an offline W&B run's transaction log (``run-<id>.wandb``): LevelDB-log
    blocks of 32 KiB (7-byte chunk headers: crc, length, type) after W&B's 7-byte file header."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", raw[:7]
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if pos + 7 + length > len(raw):  # still being written
            break
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        parts = data if kind in (1, 2) else parts + data  # full / first start a record, middle / last continue it
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def _wandb_run(run_dir: Path) -> dict:
    """config, summary (last value per key), history rows and artifacts of one offline run folder."""
    import time

    deadline = time.time() + 60
    while True:  # W&B's service process writes the log: wait for the run's exit record
        records = list(_wandb_records(next(run_dir.glob("run-*.wandb"))))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            break
        time.sleep(0.5)
    out: dict = {"config": {}, "summary": {}, "history": [], "artifacts": {}}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind in ("run", "config"):
            items = rec.run.config.update if kind == "run" else rec.config.update
            out["config"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "artifact":
            out["artifacts"][rec.artifact.name] = [f.path for f in rec.artifact.manifest.contents]
    return out


def test_wandb_offline_gets_the_resolved_config_validation_artifacts_and_resumes(phantoms, monkeypatch, capsys):
    """The sweep path too: a wandb agent's values arrive as key=value overrides, and W&B's config holds them."""
    from conftest import run_cli

    monkeypatch.setenv("WANDB_MODE", "offline")
    from spineauto.training.trainer import TrainOptions, train_fold

    def stop(trainer, record):
        if record["epoch"] == 0:
            raise KeyboardInterrupt

    opts = dict(FAST, wandb="offline", validate=True, val_iters=1, epochs=2, iters_per_epoch=2,
                config_set=["optim.initial_lr=0.0025", "loss.name=tversky"], wandb_artifacts=True)
    with pytest.raises(KeyboardInterrupt):
        train_fold(1, "2d", 0, TrainOptions(results=phantoms / "wandb", callbacks=[stop], **opts))
    fold = phantoms / "wandb" / DATASET / MODEL / "fold_0"
    first_id = torch.load(fold / "checkpoint_latest.pt", weights_only=False)["wandb_run_id"]
    # the rest as a wandb agent runs it: the command line with the values as bare KEY=VALUE arguments
    monkeypatch.setenv("SPINEAUTO_RESULTS", str(phantoms / "wandb"))
    code, out, err = run_cli(capsys, "train", "-d", "1", "-f", "0", "--continue", "--epochs", "2", "--iters-per-epoch", "2",
                             "--val-iters", "1", "--num-workers", "0", "--device", "cpu", "--wandb", "offline", "--wandb-artifacts",
                             "optim.initial_lr=0.0025", "loss.name=tversky")
    assert code == 0, err[-3000:]
    runs = sorted((fold / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(first_id) for r in runs)  # --continue resumed the same W&B run
    first, last = _wandb_run(runs[0]), _wandb_run(runs[-1])
    config = last["config"]
    assert config["plan"]["optim"]["initial_lr"] == 0.0025 and config["plan"]["loss"]["name"] == "tversky"
    assert config["plan"]["network"]["features_per_stage"] == [8, 16, 32, 64]  # the whole plan, not only the overrides
    assert config["overrides"] == {"optim": {"initial_lr": 0.0025}, "loss": {"name": "tversky"}}
    assert config["parameters"] > 1000 and config["epochs"] == 2 and config["runtime"]["device"] == "cpu"
    hist = fold_history(fold)
    logged = [h for run in (first, last) for h in run["history"] if "train_loss" in h]
    assert [h["epoch"] for h in logged] == [0, 1] and [h["train_loss"] for h in logged] == pytest.approx([r["train_loss"] for r in hist])
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert last["summary"]["validation/dice_cord"] == pytest.approx(summary["mean"]["cord"])
    assert any("per_case" in name for name in last["artifacts"])  # the per-case table
    assert sorted(last["artifacts"][f"{DATASET}_2d_fold0"]) == ["checkpoint_best.pt", "checkpoint_final.pt"]


def test_tensorboard_logger_writes_epoch_and_step_scalars(phantoms):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fold = _train(phantoms, "tb", loggers=["tensorboard"], config_set=["trainer.log_every=1", "trainer.callbacks=[{name: lr_monitor, logging_interval: step}, {name: segmentation_sampler, image_amount: 2}]"],
                  epochs=2, iters_per_epoch=3)
    acc = EventAccumulator(str(fold / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()
    hist = fold_history(fold)
    assert [e.value for e in acc.Scalars("train_loss")] == pytest.approx([r["train_loss"] for r in hist], rel=1e-6)
    assert [e.step for e in acc.Scalars("step/train_loss")] == list(range(1, 7))
    assert [e.step for e in acc.Scalars("step/lr")] == list(range(1, 7))
    assert {"overlay", "samples/0", "samples/1"} <= set(tags["images"])
    assert len(list((fold / "samples").glob("epoch_001_*.png"))) == 2
