"""Shared by tests/robustness/test_train_*.py: one tiny planned phantom dataset per session, finished
and interrupted earlier runs to copy (fixtures: root, finished, interrupted, interrupted_late), tree hashes, the one-line error check, and `spineauto train`
in-process (tests/conftest.py's run_cli) or in a subprocess (to SIGKILL it, or to run it with a
read-only folder).

The plan is shrunk like tests/test_training.py's (a 4-stage U-Net with 8-64 features, Adam), and every
run is a few iterations: a run costs about a second in-process, a subprocess ~3 s more (imports).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from test_training import tiny_plan

DATASET = "Dataset001_Phantoms"
MODEL = "spineautoTrainer__spineautoPlans__2d"
TINY = ["--val-iters", "1", "--wandb", "disabled", "--num-workers", "0", "--no-validate", "--device", "cpu"]
RUN = ["--epochs", "3", "--iters-per-epoch", "3"]  # the run that kill, fallback and resume tests compare with
REPO = Path(__file__).resolve().parents[2]


def planned(tmp_path_factory) -> Path:
    """``<session tmp>/train_robustness`` with raw/ and preprocessed/ (12 phantoms, 5 subjects: fold 0 exists)."""
    root = tmp_path_factory.getbasetemp() / "train_robustness"
    if (root / ".planned").is_file():
        return root
    import torch

    from spineauto.datasets.phantoms import write_phantom_dataset
    from spineauto.plan_and_preprocess import plan_and_preprocess

    torch.set_num_threads(1)  # as tests/test_training.py: oversubscribed OpenMP threads are slow on 2 cores
    shutil.rmtree(root, ignore_errors=True)
    write_phantom_dataset(root / "raw" / DATASET, n_train=12, n_test=0, seed=0)
    plan_and_preprocess(1, workers=2, raw=root / "raw", preprocessed=root / "preprocessed")
    tiny_plan(root / "preprocessed" / DATASET / "plans.json")
    (root / ".planned").write_text("ok")
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return planned(tmp_path_factory)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, root) -> Path:
    """A results folder with RUN finished on fold 0."""
    return template(tmp_path_factory, "finished")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, root) -> Path:
    """RUN stopped after epoch 0 (checkpoint_latest.pt is epoch 1)."""
    return template(tmp_path_factory, "interrupted", stop_after_epoch=0)


@pytest.fixture(scope="module")
def interrupted_late(tmp_path_factory, root) -> Path:
    """RUN stopped after epoch 1: checkpoint_latest.pt is epoch 2, top-k files epochs 1 and 2."""
    return template(tmp_path_factory, "interrupted_late", stop_after_epoch=1)


def use(monkeypatch, root: Path, results: Path) -> Path:
    """Point SPINEAUTO_* at the planned dataset and ``results``; returns the fold 0 folder there."""
    monkeypatch.setenv("SPINEAUTO_RAW", str(root / "raw"))
    monkeypatch.setenv("SPINEAUTO_PREPROCESSED", str(root / "preprocessed"))
    monkeypatch.setenv("SPINEAUTO_RESULTS", str(results))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return results / DATASET / MODEL / "fold_0"


def template(tmp_path_factory, name: str, stop_after_epoch: int | None = None) -> Path:
    """A results folder holding one run of :data:`RUN` on fold 0 (made once per session); with
    ``stop_after_epoch`` the run was interrupted there (``checkpoint_latest.pt`` is epoch k + 1)."""
    root = planned(tmp_path_factory)
    results = root / f"template_{name}"
    if (results / ".done").is_file():
        return results
    from spineauto.training.trainer import TrainOptions, train_fold

    def stop(trainer, record):
        if record["epoch"] == stop_after_epoch:
            raise KeyboardInterrupt

    shutil.rmtree(results, ignore_errors=True)
    mp = pytest.MonkeyPatch()
    try:
        use(mp, root, results)
        options = TrainOptions(epochs=3, iters_per_epoch=3, val_iters=1, device="cpu", wandb="disabled", num_workers=0,
                               validate=False, callbacks=[stop])
        try:
            train_fold(1, "2d", 0, options)
        except KeyboardInterrupt:
            pass
    finally:
        mp.undo()
    (results / ".done").write_text("ok")
    return results


def copy_run(template_results: Path, results: Path) -> Path:
    """A private copy of a template's results; returns its fold 0 folder."""
    shutil.copytree(template_results, results, ignore=shutil.ignore_patterns(".done"))
    return results / DATASET / MODEL / "fold_0"


def tree_hash(folder: Path, ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file (content hash) and folder below ``folder``, by relative path (``ignore``: names left out)."""
    out = {}
    if folder.is_file():
        return {".": hashlib.sha256(folder.read_bytes()).hexdigest()}
    for p in sorted(folder.rglob("*")):
        if p.name in ignore:
            continue
        rel = str(p.relative_to(folder))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_error(code: int, err: str, *needles: str) -> str:
    """Exit 1, no traceback, exactly one ``error:`` line holding every needle; returns that line."""
    assert code == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def logged(err: str, *needles: str) -> bool:
    """Whether every needle is in the log output, whitespace aside (rich wraps log records at the
    console width, also inside long paths)."""
    text = "".join(err.split())
    return all("".join(n.split()) in text for n in needles)


def train(capsys, *args: str) -> tuple[int, str]:
    """``spineauto train -d 1 -f 0 TINY ARGS`` in-process: (exit code, stderr)."""
    code, out, err = run_cli(capsys, "train", "-d", "1", "-f", "0", *TINY, *args)
    return code, out + err


def train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "spineauto", "train", "-d", "1", "-f", "0", *TINY, *args]


def subprocess_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def spawn(*args: str, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """``spineauto train`` in its own process group (to SIGKILL it with its workers)."""
    return subprocess.Popen(train_command(*args), env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=stderr,
                            start_new_session=True)


_READONLY_MOUNT: bool | None = None


def _readonly_mount_works(tmp: Path) -> bool:
    """As root, permissions do not stop writes: a read-only bind mount in a private mount namespace does."""
    global _READONLY_MOUNT
    if _READONLY_MOUNT is None:
        probe = tmp / "ro_probe"
        probe.mkdir(exist_ok=True)
        r = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && touch "$0/x"', str(probe)],
                           capture_output=True, text=True) if shutil.which("unshare") else None
        _READONLY_MOUNT = r is not None and r.returncode != 0 and "Read-only" in r.stderr and not (probe / "x").exists()
    return _READONLY_MOUNT


def train_readonly(capsys, readonly: Path, tmp: Path, *args: str) -> tuple[int, str]:
    """``spineauto train`` (as :func:`train`) with the folder ``readonly`` not writable: without its
    write permissions (an ordinary user, in-process), or as root read-only mounted (a subprocess)."""
    if os.geteuid() != 0:
        folders = [readonly, *[p for p in readonly.rglob("*") if p.is_dir()]]
        modes = {p: p.stat().st_mode for p in folders}
        for p in folders:
            p.chmod(modes[p] & ~0o222)
        try:
            return train(capsys, *args)
        finally:
            for p in folders:
                p.chmod(modes[p])
    if not _readonly_mount_works(tmp):
        pytest.skip("running as root without a way to make a folder read-only (unshare -m + mount --bind -o ro)")
    r = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(readonly),
                        *train_command(*args)], env=subprocess_env(), capture_output=True, text=True, timeout=180)
    return r.returncode, r.stdout + r.stderr
