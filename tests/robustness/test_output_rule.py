"""One output rule for every command that writes (spineauto/io/outputs.py): no output may be, lie
inside or contain an input, a reference, a raw or preprocessed dataset, a model folder or a trained
fold, and `convert --overwrite` deletes only a dataset it wrote. Each case wrote into an input or a
reference (or deleted a source) before the rule; now it is one line, and the files are unchanged.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from test_security import MODEL, _one_error_line, world  # noqa: F401 (the module fixture)


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(capsys, *args, words=()) -> str:
    code, _, err = run_cli(capsys, *args)
    line = _one_error_line(err)
    assert code == 1, err
    for w in words:
        assert w in line, line
    return line


@pytest.fixture()
def predicted(world, tmp_path, capsys):
    """Predictions of the random model for the phantoms' imagesTr, and their labelsTr as the reference."""
    raw = world["raw"] / "Dataset001_Ph"
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-i", str(raw / "imagesTr"), "-o", str(tmp_path / "pred"), "--device", "cpu", "--no-tta")
    assert code == 0, err
    return tmp_path / "pred", raw / "labelsTr"


def test_evaluate_never_writes_over_a_reference_or_a_prediction(world, predicted, capsys):
    pred, gt = predicted
    before = {**_tree(pred), **{f"gt/{k}": v for k, v in _tree(gt).items()}}
    case = sorted(gt.glob("*.nii.gz"))[0].name
    _refused(capsys, "evaluate", str(pred), str(gt), "-o", str(gt / case), words=(case, ".json"))
    _refused(capsys, "evaluate", str(pred), str(gt), "-o", str(pred / case), words=(case, ".json"))
    _refused(capsys, "evaluate", str(pred), str(gt), "-o", str(gt / "summary.json"), words=("reference", str(gt)))
    _refused(capsys, "evaluate", str(pred), str(gt), "-o", str(pred / case.replace(".nii.gz", ".json")), words=("is the JSON of the case",))
    assert {**_tree(pred), **{f"gt/{k}": v for k, v in _tree(gt).items()}} == before


def test_predict_and_pipeline_refuse_outputs_in_references_and_models(world, tmp_path, capsys):
    raw = world["raw"] / "Dataset001_Ph"
    labels_ts = raw / "labelsTs"
    labels_ts.mkdir(exist_ok=True)
    shutil.copy(sorted((raw / "labelsTr").glob("*.nii.gz"))[0], labels_ts / "phantom_ref.nii.gz")
    model = world["results"] / "Dataset001_Ph" / MODEL
    before = {**_tree(raw), **_tree(model)}
    scans = raw / "imagesTs"
    _refused(capsys, "predict", "-d", "1", "-i", str(scans), "-o", str(labels_ts), "--device", "cpu", words=("raw dataset", str(raw)))
    _refused(capsys, "pipeline", "-i", str(scans), "-o", str(model / "fold_0" / "out"), "--config", str(tmp_path / "p.yaml"),
             words=("trained fold", "fold_0"))
    _refused(capsys, "pipeline", "-i", str(scans), "-o", str(world["results"]), "--config", str(tmp_path / "p.yaml"),
             words=("contains the model folder",))
    _refused(capsys, "export", "-m", str(model), "-o", str(model / "fold_0" / "m.zip"), words=("the bundle", "trained fold"))
    assert {**_tree(raw), **_tree(model)} == before
    assert not (model / "fold_0" / "out").exists()
    shutil.rmtree(labels_ts)


def test_report_refuses_a_raw_dataset_and_names_a_folder_in_the_way(world, tmp_path, capsys):
    raw = world["raw"] / "Dataset001_Ph"
    _refused(capsys, "report", str(raw), words=("raw dataset",))
    assert not (raw / "report.html").exists() and not (raw / "pipeline.csv").exists()
    (tmp_path / "run" / "report.html").mkdir(parents=True)
    (tmp_path / "run" / "c1").mkdir()
    (tmp_path / "run" / "c1" / "c1.json").write_text("{")  # a (damaged) case: a pipeline output, else refused for that
    line = _refused(capsys, "report", str(tmp_path / "run"), words=("report.html",))
    assert "tmp" not in Path(line.split(":")[1]).name


def test_pretrain_output_apart_from_sources_and_models(world, tmp_path, capsys):
    raw = world["raw"] / "Dataset001_Ph"
    src = tmp_path / "src"
    shutil.copytree(raw / "imagesTr", src / "images")
    model = world["results"] / "Dataset001_Ph" / MODEL
    before = {**_tree(src), **_tree(model)}
    _refused(capsys, "pretrain", str(src), "-o", str(src), "--self-supervised", words=("input",))
    _refused(capsys, "pretrain", str(src), "-o", str(src / "out"), "--self-supervised", words=("input",))
    _refused(capsys, "pretrain", str(src), "-o", str(model / "fold_0"), "--self-supervised", words=("trained fold",))
    (tmp_path / "afile").write_text("x")
    _refused(capsys, "pretrain", str(src), "-o", str(tmp_path / "afile"), "--self-supervised", words=("not a folder",))
    assert {**_tree(src), **_tree(model)} == before
    assert not (src / "shards").exists() and not (model / "fold_0" / "shards").exists()


def test_convert_overwrite_never_deletes_a_source_or_what_it_did_not_write(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPINEAUTO_RAW", str(tmp_path / "raw"))
    raw = world["raw"] / "Dataset001_Ph"
    dataset = tmp_path / "raw" / "Dataset060_X"
    shutil.copytree(raw, dataset)
    bids = dataset / "bids"
    image = sorted((raw / "imagesTr").glob("*.nii.gz"))[0]
    (bids / "sub-01" / "anat").mkdir(parents=True)
    shutil.copy(image, bids / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    before = _tree(bids)
    _refused(capsys, "convert", "bids", str(bids), "-d", "60", "--name", "X", "--overwrite", words=("input", str(bids)))
    assert _tree(bids) == before
    other = tmp_path / "raw" / "Dataset061_Y"
    (other / "notes").mkdir(parents=True)
    (other / "notes" / "keep.txt").write_text("mine")
    outside = tmp_path / "bids2"
    shutil.copytree(bids, outside)
    _refused(capsys, "convert", "bids", str(outside), "-d", "61", "--name", "Y", "--overwrite", words=("not a raw dataset",))
    assert (other / "notes" / "keep.txt").read_text() == "mine"
