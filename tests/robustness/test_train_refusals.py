"""`spineauto train` never destroys an earlier run by accident, and path problems are one line.

Generated cases, each asserting the exit code, one `error:` line without traceback, and that no file
under the results folder changed (hash before/after the refused command):
- a fresh `train` on a fold with checkpoints (seeded subsets of the earlier run's checkpoint files,
  seeded extra options) is refused; `--continue --overwrite` together is refused;
- `--overwrite` moves the run aside and deletes it only after the new run's first checkpoint; a SIGKILL
  before that leaves the old run byte-identical in previous_fold_0/, and the message said where;
- checkpoint files are separate files (no hard links): a damaged latest leaves final/best/top intact;
- path errors: the results folder, the dataset folder, the model folder or the fold folder being a
  file; read-only results, model or fold folders.
"""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from train_support import (DATASET, MODEL, RUN, copy_run, finished, interrupted, logged, one_error, root, spawn,  # noqa: F401 (fixtures)
                           train, train_readonly, tree_hash, use)

torch.set_num_threads(1)
CHECKPOINTS = ["checkpoint_latest.pt", "checkpoint_final.pt", "checkpoint_best.pt", "checkpoint_top_epoch0000.pt",
               "checkpoint_top_epoch0001.pt", "checkpoint_top_epoch0002.pt"]
EXTRA = [[], ["--epochs", "5"], ["--seed", "7"], ["--iters-per-epoch", "2"], ["-c", "2d"], ["--amp"]]


# -- class 1: an earlier run is never replaced without being asked ---------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_fresh_train_on_a_fold_with_checkpoints_is_refused(seed, root, finished, tmp_path, monkeypatch, capsys):
    rng = random.Random(seed)
    fold = copy_run(finished, tmp_path / "results")
    use(monkeypatch, root, tmp_path / "results")
    keep = set(rng.sample(CHECKPOINTS, rng.randint(1, len(CHECKPOINTS))))
    for name in CHECKPOINTS:
        if name not in keep:
            (fold / name).unlink()
    before = tree_hash(tmp_path / "results")
    code, err = train(capsys, *RUN, *EXTRA[seed % len(EXTRA)])
    one_error(code, err, str(fold), "holds an earlier run", "--continue", "--overwrite")
    assert tree_hash(tmp_path / "results") == before


def test_continue_and_overwrite_together_are_refused(root, finished, tmp_path, monkeypatch, capsys):
    copy_run(finished, tmp_path / "results")
    use(monkeypatch, root, tmp_path / "results")
    before = tree_hash(tmp_path / "results")
    one_error(*train(capsys, "--continue", "--overwrite"), "--continue", "--overwrite")
    assert tree_hash(tmp_path / "results") == before


def test_overwrite_replaces_the_run_once_it_has_a_checkpoint(root, finished, tmp_path, monkeypatch, capsys):
    fold = copy_run(finished, tmp_path / "results")
    use(monkeypatch, root, tmp_path / "results")
    code, err = train(capsys, "--overwrite", "--epochs", "1", "--iters-per-epoch", "1", "--seed", "5")
    assert code == 0, err[-3000:]
    aside = fold.parent / "previous_fold_0"
    assert logged(err, str(aside)) and not aside.exists()
    assert torch.load(fold / "checkpoint_final.pt", weights_only=False)["run_config"]["seed"] == 5
    assert not (fold / "checkpoint_top_epoch0002.pt").exists()  # nothing of the old run is mixed in
    assert [p.name for p in fold.parent.iterdir() if p.name.startswith(".")] == []  # the lock is gone


def test_overwrite_killed_before_its_first_checkpoint_keeps_the_old_run(root, finished, tmp_path, monkeypatch, capsys):
    fold = copy_run(finished, tmp_path / "results")
    use(monkeypatch, root, tmp_path / "results")
    original = tree_hash(fold)
    aside = fold.parent / "previous_fold_0"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as f:
        proc = spawn("--overwrite", "--epochs", "2", "--iters-per-epoch", "60", stderr=f)
        try:
            deadline = time.time() + 120
            while not aside.exists():
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.005)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not list(fold.glob("checkpoint_*.pt")), "killed too late: the new run already had a checkpoint"
    assert tree_hash(aside) == original  # recoverable as it was
    assert logged(log.read_text(), str(aside))  # and the message said where
    # --continue takes over the killed run's lock, finds no checkpoint and says where the old run is
    lock = fold.parent / ".fold_0.lock"
    assert lock.is_file()
    before = tree_hash(tmp_path / "results", ignore=(lock.name,))
    code, err = train(capsys, "--continue")
    one_error(code, err, "no checkpoint to continue from", str(aside), "move it back")
    assert logged(err, f"taking over the lock of pid {proc.pid}") and not lock.exists()
    assert tree_hash(tmp_path / "results") == before
    # --overwrite again: the old run is the one replaced, deleted after the new first checkpoint
    code, err = train(capsys, "--overwrite", "--epochs", "1", "--iters-per-epoch", "1")
    assert code == 0, err[-3000:]
    assert not aside.exists() and (fold / "checkpoint_final.pt").is_file()


def test_checkpoint_files_are_separate_files(root, finished, tmp_path):
    fold = copy_run(finished, tmp_path / "results")
    files = sorted(fold.glob("checkpoint_*.pt"))
    stats = [p.stat() for p in files]
    assert len(files) == 6 and all(s.st_nlink == 1 for s in stats) and len({s.st_ino for s in stats}) == len(files)
    final = torch.load(fold / "checkpoint_final.pt", weights_only=False)["network"]
    with open(fold / "checkpoint_latest.pt", "r+b") as f:  # damaged in place (as a disk error or a careless tool would)
        f.truncate(1000)
    for p in files:
        if p.name != "checkpoint_latest.pt":
            state = torch.load(p, weights_only=False)
            if p.name in ("checkpoint_final.pt", "checkpoint_top_epoch0002.pt"):
                assert all(torch.equal(state["network"][k], v) for k, v in final.items())


# -- class 3: path and permission problems are one line naming the path --------------------------------------
def _file_at(where: str, tmp_path: Path, results: Path) -> Path:
    target = {"results": results, "dataset": results / DATASET, "model": results / DATASET / MODEL,
              "fold": results / DATASET / MODEL / "fold_0"}[where]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("not a folder\n")
    return target


@pytest.mark.parametrize("where", ["results", "dataset", "model", "fold"])
def test_a_file_where_a_results_folder_goes(where, root, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    blocker = _file_at(where, tmp_path, results)
    use(monkeypatch, root, results)
    watched = tmp_path / "results" if where != "results" else blocker
    before = tree_hash(watched)
    one_error(*train(capsys, "--epochs", "1", "--iters-per-epoch", "1"), str(blocker))
    assert tree_hash(watched) == before


@pytest.mark.parametrize("case", ["fresh run, read-only results", "--continue, read-only model folder",
                                  "--continue, read-only fold folder", "--overwrite, read-only model folder"])
def test_read_only_folders(case, root, finished, interrupted, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    if case.startswith("fresh"):
        results.mkdir()
        readonly, args = results, ["--epochs", "1", "--iters-per-epoch", "1"]
    else:
        fold = copy_run(interrupted if "--continue" in case else finished, results)
        readonly = fold if "fold folder" in case else fold.parent
        args = [case.split(",")[0]]
    use(monkeypatch, root, results)
    before = tree_hash(results)
    code, err = train_readonly(capsys, readonly, tmp_path, *args)
    line = one_error(code, err, str(readonly))
    assert "Read-only file system" in line or "Permission denied" in line, line
    assert tree_hash(results) == before
