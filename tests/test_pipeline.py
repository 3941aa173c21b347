"""`spineauto pipeline` end to end on phantoms: a classification stage, the cord, lesions in it,
measurements and the report; gates, sharding, bundles, the Python API and bad input.

The segmentation models are oracles (they read the label off an image whose intensities are the
labels), so the masks the pipeline writes can be compared with the truth voxel by voxel; the
classification model is a small random network (its classes are whatever it says, consistently).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from conftest import planned_phantoms, run_cli
from test_inference_support import OracleNet, dice, make_model_folder

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A phantom dataset with lesions; a cls model (random) and a 2d model (oracle at load time)."""
    root = tmp_path_factory.mktemp("pipeline")
    env = planned_phantoms(root, n_train=4, n_test=3, seed=3)
    pre = env["preprocessed"] / "Dataset001_Ph"
    seg = make_model_folder(pre, env["results"], folds=(0,), normalization="NoNormalization")
    cls = make_model_folder(pre, env["results"], configuration="cls", folds=(0,))
    inputs = root / "inputs"  # label maps as images: what the oracle reads
    inputs.mkdir()
    for f in sorted((env["raw"] / "Dataset001_Ph" / "labelsTs").glob("*.nii.gz")):
        img = nib.load(str(f))
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj).astype(np.float32), img.affine, img.header), str(inputs / f.name))
    return {"root": root, "seg": seg, "cls": cls, "inputs": inputs, **env}


@pytest.fixture
def oracle(monkeypatch):
    from spineauto.inference import model as model_mod

    real = model_mod.load_checkpoint_network
    monkeypatch.setattr(model_mod, "load_checkpoint_network",
                        lambda path, plan, c, k, device: OracleNet(k) if plan.task == "segmentation" else real(path, plan, c, k, device))


def _config(tmp_path: Path, models: dict, **stages) -> Path:
    data = {"description": "test", "sequence": {"model": {"folder": str(models["cls"])}},
            "cord": {"model": {"folder": str(models["seg"])}},
            "lesion": {"model": {"folder": str(models["seg"])}, "remove_outside_mm": 3.0},
            "qc": {"require_anatomy_gate": False, "min_probability": 0.0}}  # no gate, a random classifier: QC tests set their own
    data.update(stages)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}))
    return path


def test_pipeline_writes_masks_classes_measurements_and_report(models, oracle, capsys, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "pipeline", "-i", models["inputs"], "-o", out, "--config", _config(tmp_path, models),
                                "--device", "cpu")
    assert code == 0, err
    cases = sorted(p.name[:-7] for p in models["inputs"].glob("*.nii.gz"))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == cases
    for case in cases:
        truth = nib.load(str(models["inputs"] / f"{case}.nii.gz"))
        ref = np.rint(np.asarray(truth.dataobj)).astype(int)
        record = json.loads((out / case / f"{case}.json").read_text())
        assert record["kind"] == "spineauto.pipeline_case" and record["status"] == "done" and record["reason"] is None
        assert [s["stage"] for s in record["stages"]] == ["sequence", "cord", "lesion"]
        seq = record["stages"][0]
        assert set(seq["heads"]) == {"sequence"} and seq["class"] == seq["heads"]["sequence"]["class"]  # the heads named like the stage
        assert all(abs(sum(h["probabilities"].values()) - 1) < 1e-4 for h in seq["heads"].values())
        masks = {}
        for name in ("cord", "lesion"):
            img = nib.load(str(out / case / f"{case}_{name}.nii.gz"))
            assert img.shape == truth.shape and np.array_equal(img.affine, truth.affine)  # the input's grid
            masks[name] = np.asarray(img.dataobj)
            assert record["stages"][["cord", "lesion"].index(name) + 1]["mask"] == f"{case}_{name}.nii.gz"
        assert dice(masks["cord"], ref == 1) > 0.9
        if (ref == 2).sum() > 20:
            assert dice(masks["lesion"], ref == 2) > 0.8
        cord = record["measurements"]["cord"]
        voxel = float(np.prod(truth.header.get_zooms()[:3]))
        assert cord["volume_mm3"] == pytest.approx(masks["cord"].sum() * voxel, rel=1e-3)
        assert 10 < cord["csa_mm2"]["mean"] < 200  # a phantom cord of a few mm radius
        assert record["measurements"]["lesions"]["count"] >= (1 if masks["lesion"].any() else 0)
        for png in record["images"].values():
            assert (out / case / png).is_file()
    html = (out / "report.html").read_text()
    assert all(case in html for case in cases)
    rows = (out / "pipeline.csv").read_text().splitlines()
    assert len(rows) == len(cases) + 1
    assert not list(out.glob(".*"))  # no temporary folders left


