"""Callbacks by name in a run YAML (``trainer.callbacks``), a user's own as ``package.module:Name``.

```yaml
trainer:
  callbacks:
    - {name: lr_monitor, logging_interval: step}
    - {name: model_checkpoint, monitor: val_dice, mode: max, save_top_k: 3, filename: "{epoch:03d}-{val_dice:.6f}"}
    - {name: segmentation_sampler, image_amount: 4}
    - {name: early_stopping, monitor: val_loss, mode: min, patience: 10, min_delta: 0.001}
    - {name: mypackage.callbacks:Notify, url: "https://..."}
```
Monitors and filename fields are keys of the epoch record (``metrics.jsonl``: ``train_loss``,
``val_loss``, ``pseudo_dice``, ``pseudo_dice_<label>``, ``ema``, ``balanced_accuracy`` ...) or
``val_dice`` (the pseudo-Dice). The loop calls them on rank 0: ``on_train_start(trainer)``,
``on_train_batch_end(trainer, step, loss)``, ``on_epoch_end(trainer, record)`` (the epoch's record is
complete, its checkpoint not yet written: ``trainer.request_stop(reason)`` makes it the final one),
``on_checkpoint(trainer, record, path)`` (``checkpoint_latest.pt`` written and the record logged),
``on_train_end(trainer)``; ``state_dict``/``load_state_dict`` travel in the checkpoint, so ``--continue``
resumes them exactly. A plug-in is any class with these methods (subclass :class:`Callback` for the defaults),
built with the entry's other keys as keyword arguments. A callback that raises stops the run
(resumable with ``--continue``).
"""
from __future__ import annotations

import difflib
import logging
import math
import string
from pathlib import Path
from typing import Any, Callable

from spineauto.errors import SpineautoError
from spineauto.plugins import Registry, bind_kwargs, describe

log = logging.getLogger(__name__)


class Callback:
    """Hooks of the training loop (all optional)."""

    def on_train_start(self, trainer) -> None: ...
    def on_train_batch_end(self, trainer, step: int, loss: float | None) -> None: ...
    def on_epoch_end(self, trainer, record: dict) -> None: ...
    def on_checkpoint(self, trainer, record: dict, path: Path) -> None: ...
    def on_train_end(self, trainer) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


def _check(obj) -> str | None:
    if isinstance(obj, type) and hasattr(obj, "on_epoch_end"):
        return None
    return f"{describe(obj)} (a callback is a class with on_epoch_end(trainer, record); subclass spineauto.training.callbacks.Callback)"


CALLBACKS = Registry("callback", _check, key="callback")


def metrics(record: dict) -> dict:
    """What monitors and filename templates can name: the record, plus ``val_dice`` (the pseudo-Dice)."""
    out = dict(record)
    if "pseudo_dice" in out:
        out.setdefault("val_dice", out["pseudo_dice"])
    return out


