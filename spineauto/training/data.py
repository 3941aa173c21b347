"""Training data: random 2D patches from memory-mapped preprocessed cases, in background workers.

The data side is pluggable like the task side: a *sampler* turns (cases, batch size, rng, patch
size) into a numpy batch dict. :class:`SegmentationPatchSampler` is the segmentation one (random
slices, foreground oversampling from the props' ``class_locations``, zero padding where a slice is
smaller than the patch; in a dataset with an ignore label the other patches are centred on a voxel
someone labelled, the props' ``annotated_locations``, as nnU-Net's); a classification slice sampler returns ``{"data", "cls": {head: (B,)}}``
the same way.

Every batch is a pure function of its key ``(split, epoch, iteration)`` and the run's seed and
rank: the worker seeds its sampling generator and the global numpy and python generators (used by
the batchgenerators transforms) from the key. Resuming at an epoch boundary therefore replays the
exact batches an uninterrupted run would have seen, whatever the number of workers, and DDP ranks
draw different batches.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from spineauto.preprocessing.manifest import verified_props

log = logging.getLogger(__name__)
TRAIN, VAL = 0, 1


@dataclass
class CaseStore:
    """Preprocessed cases of one data identifier; arrays opened lazily (memory-mapped) per process."""

    folder: Path
    props: dict[str, dict]
    _open: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, folder: Path, cases: list[str] | None = None, full_hash: bool | None = None) -> "CaseStore":
        """The cases the dataset's manifest lists for this folder (or ``cases`` of them), checked against
        it first (sizes, and hashes where cheap: see :mod:`spineauto.preprocessing.manifest`); refuses
        in one line naming the case when the manifest is missing or a file does not match."""
        folder = Path(folder)
        return cls(folder, verified_props(folder, cases, full_hash))

    def data(self, case: str) -> np.ndarray:
        key = (case, "data", os.getpid())
        if key not in self._open:
            self._open[key] = np.load(self.folder / f"{case}.npy", mmap_mode="r")
        return self._open[key]

    def seg(self, case: str) -> np.ndarray:
        key = (case, "seg", os.getpid())
        if key not in self._open:
            self._open[key] = np.load(self.folder / f"{case}_seg.npy", mmap_mode="r")
        return self._open[key]

    def __getstate__(self):  # workers open their own memory maps
        return {"folder": self.folder, "props": self.props, "_open": {}}


class BatchSampler(Protocol):
    """Data side of a task: a numpy batch from ``cases``."""

    def sample(self, cases: list[str], batch_size: int, rng: np.random.Generator, size: list[int]) -> dict: ...


def crop_padded(array: np.ndarray, s: int, y0: int, x0: int, size: list[int]) -> np.ndarray:
    """``array[:, s, y0:y0+h, x0:x0+w]`` with zeros where the window leaves the slice."""
    c, _, h, w = array.shape
    out = np.zeros((c, size[0], size[1]), dtype=array.dtype)
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + size[0], h), min(x0 + size[1], w)
    if ye > ys and xe > xs:
        out[:, ys - y0:ye - y0, xs - x0:xe - x0] = array[:, s, ys:ye, xs:xe]
    return out


@dataclass
class SegmentationPatchSampler:
    """Random 2D patches; the last ``round(B * oversample)`` samples of a batch hold foreground (nnU-Net's rule)."""

    store: CaseStore
    oversample: float = 0.33

    def sample(self, cases: list[str], batch_size: int, rng: np.random.Generator, size: list[int]) -> dict:
        n_fg = int(round(batch_size * self.oversample))
        data, seg, keys = [], [], []
        for i in range(batch_size):
            case = cases[int(rng.integers(len(cases)))]
            d, sg = self.store.data(case), self.store.seg(case)
            s, y0, x0 = self._window(case, d.shape[1:], size, rng, force_fg=i >= batch_size - n_fg)
            data.append(crop_padded(d, s, y0, x0, size))
            seg.append(crop_padded(sg, s, y0, x0, size))
            keys.append(f"{case}:{s}")
        return {"data": np.stack(data).astype(np.float32, copy=False), "seg": np.stack(seg).astype(np.int16), "keys": keys}

    def _window(self, case: str, shape, size, rng: np.random.Generator, force_fg: bool) -> tuple[int, int, int]:
        n_slices, h, w = shape
        need = [max(0, p - n) for p, n in zip(size, (h, w))]
        lb = [-(n // 2) for n in need]
        ub = [n + nd // 2 + nd % 2 - p for n, nd, p in zip((h, w), need, size)]
        props = self.store.props[case]
        locations = props.get("class_locations") or {}
        present = [k for k, v in locations.items() if len(v)]
        locs = locations[present[int(rng.integers(len(present)))]] if force_fg and present else None
        if locs is None and props.get("annotated_locations"):  # sparse labels: centred on a labelled voxel (nnU-Net's rule)
            locs = props["annotated_locations"]
        if locs:
            s, cy, cx = locs[int(rng.integers(len(locs)))]
            y0 = int(np.clip(cy - size[0] // 2, lb[0], ub[0]))
            x0 = int(np.clip(cx - size[1] // 2, lb[1], ub[1]))
            return int(s), y0, x0
        return int(rng.integers(n_slices)), int(rng.integers(lb[0], ub[0] + 1)), int(rng.integers(lb[1], ub[1] + 1))


class KeyedBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``(split, epoch, i)`` is one whole batch (tensors)."""

    def __init__(self, sampler: BatchSampler, transforms, train_cases: list[str], val_cases: list[str], batch_size: int,
                 patch_size: list[int], sample_size: list[int], seed: int, rank: int, context=None):
        self.sampler, self.transforms = sampler, transforms
        self.context = context  # training batches only: e.g. whole-neck phantom patches mixed in (training/synthetic.py)
        self.cases = {TRAIN: list(train_cases), VAL: list(val_cases)}
        self.batch_size, self.patch_size, self.sample_size = batch_size, list(patch_size), list(sample_size)
        self.seed, self.rank = int(seed), int(rank)

    def __len__(self) -> int:
        return 2 ** 31

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        split, epoch, i = key
        if split == VAL:  # the same validation batches every epoch: a steadier pseudo-Dice
            epoch = 0
        ss = np.random.SeedSequence([self.seed, self.rank, split, epoch, i])
        rng = np.random.default_rng(ss)
        if split == TRAIN and self.transforms is not None:
            batch = self.sampler.sample(self.cases[TRAIN], self.batch_size, rng, self.sample_size)
            if self.context is not None:
                batch = self.context.mix(batch, rng, int(round(self.batch_size * getattr(self.sampler, "oversample", 0.0))))
            state = ss.generate_state(2)
            np.random.seed(int(state[0]))  # batchgenerators draws from numpy's and python's global generators
            random.seed(int(state[1]))
            keys = batch.pop("keys")
            batch = self.transforms(**batch)
            batch["keys"] = keys
        else:
            batch = self.sampler.sample(self.cases[split], self.batch_size, rng, self.patch_size)
        return to_tensors(batch)


def to_tensors(batch: dict) -> dict:
    out = {"data": torch.from_numpy(np.ascontiguousarray(batch["data"], dtype=np.float32)), "keys": batch.get("keys", [])}
    if batch.get("seg") is not None:
        out["seg"] = torch.from_numpy(np.ascontiguousarray(np.rint(batch["seg"]).astype(np.int16)))
    if batch.get("cls") is not None:
        out["cls"] = {h: torch.as_tensor(np.asarray(v), dtype=torch.long) for h, v in batch["cls"].items()}
    return out


class EpochKeys(torch.utils.data.Sampler):
    """Keys for epochs ``start..end-1``: each epoch's training iterations (``accumulate`` micro-batches
    per optimiser step), then its validation ones (every ``val_every`` epochs and the last)."""

    def __init__(self, start: int, end: int, iters: int, val_iters: int, accumulate: int = 1, val_every: int = 1):
        self.start, self.end, self.iters, self.val_iters = start, end, iters * accumulate, val_iters
        self.val_every = val_every

    def validates(self, epoch: int) -> bool:
        return self.val_iters > 0 and ((epoch + 1) % self.val_every == 0 or epoch == self.end - 1)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for epoch in range(self.start, self.end):
            for i in range(self.iters):
                yield (TRAIN, epoch, i)
            for i in range(self.val_iters if self.validates(epoch) else 0):
                yield (VAL, epoch, i)

    def __len__(self) -> int:
        return sum(self.iters + (self.val_iters if self.validates(e) else 0) for e in range(self.start, self.end))


def _worker_init(_):
    torch.set_num_threads(1)


def default_num_workers(device: torch.device) -> int:
    """Background loaders: on CPU they compete with the network for the cores. Measured on 2 cores
    (real-data plan, 40x40 patches, batch 16; median s/epoch of 20 iterations, two rounds): 0 workers
    6.9/8.3, 1 worker 7.9/5.8, 2 workers 7.8/9.2, so 1 (the batch is ready while the network runs,
    one augmentation process at most). On CUDA up to cores - 1, at most 8."""
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    return 1 if cores <= 4 else min(4, cores // 4)


def make_loader(batches: KeyedBatches, keys: EpochKeys, num_workers: int, pin_memory: bool,
                persistent_workers: bool = False) -> torch.utils.data.DataLoader:
    """One stream of batches for the whole run (its workers live as long as the run, whatever ``persistent_workers``)."""
    return torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=keys, num_workers=num_workers, pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers else None, prefetch_factor=4 if num_workers else None,
        persistent_workers=persistent_workers and num_workers > 0, multiprocessing_context="fork" if num_workers and os.name == "posix" else None)
