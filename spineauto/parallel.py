"""Run one function over many cases in worker processes, with a progress callback; the machine's memory;
a cohort's shard for a job array (:func:`shard`).

Workers never outlive the process that started them: on Linux each asks the kernel for SIGKILL when
its parent dies (``prctl(PR_SET_PDEATHSIG)``), elsewhere a watchdog thread polls ``os.getppid()``;
so a SIGTERM or SIGKILL of ``plan_and_preprocess`` leaves no orphan behind.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable

from spineauto.errors import SpineautoError

PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCHDOG_S = 0.5


def shard(cases: list, num_parts: int, part_id: int) -> list:
    """Every ``num_parts``-th case from the ``part_id``-th (``--num-parts/--part-id``): the parts of a job
    array are disjoint and together hold every case, each about the same number."""
    if isinstance(num_parts, bool) or not isinstance(num_parts, int) or num_parts < 1:
        raise SpineautoError(f"--num-parts {num_parts}: must be at least 1")
    if isinstance(part_id, bool) or not isinstance(part_id, int) or not 0 <= part_id < num_parts:
        raise SpineautoError(f"--part-id {part_id}: must be between 0 and --num-parts - 1 ({num_parts - 1})")
    return cases[part_id::num_parts]


def map_cases(fn: Callable[..., Any], cases: list[str], args: Iterable[tuple], workers: int,
              progress: Callable[[str], None] | None = None) -> list[Any]:
    """``[fn(*a) for a in args]``, in ``workers`` forked processes when that helps, in order.

    Heavy modules (nnunetv2, torch) must be imported by the caller before this runs, so forked
    workers inherit them instead of importing them again each. The first exception of a case is
    raised here once the running cases have finished; the cases not started yet are cancelled.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"map_cases: workers must be an integer >= 1, got {workers!r}")
    args = list(args)
    results = []
    if workers > 1 and len(args) > 1:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        pool = ProcessPoolExecutor(max_workers=min(workers, len(args)), mp_context=ctx,
                                   initializer=die_with_parent, initargs=(os.getpid(),))
        try:
            futures = [pool.submit(fn, *a) for a in args]
            for case, fut in zip(cases, futures):
                results.append(fut.result())
                if progress:
                    progress(case)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    else:
        for case, a in zip(cases, args):
            results.append(fn(*a))
            if progress:
                progress(case)
    return results


def die_with_parent(parent: int) -> None:
    """In a worker: end this process when ``parent`` (the pid that started it) goes away."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    else:
        armed = False
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="die-with-parent").start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCHDOG_S)
    os.kill(os.getpid(), signal.SIGKILL)


def machine_memory() -> int | None:
    """Physical memory of this machine in bytes (os.sysconf), or None where the system does not say."""
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return pages * page if pages > 0 and page > 0 else None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"
