"""`spineauto pretrain`: nested image folders and raw datasets -> memory-mapped shards (parallel,
resumable, corrupt images listed or refused), supervised and SimCLR pretraining, and the encoder's
transfer into cls, multitask and 2d (resnet_unet) networks."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from spineauto.errors import SpineautoError
from spineauto.pretraining import shards as sh


def _folder(root: Path, n: int = 4) -> Path:
    """modality/anatomy/label tree with mixed formats, sizes and channels, plus a truncated PNG."""
    rng = np.random.default_rng(0)
    from pydicom import examples

    for mod in ("MR", "CT"):
        for anat in ("spine", "knee"):
            for lab in ("normal", "abnormal"):
                d = root / mod / anat / lab
                d.mkdir(parents=True)
                for i in range(n):
                    h, w = (int(x) for x in rng.integers(20, 60, 2))
                    a = (rng.random((h, w)) * 255).astype(np.uint8)
                    [lambda: Image.fromarray(np.stack([a] * 3, -1)).save(d / f"{i}.jpg"),
                     lambda: Image.fromarray(a.astype(np.uint16) * 200).save(d / f"{i}.png"),  # 16-bit
                     lambda: nib.save(nib.Nifti1Image(rng.random((h, w)).astype(np.float32), np.eye(4)), d / f"{i}.nii.gz"),
                     lambda: shutil.copy(examples.get_path("ct"), d / f"{i}.dcm")][i % 4]()
    good = root / "MR" / "spine" / "normal" / "0.jpg"
    Image.fromarray((rng.random((30, 30)) * 255).astype(np.uint8)).save(root / "tmp.png")
    (root / "MR" / "spine" / "normal" / "truncated.png").write_bytes((root / "tmp.png").read_bytes()[:400])  # cut in its pixel data
    (root / "tmp.png").unlink()
    assert good.is_file()
    return root


def test_to_uint8_resizes_longer_side_pads_and_scales():
    out = sh.to_uint8(np.full((20, 10), 200, np.uint8), 16, 1)
    assert out.shape == (1, 16, 16) and out.dtype == np.uint8
    assert (out[0, :, 4:12] == 200).all() and (out[0, :, :4] == 0).all() and (out[0, :, 12:] == 0).all()  # 8x16 centred
    rgb = sh.to_uint8(np.stack([np.full((8, 8), v, np.uint8) for v in (255, 0, 0)], -1), 8, 1)
    assert int(rgb[0, 4, 4]) == 76  # luminance of pure red (ITU-R 601-2, Pillow "L")
    wide = sh.to_uint8(np.linspace(0, 5000, 64 * 64, dtype=np.float32).reshape(64, 64), 32, 3)  # non-8-bit: percentiles -> 0..255
    assert wide.shape == (3, 32, 32) and wide.max() >= 250 and wide.min() <= 5 and (wide[0] == wide[2]).all()


def test_nested_folder_shards_classes_corrupt_and_resume(tmp_path):
    root = _folder(tmp_path / "imgs")
    items, classes, skipped = sh.list_supervised(root, class_depth=2)
    assert classes == ["CT/knee", "CT/spine", "MR/knee", "MR/spine"] and len(items) == 33 and not skipped
    leaf = sh.list_supervised(root, None)[1]
    assert len(leaf) == 8 and "MR/spine/normal" in leaf  # leaf folders as classes
    out = tmp_path / "shards"
    kw = dict(size=32, channels=1, mode="supervised", classes=classes, sources=[str(root)], listed_skipped=skipped, shard_size=8,
              workers=2, class_depth=2)
    index = sh.convert(items, out, **kw)
    assert index["images"] == 32 and len(index["shards"]) == 5
    assert [Path(s[0]).name for s in index["skipped"]] == ["truncated.png"]
    data = sh.ShardSet(out)
    before = (data.images(np.arange(len(data))).copy(), data.labels.copy())
    assert before[0].shape == (32, 1, 32, 32) and sorted(set(before[1])) == [0, 1, 2, 3]
    assert np.bincount(before[1]).tolist() == [8, 8, 8, 8]  # MR/spine lost its truncated image only
    # an interrupted conversion: shard 2 half-written by a killed worker, and its done marker missing
    mtime = (out / "shard_00000.npy").stat().st_mtime_ns
    (out / "shard_00002.done.json").unlink()
    (out / "shard_00002.npy").unlink()
    (out / ".shard_00002.npy.tmp").write_bytes(b"half")
    index = json.loads((out / "index.json").read_text())
    index["state"] = "converting"
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(SpineautoError, match="interrupted"):
        sh.ShardSet(out)
    again = sh.convert(items, out, **kw)
    assert again["images"] == 32 and (out / "shard_00000.npy").stat().st_mtime_ns == mtime  # only shard 2 redone
    assert not list(out.glob(".*.tmp"))
    data = sh.ShardSet(out)
    assert np.array_equal(data.images(np.arange(len(data))), before[0]) and np.array_equal(data.labels, before[1])
    # other settings into the same folder: refused without overwrite
    with pytest.raises(SpineautoError, match="other images or settings"):
        sh.convert(items, out, **{**kw, "size": 48})


def _one_error(err: str) -> bool:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    return len(lines) == 1 and "Traceback" not in err


def test_bad_folders_refused_in_one_line(tmp_path, capsys):
    root = _folder(tmp_path / "imgs", n=1)
    code, _, err = run_cli(capsys, "pretrain", str(root), "-o", str(tmp_path / "o1"), "--class-depth", "2", "--strict",
                           "--convert-only", "-np", "1", "--size", "32")
    assert code == 1 and "truncated.png: unreadable image" in err and "--strict" in err and _one_error(err)
    one = tmp_path / "one" / "only"
    one.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(one / "a.png")
    code, _, err = run_cli(capsys, "pretrain", str(tmp_path / "one"), "-o", str(tmp_path / "o2"), "--convert-only")
    assert code == 1 and "only one class ('only')" in err and _one_error(err)
    code, _, err = run_cli(capsys, "pretrain", str(tmp_path / "nothing"), "-o", str(tmp_path / "o3"), "--self-supervised")
    assert code == 1 and "no such file or folder" in err


@pytest.fixture(scope="module")
def raw_phantoms(tmp_path_factory):
    from spineauto.datasets.phantoms import write_phantom_dataset

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pre_raw")
    write_phantom_dataset(root / "Dataset001_Ph", n_train=2, n_test=1, seed=1)
    return root / "Dataset001_Ph"


def _plan(task: str, architecture: str = "resnet_unet"):
    from spineauto.planning.plans import ConfigurationPlan, HeadPlan, NetworkPlan

    heads = [HeadPlan("view", ["a", "b"], [1.0, 1.0])] if task != "segmentation" else []
    return ConfigurationPlan(name=task, task=task, data_identifier="d", slicing="axial", isotropic_plane="axial", target_spacing=[1, 1],
                             patch_size=[64, 64], batch_size=2, normalization=["ZScoreNormalization"], use_mask_for_norm=[False],
                             network=NetworkPlan(architecture=architecture, depth=18), heads=heads)


def test_self_supervised_and_supervised_pretraining_transfer(raw_phantoms, tmp_path, capsys):
    from spineauto.networks.build import build_network
    from spineauto.training.checkpoint import load_pretrained

    imgs = _folder(tmp_path / "imgs", n=2)
    out = tmp_path / "ssl"
    code, _, err = run_cli(capsys, "pretrain", str(raw_phantoms), str(imgs / "MR"), "-o", str(out), "--self-supervised", "--epochs", "1",
                           "--batch-size", "4", "--size", "32", "--iters-per-epoch", "2", "--num-workers", "0", "-np", "1")
    assert code == 0, err
    index = json.loads((out / "shards" / "index.json").read_text())
    volumes = sorted((raw_phantoms / "imagesTr").glob("*.nii.gz")) + sorted((raw_phantoms / "imagesTs").glob("*.nii.gz"))
    slices = sum(sh.count_slices(p) for p in volumes)
    assert index["mode"] == "unlabeled" and index["images"] == slices + 8 and len(index["skipped"]) == 1  # every slice + the MR pictures
    ckpt = torch.load(out / "checkpoint_final.pt", weights_only=False)
    assert ckpt["pretrain"]["method"] == "simclr" and len(ckpt["pretrain"]["history"]) == 1
    assert np.isfinite(ckpt["pretrain"]["history"][0]["loss"])
    for task, arch in (("classification", "resnet"), ("multitask", "resnet_unet"), ("segmentation", "resnet_unet")):
        net = build_network(_plan(task, arch), 1, 2)
        loaded, skipped = load_pretrained(net, out / "checkpoint_final.pt")
        assert all(torch.equal(net.state_dict()[k], ckpt["network"][k]) for k in ckpt["network"])
        assert len([k for k in loaded if k.startswith("encoder.")]) == len(ckpt["network"])
        assert not any(k.startswith("encoder.") for k in skipped)
    # --continue: one more epoch on the same shards; without it an earlier run is refused
    code, _, err = run_cli(capsys, "pretrain", str(raw_phantoms), str(imgs / "MR"), "-o", str(out), "--self-supervised", "--epochs", "2",
                           "--batch-size", "4", "--size", "32", "--iters-per-epoch", "2", "--num-workers", "0", "-np", "1")
    assert code == 1 and "--continue" in err
    code, _, err = run_cli(capsys, "pretrain", str(raw_phantoms), str(imgs / "MR"), "-o", str(out), "--self-supervised", "--epochs", "2",
                           "--batch-size", "4", "--size", "32", "--iters-per-epoch", "2", "--num-workers", "0", "-np", "1", "--continue")
    assert code == 0, err
    assert [h["epoch"] for h in torch.load(out / "checkpoint_final.pt", weights_only=False)["pretrain"]["history"]] == [0, 1]
    # supervised: classes from 2 folder levels, a linear head beside the encoder
    sup = tmp_path / "sup"
    code, _, err = run_cli(capsys, "pretrain", str(imgs), "-o", str(sup), "--class-depth", "2", "--epochs", "1", "--batch-size", "4",
                           "--size", "32", "--iters-per-epoch", "2", "--num-workers", "1", "-np", "2", "--channels", "3")
    assert code == 0, err
    state = torch.load(sup / "checkpoint_final.pt", weights_only=False)
    assert state["pretrain"]["classes"] == ["CT/knee", "CT/spine", "MR/knee", "MR/spine"] and state["head"]["1.weight"].shape == (4, 512)
    net = build_network(_plan("classification", "resnet"), 1, 2)  # 3-channel pretraining into a 1-channel network: conv1 folded
    load_pretrained(net, sup / "checkpoint_final.pt")
    assert torch.allclose(net.state_dict()["encoder.conv1.weight"], state["network"]["encoder.conv1.weight"].sum(1, keepdim=True))
    assert os.path.getsize(sup / "shards" / "shard_00000.npy") == 128 + 17 * 3 * 32 * 32  # one file for 17 images (the truncated one a zero row, label -1): header + uint8 pixels


def test_ddp_two_cpu_processes_pretrain(raw_phantoms, tmp_path):
    """--num-gpus 2 on CPU: torchrun, gloo; rank 0 converts, both train on their half of each batch, NT-Xent gathers negatives."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "spineauto", "pretrain", str(raw_phantoms), "-o", str(out), "--self-supervised",
                           "--epochs", "1", "--batch-size", "4", "--size", "32", "-np", "1", "--iters-per-epoch", "2",
                           "--num-workers", "0", "--device", "cpu", "--num-gpus", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    history = json.loads((out / "pretrain_history.json").read_text())
    assert len(history) == 1 and history[0]["images"] == 8 and np.isfinite(history[0]["loss"])  # 2 steps x 4 images on rank 0
    assert sum(line.startswith("pretrained ") for line in proc.stderr.splitlines()) == 1  # rank 0 reports


def test_sigkill_mid_conversion_then_rerun_resumes(tmp_path):
    """A conversion killed after its first shards: the rerun converts only the rest; every image once."""
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "imgs"
    rng = np.random.default_rng(5)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(150):
            Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(root / c / f"{i:03d}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "spineauto", "pretrain", str(root), "-o", str(out), "--convert-only", "--size", "32",
           "--shard-size", "10", "-np", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "shards").glob("*.done.json"))) < 3 and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted((out / "shards").glob("*.done.json"))
    assert 3 <= len(done) < 30, "the kill came too late to interrupt the conversion"
    first = {p.name: p.stat().st_mtime_ns for p in done}
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    assert {p.name: p.stat().st_mtime_ns for p in done} == first  # the finished shards were not redone
    data = sh.ShardSet(out / "shards")
    assert len(data) == 300 and np.bincount(data.labels).tolist() == [150, 150]
    assert len(list((out / "shards").glob("shard_*.npy"))) == 60 and not list((out / "shards").glob(".*"))
