"""What a file from elsewhere can do on load: a model bundle, a --pretrained checkpoint, a plug-in
string, a YAML file, a CSV a colleague opens. Each case failed (ran code, exhausted memory, wrote a
formula) before spineauto loaded checkpoints with weights_only, checked plug-in kinds, bounded YAML
aliases, checked bundle members and escaped CSV cells. Every refusal is one line naming the file.
"""
from __future__ import annotations

import os
import shutil
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from model_world import MODEL, model_world, one_error_line as _one_error_line


class _Payload:
    """Unpickling it would run ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(path: Path, marker: Path, network: dict | None = None) -> Path:
    torch.save({"network": network or {"w": torch.zeros(1)}, "epoch": 1, "x": _Payload(marker)}, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    yield from model_world(tmp_path_factory, "security")


def test_model_bundle_with_a_pickled_payload_is_refused_without_running_it(world, tmp_path, capsys):
    folder = world["results"] / "Dataset001_Ph" / MODEL
    code, _, err = run_cli(capsys, "export", "-m", str(folder), "-o", str(tmp_path / "good.zip"))
    assert code == 0, err
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil" / MODEL
    shutil.copytree(folder, evil)
    state = torch.load(folder / "fold_0" / "checkpoint_final.pt", weights_only=True)
    _evil_checkpoint(evil / "fold_0" / "checkpoint_final.pt", marker, state["network"])
    code, _, err = run_cli(capsys, "export", "-m", str(evil), "-o", str(tmp_path / "evil.zip"))
    assert code == 0, err
    scans = world["raw"] / "Dataset001_Ph" / "imagesTs"
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-m", str(tmp_path / "evil.zip"), "-i", str(scans), "-o", str(tmp_path / "out"),
                           "--device", "cpu", "--no-tta")
    line = _one_error_line(err)
    assert code == 1 and "checkpoint_final.pt" in line and "refused" in line and "system" in line, line
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.nii.gz"))
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-m", str(tmp_path / "good.zip"), "-i", str(scans), "-o", str(tmp_path / "out2"),
                           "--device", "cpu", "--no-tta")
    assert code == 0, err  # the same model, written by spineauto, still loads from a bundle


def test_pretrained_checkpoint_with_a_pickled_payload_is_refused_without_running_it(world, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker)
    code, _, err = run_cli(capsys, "train", "-d", "1", "-f", "all", "--epochs", "1", "--iters-per-epoch", "1", "--val-iters", "1",
                           "--num-workers", "0", "--device", "cpu", "--wandb", "disabled", "--no-validate", "--pretrained", str(evil))
    line = _one_error_line(err)
    assert code == 1 and str(evil) in line and "refused" in line, line
    assert not marker.exists()


def test_checkpoints_spineauto_writes_load_safely(tmp_path):
    """Every type our checkpoints hold (trainer: numpy RNG state, numpy scalars in histories, grad
    scaler, torch version; pretraining: paths in options) passes the weights-only loader."""
    from spineauto.io.checkpoints import load_checkpoint, save_checkpoint
    from spineauto.training.checkpoint import rng_state

    scaler = torch.amp.GradScaler("cpu")
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    state = {"network": {"w": torch.ones(2)}, "optimizer": opt.state_dict(), "rng": rng_state(), "grad_scaler": scaler.state_dict(),
             "history": [{"loss": np.float32(0.5), "dice": np.float64(0.25), "n": np.int64(3), "ok": np.bool_(True)}],
             "arrays": [np.zeros((2, 2), dtype=d) for d in (np.uint8, np.int32, np.float16, np.float64)],
             "options": {"out": Path("/x/y"), "version": torch.__version__}}
    loaded = load_checkpoint(save_checkpoint(tmp_path / "c.pt", state))
    assert loaded["rng"]["numpy"][0] == "MT19937" and np.array_equal(loaded["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert loaded["history"][0]["dice"] == 0.25 and loaded["options"]["out"] == Path("/x/y")
    assert str(loaded["options"]["version"]) == torch.__version__


@pytest.mark.parametrize("spec", ["builtins:print", "os:system", "spineauto.paths:root"])
def test_network_plugin_string_must_name_a_module_class(spec, capsys):
    from spineauto.errors import SpineautoError
    from spineauto.networks.registry import REGISTRY

    with pytest.raises(SpineautoError) as e:
        REGISTRY.resolve(spec, "network.architecture")
    assert "network.architecture" in str(e.value) and "\n" not in str(e.value) and "nn" in str(e.value).lower()
    assert capsys.readouterr().out == ""  # print was never called
    assert REGISTRY.resolve("plugins_for_tests:TinyNet", "network.architecture").__name__ == "TinyNet"
    assert REGISTRY.resolve("spineauto.networks.registry:_unet", "network.architecture") is REGISTRY["unet"]


BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
               for p, c in zip(["", *"abcdefgh"], "abcdefghi"))


@pytest.mark.parametrize("flag", ["--config", "--preset"])
def test_yaml_alias_bomb_and_non_utf8_are_one_short_line(world, tmp_path, capsys, flag):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(("configurations:\n  2d:\n    " if flag == "--preset" else "") + BOMB.replace("\n", "\n    " if flag == "--preset" else "\n"))
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes(b"description: caf\xe9\n")
    for path, words in ((bomb, "beyond"), (latin, "UTF-8")):
        t0 = time.perf_counter()
        if flag == "--preset":
            code, _, err = run_cli(capsys, "plan_and_preprocess", "-d", "1", "--preset", str(path), "-np", "1")
        else:
            code, _, err = run_cli(capsys, "train", "-d", "1", "-f", "all", "--config", str(path), "--device", "cpu")
        line = _one_error_line(err)
        assert code == 1 and str(path.name) in line and words in line and len(line) < 600, line
        assert time.perf_counter() - t0 < 20


def test_yaml_aliases_within_bounds_still_work():
    from spineauto.schema import load_yaml_text

    data = load_yaml_text("a: &x {lr: 0.1}\nb: *x\n", "t")
    assert data == {"a": {"lr": 0.1}, "b": {"lr": 0.1}}


def _forge_size(zip_path: Path, member: str, size: int) -> None:
    """Write ``size`` as ``member``'s uncompressed size in the central directory (what zipfile trusts)."""
    data = bytearray(zip_path.read_bytes())
    i = data.find(b"PK\x01\x02" + b"\x00" * 0, 0)
    while i >= 0:
        n = struct.unpack_from("<H", data, i + 28)[0]
        if data[i + 46:i + 46 + n].decode() == member:
            struct.pack_into("<I", data, i + 24, size)
        i = data.find(b"PK\x01\x02", i + 4)
    zip_path.write_bytes(bytes(data))


