"""Metadata first in the pipeline's classification stages: the header (BIDS suffix, DICOM tags by the
rules file, the view from the affine) decides where it knows, the image classifier is the fallback
and the cross-check, a disagreement is a flag, and pipeline.csv says which source decided."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import yaml
from conftest import run_cli
from test_pipeline import _config, models, oracle  # noqa: F401 - the pipeline test's fixtures

from spineauto.pipeline.header import decide, header_classes


def test_the_header_gives_the_bids_suffix_and_the_view_of_the_affine():
    axial = np.diag([0.5, 0.5, 3.0, 1.0])  # 3 mm slices along S-I
    got = header_classes("sub-01_ses-2_acq-ax_T2w.nii.gz", axial, (64, 64, 12))
    assert got["sequence"] == ("T2w", "BIDS suffix _T2w")
    assert got["view"][0] == "axial" and got["view"][1].startswith("affine: largest spacing 3 mm")
    sagittal = np.diag([3.0, 0.5, 0.5, 1.0])
    assert header_classes("scan.nii.gz", sagittal, (12, 64, 64)) == {"view": ("sagittal", "affine: largest spacing 3 mm vs 0.5 mm in-plane")}
    assert "view" not in header_classes("scan.nii.gz", np.eye(4), (64, 64, 64))  # an isotropic block: the header cannot say


def test_the_header_decides_where_it_names_a_class_and_the_image_cross_checks():
    header = {"sequence": ("T2w", "BIDS suffix _T2w")}
    d = decide("sequence", "T1w", 0.9, ["T1w", "T2w"], header)
    assert d["class"] == "T2w" and d["source"] == "header" and d["disagrees"] and d["image_class"] == "T1w"
    assert decide("sequence", "T2w", 0.9, ["T1w", "T2w"], header)["disagrees"] is False
    assert decide("sequence", "T1w", 0.9, ["T1w", "MT"], header) == {"class": "T1w", "source": "image", "disagrees": False}
    assert decide("view", "axial", 0.6, ["axial", "sagittal"], header)["source"] == "image"


def test_dicom_tags_decide_through_the_rules_file(tmp_path):
    from test_dicom_training import RULES, SAGITTAL, write_series

    from spineauto.datasets.dicom_rules import load_rules

    (tmp_path / "rules.yaml").write_text(RULES)
    _, files = write_series(tmp_path / "s", np.zeros((3, 8, 8)), "T1 SAG", SAGITTAL)
    got = header_classes("T1_SAG", np.diag([2.0, 0.8, 0.8, 1.0]), (3, 8, 8), files, load_rules(tmp_path / "rules.yaml"))
    assert got["sequence"] == ("T1w", "DICOM SeriesDescription='T1 SAG' ~ /(?i)t1/")
    assert got["view"][0] == "sagittal"


def test_pipeline_takes_the_bids_suffix_flags_a_disagreeing_classifier_and_says_who_decided(models, oracle, capsys, tmp_path):  # noqa: F811
    bids = tmp_path / "bids"
    src = sorted(models["inputs"].glob("*.nii.gz"))[:2]
    for i, (f, suffix) in enumerate(zip(src, ("T2w", "T1w"))):
        (bids / f"sub-0{i}" / "anat").mkdir(parents=True)
        shutil.copy(f, bids / f"sub-0{i}" / "anat" / f"sub-0{i}_{suffix}.nii.gz")
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.8.0"}')
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "pipeline", "-i", bids, "-o", out, "--config", _config(tmp_path, models, lesion=None), "--device", "cpu")
    assert code == 0, err
    rows = {r["case"]: r for r in csv.DictReader(open(out / "pipeline.csv"))}
    for case, suffix in (("sub-00_T2w", "T2w"), ("sub-01_T1w", "T1w")):
        record = json.loads((out / case / f"{case}.json").read_text())
        head = record["stages"][0]["heads"]["sequence"]
        assert head["class"] == suffix and head["source"] == "header" and head["header_reason"] == f"BIDS suffix _{suffix}"
        assert rows[case]["sequence_class"] == suffix and rows[case]["sequence_source"] == "header"
        disagree = [f for f in record["flags"] if f["code"] == "header_disagrees"]
        assert bool(disagree) == (head["image_class"] != suffix)  # the random classifier: flagged exactly where it differs
        if disagree:
            assert record["status"] == "check" and f"the header says {suffix}" in disagree[0]["reason"]
    plain = tmp_path / "plain"  # names without a BIDS suffix: the image classifier decides
    plain.mkdir()
    shutil.copy(src[0], plain / "scan.nii.gz")
    code, _, err = run_cli(capsys, "pipeline", "-i", plain, "-o", tmp_path / "out2", "--config", _config(tmp_path, models, lesion=None),
                           "--device", "cpu")
    assert code == 0, err
    record = json.loads((tmp_path / "out2" / "scan" / "scan.json").read_text())
    assert record["stages"][0]["heads"]["sequence"]["source"] == "image"


def test_a_bad_header_rules_file_is_refused_when_the_pipeline_loads(models, tmp_path):  # noqa: F811
    from spineauto.pipeline.config import load_pipeline_config

    config = yaml.safe_load(_config(tmp_path, models).read_text())
    (tmp_path / "rules.yaml").write_text("sequence:\n  T2w: {SeriesDescription: '('}\n  T1w: {SeriesDescription: t1}\n")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({**config, "header_rules": "rules.yaml"}))
    import pytest

    from spineauto.errors import SpineautoError

    with pytest.raises(SpineautoError, match=r"rules.yaml: sequence.T2w.SeriesDescription: invalid regular expression"):
        load_pipeline_config(tmp_path / "p.yaml")


def test_a_pipeline_bundle_carries_its_header_rules(models, tmp_path):  # noqa: F811
    import zipfile

    from test_dicom_training import RULES

    from spineauto.pipeline.bundle import export_pipeline
    from spineauto.pipeline.runner import Pipeline

    (tmp_path / "rules.yaml").write_text(RULES)
    config = yaml.safe_load(_config(tmp_path, models, lesion=None).read_text())
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({**config, "header_rules": "rules.yaml"}))
    bundle = export_pipeline(tmp_path / "p.yaml", tmp_path / "p.zip")
    (tmp_path / "rules.yaml").unlink()  # the bundle needs the file no more
    with zipfile.ZipFile(bundle) as z:
        assert z.read("pipeline/header_rules.yaml").decode() == RULES
    pipeline = Pipeline.load(bundle, device="cpu")
    assert Path(pipeline.config.header_rules).read_text() == RULES