def test_gate_stops_cases_and_says_why(models, oracle, capsys, tmp_path):
    config = _config(tmp_path, models, sequence={"model": {"folder": str(models["cls"])},
                                                 "gate": {"head": "sequence", "classes": ["T1w", "T2w", "T2starw"], "min_probability": 1.01}})
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "pipeline", "-i", models["inputs"], "-o", out, "--config", config, "--device", "cpu")
    assert code == 0, err
    for record in (json.loads(p.read_text()) for p in out.glob("*/*.json")):
        assert record["status"] == "stopped" and "min_probability 1.01" in record["reason"]
        assert [s["stage"] for s in record["stages"]] == ["sequence"] and record["stages"][0]["passed"] is False
        assert not list((out / record["case"]).glob("*_cord.nii.gz"))
    assert "stopped" in (out / "report.html").read_text()


def test_shards_merge_by_copying_and_the_report_rebuilds(models, oracle, capsys, tmp_path):
    config = _config(tmp_path, models, lesion=None)
    parts = []
    for k in range(2):
        out = tmp_path / f"part{k}"
        code, _, err = run_cli(capsys, "pipeline", "-i", models["inputs"], "-o", out, "--config", config, "--device", "cpu",
                               "--num-parts", "2", "--part-id", str(k))
        assert code == 0, err
        parts.append(sorted(p.name for p in out.iterdir() if p.is_dir()))
    cases = sorted(p.name[:-7] for p in models["inputs"].glob("*.nii.gz"))
    assert sorted(parts[0] + parts[1]) == cases and not set(parts[0]) & set(parts[1])
    merged = tmp_path / "merged"
    for k in range(2):
        shutil.copytree(tmp_path / f"part{k}", merged, dirs_exist_ok=True)
    code, _, err = run_cli(capsys, "report", merged)
    assert code == 0, err
    assert len((merged / "pipeline.csv").read_text().splitlines()) == len(cases) + 1


def test_python_api_and_bundles_give_the_same_result(models, capsys, tmp_path):
    """`from spineauto import Pipeline`; a pipeline bundle predicts exactly as its YAML (real networks here)."""
    from spineauto import Pipeline

    config = _config(tmp_path, models, lesion=None)
    bundle = tmp_path / "p.zip"
    code, _, err = run_cli(capsys, "export", "--pipeline", config, "-o", bundle)
    assert code == 0, err
    image = nib.load(str(sorted(models["inputs"].glob("*.nii.gz"))[0]))
    a = Pipeline.load(config, device="cpu").run(image, name="x")
    loaded = Pipeline.load(bundle, device="cpu")
    b = loaded.run(image, name="x")
    assert a.classes == b.classes and np.array_equal(a.cord, b.cord) and a.cord.shape == image.shape
    # the case JSON names the bundle's models inside the zip, never the temporary folder it unpacked to
    assert [s["model"] for s in b.to_dict()["stages"]] == [f"{bundle.resolve()}:models/sequence/{models['cls'].name}",
                                                           f"{bundle.resolve()}:models/cord/{models['seg'].name}"]
    assert a.status == "done" and "cord" in a.measurements
    model_zip = tmp_path / "m.zip"
    code, _, err = run_cli(capsys, "export", "-m", models["seg"], "-o", model_zip)
    assert code == 0, err
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-m", model_zip, "-i", models["inputs"], "-o", tmp_path / "pred",
                           "--device", "cpu")
    assert code == 0, err
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == len(list(models["inputs"].glob("*.nii.gz")))
    # one case driver: the pipeline's cord is what `spineauto predict` writes, localised the same way
    assert Pipeline.load(config, device="cpu").models["cord"].plan.localise is not None
    first = sorted(models["inputs"].glob("*.nii.gz"))[0].name
    predicted = np.asarray(nib.load(str(tmp_path / "pred" / first.replace("_0000", ""))).dataobj)
    assert a.cord.any() and np.array_equal((predicted == 1), a.cord.astype(bool))


def _one_line(code, err, *needles):
    assert code == 1 and "Traceback" not in err, err
    text = " ".join(err.split())
    for n in needles:
        assert n in text, text


