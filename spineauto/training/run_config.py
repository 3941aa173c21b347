"""A run's configuration: the plan, overridden by a run YAML and flags, validated, written beside the checkpoints.

``spineauto train -d 1 -f 0 --config run.yaml --lr 3e-4 --batch-size 4 --config-set trainer.accumulate=2``
(and bare ``key=value`` arguments, as a ``wandb agent`` passes a sweep's values). The YAML sets any
train-time value of the configuration plan by its key in ``plans.json`` (``network``, ``loss``,
``optim``, ``augmentation``, ``batch_size``, ``patch_size``, ``foreground_oversampling``,
``trainer``: callbacks, loggers, accumulation ...); a preset of ``plans/`` (``configurations:
{name: ...}``) works too, its entry for ``-c`` applied. Every key is checked against the typed plan
(unknown -> the closest key; wrong type -> the expected type), a key that decides the preprocessed
data is refused with the command that re-plans, and the names (network, loss, optimiser, schedule,
callbacks, task, transforms) resolve in their registries before anything is written.

The resolved configuration replaces the configuration in the run's plans: checkpoints, the model
folder's ``plans.json`` and prediction use it. ``fold_k/run_config.yaml`` records it with the
overrides and the runtime; ``--continue`` reuses the run's own overrides when none are given.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from spineauto.errors import SpineautoError
from spineauto.inference.model import RUN_CONFIG_FILE
from spineauto.io.atomic import json_safe, write_atomic
from spineauto.planning.plans import ConfigurationPlan, Plans, upgrade_configuration
from spineauto.schema import convert, deep_merge, load_yaml_mapping, load_yaml_text, to_dict

# keys that decide the preprocessed data (or the dataset's labels): changed by re-planning, not at train time
PREPROCESSING_KEYS = ("name", "task", "data_identifier", "slicing", "isotropic_plane", "target_spacing", "normalization",
                      "use_mask_for_norm", "roi", "heads", "reasons")


# names other frameworks' configurations use -> the plan's key
ALIASES = {"lr": "optim.initial_lr", "learning_rate": "optim.initial_lr", "max_epochs": "optim.epochs", "epochs": "optim.epochs",
           "optimizer": "optim.optimizer", "scheduler": "optim.schedule", "lr_scheduler": "optim.schedule", "model": "network",
           "accumulate_grad_batches": "trainer.accumulate", "accumulate": "trainer.accumulate", "callbacks": "trainer.callbacks",
           "loggers": "trainer.loggers", "logger": "trainer.loggers", "check_val_every_n_epoch": "trainer.val_every",
           "log_every_n_steps": "trainer.log_every", "batch": "batch_size"}


@dataclass
class RunSpec:
    """What the user asked for on the command line (all optional)."""

    config: Path | None = None  # a run YAML or a preset of plans/
    batch_size: str | int | None = None
    lr: str | float | None = None
    sets: list[str] = field(default_factory=list)  # dotted key=value (YAML values)

    def __bool__(self) -> bool:
        return bool(self.config or self.batch_size is not None or self.lr is not None or self.sets)


def _set(tree: dict, dotted: str, value, source: str) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise SpineautoError(f"{source}: {dotted!r} is not a dotted key (e.g. optim.initial_lr)")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise SpineautoError(f"{source}: {dotted!r} sets a key inside a value that is not a mapping")
    node[parts[-1]] = value


def _number(text, flag: str, kind: type):
    try:
        value = kind(text) if not isinstance(text, bool) else None
    except (TypeError, ValueError):
        value = None
    if value is None or (kind is int and str(text).strip() != str(value)):
        raise SpineautoError(f"{flag} {text!r}: expected {'an integer' if kind is int else 'a number'}")
    return value


def read_overrides(spec: RunSpec, configuration: str) -> tuple[dict, str | None, list[str]]:
    """(nested overrides, the configuration they inherit from when the preset adds one, their sources)."""
    overrides: dict = {}
    inherit, sources = None, []
    if spec.config is not None:
        path = Path(spec.config)
        data = load_yaml_mapping(path, "run configuration", "give a run YAML (plans/runs/example_run.yaml) or a preset of plans/")
        if "configuration" in data and "run" in data:  # a run's own run_config.yaml: its configuration again
            data = dict(data["configuration"] or {})
            upgrade_configuration(data, str(path))
        elif "configurations" in data:  # a preset
            unknown = sorted(set(data) - {"description", "configurations"})
            if unknown:
                raise SpineautoError(f"{path}: a preset has only description and configurations, not {unknown}")
            entries = data.get("configurations") or {}
            if not isinstance(entries, dict) or configuration not in entries:
                raise SpineautoError(f"{path}: this preset has no configuration {configuration!r} "
                                     f"(has: {', '.join(entries) if isinstance(entries, dict) else 'none'}); pick one with -c")
            data = dict(entries[configuration] or {})
            inherit = data.pop("inherit", None)
        else:
            data = {k: v for k, v in data.items() if k != "description"}
        overrides = data
        sources.append(str(path))
    if spec.batch_size is not None:
        overrides["batch_size"] = _number(spec.batch_size, "--batch-size", int)
        sources.append("--batch-size")
    if spec.lr is not None:
        _set(overrides, "optim.initial_lr", _number(spec.lr, "--lr", float), "--lr")
        sources.append("--lr")
    for item in spec.sets:
        key, eq, text = str(item).partition("=")
        if not eq:
            raise SpineautoError(f"--config-set {item!r}: expected key=value, e.g. optim.initial_lr=0.001")
        try:
            value = load_yaml_text(text, f"--config-set {item!r}") if text.strip() else ""
        except SpineautoError:
            value = text
        _set(overrides, key.strip().lstrip("-"), value, f"--config-set {item!r}")
        sources.append(f"{key.strip()}={text}")
    return overrides, inherit, sources


def _all_keys(tp, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(tp):
        hint = typing.get_type_hints(tp)[f.name]
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(hint):
            out += _all_keys(hint, f"{prefix}{f.name}.")
    return out


def check_overrides(overrides: dict, source: str, dataset: str, tp=ConfigurationPlan, prefix: str = "") -> None:
    """Each key against the typed plan: unknown (with the closest key), preprocessing (with the re-plan command), type."""
    hints = typing.get_type_hints(tp)
    names = [f.name for f in dataclasses.fields(tp)]
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            candidates = [k for k in _all_keys(ConfigurationPlan) if k.split(".")[0] not in PREPROCESSING_KEYS]
            close = ([ALIASES[str(key)]] if str(key) in ALIASES else []) or (difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.6)
                     or [k for k in candidates if k.rsplit(".", 1)[-1] == str(key)][:1]
                     or difflib.get_close_matches(str(key), [k.rsplit(".", 1)[-1] for k in candidates], n=1))
            if close and "." not in close[0] and close[0] not in candidates:
                close = [k for k in candidates if k.rsplit(".", 1)[-1] == close[0]][:1]
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SpineautoError(f"{source}: unknown key {dotted!r}{hint}")
        if not prefix and key in PREPROCESSING_KEYS:
            raise SpineautoError(f"{source}: {key!r} decides the preprocessed data (or the dataset's labels) and cannot change at train "
                                 f"time; put it in a preset and re-plan: spineauto plan_and_preprocess -d {dataset} --preset PRESET.yaml")
        hint_type = hints[key]
        if dataclasses.is_dataclass(hint_type) and isinstance(value, dict):
            check_overrides(value, source, dataset, hint_type, f"{dotted}.")
        else:
            convert(hint_type, value, f"{source}: {dotted}")


def apply_run_config(plans: Plans, configuration: str, overrides: dict, inherit: str | None, sources: list[str],
                     dataset: str) -> Plans:
    """The plans with ``configuration`` replaced by the plan merged with ``overrides`` (checked and range-checked)."""
    from spineauto.training.losses import loss_activation, resolve_loss

    source = ", ".join(sources) or "run configuration"
    if configuration in plans.configurations:
        base = plans.configurations[configuration]
    elif inherit is not None:
        base = plans.configuration(inherit)
    else:
        base = plans.configuration(configuration)  # the usual one-line error
    planned = to_dict(base)
    overrides = {k: v for k, v in overrides.items() if not (k in PREPROCESSING_KEYS and planned.get(k) == v)}
    check_overrides(overrides, source, dataset)
    merged = deep_merge(to_dict(base), overrides)
    merged["name"] = configuration
    merged["reasons"] = {**base.reasons, **{k: f"run configuration {source}" for k in overrides}}
    d = plans.to_dict()
    d["configurations"][configuration] = merged
    out = Plans.from_dict(d, where=f"run configuration ({source})")
    plan = out.configurations[configuration]
    if plan.has_segmentation:
        activation = loss_activation(resolve_loss(plan))
        if "output_activation" in overrides.get("network", {}) and plan.network.output_activation != activation:
            raise SpineautoError(f"{source}: network.output_activation {plan.network.output_activation!r} does not fit loss "
                                 f"{plan.loss.name!r}, which trains {activation} outputs; leave output_activation out")
        plan.network.output_activation = activation
    else:
        resolve_loss(plan)
    return out


def resolve_run(plans: Plans, configuration: str, spec: RunSpec | None, previous: dict | None, dataset: str) -> tuple[Plans, dict]:
    """(plans with the run's configuration, the overrides record) from the command line, or on
    ``--continue`` without overrides from the run's own (``previous``)."""
    if spec:
        overrides, inherit, sources = read_overrides(spec, configuration)
    elif previous:
        overrides, inherit, sources = previous.get("values", {}), previous.get("inherit"), previous.get("sources", [])
    else:
        return plans, {}
    if not overrides and inherit is None:
        return plans, {}
    record = {"values": overrides, "inherit": inherit, "sources": sources}
    return apply_run_config(plans, configuration, overrides, inherit, sources, dataset), record


def write_run_config(folder: Path, plan: ConfigurationPlan, run: dict, overrides: dict) -> Path:
    """``fold_k/run_config.yaml``: the resolved configuration plan, the overrides it came from and the run (runtime included)."""
    import yaml

    data = to_dict(plan)
    data.pop("reasons", None)
    doc = {"configuration": data, "overrides": overrides or {}, "run": run}
    text = ("# The resolved configuration of this run (plan + overrides + runtime); `spineauto train --config` takes this\n"
            "# file back (its 'configuration' mapping) to train the same configuration again.\n"
            + yaml.safe_dump(plain(doc), sort_keys=False, default_flow_style=None))
    path = Path(folder) / RUN_CONFIG_FILE
    write_atomic(path, lambda p: p.write_text(text))
    return path


def plain(data):
    """JSON-plain values (str subclasses such as torch's version become str; NaN null)."""
    import json

    return json.loads(json.dumps(json_safe(data), default=str))


def full_config(plan: ConfigurationPlan, run: dict, overrides: dict) -> dict:
    """What experiment trackers get as the run's config."""
    data = to_dict(plan)
    data.pop("reasons", None)
    return plain({**run, "plan": data, "overrides": overrides.get("values", {}) if overrides else {}})
