"""Plans: typed plain data describing every configuration of a dataset.

A plan fully describes a run: the trainer, the predictor and the pipeline are built from it and
nothing else. ``plans.json`` round-trips through :func:`Plans.load` / :meth:`Plans.save`, validated
on load. Each configuration carries ``reasons``: for a field name, the fingerprint fact (or preset)
that decided its value.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from spineauto.errors import SpineautoError
from spineauto.io.atomic import read_json, write_json
from spineauto.plugins import is_import_string
from spineauto.schema import from_dict, to_dict

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: the per-channel intensity statistics moved from fingerprint.json into the plans

Task = Literal["segmentation", "classification", "multitask"]
Slicing = Literal["per_case", "axial", "sagittal", "coronal"]


@dataclass
class IntensityStats:
    """Foreground intensity statistics of one channel (nnU-Net's ``foreground_intensity_properties_per_channel``)."""

    mean: float
    std: float
    median: float
    p00_5: float
    p99_5: float
    min: float
    max: float


@dataclass
class NetworkPlan:
    architecture: str = "unet"  # a registered name (networks/registry.py) or a user's class as package.module:Name
    features_per_stage: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    kernel_sizes: list[list[int]] = field(default_factory=lambda: [[3, 3]] * 5)
    strides: list[list[int]] = field(default_factory=lambda: [[1, 1]] + [[2, 2]] * 4)
    n_conv_per_stage: list[int] = field(default_factory=lambda: [2] * 5)
    n_conv_per_stage_decoder: list[int] = field(default_factory=lambda: [2] * 4)
    deep_supervision: bool = True
    norm: Literal["instance", "batch"] = "instance"
    dropout: float = 0.0
    output_activation: Literal["softmax", "sigmoid"] = "softmax"  # sigmoid: per-label probabilities thresholded at 0.5 (the loss decides)
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of a plug-in network class
    depth: int = 18  # resnet_unet / resnet: torchvision ResNet-18, 34 or 50 encoder (the per-stage lists above shape nothing but deep supervision's output count)
    init: Literal["he", "torch"] = "torch"  # he: nnU-Net's He initialisation (a = 0.01, zero biases) of the built-in U-Nets; torch: PyTorch's defaults

    @property
    def n_stages(self) -> int:
        return len(self.features_per_stage)


@dataclass
class HeadPlan:
    name: str
    classes: list[str]
    class_weights: list[float]
    loss_weight: float = 1.0


@dataclass
class OptimPlan:
    optimizer: str = "sgd"  # sgd | adam | adamw (training/optim.py) or package.module:Name (a torch.optim.Optimizer)
    initial_lr: float = 0.01
    weight_decay: float = 3e-5
    momentum: float = 0.99
    schedule: str = "poly"  # poly | cosine | constant | reduce_on_plateau or package.module:Name
    warmup_epochs: float = 0.0  # cosine: linear warm-up from 0 over these epochs (per iteration)
    min_lr: float = 0.0  # cosine: the rate it ends at
    plateau_patience: int = 10  # reduce_on_plateau: epochs without improvement of plateau_monitor before the rate drops
    plateau_factor: float = 0.5  # reduce_on_plateau: the rate is multiplied by this
    plateau_monitor: str = "val_loss"  # reduce_on_plateau: an epoch record key (lower is better for *loss, else higher)
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)  # further keyword arguments of the optimiser (e.g. betas)
    schedule_kwargs: dict[str, Any] = field(default_factory=dict)  # further keyword arguments of a plug-in schedule
    grad_clip: float = 12.0
    weight_average: float = 0.0  # the share of training at its end whose weights are averaged, every step (SWA / SWAD); 0: off
    epochs: int = 100
    iters_per_epoch: int = 250
    val_iters: int = 20


@dataclass
class LossPlan:
    name: str = "dice_ce"  # dice_ce | dice_focal | tversky | focal_tversky | dice_bce (training/losses.py) or package.module:Name
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    label_smoothing: float = 0.1  # classification heads
    segmentation_weight: float = 1.0  # multitask: weight of the segmentation loss
    classification_weight: float = 0.5  # multitask: weight of the summed head losses
    focal_gamma: float = 2.0  # dice_focal: focusing exponent of the focal term
    tversky_alpha: float = 0.3  # tversky / focal_tversky: weight of false positives
    tversky_beta: float = 0.7  # tversky / focal_tversky: weight of false negatives (> alpha favours recall: small lesions)
    tversky_gamma: float = 0.75  # focal_tversky: loss = (1 - Tversky index) ** gamma
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of a plug-in loss class


