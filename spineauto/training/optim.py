"""Optimisers and learning-rate schedules by name (``optim.optimizer``, ``optim.schedule``); a user's
own as ``package.module:Name``.

Optimisers: ``sgd`` (Nesterov momentum, nnU-Net's), ``adam``, ``adamw``; a plug-in is a
``torch.optim.Optimizer`` subclass built as ``Name(params, lr=initial_lr, weight_decay=..., **optimizer_kwargs)``.

Schedules step once per training iteration (a :class:`Schedule` holds a torch scheduler and its
state, checkpointed): ``poly`` (nnU-Net's (1 - epoch/epochs)^0.9, constant within an epoch),
``cosine`` (linear warm-up over ``warmup_epochs``, then cosine down to ``min_lr``), ``constant``,
``reduce_on_plateau`` (torch's, stepped after each validation on ``plateau_monitor``). A plug-in
schedule is a ``torch.optim.lr_scheduler.LRScheduler`` subclass built as
``Name(optimizer, total_steps=epochs * iters_per_epoch, **schedule_kwargs)`` and stepped every iteration.
"""
from __future__ import annotations

import inspect
import math

import torch

from spineauto.errors import SpineautoError
from spineauto.planning.plans import OptimPlan
from spineauto.plugins import Registry, bind_kwargs, subclass_check

OPTIMIZERS = Registry("optimiser", subclass_check(torch.optim.Optimizer), key="optimizer")
SCHEDULES = Registry("LR schedule", subclass_check(torch.optim.lr_scheduler.LRScheduler), key="schedule")


@OPTIMIZERS.register("sgd")
def _sgd(params, o: OptimPlan, **kw) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=o.initial_lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.momentum > 0, **kw)


@OPTIMIZERS.register("adam")
def _adam(params, o: OptimPlan, **kw) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=o.initial_lr, weight_decay=o.weight_decay, **kw)


@OPTIMIZERS.register("adamw")
def _adamw(params, o: OptimPlan, **kw) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=o.initial_lr, weight_decay=o.weight_decay, **kw)


_TORCH = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def build_optimizer(params, o: OptimPlan) -> torch.optim.Optimizer:
    obj = OPTIMIZERS.resolve(o.optimizer, "optim.optimizer")
    if o.optimizer in OPTIMIZERS:
        cls = _TORCH.get(o.optimizer)
        fixed = {"params", "lr", "weight_decay", "momentum", "nesterov"}
        bad = sorted(set(o.optimizer_kwargs) & fixed)
        if bad:
            raise SpineautoError(f"optim.optimizer_kwargs: {', '.join(bad)} come from the optim section (initial_lr, weight_decay, momentum)")
        if cls is not None:
            bind_kwargs(cls, o.optimizer_kwargs, f"optim.optimizer_kwargs of {o.optimizer}")
        return obj(params, o, **o.optimizer_kwargs)
    kwargs = {"lr": o.initial_lr, "weight_decay": o.weight_decay, **o.optimizer_kwargs}
    accepted = inspect.signature(obj).parameters
    if "weight_decay" not in accepted and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        kwargs.pop("weight_decay")
    bind_kwargs(obj, kwargs, f"optim.optimizer_kwargs of {o.optimizer}", skip=1)
    return obj(params, **kwargs)


class Schedule:
    """The learning rate over training: ``step()`` after every optimiser step, ``step_metric(record)``
    after every epoch's record (only reduce_on_plateau uses it); ``state_dict`` for checkpoints."""

    def __init__(self, scheduler, needs_metric: bool = False, monitor: str = "val_loss"):
        self.scheduler, self.needs_metric, self.monitor = scheduler, needs_metric, monitor

    def step(self) -> None:
        if not self.needs_metric:
            self.scheduler.step()

    def step_metric(self, record: dict) -> None:
        if self.needs_metric:
            value = record.get(self.monitor)
            if value is not None and math.isfinite(value):
                self.scheduler.step(value)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


def _lambda(optimizer, fn) -> Schedule:
    return Schedule(torch.optim.lr_scheduler.LambdaLR(optimizer, fn))


@SCHEDULES.register("poly")
def _poly(optimizer, o: OptimPlan, epochs: int, iters: int) -> Schedule:
    return _lambda(optimizer, lambda step: (1 - min(step // iters, epochs - 1) / epochs) ** 0.9)


@SCHEDULES.register("constant")
def _constant(optimizer, o: OptimPlan, epochs: int, iters: int) -> Schedule:
    return _lambda(optimizer, lambda step: 1.0)


@SCHEDULES.register("cosine")
def _cosine(optimizer, o: OptimPlan, epochs: int, iters: int) -> Schedule:
    warm, total, floor = o.warmup_epochs * iters, epochs * iters, o.min_lr / o.initial_lr

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min((step - warm) / max(total - warm, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return _lambda(optimizer, factor)


@SCHEDULES.register("reduce_on_plateau")
def _plateau(optimizer, o: OptimPlan, epochs: int, iters: int) -> Schedule:
    mode = "min" if o.plateau_monitor.endswith("loss") else "max"
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=o.plateau_factor, patience=o.plateau_patience)
    return Schedule(sched, needs_metric=True, monitor=o.plateau_monitor)


def build_schedule(optimizer, o: OptimPlan, epochs: int, iters_per_epoch: int) -> Schedule:
    obj = SCHEDULES.resolve(o.schedule, "optim.schedule")
    if o.schedule in SCHEDULES:
        if o.schedule_kwargs:
            raise SpineautoError(f"optim.schedule_kwargs: the built-in schedule {o.schedule!r} takes its settings from the optim "
                                 "section (warmup_epochs, min_lr, plateau_*)")
        return obj(optimizer, o, epochs, iters_per_epoch)
    kwargs = {"total_steps": epochs * iters_per_epoch, **o.schedule_kwargs}
    params = inspect.signature(obj).parameters
    if "total_steps" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs.pop("total_steps")
    bind_kwargs(obj, kwargs, f"optim.schedule_kwargs of {o.schedule}", skip=1)
    return Schedule(obj(optimizer, **kwargs))


def accumulated_backward(model, micro: list[dict], loss_fn, autocast, scaler=None, no_sync=None) -> torch.Tensor:
    """Gradients of the mean loss over ``micro``-batches, one backward pass each (``trainer.accumulate``):
    for a loss that is a mean over samples, exactly the gradients of one batch holding them all.
    Under DDP, ``no_sync`` keeps the ranks from averaging before the last micro-batch. Returns the mean loss."""
    from contextlib import nullcontext

    n, total = len(micro), None
    for i, batch in enumerate(micro):
        with no_sync() if (no_sync is not None and i < n - 1) else nullcontext():
            with autocast():
                loss = loss_fn(model(batch["data"]), batch) / n
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total