def test_bad_pipeline_input(models, oracle, capsys, tmp_path):
    good = yaml.safe_load(_config(tmp_path, models).read_text())
    inp, out = models["inputs"], tmp_path / "out"

    def run(config: dict, *extra):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(config))
        return run_cli(capsys, "pipeline", "-i", inp, "-o", out, "--config", path, "--device", "cpu", *extra)

    _one_line(*run({**good, "cords": good["cord"]})[::2], "unknown key", "did you mean 'cord'")
    _one_line(*run({**good, "cord": {"model": {"folder": str(tmp_path / "nope")}}})[::2], "nope", "not found")
    _one_line(*run({"lesion": good["lesion"]})[::2], "needs a `cord` stage")
    _one_line(*run({**good, "sequence": {**good["sequence"], "gate": {"head": "sequence", "classes": ["PD"]}}})[::2],
              "['PD']", "not classes of head 'sequence'")
    _one_line(*run({**good, "cord": {"model": {"folder": str(models["cls"])}}})[::2], "no segmentation output")
    _one_line(*run(good, "--num-parts", "2", "--part-id", "2")[::2], "--part-id 2")
    code, _, err = run_cli(capsys, "pipeline", "-i", inp, "-o", inp / "sub", "--config", tmp_path / "bad.yaml")
    _one_line(code, err, "must lie outside the input")
    assert not (inp / "sub").exists()
    # a 4D input fails alone: the other cases are written, the exit code says a case failed
    mixed = tmp_path / "mixed"
    shutil.copytree(inp, mixed)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), str(mixed / "four_d.nii.gz"))
    code, _, err = run_cli(capsys, "pipeline", "-i", mixed, "-o", tmp_path / "mixed_out", "--config", tmp_path / "bad.yaml",
                           "--device", "cpu")
    _one_line(code, err, "1 case(s) failed", "four_d")
    record = json.loads((tmp_path / "mixed_out" / "four_d" / "four_d.json").read_text())
    assert record["status"] == "failed" and list((tmp_path / "mixed_out" / "four_d").iterdir()) == [
        tmp_path / "mixed_out" / "four_d" / "four_d.json"]
    assert len([p for p in (tmp_path / "mixed_out").iterdir() if p.is_dir()]) == len(list(inp.glob("*.nii.gz"))) + 1


def test_bids_root_input(models, oracle, capsys, tmp_path):
    """A BIDS root: every sub-*/anat image is a case named by its file, derivatives are not inputs."""
    bids = tmp_path / "bids"
    src = sorted(models["inputs"].glob("*.nii.gz"))[:2]
    for i, f in enumerate(src):
        (bids / f"sub-0{i}" / "anat").mkdir(parents=True)
        shutil.copy(f, bids / f"sub-0{i}" / "anat" / f"sub-0{i}_T2w.nii.gz")
    (bids / "derivatives" / "labels" / "sub-00" / "anat").mkdir(parents=True)
    shutil.copy(src[0], bids / "derivatives" / "labels" / "sub-00" / "anat" / "sub-00_T2w_seg-manual.nii.gz")
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.8.0"}')
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "pipeline", "-i", bids, "-o", out, "--config", _config(tmp_path, models, lesion=None),
                           "--device", "cpu")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["sub-00_T2w", "sub-01_T2w"]
    img = nib.load(str(out / "sub-01_T2w" / "sub-01_T2w_cord.nii.gz"))
    assert np.array_equal(img.affine, nib.load(str(src[1])).affine)


def test_no_cord_skips_the_lesion_stage_and_says_so(models, oracle, tmp_path):
    from spineauto import Pipeline
    from spineauto.pipeline.report import build_report

    ref = nib.load(str(sorted(models["inputs"].glob("*.nii.gz"))[0]))
    blank = nib.Nifti1Image(np.full(ref.shape, 0.2, np.float32), ref.affine)  # the oracle reads background everywhere
    result = Pipeline.load(_config(tmp_path, models), device="cpu").run(blank, name="blank")
    assert result.status == "check" and result.cord is not None and not result.cord.any()
    assert [f["code"] for f in result.flags] == ["no_cord"] and result.reason.startswith("no cord found (0 voxel(s)")
    lesion = next(s for s in result.stages if s["stage"] == "lesion")
    assert lesion["skipped"].startswith("no cord found") and result.lesion is None
    assert "cord" not in result.measurements
    (tmp_path / "out" / "blank").mkdir(parents=True)
    (tmp_path / "out" / "blank" / "blank.json").write_text(json.dumps(result.to_dict()))
    assert "no cord found" in build_report(tmp_path / "out").read_text()


def test_bad_export_and_report_input(models, capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", "-m", models["seg"], "-o", tmp_path / "model.tar")
    _one_line(code, err, "a bundle is a .zip file")
    code, _, err = run_cli(capsys, "export", "-o", tmp_path / "m.zip")
    _one_line(code, err, "give -m MODEL_FOLDER or -d DATASET")
    code, _, err = run_cli(capsys, "export", "-m", tmp_path / "nowhere", "-o", tmp_path / "m.zip")
    _one_line(code, err, "not a model folder")
    (tmp_path / "not_a_zip.zip").write_text("x")
    code, _, err = run_cli(capsys, "pipeline", "-i", models["inputs"], "-o", tmp_path / "o", "--config", tmp_path / "not_a_zip.zip")
    _one_line(code, err, "not a zip bundle")
    code, _, err = run_cli(capsys, "report", tmp_path / "missing")
    _one_line(code, err, "not a folder")
    assert not list(tmp_path.glob("*.zip.*")) and not (tmp_path / "m.zip").exists() and not (tmp_path / "o").exists()
