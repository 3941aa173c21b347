"""`spineauto train` on synthetic phantoms: it learns, resumes exactly, survives SIGKILL, runs DDP,
AMP and W&B offline, and refuses bad input with one clear line.

One phantom dataset is planned once per module; its plan is edited (as a user may edit plans.json)
to a tiny 4-stage U-Net trained with Adam so that a couple of hundred iterations learn the cord on
2 CPU cores. Every run writes to its own results folder.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fold_history, run_cli, torchrun_training
from spineauto.errors import SpineautoError

DATASET = "Dataset001_Phantoms"
FAST = dict(val_iters=1, wandb="disabled", num_workers=0, validate=False)


def tiny_plan(plans_path: Path) -> None:
    """A small network and Adam: the same code paths, a fraction of the compute."""
    data = json.loads(plans_path.read_text())
    cfg = data["configurations"]["2d"]
    n = 4
    cfg["network"].update(features_per_stage=[8, 16, 32, 64], kernel_sizes=[[3, 3]] * n, strides=[[1, 1]] + [[2, 2]] * (n - 1),
                          n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1))
    cfg["batch_size"] = 8
    cfg["optim"].update(optimizer="adam", initial_lr=0.003)
    cfg["augmentation"]["whole_neck"] = 0.0  # the loop's code paths on the dataset's own cases (tests/test_synthetic_context.py: the context)
    plans_path.write_text(json.dumps(data, indent=1))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from spineauto.datasets.phantoms import write_phantom_dataset
    from spineauto.plan_and_preprocess import plan_and_preprocess

    torch.set_num_threads(1)  # 2 threads on a shared 2-core machine can be 10x slower (OpenMP oversubscription)
    root = tmp_path_factory.mktemp("training")
    mp = pytest.MonkeyPatch()
    for kind in ("raw", "preprocessed", "results"):
        mp.setenv(f"SPINEAUTO_{kind.upper()}", str(root / kind))
    mp.setenv("WANDB_MODE", "disabled")
    write_phantom_dataset(root / "raw" / DATASET, n_train=14, n_test=0, seed=0)
    plan_and_preprocess(1, workers=2)
    tiny_plan(root / "preprocessed" / DATASET / "plans.json")
    yield root
    mp.undo()


def _train(phantoms: Path, results: str, **kw) -> Path:
    from spineauto.training.trainer import TrainOptions, train_fold

    args = {**FAST, **kw}
    configuration, fold = args.pop("configuration", "2d"), args.pop("fold", 0)
    return train_fold(1, configuration, fold, TrainOptions(results=phantoms / results, **args))


@pytest.fixture(scope="module")
def trained(phantoms) -> Path:
    """A short real run (background worker, full-volume validation): 6 epochs x 25 iterations."""
    return _train(phantoms, "learn", epochs=6, iters_per_epoch=25, val_iters=2, num_workers=1, validate=True)


# -- folds ------------------------------------------------------------------------------------------
def test_splits_grouped_by_subject_stratified_and_deterministic():
    from spineauto.training.splits import make_splits

    subjects = {f"c{i:02d}": f"s{i // 3}" for i in range(30)}  # 10 subjects, 3 cases each
    strata = {c: ("lesion" if int(s[1:]) % 2 else "none") for c, s in subjects.items()}
    splits = make_splits(subjects, strata)
    assert splits == make_splits(dict(reversed(list(subjects.items()))), strata)
    assert sorted(c for s in splits for c in s["val"]) == sorted(subjects)
    for s in splits:
        assert not {subjects[c] for c in s["val"]} & {subjects[c] for c in s["train"]}
        assert len(s["val"]) == 6 and sum(strata[c] == "lesion" for c in s["val"]) == 3
    with pytest.raises(SpineautoError, match="-f all"):
        make_splits({"a": "s1", "b": "s2"}, None)


def test_ranks_and_keys_draw_different_batches_reproducibly(phantoms):
    from spineauto.planning.plans import Plans
    from spineauto.training.data import CaseStore, KeyedBatches, SegmentationPatchSampler

    plan = Plans.load(phantoms / "preprocessed" / DATASET / "plans.json").configuration("2d")
    store = CaseStore.load(phantoms / "preprocessed" / DATASET / "2d")
    cases = sorted(store.props)

    def batches(rank):
        return KeyedBatches(SegmentationPatchSampler(store, 0.5), None, cases, cases, 4, plan.patch_size, [200, 200], 0, rank)

    a, b = batches(0)[(0, 3, 1)], batches(1)[(0, 3, 1)]
    assert a["data"].shape == (4, 1, *plan.patch_size)
    assert not torch.equal(a["data"], b["data"])
    assert torch.equal(a["data"], batches(0)[(0, 3, 1)]["data"])
    assert (a["seg"][2:] > 0).flatten(1).any(1).all()  # the oversampled half holds foreground


# -- the run --------------------------------------------------------------------------------------------
def test_short_run_learns_and_writes_everything(trained):
    summary = json.loads((trained / "validation" / "summary.json").read_text())
    assert summary["mean"]["cord"] > 0.6, summary["mean"]
    assert summary["cases"] and all((trained / "validation" / f"{c['case']}.nii.gz").is_file() for c in summary["cases"])
    hist = fold_history(trained)
    assert [r["epoch"] for r in hist] == [0, 1, 2, 3, 4, 5]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    for key in ("val_loss", "pseudo_dice", "pseudo_dice_cord", "lr", "epoch_time", "samples_per_s", "ema"):
        assert key in hist[-1]
    assert hist[1]["lr"] < hist[0]["lr"]  # poly schedule
    for name in ("checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt", "progress.png", "log.txt", "config.json",
                 "checkpoints_top.json", "overlays/epoch_005.png"):
        assert (trained / name).is_file(), name
    top = json.loads((trained / "checkpoints_top.json").read_text())
    assert len(top["checkpoints"]) == 5 and all((trained / e["file"]).is_file() for e in top["checkpoints"])
    config = json.loads((trained / "config.json").read_text())
    assert config["epochs"] == 6 and config["iters_per_epoch"] == 25 and config["runtime"]["num_workers"] == 1
    ckpt = torch.load(trained / "checkpoint_final.pt", weights_only=False)
    assert ckpt["epoch"] == 6 and ckpt["configuration"] == "2d" and "plans" in ckpt
    assert (trained.parent / "plans.json").is_file() and (trained.parent / "splits_final.json").is_file()


def test_resume_equals_uninterrupted(phantoms):
    """Batches are a function of (seed, rank, epoch, iteration) and the RNG/optimiser states are restored,
    so a resumed run replays the uninterrupted one; only float reduction order could differ (atol 1e-6)."""
    straight = _train(phantoms, "straight", epochs=2, iters_per_epoch=3)

    def interrupt_after_first_epoch(trainer, record):
        if record["epoch"] == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(phantoms, "resumed", epochs=2, iters_per_epoch=3, callbacks=[interrupt_after_first_epoch])
    resumed = _train(phantoms, "resumed", continue_training=True)  # epochs etc. come from the run's config
    a = torch.load(straight / "checkpoint_final.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint_final.pt", weights_only=False)
    for k, v in a["network"].items():
        torch.testing.assert_close(b["network"][k], v, atol=1e-6, rtol=1e-5, msg=k)
    assert [r["train_loss"] for r in fold_history(resumed)] == pytest.approx([r["train_loss"] for r in fold_history(straight)], abs=1e-6)


def test_weight_average_is_the_mean_of_the_last_steps_and_resumes(phantoms):
    """optim.weight_average 0.5 over 6 one-step epochs: the final weights are the mean of
    those after steps 4, 5 and 6 of the same run without it (averaging draws no random number), and a run killed
    inside the averaged span resumes to the same mean (the running mean is part of the checkpoint)."""
    seen = []

    def keep_weights(trainer, record):
        seen.append({k: v.detach().clone() for k, v in trainer.network.state_dict().items()})

    run = dict(epochs=6, iters_per_epoch=1)
    _train(phantoms, "plain", callbacks=[keep_weights], config_set=["optim.weight_average=0"], **run)
    averaged = _train(phantoms, "averaged", config_set=["optim.weight_average=0.5"], **run)

    def interrupt_after_fifth_epoch(trainer, record):
        if record["epoch"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(phantoms, "averaged_resumed", config_set=["optim.weight_average=0.5"], callbacks=[interrupt_after_fifth_epoch], **run)
    latest = next((phantoms / "averaged_resumed").rglob("checkpoint_latest.pt"))
    assert int(torch.load(latest, weights_only=False)["averaged"]["n_averaged"]) == 2  # steps 4 and 5
    resumed = _train(phantoms, "averaged_resumed", continue_training=True)
    final = torch.load(averaged / "checkpoint_final.pt", weights_only=False)["network"]
    final_resumed = torch.load(resumed / "checkpoint_final.pt", weights_only=False)["network"]
    moved = 0
    for k, last in seen[-1].items():
        if not last.is_floating_point():
            continue
        mean = sum(w[k] for w in seen[3:]) / 3
        torch.testing.assert_close(final[k], mean, atol=1e-6, rtol=1e-5, msg=k)
        torch.testing.assert_close(final_resumed[k], mean, atol=1e-6, rtol=1e-5, msg=k)
        moved += not torch.allclose(mean, last, atol=1e-6)
    assert moved > 0  # the mean is not the last step's weights


def test_weight_averaging_off_in_plans_and_older_plans_and_refused_out_of_range(phantoms, tmp_path):
    from spineauto.planning.plans import Plans

    plans = Plans.load(phantoms / "preprocessed" / DATASET / "plans.json")
    assert all(c.optim.weight_average == 0 for c in plans.configurations.values())  # an option (README: measured, not a lever)
    older = plans.to_dict()  # planned before the field existed: trains and resumes as it did
    del older["configurations"]["2d"]["optim"]["weight_average"]
    (tmp_path / "plans.json").write_text(json.dumps(older))
    assert Plans.load(tmp_path / "plans.json").configurations["2d"].optim.weight_average == 0.0
    with pytest.raises(SpineautoError, match="optim.weight_average"):
        _train(phantoms, "bad_average", epochs=1, iters_per_epoch=1, config_set=["optim.weight_average=1.5"])


def test_sigkill_mid_epoch_then_continue_completes(phantoms):
    env = dict(os.environ, SPINEAUTO_RESULTS=str(phantoms / "killed"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "spineauto", "train", "-d", "1", "-f", "0", "--epochs", "3", "--iters-per-epoch", "6",
           "--val-iters", "1", "--wandb", "disabled", "--num-workers", "1", "--no-validate"]
    fold = phantoms / "killed" / DATASET / "spineautoTrainer__spineautoPlans__2d" / "fold_0"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not ((fold / "metrics.jsonl").is_file() and (fold / "metrics.jsonl").read_text().count("\n") >= 1):
            assert proc.poll() is None and time.time() < deadline, "training ended or stalled before its first epoch"
            time.sleep(0.05)
        time.sleep(0.3)  # into epoch 1
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert torch.load(fold / "checkpoint_latest.pt", weights_only=False)["epoch"] in (1, 2)
    done = subprocess.run(cmd + ["--continue"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["epoch"] for r in fold_history(fold)] == [0, 1, 2]
    assert (fold / "checkpoint_final.pt").is_file()
    assert not list(fold.glob(".*tmp*"))


def test_ddp_two_cpu_processes_keep_weights_identical(phantoms, tmp_path):
    """Weight averaging on: every rank ends with the mean rank 0 wrote into its checkpoint."""
    r0, r1 = torchrun_training(tmp_path, 2, 0, f"""epochs=2, iters_per_epoch=3, val_iters=1, device="cpu", wandb="disabled",
             num_workers=0, results=r"{phantoms / 'ddp'}", validate=False, config_set=["optim.weight_average=0.5"]""")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    fold = phantoms / "ddp" / DATASET / "spineautoTrainer__spineautoPlans__2d" / "fold_0"
    cfg = json.loads((fold / "config.json").read_text())
    assert cfg["runtime"]["world_size"] == 2 and len(fold_history(fold)) == 2
    start = torch.load(fold / "checkpoint_latest.pt", weights_only=False)
    assert all(torch.equal(start["network"][k], r0[k]) for k in r0)


def test_ddp_batchnorm_layers_normalise_over_the_global_batch_on_both_ranks(phantoms, tmp_path):
    """A BatchNorm U-Net under two gloo processes: SyncBatchNorm (the default) leaves both ranks with the
    same running statistics (each rank's own BatchNorm would end with its own last batch's)."""
    r0, r1 = torchrun_training(tmp_path, 2, 0, f"""epochs=1, iters_per_epoch=3, val_iters=1, device="cpu", wandb="disabled",
             num_workers=0, results=r"{phantoms / 'syncbn'}", validate=False, config_set=["network.norm=batch"]""")
    stats = [k for k in r0 if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any(r0[k].abs().sum() > 0 for k in stats if k.endswith("running_mean"))  # they moved from their initial zeros
    fold = phantoms / "syncbn" / DATASET / "spineautoTrainer__spineautoPlans__2d" / "fold_0"
    net = json.loads((phantoms / "preprocessed" / DATASET / "plans.json").read_text())["configurations"]["2d"]["network"]
    convs = sum(net["n_conv_per_stage"]) + sum(net["n_conv_per_stage_decoder"])  # one norm after each
    assert json.loads((fold / "config.json").read_text())["runtime"]["sync_batchnorm_layers"] == convs


def test_amp_bf16_on_cpu_and_fold_all(phantoms, caplog):
    """-f all validates on its training cases and says so (never "held-out")."""
    with caplog.at_level("INFO", logger="spineauto"):
        fold = _train(phantoms, "amp", fold="all", epochs=1, iters_per_epoch=2, amp=True, validate=True)
    assert fold.name == "fold_all"
    said = [r.getMessage() for r in caplog.records if "validat" in r.getMessage()]
    assert not any("held-out" in m for m in said), said
    assert any(m.endswith("training cases (not held out: no estimate of unseen data) with the sliding window") for m in said), said
    assert any(m.startswith("validation Dice (training cases, not held out): ") for m in said), said
    cfg = json.loads((fold / "config.json").read_text())
    assert cfg["runtime"]["amp"] is True and cfg["runtime"]["amp_dtype"] == "bfloat16"
    assert np.isfinite(fold_history(fold)[0]["train_loss"])


def test_sweep_trials_each_train_their_own_model_folder(phantoms, monkeypatch):
    """Two trials of one W&B sweep (the agent sets WANDB_SWEEP_ID and WANDB_RUN_ID): both models survive."""
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    folds = []
    for trial, lr in (("t1", "0.01"), ("t2", "0.001")):
        monkeypatch.setenv("WANDB_RUN_ID", trial)
        folds.append(_train(phantoms, "sweep", epochs=1, iters_per_epoch=1, config_set=[f"optim.initial_lr={lr}"]))
    base = phantoms / "sweep" / DATASET
    assert folds == [base / f"sweep_sw1/trial_{t}/spineautoTrainer__spineautoPlans__2d/fold_0" for t in ("t1", "t2")]
    lrs = [torch.load(f / "checkpoint_final.pt", weights_only=False)["run_config"]["overrides"]["values"]["optim"]["initial_lr"]
           for f in folds]
    assert lrs == [0.01, 0.001]
    scans = json.loads((folds[0].parent / "training_range.json").read_text())  # what the pipeline's QC compares scans with
    cases = json.loads((phantoms / "preprocessed" / DATASET / "fingerprint.json").read_text())["cases"]
    assert scans["cases"] == len(cases) and not any(c["case"] in json.dumps(scans) for c in cases)
    assert scans["spacing_mm"]["max"][2] == pytest.approx(max(max(c["spacing"]) for c in cases))
    monkeypatch.setenv("WANDB_RUN_ID", "../x")
    with pytest.raises(SpineautoError, match=r"WANDB_RUN_ID='\.\./x': not a W&B id"):
        _train(phantoms, "sweep", epochs=1, iters_per_epoch=1)


def test_wandb_offline_writes_run_files(phantoms, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")
    fold = _train(phantoms, "wandb", epochs=1, iters_per_epoch=1, wandb="offline")
    runs = list((fold / "wandb").glob("offline-run-*"))
    assert runs and any(f.suffix == ".wandb" for f in runs[0].rglob("*")), list((fold / "wandb").rglob("*"))


# -- bad input --------------------------------------------------------------------------------------
def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1, err
    assert "Traceback" not in err
    text = " ".join(err.split())
    for n in needles:
        assert n in text, text


def test_bad_inputs_one_line_each(phantoms, trained, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SPINEAUTO_RESULTS", str(phantoms / "bad"))
    code, _, err = run_cli(capsys, "train", "-d", "1", "-f", "5", "--wandb", "disabled")
    _one_line_error(code, err, "fold 5 is out of range")
    code, _, err = run_cli(capsys, "train", "-d", "1", "-f", "0", "--continue", "--wandb", "disabled")
    _one_line_error(code, err, "no checkpoint to continue from")
    # no plans yet
    (phantoms / "raw" / "Dataset002_Empty").mkdir()
    code, _, err = run_cli(capsys, "train", "-d", "Dataset002_Empty", "-f", "0")
    _one_line_error(code, err, "no plans yet", "plan_and_preprocess")
    # --continue after the plan changed
    monkeypatch.setenv("SPINEAUTO_RESULTS", str(phantoms / "learn"))
    plans = phantoms / "preprocessed" / DATASET / "plans.json"
    original = plans.read_text()
    try:
        data = json.loads(original)
        data["configurations"]["2d"]["optim"]["initial_lr"] = 0.01
        plans.write_text(json.dumps(data))
        code, _, err = run_cli(capsys, "train", "-d", "1", "-f", "0", "--continue", "--wandb", "disabled")
        _one_line_error(code, err, "another plan")
    finally:
        plans.write_text(original)
    # --continue with different overrides
    code, _, err = run_cli(capsys, "train", "-d", "1", "-f", "0", "--continue", "--epochs", "9", "--wandb", "disabled")
    _one_line_error(code, err, "cannot --continue", "epochs: 6 -> 9")
    # --pretrained from another topology
    from spineauto.networks.build import build_network
    from spineauto.planning.plans import Plans

    plan = Plans.load(plans).configuration("2d")
    plan.network.features_per_stage = [4, 8, 16, 32]
    torch.save({"network": build_network(plan, 1, 3).state_dict()}, tmp_path / "other.pt")
    monkeypatch.setenv("SPINEAUTO_RESULTS", str(phantoms / "bad"))
    code, _, err = run_cli(capsys, "train", "-d", "1", "-f", "0", "--pretrained", str(tmp_path / "other.pt"), "--wandb", "disabled")
    _one_line_error(code, err, "--pretrained", "encoder tensor(s) do not match", "encoder.stages.0")


def test_pretrained_loads_matching_tensors(phantoms, trained):
    from spineauto.networks.build import build_network
    from spineauto.planning.plans import Plans
    from spineauto.training.checkpoint import load_pretrained

    plans = Plans.load(phantoms / "preprocessed" / DATASET / "plans.json")
    net = build_network(plans.configuration("2d"), 1, 2)  # a 2-label network: the output layers differ
    loaded, skipped = load_pretrained(net, trained / "checkpoint_final.pt")
    ref = torch.load(trained / "checkpoint_final.pt", weights_only=False)["network"]
    assert all(torch.equal(net.state_dict()[k], ref[k]) for k in loaded)
    assert any(k.startswith("encoder.") for k in loaded) and skipped and all(k.startswith("decoder.") for k in skipped)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(phantoms, monkeypatch):
    from spineauto.training.tasks import SegmentationTask

    loss = SegmentationTask.loss
    calls = {"n": 0}

    def poisoned(self, output, batch):
        calls["n"] += 1
        value = loss(self, output, batch)
        return value * float("nan") if calls["n"] > 4 else value  # epoch 0: 3 train + 1 val iterations

    monkeypatch.setattr(SegmentationTask, "loss", poisoned)
    with pytest.raises(SpineautoError, match="NaN") as err:
        _train(phantoms, "nan", epochs=3, iters_per_epoch=3)
    assert "\n" not in str(err.value)
    fold = phantoms / "nan" / DATASET / "spineautoTrainer__spineautoPlans__2d" / "fold_0"
    good = torch.load(fold / "checkpoint_latest.pt", weights_only=False)
    assert good["epoch"] == 1 and all(torch.isfinite(v).all() for v in good["network"].values() if v.is_floating_point())


def test_checkpoint_write_failure_leaves_no_corrupt_file(phantoms, monkeypatch):
    from spineauto.training import checkpoint

    fold = _train(phantoms, "diskfull", epochs=1, iters_per_epoch=1)
    before = (fold / "checkpoint_latest.pt").read_bytes()
    real_save = torch.save

    def failing_save(obj, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(SpineautoError, match="could not write the checkpoint") as err:
        checkpoint.save_checkpoint(fold / "checkpoint_latest.pt", {"x": 1})
    assert "\n" not in str(err.value)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert (fold / "checkpoint_latest.pt").read_bytes() == before
    assert not [p for p in fold.iterdir() if ".tmp" in p.name]


# -- find_best_configuration on what training wrote ------------------------------------------------
def test_find_best_configuration_ensembles_what_training_wrote(phantoms, monkeypatch):
    """Two configurations trained with --npz: the ensemble row is the Dice of the mean of the
    validation probabilities the trainer saved, and the best candidate is the highest row."""
    from spineauto.evaluation.best_configuration import find_best_configuration
    from spineauto.evaluation.metrics import dice
    from spineauto.inference.ensemble import average_probabilities
    from spineauto.io.images import read_volume

    plans_path = phantoms / "preprocessed" / DATASET / "plans.json"
    data = json.loads(plans_path.read_text())
    data["configurations"]["2d_wide"] = {**data["configurations"]["2d"], "name": "2d_wide"}
    data["configurations"]["2d_wide"]["network"] = {**data["configurations"]["2d"]["network"], "features_per_stage": [12, 24, 48, 96]}
    plans_path.write_text(json.dumps(data, indent=1))
    monkeypatch.setenv("SPINEAUTO_RESULTS", str(phantoms / "ensemble"))
    folds = {c: _train(phantoms, "ensemble", configuration=c, epochs=2, iters_per_epoch=10, validate=True, save_probabilities=True)
             for c in ("2d", "2d_wide")}
    result = find_best_configuration(1, allow_incomplete=True)  # fold 0 of each configuration only
    rows = {c.name: c for c in result.candidates}
    assert list(rows) == ["2d", "2d_wide", "2d+2d_wide"]
    refs = {p.name[:-7]: read_volume(p)[0].round() for p in (phantoms / "raw" / DATASET / "labelsTr").glob("*.nii.gz")}
    cases = sorted(p.name[:-4] for p in (folds["2d"] / "validation").glob("*.npz"))
    assert cases and cases == sorted(p.name[:-4] for p in (folds["2d_wide"] / "validation").glob("*.npz"))
    ens = {case: average_probabilities([folds[c] / "validation" / f"{case}.npz" for c in folds])[0].argmax(0) for case in cases}
    per_label = [[dice(ens[case] == v, refs[case] == v) for case in cases] for v in data["labels"].values() if v]
    per_label = [np.nanmean(d) for d in per_label if not np.isnan(d).all()]  # a label absent from both: not scored
    assert rows["2d+2d_wide"].dice == pytest.approx(float(np.mean(per_label)), abs=1e-6) and rows["2d+2d_wide"].cases == len(cases)
    assert result.best is max(result.candidates, key=lambda c: c.best_dice)
    assert (phantoms / "ensemble" / DATASET / "best_configuration.json").is_file()


def test_he_initialisation_is_nnunets_weight_for_weight_and_torch_keeps_pytorchs():
    """network.init "he" starts from exactly the weights nnU-Net's get_network_from_plans(allow_init=True) gives the
    same U-Net under the same seed (InitWeights_He(1e-2): zero biases); "torch" from PyTorch's defaults (allow_init=False)."""
    import dataclasses

    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from spineauto.networks.build import build_network
    from spineauto.networks.registry import common_kwargs
    from spineauto.planning.plans import ConfigurationPlan, NetworkPlan

    net = NetworkPlan(features_per_stage=[8, 16, 32], kernel_sizes=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]],
                      n_conv_per_stage=[2, 2, 2], n_conv_per_stage_decoder=[2, 2], init="he")
    plan = ConfigurationPlan(name="2d", task="segmentation", data_identifier="2d", slicing="per_case", isotropic_plane="axial",
                             target_spacing=[1, 1], patch_size=[32, 32], batch_size=2, normalization=["ZScoreNormalization"],
                             use_mask_for_norm=[False], network=net)
    kw = {k: v for k, v in dataclasses.asdict(net).items() if k in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage",
                                                                      "n_conv_per_stage_decoder")}
    arch = {**kw, **common_kwargs(net), "n_stages": 3}
    for init, allow in (("he", True), ("torch", False)):
        torch.manual_seed(3)
        theirs = get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", dict(arch), [], 1, 2,
                                        allow_init=allow, deep_supervision=True).state_dict()
        torch.manual_seed(3)
        mine = build_network(dataclasses.replace(plan, network=dataclasses.replace(net, init=init)), 1, 2).state_dict()
        assert set(mine) == set(theirs)
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), init
        biases = [v for k, v in mine.items() if k.endswith("conv.bias")]
        assert biases and all(b.abs().max() == 0 for b in biases) == (init == "he")
    first = mine["encoder.stages.0.0.convs.0.conv.weight"]  # torch: kaiming uniform (a = sqrt 5), std 1/sqrt(3 fan_in)
    assert abs(first.std().item() * (3 * 9) ** 0.5 - 1) < 0.3
