"""Quality flags of `spineauto pipeline`: a wrong or implausible result is ``check`` with a reason
that names it, a right one ``done``; failures keep what earlier stages found; shipped configs load;
bundles store a shared model once; case folders follow the umask.

Same fixtures as test_pipeline (oracle segmentation models: the input's intensities are the labels,
so a crafted label map is exactly the mask the pipeline sees)."""
from __future__ import annotations

import csv
import json
import os
import re
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import run_cli
from test_pipeline import _config, models, oracle  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def _save(folder: Path, name: str, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(folder / f"{name}.nii.gz"))


def _crafted_inputs(models, folder: Path) -> None:
    """good: a phantom label map; thin: its cord cut to a sixth across R-L; broken: a fifth of its
    S-I extent removed in the middle; few: 5 cord voxels; coarse: every 8th voxel in-plane (8x the voxel size)."""
    folder.mkdir()
    src = sorted(models["inputs"].glob("*.nii.gz"))[0]
    img = nib.load(str(src))
    data, affine = np.rint(np.asarray(img.dataobj)).astype(np.int16), img.affine
    _save(folder, "good", data, affine)
    cord = data > 0
    rl_axis = int(np.argmax(np.abs(affine[0, :3])))
    idx = np.argwhere(cord)[:, rl_axis]
    thin = np.where(cord, 0, data)
    keep = cord & (np.indices(data.shape)[rl_axis] < idx.min() + (idx.max() - idx.min() + 1) / 6)
    thin[keep] = 1
    _save(folder, "thin", thin, affine)
    si_axis = int(np.argmax(np.abs(affine[2, :3])))
    si = np.argwhere(cord)[:, si_axis]
    lo, hi = np.percentile(si, [40, 60]).astype(int)
    broken = np.moveaxis(data.copy(), si_axis, 0)
    broken[lo:hi] = 0
    _save(folder, "broken", np.moveaxis(broken, 0, si_axis), affine)
    few = np.zeros_like(data)
    few[tuple(np.argwhere(cord)[:5].T)] = 1
    _save(folder, "few", few, affine)
    step = [1 if a == si_axis else 8 for a in range(3)]
    coarse = data[::step[0], ::step[1], ::step[2]]
    _save(folder, "coarse", coarse, affine @ np.diag([*step, 1]))


