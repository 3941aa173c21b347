"""A third round of hostile but realistic inputs and faults (cases the first rounds did not list):
diverged checkpoints, signals and killed runs around bundles, ... Each case failed before its fix;
every refusal is one line naming the path and the cause.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from model_world import MODEL, model_world, one_error_line as _one_error_line


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    yield from model_world(tmp_path_factory, "hostile")


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


def test_sigterm_and_kill_leave_no_unpacked_bundle_behind(world, tmp_path, capsys):
    """`timeout`/`kill` (SIGTERM) of `predict -m model.zip` left its unpacked bundle in TMPDIR, and so did
    SIGKILL, for ever; now SIGTERM runs the exit handlers and the next bundle opened removes a dead
    process's folder."""
    import os
    import signal
    import subprocess
    import sys

    code, _, err = run_cli(capsys, "export", "-m", str(world["results"] / "Dataset001_Ph" / MODEL), "-o", str(tmp_path / "m.zip"))
    assert code == 0, err
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    script = ("import sys, time\nfrom spineauto.cli import exit_on_sigterm\nfrom spineauto.inference.bundle import open_bundle\n"
              "exit_on_sigterm()\nprint(open_bundle(sys.argv[1]), flush=True)\ntime.sleep(60)\n")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "m.zip")], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        unpacked = Path(proc.stdout.readline().strip())
        assert unpacked.is_dir() and tmp in unpacked.parents
        proc.send_signal(sig)
        proc.wait(30)
        if sig == signal.SIGTERM:
            assert proc.returncode == 128 + signal.SIGTERM and list(tmp.iterdir()) == []
    assert len(list(tmp.iterdir())) == 1  # SIGKILL: nothing ran; the next process to open a bundle removes it
    from spineauto.inference import bundle

    os.environ["TMPDIR"], old = str(tmp), os.environ.get("TMPDIR")
    import tempfile
    tempfile.tempdir = None
    try:
        bundle._opened.clear()
        mine = bundle.open_bundle(tmp_path / "m.zip")
        assert [p.name for p in tmp.iterdir()] == [mine.parent.name]
    finally:
        os.environ.pop("TMPDIR") if old is None else os.environ.__setitem__("TMPDIR", old)
        tempfile.tempdir = None
        shutil.rmtree(mine.parent, ignore_errors=True)


@pytest.mark.parametrize("change, cause", [
    ({"channel_names": {"0": ["MRI"]}}, "'channel_names' must map"),  # was an AttributeError traceback in planning
    ({"labels": {"background": 0, "cord": 1, "x": 100000}}, "consecutive"),  # was planned: a network of 100001 output channels
    ({"labels": {"background": 0, "cord": -1}}, "consecutive"),
])
def test_dataset_json_wrong_types_and_label_gaps_are_one_line(tmp_path, capsys, monkeypatch, change, cause):
    import json

    from spineauto.datasets.phantoms import write_phantom_dataset

    raw = tmp_path / "raw" / "Dataset002_X"
    write_phantom_dataset(raw, n_train=2, n_test=0, seed=0)
    data = json.loads((raw / "dataset.json").read_text())
    (raw / "dataset.json").write_text(json.dumps({**data, **change}))
    monkeypatch.setenv("SPINEAUTO_RAW", str(tmp_path / "raw"))
    monkeypatch.setenv("SPINEAUTO_PREPROCESSED", str(tmp_path / "pre"))
    code, _, err = run_cli(capsys, "plan_and_preprocess", "-d", "2", "-np", "1")
    line = _one_error_line(err)
    assert code == 1 and str(raw / "dataset.json") in line and cause in line, line
    assert not (tmp_path / "pre" / "Dataset002_X" / "plans.json").exists()


def test_brackets_in_paths_and_values_are_printed_as_they_are(world, tmp_path, capsys):
    """The one-line error and the summary lines went through rich markup: a folder named `x[/]y` was a
    MarkupError traceback, `z[red]w` was shown as `zw`, and a plan's `[nan, 1.0]` as nothing."""
    empty = tmp_path / "x[/]y"
    empty.mkdir(parents=True)
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", str(empty), "-o", str(tmp_path / "o"), "--device", "cpu")
    line = _one_error_line(err)
    assert code == 1 and str(empty) in line, line
    scans = tmp_path / "z[red]w"
    shutil.copytree(world["raw"] / "Dataset001_Ph" / "imagesTs", scans)
    out = tmp_path / "out[/]put"
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", str(scans), "-o", str(out), "--device", "cpu", "--no-tta")
    assert code == 0 and "out[/]put with" in err and any(out.glob("*.nii.gz")), err
    import json

    model = tmp_path / "model"
    shutil.copytree(world["results"] / "Dataset001_Ph" / MODEL, model)
    plans = json.loads((model / "plans.json").read_text())
    plans["configurations"]["2d"]["target_spacing"] = [float("nan"), 1.0]
    (model / "plans.json").write_text(json.dumps(plans))
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-m", str(model), "-i", str(scans), "-o", str(tmp_path / "o2"), "--device", "cpu")
    line = _one_error_line(err)
    assert code == 1 and "target_spacing" in line and "[nan, 1.0]" in line, line


