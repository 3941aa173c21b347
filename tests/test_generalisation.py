"""What the cord model's generalisation rests on: contrast remapping, the cord-component
postprocessing and the shifted phantoms of bench/bench_generalisation.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from spineauto.datasets.phantoms import PhantomSpec, render_phantom
from spineauto.inference.postprocessing import keep_cord_component, keep_largest_component, superior_axis
from spineauto.planning.plans import AugmentationPlan
from spineauto.training.augment import (CORD_CONTRAST_GAP, ContrastRemapTransform, build_transforms, cord_contrast_curve,
                                       random_bias_field, random_intensity_curve)


def _ramp() -> np.ndarray:
    return np.linspace(-2, 2, 48, dtype=np.float32)[None, :].repeat(40, 0)


@pytest.mark.parametrize("seed", range(5))
def test_intensity_curve_keeps_order_or_inverts_it_and_keeps_the_statistics(seed):
    x = _ramp()
    np.random.seed(seed)
    same = random_intensity_curve(x, invert=False)
    np.random.seed(seed)
    inverted = random_intensity_curve(x, invert=True)
    assert spearmanr(x.ravel(), same.ravel())[0] > 0.99
    assert spearmanr(x.ravel(), inverted.ravel())[0] < -0.99
    for y in (same, inverted):
        assert y.mean() == pytest.approx(x.mean(), abs=1e-5) and y.std() == pytest.approx(x.std(), rel=1e-4)
    assert not np.allclose(same, x, atol=0.05)  # the curve changed the intensities


def test_bias_field_is_smooth_multiplicative_and_keeps_the_statistics():
    x = np.ones((40, 48), np.float32) + _ramp() * 0.01
    np.random.seed(3)
    y = random_bias_field(x)
    assert y.mean() == pytest.approx(x.mean(), abs=1e-5) and y.std() == pytest.approx(x.std(), rel=1e-4)
    assert np.abs(np.diff(y, axis=0)).max() < 0.2 * (y.max() - y.min())  # smooth: no jumps between neighbours


def test_contrast_remap_runs_per_sample_and_only_where_asked():
    batch = {"data": np.stack([_ramp()[None]] * 8).copy(), "seg": np.zeros((8, 1, 40, 48), np.int16)}
    np.random.seed(0)
    out = ContrastRemapTransform(p_curve=1.0, p_invert=0.5, p_bias=0.0)(**batch)
    signs = [np.sign(spearmanr(_ramp().ravel(), out["data"][b, 0].ravel())[0]) for b in range(8)]
    assert 0 < signs.count(-1.0) < 8  # some inverted, some not: drawn per sample
    names = lambda remap: [type(t).__name__ for t in build_transforms([40, 48], AugmentationPlan(), True, remap).transforms]  # noqa: E731
    assert "ContrastRemapTransform" in names(True) and "ContrastRemapTransform" not in names(False)
    off = AugmentationPlan(intensity_curves=0.0, bias_field=0.0)
    assert "ContrastRemapTransform" not in [type(t).__name__ for t in build_transforms([40, 48], off, True).transforms]


def test_non_monotone_curves_reorder_tissues_and_keep_mean_and_spread():
    ramp = _ramp()
    batch = {"data": np.stack([ramp[None]] * 8).copy(), "seg": np.zeros((8, 1, 40, 48), np.int16)}
    np.random.seed(1)
    out = ContrastRemapTransform(p_curve=1.0, p_invert=0.0, p_bias=0.0, p_non_monotone=1.0)(**batch)["data"][:, 0]
    rho = [abs(spearmanr(ramp.ravel(), out[b].ravel())[0]) for b in range(8)]
    assert sum(r < 0.95 for r in rho) >= 4  # most curves rise and fall: no monotone map gives |rho| < 1 on a ramp
    for b in range(8):  # still one value per input value (a curve, not noise), and the plan's normalisation kept
        values = {}
        for a, y in zip(ramp.ravel().round(6), out[b].ravel()):
            assert values.setdefault(a, y) == y
        assert abs(out[b].mean() - ramp.mean()) < 1e-4 and abs(out[b].std() - ramp.std()) < 1e-4


def _cord_in_csf(cord_level: float = -1.0, csf_level: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """A disc (the cord, radius 8 voxels) in a ring of CSF (to radius 12) in tissue, blurred at its edges."""
    from scipy import ndimage

    d = np.hypot(*np.meshgrid(np.arange(48) - 23.5, np.arange(48) - 23.5, indexing="ij"))
    x = np.where(d <= 8, cord_level, np.where(d <= 12, csf_level, 0.0))
    return ndimage.gaussian_filter(x, 1.0).astype(np.float32), d <= 8


def test_cord_contrast_curves_redraw_the_cords_polarity_and_keep_its_edge():
    """The cord and its surround go to levels at least the gap apart, brighter or darker alike, through one
    curve of intensity: the edge (where the profile is halfway between cord and CSF) stays where it was."""
    x, cord = _cord_in_csf()
    profile = lambda img: img[24, 24:40]  # noqa: E731  centre outwards
    edge = lambda p: int(np.argmax(np.abs(p - p[0]) >= 0.5 * np.abs(p[10] - p[0])))  # noqa: E731  first past halfway to the CSF
    np.random.seed(4)
    polarity = []
    for _ in range(40):
        y = cord_contrast_curve(x, cord)
        assert y.mean() == pytest.approx(x.mean(), abs=1e-4) and y.std() == pytest.approx(x.std(), rel=1e-3)
        u = (y - np.percentile(y, 0.5)) / (np.percentile(y, 99.5) - np.percentile(y, 0.5))
        assert abs(u[cord].mean() - u[10:14, 24].mean()) > 0.5 * CORD_CONTRAST_GAP  # cord and CSF still apart
        assert abs(edge(profile(y)) - edge(profile(x))) <= 1
        polarity.append(np.sign(y[cord].mean() - profile(y)[10]))
    assert 10 <= polarity.count(1.0) <= 30  # the cord brighter than its CSF in about half the draws
    assert cord_contrast_curve(x, np.zeros_like(cord)) is None  # no cord in view: no curve
    flat, _ = _cord_in_csf(1.0, 1.0)
    assert cord_contrast_curve(flat, cord) is None  # nothing to tell the cord from its surround


def test_cord_contrast_runs_on_cord_samples_only_and_draws_nothing_when_off():
    x, cord = _cord_in_csf()
    batch = lambda: {"data": np.stack([x[None]] * 6).copy(), "seg": np.stack([cord[None].astype(np.int16) * 2] * 6)}  # noqa: E731
    np.random.seed(2)
    before = ContrastRemapTransform(1.0, 0.25, 0.3, 0.5)(**batch())["data"]
    np.random.seed(2)
    off = ContrastRemapTransform(1.0, 0.25, 0.3, 0.5, p_cord=0.0, cord_value=2)(**batch())["data"]
    np.testing.assert_array_equal(off, before)  # off: the stream and the samples of older plans
    np.random.seed(2)
    on = ContrastRemapTransform(0.0, 0.0, 0.0, p_cord=1.0, cord_value=2)(**batch())["data"]
    brighter = [np.sign(on[b, 0][cord].mean() - on[b, 0][24, 34:36].mean()) for b in range(6)]
    assert not np.allclose(on, x[None, None]) and len(set(brighter)) == 2
    np.random.seed(2)
    other_label = ContrastRemapTransform(0.0, 0.0, 0.0, p_cord=1.0, cord_value=1)(**batch())["data"]
    np.testing.assert_array_equal(other_label, np.stack([x[None]] * 6))  # no cord voxel of that value: untouched


def _tube_and_blob(sagittal: bool) -> tuple[np.ndarray, np.ndarray]:
    """A thin tube through every level along S-I and a bigger blob on three levels; the affine
    puts S-I on the last voxel axis (axial stack) or on the second (sagittal stack)."""
    seg = np.zeros((40, 40, 20), np.uint8)
    seg[18:21, 18:21, :] = 1  # tube: 9 voxels x 20 levels = 180
    seg[2:10, 2:10, 5:8] = 1  # blob: 64 x 3 = 192, larger
    affine = np.diag([0.5, 0.5, 3.0, 1.0])
    if sagittal:  # the same voxels, S-I along array axis 1: move the tube's axis there
        seg = np.zeros((20, 40, 40), np.uint8)
        seg[8:11, :, 18:21] = 1  # tube: 3 x 40 levels x 3 = 360
        seg[2:7, 2:12, 2:14] = 1  # blob: 5 x 10 levels x 12 = 600
        affine = np.array([[3.0, 0, 0, 0], [0, 0, 0.5, 0], [0, 0.5, 0, 0], [0, 0, 0, 1]])
    return seg, affine


@pytest.mark.parametrize("sagittal", [False, True])
def test_cord_component_is_the_tube_where_the_largest_is_the_blob(sagittal):
    seg, affine = _tube_and_blob(sagittal)
    tube = np.zeros_like(seg)
    if sagittal:
        tube[8:11, :, 18:21] = 1
        assert superior_axis(affine) == 1
    else:
        tube[18:21, 18:21, :] = 1
        assert superior_axis(affine) == 2
    assert (keep_largest_component(seg, 1) != tube).any()  # the largest component is the blob
    np.testing.assert_array_equal(keep_cord_component(seg, 1, affine), tube)


def test_of_two_long_tubes_the_cord_component_is_the_one_on_the_midline():
    """A vessel-like tube alongside, larger and as long: the cord is the one nearer the field of
    view's centre (left-right offsets count double), also when it misses an end level."""
    seg = np.zeros((80, 80, 12), np.uint8)
    seg[38:43, 46:51, 1:12] = 1  # cord: on the midline (x ~ 40 of 80), behind the centre, misses level 0
    seg[8:16, 36:44, :] = 1  # vessel: 30 voxels to the side, nearer the centre front-back, larger, every level
    affine = np.diag([0.5, 0.5, 4.0, 1.0])
    out = keep_cord_component(seg, 1, affine)
    assert out[40, 48, 5] == 1 and not out[8:16, 36:44, :].any()
    seg[60:80, 0:20, 3:5] = 1  # a wide blob: not a tube, not long
    np.testing.assert_array_equal(keep_cord_component(seg, 1, affine), out)


