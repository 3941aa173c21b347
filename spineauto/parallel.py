"""Run one function over many cases in worker processes, with a progress callback."""
from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable


def map_cases(fn: Callable[..., Any], cases: list[str], args: Iterable[tuple], workers: int,
              progress: Callable[[str], None] | None = None) -> list[Any]:
    """``[fn(*a) for a in args]``, in ``workers`` forked processes when that helps, in order.

    Heavy modules (nnunetv2, torch) must be imported by the caller before this runs, so forked
    workers inherit them instead of importing them again each.
    """
    args = list(args)
    results = []
    if workers > 1 and len(args) > 1:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with ProcessPoolExecutor(max_workers=min(workers, len(args)), mp_context=ctx) as pool:
            futures = [pool.submit(fn, *a) for a in args]
            for case, fut in zip(cases, futures):
                results.append(fut.result())
                if progress:
                    progress(case)
    else:
        for case, a in zip(cases, args):
            results.append(fn(*a))
            if progress:
                progress(case)
    return results
