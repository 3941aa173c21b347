"""Presets: YAML files that override planned values by name.

```yaml
description: Spinal-cord segmentation with an attention U-Net
configurations:
  2d:                      # override fields of an existing configuration
    network: {architecture: attention_unet}
    optim: {optimizer: adam, initial_lr: 0.0003}
  2d_resenc:               # or add one, starting from another
    inherit: 2d
    network: {architecture: resenc_unet}
```
Every overridden field's reason becomes ``preset <file>``.
"""
from __future__ import annotations

from pathlib import Path


from spineauto.errors import SpineautoError
from spineauto.schema import deep_merge, load_yaml_mapping


def load_preset(path: Path) -> dict:
    data = load_yaml_mapping(path, "preset", "presets live in plans/*.yaml")
    if not isinstance(data, dict) or not isinstance(data.get("configurations", {}), dict):
        raise SpineautoError(f"{path}: a preset is a mapping with a 'configurations' mapping")
    unknown = set(data) - {"description", "configurations"}
    if unknown:
        raise SpineautoError(f"{path}: unknown top-level key(s) {sorted(unknown)}; allowed: description, configurations")
    return data


def apply_preset(plans, path: Path):
    from spineauto.planning.plans import Plans

    preset = load_preset(path)
    d = plans.to_dict()
    for name, override in (preset.get("configurations") or {}).items():
        override = dict(override or {})
        parent = override.pop("inherit", name)
        if parent not in d["configurations"]:
            available = ", ".join(d["configurations"]) or "none"
            raise SpineautoError(f"{path}: configuration {parent!r} is not planned for this dataset (planned: {available})")
        base = d["configurations"][parent]
        merged = deep_merge(base, override)
        merged["name"] = name
        merged["reasons"] = {**base.get("reasons", {}), **{k: f"preset {Path(path).name}" for k in override}}
        d["configurations"][name] = merged
    d["preset"] = str(Path(path).name)
    return Plans.from_dict(d, where=f"plans with preset {path}")