@dataclass
class AugmentationPlan:
    rotation_degrees: float = 180.0
    scale_range: list[float] = field(default_factory=lambda: [0.7, 1.4])
    elastic: bool = False
    mirror_axes: list[int] = field(default_factory=lambda: [0, 1])
    gamma_range: list[float] = field(default_factory=lambda: [0.7, 1.5])
    noise_variance: float = 0.1
    blur_sigma: list[float] = field(default_factory=lambda: [0.5, 1.0])
    brightness_range: list[float] = field(default_factory=lambda: [0.75, 1.25])
    contrast_range: list[float] = field(default_factory=lambda: [0.75, 1.25])
    lowres_range: list[float] = field(default_factory=lambda: [0.5, 1.0])
    probability: float = 0.2
    # contrast- and site-agnostic training (training/augment.py; bench/bench_generalisation.py measures them):
    intensity_curves: float = 0.5  # per sample: a random smooth curve remaps the intensities (another contrast)
    inversion: float = 0.25  # share of the monotone curves that also invert the contrast (T1w-like <-> T2w-like)
    non_monotone: float = 0.5  # share of the curves drawn through random knots: tissues change their order (T2w <-> T1w-like)
    bias_field: float = 0.3  # per sample: a smooth multiplicative bias field (another coil)
    cord_contrast: float = 0.0  # per sample of a cord model: a curve through the cord's and its surround's intensities
    # sends them to random levels, either brighter (training/augment.py cord_contrast_curve); instead of intensity_curves
    whole_neck: float = 0.0  # per sample of a cord model: a whole-neck phantom patch, tissues at random intensities,
    # instead of a real crop (training/synthetic.py); the planner sets it for a `2d` cord configuration
    vertebral_cortex: float = 0.0  # per whole-neck patch: the vertebral bodies drawn with a cortical shell of its own
    # random intensity (a round body in a ring, in front of the canal, is not the cord)
    transforms: list[dict[str, Any]] = field(default_factory=list)  # extra transforms after these: {name: registered or package.module:Name, ...arguments}


@dataclass
class RoiPlan:
    """Crop every case to a box around one label's mask (the cord) before the network sees it: the
    lesion model of the cord -> lesion cascade (configuration ``2d_cord_roi``).

    Training takes the mask from the reference labels (voxels equal to ``label``'s value) and moves
    each edge of its box by a seeded per-case offset drawn uniformly from +-``jitter_mm``, so the
    network does not learn that the cord sits exactly ``margin_mm`` inside the crop. Prediction
    takes the mask from another model's output (``spineauto predict --roi``: any value > 0 counts)
    and afterwards zeroes every label voxel farther than ``remove_outside_mm`` from that mask
    (lesions lie in the cord).

    The defaults stand on bench/bench_cascade.py (README, "Cord -> lesion cascade"): the boxes of the
    cord a ``2d`` model predicted on held-out cases matched the reference on most edges, were looser
    on some (false-positive blobs, up to 18 mm) and tighter on a few (0.9 mm on phantoms, 9.6 mm on
    one edge of the real t2_fake_lesion), and a 5 mm margin lost no lesion voxel; a lesion the cord
    model left out of the cord reached 4.4 mm from the predicted cord.
    """

    label: str = "cord"  # label name whose mask defines the box
    margin_mm: float = 5.0  # added on every side of the mask's bounding box, in-plane and across slices: the CSF ring and beyond
    jitter_mm: float = 2.0  # training only: each box edge moves by U(-jitter, +jitter) mm, per case, seeded: the small errors either way
    remove_outside_mm: float = 5.0  # prediction: label voxels farther than this from the mask are removed (a lesion at its edge stays)


@dataclass
class TrainerPlan:
    """How the loop runs a configuration: set by a run YAML (``spineauto train --config``) or left at
    these defaults, recorded in ``fold_k/run_config.yaml``."""

    task: str | None = None  # a registered task or package.module:Name used instead of the configuration's own
    accumulate: int = 1  # micro-batches of batch_size per optimiser step: the effective batch is batch_size * accumulate
    activation_checkpointing: bool = False  # recompute encoder/decoder stages in the backward pass: less memory, more time
    persistent_workers: bool = False  # keep data workers between the training and validation streams' epochs
    pin_memory: bool | None = None  # None: on for CUDA
    log_every: int = 0  # training iterations between step-level loss/lr logs (W&B, TensorBoard); 0: per epoch only
    val_every: int = 1  # epochs between validation passes (the last epoch always validates)
    sync_batchnorm: bool = True  # under DDP, BatchNorm layers normalise over the global batch (SyncBatchNorm); false: each rank its own
    loggers: list[str] = field(default_factory=list)  # beside the local files and W&B: tensorboard
    callbacks: list[dict[str, Any]] = field(default_factory=list)  # {name: lr_monitor | model_checkpoint | segmentation_sampler | early_stopping | package.module:Name, ...arguments}