def _neck_centred_on_the_vertebral_body(seed: int):
    """A whole-neck axial phantom (2.5x field of view) whose network output marks the cord, the
    vertebral bodies and discs (a tube on the midline 15 mm in front of the cord, as a network that
    never saw a neck marks them) and the vessels, cropped so that the field of view is centred on
    the vertebral body, as a whole-neck scan is. Returns (output, cord, body, affine)."""
    from spineauto.datasets.phantoms import BONE, DISC, GM, VESSEL, WM, PhantomSpec, render_phantom

    p = render_phantom(PhantomSpec("T2w", "axial", "cervical", 0, seed, fov_scale=2.5))
    codes, affine = p.tissues, p.label.affine
    cord = np.isin(codes, (WM, GM))
    body = np.isin(codes, (BONE, DISC))
    centre = np.round(np.argwhere(body).mean(0)).astype(int)
    half = np.minimum(centre, np.array(codes.shape) - 1 - centre)
    crop = (slice(centre[0] - half[0], centre[0] + half[0] + 1), slice(centre[1] - half[1], centre[1] + half[1] + 1), slice(None))
    out = (cord | body | (codes == VESSEL)).astype(np.uint8)[crop]
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ np.array([crop[0].start, crop[1].start, 0]) + affine[:3, 3]
    return out, cord[crop], body[crop], shifted


