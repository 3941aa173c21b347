"""Kill-and-rerun for `spineauto train`, and `--continue` from a damaged checkpoint_latest.pt.

The reference is RUN (3 epochs x 3 iterations, seed 0) uninterrupted. A `spineauto train` subprocess is
SIGKILLed at seeded moments: during its first epoch (before any checkpoint), or a seeded delay after
its k-th checkpoint_latest.pt write (the next epoch; within milliseconds: the copies to best/top-k, the
top-k index, the logs; after the last epoch's write: before the copy to checkpoint_final.pt).
While the first one runs, a second `train` of the fold is refused naming its pid. The rerun
(`--continue`, or a plain `train` when no checkpoint was written yet) takes over the dead process's
lock and must end with the reference's final weights (atol 1e-6, as tests/test_training.py's resume
test), the full metrics history, no temporary files and separate checkpoint files.

Damaged latest: seeded truncations (and garbage, and a missing file), some with the newest top-k/best
copies damaged too; `--continue` names the intact checkpoint of the latest epoch it falls back to,
and finishes with the reference's weights. With no intact checkpoint it is one line, nothing changed.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from train_support import RUN, copy_run, finished, interrupted_late, logged, one_error, root, spawn, train, tree_hash, use  # noqa: F401 (fixtures)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def reference(finished) -> dict:
    return torch.load(next(finished.rglob("fold_0/checkpoint_final.pt")), weights_only=False)["network"]


def _check_finished(fold: Path, reference: dict, where: str = "") -> None:
    final = torch.load(fold / "checkpoint_final.pt", weights_only=False)
    assert final["epoch"] == 3, where
    for k, v in reference.items():
        torch.testing.assert_close(final["network"][k], v, atol=1e-6, rtol=1e-5, msg=f"{k} ({where})")
    assert [json.loads(line)["epoch"] for line in (fold / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2], where
    assert not [p for p in fold.rglob(".*tmp*")], f"temporary files left behind ({where})"
    top = json.loads((fold / "checkpoints_top.json").read_text())["checkpoints"]
    assert [e["epoch"] for e in top] and all((fold / e["file"]).is_file() for e in top), where
    files = list(fold.glob("checkpoint_*.pt"))
    assert all(p.stat().st_nlink == 1 for p in files), where
    assert torch.load(fold / "checkpoint_latest.pt", weights_only=False)["epoch"] == 3, where


def _moment(case: int) -> tuple[int, float]:
    """(checkpoint_latest.pt writes to wait for, then seconds): during the first epoch; in a later epoch;
    within milliseconds of a write (the copies to best/top-k, the index, the logs); after the last
    epoch's write (before or during the copy to checkpoint_final.pt)."""
    rng = random.Random(1000 + case)
    return [(0, rng.uniform(0.2, 1.2)), (1, rng.uniform(0.0, 0.35)), (2, rng.uniform(0.0, 0.35)),
            (rng.randrange(1, 3), rng.uniform(0.0, 0.01)), (3, rng.uniform(0.0, 0.005))][case]


def _wait_for(fold: Path, writes: int, proc, deadline: float) -> None:
    seen: set[int] = set()
    while True:
        assert proc.poll() is None and time.time() < deadline, "train ended or stalled before the moment"
        if writes == 0 and (fold / "log.txt").exists():
            return
        try:
            seen.add((fold / "checkpoint_latest.pt").stat().st_ino)  # each atomic write is a new file
        except FileNotFoundError:
            pass
        if writes and len(seen) >= writes:
            return
        time.sleep(0.002)


