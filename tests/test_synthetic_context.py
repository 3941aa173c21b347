"""Whole-neck context (training/synthetic.py): phantom label maps, tissues at random intensities,
mixed into training batches of a cord configuration."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    from conftest import planned_phantoms

    return planned_phantoms(tmp_path_factory.mktemp("neck"), n_train=3, n_test=0, seed=4)["preprocessed"] / "Dataset001_Ph"


@pytest.fixture(scope="module")
def cord_plans(planned):
    from spineauto.planning.plans import Plans

    return Plans.load(planned / "plans.json")


@pytest.fixture
def context(cord_plans, monkeypatch):
    from spineauto.training import synthetic

    monkeypatch.setattr(synthetic, "POOL", 2)  # two whole-neck maps: a fast test
    plan = cord_plans.configurations["2d"]
    plan = dataclasses.replace(plan, augmentation=dataclasses.replace(plan.augmentation, whole_neck=0.5))
    ctx = synthetic.neck_context(cord_plans, plan)
    assert ctx is not None and ctx.cord_value == cord_plans.labels["cord"]
    return ctx


def test_whole_neck_context_planned_for_a_cord_configuration_and_off_for_older_plans(cord_plans, tmp_path):
    from spineauto.planning.planner import WHOLE_NECK_SHARE
    from spineauto.planning.plans import Plans
    from spineauto.training.synthetic import neck_context

    plan = cord_plans.configurations["2d"]
    assert plan.augmentation.whole_neck == WHOLE_NECK_SHARE > 0 and "whole-neck phantom" in plan.reasons["whole_neck"]
    assert neck_context(cord_plans, plan).share == WHOLE_NECK_SHARE
    assert neck_context(cord_plans, dataclasses.replace(plan, localise=None)) is None  # no cord label to draw
    older = cord_plans.to_dict()  # planned before the field existed: trains (and resumes) without it
    del older["configurations"]["2d"]["augmentation"]["whole_neck"]
    (tmp_path / "plans.json").write_text(__import__("json").dumps(older))
    old = Plans.load(tmp_path / "plans.json")
    assert old.configurations["2d"].augmentation.whole_neck == 0.0
    assert neck_context(old, old.configurations["2d"]) is None
    assert plan.augmentation.composite == 0.0  # composites: an option, off in the plan
    del older["configurations"]["2d"]["augmentation"]["composite"]  # planned before composites: none drawn
    (tmp_path / "plans.json").write_text(__import__("json").dumps(older))
    old = Plans.load(tmp_path / "plans.json").configurations["2d"]
    assert old.augmentation.composite == 0.0
    old = dataclasses.replace(old, augmentation=dataclasses.replace(old.augmentation, whole_neck=0.25))
    assert neck_context(cord_plans, old, object(), ["case"]).crops is None


def test_whole_neck_patches_label_the_cord_only_and_never_the_same_contrast_twice(context):
    """The label is the cord's value on the phantom cord and 0 elsewhere (vertebral body, vessels, the
    extra tubes); cord-centred patches hold the cord; each patch is z-scored; tissue intensities are
    drawn anew, so the cord is brighter than its surroundings in some patches and darker in others."""
    from spineauto.datasets.phantoms import CSF

    rng = np.random.default_rng(0)
    brighter = []
    for i in range(24):
        img, lab = context.patch(rng, [64, 64], on_cord=i % 2 == 0)
        assert img.shape == lab.shape == (1, 64, 64) and img.dtype == np.float32
        assert set(np.unique(lab)) <= {0, context.cord_value}
        if i % 2 == 0:
            cord = lab[0] == context.cord_value
            assert cord.sum() > 20
            ring = np.logical_xor(cord, np.pad(cord, 3)[6:, 3:-3] | np.pad(cord, 3)[:-6, 3:-3])
            brighter.append(img[0][cord].mean() > img[0][ring & ~cord].mean())
    assert 0 < sum(brighter) < len(brighter)
    maps = context.maps()
    assert len(maps) == 2 and all(m.ndim == 3 and (m == CSF).any() for m in maps)
    for k, m in enumerate(maps):  # extra tubes never touch the canal, and add structures to the slice
        tubed = context._with_tubes(m[m.shape[0] // 2], np.random.default_rng(k))
        assert (tubed[np.isin(m[m.shape[0] // 2], (CSF,))] == CSF).all()


def test_whole_neck_share_of_training_batches_and_none_of_validation(context):
    """Training batches: about ``share`` of the samples replaced, the same for the same key; validation
    batches come from the real cases only."""
    from spineauto.training.data import TRAIN, VAL, KeyedBatches

    class Zeros:  # a sampler of real patches: every pixel 7, label 0
        oversample = 0.5

        def sample(self, cases, batch_size, rng, size):
            return {"data": np.full((batch_size, 1, *size), 7.0, np.float32), "seg": np.zeros((batch_size, 1, *size), np.int16),
                    "keys": cases[:1] * batch_size}

    batches = KeyedBatches(Zeros(), lambda **b: b, ["a"], ["b"], 8, [48, 48], [48, 48], seed=0, rank=0, context=context)
    replaced = []
    for i in range(12):
        b = batches[(TRAIN, 0, i)]
        synthetic = (b["data"] != 7).flatten(1).any(1).numpy()
        replaced += list(synthetic)
        assert (b["seg"][~synthetic] == 0).all()
        assert (b["seg"][4:][synthetic[4:]] == context.cord_value).flatten(1).any(1).all()  # oversampled half: the cord in view
        np.testing.assert_array_equal(batches[(TRAIN, 0, i)]["data"].numpy(), b["data"].numpy())
    assert 0.3 < np.mean(replaced) < 0.7
    assert (batches[(VAL, 0, 0)]["data"] == 7).all()


@pytest.fixture
def composites(planned, cord_plans, context):
    """The context with every whole-neck sample a composite, real crops from the fixture's preprocessed phantoms."""
    from spineauto.training.data import CaseStore
    from spineauto.training.synthetic import neck_context

    store = CaseStore.load(planned / context.plan.data_identifier)
    plan = dataclasses.replace(context.plan, augmentation=dataclasses.replace(context.plan.augmentation, composite=1.0))
    ctx = neck_context(cord_plans, plan, store, sorted(store.props))
    ctx._maps, ctx._cord = context.maps(), context._cord  # the two maps already drawn
    return ctx


