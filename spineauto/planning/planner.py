"""From a fingerprint to plans: every value derived from a fingerprint fact, recorded in ``reasons``.

The spine-specific part is the slicing rule. nnU-Net 2D cuts every case along one array axis chosen
for the whole dataset, without reorienting, so a sagittal and an axial scan of the same dataset are
cut in different anatomical planes and a 17 mm slice axis can end up in-plane. spineauto reorients
every case and cuts it across its own through-plane axis (``per_case``), so every 2D slice is a
full-resolution acquisition plane; in-plane spacing is resampled to one isotropic target, the
slice spacing is left alone. A preset may force one anatomical plane for all cases instead.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from spineauto.datasets.dataset_json import lesion_labels
from spineauto.errors import SpineautoError
from spineauto.planning.fingerprint import Fingerprint
from spineauto.planning.plans import ConfigurationPlan, HeadPlan, LocalisePlan, NetworkPlan, Plans, RoiPlan
from spineauto.planning.presets import apply_preset

log = logging.getLogger(__name__)

BASE_FEATURES = 32
MAX_FEATURES = 512
MIN_FEATURE_MAP = 4
MAX_PATCH_EDGE = 512  # pixels; larger slices are trained on patches
MEMORY_BUDGET_GB = 2.0  # activations of one training step, used to size the batch (on a machine without CUDA)
GPU_ACTIVATION_FRACTION = 0.5  # of a card's memory, for one step's activations (the rest: weights, optimiser, cuDNN, cache)
MIN_BATCH, MAX_BATCH = 2, 64
MAX_DATASET_FRACTION = 0.05  # one batch covers at most this fraction of all training pixels (nnU-Net's rule)
CROP_FRACTION_FOR_MASK = 0.75  # normalise inside the nonzero mask when cropping removed more than 25%


def _median_in_plane_spacing(fp: Fingerprint) -> tuple[float, str]:
    values = np.concatenate([c.layout_spacing[1:] for c in fp.cases])
    t = float(np.median(values))
    return t, f"median in-plane spacing over {len(fp.cases)} cases ({values.min():.3g}-{values.max():.3g} mm)"


def _in_plane_shapes(fp: Fingerprint, target: float) -> np.ndarray:
    return np.array([[s * sp / target for s, sp in zip(c.cropped_shape[1:], c.layout_spacing[1:])] for c in fp.cases])


def estimate_activation_bytes(patch: list[int], features: list[int], n_conv: list[int], encoder_only: bool = False) -> float:
    """Rough training memory per sample: every conv output, its norm and its nonlinearity, kept for backward."""
    area = float(np.prod(patch))
    total = 0.0
    for s, (f, n) in enumerate(zip(features, n_conv)):
        stage = area / (4**s) * f * n * 3
        total += stage * (1 if encoder_only else 2)
    return total * 4 * 2  # float32, forward activations plus their gradients


def _network(patch_median: np.ndarray, target: float) -> tuple[NetworkPlan, list[int], str]:
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    patch = [int(min(max(8, round(x)), MAX_PATCH_EDGE)) for x in patch_median]
    _, pools, kernels, patch_out, _ = get_pool_and_conv_props([target, target], patch, MIN_FEATURE_MAP, 999)
    n = len(pools)
    features = [min(BASE_FEATURES * 2**i, MAX_FEATURES) for i in range(n)]
    net = NetworkPlan(
        architecture="unet", features_per_stage=features, kernel_sizes=[list(k) for k in kernels],
        strides=[list(p) for p in pools], n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1),
    )
    return net, [int(x) for x in patch_out], f"{n} stages down to >= {MIN_FEATURE_MAP} px (nnunetv2 get_pool_and_conv_props)"


def memory_target(gpu_memory_gb: float | None = None) -> tuple[float, str]:
    """The activation budget (GB) that sizes the batch, and why: a share of ``gpu_memory_gb`` when given,
    else of the visible CUDA card, else the CPU budget (nnU-Net's ``-gpu_memory_target``, default from the card)."""
    from spineauto.devices import cuda_memory_gb

    if gpu_memory_gb is not None:
        if not isinstance(gpu_memory_gb, (int, float)) or not 0 < gpu_memory_gb < 10_000:
            raise SpineautoError(f"--gpu-memory-gb {gpu_memory_gb!r}: give the card's memory in GB, e.g. 24")
        return gpu_memory_gb * GPU_ACTIVATION_FRACTION, f"--gpu-memory-gb {gpu_memory_gb:g}"
    card = cuda_memory_gb()
    if card is not None:
        return card[0] * GPU_ACTIVATION_FRACTION, f"the visible card {card[1]} ({card[0]:.1f} GB)"
    return MEMORY_BUDGET_GB, "no CUDA device visible: the CPU budget"


def _batch_size(patch: list[int], net: NetworkPlan, total_pixels: float, encoder_only: bool = False,
                budget: tuple[float, str] = (MEMORY_BUDGET_GB, "CPU")) -> tuple[int, str]:
    per_sample = estimate_activation_bytes(patch, net.features_per_stage, net.n_conv_per_stage, encoder_only)
    budget_gb, why = budget
    by_memory = int(budget_gb * 1024**3 // per_sample)
    by_data = int(MAX_DATASET_FRACTION * total_pixels // np.prod(patch))
    bs = int(np.clip(min(by_memory, by_data), MIN_BATCH, MAX_BATCH))
    share = f"{GPU_ACTIVATION_FRACTION:.0%} of " if why != "CPU" and not why.startswith("no CUDA") else ""
    return bs, (f"{budget_gb:.3g} GB activation budget ({share}{why}) allows {by_memory} ({per_sample / 2**20:.0f} MB/sample); "
                f"{MAX_DATASET_FRACTION:.0%} of the {total_pixels:.3g} training pixels allows {by_data}; clipped to [{MIN_BATCH}, {MAX_BATCH}]")


def _heads(fp: Fingerprint) -> list[HeadPlan]:
    heads = []
    for name, classes in fp.heads.items():
        counts = np.array([fp.class_counts.get(name, {}).get(c, 0) for c in classes], dtype=float)
        present = counts > 0
        w = np.ones(len(classes))
        w[present] = counts[present].sum() / (present.sum() * counts[present])
        heads.append(HeadPlan(name=name, classes=list(classes), class_weights=[round(float(x), 4) for x in w]))
    return heads


def cord_label(labels: dict[str, int], lesion: list[str]) -> str | None:
    """The cord label of a dataset: the first foreground label whose name contains "cord" (not a lesion label)."""
    names = [k for k, v in labels.items() if v > 0 and "cord" in k.lower() and k not in lesion]
    return names[0] if names else None


MIN_LOCALISE_MARGIN_MM = 5.0
WHOLE_NECK_SHARE = 0.25  # augmentation.whole_neck of a one-channel `2d` cord configuration (README, "A scanner it never saw")


def _localise(fp: Fingerprint, cord: str) -> tuple[LocalisePlan, str]:
    """Localise, then segment, with a box as wide as the training cases: per case with a cord, half
    of (in-plane field of view - cord extent), mean of the two in-plane axes; the median over cases."""
    margins = []
    for c in fp.cases:
        ext = c.label_extent.get(str(fp.labels[cord]))
        if ext:
            fov = np.array(c.cropped_shape[1:]) * np.array(c.layout_spacing[1:])
            margins.append(float(np.mean((fov - np.array(ext[1:]) * np.array(c.layout_spacing[1:])) / 2)))
    if not margins:
        plan = LocalisePlan(label=cord)
        return plan, f"no {cord!r} extents in the fingerprint: default margin {plan.margin_mm:g} mm"
    margin = max(MIN_LOCALISE_MARGIN_MM, round(float(np.median(margins)), 1))
    return LocalisePlan(label=cord, margin_mm=margin), (
        f"prediction keeps the {cord} component (a long tube on the midline), not every island; second pass (a box "
        f"around it, {margin:g} mm wider on each side: the median over {len(margins)} training cases of half (in-plane field "
        f"of view - {cord} extent), at least {MIN_LOCALISE_MARGIN_MM:g} mm) off: it lowered whole-neck false positives "
        "but lost T1w Dice in bench_generalisation; localise.second_pass: true in a preset turns it on")


def _roi_shapes(fp: Fingerprint, value: int, margin_mm: float, target: float) -> tuple[np.ndarray, np.ndarray]:
    """Per case with that label: the in-plane shape at the target spacing of its box (label bounding
    box + margin, within the nonzero crop), and the box's slice count."""
    shapes, slices = [], []
    for c in fp.cases:
        ext = c.label_extent.get(str(value))
        if not ext:
            continue
        box = [min(e + 2 * int(np.ceil(margin_mm / sp)), n) for e, sp, n in zip(ext, c.layout_spacing, c.cropped_shape)]
        shapes.append([b * sp / target for b, sp in zip(box[1:], c.layout_spacing[1:])])
        slices.append(box[0])
    return np.array(shapes).reshape(-1, 2), np.array(slices)


def _roi_configuration(fp: Fingerprint, cord: str, lesion: list[str], target: float, reasons: dict, common: dict,
                       budget: tuple[float, str] = (MEMORY_BUDGET_GB, "CPU")) -> ConfigurationPlan:
    roi = RoiPlan(label=cord)  # margin, jitter and removal distance: the defaults, measured (see RoiPlan)
    shapes, slices = _roi_shapes(fp, fp.labels[cord], roi.margin_mm, target)
    if not len(shapes):  # a fingerprint without label extents: plan from the whole cropped slices
        shapes, slices = _in_plane_shapes(fp, target), np.array([c.cropped_shape[0] for c in fp.cases])
        patch_reason = "no label extents in the fingerprint: median cropped in-plane shape"
    else:
        patch_reason = f"median in-plane shape of the {cord!r} box (+{roi.margin_mm:g} mm each side) over {len(shapes)} cases"
    median = np.median(shapes, axis=0)
    net, patch, net_reason = _network(median, target)
    bs, bs_reason = _batch_size(patch, net, float((shapes.prod(axis=1) * slices).sum()), budget=budget)
    return ConfigurationPlan(
        name="2d_cord_roi", task="segmentation", patch_size=patch, batch_size=bs, network=net, roi=roi,
        reasons={**reasons, "data_identifier": "crops around the cord: preprocessed on their own",
                 "patch_size": f"{patch_reason}: {np.round(median, 1).tolist()} px at target spacing, made divisible by the pooling",
                 "network": net_reason, "batch_size": bs_reason,
                 "roi": f"labels {cord!r} and lesion {lesion}: the lesion model works in a box around the {cord} "
                        f"(margin {roi.margin_mm:g} mm: the CSF ring and a little beyond; jitter {roi.jitter_mm:g} mm: the box-edge "
                        f"error of a predicted cord; lesion voxels over {roi.remove_outside_mm:g} mm from the cord removed at prediction)"},
        **{**common, "data_identifier": "2d_cord_roi"})


def plan_dataset(fp: Fingerprint, preset: Path | None = None, gpu_memory_gb: float | None = None) -> Plans:
    """Plans from a fingerprint; the batch sizes follow ``gpu_memory_gb`` (default: the visible card, see :func:`memory_target`)."""
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme

    target, target_reason = _median_in_plane_spacing(fp)
    shapes = _in_plane_shapes(fp, target)
    median_shape = np.median(shapes, axis=0)
    net, patch, net_reason = _network(median_shape, target)
    slices = [c.cropped_shape[0] for c in fp.cases]
    total_pixels = float((shapes.prod(axis=1) * np.array(slices)).sum())
    budget = memory_target(gpu_memory_gb)
    bs, bs_reason = _batch_size(patch, net, total_pixels, budget=budget)
    planes = Counter(c.plane for c in fp.cases)
    norm = [get_normalization_scheme(n).__name__ for n in fp.channel_names.values()]
    median_crop = float(np.median([c.crop_fraction for c in fp.cases]))
    use_mask = [n == "ZScoreNormalization" and median_crop < CROP_FRACTION_FOR_MASK for n in norm]
    common = dict(
        data_identifier="2d", slicing="per_case", isotropic_plane=fp.isotropic_plane, target_spacing=[target, target], normalization=norm, use_mask_for_norm=use_mask,
    )
    reasons = {
        "slicing": f"acquisition planes {dict(planes)}: each case is cut across its own through-plane axis",
        "isotropic_plane": "most common plane of the cases with a clear through-plane axis (sagittal on a tie or none)",
        "target_spacing": target_reason,
        "patch_size": f"median cropped in-plane shape {np.round(median_shape, 1).tolist()} px at target spacing, made divisible by the pooling",
        "network": net_reason,
        "batch_size": bs_reason,
        "normalization": f"channel names {list(fp.channel_names.values())} (nnunetv2 get_normalization_scheme)",
        "use_mask_for_norm": f"median crop fraction {median_crop:.2f} vs {CROP_FRACTION_FOR_MASK}",
    }
    configs: dict[str, ConfigurationPlan] = {}
    heads = _heads(fp)
    head_reason = "; ".join(f"{h.name}: class counts {fp.class_counts.get(h.name)} -> inverse-frequency weights" for h in heads)
    if len(fp.labels) > 1:
        configs["2d"] = ConfigurationPlan(name="2d", task="segmentation", patch_size=patch, batch_size=bs, network=net,
                                          reasons=dict(reasons), **common)
        if fp.regions:  # nnU-Net's region training: one sigmoid output per region, Dice + BCE on each
            configs["2d"].network = replace(net, output_activation="sigmoid")
            configs["2d"].loss.name = "dice_bce"
            configs["2d"].reasons["loss"] = f"region-based labels {dict(fp.regions)}: a sigmoid output per region (nnU-Net's Dice + BCE)"
    if heads:
        cls_bs, cls_reason = _batch_size(patch, net, total_pixels * 4, encoder_only=True, budget=budget)
        configs["cls"] = ConfigurationPlan(
            name="cls", task="classification", patch_size=patch, batch_size=cls_bs,
            network=NetworkPlan(**{**net.__dict__, "deep_supervision": False, "norm": "batch"}), heads=heads,
            foreground_oversampling=0.0, reasons={**reasons, "batch_size": cls_reason + " (encoder only)", "heads": head_reason,
                                                  "network": net_reason + "; batch norm: the heads pool the deepest features globally, "
                                                  "and instance norm would remove each image's channel means (measured: much slower learning)"},
            **common)
    if heads and len(fp.labels) > 1 and not fp.regions:  # the heads' softmax outputs and the regions' sigmoid ones do not mix
        configs["multitask"] = ConfigurationPlan(name="multitask", task="multitask", patch_size=patch, batch_size=bs, network=net,
                                                 heads=heads, reasons={**reasons, "heads": head_reason}, **common)
    lesion = lesion_labels(fp.labels, fp.lesion_labels)
    cord = cord_label(fp.labels, lesion) if not fp.regions else None  # the cascade and localisation take a cord label, not a region
    if cord and lesion:
        configs["2d_cord_roi"] = _roi_configuration(fp, cord, lesion, target, reasons, common, budget)
    if cord and "2d" in configs:
        configs["2d"].localise, configs["2d"].reasons["localise"] = _localise(fp, cord)
        if len(fp.channel_names) == 1:
            configs["2d"].augmentation = replace(configs["2d"].augmentation, whole_neck=WHOLE_NECK_SHARE)
            configs["2d"].reasons["whole_neck"] = (
                f"{WHOLE_NECK_SHARE:g} of the training samples are whole-neck phantom patches, tissues at random intensities "
                "(training/synthetic.py): a cord model sees the vertebral bodies, vessels and muscle of a whole neck "
                "(measured in bench_generalisation: fewer false positives on a whole-neck scan)")
    plans = Plans(dataset_name=fp.dataset_name, channel_names=fp.channel_names, labels=fp.labels, heads=fp.heads,
                  lesion_labels=lesion, configurations=configs, regions=dict(fp.regions), ignore_label=fp.ignore_label,
                  foreground_intensity_properties_per_channel={str(c): s for c, s in enumerate(fp.intensity)})
    if preset is not None:
        plans = apply_preset(plans, preset)
    return plans