def _value(record: dict, monitor: str, where: str) -> float | None:
    m = metrics(record)
    if monitor not in m:
        names = sorted(k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise SpineautoError(f"{where}: monitor {monitor!r} is not a metric of this run; the epoch record has {', '.join(names)}")
    v = m[monitor]
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _better(mode: str, value: float, than: float | None, delta: float = 0.0) -> bool:
    if than is None:
        return True
    return value > than + delta if mode == "max" else value < than - delta


def _mode(mode: str, where: str) -> str:
    if mode not in ("min", "max"):
        raise SpineautoError(f"{where}.mode: 'min' or 'max', got {mode!r}")
    return mode


@CALLBACKS.register("lr_monitor")
class LearningRateMonitor(Callback):
    """The learning rate of every parameter group to W&B/TensorBoard, per step or per epoch."""

    def __init__(self, logging_interval: str = "epoch"):
        if logging_interval not in ("step", "epoch"):
            raise SpineautoError(f"lr_monitor.logging_interval: 'step' or 'epoch', got {logging_interval!r}")
        self.interval = logging_interval

    def _rates(self, trainer) -> dict:
        groups = trainer.optimizer.param_groups
        return {("lr" if len(groups) == 1 else f"lr_group{i}"): g["lr"] for i, g in enumerate(groups)}

    def on_train_batch_end(self, trainer, step: int, loss: float | None) -> None:
        if self.interval == "step":
            trainer.trackers.log_step(step, self._rates(trainer))

    def on_epoch_end(self, trainer, record: dict) -> None:
        if self.interval == "epoch" and len(trainer.optimizer.param_groups) > 1:
            record.update(self._rates(trainer))


@CALLBACKS.register("model_checkpoint")
class ModelCheckpoint(Callback):
    """Copies of the epoch's checkpoint named by ``filename`` (a template of record keys) in
    ``fold_k/checkpoints/``, the ``save_top_k`` best by ``monitor`` kept (-1: all, 0: none but ``save_last``)."""

    def __init__(self, monitor: str = "ema", mode: str = "max", save_top_k: int = 1, filename: str = "{epoch:03d}-{ema:.4f}",
                 every_n_epochs: int = 1, save_last: bool = False):
        self.monitor, self.mode = monitor, _mode(mode, "model_checkpoint")
        if save_top_k < -1 or every_n_epochs < 1:
            raise SpineautoError("model_checkpoint: save_top_k >= -1 and every_n_epochs >= 1")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(filename) if f is not None]
        except ValueError as e:
            raise SpineautoError(f"model_checkpoint.filename {filename!r}: not a template ({e})") from None
        if not fields or any(not f or "/" in filename for f in fields):
            raise SpineautoError(f"model_checkpoint.filename {filename!r}: a file name with {{fields}} of the epoch record, e.g. "
                                 "'{epoch:03d}-{val_dice:.6f}'")
        self.save_top_k, self.filename, self.every, self.save_last = save_top_k, filename, every_n_epochs, save_last
        self.kept: list[dict] = []  # {"value", "file", "epoch"} best first
        self.pending: tuple[str, list[str]] | None = None  # (file to write, files to delete) once the checkpoint is written

    def on_epoch_end(self, trainer, record: dict) -> None:
        """Which file this epoch's checkpoint becomes and which leave (``kept`` is saved with the checkpoint)."""
        epoch = int(record["epoch"])
        value = _value(record, self.monitor, "model_checkpoint")
        self.pending = None
        if ((epoch + 1) % self.every and epoch + 1 != trainer.config.epochs) or value is None or self.save_top_k == 0:
            return
        try:
            name = self.filename.format(**metrics(record)) + ".pt"
        except (KeyError, ValueError, TypeError) as e:
            raise SpineautoError(f"model_checkpoint.filename {self.filename!r}: {e} is not a field of the epoch record "
                                 f"({', '.join(sorted(metrics(record)))})") from None
        if self.save_top_k > 0 and len(self.kept) >= self.save_top_k and not _better(self.mode, value, self.kept[-1]["value"]):
            return
        kept = [k for k in self.kept if k["file"] != name] + [{"value": value, "file": name, "epoch": epoch}]
        kept.sort(key=lambda k: -k["value"] if self.mode == "max" else k["value"])
        gone = kept[self.save_top_k:] if self.save_top_k > 0 else []
        self.kept = kept[:self.save_top_k] if self.save_top_k > 0 else kept
        self.pending = (name, [g["file"] for g in gone])

    def on_checkpoint(self, trainer, record: dict, path: Path) -> None:
        from spineauto.training import checkpoint as ckpt

        folder = trainer.run.fold_dir / "checkpoints"
        if self.save_last:
            folder.mkdir(exist_ok=True)
            ckpt.copy_checkpoint(path, folder / "last.pt")
        if getattr(self, "pending", None):
            name, gone = self.pending
            folder.mkdir(exist_ok=True)
            ckpt.copy_checkpoint(path, folder / name)
            for g in gone:
                (folder / g).unlink(missing_ok=True)
            self.pending = None

    @property
    def best_file(self) -> Path | None:
        return Path(self.kept[0]["file"]) if self.kept else None

    def state_dict(self) -> dict:
        return {"kept": self.kept}

    def load_state_dict(self, state: dict) -> None:
        self.kept = list(state.get("kept", []))


@CALLBACKS.register("segmentation_sampler")
class SegmentationSampler(Callback):
    """``image_amount`` validation samples per epoch (image | truth | prediction) in
    ``fold_k/samples/epoch_XXX_k.png`` and W&B/TensorBoard."""

    def __init__(self, image_amount: int = 4, every_n_epochs: int = 1):
        if image_amount < 1 or every_n_epochs < 1:
            raise SpineautoError("segmentation_sampler: image_amount >= 1 and every_n_epochs >= 1")
        self.image_amount, self.every = image_amount, every_n_epochs

    def on_epoch_end(self, trainer, record: dict) -> None:
        from spineauto.training.loggers import render_overlay

        epoch = int(record["epoch"])
        if (epoch + 1) % self.every:
            return
        examples = [e for e in trainer.last_examples if e][: self.image_amount]
        images = {f"samples/{k}": render_overlay(e, trainer.run.fold_dir / "samples" / f"epoch_{epoch:03d}_{k}.png")
                  for k, e in enumerate(examples)}
        if images:
            trainer.trackers.log_images(epoch, images)


