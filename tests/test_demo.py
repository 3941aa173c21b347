"""The pipeline demo's plain verdict: what its budget found against the phantoms' truth."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from spineauto.demo import pipeline_verdict


def test_verdict_counts_against_the_truth(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    (raw / "labelsTs").mkdir(parents=True)
    cases = {"a": {"anatomy": "spine", "location": "cervical"}, "b": {"anatomy": "other", "location": "lumbar"}}
    (raw / "dataset.json").write_text(json.dumps({"cases": {k: {"classes": v} for k, v in cases.items()}}))
    label = np.zeros((20, 20, 20), np.uint8)
    label[2:5, 2:5, 2:5] = 2  # two lesions, the first found
    label[12:15, 12:15, 12:15] = 2
    found = (label == 2) & (np.indices(label.shape)[0] < 10)
    for name, data in (("a", label), ("b", np.zeros_like(label))):
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(raw / "labelsTs" / f"{name}.nii.gz"))
    predicted = {"a": ("spine", "lumbar", "check"), "b": ("other", "lumbar", "stopped")}
    for name, (anatomy, location, status) in predicted.items():
        (out / name).mkdir(parents=True)
        stages = [{"heads": {"anatomy": {"class": anatomy}}}, {"heads": {"location": {"class": location}}}]
        (out / name / f"{name}.json").write_text(json.dumps({"status": status, "stages": stages}))
    nib.save(nib.Nifti1Image(found.astype(np.uint8), np.eye(4)), str(out / "a" / "a_lesion.nii.gz"))
    lines = pipeline_verdict(raw, out, {"cls": 300, "2d": 1000})
    assert lines[0] == ("against the phantoms' truth (2 held-out cases; budget cls 300 iterations, 2d 1000 iterations on this "
                        "machine): anatomy 2/2 right, location 0/1 spines right, lesions found 1/2; status: 1 check, 1 stopped")
    assert "too small to learn what it missed" in lines[1]
