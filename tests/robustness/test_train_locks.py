"""One `spineauto train` per fold at a time: a lock file created atomically (O_CREAT | O_EXCL) holding
JSON (pid, host, start time, command); a second train of the fold names the holder; a lock whose
process is gone is taken over with a message; a lock held on another host is never taken over.

Generated cases: processes racing for one lock (free, and stale), the refused commands while the fold
is locked (each with exit code, one `error:` line and unchanged results), the kinds of stale lock.
The real `train` holding its lock while it runs, and the lock of a SIGKILLed train being taken over,
are in test_train_kill.py.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spineauto.errors import SpineautoError
from spineauto.io.locks import exclusive_lock, read_lock
from train_support import REPO, copy_run, finished, logged, one_error, root, train, tree_hash, use  # noqa: F401 (fixtures)

torch.set_num_threads(1)

CONTENDER = r"""
import json, os, sys, time
from spineauto.errors import SpineautoError
from spineauto.io.locks import exclusive_lock
path, out, attempts, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
records = []
open(out + ".ready", "w").close()
while not os.path.exists(go):  # a common start, so that the processes race
    time.sleep(0.0005)
for i in range(attempts):
    try:
        with exclusive_lock(path, "the test") as me:
            t0 = time.monotonic()
            time.sleep(0.004)
            records.append({"held": [t0, time.monotonic()], "pid": me["pid"]})
    except SpineautoError as e:
        records.append({"refused": str(e)})
    time.sleep(0.002)
json.dump(records, open(out, "w"))
"""


def _race(tmp_path: Path, lock: Path, processes: int, attempts: int) -> list[dict]:
    script = tmp_path / "contender.py"
    script.write_text(CONTENDER)
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, str(script), str(lock), str(tmp_path / f"out{i}.json"), str(attempts), str(go)],
                              env=env, stderr=subprocess.PIPE, text=True) for i in range(processes)]
    deadline = time.time() + 60
    while not all((tmp_path / f"out{i}.json.ready").exists() for i in range(processes)):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.005)
    go.touch()
    logs = [p.communicate(timeout=60)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    records = [r for i in range(processes) for r in json.loads((tmp_path / f"out{i}.json").read_text())]
    held = sorted(r["held"] for r in records if "held" in r)
    assert held, records
    for (a0, a1), (b0, b1) in zip(held, held[1:]):  # CLOCK_MONOTONIC is system-wide: intervals of all processes compare
        assert a1 <= b0, "two processes held the lock at once"
    for r in records:
        if "refused" in r:
            assert "is locked by pid" in r["refused"] or "taking this lock right now" in r["refused"], r
    assert not lock.exists()
    return records + [{"log": "".join(logs)}]


@pytest.mark.parametrize("processes,attempts", [(2, 20), (4, 12)])
def test_processes_racing_for_a_lock_never_hold_it_together(processes, attempts, tmp_path):
    records = _race(tmp_path, tmp_path / "fold.lock", processes, attempts)
    assert sum("refused" in r for r in records) > 0  # they did contend


def test_processes_racing_for_a_stale_lock_take_it_over_once(tmp_path):
    lock = tmp_path / "fold.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier", "token": "stale"}))
    records = _race(tmp_path, lock, 4, 6)
    assert records[-1]["log"].count(f"taking over the lock of pid {dead.pid}") == 1


def test_a_lock_file_just_created_by_another_process_is_never_taken_over(tmp_path, monkeypatch):
    """The holder releases between our failed create and our read, and a third process creates the file again
    (empty until it writes who it is): that file is not a stale one, and it must stay."""
    from spineauto.io import locks

    lock = tmp_path / "fold.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now", "token": "holder"}))
    wait, swapped = locks._wait_for_content, []

    def released_and_recreated(path):
        if not swapped:
            path.unlink()
            path.touch()  # the third process, between its create and its write
            swapped.append(True)
            return None
        return wait(path)

    monkeypatch.setattr(locks, "_wait_for_content", released_and_recreated)
    with pytest.raises(SpineautoError, match="taking this lock right now"):
        with exclusive_lock(lock, "the test"):
            pass
    assert swapped and lock.exists() and lock.read_text() == ""


# -- the train command against a locked fold ---------------------------------------------------------------------
HOLDER = r"""
import sys, time
from spineauto.io.locks import exclusive_lock
with exclusive_lock(sys.argv[1], "training of the fold"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def held(root, finished, tmp_path, monkeypatch):
    """The fold locked by another live process on this host: (its Popen, the lock file, the fold folder)."""
    fold = copy_run(finished, tmp_path / "results")
    use(monkeypatch, root, tmp_path / "results")
    lock = fold.parent / ".fold_0.lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().strip() == "held"
    yield proc, lock, fold
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("args", [[], ["--continue"], ["--overwrite"], ["--overwrite", "--epochs", "9"], ["--continue", "--seed", "0"]])
def test_a_second_train_of_a_locked_fold_says_who_holds_it(args, held, tmp_path, capsys):
    proc, lock, fold = held
    holder = read_lock(lock)
    before = tree_hash(tmp_path / "results")
    code, err = train(capsys, *args)
    one_error(code, err, f"pid {proc.pid}", "this host", f"since {holder['started']}", str(lock))
    assert tree_hash(tmp_path / "results") == before and read_lock(lock) == holder


def test_another_fold_is_not_blocked(held, capsys):
    code, out = train(capsys, "--epochs", "1", "--iters-per-epoch", "1", "-f", "all")
    assert code == 0, out[-3000:]


def _stale(kind: str, lock: Path) -> str:
    """Write a stale lock of ``kind``; returns what the takeover message says."""
    if kind in ("dead pid", "reused pid"):
        if kind == "dead pid":
            dead = subprocess.Popen([sys.executable, "-c", "pass"])
            dead.wait()
            pid, start = dead.pid, None
        else:
            pid, start = os.getppid(), -1  # alive, but not the process that took the lock (another start time)
        lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2020-01-01 00:00:00",
                                    "pid_start": start, "command": "spineauto train", "token": "t"}))
        return f"taking over the lock of pid {pid}"
    lock.write_text("" if kind == "empty file" else "{not json")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    return "removed an unreadable lock file"