@CALLBACKS.register("early_stopping")
class EarlyStopping(Callback):
    """Stops the run when ``monitor`` has not improved by more than ``min_delta`` for ``patience``
    epochs; the last checkpoint becomes ``checkpoint_final.pt`` and ``--continue`` leaves it stopped."""

    def __init__(self, monitor: str = "val_loss", mode: str = "min", patience: int = 10, min_delta: float = 0.0):
        if patience < 1 or min_delta < 0:
            raise SpineautoError("early_stopping: patience >= 1 and min_delta >= 0")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, _mode(mode, "early_stopping"), patience, min_delta
        self.best: float | None = None
        self.wait = 0

    def on_epoch_end(self, trainer, record: dict) -> None:
        value = _value(record, self.monitor, "early_stopping")
        if value is None:
            return
        if _better(self.mode, value, self.best, self.min_delta):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            trainer.request_stop(f"early stopping: {self.monitor} did not improve by more than {self.min_delta:g} for "
                                 f"{self.patience} epoch(s) (best {self.best:.6g})")

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait = state.get("best"), int(state.get("wait", 0))


class FunctionCallback(Callback):
    """A plain ``fn(trainer, record)`` (``TrainOptions.callbacks``) called after each epoch's checkpoint and log."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def on_checkpoint(self, trainer, record: dict, path: Path) -> None:
        self.fn(trainer, record)


def build_callbacks(entries: list[dict[str, Any]]) -> list:
    """The callbacks of ``trainer.callbacks``: each checked (name, arguments) before training starts."""
    out = []
    for i, entry in enumerate(entries):
        where = f"trainer.callbacks[{i}]"
        kwargs = {k: v for k, v in entry.items() if k != "name"}
        cls = CALLBACKS.resolve(entry["name"], f"{where}.name")
        bind_kwargs(cls, kwargs, f"{where} ({entry['name']})")
        try:
            out.append(cls(**kwargs))
        except SpineautoError as e:
            raise SpineautoError(f"{where}: {e}") from None
        except TypeError as e:
            raise SpineautoError(f"{where} ({entry['name']}): {e}") from None
    return out


RECORD_KEYS = ("epoch", "train_loss", "val_loss", "lr", "epoch_time", "train_time", "samples_per_s", "ema", "best_epoch")


def record_names(plans, plan) -> tuple[set[str], tuple[str, ...]]:
    """The epoch record's keys for this configuration's built-in task (and the prefixes of per-head keys)."""
    names = set(RECORD_KEYS)
    if plan.has_segmentation:
        names |= {"pseudo_dice", "val_dice"} | {f"pseudo_dice_{k}" for k, v in plans.labels.items() if v > 0}
    if plan.has_classification:
        names |= {"accuracy", "balanced_accuracy", "macro_f1"}
    if plan.task == "multitask":
        names.add("multitask_score")
    return names, tuple(f"{h.name}/" for h in plan.heads) if plan.has_classification else ()


def check_monitors(callbacks: list, plans, plan) -> None:
    """Monitors and filename fields of the built-in callbacks (and reduce_on_plateau's) name keys the
    epoch record will have: checked before anything is written (not for a plug-in task, whose metrics are its own)."""
    if plan.trainer.task:
        return
    names, prefixes = record_names(plans, plan)

    def check(value: str, where: str) -> None:
        if value not in names and not value.startswith(prefixes):
            close = difflib.get_close_matches(value, sorted(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpineautoError(f"{where}: {value!r} is not a key of this run's epoch record{hint}; it has {', '.join(sorted(names))}"
                                 + (f" and per-head keys {', '.join(p + '...' for p in prefixes)}" if prefixes else ""))

    entries = plan.trainer.callbacks
    for i, cb in enumerate(callbacks[:len(entries)]):
        where = f"trainer.callbacks[{i}] ({entries[i]['name']})"
        if isinstance(cb, (ModelCheckpoint, EarlyStopping)):
            check(cb.monitor, f"{where}.monitor")
        if isinstance(cb, ModelCheckpoint):
            for _, field_, _, _ in string.Formatter().parse(cb.filename):
                if field_:
                    check(field_.split(".")[0].split("[")[0], f"{where}.filename")
    if plan.optim.schedule == "reduce_on_plateau":
        check(plan.optim.plateau_monitor, "optim.plateau_monitor")


def sampler_images(callbacks: list) -> int:
    """Validation samples the loop keeps per epoch: what the samplers ask for (at least the one overlay)."""
    return max([1, *[c.image_amount for c in callbacks if isinstance(c, SegmentationSampler)]])
