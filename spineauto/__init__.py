"""spineauto: self-configuring deep learning for spinal-cord MRI.

``from spineauto import Pipeline``: ``Pipeline.load(config_or_bundle, device=...)`` then
``.run(image)`` (a path, a nibabel or a SimpleITK image) -> masks, classes and measurements in memory.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spineauto")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installing
    __version__ = "0+unknown"


def __getattr__(name: str):
    if name == "Pipeline":  # imported on first use: torch is heavy
        from spineauto.pipeline.runner import Pipeline

        return Pipeline
    raise AttributeError(f"module 'spineauto' has no attribute {name!r}")
