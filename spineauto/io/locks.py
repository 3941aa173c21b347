"""Exclusive lock files: one process at a time on a fold (``train``) or a dataset (``plan_and_preprocess``).

``with exclusive_lock(path, what):`` creates ``path`` atomically (``O_CREAT | O_EXCL``) holding JSON
that says who holds it: pid, host, start time and command. A second process is refused with one line
naming the holder. A lock whose holder is gone (its pid is no longer alive on this host, or now
belongs to another process) is taken over with a warning; a lock held on another host is never taken
over (its pid cannot be checked from here): the message says which file to delete once that process is
gone. No dependency; O_EXCL is atomic on local file systems and on NFSv3 and later.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from spineauto.errors import SpineautoError

log = logging.getLogger(__name__)
WRITE_GRACE_S = 10.0  # a lock file still empty after this long was left by a process killed while creating it
_ATTEMPTS = 5


@contextmanager
def exclusive_lock(path: Path | str, what: str) -> Iterator[dict]:
    """Hold ``path`` for the block; yields what the lock file says (pid, host, started, ...).

    ``what`` names the locked thing in messages, e.g. ``"training of .../fold_0"``. Raises
    :class:`SpineautoError` (one line) when another live process holds it or the folder cannot hold a
    lock file (read-only, a file in the way). Folders created for the lock file are removed again when
    the block fails and leaves them empty.
    """
    path = Path(path)
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # deepest first
    try:
        me = _acquire(path, what)
        try:
            yield me
        finally:
            _release(path, me["token"])
    except BaseException:
        for p in made:  # a refused or failed run leaves no empty folders behind
            try:
                p.rmdir()
            except OSError:
                break
        raise


def read_lock(path: Path | str) -> dict | None:
    """What a lock file says, or None when it is absent, empty or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "pid" in data else None


def holder_alive(holder: dict) -> bool:
    """Whether the process named by a lock may still run (always True for another host: it cannot be checked)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc: the pid is alive
    state, start = stat
    if state in ("Z", "X"):  # killed, not reaped yet
        return False
    recorded = holder.get("pid_start")
    return recorded is None or recorded == start  # another start time: the pid was reused


def _acquire(path: Path, what: str) -> dict:
    _make_folder(path.parent, what)
    for _ in range(_ATTEMPTS):
        me = _identity(what)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _wait_for_content(path)
            if holder is not None and holder_alive(holder):
                raise SpineautoError(_held_message(path, what, holder)) from None
            if holder is not None or path.exists():  # gone meanwhile: released, nothing to take over
                _take_over(path, holder)
            continue
        except OSError as e:
            raise SpineautoError(_os_message(path, e, what)) from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
        except OSError as e:
            path.unlink(missing_ok=True)
            raise SpineautoError(_os_message(path, e, what)) from None
        return me
    raise SpineautoError(f"{path}: could not take the lock for {what}: other processes keep taking it; retry")


def _release(path: Path, token: str) -> None:
    holder = read_lock(path)
    if holder is not None and holder.get("token") == token:
        try:
            path.unlink()
        except OSError as e:
            log.warning("%s: could not remove the lock file (%s); delete it by hand", path, e.strerror)


def _take_over(path: Path, stale: dict | None) -> None:
    """Remove a stale lock, unless someone else replaced it meanwhile (a guard file serialises takers-over).
    ``stale`` None: an unreadable file, removed only while it is still unreadable and older than
    WRITE_GRACE_S (a file another process has just created is empty too, until it writes who it is)."""
    guard = path.with_name(path.name + ".takeover")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        if _age(guard) > WRITE_GRACE_S:  # left by a process killed while taking over
            guard.unlink(missing_ok=True)
        else:
            time.sleep(0.05)
        return
    except OSError as e:
        raise SpineautoError(_os_message(guard, e, "taking over a stale lock")) from None
    os.close(fd)
    try:
        now = read_lock(path)
        same = (now.get("token") == stale.get("token") if now is not None and stale is not None
                else now is None and stale is None and _age(path) > WRITE_GRACE_S)
        if same and path.exists():
            path.unlink()
            if stale is None:
                log.warning("%s: removed an unreadable lock file (empty or not JSON) left by a process killed while writing it", path)
            else:
                log.warning("%s: taking over the lock of pid %s on %s (started %s): that process is gone",
                            path, stale.get("pid"), stale.get("host"), stale.get("started"))
    finally:
        guard.unlink(missing_ok=True)


def _wait_for_content(path: Path) -> dict | None:
    """The holder; a lock file is written right after it is created, so an empty one is given a moment."""
    deadline = time.monotonic() + 1.0
    while True:
        holder = read_lock(path)
        if holder is not None or not path.exists():
            return holder
        if _age(path) > WRITE_GRACE_S:
            return None  # stale: its creator died between creating and writing it
        if time.monotonic() > deadline:
            raise SpineautoError(f"{path}: another process is taking this lock right now; retry in a moment")
        time.sleep(0.02)


def _identity(what: str) -> dict:
    stat = _proc_stat(os.getpid())
    return {"what": what, "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "started_unix": time.time(), "pid_start": stat[1] if stat else None, "command": " ".join(sys.argv),
            "token": uuid.uuid4().hex}


def _held_message(path: Path, what: str, holder: dict) -> str:
    where = "this host" if holder.get("host") == socket.gethostname() else f"host {holder.get('host')}"
    gone = ("" if holder.get("host") == socket.gethostname()
            else f"; if that process is gone, delete {path}")
    command = f" ({holder['command']})" if holder.get("command") else ""
    return (f"{what} is locked by pid {holder.get('pid')} on {where} since {holder.get('started')}{command}: "
            f"wait for it to finish{gone} (lock file {path})")


def _os_message(path: Path, e: OSError, what: str) -> str:
    where = Path(e.filename) if e.filename else path
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((p for p in (where, *where.parents) if p.exists() and not p.is_dir()), where)
        return f"{blocker}: a file stands where a folder is needed for {what}; move it away or choose another folder"
    reason = e.strerror or type(e).__name__
    hint = ("make it writable or choose another folder" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
            else "fix it and retry")
    return f"{where}: cannot create the lock file for {what} ({reason}); {hint}"


def _make_folder(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpineautoError(_os_message(folder, e, what)) from None


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc (Linux); None elsewhere."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # after "pid (comm) "
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None
