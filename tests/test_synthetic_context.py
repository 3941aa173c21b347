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


def test_plans_and_run_configs_written_with_composites_load_and_draw_the_same_batches(cord_plans, context, tmp_path, caplog):
    """``augmentation.composite`` (real crops in whole-neck phantoms) was taken out: a plans.json that still
    carries it loads as the plan it was (a warning when it was on), and its whole-neck context mixes exactly
    the batches of composite 0 before, :meth:`patch` alone replayed from the same generator; a fold's
    run_config.yaml that carries it still gives the fold its own plan, and ``--config`` takes it back."""
    import json

    import yaml

    from spineauto.inference.model import fold_plan
    from spineauto.planning.plans import Plans
    from spineauto.schema import to_dict
    from spineauto.training.run_config import RunSpec, read_overrides, write_run_config
    from spineauto.training.synthetic import neck_context

    older = cord_plans.to_dict()
    older["configurations"]["2d"]["augmentation"]["whole_neck"] = context.share
    for value, warned in ((0.0, False), (0.5, True)):
        older["configurations"]["2d"]["augmentation"]["composite"] = value
        (tmp_path / "plans.json").write_text(json.dumps(older))
        caplog.clear()
        old = Plans.load(tmp_path / "plans.json")
        assert ("augmentation.composite" in caplog.text) == warned
        assert to_dict(old.configurations["2d"]) == to_dict(context.plan)
    ctx = neck_context(old, old.configurations["2d"])
    ctx._maps, ctx._cord = context.maps(), context._cord  # the two maps already drawn

    def batch():
        return {"data": np.full((8, 1, 48, 48), 7.0, np.float32), "seg": np.zeros((8, 1, 48, 48), np.int16)}

    replaced = 0
    for key in range(4):
        mixed, rng, replay = ctx.mix(batch(), np.random.default_rng(key), 2), np.random.default_rng(key), batch()
        for i in range(8):
            if rng.uniform() < context.share:
                replay["data"][i], replay["seg"][i] = context.patch(rng, [48, 48], on_cord=i >= 6)
        np.testing.assert_array_equal(mixed["data"], replay["data"])
        np.testing.assert_array_equal(mixed["seg"], replay["seg"])
        replaced += int((mixed["data"] != 7).reshape(8, -1).any(1).sum())
    assert replaced > 4

    own = dataclasses.replace(context.plan, optim=dataclasses.replace(context.plan.optim, initial_lr=0.0042))
    path = write_run_config(tmp_path, own, {"seed": 0}, {})
    written = yaml.safe_load(path.read_text())
    written["configuration"]["augmentation"]["composite"] = 0.5  # as a fold trained with composites wrote it
    path.write_text(yaml.safe_dump(written))
    caplog.clear()
    assert fold_plan(tmp_path, context.plan).optim.initial_lr == 0.0042 and "unreadable" not in caplog.text
    overrides, _, _ = read_overrides(RunSpec(config=path), "2d")
    assert "composite" not in overrides["augmentation"] and overrides["optim"]["initial_lr"] == 0.0042


def test_vertebral_cortex_rings_each_body_with_a_tissue_of_its_own_and_is_off_by_default(cord_plans, context):
    """``augmentation.vertebral_cortex``: the outer shell of every vertebral body becomes a new tissue with its
    own intensity (the body's interior stays bone, nothing else changes, the label is untouched); off, a patch
    is drawn exactly as before (same generator stream); older plans load with it off; 1.5 is refused."""
    import json

    from scipy import ndimage

    from spineauto.datasets.phantoms import BONE
    from spineauto.errors import SpineautoError
    from spineauto.planning.plans import Plans
    from spineauto.training.synthetic import CORTEX_MM, neck_context

    plan = cord_plans.configurations["2d"]
    assert plan.augmentation.vertebral_cortex == 0 and context.cortex == 0  # an option, off in the plan
    m = context.maps()[0]
    plane = next(m[s] for s in range(m.shape[0]) if (m[s] == BONE).sum() > 200)
    bone = plane == BONE
    mean, texture = np.linspace(0, 1, 30), np.full(30, 0.01)
    out, mean2, texture2 = context._with_cortex(plane, mean, texture, np.random.default_rng(0))
    shell = out == 30
    assert len(mean2) == len(texture2) == 31 and (mean2[:30] == mean).all()
    assert (bone & ~ndimage.binary_erosion(bone) <= shell).all() and (plane[shell] == BONE).all()  # the border, in bone
    assert (out == BONE).any() and (out[~shell] == plane[~shell]).all()  # an interior left, the rest unchanged
    depth = ndimage.distance_transform_edt(bone)[shell].max() * plan.target_spacing[0]
    assert depth <= CORTEX_MM[1] + plan.target_spacing[0]

    ringed = dataclasses.replace(context, cortex=1.0)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    np.testing.assert_array_equal(context.patch(rng_a, [64, 64], True)[0], dataclasses.replace(context, cortex=0.0).patch(rng_b, [64, 64], True)[0])
    a, b = ringed.patch(np.random.default_rng(5), [64, 64], True), context.patch(np.random.default_rng(5), [64, 64], True)
    np.testing.assert_array_equal(a[1], b[1])  # the same label: the cortex is background
    on = dataclasses.replace(plan, augmentation=dataclasses.replace(plan.augmentation, vertebral_cortex=0.5))
    assert neck_context(cord_plans, on).cortex == 0.5
    older = cord_plans.to_dict()
    del older["configurations"]["2d"]["augmentation"]["vertebral_cortex"]
    assert Plans.from_dict(json.loads(json.dumps(older))).configurations["2d"].augmentation.vertebral_cortex == 0.0
    older["configurations"]["2d"]["augmentation"]["vertebral_cortex"] = 1.5
    with pytest.raises(SpineautoError, match="augmentation.vertebral_cortex"):
        Plans.from_dict(older)
