"""The cord choice weighs what the network said beyond its mask: the cord probability (a fainter tube
behind the cord is passed over, every rival's probability mass is named) and, with test-time
augmentation, whether each mirrored pass alone puts the cord on the kept tube. The predictor hands
both over from its one pass, kept as uint8."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spineauto.inference.postprocessing import CONFIDENCE_MARGIN, UNCERTAIN_CORD, CordEvidence, choose_cord_component
from test_inference_support import softmax_of_mean_log

AFFINE = np.diag([1.0, 1.0, 3.0, 1.0])  # RAS: larger y (second axis) is anterior; S-I on the last axis


def _two_midline_tubes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A mask with two tubes on the midline: ``front`` at the field of view's centre and ``back`` 15 mm
    behind it (where the cord lies behind a vertebral body)."""
    seg = np.zeros((60, 80, 10), np.uint8)
    front = np.zeros(seg.shape, bool)
    back = np.zeros(seg.shape, bool)
    front[27:34, 37:44, :] = True  # 49 voxels a level, centre (30, 40)
    back[28:33, 23:28, :] = True  # 25 voxels a level, centre (30, 25): 15 mm behind
    seg[front | back] = 1
    return seg, front, back


def _probability(**where: tuple[np.ndarray, float]) -> np.ndarray:
    p = np.zeros((60, 80, 10), np.uint8)
    for mask, value in where.values():
        p[mask] = round(value * 255)
    return p


def test_a_fainter_tube_behind_is_passed_over_where_the_mask_alone_keeps_it():
    """Mask only: the most posterior tube. With probabilities, the tube behind is far fainter (mean 0.55
    against 0.95, more than CONFIDENCE_MARGIN apart): the confident one is kept and the reason names both."""
    seg, front, back = _two_midline_tubes()
    mask_only = choose_cord_component(seg, 1, AFFINE)
    assert (mask_only.seg == 1).sum() == back.sum() and mask_only.seg[back].all()
    faint = CordEvidence(1, _probability(front=(front, 0.95), back=(back, 0.55)))
    assert 0.95 - 0.55 > CONFIDENCE_MARGIN
    choice = choose_cord_component(seg, 1, AFFINE, faint)
    assert (choice.seg == 1).sum() == front.sum() and choice.seg[front].all()
    (reason,) = choice.reasons
    assert reason.startswith(f"{UNCERTAIN_CORD}: 2 tubes on the midline; kept one (490 voxels on 10 levels, cord probability mass 465, "
                             "mean 0.95) 15 mm in front of a fainter one (250 voxels on 10 levels, cord probability mass 137, mean 0.55")
    probs = np.zeros((3, *seg.shape), np.float32)  # an ensemble's averaged probabilities: channel k is label k
    probs[1] = faint.probability / 255.0
    probs[0] = 1 - probs[1]
    averaged = CordEvidence.from_probabilities(probs, 1)
    assert averaged.probability.dtype == np.uint8 and averaged.passes is None
    np.testing.assert_array_equal(choose_cord_component(seg, 1, AFFINE, averaged).seg, choice.seg)


def test_tubes_about_as_confident_keep_the_anatomy_and_name_each_ones_probability_mass():
    seg, front, back = _two_midline_tubes()
    choice = choose_cord_component(seg, 1, AFFINE, CordEvidence(1, _probability(front=(front, 0.8), back=(back, 0.9))))
    assert (choice.seg == 1).sum() == back.sum()
    (reason,) = choice.reasons
    assert reason == (f"{UNCERTAIN_CORD}: 2 tubes on the midline; kept the most posterior (250 voxels on 10 levels, cord probability "
                      "mass 225, mean 0.90), 15 mm behind one of 490 voxels on 10 levels, cord probability mass 392, mean 0.80 "
                      "(the cord lies behind the vertebral bodies)")
    other = CordEvidence(2, _probability(front=(front, 0.95), back=(back, 0.5)))  # about another label: not used
    assert choose_cord_component(seg, 1, AFFINE, other).reasons == choose_cord_component(seg, 1, AFFINE).reasons


def _passes(*masks: np.ndarray) -> np.ndarray:
    bits = np.zeros(masks[0].shape, np.uint8)
    for i, m in enumerate(masks):
        bits[m] |= np.uint8(1 << i)
    return bits


NAMES = ["the unmirrored pass", "the pass mirrored on in-plane axis 0", "the pass mirrored on in-plane axis 1",
         "the pass mirrored on in-plane axis 0 and 1"]


