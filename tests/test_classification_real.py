"""Sequence (T1w, T2w, T2*w, MT, DWI) and view (axial vs sagittal) classification on the real
spinal-cord scans in ../shared/data: plan, train, predict, evaluate end to end.

The set is tiny (8 volumes), so this asserts the machinery and sane outputs (every case predicted,
probabilities summing to 1, confusion matrices adding up to the case count), not a tuned accuracy.
In CI a missing ../shared/data fails the test; elsewhere it is skipped.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import require_real_data, run_cli

torch.set_num_threads(2)

# case -> (image under ../shared/data/sct_testing_data, sequence, view)
REAL_SEQUENCES = {
    "t1w": ("t1/t1w.nii.gz", "T1w", "sagittal"),
    "t2": ("t2/t2.nii.gz", "T2w", "sagittal"),
    "t2lesion": ("t2/t2_fake_lesion.nii.gz", "T2w", "sagittal"),
    "t2s": ("t2s/t2s.nii.gz", "T2starw", "axial"),
    "t2sfull": ("t2s/t2s_uncropped.nii.gz", "T2starw", "axial"),
    "mt1": ("mt/mt1.nii.gz", "MT", "axial"),
    "mt0": ("mt/mt0.nii.gz", "MT", "axial"),
    "dwi": ("dmri/dwi_mean.nii.gz", "DWI", "axial"),
}
SEQUENCES = ["T1w", "T2w", "T2starw", "MT", "DWI"]
REPO = Path(__file__).resolve().parents[1]


def shrink_plans(path: Path, batch_size: int = 8) -> None:
    """A small network (a plan file is meant to be edited): the test checks the machinery, not accuracy."""
    d = json.loads(path.read_text())
    for cfg in d["configurations"].values():
        cfg["network"]["features_per_stage"] = [min(8 * 2 ** i, 64) for i in range(len(cfg["network"]["features_per_stage"]))]
        cfg["batch_size"] = batch_size
    path.write_text(json.dumps(d, indent=1))


@pytest.fixture
def real_sequence_dataset(spineauto_env):
    src = require_real_data()
    folder = spineauto_env["raw"] / "Dataset031_RealSequence"
    (folder / "imagesTr").mkdir(parents=True)
    for case, (image, _, _) in REAL_SEQUENCES.items():
        shutil.copy(src / image, folder / "imagesTr" / f"{case}_0000.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {}, "numTraining": len(REAL_SEQUENCES), "file_ending": ".nii.gz",
        "heads": {"sequence": SEQUENCES, "view": ["axial", "sagittal"]},
        "cases": {c: {"subject": c, "classes": {"sequence": s, "view": v}} for c, (_, s, v) in REAL_SEQUENCES.items()},
    }))
    return folder


def test_real_sequence_and_view_classification_end_to_end(real_sequence_dataset, spineauto_env, tmp_path, capsys):
    code, _, err = run_cli(capsys, "plan_and_preprocess", "-d", 31, "-np", 2, "--preset", REPO / "plans" / "sequence_classification.yaml")
    assert code == 0, err
    pre = spineauto_env["preprocessed"] / "Dataset031_RealSequence"
    plans = json.loads((pre / "plans.json").read_text())
    assert list(plans["configurations"]) == ["cls"]  # no masks: classification only
    heads = {h["name"]: h for h in plans["configurations"]["cls"]["heads"]}
    assert heads["sequence"]["classes"] == SEQUENCES
    # inverse-frequency weights: T1w and DWI (1 case each) weigh more than T2w (2 cases)
    w = dict(zip(SEQUENCES, heads["sequence"]["class_weights"]))
    assert w["T1w"] == w["DWI"] == pytest.approx(2 * w["T2w"])
    shrink_plans(pre / "plans.json")

    code, _, err = run_cli(capsys, "train", "-d", 31, "-f", "all", "-c", "cls", "--device", "cpu", "--wandb", "disabled",
                           "--num-workers", 0, "--epochs", 2, "--iters-per-epoch", 5, "--val-iters", 2)
    assert code == 0, err[-3000:]
    model = spineauto_env["results"] / "Dataset031_RealSequence" / "spineautoTrainer__spineautoPlans__cls"
    assert (model / "fold_all" / "checkpoint_final.pt").is_file()

    out = tmp_path / "pred"
    code, _, err = run_cli(capsys, "predict", "-d", 31, "-c", "cls", "-i", real_sequence_dataset / "imagesTr", "-o", out, "--device", "cpu")
    assert code == 0, err
    rows = {r["case"]: r for r in csv.DictReader(open(out / "classification.csv"))}
    assert sorted(rows) == sorted(REAL_SEQUENCES)
    for case, r in rows.items():
        for head, classes in (("sequence", SEQUENCES), ("view", ["axial", "sagittal"])):
            p = np.array([float(r[f"{head}_p_{c}"]) for c in classes])
            assert p.sum() == pytest.approx(1.0, abs=1e-4) and (p >= 0).all() and r[head] in classes
        info = json.loads((out / f"{case}.json").read_text())
        assert info["n_slices"] >= 1 and info["heads"]["sequence"]["class"] == r["sequence"]

    code, _, err = run_cli(capsys, "evaluate", out, real_sequence_dataset / "dataset.json")
    assert code == 0, err
    summary = json.loads((out / "summary_classification.json").read_text())
    for head, n_classes in (("sequence", 5), ("view", 2)):
        m = summary["heads"][head]
        cm = np.array(m["confusion"])
        assert cm.shape == (n_classes, n_classes) and cm.sum() == len(REAL_SEQUENCES)
        assert (cm.sum(axis=1) == [sum(v[1 if head == "sequence" else 2] == c for v in REAL_SEQUENCES.values())
                                   for c in m["classes"]]).all()
        assert 0 <= m["balanced_accuracy"] <= 1 and m["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
        assert (out / f"confusion_{head}.png").is_file()
    assert summary["missing_predictions"] == []
