"""Checkpoints: atomic writes, best / top-k bookkeeping, exact resume and pretrained transfer.

``checkpoint_latest.pt`` is written atomically at the end of EVERY epoch and holds everything a
resume needs (network, optimiser, scheduler, grad scaler, epoch, RNG states, metric history, best
and top-k state). ``checkpoint_best.pt``, ``checkpoint_final.pt`` and the top-k files
(``checkpoint_top_epochXXXX.pt``, index in ``checkpoints_top.json``) are atomic copies of a latest
file: no extra serialisation, and each its own file (never hard links: damage to one must not reach the
others, and ``--continue`` falls back to the newest intact one when ``checkpoint_latest.pt`` is unreadable).
"""
from __future__ import annotations

import filecmp
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from spineauto.errors import SpineautoError
from spineauto.io.atomic import write_json
from spineauto.io.checkpoints import copy_checkpoint, load_checkpoint, network_state, save_checkpoint  # noqa: F401 (re-exported)
from spineauto.networks.resnet import adapt_pretrained

log = logging.getLogger(__name__)
LATEST, BEST, FINAL = "checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt"
TOP_INDEX = "checkpoints_top.json"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except RuntimeError:  # fewer GPUs than when saved
            pass


@dataclass
class TopK:
    """The k best epochs by the monitored metric (higher is better)."""

    k: int = 5
    entries: list[dict] = field(default_factory=list)  # {"epoch", "metric", "file"}, best first

    def offer(self, epoch: int, metric: float) -> tuple[bool, list[dict]]:
        """Whether ``epoch`` enters the top k, and the entries it evicts."""
        if self.k <= 0 or not np.isfinite(metric):
            return False, []
        entry = {"epoch": epoch, "metric": float(metric), "file": f"checkpoint_top_epoch{epoch:04d}.pt"}
        ranked = sorted(self.entries + [entry], key=lambda e: (-e["metric"], e["epoch"]))
        keep, evicted = ranked[:self.k], ranked[self.k:]
        self.entries = keep
        return entry in keep, evicted

    def write(self, folder: Path, monitor: str) -> None:
        write_json(Path(folder) / TOP_INDEX, {"monitor": monitor, "mode": "max", "k": self.k,
                                              "checkpoints": [dict(rank=i + 1, **e) for i, e in enumerate(self.entries)]})

    def reconcile(self, folder: Path) -> None:
        """After a resume: drop entries whose file is missing, delete top files no entry names."""
        folder = Path(folder)
        self.entries = [e for e in self.entries if (folder / e["file"]).is_file()]
        names = {e["file"] for e in self.entries}
        for f in folder.glob("checkpoint_top_epoch*.pt"):
            if f.name not in names:
                f.unlink()


def restore_copies(folder: Path, state: dict, epochs: int, topk: TopK, monitor: str) -> list[str]:
    """On resume: the copies of ``checkpoint_latest.pt`` its epoch should have (top-k entry, best,
    final) and the top-k index, when a kill came between writing it and copying it; returns the names restored."""
    folder = Path(folder)
    latest, done = folder / LATEST, int(state["epoch"])
    wanted = [e["file"] for e in topk.entries if e["epoch"] == done - 1]
    if (state.get("best") or {}).get("epoch") == done - 1:
        wanted.append(BEST)
    if done == epochs:
        wanted.append(FINAL)
    restored = [n for n in wanted if not (folder / n).is_file() or not filecmp.cmp(latest, folder / n, shallow=False)]
    for name in restored:
        copy_checkpoint(latest, folder / name)
    if topk.k > 0:
        topk.write(folder, monitor)
    return restored


def load_pretrained(network: torch.nn.Module, path: Path) -> tuple[list[str], list[str]]:
    """Copy every tensor of ``path`` whose name and shape match into ``network``.

    ``encoder.*`` tensors must all match (that is what is transferred); other mismatches (e.g. a
    segmentation layer for another number of labels) are skipped. Returns (loaded, skipped).
    """
    path = Path(path)
    if not path.is_file():
        raise SpineautoError(f"--pretrained {path}: no such file")
    target = network.state_dict()
    source, notes = adapt_pretrained(network_state(load_checkpoint(path), path), target)  # torchvision ResNets: encoder.*
    bad = [f"{k} {tuple(source[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
           if k.startswith("encoder.") and k in source and source[k].shape != v.shape]
    absent = [f"{k} (absent)" for k in target if k.startswith("encoder.") and k not in source]
    if absent and len(absent) < sum(k.startswith("encoder.") for k in target):  # a partial encoder (other stage count) does not fit
        bad += absent
    if bad:
        raise SpineautoError(f"--pretrained {path}: {len(bad)} encoder tensor(s) do not match this plan's network"
                             f"{' (' + '; '.join(notes) + ')' if notes else ''}: "
                             f"{', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}; use a checkpoint trained with the same network topology")
    loaded = [k for k, v in target.items() if k in source and source[k].shape == v.shape]
    if not any(k.startswith("encoder.") for k in loaded):
        raise SpineautoError(f"--pretrained {path}: none of its tensors match this network's encoder; "
                             "use a spineauto checkpoint with the same architecture")
    network.load_state_dict({**target, **{k: source[k] for k in loaded}})
    shared = {target[k].data_ptr() for k in loaded}  # the decoder holds the encoder too (decoder.encoder.*): not skipped
    skipped = sorted(k for k in set(target) - set(loaded) if target[k].data_ptr() not in shared)
    log.info("pretrained %s%s: loaded %d tensors, skipped %d%s", path.name, f" ({'; '.join(notes)})" if notes else "", len(loaded), len(skipped),
             f" ({', '.join(skipped[:8])}{' ...' if len(skipped) > 8 else ''})" if skipped else "")
    return loaded, skipped