def test_passes_that_agree_say_nothing_and_passes_that_put_the_cord_elsewhere_are_named():
    """The averaged mask holds one tube: the choice is clear by itself. Four passes each marking it
    (one with a stray island too, one only a piece of it, drawn wider) agree; a pass whose own mask is a tube 20 mm to the side, and one
    that marks nothing, are each an "uncertain cord" reason with the figures."""
    seg = np.zeros((60, 80, 10), np.uint8)
    cord = np.zeros(seg.shape, bool)
    cord[28:33, 38:43, :] = True
    seg[cord] = 1
    side = np.zeros(seg.shape, bool)
    side[8:13, 38:43, 1:9] = True  # 20 mm to the (RAS) left, its own pass's only tube
    island = np.zeros(seg.shape, bool)
    island[50:52, 70:72, 4] = True
    shifted = np.zeros(seg.shape, bool)
    shifted[30:37, 38:43, 2:5] = True  # a piece of the tube, drawn wider: 105 voxels, 45 of them on the kept one
    prob = _probability(cord=(cord, 0.9))
    agree = CordEvidence(1, prob, _passes(cord, cord | island, shifted, cord), NAMES)
    assert choose_cord_component(seg, 1, AFFINE, agree).reasons == []
    nothing = np.zeros(seg.shape, bool)
    disagree = CordEvidence(1, prob, _passes(cord, side, cord | island, nothing), NAMES)
    choice = choose_cord_component(seg, 1, AFFINE, disagree)
    np.testing.assert_array_equal(choice.seg, seg)  # the kept tube does not change: the doubt is recorded
    assert choice.reasons == [
        f"{UNCERTAIN_CORD}: the pass mirrored on in-plane axis 0 puts the cord on another tube (200 voxels on 8 levels; 0% on the "
        "kept one, its centre 20 mm to the side and 0 mm behind the kept one's; 4 passes)",
        f"{UNCERTAIN_CORD}: the pass mirrored on in-plane axis 0 and 1 marks no cord (of 4 passes)"]
    without_tta = CordEvidence(1, prob)  # one pass: nothing to agree on, nothing said
    assert choose_cord_component(seg, 1, AFFINE, without_tta).reasons == []


def test_a_pass_whose_own_choice_is_the_other_midline_tube_disagrees():
    """Two tubes on the midline in the averaged mask; one pass marks only the front one: its own choice
    is the front tube, 15 mm in front of the kept one."""
    seg, front, back = _two_midline_tubes()
    prob = _probability(front=(front, 0.8), back=(back, 0.85))
    evidence = CordEvidence(1, prob, _passes(front | back, front, back), NAMES[:3])
    choice = choose_cord_component(seg, 1, AFFINE, evidence)
    assert choice.seg[back].all() and not choice.seg[front].any()
    assert len(choice.reasons) == 2 and choice.reasons[0].startswith(f"{UNCERTAIN_CORD}: 2 tubes on the midline")
    assert choice.reasons[1] == (f"{UNCERTAIN_CORD}: the pass mirrored on in-plane axis 0 puts the cord on another tube (490 voxels on "
                                 "10 levels; 0% on the kept one, its centre 0 mm to the side and 15 mm in front of the kept one's; 3 passes)")


def test_checking_four_passes_adds_little_memory_to_the_choice():
    """The passes' own choices run one at a time, after the kept tube's component map is let go: checking
    four passes costs at most 2 bytes a voxel more at the peak than the choice alone (numpy's allocations)."""
    import tracemalloc

    shape = (256, 256, 48)
    seg = np.zeros(shape, np.uint8)
    seg[120:130, 120:130, :] = seg[120:130, 150:160, :] = 1  # two tubes on the midline, 15 mm apart
    seg[np.random.default_rng(0).random(shape) < 0.01] = 1  # islands
    affine = np.diag([0.5, 0.5, 3.0, 1.0])
    peaks = []
    for passes in (None, np.where(seg == 1, np.uint8(15), np.uint8(0))):
        evidence = CordEvidence(1, (seg * 200).astype(np.uint8), passes, NAMES if passes is not None else [])
        tracemalloc.start()
        choice = choose_cord_component(seg, 1, affine, evidence)
        peaks.append(tracemalloc.get_traced_memory()[1] / seg.size)
        tracemalloc.stop()
        assert len(choice.reasons) == 1  # the two tubes; the passes all agree
    assert peaks[0] < 8 and peaks[1] < peaks[0] + 2, peaks


# ------------------------------------------------------------------------------------------ predictor and restore

@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    from conftest import planned_phantoms
    from test_inference_support import make_model_folder

    from spineauto.inference.model import load_model

    env = planned_phantoms(tmp_path_factory.mktemp("cord_choice"), n_train=3, n_test=1, seed=4)
    folder = make_model_folder(env["preprocessed"] / "Dataset001_Ph", env["results"], folds=("all",))
    return env, load_model(folder, folds=["all"], device=torch.device("cpu"))


