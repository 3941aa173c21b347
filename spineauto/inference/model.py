"""A trained model loaded from its self-contained model folder (``plans.json`` with the intensity
statistics, ``dataset.json``, postprocessing and fold checkpoints); nothing from the raw or
preprocessed data. The trainer wraps its live network in the same :class:`TrainedModel` to validate."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from spineauto import paths
from spineauto.datasets.dataset_json import parse_pixel_spacing
from spineauto.errors import SpineautoError
from spineauto.inference.bundle import model_folder_of
from spineauto.inference.postprocessing import POSTPROCESSING_FILE, load_postprocessing
from spineauto.io.checkpoints import load_checkpoint, network_state
from spineauto.planning.plans import ConfigurationPlan, IntensityStats, Plans, upgrade_configuration

log = logging.getLogger(__name__)
CHECKPOINTS = ("final", "best", "latest")
RUN_CONFIG_FILE = "run_config.yaml"  # fold_k/: the fold's resolved configuration plan (training/run_config.py writes it)
# what folds predicting together must share: the input they see, the patch, the second pass and the outputs
ENSEMBLE_KEYS = ("task", "slicing", "isotropic_plane", "target_spacing", "normalization", "use_mask_for_norm", "roi",
                 "heads", "patch_size", "localise")


@dataclass
class TrainedModel:
    folder: Path
    plans: Plans
    plan: ConfigurationPlan
    networks: list[torch.nn.Module]
    folds: list[str]
    device: torch.device
    postprocessing: dict = field(default_factory=dict)

    @property
    def intensity(self) -> list[IntensityStats]:
        return self.plans.intensity

    @property
    def num_channels(self) -> int:
        return len(self.plans.channel_names)

    @property
    def pixel_spacing(self) -> tuple[float, float] | None:
        """The mm per pixel its dataset declares for 2D pictures (``dataset.json`` ``pixel_spacing``), or None."""
        from spineauto.io.atomic import read_json

        try:
            value = read_json(self.folder / "dataset.json").get("pixel_spacing")
        except (OSError, ValueError, AttributeError):
            return None
        problems: list[str] = []
        spacing = parse_pixel_spacing(value, problems)
        if problems:
            raise SpineautoError(f"{self.folder / 'dataset.json'}: {problems[0]}")
        return spacing

    @property
    def label_values(self) -> list[int]:
        return sorted(set(self.plans.labels.values()))


def fold_folders(folder: Path) -> list[str]:
    """Names of the fold folders present (fold_0, fold_1, ..., fold_all)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("fold_"))


def _describe(folder: Path) -> str:
    parts = []
    for name in fold_folders(folder):
        ckpts = sorted(p.stem.replace("checkpoint_", "") for p in (folder / name).glob("checkpoint_*.pt"))
        parts.append(f"{name} ({', '.join(ckpts) or 'no checkpoint'})")
    return "; ".join(parts) or "no fold folders"


def select_folds(folder: Path, folds: Sequence[str] | None, checkpoint: str) -> list[Path]:
    """Checkpoint files of the asked folds; default every numbered fold with that checkpoint, else fold_all."""
    name = f"checkpoint_{checkpoint}.pt"
    present = fold_folders(folder)
    if folds:
        wanted = ["fold_all" if f == "all" else f"fold_{int(f)}" if str(f).isdigit() else str(f) for f in folds]
    else:
        wanted = [f for f in present if f != "fold_all" and (folder / f / name).is_file()]
        if not wanted and (folder / "fold_all" / name).is_file():
            wanted = ["fold_all"]
    files = [folder / f / name for f in wanted]
    missing = [f for f in files if not f.is_file()]
    if not files or missing:
        what = ", ".join(f"{m.parent.name}/{m.name}" for m in missing) or f"any fold with {name}"
        raise SpineautoError(f"{folder}: no trained {what}; present: {_describe(folder)}. Train with `spineauto train` "
                             "or pick other folds with -f / --checkpoint")
    return files


