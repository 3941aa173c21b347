"""Tracebacks that became one line naming the path and the cause: `train --seed -1` /
`--num-workers -1`, `convert images` with --spacing 0/nan or a decompression-bomb picture, a
full disk in plan_and_preprocess (was "(unknown path): OSError") and in `export`.
"""
from __future__ import annotations

import errno
import shutil

import numpy as np
import pytest

from conftest import run_cli
from test_security import MODEL, _one_error_line, world  # noqa: F401 (the module fixture)


@pytest.mark.parametrize("flag,value,words", [("--seed", "-1", "--seed must be"), ("--num-workers", "-1", "--num-workers must be >= 0")])
def test_train_negative_seed_and_workers(world, capsys, flag, value, words):
    code, _, err = run_cli(capsys, "train", "-d", "1", "-f", "all", "--epochs", "1", "--device", "cpu", flag, value)
    assert code == 1 and words in _one_error_line(err), err


def test_convert_images_bad_spacing_and_decompression_bomb(tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("SPINEAUTO_RAW", str(tmp_path / "raw"))
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "imgs" / cls / "small.png")
    for spacing in ("0", "nan", "-1"):
        code, _, err = run_cli(capsys, "convert", "images", str(tmp_path / "imgs"), "-d", "70", "--name", "B", "--spacing", spacing)
        assert code == 1 and "--spacing" in _one_error_line(err), err
    Image.new("L", (40, 40)).save(tmp_path / "imgs" / "a" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 pixels: over twice the limit, as a 20000 x 20000 picture is
    code, _, err = run_cli(capsys, "convert", "images", str(tmp_path / "imgs"), "-d", "70", "--name", "B")
    line = _one_error_line(err)
    assert code == 1 and "huge.png" in line and "decompression bomb" in line, line
    assert not (tmp_path / "raw" / "Dataset070_B").exists()


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")  # as a write() on a full disk: no file name


def test_full_disk_names_the_path(world, tmp_path, capsys, monkeypatch):
    for k in ("raw", "preprocessed"):
        shutil.copytree(world[k], tmp_path / k)
        monkeypatch.setenv(f"SPINEAUTO_{k.upper()}", str(tmp_path / k))
    (tmp_path / "preprocessed" / "Dataset001_Ph" / "plans.json").unlink()  # every case is preprocessed again
    for p in (tmp_path / "preprocessed" / "Dataset001_Ph").rglob("*.npy"):
        p.unlink()
    with monkeypatch.context() as mp:
        mp.setattr(np, "save", _full_disk)
        code, _, err = run_cli(capsys, "plan_and_preprocess", "-d", "1", "-np", "1")
    line = _one_error_line(err)
    assert code == 1 and "no space left" in line and ".npy" in line and "unknown path" not in line, line
    import zipfile

    monkeypatch.setattr(zipfile.ZipFile, "write", _full_disk)
    target = tmp_path / "m.zip"
    code, _, err = run_cli(capsys, "export", "-m", str(world["results"] / "Dataset001_Ph" / MODEL), "-o", str(target))
    line = _one_error_line(err)
    assert code == 1 and str(target) in line and "no space left" in line, line
    assert not target.exists() and not list(tmp_path.glob(".m.zip*"))


@pytest.mark.parametrize("flag,value", [("--seed", "-1"), ("--num-workers", "-1"), ("-np", "0"), ("--shard-size", "0")])
def test_pretrain_out_of_range_options_before_any_conversion(tmp_path, capsys, flag, value):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "src" / cls / "x.png")
    code, _, err = run_cli(capsys, "pretrain", str(tmp_path / "src"), "-o", str(tmp_path / "out"), flag, value)
    line = _one_error_line(err)
    assert code == 1 and flag in line and value in line, line
    assert not (tmp_path / "out").exists()


def test_non_utf8_dataset_json_and_deeply_nested_bundle_json(tmp_path, capsys, monkeypatch):
    import zipfile

    monkeypatch.setenv("SPINEAUTO_RAW", str(tmp_path / "raw"))
    monkeypatch.setenv("SPINEAUTO_PREPROCESSED", str(tmp_path / "pre"))
    (tmp_path / "raw" / "Dataset080_X").mkdir(parents=True)
    (tmp_path / "raw" / "Dataset080_X" / "dataset.json").write_bytes(b'{"name": "caf\xe9"}')
    code, _, err = run_cli(capsys, "plan_and_preprocess", "-d", "80")
    line = _one_error_line(err)
    assert code == 1 and "dataset.json" in line and "UnicodeDecodeError" in line, line
    bundle = tmp_path / "deep.zip"
    with zipfile.ZipFile(bundle, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("m/plans.json", "[" * 100_000)
        z.writestr("m/fold_0/checkpoint_final.pt", b"")
    code, _, err = run_cli(capsys, "predict", "-d", "80", "-m", str(bundle), "-i", str(tmp_path), "-o", str(tmp_path / "out"))
    line = _one_error_line(err)
    assert code == 1 and "plans.json" in line and "nested too deeply" in line, line
