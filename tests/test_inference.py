"""spineauto predict / ensemble on phantoms and real scans: geometry, TTA, fold ensembling, an oracle
model that proves the restore path exact, DICOM input, a self-contained model folder, bad input."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import planned_phantoms, require_real_data, run_cli
from spineauto.errors import SpineautoError
from test_inference_support import OracleNet, dice, make_model_folder, softmax_of_mean_log

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A phantom dataset, planned and preprocessed, with a 2-fold model folder of small random networks."""
    env = planned_phantoms(tmp_path_factory.mktemp("inference"), n_train=4, n_test=2, seed=0)
    model = make_model_folder(env["preprocessed"] / "Dataset001_Ph", env["results"], folds=(0, 1))
    return env, model


@pytest.fixture
def env(planned, monkeypatch):
    env, model = planned
    for k, p in env.items():
        monkeypatch.setenv(f"SPINEAUTO_{k.upper()}", str(p))
    return env


def _reoriented(src: Path, codes: str, target: Path) -> nib.Nifti1Image:
    img = nib.load(str(src))
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine), nib.orientations.axcodes2ornt(tuple(codes)))
    out = img.as_reoriented(ornt)
    out = nib.Nifti1Image(np.asarray(out.dataobj), out.affine, out.header)
    out.set_qform(out.affine, 1)
    nib.save(out, str(target))
    return nib.load(str(target))


def _assert_same_geometry(inp: Path, mask: Path) -> np.ndarray:
    a, b = nib.load(str(inp)), nib.load(str(mask))
    assert b.shape == a.shape
    np.testing.assert_array_equal(b.affine, a.affine)
    assert nib.aff2axcodes(b.affine) == nib.aff2axcodes(a.affine)
    for key in ("qform_code", "sform_code"):
        assert int(b.header[key]) == int(a.header[key])
    np.testing.assert_array_equal(b.header.get_qform(), a.header.get_qform())
    assert b.get_data_dtype() == np.uint8
    return np.asarray(b.dataobj)


def test_geometry_round_trip_sagittal_and_axial(env, capsys, tmp_path):
    src = env["raw"] / "Dataset001_Ph" / "imagesTs"
    inp = tmp_path / "in"
    inp.mkdir()
    cases = sorted(src.glob("*_0000.nii.gz"))
    _reoriented(cases[0], "PSR", inp / "sag_0000.nii.gz")
    _reoriented(cases[1], "LAS", inp / "ax_0000.nii.gz")
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", inp, "-o", tmp_path / "out", "--no-tta", "--device", "cpu", "-f", "0")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ax.nii.gz", "sag.nii.gz"]
    for name in ("sag", "ax"):
        labels = _assert_same_geometry(inp / f"{name}_0000.nii.gz", tmp_path / "out" / f"{name}.nii.gz")
        assert set(np.unique(labels)) <= {0, 1, 2}


def test_real_scans_keep_their_geometry(env, capsys, tmp_path):
    data = require_real_data()
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(data / "t2" / "t2.nii.gz", inp / "t2.nii.gz")  # PSR, int16
    shutil.copy(data / "t2s" / "t2s.nii.gz", inp / "t2s.nii.gz")  # LAS, 7.5 mm slices
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", inp, "-o", tmp_path / "out", "--no-tta", "--device", "cpu", "-f", "0")
    assert code == 0, err
    assert nib.aff2axcodes(nib.load(str(inp / "t2.nii.gz")).affine) == ("P", "S", "R")
    assert nib.aff2axcodes(nib.load(str(inp / "t2s.nii.gz")).affine) == ("L", "A", "S")
    for name in ("t2", "t2s"):
        _assert_same_geometry(inp / f"{name}.nii.gz", tmp_path / "out" / f"{name}.nii.gz")
    import SimpleITK as sitk  # a viewer's geometry (ITK, LPS) matches too

    for name in ("t2", "t2s"):
        a, b = sitk.ReadImage(str(inp / f"{name}.nii.gz")), sitk.ReadImage(str(tmp_path / "out" / f"{name}.nii.gz"))
        assert a.GetSize() == b.GetSize()
        np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def _case_layout(env, case="phantom_000"):
    folder = env["preprocessed"] / "Dataset001_Ph" / "2d"
    return np.load(folder / f"{case}.npy")


