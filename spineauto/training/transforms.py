"""Extra augmentation transforms by name (``augmentation.transforms`` in the plan or a run YAML),
appended after the planned ones; a user's own as ``package.module:Name``.

```yaml
augmentation:
  transforms:
    - {name: gaussian_noise, noise_variance: [0.0, 0.05], p_per_sample: 0.2}
    - {name: mypackage.aug:RandomStripes, p: 0.3}
```
A transform works on batchgenerators' batch dict (``{"data": (B,C,H,W), "seg": (B,1,H,W)}``): a
class built with the entry's arguments and called as ``t(**batch) -> batch``, drawing its random
numbers from numpy's global generator (which the data workers seed per batch: batches stay
reproducible). Built-ins are batchgenerators' own, by name.
"""
from __future__ import annotations

from typing import Any

from spineauto.errors import SpineautoError
from spineauto.plugins import Registry, bind_kwargs, describe


def _check(obj) -> str | None:
    if isinstance(obj, type) and any("__call__" in vars(c) for c in obj.__mro__ if c is not object):
        return None
    return f"{describe(obj)} (a transform is a class whose instances are called as t(**batch) -> batch)"


TRANSFORMS = Registry("augmentation transform", _check, key="transform")


def _builtins() -> None:
    if TRANSFORMS:
        return
    from batchgenerators.transforms import color_transforms as c
    from batchgenerators.transforms import noise_transforms as n
    from batchgenerators.transforms import resample_transforms as r
    from batchgenerators.transforms import spatial_transforms as s

    TRANSFORMS.update({"gaussian_noise": n.GaussianNoiseTransform, "gaussian_blur": n.GaussianBlurTransform,
                       "brightness_multiplicative": c.BrightnessMultiplicativeTransform,
                       "contrast": c.ContrastAugmentationTransform, "gamma": c.GammaTransform,
                       "simulate_low_resolution": r.SimulateLowResolutionTransform, "mirror": s.MirrorTransform,
                       "rician_noise": n.RicianNoiseTransform})


def build_extra_transforms(entries: list[dict[str, Any]]) -> list:
    """The transforms of ``augmentation.transforms``, each checked (name, arguments)."""
    _builtins()
    out = []
    for i, entry in enumerate(entries):
        where = f"augmentation.transforms[{i}]"
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in entry.items() if k != "name"}
        cls = TRANSFORMS.resolve(entry["name"], f"{where}.name")
        bind_kwargs(cls, kwargs, f"{where} ({entry['name']})")
        try:
            out.append(cls(**kwargs))
        except Exception as e:  # noqa: BLE001 - a user's constructor: one line naming it
            raise SpineautoError(f"{where} ({entry['name']}): {type(e).__name__}: {e}") from None
    return out