def load_checkpoint_network(path: Path, plan: ConfigurationPlan, in_channels: int, num_classes: int,
                            device: torch.device) -> torch.nn.Module:
    from spineauto.networks.build import build_network

    state = network_state(load_checkpoint(path), path)
    net = build_network(plan, in_channels, num_classes)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise SpineautoError(f"{path}: weights do not fit the network planned in plans.json ({first}); "
                             "the checkpoint belongs to another plan") from None
    net.set_deep_supervision(False)
    return net.to(device).eval()


def fold_plan(fold_dir: Path, plan: ConfigurationPlan) -> ConfigurationPlan:
    """The plan the fold was trained with (``fold_k/run_config.yaml``: a run YAML may have changed the
    network after other folds were trained), else the model folder's."""
    from spineauto.schema import from_dict, load_yaml_mapping

    path = fold_dir / RUN_CONFIG_FILE
    if not path.is_file():
        return plan
    try:
        data = load_yaml_mapping(path, "run configuration", "").get("configuration")  # bounded: a bundle's file
        upgrade_configuration(data, str(path))
        own = from_dict(ConfigurationPlan, {**data, "reasons": plan.reasons}, str(path))
    except (AttributeError, TypeError, SpineautoError) as e:
        log.warning("%s: unreadable (%s); fold %s uses the model folder's plans.json", path, str(e).splitlines()[0], fold_dir.name)
        return plan
    return own if own.name == plan.name else plan


def ensemble_plan(fold_plans: list[ConfigurationPlan], names: list[str], folder: Path) -> ConfigurationPlan:
    """The first fold's plan, once every fold agrees with it on what prediction shares (``ENSEMBLE_KEYS``)."""
    from spineauto.schema import to_dict

    first = to_dict(fold_plans[0])
    first_act = fold_plans[0].network.output_activation
    for name, other in zip(names[1:], fold_plans[1:]):
        data = to_dict(other)
        differs = [k for k in ENSEMBLE_KEYS if data[k] != first[k]]
        differs += ["network.output_activation"] if other.network.output_activation != first_act else []
        if differs:
            raise SpineautoError(f"{folder}: {names[0]} and {name} were trained with plans that differ in {', '.join(differs)} "
                                 "(see their run_config.yaml) and cannot be ensembled; predict them apart with -f")
    return fold_plans[0]


def load_model(folder: Path, folds: Sequence[str] | None = None, checkpoint: str = "final",
               device: torch.device | str = "cpu", configuration: str | None = None) -> TrainedModel:
    """Load plans, intensity statistics, postprocessing and the folds' networks from ``folder``
    (a model folder, or a bundle .zip of one)."""
    folder = model_folder_of(Path(folder))
    if checkpoint not in CHECKPOINTS:
        raise SpineautoError(f"--checkpoint {checkpoint!r} is not one of {', '.join(CHECKPOINTS)}")
    if not folder.is_dir():
        parent = folder.parent
        others = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
        raise SpineautoError(f"{folder}: no trained model folder; present in {parent}: {', '.join(others) or 'nothing'}. "
                             "Train first or set SPINEAUTO_RESULTS")
    plans = Plans.load(folder / "plans.json")
    if configuration is None:
        configuration = paths.configuration_of(folder)
    plan = plans.configuration(configuration)
    if not (plan.has_segmentation or plan.has_classification):
        raise SpineautoError(f"{folder}: configuration {plan.name!r} has neither segmentation nor classification output")
    device = torch.device(device) if not isinstance(device, torch.device) else device
    files = select_folds(folder, folds, checkpoint)
    fold_plans = [fold_plan(f.parent, plan) for f in files]
    plan = ensemble_plan(fold_plans, [f.parent.name for f in files], folder)
    nets = [load_checkpoint_network(f, p, len(plans.channel_names), plans.num_classes, device) for f, p in zip(files, fold_plans)]
    pp_file = folder / POSTPROCESSING_FILE
    postprocessing = load_postprocessing(pp_file, plans.labels.values()) if pp_file.exists() else {}
    log.info("loaded %s: %s (%s checkpoints) on %s", folder.name, ", ".join(f.parent.name for f in files), checkpoint, device)
    return TrainedModel(folder=folder, plans=plans, plan=plan, networks=nets,
                        folds=[f.parent.name for f in files], device=device, postprocessing=postprocessing)