def _networks(planned_model, folds=("fold_0", "fold_1")):
    from spineauto.inference.model import load_model

    return load_model(planned_model, [f.split("_")[1] for f in folds], "final", torch.device("cpu"))


def test_tta_and_fold_ensembling(planned, env):
    from spineauto.inference.predictor import mirror_combinations, predict_layout

    model = _networks(planned[1])
    data = _case_layout(env)[:, :4]
    plan = model.plan
    assert mirror_combinations(plan.augmentation.mirror_axes) == [(2,), (3,), (2, 3)]
    both = predict_layout(model.networks, data, plan, torch.device("cpu"), tta=False)
    one = [predict_layout([n], data, plan, torch.device("cpu"), tta=False) for n in model.networks]
    assert both.shape == (3, *data.shape[1:]) and both.dtype == np.float32
    # logits are averaged, as nnU-Net's predictor does: softmax of the mean log-probability (the
    # per-voxel log-sum-exp of each network cancels), not the mean probability
    np.testing.assert_allclose(both, softmax_of_mean_log(one), atol=1e-5)
    assert np.abs(both - (one[0] + one[1]) / 2).max() > 1e-4
    np.testing.assert_allclose(both.sum(0), 1.0, atol=1e-5)
    tta = predict_layout(model.networks[:1], data, plan, torch.device("cpu"), tta=True)
    np.testing.assert_allclose(tta.sum(0), 1.0, atol=1e-5)
    assert np.abs(tta - one[0]).max() > 1e-3  # a random network is not mirror symmetric: TTA changes it
    # TTA equals the explicit mean over the four mirrored inputs (one tile per slice: whole-slice flips)
    net = model.networks[0]
    single = np.random.default_rng(0).standard_normal((1, 2, *plan.patch_size)).astype(np.float32)
    tta = predict_layout([net], single, plan, torch.device("cpu"), tta=True)
    passes = []
    for dims in [(), (2,), (3,), (2, 3)]:
        flipped = np.flip(single, axis=dims).copy() if dims else single
        p = predict_layout([net], flipped, plan, torch.device("cpu"), tta=False)
        passes.append(np.flip(p, axis=dims) if dims else p)
    np.testing.assert_allclose(tta, softmax_of_mean_log(passes), atol=1e-5)
    # a mirror-equivariant (pointwise) model gives the same with and without TTA; tile batching does not matter
    oracle = OracleNet(3)
    a = predict_layout([oracle], data, plan, torch.device("cpu"), tta=True, batch_slices=1)
    b = predict_layout([oracle], data, plan, torch.device("cpu"), tta=False, batch_slices=7)
    np.testing.assert_allclose(a, b, atol=1e-6)
    # the network's own state is restored after prediction (the trainer validates mid-training)
    net.train()
    net.set_deep_supervision(True)
    predict_layout([net], data[:, :1], plan, torch.device("cpu"))
    assert net.training and net.decoder.deep_supervision


def test_sliding_window_pads_small_and_tiles_large_slices(planned, env):
    from spineauto.inference.predictor import predict_layout

    oracle = OracleNet(3)
    plan = _networks(planned[1], ("fold_0",)).plan
    rng = np.random.default_rng(0)
    for shape in [(1, 2, 20, 30), (1, 3, 190, 101)]:  # smaller than the patch; several tiles per slice
        labels = rng.integers(0, 3, size=shape).astype(np.float32)
        probs = predict_layout([oracle], labels, plan, torch.device("cpu"), tta=False, batch_slices=5)
        assert probs.shape == (3, *shape[1:])
        np.testing.assert_array_equal(probs.argmax(0), labels[0])