@pytest.mark.parametrize("seed", range(4))  # LAS and LPS grids among them: posterior is read from the affine
def test_cord_component_is_the_tube_behind_the_vertebral_body_and_says_it_was_uncertain(seed):
    """The vertebral body / disc column is the tube nearest a whole-neck field of view's centre, on
    the midline and larger than the cord: the cord lies behind it, and the choice is flagged."""
    from spineauto.inference.postprocessing import UNCERTAIN_CORD, choose_cord_component

    out, cord, body, affine = _neck_centred_on_the_vertebral_body(seed)
    choice = choose_cord_component(out, 1, affine)
    np.testing.assert_array_equal(choice.seg == 1, cord)
    (reason,) = choice.reasons
    assert reason.startswith(f"{UNCERTAIN_CORD}: 2 tubes on the midline") and "mm behind one of" in reason
    behind = float(reason.split(" mm behind")[0].rsplit(" ", 1)[1])
    assert 12 <= behind <= 20  # the cervical body's centre: canal + cortex + half the body in front of the cord's
    plain = choose_cord_component(np.where(body, 0, out), 1, affine)
    assert plain.reasons == [] and (plain.seg == 1).sum() == cord.sum()  # the cord and the vessels alone: a clear choice


def test_cord_component_does_not_reach_past_the_spinal_canal():
    """A tube on the midline 45 mm behind the most central one (the neck muscles, past the spinous
    processes) is not the cord; one 15 mm behind is."""
    from spineauto.inference.postprocessing import CANAL_DEPTH_MM, choose_cord_component

    seg = np.zeros((60, 120, 10), np.uint8)
    seg[28:33, 58:63, :] = 1  # the most central tube: x 30, y 60 (RAS: larger y is anterior)
    seg[28:33, 13:18, :] = 1  # 45 voxels = 45 mm behind it
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    assert 45 > CANAL_DEPTH_MM
    choice = choose_cord_component(seg, 1, affine)
    assert choice.seg[30, 60, 5] == 1 and choice.seg[30, 15, 5] == 0 and choice.reasons == []
    seg[28:33, 43:48, :] = 1  # 15 mm behind: the cord behind a vertebral body
    choice = choose_cord_component(seg, 1, affine)
    assert choice.seg[30, 45, 5] == 1 and (choice.seg == 1).sum() == 250 and len(choice.reasons) == 1