@pytest.mark.parametrize("kind", ["dead pid", "reused pid", "empty file", "unreadable file"])
def test_a_stale_lock_is_taken_over_with_a_message(kind, root, finished, tmp_path, monkeypatch, capsys):
    fold = copy_run(finished, tmp_path / "results")
    use(monkeypatch, root, tmp_path / "results")
    lock = fold.parent / ".fold_0.lock"
    said = _stale(kind, lock)
    code, err = train(capsys, "--continue")  # a finished run: nothing to train, the lock is all there is to it
    assert code == 0, err[-3000:]
    assert logged(err, str(lock), said) and not lock.exists()


def test_a_lock_of_another_host_is_refused_with_the_file_to_delete(root, finished, tmp_path, monkeypatch, capsys):
    fold = copy_run(finished, tmp_path / "results")
    use(monkeypatch, root, tmp_path / "results")
    lock = fold.parent / ".fold_0.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "2020-01-01 00:00:00", "token": "t"}))
    before = tree_hash(tmp_path / "results")
    one_error(*train(capsys, "--continue"), "pid 1 on host elsewhere.example", "since 2020-01-01 00:00:00",
              f"if that process is gone, delete {lock}")
    assert tree_hash(tmp_path / "results") == before


def test_lock_file_content_and_release(tmp_path):
    lock = tmp_path / "a" / "b" / "c.lock"
    with pytest.raises(KeyboardInterrupt):
        with exclusive_lock(lock, "the thing"):
            raise KeyboardInterrupt
    assert not (tmp_path / "a").exists()  # released on any exit, and the folders made for it are gone again
    with exclusive_lock(lock, "the thing") as me:
        data = json.loads(lock.read_text())
        assert data == me and data["pid"] == os.getpid() and data["host"] == socket.gethostname() and data["what"] == "the thing"
        assert {"started", "command", "token"} <= set(data)
        with pytest.raises(SpineautoError, match=f"the thing is locked by pid {os.getpid()} on this host"):
            with exclusive_lock(lock, "the thing"):
                pass
    assert not lock.exists() and lock.parent.is_dir()
