"""``spineauto pretrain``: list the sources, convert them to shards (resumable), pretrain, report."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from spineauto.errors import SpineautoError
from spineauto.io.outputs import check_output_apart
from spineauto.pretraining import shards as sh
from spineauto.pretraining.train import PretrainOptions, check_options, pretrain

log = logging.getLogger(__name__)
MAX_SIZE = 1024  # an image stored SIZE x SIZE per slice: 1024 is already 1 MiB a slice; more exhausted memory in conversion


def convert_sources(sources: list[Path], out: Path, *, self_supervised: bool, class_depth: int | None, size: int, channels: int,
                    shard_size: int, workers: int, strict: bool, overwrite: bool,
                    progress: Callable[[str, int, int], None] | None = None) -> dict:
    """``out/shards/``: the sources' images, converted (or resumed); returns the index."""
    if not sources:
        raise SpineautoError("pretrain: give at least one image folder or raw dataset")
    if self_supervised:
        items, skipped = sh.list_unlabeled(sources, workers)
        classes, mode = None, "unlabeled"
    else:
        if len(sources) != 1:
            raise SpineautoError(f"pretrain: supervised pretraining reads one class-folder tree, got {len(sources)} sources "
                                 "(--self-supervised takes several)")
        items, classes, skipped = sh.list_supervised(sources[0], class_depth)
        mode = "supervised"
    log.info("%d image(s) to convert%s", len(items), f" in {len(classes)} classes" if classes else "")
    return sh.convert(items, Path(out) / "shards", size=size, channels=channels, mode=mode, classes=classes,
                      sources=[str(Path(s).resolve()) for s in sources], listed_skipped=skipped, shard_size=shard_size,
                      workers=workers, strict=strict, overwrite=overwrite, class_depth=class_depth, progress=progress)


def run_pretrain(sources: list[Path], out: Path, options: PretrainOptions, *, self_supervised: bool, class_depth: int | None,
                 size: int, channels: int, shard_size: int, workers: int, strict: bool, convert_only: bool,
                 convert_progress: Callable[[str, int, int], None] | None = None) -> tuple[dict, Path | None]:
    is_main = int(os.environ.get("RANK", "0")) == 0
    check_output_apart(sources, out)
    for flag, value, low in (("--seed", options.seed, 0), ("--num-workers", options.num_workers, 0), ("-np/--num-processes", workers, 1),
                             ("--shard-size", shard_size, 1), ("--size", size, 16)):
        high = {"--seed": ("2**32", 2**32), "--size": (str(MAX_SIZE + 1), MAX_SIZE + 1)}.get(flag)
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value >= high[1]):
            raise SpineautoError(f"{flag} must be a whole number >= {low}{f' and < {high[0]}' if high else ''}, got {value!r}")
    if channels not in (1, 3):
        raise SpineautoError(f"--channels must be 1 or 3, got {channels!r}")
    options.method = "simclr" if self_supervised else "supervised"
    if not convert_only:
        check_options(options)  # before hours of conversion, not after
    if Path(out).exists() and not Path(out).is_dir():
        raise SpineautoError(f"{out}: exists and is not a folder; -o names the folder for shards/ and the checkpoints, choose another")
    if is_main:  # DDP: rank 0 converts, the others read what it wrote (the same command reruns it idempotently)
        index = convert_sources(sources, out, self_supervised=self_supervised, class_depth=class_depth, size=size, channels=channels,
                                shard_size=shard_size, workers=workers, strict=strict, overwrite=options.overwrite,
                                progress=convert_progress)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        import torch.distributed as dist

        from spineauto.devices import resolve_device
        from spineauto.training.distributed import init_distributed

        init_distributed(resolve_device(options.device).type)
        dist.barrier()
    index = sh.ShardSet(Path(out) / "shards").index
    if convert_only:
        return index, None
    return index, pretrain(Path(out) / "shards", out, options)