@pytest.mark.parametrize("case", range(5))
def test_sigkill_at_a_seeded_moment_then_rerun_equals_uninterrupted(case, root, reference, tmp_path, monkeypatch, capsys):
    fold = use(monkeypatch, root, tmp_path / "results")
    writes, delay = _moment(case)
    proc = spawn(*RUN)
    try:
        _wait_for(fold, writes, proc, time.time() + 120)
        if case == 0:  # the running train holds the fold: a second one is refused, naming it; the first is
            os.killpg(proc.pid, signal.SIGSTOP)  # frozen meanwhile, so that a slow refusal on a loaded machine
            try:  # cannot let it finish before the moment (it still holds the lock: alive, only stopped)
                code, err = train(capsys, *RUN, "--continue")
            finally:
                os.killpg(proc.pid, signal.SIGCONT)
            one_error(code, err, f"is locked by pid {proc.pid} on this host since")
        time.sleep(delay)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    resumable = (fold / "checkpoint_latest.pt").is_file()
    where = (f"SIGKILL {delay:.3f} s after {writes} checkpoint write(s) (exit {proc.returncode}), left "
             f"{sorted(p.name for p in fold.glob('checkpoint_*.pt'))}")
    code, err = train(capsys, *RUN, *(["--continue"] if resumable else []))
    assert code == 0, where + err[-3000:]
    if proc.returncode == -signal.SIGKILL:
        assert logged(err, f"taking over the lock of pid {proc.pid}"), where
    _check_finished(fold, reference, where)


def _damage(path: Path, how: str, rng: random.Random) -> None:
    size = path.stat().st_size
    if how == "missing":
        path.unlink()
    elif how == "garbage":
        path.write_bytes(rng.randbytes(size))
    else:
        with open(path, "r+b") as f:
            f.truncate({"empty": 0, "1 byte": 1, "head": rng.randrange(2, 1000), "most": rng.randrange(size // 4, size - 1)}[how])


DAMAGE = ["empty", "1 byte", "head", "most", "garbage", "missing"]


@pytest.mark.parametrize("case", range(len(DAMAGE)))
def test_continue_falls_back_from_a_damaged_latest(case, root, interrupted_late, reference, tmp_path, monkeypatch, capsys):
    rng = random.Random(2000 + case)
    fold = copy_run(interrupted_late, tmp_path / "results")
    use(monkeypatch, root, tmp_path / "results")
    epochs = {p.name: torch.load(p, weights_only=False)["epoch"] for p in fold.glob("checkpoint_*.pt")}
    assert epochs["checkpoint_latest.pt"] == 2
    _damage(fold / "checkpoint_latest.pt", DAMAGE[case], rng)
    damaged = {"checkpoint_latest.pt"}
    if case == len(DAMAGE) - 1 or rng.random() < 0.5:  # the newest copies too: back to an earlier epoch
        for name in [n for n, e in epochs.items() if e == 2 and n not in damaged]:
            _damage(fold / name, rng.choice(DAMAGE[:5]), rng)
            damaged.add(name)
    newest = max(e for n, e in epochs.items() if n not in damaged)
    code, err = train(capsys, *RUN, "--continue")
    assert code == 0, err[-3000:]
    said = re.search(r"continuingfrom(checkpoint_\w+\.pt)\(epoch(\d+)\)", "".join(err.split()))  # rich wraps log lines
    assert said and int(said.group(2)) == newest and epochs[said.group(1)] == newest and said.group(1) not in damaged, err[-2000:]
    assert logged(err, f"{fold / 'checkpoint_latest.pt'}:", "the newest intact checkpoint")
    _check_finished(fold, reference)


def test_continue_of_a_finished_run_with_a_damaged_latest_repairs_it(root, finished, tmp_path, monkeypatch, capsys):
    fold = copy_run(finished, tmp_path / "results")
    use(monkeypatch, root, tmp_path / "results")
    _damage(fold / "checkpoint_latest.pt", "head", random.Random(3))
    code, err = train(capsys, *RUN, "--continue")
    assert code == 0, err[-3000:]
    assert logged(err, "(epoch 3), the newest intact checkpoint", "training already complete")
    assert torch.load(fold / "checkpoint_latest.pt", weights_only=False)["epoch"] == 3


def test_continue_without_an_intact_checkpoint_is_one_line(root, interrupted_late, tmp_path, monkeypatch, capsys):
    fold = copy_run(interrupted_late, tmp_path / "results")
    use(monkeypatch, root, tmp_path / "results")
    rng = random.Random(4)
    for p in fold.glob("checkpoint_*.pt"):
        _damage(p, rng.choice(DAMAGE[:5]), rng)
    before = tree_hash(tmp_path / "results")
    one_error(*train(capsys, *RUN, "--continue"), str(fold / "checkpoint_latest.pt"), "other checkpoint(s)", "--overwrite")
    assert tree_hash(tmp_path / "results") == before