def test_fold_ensemble_command_is_the_mean_of_the_folds(env, capsys, tmp_path):
    from spineauto.inference.export import read_probabilities

    inp = env["raw"] / "Dataset001_Ph" / "imagesTs"
    # one pass per case: a model that localises first crops each fold's second pass to its own cord
    one_pass = make_model_folder(env["preprocessed"] / "Dataset001_Ph", tmp_path / "results", folds=(0, 1), one_pass=True)
    for folds, out in (("0", "f0"), ("1", "f1"), ("0 1", "f01")):
        code, _, err = run_cli(capsys, "predict", "-d", "1", "-m", one_pass, "-i", inp, "-o", tmp_path / out, "-f", *folds.split(),
                               "--no-tta", "--save-probabilities", "--device", "cpu")
        assert code == 0, err
    code, _, err = run_cli(capsys, "ensemble", "-i", tmp_path / "f0", tmp_path / "f1", "-o", tmp_path / "ens", "--save-probabilities")
    assert code == 0, err
    for case in ("phantom_004", "phantom_005"):
        p0, _, _ = read_probabilities(tmp_path / "f0" / f"{case}.npz")
        p1, _, _ = read_probabilities(tmp_path / "f1" / f"{case}.npz")
        p01, _, _ = read_probabilities(tmp_path / "f01" / f"{case}.npz")
        pe, _, _ = read_probabilities(tmp_path / "ens" / f"{case}.npz")
        np.testing.assert_allclose(pe, (p0 + p1) / 2, atol=1e-6)
        # two folds in one predict average their logits in the network's grid, before the probabilities are
        # resampled into the image's: per voxel, near the softmax of the folds' mean log-probability
        # (mean voxel distance 0.002 from it, 0.010 from the mean probability, in the version this test was written for)
        near = np.abs(p01 - softmax_of_mean_log([p0, p1])).max(0).mean()
        assert near < 0.5 * np.abs(p01 - (p0 + p1) / 2).max(0).mean(), near
        mask = _assert_same_geometry(inp / f"{case}_0000.nii.gz", tmp_path / "ens" / f"{case}.nii.gz")
        np.testing.assert_array_equal(mask, pe.argmax(0))


def test_oracle_model_restores_the_exact_label_grid(env, planned, capsys, tmp_path, monkeypatch):
    """A perfect model (it reads the label off the image) must give back the reference masks."""
    from spineauto.inference import model as model_mod

    results = tmp_path / "results"
    make_model_folder(env["preprocessed"] / "Dataset001_Ph", results, folds=(0,), normalization="NoNormalization")
    monkeypatch.setenv("SPINEAUTO_RESULTS", str(results))
    monkeypatch.setattr(model_mod, "load_checkpoint_network", lambda path, plan, c, k, device: OracleNet(k))
    inp = tmp_path / "in"
    inp.mkdir()
    labels_dir = env["raw"] / "Dataset001_Ph" / "labelsTr"
    refs = {}
    for f in sorted(labels_dir.glob("*.nii.gz"))[:2]:
        img = nib.load(str(f))
        refs[f.name] = np.asarray(img.dataobj)
        nib.save(nib.Nifti1Image(refs[f.name].astype(np.float32), img.affine, img.header), str(inp / f.name))
    # one more in another orientation (sagittal PSR), to exercise the inverse reorientation
    sag = _reoriented(sorted(labels_dir.glob("*.nii.gz"))[1], "PSR", inp / "psr.nii.gz")
    refs["psr.nii.gz"] = np.asarray(sag.dataobj)
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", inp, "-o", tmp_path / "out", "--device", "cpu")
    assert code == 0, err
    for name, ref in refs.items():
        out = _assert_same_geometry(inp / name, tmp_path / "out" / name)
        for v in (1, 2):
            if (ref == v).sum() > 50:
                assert dice(out == v, ref == v) > 0.9, (name, v)
        # voxels that are far from any label boundary are exactly right
        from scipy import ndimage

        interior = ndimage.binary_erosion(ref == 1, iterations=2) | ~ndimage.binary_dilation(ref > 0, iterations=2)
        np.testing.assert_array_equal(out[interior], ref[interior])