def test_each_pass_is_handed_over_as_its_own_mirrored_prediction_slab_by_slab(planned, monkeypatch):
    """``pass_sink`` gets, per slab, the cord channel of every pass (unmirrored first, then the mirror
    combinations) as that mirrored input alone predicts it; the averaged prediction is
    the softmax of their mean logits.
    Without test-time augmentation nothing is handed over."""
    from spineauto.inference import predictor

    env, model = planned
    plan = model.plan
    data = np.load(env["preprocessed"] / "Dataset001_Ph" / "2d" / "phantom_000.npy")[:, :5]
    cpu = torch.device("cpu")
    h, w = (max(s, p) for s, p in zip(data.shape[2:], plan.patch_size))
    monkeypatch.setattr(predictor, "SLAB_PIXELS", 2 * h * w)  # slabs of 2, 2 and 1 slices
    got, slabs = [], []
    out = predictor.run_networks(model.networks, data, plan, cpu, tta=True, pass_channel=1,
                                 pass_sink=lambda first, p: got.append((first, p.clone())))
    assert [(first, p.shape[:2]) for first, p in got] == [(0, (4, 2)), (2, (4, 2)), (4, (4, 1))]
    passes = torch.cat([p for _, p in got], 1).numpy()
    assert passes.dtype == np.float32 and passes.shape == (4, *data.shape[1:])
    alone = []
    for m, dims in enumerate([()] + predictor.mirror_combinations(plan.augmentation.mirror_axes)):
        flipped = np.flip(data, axis=dims).copy() if dims else data  # (C, S, H, W): the batch's dims 2, 3 are H, W here too
        p = predictor.predict_layout(model.networks, flipped, plan, cpu, tta=False)
        alone.append(np.flip(p, axis=dims) if dims else p)  # (K, S, H, W): H, W are dims 2, 3 too
        np.testing.assert_allclose(passes[m], alone[m][1], atol=1e-5)
    # the averaged prediction is the softmax of the passes' mean logits (= of their mean log-probability)
    np.testing.assert_allclose(softmax_of_mean_log(alone)[1], out.seg[1].numpy(), atol=1e-5)
    assert np.abs(passes[0] - passes[1]).max() > 1e-3  # a random network: the passes differ
    predictor.run_networks(model.networks, data, plan, cpu, tta=False, pass_channel=1, pass_sink=lambda *a: slabs.append(a))
    assert slabs == []


def test_restoration_keeps_the_cord_probability_and_one_bit_per_pass_as_uint8(planned):
    """Per pass, bit i of the restored pass map is that pass's probability restored alone and >= 0.5;
    the cord probability is the averaged one x 255; nothing but uint8 volumes is kept."""
    from spineauto.inference.restore import Restoration, restore_labels

    env, model = planned
    props = json.loads((env["preprocessed"] / "Dataset001_Ph" / "2d" / "phantom_000.json").read_text())
    k, shape = len(model.label_values), props["cropped_shape"]
    rng = np.random.default_rng(0)
    passes = torch.from_numpy(rng.random((4, *shape)).astype(np.float32))
    probs = torch.zeros((k, *shape))
    probs[1] = passes.mean(0)
    probs[0] = 1 - probs[1]
    restoration = Restoration(props, cord_label=1, pass_names=NAMES)
    restoration.add(0, probs)
    restoration.add_passes(0, passes)
    kept = [v for v in vars(restoration).values() if isinstance(v, np.ndarray)]
    assert kept and all(v.dtype == np.uint8 for v in kept)  # no float copy of a pass or of the probabilities
    evidence = restoration.cord_evidence()
    assert evidence.probability.dtype == np.uint8 and evidence.passes.dtype == np.uint8 and evidence.pass_names == NAMES
    labels = restoration.labels()
    assert evidence.passes.shape == evidence.probability.shape == labels.shape
    for i in range(4):
        alone = restore_labels(torch.stack([1 - passes[i], passes[i]]), props)  # argmax of two = p >= 0.5, ties aside
        agree = ((evidence.passes >> i) & 1) == alone
        assert agree.mean() > 0.999 and 0.2 < alone.mean() < 0.8
    cord = labels == 1
    assert np.abs(evidence.probability[cord].astype(int) - 191).max() <= 64  # argmax cord: p in [0.5, 1]
    assert evidence.probability[~cord].max() <= 128
    with pytest.raises(ValueError, match="passes"):
        Restoration(props, cord_label=1).add_passes(0, passes[:1])


@pytest.mark.parametrize("tta", [True, False])
def test_predict_hands_the_cord_choice_the_probability_and_with_tta_each_pass(planned, tmp_path, monkeypatch, tta):
    import nibabel as nib

    from spineauto.inference import driver
    from spineauto.inference.inputs import InputCase
    from spineauto.planning.plans import LocalisePlan

    env, model = planned
    monkeypatch.setattr(model.plan, "localise", LocalisePlan(margin_mm=5.0))
    seen = []
    choose = driver.choose_cord_component

    def spy(seg, label, affine, evidence=None):
        seen.append(evidence)
        return choose(seg, label, affine, evidence)

    monkeypatch.setattr(driver, "choose_cord_component", spy)
    img = next((env["raw"] / "Dataset001_Ph" / "imagesTs").glob("*_0000.nii.gz"))
    pred = driver.predict_case(model, InputCase("case", [img]), tmp_path, tta=tta)
    (evidence,) = seen
    assert evidence.label == 1 and evidence.probability.dtype == np.uint8
    assert evidence.probability.shape == nib.load(str(img)).shape[:3]
    if tta:
        assert evidence.passes.dtype == np.uint8 and len(evidence.pass_names) == 4
        assert evidence.passes.max() > 0
    else:
        assert evidence.passes is None and evidence.pass_names == []
        assert not any("pass" in r for r in pred.qc)