@dataclass
class LocalisePlan:
    """Prediction keeps the component of ``label`` that is a cord (a tube along the superior-inferior
    axis, on the midline: :func:`spineauto.inference.postprocessing.keep_cord_component`) instead of
    every island a network marks on a field of view it never saw. With ``second_pass``, localise
    then segment (as Spinal Cord Toolbox's ``sct_deepseg_sc``): the network runs again on a box
    around that cord widened by ``margin_mm`` (normalised inside the box; the whole scan along S-I)
    and the cord component of that pass is kept. The planner sets the margin so that the box is as
    wide as the training cases are, and leaves the second pass off (measured: README, "A scanner it
    never saw")."""

    label: str = "cord"
    margin_mm: float = 15.0
    second_pass: bool = False


@dataclass
class ConfigurationPlan:
    name: str
    task: Task
    data_identifier: str  # preprocessed folder shared by configurations with the same preprocessing
    slicing: Slicing
    isotropic_plane: Literal["sagittal", "coronal", "axial"]  # per_case slicing of near-isotropic blocks
    target_spacing: list[float]  # in-plane (row, column) spacing in mm; slices keep their own spacing
    patch_size: list[int]
    batch_size: int
    normalization: list[str]  # per channel: nnunetv2 scheme name
    use_mask_for_norm: list[bool]
    network: NetworkPlan
    heads: list[HeadPlan] = field(default_factory=list)
    optim: OptimPlan = field(default_factory=OptimPlan)
    loss: LossPlan = field(default_factory=LossPlan)
    augmentation: AugmentationPlan = field(default_factory=AugmentationPlan)
    foreground_oversampling: float = 0.33
    trainer: TrainerPlan = field(default_factory=TrainerPlan)
    roi: RoiPlan | None = None  # crop to a box around a mask (cascade stage); None: the nonzero region
    localise: LocalisePlan | None = None  # prediction: whole image, then a box around the cord found there
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def has_segmentation(self) -> bool:
        return self.task in ("segmentation", "multitask")

    @property
    def has_classification(self) -> bool:
        return self.task in ("classification", "multitask")