def test_bundle_member_sizes_checked_before_extracting_and_bad_crc_is_one_line(tmp_path, capsys, monkeypatch):
    from spineauto.errors import SpineautoError
    from spineauto.inference import bundle

    made = []
    real = bundle.tempfile.mkdtemp
    monkeypatch.setattr(bundle.tempfile, "mkdtemp", lambda **kw: made.append(real(**kw)) or made[-1])
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w") as z:
        z.writestr("m/plans.json", "{}")
        z.writestr("m/fold_0/checkpoint_final.pt", b"x" * 100)
    _forge_size(big, "m/fold_0/checkpoint_final.pt", 1 << 30)
    with pytest.raises(SpineautoError, match="checkpoint_final.pt.*1024 MiB"):
        bundle.open_bundle(big)
    assert made == []  # nothing was extracted
    crc = tmp_path / "crc.zip"
    with zipfile.ZipFile(crc, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("m/plans.json", "{" + "a" * 100 + "}")
    data = crc.read_bytes()
    crc.write_bytes(data.replace(b"a" * 100, b"b" * 100, 1))
    code, _, err = run_cli(capsys, "predict", "-d", "1", "-m", str(crc), "-i", str(tmp_path), "-o", str(tmp_path / "o"))
    line = _one_error_line(err)
    assert code == 1 and "crc.zip" in line and "damaged bundle" in line and "CRC" in line, line


def test_csv_cells_that_spreadsheets_run_are_escaped(tmp_path):
    import csv
    import json

    from spineauto.io.csv_cells import escape, unescape
    from spineauto.pipeline.report import KIND, build_report

    assert [escape(v) for v in ("=1+1", "+x", "-x", "@x", "\tx", "\rx", "-0.5", "ok", 3)] == \
        ["'=1+1", "'+x", "'-x", "'@x", "'\tx", "'\rx", "-0.5", "ok", 3]
    assert unescape(escape("=A1")) == "=A1"
    name = '=HYPERLINK("http://x","y")'
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "c.json").write_text(json.dumps({"kind": KIND, "case": name, "status": "failed", "reason": "@SUM(A1)"}))
    build_report(tmp_path)
    rows = list(csv.reader((tmp_path / "pipeline.csv").open()))
    assert rows[1][:3] == ["'" + name, "failed", "'@SUM(A1)"]


def test_plugin_string_never_imports_a_standard_library_module_that_acts(capsys):
    """Importing `this` prints the Zen of Python (`antigravity` opens a browser): refused before the import."""
    import sys

    from spineauto.errors import SpineautoError
    from spineauto.training.losses import LOSSES

    sys.modules.pop("this", None)
    with pytest.raises(SpineautoError, match="standard-library module 'this'"):
        LOSSES.resolve("this:s", "loss.name")
    assert "this" not in sys.modules and capsys.readouterr().out == ""


def test_legacy_format_payload_refused_and_damaged_file_not_called_unsafe(tmp_path):
    from spineauto.errors import SpineautoError
    from spineauto.io.checkpoints import load_checkpoint

    marker = tmp_path / "MARKER"
    torch.save({"x": _Payload(marker)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(SpineautoError, match=r"legacy.pt: refused: .*system"):
        load_checkpoint(tmp_path / "legacy.pt")
    assert not marker.exists()
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(SpineautoError) as e:
        load_checkpoint(tmp_path / "garbage.pt")
    assert "not a readable checkpoint" in str(e.value) and "weights_only" not in str(e.value) and "\n" not in str(e.value)
