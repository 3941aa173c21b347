"""Loggers: local files always (metrics.jsonl, log.txt, progress.png, overlays), W&B when asked.

The metric history lives in the checkpoint too, so a resumed run rewrites ``metrics.jsonl`` from it
and never shows the epochs of a killed session twice.
"""
from __future__ import annotations

import json
import logging
import math
import netrc
import os
import time
from pathlib import Path

import numpy as np

from spineauto.errors import SpineautoError
from spineauto.io.atomic import write_atomic, json_safe

log = logging.getLogger(__name__)
WANDB_MODES = ("auto", "online", "offline", "disabled")
PLOT_EVERY_S = 30.0


class LocalLogger:
    def __init__(self, folder: Path, history: list[dict] | None = None):
        self.folder = Path(folder)
        self.history: list[dict] = list(history or [])
        self._file_handler: logging.Handler | None = None
        self._last_plot, self._plotted = -math.inf, 0

    def start_log_file(self) -> None:
        handler = logging.FileHandler(self.folder / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        logging.getLogger("spineauto").addHandler(handler)
        if logging.getLogger("spineauto").getEffectiveLevel() > logging.INFO:
            logging.getLogger("spineauto").setLevel(logging.INFO)
        self._file_handler = handler

    def close(self) -> None:
        if self._file_handler is not None:
            logging.getLogger("spineauto").removeHandler(self._file_handler)
            self._file_handler.close()
            self._file_handler = None

    def rewrite(self) -> None:
        """metrics.jsonl = the history (after a resume)."""
        text = "".join(_json_line(r) for r in self.history)
        write_atomic(self.folder / "metrics.jsonl", lambda p: p.write_text(text))

    def log_epoch(self, record: dict) -> None:
        self.history.append(record)
        with open(self.folder / "metrics.jsonl", "a") as f:
            f.write(_json_line(record))

    def plot_progress(self, force: bool = True) -> None:
        """progress.png; with ``force=False`` at most every ``PLOT_EVERY_S`` seconds (a plot costs
        ~0.4 s of CPU: every epoch of a short-epoch run would be a large part of its time)."""
        if len(self.history) == self._plotted or (not force and time.monotonic() - self._last_plot < PLOT_EVERY_S):
            return
        self._last_plot, self._plotted = time.monotonic(), len(self.history)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        h = self.history
        ep = [r["epoch"] for r in h]
        fig = Figure(figsize=(9, 10))
        FigureCanvasAgg(fig)
        axes = fig.subplots(3, 1, sharex=True)
        ax = axes[0]
        ax.plot(ep, [r["train_loss"] for r in h], "b-", label="train loss")
        ax.plot(ep, [r.get("val_loss", math.nan) for r in h], "r-", label="val loss")
        ax.set_ylabel("loss")
        ax.legend(loc="upper right")
        ax = axes[1]
        for key in sorted({k for r in h for k in r if k.startswith("pseudo_dice") or k in ("balanced_accuracy", "macro_f1")}):
            ax.plot(ep, [r.get(key, math.nan) for r in h], "-" if key == "pseudo_dice" else ":", label=key)
        if "ema" in h[-1]:
            ax.plot(ep, [r.get("ema", math.nan) for r in h], "g-", linewidth=2, label=f"EMA {h[-1].get('monitor', '')}")
        ax.set_ylabel("validation")
        ax.set_ylim(0, 1)
        ax.legend(loc="lower right", fontsize=8)
        ax = axes[2]
        ax.plot(ep, [r["lr"] for r in h], "k-", label="learning rate")
        ax2 = ax.twinx()
        ax2.plot(ep, [r.get("epoch_time", math.nan) for r in h], "c:", label="epoch time (s)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("learning rate")
        ax2.set_ylabel("epoch time (s)")
        fig.tight_layout()
        write_atomic(self.folder / "progress.png", lambda p: fig.savefig(p, format="png", dpi=80))

    def overlay(self, epoch: int, example: dict | None) -> Path | None:
        """Image | truth | prediction PNG of one validation sample (fold_k/overlays/epoch_XXX.png)."""
        if not example:
            return None
        return render_overlay(example, self.folder / "overlays" / f"epoch_{epoch:03d}.png")


def render_overlay(example: dict, path: Path) -> Path:
    """Image | truth | prediction side by side (labels coloured over the grey image), written atomically."""
    panels = [_gray(example["image"])]
    for key in ("truth", "prediction"):
        if key in example:
            panels.append(_color_labels(panels[0], example[key]))
    sep = np.full((panels[0].shape[0], 2, 3), 255, np.uint8)
    strip = np.concatenate([x for p in panels for x in (p, sep)][:-1], axis=1)
    from PIL import Image

    scale = max(1, 256 // max(strip.shape[0], 1))
    img = Image.fromarray(strip).resize((strip.shape[1] * scale, strip.shape[0] * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda p: img.save(p, format="PNG"))
    return path


def _json_line(record: dict) -> str:
    """Strict JSON: NaN (a label absent from the validation batches) is written as null."""
    return json.dumps(json_safe(record)) + "\n"


def _gray(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, [0.5, 99.5])
    g = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    return (np.repeat(g[..., None], 3, axis=-1) * 255).astype(np.uint8)


_COLORS = np.array([[0, 0, 0], [255, 60, 60], [60, 220, 60], [60, 120, 255], [255, 220, 0], [255, 0, 255]], np.uint8)


def _color_labels(gray_rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels).astype(int)
    out = gray_rgb.copy()
    mask = labels > 0
    colors = _COLORS[np.clip(labels, 0, len(_COLORS) - 1)]
    out[mask] = (0.45 * out[mask] + 0.55 * colors[mask]).astype(np.uint8)
    return out


def wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    if mode not in WANDB_MODES:
        raise SpineautoError(f"--wandb {mode!r}: choose one of {', '.join(WANDB_MODES)}")
    if mode == "auto":
        if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
            return os.environ["WANDB_MODE"]
        return "online" if wandb_credentials() else "offline"
    return mode


class WandbLogger:
    """A W&B run (online or offline) whose files live in the fold folder (``fold_k/wandb``).

    Its config is the run's full resolved configuration (plan + overrides + runtime); ``--continue``
    resumes the same run (its id is in the checkpoint). Under a ``wandb agent`` the sweep's values
    arrive as the command's ``key=value`` overrides, so they are part of that configuration too.
    """

    def __init__(self, folder: Path, mode: str, name: str, config: dict, run_id: str | None):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        kw = dict(project=os.environ.get("WANDB_PROJECT", "spineauto"), dir=str(folder), name=name, id=run_id,
                  resume="allow", config=config, reinit="finish_previous")
        try:
            self.run = wandb.init(mode=mode, **kw)
        except Exception as e:  # noqa: BLE001 - tracking must not stop training (no network, bad key ...)
            if mode != "online":
                raise
            log.warning("W&B online failed (%s); logging offline to %s/wandb instead (`wandb sync` it later)", e, folder)
            self.run = wandb.init(mode="offline", **kw)
        self.run.config.update(config, allow_val_change=True)  # a resumed run: this session's configuration
        wandb.define_metric("epoch")
        wandb.define_metric("global_step")
        wandb.define_metric("step/*", step_metric="global_step")
        wandb.define_metric("*", step_metric="epoch")
        self.run_id = self.run.id

    def log(self, record: dict, overlay: Path | None, images: dict[str, Path] | None = None) -> None:
        data = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if overlay is not None:
            data["overlay"] = self.wandb.Image(str(overlay), caption=f"epoch {record['epoch']}: image | truth | prediction")
        for name, path in (images or {}).items():
            data[name] = self.wandb.Image(str(path), caption=f"epoch {record['epoch']}: {name}")
        self.run.log(data)

    def log_step(self, step: int, values: dict) -> None:
        self.run.log({"global_step": step, **{f"step/{k}": v for k, v in values.items()}})

    def log_images(self, epoch: int, images: dict[str, Path]) -> None:
        self.run.log({"epoch": epoch, **{k: self.wandb.Image(str(p), caption=f"epoch {epoch}: {k}") for k, p in images.items()}})

    def log_validation(self, summary: dict) -> None:
        """The final validation: Dice per label and the per-case table (segmentation), metrics per head (classification)."""
        values: dict = {}
        seg = summary.get("segmentation")
        if seg:
            values.update({f"validation/dice_{k}": v for k, v in seg["mean"].items()})
            values["validation/dice_foreground_mean"] = seg["foreground_mean"]
            labels = list(seg["mean"])
            table = self.wandb.Table(columns=["case", *[f"dice_{k}" for k in labels]],
                                     data=[[c["case"], *[c["dice"][k] for k in labels]] for c in seg["cases"]])
            self.run.log({"validation/per_case": table})
        for head, metrics in (summary.get("classification") or {}).items():
            values.update({f"validation/{head}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        self.run.summary.update(values)

    def log_artifacts(self, name: str, files: list[Path]) -> None:
        artifact = self.wandb.Artifact(name, type="model")
        for f in files:
            artifact.add_file(str(f), name=f.name)
        self.run.log_artifact(artifact)

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def finish(self) -> None:
        self.run.finish()


class TensorBoardLogger:
    """Scalars (per epoch; per step with ``trainer.log_every``), overlays and the final validation
    in ``fold_k/tensorboard`` (``tensorboard --logdir`` it); the configuration as text."""

    def __init__(self, folder: Path, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SpineautoError("--logger tensorboard needs the tensorboard package (pip install tensorboard)") from None
        self.writer = SummaryWriter(log_dir=str(Path(folder) / "tensorboard"))
        import yaml

        self.writer.add_text("config", "```\n" + yaml.safe_dump(json.loads(json.dumps(json_safe(config), default=str)), sort_keys=False) + "```")

    def log(self, record: dict, overlay: Path | None, images: dict[str, Path] | None = None) -> None:
        epoch = int(record["epoch"])
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch" and math.isfinite(v):
                self.writer.add_scalar(k, v, epoch)
        self.log_images(epoch, {**({"overlay": overlay} if overlay else {}), **(images or {})})
        self.writer.flush()

    def log_step(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"step/{k}", v, step)

    def log_images(self, epoch: int, images: dict[str, Path]) -> None:
        from PIL import Image

        for name, path in images.items():
            self.writer.add_image(name, np.asarray(Image.open(path).convert("RGB")), epoch, dataformats="HWC")

    def log_validation(self, summary: dict) -> None:
        seg = summary.get("segmentation")
        if seg:
            for k, v in seg["mean"].items():
                self.writer.add_scalar(f"validation/dice_{k}", v, 0)
        self.writer.flush()

    def log_artifacts(self, name: str, files: list[Path]) -> None:
        pass

    def finish(self) -> None:
        self.writer.close()


LOGGERS = ("tensorboard",)


def open_trackers(folder: Path, config: dict, network, wandb_mode: str | None, wandb_id: str | None,
                  names: list[str]) -> tuple["Trackers", str | None]:
    """W&B (``--wandb``) and the ``--logger`` ones, given the full resolved configuration and the network's
    parameter counts; returns them and the W&B run id (kept in checkpoints: ``--continue`` resumes that run)."""
    config = {**config, "parameters": sum(p.numel() for p in network.parameters()),
              "trainable_parameters": sum(p.numel() for p in network.parameters() if p.requires_grad)}
    trackers = []
    if wandb_mode and wandb_mode != "disabled":
        wb = WandbLogger(folder, wandb_mode, f"{config['dataset']}_{config['configuration']}_fold{config['fold']}", config, wandb_id)
        wandb_id = wb.run_id
        trackers.append(wb)
    if "tensorboard" in names:
        trackers.append(TensorBoardLogger(folder, config))
    return Trackers(trackers), wandb_id


class Trackers:
    """The experiment trackers of a run (W&B, TensorBoard), called together; empty when none is on."""

    def __init__(self, trackers: list | None = None):
        self.trackers = list(trackers or [])

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)

        def call(*args, **kwargs):
            for t in self.trackers:
                getattr(t, method)(*args, **kwargs)
        return call

    def finish(self) -> None:
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            t.finish()
