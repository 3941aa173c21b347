"""The one training loop, composed of parts: a task (loss, metrics), data (keyed batches in
background workers), optimisation (SGD/Adam, poly LR, clipping, AMP), DDP, checkpoints and loggers.

:func:`train_fold` (with :class:`TrainOptions`) is the entry point of ``spineauto train`` and ``spineauto demo``.
The end of an epoch is bookkeeping (EMA, best, top-k, checkpoints: :meth:`Trainer._bookkeep`), then
reporting (logs, plots, W&B, callbacks: :meth:`Trainer._report`). The final validation goes through
the same case driver as ``spineauto predict``.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from spineauto.devices import cpu_native_bf16, resolve_device
from spineauto.errors import SpineautoError
from spineauto.networks.build import build_network, checkpoint_activations
from spineauto.planning.plans import ConfigurationPlan, Plans
from spineauto.training import checkpoint as ckpt
from spineauto.training import classification, multitask  # noqa: F401 (the built-in tasks register themselves)
from spineauto.training.augment import build_transforms, initial_patch_size
from spineauto.training.data import EpochKeys, KeyedBatches, default_num_workers, make_loader
from spineauto.training.synthetic import neck_context
from spineauto.training.distributed import DistInfo, all_reduce_sum, convert_sync_batchnorm, init_distributed, rank_batch_size, shutdown
from spineauto.training.callbacks import FunctionCallback, build_callbacks, check_monitors, sampler_images
from spineauto.training.loggers import LOGGERS, LocalLogger, Trackers, open_trackers, resolve_wandb_mode
from spineauto.training.optim import accumulated_backward, build_optimizer, build_schedule
from spineauto.training.run_config import RunSpec, full_config, write_run_config
from spineauto.training.transforms import build_extra_transforms
from spineauto.training.run import RunContext, open_run
from spineauto.training.tasks import TASKS, Task

log = logging.getLogger(__name__)
EMA_DECAY = 0.9  # nnU-Net's smoothing of the pseudo-Dice
NAN_CHECK_EVERY = 25  # iterations between finite-loss checks (a host sync on CUDA)


@dataclass
class TrainOptions:
    """Everything ``spineauto train`` may set beside the dataset, configuration and fold.

    ``None`` means "the plan's value" (``epochs``, ``iters_per_epoch``, ``val_iters``) or "the
    default for this machine" (``amp``, ``amp_dtype``, ``num_workers``); overrides are recorded in
    ``fold_k/config.json``. A fold holding an earlier run's checkpoints is trained again only with
    ``continue_training`` (resume it) or ``overwrite`` (replace it). ``callbacks`` are called on rank 0
    as ``cb(trainer, record)`` after each epoch's record is logged and its checkpoints written; one that
    raises stops the run, resumable with ``--continue``. ``progress`` shows the iterations (the CLI
    passes a rich bar). ``config``, ``batch_size``, ``lr`` and ``config_set`` override the plan
    (training/run_config.py); ``loggers`` adds trackers (tensorboard) beside W&B.
    """

    epochs: int | None = None
    iters_per_epoch: int | None = None
    val_iters: int | None = None
    device: str = "auto"
    amp: bool | None = None
    amp_dtype: str | None = None
    channels_last: bool | None = None  # None: on for CUDA, off on CPU (measured: no gain there; README "Training throughput")
    compile: bool = False  # torch.compile the network (falls back to eager if compiling fails; the time it took is logged)
    wandb: str = "auto"
    seed: int | None = None
    continue_training: bool = False
    overwrite: bool = False  # replace an earlier run of the fold (kept aside until this run's first checkpoint)
    allow_stale_data: bool = False  # train although the raw dataset changed since plan_and_preprocess (warned)
    pretrained: Path | str | None = None
    num_workers: int | None = None
    preprocessed: Path | None = None
    results: Path | None = None
    validate: bool = True
    save_probabilities: bool = False  # validation/<case>.npz, for find_best_configuration's ensembles
    top_k: int = 5
    callbacks: list[Callable[["Trainer", dict], None]] = field(default_factory=list)
    progress: TrainingProgress | None = None
    config: Path | None = None  # a run YAML or a preset of plans/
    batch_size: int | str | None = None
    lr: float | str | None = None
    config_set: list[str] = field(default_factory=list)  # dotted key=value overrides
    loggers: list[str] = field(default_factory=list)  # tensorboard
    wandb_artifacts: bool = False  # the best and final checkpoints as a W&B artifact


def train_fold(dataset: str | int, configuration: str = "2d", fold: str | int = 0, options: TrainOptions | None = None) -> Path:
    """Train one fold (0..4 or 'all') of ``configuration`` and validate it; returns the fold folder."""
    o = options or TrainOptions()
    if o.continue_training and o.overwrite:
        raise SpineautoError("--continue resumes the fold's run and --overwrite replaces it: give one of them")
    if o.seed is not None and not 0 <= o.seed < 2**32:
        raise SpineautoError(f"--seed must be a whole number from 0 to {2**32 - 1}, got {o.seed}")
    if o.num_workers is not None and o.num_workers < 0:
        raise SpineautoError(f"--num-workers must be >= 0 (0: load data in the training process), got {o.num_workers}")
    dev = resolve_device(o.device)
    info = init_distributed(dev.type)
    try:
        if info.enabled and dev.type == "cuda":
            dev = torch.device("cuda", info.local_rank)
        with open_run(dataset, configuration, fold, seed=o.seed, epochs=o.epochs, iters_per_epoch=o.iters_per_epoch,
                      val_iters=o.val_iters, continue_training=o.continue_training, preprocessed=o.preprocessed,
                      results=o.results, is_main=info.is_main, allow_stale=o.allow_stale_data,
                      run_spec=RunSpec(o.config, o.batch_size, o.lr, list(o.config_set))) as run:
            return _train_run(run, o, dev, info)
    except OSError as e:  # a folder or file the run needs: one line naming it (checkpoints are written atomically)
        raise SpineautoError(f"{e.filename or 'training'}: {e.strerror or e}; training stopped (checkpoints are written atomically: "
                             "the last one is intact); fix the path or its permissions and rerun (--continue resumes)") from None
    finally:
        shutdown(info)


def _train_run(run: RunContext, o: TrainOptions, dev: torch.device, info: DistInfo) -> Path:
    """Build the trainer (every input checked), claim the fold folder, train, validate."""
    amp = (dev.type == "cuda" or cpu_native_bf16()) if o.amp is None else bool(o.amp)
    amp_dtype = o.amp_dtype or ("float16" if dev.type == "cuda" else "bfloat16")
    if amp_dtype not in ("float16", "bfloat16"):
        raise SpineautoError(f"--amp-dtype {amp_dtype!r}: use float16 or bfloat16")
    if amp and dev.type == "cpu" and amp_dtype == "float16":
        raise SpineautoError("--amp on CPU uses bfloat16; float16 autocast needs CUDA")
    workers = default_num_workers(dev) if o.num_workers is None else int(o.num_workers)
    channels_last = (dev.type == "cuda") if o.channels_last is None else bool(o.channels_last)
    run.config.runtime = {"device": str(dev), "amp": amp, "amp_dtype": amp_dtype if amp else None, "world_size": info.world_size,
                          "ddp_backend": info.backend, "channels_last": channels_last, "compile": bool(o.compile),
                          "num_workers": workers, "wandb": resolve_wandb_mode(o.wandb) if info.is_main else None,
                          "pretrained": str(o.pretrained) if o.pretrained else None, "torch": torch.__version__}
    trainer = Trainer(run, dev, info, amp, getattr(torch, amp_dtype), workers, o.progress if info.is_main else None, o.top_k,
                      channels_last=channels_last, compile=o.compile)
    trainer.callbacks += [FunctionCallback(cb) for cb in o.callbacks]
    for name in [*o.loggers, *run.plan.trainer.loggers]:
        if name not in LOGGERS:
            raise SpineautoError(f"logger {name!r}: choose from {', '.join(LOGGERS)} (W&B is --wandb)")
    trainer.logger_names = sorted({*o.loggers, *run.plan.trainer.loggers})
    trainer.wandb_artifacts = o.wandb_artifacts
    if o.pretrained and not o.continue_training:
        ckpt.load_pretrained(trainer.network, Path(o.pretrained))
    elif o.pretrained:
        log.warning("--pretrained is ignored with --continue (the run's own weights are restored)")
    if info.is_main:
        run.start(overwrite=o.overwrite)  # every input checked: now the fold folder becomes this run's
    try:
        trainer.fit()
        if info.is_main and o.validate:
            trainer.trackers.log_validation(trainer.final_validation(save_probabilities=o.save_probabilities))
        if info.is_main and o.wandb_artifacts:
            trainer.log_checkpoints()
    finally:
        trainer.trackers.finish()
    return run.fold_dir


def build_task(plans: Plans, plan: ConfigurationPlan, ddp: bool = False) -> Task:
    """The configuration's task, or the one ``trainer.task`` names (registered, or package.module:Name)."""
    if plan.trainer.task:
        return TASKS.resolve(plan.trainer.task, "trainer.task")(plans, plan, ddp)
    if plan.task not in TASKS:
        raise SpineautoError(f"configuration {plan.name!r}: task {plan.task!r} cannot be trained yet; trainable tasks: {', '.join(sorted(TASKS))}")
    return TASKS[plan.task](plans, plan, ddp)