def test_composite_pastes_the_real_crop_and_labels_its_cord_only(composites):
    """A composite slice: inside the pasted disc the image is the real crop's (exactly where the blend
    weight is 1, a mix of it and the phantom on the feather) and the label is the real crop's cord;
    outside the disc the label is background, the phantom's own cord included (it became CSF)."""
    from spineauto.training.synthetic import FEATHER_MM, _shifted

    store, cord_value = composites.crops.store, composites.cord_value
    rng = np.random.default_rng(3)
    made = [c for c in (composites.composite_slice(rng) for _ in range(12)) if c is not None]
    assert len(made) >= 8
    for c in made:
        (case, s), (oy, ox) = c.source, c.offset
        real = _shifted(np.asarray(store.data(case)[0, s]), oy, ox, c.image.shape)
        cord = _shifted(np.asarray(store.seg(case)[0, s]) == cord_value, oy, ox, c.image.shape)
        full, feather = c.weight == 1, (c.weight > 0) & (c.weight < 1)
        assert full.sum() > 50 and feather.any()
        np.testing.assert_allclose(c.image[full], real[full], rtol=1e-6)
        assert not np.allclose(c.image[feather], real[feather])  # blended there
        assert cord.sum() > 10 and (c.label == cord_value).sum() == cord.sum() and full[cord].all()  # the whole real cord
        assert (c.label[c.weight < 0.5] == 0).all() and set(np.unique(c.label)) == {0, cord_value}
        ring = np.hypot(*np.nonzero(feather)[::-1] - np.array(c.centre)[::-1, None])  # the feather is FEATHER_MM wide
        assert ring.max() - ring.min() <= FEATHER_MM / composites.plan.target_spacing[0] + 1.5


def test_composites_in_batches_hold_the_real_cord_and_setting_zero_changes_nothing(cord_plans, context, composites):
    """``composite`` 0 (older plans, the default) draws nothing more than the whole-neck patches did: each
    batch is the one replayed from the same generator with :meth:`patch` alone; with 1, every replaced
    sample holds the cord in view and the batches change."""
    from spineauto.training.synthetic import neck_context

    def batch():
        return {"data": np.full((8, 1, 48, 48), 7.0, np.float32), "seg": np.zeros((8, 1, 48, 48), np.int16)}

    off = neck_context(cord_plans, context.plan, composites.crops.store, composites.crops.cases)  # composite: 0
    assert off.composite == 0 and off.crops is None
    off._maps, off._cord = context._maps, context._cord
    changed = 0
    for key in range(4):
        zero, on = off.mix(batch(), np.random.default_rng(key), 2), composites.mix(batch(), np.random.default_rng(key), 2)
        rng, replay = np.random.default_rng(key), batch()
        for i in range(8):
            if rng.uniform() < context.share:
                replay["data"][i], replay["seg"][i] = context.patch(rng, [48, 48], on_cord=i >= 6)
        np.testing.assert_array_equal(zero["data"], replay["data"])
        np.testing.assert_array_equal(zero["seg"], replay["seg"])
        replaced = (on["data"] != 7).reshape(8, -1).any(1)
        assert ((on["seg"][replaced] == composites.cord_value).reshape(replaced.sum(), -1).any(1)).all()
        changed += not np.array_equal(zero["data"], on["data"])
    assert changed == 4