def test_postprocessing_is_decided_and_applied(env, capsys, tmp_path, monkeypatch):
    from spineauto.inference import model as model_mod
    from spineauto.evaluation.best_configuration import decide_postprocessing
    from spineauto.inference.postprocessing import keep_largest_component

    ref = np.zeros((20, 20, 20), np.int16)
    ref[5:12, 5:12, 5:12] = 1
    ref[7:9, 7:9, 7:9] = 2
    ref[14:16, 14:16, 14:16] = 2
    pred = ref.copy()
    pred[0:2, 0:2, 0:2] = 1  # a spurious cord island
    assert (keep_largest_component(pred, 1) == ref).all()
    pp = decide_postprocessing({"a": pred}, {"a": ref}, {"background": 0, "cord": 1, "lesion": 2})
    assert pp["largest_component_labels"] == [1]  # cord yes; lesions are several components: no

    results = tmp_path / "results"
    folder = make_model_folder(env["preprocessed"] / "Dataset001_Ph", results, folds=(0,), normalization="NoNormalization",
                               one_pass=True)  # localising would drop the island by itself
    monkeypatch.setenv("SPINEAUTO_RESULTS", str(results))
    monkeypatch.setattr(model_mod, "load_checkpoint_network", lambda path, plan, c, k, device: OracleNet(k))
    src = sorted((env["raw"] / "Dataset001_Ph" / "labelsTr").glob("*.nii.gz"))[0]
    img = nib.load(str(src))
    data = np.asarray(img.dataobj).astype(np.float32)
    data[:3, :3, :] = 1  # an island of "cord" far from the real one
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(tmp_path / "in" / "c.nii.gz"))
    for with_pp in (False, True):
        if with_pp:
            (folder / "postprocessing.json").write_text('{"largest_component_labels": [1]}')
        out = tmp_path / f"out{int(with_pp)}"
        code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", tmp_path / "in", "-o", out, "--no-tta", "--device", "cpu")
        assert code == 0, err
        mask = np.asarray(nib.load(str(out / "c.nii.gz")).dataobj)
        assert bool((mask[:3, :3, :] == 1).any()) is (not with_pp)


def test_dicom_series_input_writes_nifti_in_series_geometry(env, capsys, tmp_path):
    import pydicom
    import SimpleITK as sitk

    series = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    if not series.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"pydicom test files missing at {series}")
        pytest.skip("pydicom test files missing")
    inp = tmp_path / "dicom"
    shutil.copytree(series, inp)
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", inp, "-o", tmp_path / "out", "--no-tta", "--device", "cpu", "-f", "0")
    assert code == 0, err
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(inp)))
    ref = reader.Execute()
    out = sitk.ReadImage(str(tmp_path / "out" / "SmartScore_-_Gated_0.5_sec.nii.gz"))  # named after its SeriesDescription
    assert out.GetSize() == ref.GetSize() == (16, 16, 5)
    np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(out.GetSpacing(), ref.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(out.GetDirection(), ref.GetDirection(), atol=1e-6)
    assert out.GetPixelID() == sitk.sitkUInt8
    import json

    series_map = json.loads((tmp_path / "out" / "dicom_series.json").read_text())
    assert series_map["SmartScore_-_Gated_0.5_sec"]["SeriesInstanceUID"] == sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(inp))[0]