def test_flags_name_what_is_implausible(models, oracle, capsys, tmp_path):
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    _crafted_inputs(models, inputs)
    code, stdout, err = run_cli(capsys, "pipeline", "-i", inputs, "-o", out, "--config", _config(tmp_path, models, lesion=None),
                                "--device", "cpu")
    assert code == 0, err
    cases = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/*.json")}
    codes = {name: {f["code"] for f in d["flags"]} for name, d in cases.items()}
    assert cases["good"]["status"] == "done" and codes["good"] == set() and cases["good"]["reason"] is None
    assert "csa_range" in codes["thin"] and "cord_pieces" not in codes["thin"]
    assert "length_range" in codes["broken"]  # the cord stage keeps one piece (and may doubt it): the other half is missing
    assert codes["few"] == {"no_cord"} and "cord" not in cases["few"]["measurements"]  # no measurements at all
    assert "input_range" in codes["coarse"]
    for name in ("thin", "broken", "few", "coarse"):
        d = cases[name]
        assert d["status"] == "check" and d["reason"] == "; ".join(f["reason"] for f in d["flags"]), name
    thin_csa = cases["thin"]["measurements"]["cord"]["csa_mm2"]["median"]
    assert f"CSA median {thin_csa:.1f} mm² outside the plausible 18-115 mm² (any level; Frostell" in cases["thin"]["reason"]
    assert "of the image's 85 mm S-I extent (< 50%" in cases["broken"]["reason"]
    assert "voxel size" in cases["coarse"]["reason"] and "over 3 x outside the training cases'" in cases["coarse"]["reason"]
    rows = {r["case"]: r for r in csv.DictReader((out / "pipeline.csv").open())}
    assert rows["good"]["status"] == "done" and rows["good"]["flags"] == ""
    assert rows["few"]["status"] == "check" and rows["few"]["flags"] == "no_cord" and rows["few"]["cord_csa_mean_mm2"] == ""
    said = " ".join((stdout + err).split())
    assert "1 done, 4 to check" in said
    glued = "".join(said.split())  # rich wraps a long path anywhere
    assert re.search(r"coarse\.nii\.gz:in-planevoxelsize[\d.]+x[\d.]+mmis[\d.]+xtheplan's.*upsampledfrom\d+x\d+to", glued)
    assert "good.nii.gz:in-planevoxelsize" not in glued
    html = (out / "report.html").read_text()
    assert f"CSA median {thin_csa:.1f} mm²" in html and "class='badge check'" in html


def test_cord_pieces_gaps_and_ranges():
    """qc.cord_flags on a straight 1 mm cord of 8 x 8 voxels (64 mm²): in range; split: two pieces and
    a gap; a level's own range and an overridden table."""
    from spineauto.pipeline.config import QcConfig
    from spineauto.pipeline.measurements import measure_cord
    from spineauto.pipeline.qc import cord_flags

    affine = np.eye(4)
    cord = np.zeros((20, 20, 40), np.uint8)
    cord[6:14, 6:14, :] = 1
    qc = QcConfig()
    assert cord_flags(qc, cord, affine, measure_cord(cord, affine), "cervical") == []
    thoracic = cord_flags(qc, cord, affine, measure_cord(cord, affine), "thoracic")
    assert [f["reason"] for f in thoracic] == ["CSA median 64.0 mm² outside the plausible 18-60 mm² (thoracic; Frostell et al. "
                                               "2016, Front. Neurol. 7:238)"]
    qc.csa_mm2 = {"cervical": [70.0, 90.0]}
    overridden = cord_flags(qc, cord, affine, measure_cord(cord, affine), "cervical")
    assert [f["reason"] for f in overridden] == ["CSA median 64.0 mm² outside the plausible 70-90 mm² (cervical)"]
    split = cord.copy()
    split[:, :, 18:21] = 0
    flags = cord_flags(QcConfig(), split, affine, measure_cord(split, affine), None)
    assert [(f["code"], f["reason"]) for f in flags] == [
        ("cord_pieces", "cord in 2 separate pieces"),
        ("cord_gaps", "3 axial slice(s) without cord between the cord's first and last slice")]


def test_unguarded_input_and_unsure_classes_are_flagged(models, oracle, tmp_path):
    """Without an anatomy gate (the default QC) every case is flagged out-of-distribution; a class
    below min_probability is flagged; a gate whose classes cannot say "none of these" is flagged."""
    from spineauto import Pipeline
    from spineauto.pipeline.config import load_pipeline_config
    from spineauto.pipeline.qc import anatomy_flags

    image = nib.load(str(sorted(models["inputs"].glob("*.nii.gz"))[0]))
    config = _config(tmp_path, models, lesion=None, qc={"min_probability": 0.99})
    result = Pipeline.load(config, device="cpu").run(image, name="x")
    assert result.status == "check" and [f["code"] for f in result.flags] == ["anatomy", "low_confidence"]
    p = max(result.stages[0]["probabilities"].values())
    assert result.flags[1]["reason"] == f"sequence: sequence {result.stages[0]['class']!r} with p={p:.2f} < 0.99"
    qc = load_pipeline_config(config).qc
    assert "cannot say 'none of these'" in anatomy_flags(qc, ["spine", "limb"])[0]["reason"]
    assert anatomy_flags(qc, ["spine", "limb", "other"]) == []
    qc.require_anatomy_gate = False
    assert anatomy_flags(qc, None) == anatomy_flags(qc, ["spine", "limb"]) == []


def test_a_failing_stage_keeps_the_earlier_stages(models, oracle, capsys, tmp_path, monkeypatch):
    """The lesion stage raises: the case fails naming the stage, but its cord mask, classes and stages
    are written and shown (the report never says "no stage ran" for it)."""
    from spineauto.pipeline.runner import Pipeline

    def boom(*args):
        raise RuntimeError("lesion model exploded")
    monkeypatch.setattr(Pipeline, "_segment_lesion", boom)
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "pipeline", "-i", models["inputs"], "-o", out, "--config", _config(tmp_path, models),
                                "--device", "cpu")
    assert code == 1 and "3 case(s) failed (first: phantom_004: lesion: RuntimeError: lesion model exploded)" in err
    case = sorted(p.name for p in out.iterdir() if p.is_dir())[0]
    record = json.loads((out / case / f"{case}.json").read_text())
    assert record["status"] == "failed" and record["reason"] == "lesion: RuntimeError: lesion model exploded"
    assert [s["stage"] for s in record["stages"]] == ["sequence", "cord"] and (out / case / f"{case}_cord.nii.gz").is_file()
    html = (out / "report.html").read_text()
    assert "no stage ran" not in html and f"{case}_cord.nii.gz" in html
    assert "0 done, 0 to check (quality flags), 0 stopped by a gate, 3 failed" in " ".join((stdout + err).split())


def test_shipped_pipeline_configs_load():
    """Every YAML under plans/pipelines loads as written (dataset ids and folds as bare numbers)."""
    from spineauto.pipeline.config import load_pipeline_config

    shipped = sorted((ROOT / "plans" / "pipelines").glob("*.yaml"))
    assert shipped
    for path in shipped:
        config = load_pipeline_config(path)
        refs = config.model_refs()
        assert refs and all(r.dataset is None or isinstance(r.dataset, str) for r in refs.values()), path
    assert config.anatomy.model.dataset == "11"


def test_int_folds_and_dataset_ids(tmp_path):
    from spineauto.pipeline.config import load_pipeline_config

    path = tmp_path / "p.yaml"
    path.write_text("cord: {model: {dataset: 14, configuration: 2d, folds: [0, 1, all]}}\n")
    ref = load_pipeline_config(path).cord.model
    assert ref.dataset == "14" and ref.folds == ["0", "1", "all"]


def test_bundle_stores_a_shared_model_once(models, capsys, tmp_path):
    """One classifier serving two stages: one copy in the zip, loaded once, run once per case."""
    from spineauto import Pipeline

    config = _config(tmp_path, models, lesion=None, location_view={"model": {"folder": str(models["cls"])}})
    bundle = tmp_path / "p.zip"
    code, _, err = run_cli(capsys, "export", "--pipeline", config, "-o", bundle)
    assert code == 0, err
    names = zipfile.ZipFile(bundle).namelist()
    assert sum(n.endswith("checkpoint_final.pt") for n in names) == 2  # the classifier and the cord model, once each
    pipeline = Pipeline.load(bundle, device="cpu")
    assert pipeline.models["location_view"] is pipeline.models["sequence"]
    calls = []
    from spineauto.pipeline import runner

    real = runner.infer
    runner.infer = lambda *a, **k: calls.append(a[0]) or real(*a, **k)
    try:
        pipeline.run(nib.load(str(sorted(models["inputs"].glob("*.nii.gz"))[0])), name="x")
    finally:
        runner.infer = real
    assert len(calls) == 2 and calls[0] is pipeline.models["sequence"]


def test_case_folders_follow_the_umask(models, oracle, capsys, tmp_path):
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        code, _, err = run_cli(capsys, "pipeline", "-i", models["inputs"], "-o", out,
                               "--config", _config(tmp_path, models, lesion=None), "--device", "cpu")
    finally:
        os.umask(old)
    assert code == 0, err
    case = next(p for p in out.iterdir() if p.is_dir())
    assert case.stat().st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in case.iterdir())


def test_the_cord_choice_doubt_is_a_flag(models, oracle, tmp_path, monkeypatch):
    """A reason the cord stage's component choice gives ("uncertain cord: ...") makes the case check."""
    from spineauto import Pipeline
    from spineauto.pipeline import runner

    real = runner.infer

    def doubtful(model, *a, **k):
        out = real(model, *a, **k)
        if out.labels is not None:
            out.qc = ["uncertain cord: 2 tubes on the midline"]
        return out
    monkeypatch.setattr(runner, "infer", doubtful)
    image = nib.load(str(sorted(models["inputs"].glob("*.nii.gz"))[0]))
    result = Pipeline.load(_config(tmp_path, models, lesion=None), device="cpu").run(image, name="x")
    assert result.status == "check" and result.flags == [
        {"stage": "cord", "code": "uncertain_cord", "reason": "uncertain cord: 2 tubes on the midline"}]


def test_a_measurement_that_raises_is_a_flag_not_a_failed_case(models, oracle, tmp_path, monkeypatch):
    from spineauto import Pipeline
    from spineauto.pipeline import measurements

    def broken(*a, **k):
        raise IndexError("index 0 is out of bounds")
    monkeypatch.setattr(measurements, "measure_cord", broken)
    image = nib.load(str(sorted(models["inputs"].glob("*.nii.gz"))[0]))
    result = Pipeline.load(_config(tmp_path, models), device="cpu").run(image, name="x")
    assert result.status == "check" and result.cord.any() and "lesions" in result.measurements and "cord" not in result.measurements
    assert result.flags == [{"stage": "cord", "code": "measurement_failed",
                             "reason": "cord measurements failed (IndexError: index 0 is out of bounds)"}]


def test_bad_qc_settings_are_one_line_errors(tmp_path):
    from spineauto.errors import SpineautoError
    from spineauto.pipeline.config import load_pipeline_config

    path = tmp_path / "p.yaml"
    for qc, message in (({"csa_mm2": {"cervical": [50, 40]}}, "qc.csa_mm2.cervical: give [low, high] with 0 <= low < high, got [50.0, 40.0]"),
                        ({"min_probability": "high"}, "qc.min_probability: expected a number, got 'high'"),
                        ({"max_piece": 2}, "qc: unknown key(s) ['max_piece'] (did you mean 'max_pieces'?)")):
        path.write_text(yaml.safe_dump({"cord": {"model": {"dataset": 14}}, "qc": qc}))
        with pytest.raises(SpineautoError) as e:
            load_pipeline_config(path)
        assert message in str(e.value) and "\n" not in str(e.value)


def test_input_check_without_a_training_range_uses_the_plan(tmp_path):
    """A model folder from before training_range.json: the scan's in-plane voxel size against the plan's."""
    from types import SimpleNamespace

    from spineauto.pipeline.qc import QcConfig, input_flags

    model = SimpleNamespace(folder=tmp_path, plan=SimpleNamespace(target_spacing=[0.5, 0.5]))
    assert input_flags(QcConfig(), "cord", model, np.diag([1.0, 1.0, 5.0, 1]), (1, 64, 64, 12)) == []
    flags = input_flags(QcConfig(), "cord", model, np.diag([2.0, 2.0, 5.0, 1]), (1, 64, 64, 12))
    assert [f["reason"] for f in flags] == ["cord: in-plane voxel size 2 mm is over 3 x the model's 0.5 mm"]