class TrainingProgress(Protocol):
    """What the trainer reports its iterations to (rank 0 only)."""

    def start(self, total: int) -> None: ...
    def advance(self, description: str) -> None: ...
    def stop(self) -> None: ...


class Trainer:
    def __init__(self, run: RunContext, device: torch.device, info: DistInfo, amp: bool, amp_dtype: torch.dtype,
                 num_workers: int, progress: TrainingProgress | None, top_k: int, channels_last: bool = False, compile: bool = False):
        self.run, self.device, self.info = run, device, info
        self.plan, self.config = run.plan, run.config
        self.amp, self.amp_dtype, self.num_workers, self.progress = amp, amp_dtype, num_workers, progress
        torch.manual_seed(self.config.seed)  # same initial weights on every rank
        np.random.seed(self.config.seed)
        self.in_channels = len(run.plans.channel_names)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.network = build_network(self.plan, self.in_channels, run.plans.num_classes).to(device, memory_format=self.memory_format)
        if info.enabled and self.plan.trainer.sync_batchnorm:  # BatchNorm over the global batch, not each rank's share
            run.config.runtime["sync_batchnorm_layers"] = convert_sync_batchnorm(self.network)
        self.task: Task = build_task(run.plans, self.plan, ddp=info.enabled)
        o = self.plan.optim
        self.optimizer = build_optimizer(self.network.parameters(), o)
        self.schedule = build_schedule(self.optimizer, o, self.config.epochs, self.config.iters_per_epoch)
        self.callbacks = build_callbacks(self.plan.trainer.callbacks)
        check_monitors(self.callbacks, run.plans, self.plan)
        build_extra_transforms(self.plan.augmentation.transforms)  # checked now: the data workers build them later
        self.trackers, self.logger_names, self.wandb_artifacts = Trackers(), [], False
        self.last_examples: list[dict] = []
        self.stop_reason: str | None = None
        if self.plan.trainer.activation_checkpointing:
            log.info("activation checkpointing: %d encoder/decoder stages recomputed in the backward pass",
                     checkpoint_activations(self.network))
        self.scaler = torch.amp.GradScaler("cuda") if (amp and device.type == "cuda" and amp_dtype == torch.float16) else None
        self.start_epoch, self.ema, self.best = 0, None, {"epoch": None, "ema": -math.inf}
        total_steps = self.config.epochs * self.config.iters_per_epoch  # weights averaged after this step (optim.weight_average)
        self.average_after = total_steps - round(total_steps * o.weight_average) if o.weight_average > 0 else None
        self.averaged: AveragedModel | None = None
        self.topk = ckpt.TopK(top_k)
        self.logger = LocalLogger(run.fold_dir)
        self.wandb_id: str | None = None
        torch.manual_seed(self.config.seed * 1000 + info.rank)
        if run.resume is not None:
            self._restore(run.resume)
        self.model = self.network
        if info.enabled:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.network, device_ids=[device.index] if device.type == "cuda" else None)
        self.eager_model, self.compile_s = self.model, None
        if compile:
            self.model = torch.compile(self.model)

    # -- state ---------------------------------------------------------------------------------
    def _restore(self, state: dict) -> None:
        try:
            self.network.load_state_dict(state["network"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["scheduler"])
            for cb, cb_state in zip(self.callbacks, state.get("callbacks") or []):
                cb.load_state_dict(cb_state)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:  # weights or optimizer of another shape
            reason = " ".join(str(e).split())[:300]
            raise SpineautoError(f"{self.run.resumed_from}: does not fit this run's network or optimizer ({type(e).__name__}: "
                                 f"{reason}); start over with --overwrite") from None
        self.stop_reason = state.get("stopped")
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.start_epoch = int(state["epoch"])
        if state.get("averaged") is not None:
            self._averaged().load_state_dict(state["averaged"])
        self.ema, self.best = state.get("ema"), state.get("best", self.best)
        self.topk.entries = list(state.get("topk", []))
        self.logger.history = list(state.get("history", []))
        self.wandb_id = state.get("wandb_run_id")
        ckpt.set_rng_state(state["rng"])
        if self.info.enabled:
            torch.manual_seed(self.config.seed * 1000 + self.info.rank + 7919 * self.start_epoch)
        log.info("resuming %s at epoch %d of %d", self.run.fold_dir, self.start_epoch, self.config.epochs)

    def state(self, epochs_done: int) -> dict:
        return {"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.schedule.state_dict(), "callbacks": [cb.state_dict() for cb in self.callbacks],
                "stopped": self.stop_reason, "grad_scaler": self.scaler.state_dict() if self.scaler else None,
                "epoch": epochs_done, "configuration": self.plan.name, "plans": self.run.plans.to_dict(),
                "run_config": self.config.to_dict(), "task": self.plan.task, "in_channels": self.in_channels,
                "num_classes": self.run.plans.num_classes, "rng": ckpt.rng_state(), "history": self.logger.history,
                "ema": self.ema, "best": self.best, "topk": self.topk.entries, "wandb_run_id": self.wandb_id,
                "averaged": self.averaged.state_dict() if self.averaged is not None else None, "trainer": "spineautoTrainer"}

    def _averaged(self) -> AveragedModel:
        """The running mean of the weights (``optim.weight_average``; buffers too), made on first use."""
        if self.averaged is None:
            self.averaged = AveragedModel(self.network, use_buffers=True)
        return self.averaged

    def _take_average(self) -> None:
        """The last epoch ends with the averaged weights: the final checkpoint and prediction use them."""
        if self.averaged is not None:
            self.network.load_state_dict(self.averaged.module.state_dict())
            log.info("final weights: the mean of the last %d steps' (optim.weight_average)", int(self.averaged.n_averaged))

    # -- loop ----------------------------------------------------------------------------------
    def _loader(self):
        plan, cfg = self.plan, self.config
        rank_bs = rank_batch_size(cfg.batch_size, self.info)
        sample_size = initial_patch_size(plan.patch_size, plan.augmentation)
        transforms = build_transforms(plan.patch_size, plan.augmentation, plan.has_segmentation, remap_contrast=not plan.has_classification,
                                      cord_value=self.run.plans.cord_value(plan))
        batches = KeyedBatches(self.task.make_sampler(self.run.store), transforms, self.run.train_cases, self.run.val_cases,
                               rank_bs, plan.patch_size, sample_size, cfg.seed, self.info.rank,
                               context=neck_context(self.run.plans, plan))
        t = plan.trainer
        self.keys = EpochKeys(self.start_epoch, cfg.epochs, cfg.iters_per_epoch, cfg.val_iters, t.accumulate, t.val_every)
        pin = self.device.type == "cuda" if t.pin_memory is None else t.pin_memory
        return make_loader(batches, self.keys, self.num_workers, pin_memory=pin, persistent_workers=t.persistent_workers)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp else nullcontext()

    def _to_device(self, batch: dict) -> dict:
        nb = self.device.type == "cuda"
        out = {"data": batch["data"].to(self.device, non_blocking=nb, memory_format=self.memory_format), "keys": batch.get("keys", [])}
        if "seg" in batch:
            out["seg"] = batch["seg"].to(self.device, non_blocking=nb)
        if "cls" in batch:
            out["cls"] = {k: v.to(self.device, non_blocking=nb) for k, v in batch["cls"].items()}
        return out

    def _train_step(self, batch: list[dict]) -> torch.Tensor:
        """One optimiser step on ``trainer.accumulate`` micro-batches; the schedule steps after it."""
        if self.compile_s is None and self.model is not self.eager_model:
            return self._first_compiled_step(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss = accumulated_backward(self.model, batch, self.task.loss, self._autocast, self.scaler,
                                    getattr(self.model, "no_sync", None) if self.info.enabled else None)
        clip = self.plan.optim.grad_clip
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(self.network.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(self.network.parameters(), clip)
            self.optimizer.step()
        self.schedule.step()
        return loss

    def _first_compiled_step(self, batch: dict) -> torch.Tensor:
        """The first step of a ``torch.compile``d model compiles it (timed); if compiling fails, eager takes over."""
        t0, self.compile_s = time.perf_counter(), 0.0
        try:
            loss = self._train_step(batch)
        except Exception as e:  # noqa: BLE001 - compilers fail in many ways; the eager model is always right
            log.warning("torch.compile failed (%s: %s); training without it", type(e).__name__, (str(e).splitlines() or [""])[0][:200])
            self.model = self.eager_model
            loss = self._train_step(batch)
        self.compile_s = time.perf_counter() - t0
        log.info("torch.compile: the first step took %.1f s (compiling included)%s", self.compile_s,
                 "" if self.model is not self.eager_model else " and fell back to eager")
        return loss

    def _nan_stop(self, epoch: int, where: str) -> SpineautoError:
        return SpineautoError(
            f"{self.run.fold_dir}: the {where} loss became NaN/inf in epoch {epoch}; training stopped and "
            f"{ckpt.LATEST} (epoch {epoch}) is the last good state; lower optim.initial_lr in plans.json or "
            "turn AMP off, then start over (a changed plan cannot --continue)")

    def fit(self) -> None:
        cfg, main = self.config, self.info.is_main
        fold_dir = self.run.fold_dir
        if main and self.run.resume is not None:  # what a kill after the checkpoint write left undone, then the history
            restored = ckpt.restore_copies(fold_dir, self.run.resume, cfg.epochs, self.topk, f"ema_{self.task.monitor}")
            if restored:
                log.info("%s: restored %s from %s (the last session stopped before copying it)", fold_dir, ", ".join(restored), ckpt.LATEST)
            self.logger.rewrite()
            self.topk.reconcile(fold_dir)
        if self.start_epoch >= cfg.epochs or self.stop_reason:
            log.info("%s: training already complete (%s)", fold_dir, self.stop_reason or f"{cfg.epochs} epochs")
            return
        if main:
            fold_dir.mkdir(parents=True, exist_ok=True)
            self.logger.start_log_file()
            cfg.save(fold_dir)
            write_run_config(fold_dir, self.plan, cfg.to_dict(), cfg.overrides)
            log.info("training %s fold %s: %d epochs x %d iterations, batch %d, %s, %d worker(s), AMP %s, %d process(es)",
                     cfg.dataset, cfg.fold, cfg.epochs, cfg.iters_per_epoch, cfg.batch_size, self.device, self.num_workers,
                     cfg.runtime.get("amp_dtype") or "off", self.info.world_size)
            self.trackers, self.wandb_id = open_trackers(fold_dir, full_config(self.plan, cfg.to_dict(), cfg.overrides), self.network,
                                                         cfg.runtime.get("wandb"), self.wandb_id, self.logger_names)
            for cb in self.callbacks:
                cb.on_train_start(self)
        batches = iter(self._loader())
        if self.progress is not None:
            self.progress.start((cfg.epochs - self.start_epoch) * cfg.iters_per_epoch)
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                record, example = self._epoch(epoch, batches)
                if main:
                    is_best = self._bookkeep(epoch, record)
                    self._report(epoch, record, example, is_best)
                    if self.stop_reason:
                        log.info("%s; stopped after epoch %d (checkpoint_final.pt is its checkpoint)", self.stop_reason, epoch)
                if self.info.enabled:
                    self._share_stop()
                if not main and (epoch + 1 == cfg.epochs or self.stop_reason):
                    self._take_average()  # the other ranks end with the weights rank 0 took for its checkpoint
                if self.stop_reason:
                    break
            if main:
                for cb in self.callbacks:
                    cb.on_train_end(self)
        finally:
            if self.progress is not None:
                self.progress.stop()
            if main:
                self.logger.plot_progress(force=True)  # also when stopped early: the plot shows every logged epoch
                self.logger.close()

    def request_stop(self, reason: str) -> None:
        """Stop after this epoch (a callback's call, e.g. early stopping)."""
        self.stop_reason = reason

    def _share_stop(self) -> None:
        flag = all_reduce_sum(torch.tensor(1.0 if self.stop_reason else 0.0, device=self.device), self.info)
        if float(flag) > 0 and not self.stop_reason:
            self.stop_reason = "stopped by rank 0"

    def log_checkpoints(self) -> None:
        """The best and final checkpoints as a W&B artifact (``--wandb-artifacts``)."""
        files = [self.run.fold_dir / n for n in (ckpt.BEST, ckpt.FINAL) if (self.run.fold_dir / n).is_file()]
        cfg = self.config
        self.trackers.log_artifacts(f"{cfg.dataset}_{cfg.configuration}_fold{cfg.fold}", files)

    def _epoch(self, epoch: int, batches) -> tuple[dict, dict | None]:
        cfg = self.config
        lr = self.optimizer.param_groups[0]["lr"]
        accumulate, log_every = self.plan.trainer.accumulate, self.plan.trainer.log_every
        self.model.train()
        started = time.time()
        t0 = time.perf_counter()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        on_cpu = self.device.type == "cpu"
        for i in range(cfg.iters_per_epoch):
            loss = self._train_step([self._to_device(next(batches)) for _ in range(accumulate)])
            total += loss
            step = epoch * cfg.iters_per_epoch + i + 1
            if self.average_after is not None and step > self.average_after:
                self._averaged().update_parameters(self.network)
            if self.info.is_main and log_every and step % log_every == 0 and self.trackers:
                self.trackers.log_step(step, {"train_loss": float(loss)})  # the rate per step: the lr_monitor callback
            if self.info.is_main:
                for cb in self.callbacks:
                    cb.on_train_batch_end(self, step, None)
            if (on_cpu or (i + 1) % NAN_CHECK_EVERY == 0) and not torch.isfinite(total):  # free on CPU: no device sync
                raise self._nan_stop(epoch, "training")
            if self.progress is not None:
                self.progress.advance(f"training (loss {float(loss):.3f})" if on_cpu else "training")
        train_time = time.perf_counter() - t0
        total = all_reduce_sum(total, self.info) / (cfg.iters_per_epoch * self.info.world_size)
        train_loss = float(total)
        if not math.isfinite(train_loss):
            raise self._nan_stop(epoch, "training")
        val_loss, metrics, example = self._validate(batches) if self.keys.validates(epoch) else (math.nan, {}, None)
        if self.compile_s is not None and epoch == self.start_epoch:
            metrics["compile_s"] = self.compile_s  # the first step's time, compiling included
        record = {"epoch": epoch, "started": started, "train_loss": train_loss, "val_loss": val_loss, **metrics, "lr": lr,
                  "epoch_time": time.perf_counter() - t0, "train_time": train_time,
                  "samples_per_s": cfg.iters_per_epoch * cfg.batch_size * accumulate / max(train_time, 1e-9)}
        self.schedule.step_metric(record)
        return record, example

    def _validate(self, batches) -> tuple[float, dict, dict | None]:
        cfg = self.config
        if cfg.val_iters == 0:
            return math.nan, {}, None
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        stats: dict[str, torch.Tensor] = {}
        example, examples, wanted = None, [], sampler_images(self.callbacks)
        with torch.no_grad(), self._autocast():
            for i in range(cfg.val_iters):
                batch = self._to_device(next(batches))
                output = self.network(batch["data"])  # unwrapped: no DDP sync needed
                total += self.task.loss(output, batch).detach()
                for k, v in self.task.val_stats(output, batch).items():
                    stats[k] = stats[k] + v if k in stats else v
                if i == 0 and self.info.is_main:
                    example = self.task.example(batch, output)
                if self.info.is_main and wanted > 1 and len(examples) < wanted and hasattr(self.task, "examples"):
                    examples += self.task.examples(batch, output, wanted - len(examples))
        self.last_examples = examples or [example]
        total = all_reduce_sum(total, self.info) / (cfg.val_iters * self.info.world_size)
        stats = {k: all_reduce_sum(v, self.info) for k, v in stats.items()}
        return float(total), self.task.metrics(stats), example

    def _bookkeep(self, epoch: int, record: dict) -> bool:
        """EMA of the monitored metric, best, top-k and checkpoints; whether this epoch is the best."""
        fold_dir, monitor = self.run.fold_dir, self.task.monitor
        value = record.get(monitor)
        if value is not None and math.isfinite(value):
            self.ema = value if self.ema is None else EMA_DECAY * self.ema + (1 - EMA_DECAY) * value
        is_best = self.ema is not None and self.ema > self.best["ema"]
        if is_best:
            self.best = {"epoch": epoch, "ema": float(self.ema), "monitor": monitor}
        entered, evicted = self.topk.offer(epoch, self.ema) if self.ema is not None else (False, [])
        record.update(monitor=monitor, ema=self.ema, best_epoch=self.best["epoch"])
        for callback in self.callbacks:  # before the checkpoint: their state (and a stop they ask for) is part of it
            callback.on_epoch_end(self, record)
        final = epoch + 1 == self.config.epochs or bool(self.stop_reason)
        if final:
            self._take_average()
        self.logger.history.append(record)  # part of the checkpoint; the file line follows in _report
        latest = ckpt.save_checkpoint(fold_dir / ckpt.LATEST, self.state(epoch + 1))
        self.logger.history.pop()
        self.run.checkpoint_written()  # an --overwrite'n run can go now
        if is_best:
            ckpt.copy_checkpoint(latest, fold_dir / ckpt.BEST)
        if entered:
            ckpt.copy_checkpoint(latest, fold_dir / f"checkpoint_top_epoch{epoch:04d}.pt")
        for e in evicted:
            (fold_dir / e["file"]).unlink(missing_ok=True)
        if self.topk.k > 0:
            self.topk.write(fold_dir, f"ema_{monitor}")
        if final:
            ckpt.copy_checkpoint(latest, fold_dir / ckpt.FINAL)
        return is_best

    def _report(self, epoch: int, record: dict, example: dict | None, is_best: bool) -> None:
        """metrics.jsonl, log, overlay and progress plot, task images, W&B, then the callbacks."""
        fold_dir, monitor = self.run.fold_dir, record["monitor"]
        self.logger.log_epoch(record)
        overlay = self.logger.overlay(epoch, example)
        self.logger.plot_progress(force=epoch + 1 == self.config.epochs)
        images = self.task.epoch_images(fold_dir)  # e.g. confusion matrices
        self.trackers.log(record, overlay, images)
        for callback in self.callbacks:  # the epoch's checkpoint is written and its record logged
            callback.on_checkpoint(self, record, fold_dir / ckpt.LATEST)
        log.info("epoch %d: train %.4f val %.4f %s %.4f (EMA %.4f%s) lr %.2e %.1fs %.1f samples/s", epoch, record["train_loss"],
                 record["val_loss"], monitor, record.get(monitor, math.nan), self.ema if self.ema is not None else math.nan,
                 ", best" if is_best else "", record["lr"], record["epoch_time"], record["samples_per_s"])

    # -- end -----------------------------------------------------------------------------------
    def final_validation(self, save_probabilities: bool = False) -> dict:
        """The held-out cases, whole volumes, through the predictor's case driver (fold_k/validation/)."""
        from spineauto.inference.model import TrainedModel
        from spineauto.training.validation import validate_fold

        raw_labels = None
        if self.plan.has_segmentation:
            try:
                from spineauto import paths

                raw_labels = paths.raw_dataset(self.config.dataset) / "labelsTr"
                raw_labels = raw_labels if raw_labels.is_dir() else None
            except SpineautoError:
                pass
        model = TrainedModel(folder=self.run.model_dir, plans=self.run.plans, plan=self.plan, networks=[self.network],
                             folds=[self.run.fold_dir.name], device=self.device)
        seen = set(self.run.val_cases) & set(self.run.train_cases)  # -f all (or a fold without its own): trained on
        cases = "held-out case(s)" if not seen else f"case(s), {len(seen)} of them training cases (not held out: no estimate of unseen data)"
        which = "" if not seen else " (training cases, not held out)"
        log.info("validating %d %s with the sliding window", len(self.run.val_cases), cases)
        summary = validate_fold(model, self.run.store, self.run.val_cases, self.run.fold_dir / "validation", raw_labels,
                                save_probabilities=save_probabilities)
        if "segmentation" in summary:
            log.info("validation Dice%s: %s", which, ", ".join(f"{k} {v:.4f}" for k, v in summary["segmentation"]["mean"].items()))
        if "classification" in summary:
            log.info("validation balanced accuracy%s: %s", which,
                     ", ".join(f"{h} {m['balanced_accuracy']:.4f}" for h, m in summary["classification"].items()))
        return summary