def test_self_contained_model_folder(env, planned, capsys, tmp_path, monkeypatch):
    """Copy only the model folder elsewhere: predict needs no raw or preprocessed data."""
    moved = tmp_path / "elsewhere" / "Dataset001_Ph"
    shutil.copytree(planned[1], moved / planned[1].name)
    inp = tmp_path / "in"
    shutil.copytree(env["raw"] / "Dataset001_Ph" / "imagesTs", inp)
    monkeypatch.setenv("SPINEAUTO_RESULTS", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("SPINEAUTO_RAW", str(tmp_path / "none1"))
    monkeypatch.setenv("SPINEAUTO_PREPROCESSED", str(tmp_path / "none2"))
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", inp, "-o", tmp_path / "out", "--no-tta", "--device", "cpu")
    assert code == 0, err
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 2
    assert sorted(p.name for p in (moved / planned[1].name).iterdir()) == ["dataset.json", "fold_0", "fold_1", "plans.json", "training_range.json"]


def test_model_folder_of_plans_schema_1_still_predicts(env, planned, capsys, tmp_path, monkeypatch):
    """Before the intensity statistics moved into plans.json, a model folder carried them in
    fingerprint.json: such a folder loads (migrated on the fly) and predicts the same masks."""
    import json

    from spineauto.inference.model import load_model

    old = tmp_path / "old" / "Dataset001_Ph" / planned[1].name
    shutil.copytree(planned[1], old)
    plans = json.loads((old / "plans.json").read_text())
    stats = [plans.pop("foreground_intensity_properties_per_channel")[str(c)] for c in range(len(plans["channel_names"]))]
    plans["schema_version"] = 1
    (old / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(Exception, match="fingerprint.json"):
        load_model(old)
    stats[0]["mean"] += 1.0  # the statistics really come from the fingerprint: a CT-style channel would change
    (old / "fingerprint.json").write_text(json.dumps({"intensity": stats}))
    model = load_model(old)
    assert model.plans.schema_version == 2 and model.intensity[0].mean == pytest.approx(stats[0]["mean"])
    inp = env["raw"] / "Dataset001_Ph" / "imagesTs"
    outs = {}
    for name, folder in (("new", planned[1]), ("old", old)):
        out = tmp_path / f"pred_{name}"  # not tmp_path/old: that folder holds the model (an output never contains one)
        dataset = ["-d", "1"] if name == "new" else []  # -m alone names the model: no dataset needed
        code, _, err = run_cli(capsys, "predict", "-m", folder, *dataset, "-i", inp, "-o", out, "--no-tta", "--device", "cpu")
        assert code == 0, err
        outs[name] = {p.name: np.asanyarray(nib.load(str(p)).dataobj) for p in out.glob("*.nii.gz")}
    assert outs["new"].keys() == outs["old"].keys() and len(outs["new"]) == 2
    assert all(np.array_equal(outs["new"][k], outs["old"][k]) for k in outs["new"])  # z-score normalisation: per-image
    code, _, err = run_cli(capsys, "predict", "-i", inp, "-o", tmp_path / "pred_none", "--device", "cpu")
    _one_line_error(code, err, "-d DATASET", "-m MODEL_FOLDER")


def _one_line_error(code, err, *needles):
    assert code == 1
    assert "Traceback" not in err
    text = " ".join(err.split())
    for n in needles:
        assert n in text, text


def test_bad_inputs(env, capsys, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    good = sorted((env["raw"] / "Dataset001_Ph" / "imagesTs").glob("*.nii.gz"))[0]
    shutil.copy(good, inp / "good_0000.nii.gz")
    (inp / "broken_0000.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", inp, "-o", out, "--no-tta", "--device", "cpu", "-f", "0")
    _one_line_error(code, err, "1 of 2 case(s) failed", "broken_0000.nii.gz")
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz"]  # nothing partial for the failed case

    (inp / "broken_0000.nii.gz").unlink()
    shutil.copy(good, inp / "good_0001.nii.gz")
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", inp, "-o", out, "--device", "cpu")
    _one_line_error(code, err, "good", "_0000, _0001", "expects 1 channel")

    code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", inp, "-o", out, "-f", "3", "--device", "cpu")
    _one_line_error(code, err, "no trained fold_3/checkpoint_final.pt", "fold_0 (final)", "fold_1 (final)")
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", inp, "-o", out, "--checkpoint", "best", "--device", "cpu")
    _one_line_error(code, err, "checkpoint_best.pt", "present: fold_0 (final)")

    (inp / "good_0001.nii.gz").unlink()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", inp, "-o", blocker / "out", "--device", "cpu")
    _one_line_error(code, err, "output folder is not writable")

    code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", tmp_path / "nowhere", "-o", out, "--device", "cpu")
    _one_line_error(code, err, "input not found")
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", inp, "-o", out, "-c", "3d", "--device", "cpu")
    _one_line_error(code, err, "no trained model folder")

    code, _, err = run_cli(capsys, "ensemble", "-i", out, "-o", tmp_path / "ens")
    _one_line_error(code, err, "no <case>.npz probabilities")


def test_find_best_configuration_without_raw_labels_uses_the_preprocessed_ones(env, planned, capsys, tmp_path, monkeypatch):
    """Cross-validation references come from the preprocessed segmentations when the raw data is gone."""
    results = tmp_path / "results"
    model = make_model_folder(env["preprocessed"] / "Dataset001_Ph", results, folds=(0,))
    val = model / "fold_0" / "validation"
    val.mkdir()
    for f in sorted((env["raw"] / "Dataset001_Ph" / "labelsTr").glob("*.nii.gz"))[:2]:
        shutil.copy(f, val / f.name)  # a perfect cross-validation prediction
    monkeypatch.setenv("SPINEAUTO_RESULTS", str(results))
    monkeypatch.setenv("SPINEAUTO_RAW", str(tmp_path / "no_raw"))
    code, stdout, err = run_cli(capsys, "find_best_configuration", "-d", "Dataset001_Ph", "--allow-incomplete")  # fold 0 only
    assert code == 0, err
    import json

    best = json.loads((results / "Dataset001_Ph" / "best_configuration.json").read_text())
    assert best["best"]["name"] == "2d" and best["best"]["cases"] == 2
    assert best["best"]["dice"] > 0.9  # restored from the target spacing: close to, not exactly, the raw masks
    assert (model / "postprocessing.json").is_file()


def test_slabs_stream_the_same_probabilities_as_one_pass(planned, env, monkeypatch):
    """run_networks cut into slabs of a few slices gives the one-pass probabilities; with a sink it keeps
    none of them, each slice reaches the sink once and in order, and the labels restored slab by slab
    are those restored from the whole case."""
    from spineauto.inference import predictor
    from spineauto.inference.restore import Restoration, restore_labels

    model = _networks(planned[1], ("fold_0",))
    data = _case_layout(env)[:, :7]
    plan = model.plan
    whole = predictor.run_networks(model.networks, data, plan, torch.device("cpu"), tta=True).seg
    h, w = (max(s, p) for s, p in zip(data.shape[2:], plan.patch_size))
    monkeypatch.setattr(predictor, "SLAB_PIXELS", 3 * h * w)  # slabs of 3, 3 and 1 slices
    seen = []
    sliced = predictor.run_networks(model.networks, data, plan, torch.device("cpu"), tta=True).seg
    np.testing.assert_allclose(sliced.numpy(), whole.numpy(), atol=1e-6)
    out = predictor.run_networks(model.networks, data, plan, torch.device("cpu"), tta=True,
                                 seg_sink=lambda first, p: seen.append((first, p.clone())))
    assert out.seg is None
    assert [(first, p.shape[1]) for first, p in seen] == [(0, 3), (3, 3), (6, 1)]
    np.testing.assert_allclose(torch.cat([p for _, p in seen], 1).numpy(), whole.numpy(), atol=1e-6)
    # restored in the case's own grid: slab by slab == whole (a preprocessed case's geometry, cut to its 7 slices)
    props = json.loads((env["preprocessed"] / "Dataset001_Ph" / "2d" / "phantom_000.json").read_text())
    from spineauto.io.geometry import CaseGeometry

    geom = CaseGeometry.from_dict(props["geometry"])
    assert geom.bbox[0][1] - geom.bbox[0][0] >= 7
    geom.bbox[0][1] = geom.bbox[0][0] + 7
    props = dict(props, geometry=geom.to_dict(), cropped_shape=[7, *props["cropped_shape"][1:]])
    streamed = Restoration(props, probabilities=True)
    for first, p in seen:
        streamed.add(first, p)
    ref = restore_labels(whole, props)
    np.testing.assert_array_equal(streamed.labels(), ref)
    assert ref.max() > 0 and streamed.probabilities().shape == (3, *ref.shape)
    np.testing.assert_allclose(streamed.probabilities().argmax(0), ref)


def test_each_fold_predicts_with_its_own_plan(planned, env, tmp_path):
    """Fold 1 retrained with a run YAML that widens the network (its run_config.yaml; plans.json now
    holds its plan, as training writes it): fold 0 still loads with its own network, both ensemble;
    a fold whose plan differs in what prediction shares (the patch) is refused in one line."""
    from spineauto.inference.model import load_model
    from spineauto.networks.build import build_network
    from spineauto.planning.plans import Plans
    from spineauto.training.run_config import write_run_config

    _, source = planned
    folder = tmp_path / source.name
    shutil.copytree(source, folder)
    plans = Plans.load(folder / "plans.json")
    old = plans.configurations["2d"]
    write_run_config(folder / "fold_0", old, {}, {})
    wide = Plans.from_dict(plans.to_dict())
    new = wide.configurations["2d"]
    new.network.features_per_stage = [2 * f for f in new.network.features_per_stage]
    net = build_network(new, len(wide.channel_names), wide.num_classes)
    torch.save({"network": net.state_dict(), "configuration": "2d", "epoch": 0}, folder / "fold_1" / "checkpoint_final.pt")
    write_run_config(folder / "fold_1", new, {}, {})
    wide.save(folder / "plans.json")
    zero = load_model(folder, ["0"])
    assert zero.plan.network.features_per_stage == old.network.features_per_stage
    both = load_model(folder, ["0", "1"])
    widths = [n.state_dict()[next(iter(n.state_dict()))].shape[0] for n in both.networks]
    assert widths[1] == 2 * widths[0]
    new.patch_size = [p // 2 for p in new.patch_size]
    write_run_config(folder / "fold_1", new, {}, {})
    with pytest.raises(SpineautoError, match=r"fold_0 and fold_1 were trained with plans that differ in patch_size .* predict them apart with -f"):
        load_model(folder, ["0", "1"])
