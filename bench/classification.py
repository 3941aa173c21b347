"""Benchmark of the classification configuration (``-c cls``, optionally ``multitask``): training
samples per second and peak memory on CPU, through ``spineauto train`` as a user runs it.

The real cases of shared/data (bench/common.py) become a raw dataset with two heads, sequence and
view (the contrasts and acquisition planes of the scans); ``spineauto plan_and_preprocess`` plans
its ``cls`` configuration as for any dataset (network, patch and batch size from the fingerprint,
unchanged). ``spineauto train -f all -c cls`` then runs ``--epochs`` x ``--iters`` iterations;
samples/s is the median over epochs after the first (warm-up) of the loop's own ``samples_per_s``
(iterations x batch / training time of the epoch, from metrics.jsonl), and peak memory the
process tree's summed RSS / RssAnon sampled during the run (bench/common.py).

    .venv/bin/python bench/classification.py [--epochs 3] [--iters 10] [--configurations cls multitask] [--amp]

The benchmark itself, :func:`bench_classification`, lives in bench/common.py: ``bench/bench_train.py
--classification`` runs it too.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_classification, classification_table, command_line  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--configurations", nargs="+", default=["cls"])
    ap.add_argument("--amp", action="store_true", help="bf16 autocast on CPU")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spineauto_bench_cls_"))
    results = bench_classification(work, args.configurations, args.epochs, args.iters, args.amp)
    print(command_line())
    print(classification_table(results))
    print(json.dumps(results))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
