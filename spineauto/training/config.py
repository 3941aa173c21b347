"""The resolved run configuration (``fold_k/config.json``): a run's identity.

The plan gives every default; CLI overrides (``--epochs`` ...) are applied here and recorded, so a
run folder fully describes what was trained. ``identity`` fields must match for ``--continue``;
``runtime`` fields (device, workers, AMP, W&B ...) may change between sessions and are only logged.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spineauto.errors import SpineautoError
from spineauto.io.atomic import read_json, write_json
from spineauto.planning.plans import ConfigurationPlan, TrainerPlan

CONFIG_FILE = "config.json"
IDENTITY = ("dataset", "configuration", "fold", "plans_name", "plan_sha", "epochs", "iters_per_epoch", "val_iters",
            "batch_size", "seed")


def plan_sha(plan: ConfigurationPlan) -> str:
    """Hash of the configuration plan without its free-text ``reasons``."""
    from spineauto.schema import to_dict

    data = to_dict(plan)
    data.pop("reasons", None)
    if data["network"].get("architecture") not in ("resnet", "resnet_unet"):
        data["network"].pop("depth", None)  # added with the ResNet encoders: the runs of other networks keep their hash
    for section, keys in _ADDED_WITH_RUN_CONFIGS.items():  # at their defaults: earlier runs keep their hash
        defaults = to_dict(getattr(ConfigurationPlan, "__dataclass_fields__")[section].default_factory()) if section != "network" else None
        for key in keys:
            default = _NETWORK_DEFAULTS[key] if section == "network" else defaults[key]
            if data.get(section, {}).get(key) == default:
                data[section].pop(key)
    if data.get("trainer") == to_dict(TrainerPlan()):
        data.pop("trainer")
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


_ADDED_WITH_RUN_CONFIGS = {  # plan fields added with the run configurations (spineauto train --config)
    "network": ("output_activation", "kwargs"),
    "optim": ("warmup_epochs", "min_lr", "plateau_patience", "plateau_factor", "plateau_monitor", "optimizer_kwargs", "schedule_kwargs",
              "weight_average"),
    "loss": ("name", "focal_gamma", "tversky_alpha", "tversky_beta", "tversky_gamma", "kwargs"),
    "augmentation": ("transforms", "cord_contrast", "vertebral_cortex"),
}
_NETWORK_DEFAULTS = {"output_activation": "softmax", "kwargs": {}}


@dataclass
class RunConfig:
    dataset: str
    configuration: str
    fold: str
    plans_name: str
    plan_sha: str
    epochs: int
    iters_per_epoch: int
    val_iters: int
    batch_size: int  # global, split across DDP ranks
    seed: int
    task: str = "segmentation"
    runtime: dict = field(default_factory=dict)  # device, amp, amp_dtype, world_size, num_workers, wandb, pretrained
    overrides: dict = field(default_factory=dict)  # the run configuration's values, inherit and sources (spineauto train --config ...)

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in IDENTITY}

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, folder: Path) -> Path:
        return write_json(Path(folder) / CONFIG_FILE, self.to_dict())

    @classmethod
    def load(cls, folder: Path) -> "RunConfig | None":
        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            return None
        data = read_json(path)
        known = {k: data[k] for k in data if k in cls.__dataclass_fields__}
        return cls(**known)


def resolve(plan: ConfigurationPlan, dataset: str, fold: str, plans_name: str, seed: int | None,
            epochs: int | None, iters_per_epoch: int | None, val_iters: int | None, previous: RunConfig | None) -> RunConfig:
    """Plan values, overridden by explicit arguments; on ``--continue`` unset ones come from the run."""
    def pick(name: str, given):
        if given is not None:
            return int(given)
        if previous is not None:
            return getattr(previous, name)
        return int(getattr(plan.optim, name))

    for name, v in (("epochs", epochs), ("iters_per_epoch", iters_per_epoch), ("val_iters", val_iters)):
        if v is not None and int(v) < (0 if name == "val_iters" else 1):
            raise SpineautoError(f"--{name.replace('_', '-')} must be >= {0 if name == 'val_iters' else 1}, got {v}")
    return RunConfig(dataset=dataset, configuration=plan.name, fold=str(fold), plans_name=plans_name, plan_sha=plan_sha(plan),
                     epochs=pick("epochs", epochs), iters_per_epoch=pick("iters_per_epoch", iters_per_epoch),
                     val_iters=pick("val_iters", val_iters), batch_size=plan.batch_size,
                     seed=int(seed) if seed is not None else (previous.seed if previous else 0), task=plan.task)


def check_same_run(new: RunConfig, old: RunConfig, folder: Path) -> None:
    """``--continue`` must not mix two configurations in one run folder."""
    diff = [f"{k}: {old.identity()[k]!r} -> {new.identity()[k]!r}" for k in IDENTITY if old.identity()[k] != new.identity()[k]]
    if diff:
        hint = ("the plan changed since this run started (plans.json edited or re-planned)" if any(d.startswith("plan_sha") for d in diff)
                else "these overrides differ from the run's")
        raise SpineautoError(f"{folder / CONFIG_FILE}: cannot --continue, {hint} ({'; '.join(diff)}); "
                             "start over with --overwrite instead of --continue, or use the original settings")
