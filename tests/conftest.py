"""Shared fixtures: isolated spineauto folders, the real data beside the checkout, phantom datasets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does, before torch starts OpenMP

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sct_testing_data"


def require_real_data() -> Path:
    """The real data folder; fails the test in CI (CI set) when missing, skips elsewhere."""
    if REAL_DATA.is_dir():
        return REAL_DATA
    if os.environ.get("CI"):
        pytest.fail(f"real data missing at {REAL_DATA}; CI must run with ../shared beside the checkout")
    pytest.skip(f"real data not found at {REAL_DATA}")


@pytest.fixture
def real_data() -> Path:
    return require_real_data()


@pytest.fixture
def spineauto_env(tmp_path, monkeypatch) -> dict[str, Path]:
    """SPINEAUTO_RAW / _PREPROCESSED / _RESULTS pointing into tmp_path; W&B off unless a test says otherwise."""
    folders = {k: tmp_path / k for k in ("raw", "preprocessed", "results")}
    for k, p in folders.items():
        p.mkdir()
        monkeypatch.setenv(f"SPINEAUTO_{k.upper()}", str(p))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return folders


# Real image / cord-mask pairs (see ../shared/data/README.md): case id -> (image, mask, view, sequence)
REAL_PAIRS = {
    "t2": ("t2/t2.nii.gz", "t2/t2_seg-manual.nii.gz", "sagittal", "T2w"),
    "t1": ("t1/t1w.nii.gz", "t1/t1w_seg-manual.nii.gz", "sagittal", "T1w"),
    "t2s": ("t2s/t2s.nii.gz", "t2s/t2s_seg.nii.gz", "axial", "T2starw"),
    "mt1": ("mt/mt1.nii.gz", "mt/mt1_seg.nii.gz", "axial", "MT"),
    "mt0": ("mt/mt0.nii.gz", "mt/mt0_seg.nii.gz", "axial", "MT"),
    "lesion": ("t2/t2_fake_lesion.nii.gz", "t2/t2_fake_lesion_sc_seg.nii.gz", "sagittal", "T2w"),
}


def layout_real_dataset(raw_root: Path, dataset_id: int = 1, name: str = "RealCord") -> Path:
    """The six real image/cord pairs as an nnU-Net v2 raw dataset (plus view classes)."""
    import json
    import shutil

    src = require_real_data()
    folder = raw_root / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case, (img, seg, _, _) in REAL_PAIRS.items():
        shutil.copy(src / img, folder / "imagesTr" / f"{case}_0000.nii.gz")
        shutil.copy(src / seg, folder / "labelsTr" / f"{case}.nii.gz")
    ds = {
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "cord": 1}, "numTraining": len(REAL_PAIRS),
        "file_ending": ".nii.gz", "heads": {"view": ["axial", "sagittal"]},
        "cases": {c: {"subject": "sub-lesion" if c == "lesion" else "sub-01", "classes": {"view": v[2]}} for c, v in REAL_PAIRS.items()},
    }
    (folder / "dataset.json").write_text(json.dumps(ds, indent=2))
    return folder


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `spineauto ARGS` in-process through the real entry point: (exit code, stdout, stderr)."""
    import sys

    from spineauto.cli import main

    argv = sys.argv
    sys.argv = ["spineauto", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err


def planned_phantoms(root: Path, n_train: int, n_test: int, seed: int) -> dict[str, Path]:
    """raw/preprocessed/results under ``root`` with Dataset001_Ph: phantoms written, planned and preprocessed."""
    from spineauto.datasets.phantoms import write_phantom_dataset
    from spineauto.plan_and_preprocess import plan_and_preprocess

    env = {k: root / k for k in ("raw", "preprocessed", "results")}
    with pytest.MonkeyPatch.context() as mp:
        for k, p in env.items():
            p.mkdir()
            mp.setenv(f"SPINEAUTO_{k.upper()}", str(p))
        write_phantom_dataset(env["raw"] / "Dataset001_Ph", n_train=n_train, n_test=n_test, seed=seed)
        plan_and_preprocess(1, workers=1)
    return env


def remove_tree(root: Path) -> None:
    """Delete a test's folder, first making readable what a failed permission scenario left unreadable."""
    import contextlib
    import shutil

    for p in root.rglob("*"):
        with contextlib.suppress(OSError):
            p.chmod(0o755)
    shutil.rmtree(root, ignore_errors=True)


def tiny_phantom_env(root: Path, n_train: int, n_test: int, seed: int):
    """For a module fixture (``yield from``): Dataset001_Ph planned under ``root`` with test_training's
    tiny plan, the SPINEAUTO_* variables set (W&B off) while the fixture lives, the tree removed after."""
    from test_training import tiny_plan

    env = planned_phantoms(root, n_train=n_train, n_test=n_test, seed=seed)
    tiny_plan(env["preprocessed"] / "Dataset001_Ph" / "plans.json")
    mp = pytest.MonkeyPatch()
    for k, p in env.items():
        mp.setenv(f"SPINEAUTO_{k.upper()}", str(p))
    mp.setenv("WANDB_MODE", "disabled")
    try:
        yield root
    finally:
        mp.undo()
        remove_tree(root)


def fold_history(fold: Path) -> list[dict]:
    """A trained fold's per-epoch rows (metrics.jsonl)."""
    import json

    return [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]


def torchrun_training(tmp_path: Path, n: int, fold, options: str) -> list[dict]:
    """``torchrun --standalone --nproc_per_node=n`` of ``train_fold(1, "2d", fold, TrainOptions(<options>))``
    (one OpenMP thread per process, tests/ importable for plug-ins); each rank's final weights on the CPU."""
    import subprocess
    import sys

    import torch

    script = tmp_path / "ddp_train.py"
    script.write_text(f"""
import torch
from spineauto.training import trainer as T
fit = T.Trainer.fit
def fit_and_dump(self):
    fit(self)
    torch.save({{k: v.cpu() for k, v in self.network.state_dict().items()}}, r"{tmp_path}/rank%d.pt" % self.info.rank)
T.Trainer.fit = fit_and_dump
torch.set_num_threads(1)
T.train_fold(1, "2d", {fold!r}, T.TrainOptions({options}))
""")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(script)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(n)]