@dataclass
class Plans:
    dataset_name: str
    channel_names: dict[str, str]
    labels: dict[str, int]
    heads: dict[str, list[str]]
    lesion_labels: list[str]
    configurations: dict[str, ConfigurationPlan]
    foreground_intensity_properties_per_channel: dict[str, IntensityStats] = field(default_factory=dict)  # channel index -> stats
    schema_version: int = SCHEMA_VERSION
    plans_name: str = "spineautoPlans"
    preset: str | None = None
    # region-based labels (nnU-Net's): region name -> the label-map values it covers, in painting order; the
    # region is output channel labels[name] (sigmoid) and written as that value, a later region over an earlier
    regions: dict[str, list[int]] = field(default_factory=dict)
    # nnU-Net's ignore label: the label-map value of voxels nobody labelled (no output channel, masked out of
    # the loss and every metric); None when the dataset has none. Plans written before it load with None.
    ignore_label: int | None = None

    def configuration(self, name: str) -> ConfigurationPlan:
        if name not in self.configurations:
            raise SpineautoError(f"configuration {name!r} is not in the plans of {self.dataset_name}; available: {', '.join(self.configurations)}")
        return self.configurations[name]

    @property
    def intensity(self) -> list[IntensityStats]:
        """Per-channel statistics in channel order (what CT-style normalisation reads)."""
        props = self.foreground_intensity_properties_per_channel
        return [props[str(c)] for c in range(len(props))]

    @property
    def region_order(self) -> list[int] | None:
        """The output channels (= written label values) of the regions in painting order, or None."""
        return [self.labels[name] for name in self.regions] if self.regions else None

    def members(self, value: int) -> list[int]:
        """The label-map values that output channel ``value`` stands for: its region's, else just itself."""
        for name, values in self.regions.items():
            if self.labels[name] == value:
                return list(values)
        return [value]

    def cord_value(self, plan: ConfigurationPlan) -> int | None:
        """The label value of the cord that ``plan`` localises (``localise.label``); None without a localise plan."""
        return int(self.labels[plan.localise.label]) if plan.localise is not None else None

    @property
    def num_classes(self) -> int:
        """Segmentation output channels (background included)."""
        return max(self.labels.values()) + 1 if self.labels else 0

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "plans") -> "Plans":
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise SpineautoError(f"{where}: schema_version {version!r} is not {SCHEMA_VERSION}; rerun `spineauto plan_and_preprocess`")
        plans = from_dict(cls, data, where)
        channels = sorted(plans.foreground_intensity_properties_per_channel)
        if channels != sorted(str(c) for c in range(len(plans.channel_names))):
            raise SpineautoError(f"{where}: foreground_intensity_properties_per_channel has channels {channels}, "
                                 f"expected one entry per channel 0..{len(plans.channel_names) - 1}")
        shared: dict[str, ConfigurationPlan] = {}
        for name, cfg in plans.configurations.items():
            if cfg.name != name:
                raise SpineautoError(f"{where}: configuration key {name!r} holds a plan named {cfg.name!r}")
            _check_configuration(cfg, plans, f"{where}.configurations.{name}")
            first = shared.setdefault(cfg.data_identifier, cfg)
            differs = [k for k, v in preprocessing_key(cfg).items() if v != preprocessing_key(first)[k]]
            if differs:
                raise SpineautoError(f"{where}.configurations.{name}: shares data_identifier {cfg.data_identifier!r} with {first.name} "
                                     f"but preprocesses differently ({', '.join(differs)}); give it its own data_identifier")
        return plans

    def save(self, path: Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> "Plans":
        if not Path(path).is_file():
            raise SpineautoError(f"{path}: no plans yet; run `spineauto plan_and_preprocess -d <dataset>` first")
        try:
            data = read_json(path)
        except ValueError as e:
            raise SpineautoError(f"{path}: invalid JSON ({e})") from None
        if isinstance(data, dict) and data.get("schema_version") == 1:
            data = migrate_v1(data, Path(path))
        for cfg in (data.get("configurations") or {}).values() if isinstance(data, dict) else ():
            upgrade_configuration(cfg, str(path))
        return cls.from_dict(data, where=str(path))


def upgrade_configuration(cfg: Any, where: str) -> None:
    """A configuration mapping spineauto wrote before (plans.json, fold_k/run_config.yaml), in place: a field
    it predates at the value it was trained with; a retired option dropped (a warning when it was on)."""
    aug = cfg.get("augmentation") if isinstance(cfg, dict) else None
    if not isinstance(aug, dict):
        return
    aug.setdefault("non_monotone", 0.0)  # planned before non-monotone curves existed: trained (and resumed) without them
    if aug.pop("composite", None):  # real crops composited into whole-neck phantoms: taken out after commit 4f4ab0d
        log.warning("%s: augmentation.composite (real crops in whole-neck phantoms) is no longer an option; "
                    "this plan trains without it", where)


def preprocessing_key(cfg: ConfigurationPlan) -> dict:
    """The fields that decide a configuration's preprocessed data: configurations that share a
    ``data_identifier`` (one preprocessed folder) must agree on every one."""
    return {"slicing": cfg.slicing, "isotropic_plane": cfg.isotropic_plane, "target_spacing": list(cfg.target_spacing),
            "normalization": list(cfg.normalization), "use_mask_for_norm": list(cfg.use_mask_for_norm),
            "roi": to_dict(cfg.roi)}


MAX_PATCH = 4096  # voxels per patch side; more is a typo (a batch of 100000^2 patches asked for 76 GiB at once)


def _check_configuration(cfg: ConfigurationPlan, plans: Plans, where: str) -> None:
    """Every value in the range the trainer, the network and preprocessing need; one line naming the field."""
    def fail(field_: str, rule: str, value) -> None:
        raise SpineautoError(f"{where}.{field_}: must be {rule}, got {value!r}")

    def positive(field_: str, values, strict: bool = True, top: float | None = None, top_open: bool = False) -> None:
        for v in values if isinstance(values, list) else [values]:
            low = v > 0 if strict else v >= 0
            high = top is None or (v < top if top_open else v <= top)
            if not (low and high and v == v and v not in (float("inf"), float("-inf"))):
                rule = ("> 0" if strict else ">= 0") + ("" if top is None else f" and {'<' if top_open else '<='} {top:g}")
                fail(field_, rule, values)

    def pair(field_: str, values, strict: bool = True) -> None:
        if len(values) != 2 or values[0] > values[1]:
            fail(field_, "[low, high] with low <= high", values)
        positive(field_, values, strict)

    channels = len(plans.channel_names)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", cfg.data_identifier):
        fail("data_identifier", "a folder name (letters, digits, _ . -, not starting with a dot)", cfg.data_identifier)
    if len(cfg.patch_size) != 2 or len(cfg.target_spacing) != 2:
        raise SpineautoError(f"{where}: patch_size and target_spacing must have 2 values (2D)")
    positive("patch_size", cfg.patch_size, top=MAX_PATCH)
    positive("target_spacing", cfg.target_spacing)
    if cfg.batch_size < 1:
        fail("batch_size", ">= 1", cfg.batch_size)
    if len(cfg.normalization) != channels or len(cfg.use_mask_for_norm) != channels:
        raise SpineautoError(f"{where}: normalization and use_mask_for_norm need one entry per channel ({channels})")
    net = cfg.network
    n = net.n_stages
    if n < 1:
        fail("network.features_per_stage", "a list of at least one stage", net.features_per_stage)
    if not (len(net.kernel_sizes) == len(net.strides) == len(net.n_conv_per_stage) == n and len(net.n_conv_per_stage_decoder) == n - 1):
        raise SpineautoError(f"{where}.network: per-stage lists must have {n} entries ({n - 1} for the decoder)")
    positive("network.features_per_stage", net.features_per_stage)
    positive("network.n_conv_per_stage", net.n_conv_per_stage)
    positive("network.n_conv_per_stage_decoder", net.n_conv_per_stage_decoder)
    for i, (k, st) in enumerate(zip(net.kernel_sizes, net.strides)):
        if len(k) != 2 or any(x < 1 or x % 2 == 0 for x in k):
            fail(f"network.kernel_sizes[{i}]", "2 odd sizes >= 1", k)
        if len(st) != 2 or any(x < 1 for x in st):
            fail(f"network.strides[{i}]", "2 strides >= 1", st)
    positive("network.dropout", net.dropout, strict=False, top=1.0, top_open=True)
    if net.architecture in ("resnet", "resnet_unet") and net.depth not in (18, 34, 50):
        fail("network.depth", "18, 34 or 50 (the ResNet encoder)", net.depth)
    if net.architecture == "resnet" and cfg.has_segmentation:
        fail("network.architecture", "resnet_unet for a segmentation task (resnet is the encoder alone)", net.architecture)
    if cfg.has_segmentation and net.architecture != "resnet_unet":  # the decoder joins each stage to its skip: every stage's size must halve exactly (resnet_unet pads to 32 itself)
        factor = [int(np.prod([st[a] for st in net.strides])) for a in range(2)]
        if any(p % f for p, f in zip(cfg.patch_size, factor)):
            fail("patch_size", f"divisible by {'x'.join(map(str, factor))} (the product of network.strides, for the U-Net decoder)",
                 cfg.patch_size)
        if all(p <= f for p, f in zip(cfg.patch_size, factor)):  # instance norm of a single voxel fails in training
            fail("patch_size", f"larger than {'x'.join(map(str, factor))} (the product of network.strides) on one axis at least: "
                 "the deepest stage needs more than one voxel", cfg.patch_size)
    o = cfg.optim
    positive("optim.initial_lr", o.initial_lr)
    positive("optim.weight_decay", o.weight_decay, strict=False)
    positive("optim.momentum", o.momentum, strict=False, top=1.0, top_open=True)
    positive("optim.grad_clip", o.grad_clip, strict=False)
    positive("optim.weight_average", o.weight_average, strict=False, top=1.0)
    for key in ("epochs", "iters_per_epoch"):
        if getattr(o, key) < 1:
            fail(f"optim.{key}", ">= 1", getattr(o, key))
    if o.val_iters < 0:
        fail("optim.val_iters", ">= 0", o.val_iters)
    for key in ("warmup_epochs", "min_lr"):
        positive(f"optim.{key}", getattr(o, key), strict=False)
    positive("optim.plateau_factor", o.plateau_factor, top=1.0, top_open=True)
    if o.plateau_patience < 0:
        fail("optim.plateau_patience", ">= 0", o.plateau_patience)
    lo = cfg.loss
    for key in ("dice_weight", "ce_weight", "segmentation_weight", "classification_weight", "focal_gamma", "tversky_alpha", "tversky_beta"):
        positive(f"loss.{key}", getattr(lo, key), strict=False)
    positive("loss.tversky_gamma", lo.tversky_gamma)
    for key, name in (("network.architecture", net.architecture), ("optim.optimizer", o.optimizer), ("optim.schedule", o.schedule),
                      ("loss.name", lo.name), ("trainer.task", cfg.trainer.task)):
        if name is not None and not (re.fullmatch(r"[A-Za-z_]\w*", name) or is_import_string(name)):
            fail(key, "a registered name or an import string package.module:Name", name)
    t = cfg.trainer
    for key, low in (("accumulate", 1), ("val_every", 1), ("log_every", 0)):
        if getattr(t, key) < low:
            fail(f"trainer.{key}", f">= {low}", getattr(t, key))
    for i, entry in enumerate([*t.callbacks, *cfg.augmentation.transforms]):
        if not isinstance(entry.get("name"), str):
            where_ = f"trainer.callbacks[{i}]" if i < len(t.callbacks) else f"augmentation.transforms[{i - len(t.callbacks)}]"
            fail(where_, "a mapping with a name (registered or package.module:Name) and its arguments", entry)
    positive("loss.label_smoothing", lo.label_smoothing, strict=False, top=1.0, top_open=True)
    a = cfg.augmentation
    positive("augmentation.probability", a.probability, strict=False, top=1.0)
    for key in ("intensity_curves", "inversion", "non_monotone", "bias_field", "cord_contrast", "whole_neck", "vertebral_cortex"):
        positive(f"augmentation.{key}", getattr(a, key), strict=False, top=1.0)
    positive("augmentation.rotation_degrees", a.rotation_degrees, strict=False)
    positive("augmentation.noise_variance", a.noise_variance, strict=False)
    for key in ("scale_range", "gamma_range", "brightness_range", "contrast_range", "lowres_range"):
        pair(f"augmentation.{key}", getattr(a, key))
    pair("augmentation.blur_sigma", a.blur_sigma, strict=False)
    if any(x not in (0, 1) for x in a.mirror_axes):
        fail("augmentation.mirror_axes", "a list of the 2D axes 0 and 1", a.mirror_axes)
    positive("foreground_oversampling", cfg.foreground_oversampling, strict=False, top=1.0)
    for i, h in enumerate(cfg.heads):
        if len(h.class_weights) != len(h.classes):
            raise SpineautoError(f"{where}.heads[{i}].class_weights: one weight per class ({len(h.classes)}) expected, got {h.class_weights}")
        positive(f"heads[{i}].class_weights", h.class_weights, strict=False)
        positive(f"heads[{i}].loss_weight", h.loss_weight, strict=False)
    if cfg.roi is not None:
        if cfg.roi.label not in plans.labels or plans.labels[cfg.roi.label] == 0:
            raise SpineautoError(f"{where}.roi.label: {cfg.roi.label!r} is not a foreground label "
                                 f"of the dataset ({', '.join(k for k, v in plans.labels.items() if v)})")
        if min(cfg.roi.margin_mm, cfg.roi.jitter_mm, cfg.roi.remove_outside_mm) < 0:
            raise SpineautoError(f"{where}.roi: margin_mm, jitter_mm and remove_outside_mm must be >= 0")
    if cfg.localise is not None:
        if cfg.localise.label not in plans.labels or plans.labels[cfg.localise.label] == 0:
            raise SpineautoError(f"{where}.localise.label: {cfg.localise.label!r} is not a foreground label "
                                 f"of the dataset ({', '.join(k for k, v in plans.labels.items() if v)})")
        if not cfg.has_segmentation or cfg.roi is not None:
            raise SpineautoError(f"{where}.localise: only for a segmentation configuration without an roi (set it to null)")
        positive("localise.margin_mm", cfg.localise.margin_mm)


def migrate_v1(data: dict, path: Path) -> dict:
    """Plans of schema 1 kept the intensity statistics in ``fingerprint.json`` beside them (model
    folders trained before the move still hold that file): read them from there."""
    fp_path = path.parent / "fingerprint.json"
    try:
        intensity = read_json(fp_path)["intensity"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SpineautoError(f"{path}: plans of schema 1 need the fingerprint.json beside them for their intensity "
                             f"statistics ({fp_path} is missing or has none); rerun `spineauto plan_and_preprocess`") from None
    return {**data, "foreground_intensity_properties_per_channel": {str(c): s for c, s in enumerate(intensity)},
            "schema_version": SCHEMA_VERSION}