def test_ensemble_refuses_other_scans_of_the_same_name_and_a_folder_given_twice(world, tmp_path, capsys):
    """Probabilities of two different scans (same case name and size, another position and a flip) were
    averaged into one mask with exit 0; so was a folder with itself (or its symlink)."""
    import nibabel as nib
    import numpy as np

    scans = world["raw"] / "Dataset001_Ph" / "imagesTs"
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in scans.glob("*.nii.gz"):
        im = nib.load(f)
        affine = im.affine.copy()
        affine[:3, 3] += 50
        nib.save(nib.Nifti1Image(np.asarray(im.dataobj)[::-1].copy(), affine), moved / f.name)
    for src, out in ((scans, "a"), (moved, "b")):
        code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", str(src), "-o", str(tmp_path / out), "--save-probabilities",
                               "--device", "cpu", "--no-tta")
        assert code == 0, err
    code, _, err = run_cli(capsys, "ensemble", "-i", str(tmp_path / "a"), "-i", str(tmp_path / "b"), "-o", str(tmp_path / "ab"))
    line = _one_error_line(err)
    assert code == 1 and "placed elsewhere" in line and str(tmp_path / "b") in line, line
    assert not any((tmp_path / "ab").glob("*.nii.gz"))
    (tmp_path / "alias").symlink_to(tmp_path / "a")
    code, _, err = run_cli(capsys, "ensemble", "-i", str(tmp_path / "a"), "-i", str(tmp_path / "alias"), "-o", str(tmp_path / "aa"))
    line = _one_error_line(err)
    assert code == 1 and "given twice" in line and str(tmp_path / "alias") in line, line


def test_evaluate_refuses_the_reference_as_its_own_prediction(world, tmp_path, capsys):
    """`evaluate GT GT` (or GT through a symlink) scored Dice 1.0 on every case with exit 0."""
    gt = world["raw"] / "Dataset001_Ph" / "labelsTs"
    (tmp_path / "pred").symlink_to(gt)
    code, _, err = run_cli(capsys, "evaluate", str(tmp_path / "pred"), str(gt), "-o", str(tmp_path / "s.json"))
    line = _one_error_line(err)
    assert code == 1 and str(tmp_path / "pred") in line and "ground-truth folder" in line, line
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("tamper", ["epoch=-5", "epoch='x'", "epoch=10**12", "nan weights", "no rng", "history='oops'"])
def test_continue_from_a_tampered_latest_falls_back_to_an_intact_checkpoint(tamper, tmp_path, monkeypatch, capsys, tmp_path_factory):
    """A checkpoint_latest.pt that loads but holds nonsense (negative, text or huge epoch, NaN weights,
    no RNG state, a history that is no list) was a traceback mid-training, a run "trained" past its end,
    or a diverged run continued; now it is damaged like an unreadable one: the newest intact checkpoint
    is continued, with a warning naming it."""
    from train_support import RUN, copy_run, logged, planned, train, use

    root = planned(tmp_path_factory)
    fold = copy_run(_interrupted(tmp_path_factory), tmp_path / "results")
    use(monkeypatch, root, tmp_path / "results")
    state = torch.load(fold / "checkpoint_latest.pt", weights_only=False)
    if tamper == "nan weights":
        key = next(iter(state["network"]))
        state["network"][key] = torch.full_like(state["network"][key], float("nan"))
    elif tamper == "no rng":
        del state["rng"]
    else:
        key, value = tamper.split("=")
        state[key] = eval(value)  # noqa: S307 - the test's own literal
    torch.save(state, fold / "checkpoint_latest.pt")
    code, err = train(capsys, *RUN, "--continue")
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert logged(err, f"{fold / 'checkpoint_latest.pt'}:", "the newest intact checkpoint"), err[-2000:]
    assert torch.load(fold / "checkpoint_latest.pt", weights_only=False)["epoch"] == 3


def test_continue_from_weights_of_another_shape_is_one_line(tmp_path, monkeypatch, capsys, tmp_path_factory):
    from train_support import RUN, copy_run, one_error, planned, train, use

    root = planned(tmp_path_factory)
    fold = copy_run(_interrupted(tmp_path_factory), tmp_path / "results")
    use(monkeypatch, root, tmp_path / "results")
    for p in fold.glob("checkpoint_*.pt"):
        if p.name != "checkpoint_latest.pt":
            p.unlink()
    state = torch.load(fold / "checkpoint_latest.pt", weights_only=False)
    key = next(iter(state["network"]))
    state["network"][key] = torch.zeros(3, 3)
    torch.save(state, fold / "checkpoint_latest.pt")
    one_error(*train(capsys, *RUN, "--continue"), str(fold / "checkpoint_latest.pt"), "does not fit", "size mismatch", "--overwrite")


def _interrupted(tmp_path_factory) -> Path:
    from train_support import template

    return template(tmp_path_factory, "interrupted_late", stop_after_epoch=1)


