"""Whole-neck context (training/synthetic.py): phantom label maps, tissues at random intensities,
mixed into training batches of a cord configuration."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest


@pytest.fixture(scope="module")
def cord_plans(tmp_path_factory):
    from conftest import planned_phantoms

    from spineauto.planning.plans import Plans

    env = planned_phantoms(tmp_path_factory.mktemp("neck"), n_train=3, n_test=0, seed=4)
    return Plans.load(env["preprocessed"] / "Dataset001_Ph" / "plans.json")


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