@pytest.mark.parametrize("sagittal", [False, True])
def test_cord_component_read_in_chunks_of_levels_gives_the_same_mask(sagittal, monkeypatch):
    """The cross-section statistics read a few levels at a time (memory bounded by the chunk) pick the
    same component as in one read: the tube among a crowd of noise islands, S-I on either array axis."""
    from spineauto.inference import postprocessing

    seg, affine = _tube_and_blob(sagittal)
    rng = np.random.default_rng(3)
    seg = np.where(rng.random(seg.shape) < 0.08, 1, seg).astype(np.uint8)  # islands everywhere
    whole = keep_cord_component(seg, 1, affine)
    assert 0 < whole.sum() < seg.sum()
    monkeypatch.setattr(postprocessing, "CHUNK_VOXELS", 2 * seg.size // seg.shape[superior_axis(affine)])  # 2 levels a chunk
    np.testing.assert_array_equal(keep_cord_component(seg, 1, affine), whole)
    monkeypatch.setattr(postprocessing, "CHUNK_VOXELS", 1)  # one level a chunk
    np.testing.assert_array_equal(keep_cord_component(seg, 1, affine), whole)


def test_cord_component_leaves_other_labels_and_single_components_alone():
    seg, affine = _tube_and_blob(False)
    seg[30:32, 30:32, 0:2] = 2
    out = keep_cord_component(seg, 1, affine)
    assert (out == 2).sum() == 8 and (out == 1).sum() == 180
    np.testing.assert_array_equal(keep_cord_component(out, 1, affine), out)


def test_phantom_field_of_view_scale_shows_more_of_the_neck():
    base = render_phantom(PhantomSpec("T2w", "axial", "cervical", seed=7))
    wide = render_phantom(PhantomSpec("T2w", "axial", "cervical", seed=7, fov_scale=2.5))
    through = int(np.argmax(np.linalg.norm(base.image.affine[:3, :3], axis=0)))
    fov = lambda p: np.delete(np.array(p.image.shape) * np.linalg.norm(p.image.affine[:3, :3], axis=0), through)  # noqa: E731
    np.testing.assert_allclose(fov(wide), 2.5 * fov(base), rtol=0.02)
    assert (wide.tissues == 0).mean() > (base.tissues == 0).mean()  # air around the neck comes into view
    assert np.asarray(wide.label.dataobj).sum() > 0
    with pytest.raises(ValueError, match="fov_scale"):
        render_phantom(PhantomSpec("T2w", "axial", "cervical", fov_scale=9))


class BrightIsCord(torch.nn.Module):
    """Every voxel brighter than the case's mean (after the plan's z-scoring) is cord: a model that
    marks the cord and every other bright structure, as a model does on a field of view it never saw."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        logits = torch.full((x.shape[0], self.num_classes, *x.shape[2:]), -50.0)
        logits[:, 0] = 0.0
        logits[:, 1] = 10.0 * x[:, 0]
        return logits


@pytest.fixture(scope="module")
def bright_model(tmp_path_factory):
    from conftest import planned_phantoms
    from test_inference_support import make_model_folder

    from spineauto.inference.model import load_model

    env = planned_phantoms(tmp_path_factory.mktemp("localise"), n_train=3, n_test=1, seed=2)
    model = load_model(make_model_folder(env["preprocessed"] / "Dataset001_Ph", env["results"], folds=("all",)), folds=["all"])
    assert model.plan.localise is not None and model.plan.localise.label == "cord"  # planned for a dataset with a cord
    assert "median over" in model.plan.reasons["localise"]
    model.networks = [BrightIsCord(len(model.label_values))]
    return model


def _tube_scene(tmp_path, with_tube: bool = True):
    """An axial stack (S-I on the last axis): dim tissue, a bright tube through every slice and a
    bright block on four slices in a corner."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    img = 1.0 + 0.05 * rng.standard_normal((96, 96, 12))
    tube = np.zeros(img.shape, bool)
    yy, xx = np.mgrid[:96, :96]
    if with_tube:  # on slices 2-9 of 12: the box of the second pass must still span them all
        tube[((yy - 48) ** 2 + (xx - 50) ** 2) <= 25, 2:10] = True
    img[tube] = 4.0
    img[4:30, 4:30, 4:8] = 4.0
    path = tmp_path / "scene_0000.nii.gz"
    nib.save(nib.Nifti1Image(img.astype(np.float32), np.diag([0.6, 0.6, 4.0, 1.0])), str(path))
    return path, tube


@pytest.mark.parametrize("localise", ["second pass", "cord component", None])
def test_localise_then_segment_keeps_the_tube_and_segments_around_it(bright_model, tmp_path, monkeypatch, localise):
    import nibabel as nib

    from spineauto.inference.driver import predict_case
    from spineauto.inference.inputs import InputCase
    from spineauto.planning.plans import LocalisePlan

    path, tube = _tube_scene(tmp_path)
    plan = {"second pass": LocalisePlan(margin_mm=5.0, second_pass=True), "cord component": LocalisePlan(margin_mm=5.0)}.get(localise)
    monkeypatch.setattr(bright_model.plan, "localise", plan)
    boxes = []
    around = InputCase.preprocessed_around

    def spy(self, model, mask, margin_mm):
        layout, props = around(self, model, mask, margin_mm)
        boxes.append((layout.shape, int(mask.sum()), bool(mask.any(axis=(0, 1)).all())))
        return layout, props

    monkeypatch.setattr(InputCase, "preprocessed_around", spy)
    pred = predict_case(bright_model, InputCase("scene", [path]), tmp_path / "out", tta=False)
    labels = np.asarray(nib.load(str(pred.files[0])).dataobj)
    if localise is None:  # one pass: the block is cord too
        assert not boxes and labels[4:30, 4:30, 4:8].all()
        return
    if localise == "cord component":  # one pass, then the tube only
        assert not boxes and not labels[4:30, 4:30, 4:8].any()
        assert (labels == 1).sum() == pytest.approx(tube.sum(), rel=0.15)
        return
    (shape, box_mask, every_slice), = boxes
    assert box_mask == pytest.approx(tube[..., 5].sum() * 12, rel=0.15)  # the tube's cross-section, on every slice
    assert every_slice and shape[1] == 12
    assert shape[2] * shape[3] < 0.25 * (96 * 0.6 / bright_model.plan.target_spacing[0]) ** 2  # the second pass saw a box
    assert not labels[4:30, 4:30, 4:8].any()
    assert (labels == 1).sum() == pytest.approx(tube.sum(), rel=0.15) and (labels[tube] == 1).mean() > 0.9


def test_localise_on_a_scene_without_a_tube_keeps_what_the_first_pass_found(bright_model, tmp_path, monkeypatch):
    import nibabel as nib

    from spineauto.inference.driver import predict_case
    from spineauto.inference.inputs import InputCase

    path, _ = _tube_scene(tmp_path, with_tube=False)
    monkeypatch.setattr(bright_model.plan.localise, "label", "cord")
    pred = predict_case(bright_model, InputCase("scene", [path]), tmp_path / "out", tta=False)
    labels = np.asarray(nib.load(str(pred.files[0])).dataobj)
    assert labels[4:30, 4:30, 4:8].all()  # the block is the only component: localised on it, kept


def test_predict_keeps_the_tube_behind_and_writes_why_the_cord_was_uncertain(bright_model, tmp_path, monkeypatch):
    """Two bright tubes on the midline, the front one (a vertebral body) at the field of view's
    centre: predict keeps the one behind, and ``<case>.json`` says "uncertain cord" with the reason;
    a rerun on a scan with one tube removes that file."""
    import json

    import nibabel as nib

    from spineauto.inference.driver import SEGMENTATION_KIND, predict_case
    from spineauto.inference.inputs import InputCase
    from spineauto.planning.plans import LocalisePlan

    monkeypatch.setattr(bright_model.plan, "localise", LocalisePlan(margin_mm=5.0))
    rng = np.random.default_rng(1)
    img = 1.0 + 0.01 * rng.standard_normal((96, 96, 12))  # no island brighter than the mean
    xx, yy = np.mgrid[:96, :96]  # RAS grid: larger y (second axis) is anterior
    body = ((xx - 48) ** 2 + (yy - 48) ** 2) <= 64
    cord = ((xx - 48) ** 2 + (yy - 23) ** 2) <= 25  # 25 voxels = 15 mm behind the body's centre
    img[body] = img[cord] = 4.0
    path = tmp_path / "scene_0000.nii.gz"
    nib.save(nib.Nifti1Image(img.astype(np.float32), np.diag([0.6, 0.6, 4.0, 1.0])), str(path))
    out = tmp_path / "out"
    pred = predict_case(bright_model, InputCase("scene", [path]), out, tta=False)
    labels = np.asarray(nib.load(str(pred.files[0])).dataobj)
    assert labels[48, 23].all() and not labels[48, 48].any()
    record = json.loads((out / "scene.json").read_text())
    assert record["kind"] == SEGMENTATION_KIND and record["mask"] == "scene.nii.gz"
    (reason,) = record["qc"]
    assert reason.startswith("uncertain cord: 2 tubes on the midline") and " 15 mm behind" in reason
    img[body] = 1.0
    nib.save(nib.Nifti1Image(img.astype(np.float32), np.diag([0.6, 0.6, 4.0, 1.0])), str(path))
    pred = predict_case(bright_model, InputCase("scene", [path]), out, tta=False)
    assert pred.qc == [] and not (out / "scene.json").exists()


def test_find_best_postprocessing_chooses_the_cord_component_where_the_largest_is_a_blob(tmp_path):
    from spineauto.evaluation.best_configuration import decide_postprocessing
    from spineauto.inference.postprocessing import apply_postprocessing, load_postprocessing
    from spineauto.io.atomic import write_json

    seg, affine = _tube_and_blob(False)
    ref = np.zeros_like(seg)
    ref[18:21, 18:21, :] = 1
    pp = decide_postprocessing({"a": seg}, {"a": ref}, {"background": 0, "cord": 1}, {"a": affine})
    assert pp["cord_component_labels"] == [1] and pp["largest_component_labels"] == []
    assert pp["per_label"]["cord"]["dice_cord_component"] == 1.0 > pp["per_label"]["cord"]["dice_largest_component"]
    without_affines = decide_postprocessing({"a": seg}, {"a": ref}, {"background": 0, "cord": 1})
    assert without_affines["cord_component_labels"] == [] and without_affines["largest_component_labels"] == []  # the blob: worse
    write_json(tmp_path / "postprocessing.json", pp)
    loaded = load_postprocessing(tmp_path / "postprocessing.json", [0, 1])
    np.testing.assert_array_equal(apply_postprocessing(seg, loaded, affine), ref)
    with pytest.raises(ValueError, match="affine"):
        apply_postprocessing(seg, loaded)
    write_json(tmp_path / "bad.json", {"largest_component_labels": [], "cord_component_labels": [3]})
    with pytest.raises(Exception, match="not labels of the model"):
        load_postprocessing(tmp_path / "bad.json", [0, 1])


def test_the_benchmarks_one_pass_model_has_no_localise_plan_in_any_fold(bright_model, tmp_path):
    """bench_generalisation's raw output ("one pass") comes from a copy of the model without its localise
    plan; each fold predicts with the plan of its own run_config.yaml, so the copy must clear it there too
    (it did not: the "raw" rows were the cord component's)."""
    import shutil
    import sys
    from pathlib import Path

    from spineauto.inference.model import load_model
    from spineauto.training.run_config import write_run_config

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_generalisation import one_pass_model

    run_dir = tmp_path / "run"
    folder = run_dir / "sa_results" / "Dataset001_Ph" / "spineautoTrainer__spineautoPlans__2d"
    shutil.copytree(bright_model.folder, folder)
    write_run_config(folder / "fold_all", bright_model.plan, {"dataset": "Dataset001_Ph"}, {})
    assert load_model(folder, folds=["all"]).plan.localise is not None
    assert load_model(one_pass_model(run_dir), folds=["all"], configuration="2d").plan.localise is None