def test_demo_workdir_follows_the_output_rule_and_counts_are_checked(world, tmp_path, capsys):
    """`demo --workdir` a raw dataset or a trained fold wrote raw/ and preprocessed/ into it; `--cases -1`
    was a ValueError traceback."""
    raw = world["raw"] / "Dataset001_Ph"
    fold = world["results"] / "Dataset001_Ph" / MODEL / "fold_0"
    for workdir in (raw, fold, raw / "imagesTr" / "demo"):
        before = sorted(p.name for p in workdir.parent.iterdir()) if not workdir.exists() else sorted(p.name for p in workdir.iterdir())
        code, _, err = run_cli(capsys, "demo", "--workdir", str(workdir), "--cases", "2", "--epochs", "1", "--lesion-iters", "0")
        line = _one_error_line(err)
        assert code == 1 and "the demo's folder" in line and "--workdir" in line, line
        after = sorted(p.name for p in workdir.parent.iterdir()) if not workdir.exists() else sorted(p.name for p in workdir.iterdir())
        assert after == before
    code, _, err = run_cli(capsys, "demo", "--workdir", str(tmp_path / "d"), "--cases", "-1")
    assert code == 2 and "Traceback" not in err and "--cases" in err and not (tmp_path / "d").exists(), err


@pytest.mark.parametrize("flag", [["--lr", "nan"], ["--lr", "-1"], ["--batch-size", "1"], ["--size", "100000"], ["--channels", "2"]])
def test_pretrain_values_are_checked_before_any_image_is_converted(world, tmp_path, capsys, flag):
    """--lr nan/-1 and --batch-size 1 were refused only after every image was converted into OUT/shards/
    (hours on a large source); --size 100000 ran out of memory ("(unknown path): Cannot allocate memory")."""
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "pretrain", str(world["raw"] / "Dataset001_Ph" / "imagesTs"), "-o", str(out), "--self-supervised",
                           "--epochs", "1", "--device", "cpu", "--num-workers", "0", *flag)
    line = _one_error_line(err)
    assert code == 1 and flag[0] in line, line
    assert not out.exists()


@pytest.mark.parametrize("patch, cause", [("[8,8]", "more than one voxel"), ("[100000,100000]", "<= 4096")])
def test_patch_sizes_a_network_cannot_train_are_refused_at_the_door(tmp_path, monkeypatch, capsys, tmp_path_factory, patch, cause):
    """patch_size=[8,8] (the U-Net's total stride) was a ValueError traceback from instance norm at the first
    step; [100000,100000] a numpy _ArrayMemoryError traceback (76 GiB)."""
    from train_support import planned, train, use

    use(monkeypatch, planned(tmp_path_factory), tmp_path / "results")
    code, err = train(capsys, "--epochs", "1", "--iters-per-epoch", "1", f"patch_size={patch}")
    line = _one_error_line(err)
    assert code == 1 and "patch_size" in line and cause in line, line


def test_an_unforeseen_out_of_memory_is_one_line(world, tmp_path, capsys, monkeypatch):
    import numpy as np

    from spineauto.inference import predict

    def huge(*a, **k):
        return np.empty((1 << 62,), np.uint8)

    monkeypatch.setattr(predict, "check_output_apart", huge)
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", str(world["raw"] / "Dataset001_Ph" / "imagesTs"), "-o", str(tmp_path / "o"),
                           "--device", "cpu")
    line = _one_error_line(err)
    assert code == 1 and "out of memory" in line, line


def test_roi_mask_with_nan_is_refused(world, tmp_path):
    """A --roi "mask" of NaN with 0.5 in the cord was used as the cord (NaN > 0 is False) without a word."""
    import nibabel as nib
    import numpy as np

    from spineauto.errors import SpineautoError
    from spineauto.inference.roi import read_roi

    ref = next((world["raw"] / "Dataset001_Ph" / "labelsTs").glob("*.nii.gz"))
    im = nib.load(ref)
    values = np.where(np.asarray(im.dataobj) > 0, 0.5, np.nan).astype(np.float32)
    nib.save(nib.Nifti1Image(values, im.affine), tmp_path / "roi.nii.gz")
    assert read_roi(ref, im.shape, im.affine, "img").any()  # the reference itself is a fine ROI
    with pytest.raises(SpineautoError, match="NaN or infinite") as e:
        read_roi(tmp_path / "roi.nii.gz", im.shape, im.affine, "img")
    assert str(tmp_path / "roi.nii.gz") in str(e.value)


def test_report_refuses_a_folder_that_is_no_pipeline_output(world, tmp_path, capsys):
    """`report FOLDER` on an empty folder, a prediction folder or any other wrote report.html and
    pipeline.csv of 0 cases into it, exit 0."""
    pred = tmp_path / "pred"
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", str(world["raw"] / "Dataset001_Ph" / "imagesTs"), "-o", str(pred),
                           "--device", "cpu", "--no-tta")
    assert code == 0, err
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (pred, empty):
        before = sorted(p.name for p in folder.iterdir())
        code, _, err = run_cli(capsys, "report", str(folder))
        line = _one_error_line(err)
        assert code == 1 and str(folder) in line and "no pipeline case" in line, line
        assert sorted(p.name for p in folder.iterdir()) == before
