"""Robustness of `spineauto predict` and `spineauto ensemble` on generated broken inputs.

Every scenario builds its broken input from phantoms and tiny random models, runs the real command
and checks the exit code, exactly one `error:` line (or none) without a traceback, the warnings it
must log, which files the output holds, and that nothing else changed: every file of the world
(inputs, earlier results, the model, the raw and preprocessed data) is hashed before and after.
A last test SIGKILLs `spineauto predict` at seeded moments (between cases, or inside an atomic
write) and reruns it: no partial output under a final name (a kill inside a write leaves only
io.atomic's hidden temporary), no temporary file after the rerun, masks identical to an
uninterrupted run.

Scenarios (45, plus 3 kill moments): class 1 output apart from inputs / case names, class 2 no
silent wrong output, class 3 ensemble per case, class 4 permission, path and postprocessing-file
errors, and the temporaries of a killed run. Permission scenarios run the command as `nobody`
(seteuid) when the tests run as root, which ignores permission bits.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import remove_tree, run_cli
from test_inference_support import make_model_folder

torch.set_num_threads(2)
CASES = ("phantom_004", "phantom_005", "phantom_006")  # the scans of the earlier results
KILL_CASES = 6
TEMPORARY = re.compile(r"^\..+\.tmp(\.nii\.gz|\.nii|\.npz)?$|^\.spineauto_write_test$")  # io.atomic's temporary names


@dataclass
class World:
    root: Path  # readable by everyone, so that a scenario can run as an unprivileged user
    model: Path  # 2-fold random model folder
    scans: Path  # three test scans <case>_0000.nii.gz
    earlier_a: Path  # predict -f 0 --save-probabilities of scans
    earlier_b: Path  # predict -f 1 --save-probabilities of scans
    kill_in: Path  # six test scans for the kill-and-rerun test


@pytest.fixture(scope="module")
def world():
    from spineauto.datasets.phantoms import write_phantom_dataset
    from spineauto.inference.model import load_model
    from spineauto.inference.predict import predict_folder
    from spineauto.plan_and_preprocess import plan_and_preprocess

    root = Path(tempfile.mkdtemp(prefix="spineauto_robustness_"))
    root.chmod(0o755)
    try:
        env = {k: root / k for k in ("raw", "preprocessed", "results")}
        with pytest.MonkeyPatch.context() as mp:
            for k, p in env.items():
                p.mkdir()
                mp.setenv(f"SPINEAUTO_{k.upper()}", str(p))
            write_phantom_dataset(env["raw"] / "Dataset001_Ph", n_train=4, n_test=KILL_CASES, seed=0)
            plan_and_preprocess(1, workers=1)
        # random networks in one pass: every label lands where the network puts it (a second pass around the
        # cord component would crop the rest away, and some scenarios need each label in the masks)
        model = make_model_folder(env["preprocessed"] / "Dataset001_Ph", env["results"], folds=(0, 1), one_pass=True)
        tests = env["raw"] / "Dataset001_Ph" / "imagesTs"
        w = World(root, model, root / "scans", root / "earlier_a", root / "earlier_b", root / "kill_in")
        w.scans.mkdir()
        for case in CASES:
            shutil.copy(tests / f"{case}_0000.nii.gz", w.scans)
        shutil.copytree(tests, w.kill_in)
        for fold, out in (("0", w.earlier_a), ("1", w.earlier_b)):
            predict_folder(load_model(model, [fold]), w.scans, out, tta=False, save_probabilities=True)
        (root / "s").mkdir()
        yield w
    finally:
        remove_tree(root)  # scenarios may leave unreadable files behind on failure


# ---------------------------------------------------------------------------------------------
# helpers


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Hash of every file under ``root`` (hidden ones too), except those under ``skip``."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        if p.is_file() and not p.is_symlink():
            try:
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
            except PermissionError:  # an unreadable input of a scenario, when not run as root
                st = p.stat()
                out[str(p.relative_to(root))] = f"{st.st_size}:{st.st_mtime_ns}"
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = "dir"
    return out


@contextlib.contextmanager
def unprivileged():
    """Run the block as an ordinary user: root ignores permission bits (the CLI runs in-process)."""
    if os.geteuid() != 0:
        yield
        return
    try:
        os.seteuid(65534)
    except OSError as e:
        pytest.skip(f"cannot drop privileges to test permissions ({e})")
    try:
        yield
    finally:
        os.seteuid(0)


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    return path


def scan(w: World, case: str = "phantom_004") -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(w.scans / f"{case}_0000.nii.gz"))
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def folder_of(w: World, d: Path, *names: str) -> Path:
    """``d/in`` holding copies of good scans under ``names`` (``a_0000.nii.gz``, ``b.nii.gz``, ``c.nii``, ...)."""
    inp = d / "in"
    inp.mkdir(exist_ok=True)
    for name, case in zip(names, CASES * 3):
        save(inp / name, *scan(w, case))
    return inp


def predict_args(w: World, inp: Path, out: Path, *extra) -> list:
    return ["predict", "-d", "1", "-m", w.model, "-i", inp, "-o", out, "-f", "0", "--no-tta", "--device", "cpu", *extra]


@dataclass
class Expect:
    code: int
    error: tuple[str, ...] | None = None  # words of the single `error:` line; None: no error line
    logged: tuple[str, ...] = ()  # words that must appear in the log
    output: Path | None = None  # the only folder allowed to change
    written: set[str] | None = None  # exactly these visible files in ``output`` afterwards
    absent: Path | None = None  # a path that must not have been created
    as_user: bool = False  # run as an unprivileged user (permission scenarios)
    restore: tuple[Path, ...] = ()  # chmod 0o755 afterwards


SCENARIOS: dict[str, Callable[[World, Path], tuple[list, Expect]]] = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


# ---------------------------------------------------------------------------------------------
# class 1: the output never overlaps an input; case names resolved per file, clashes are errors


@scenario
def out_is_input(w, d):
    return predict_args(w, w.scans, w.scans), Expect(1, ("must lie outside the input",))


@scenario
def out_inside_input(w, d):
    return predict_args(w, w.scans, w.scans / "masks"), Expect(1, ("must lie outside the input",), absent=w.scans / "masks")


@scenario
def out_contains_input(w, d):
    return predict_args(w, folder_of(w, d, "a_0000.nii.gz"), d), Expect(1, ("must lie outside the input",))


@scenario
def out_holds_input_file(w, d):
    inp = folder_of(w, d, "a_0000.nii.gz")
    return predict_args(w, inp / "a_0000.nii.gz", inp), Expect(1, ("must lie outside the input", "contains that file"))


@scenario
def roi_folder_is_output(w, d):  # an earlier result read as --roi may not be overwritten either
    return predict_args(w, w.scans, w.earlier_a, "--roi", w.earlier_a), Expect(1, ("must lie outside the input",))


@scenario
def out_inside_model_folder(w, d):
    out = w.model / "fold_0" / "predictions"
    return predict_args(w, w.scans, out), Expect(1, ("must lie outside the model folder",), absent=out)


@scenario
def ensemble_out_is_input(w, d):
    return ["ensemble", "-i", w.earlier_a, w.earlier_b, "-o", w.earlier_b], Expect(1, ("must lie outside the input",))


@scenario
def ensemble_out_inside_input(w, d):
    out = w.earlier_a / "ens"
    return ["ensemble", "-i", w.earlier_a, w.earlier_b, "-o", out], Expect(1, ("must lie outside the input",), absent=out)


@scenario
def mixed_naming(w, d):
    inp = folder_of(w, d, "a_0000.nii.gz", "b.nii.gz", "c.nii")
    return predict_args(w, inp, d / "out"), Expect(0, output=d / "out", written={"a.nii.gz", "b.nii.gz", "c.nii.gz"})


@scenario
def name_clash(w, d):
    inp = folder_of(w, d, "c_0000.nii.gz", "c.nii.gz", "e.nii.gz")
    return predict_args(w, inp, d / "out"), Expect(1, ("c.nii.gz and c_0000.nii.gz both give case 'c'",), absent=d / "out")


@scenario
def name_clash_nii_and_gz(w, d):
    inp = folder_of(w, d, "c.nii", "c.nii.gz")
    return predict_args(w, inp, d / "out"), Expect(1, ("c.nii and c.nii.gz both give case 'c'",), absent=d / "out")


# ---------------------------------------------------------------------------------------------
# class 2: no silent wrong output


def _broken_voxels(w, d, value):
    inp = folder_of(w, d, "a_0000.nii.gz")
    data, affine = scan(w, "phantom_005")
    data[3, 4, 5] = value
    save(inp / "bad_0000.nii.gz", data, affine)
    return predict_args(w, inp, d / "out"), Expect(1, ("1 of 2 case(s) failed", "bad_0000.nii.gz", "1 NaN/Inf voxel(s)"),
                                                   output=d / "out", written={"a.nii.gz"})


@scenario
def nan_voxel(w, d):
    return _broken_voxels(w, d, np.nan)


@scenario
def inf_voxel(w, d):
    return _broken_voxels(w, d, -np.inf)


@scenario
def nan_everywhere_and_a_good_case(w, d):
    inp = folder_of(w, d, "a_0000.nii.gz", "b_0000.nii.gz")
    data, affine = scan(w)
    save(inp / "allnan_0000.nii.gz", np.full_like(data, np.nan), affine)
    return predict_args(w, inp, d / "out"), Expect(1, ("1 of 3 case(s) failed", "allnan_0000.nii.gz", "NaN/Inf"),
                                                   output=d / "out", written={"a.nii.gz", "b.nii.gz"})


@scenario
def all_zero_input(w, d):
    inp = folder_of(w, d, "a_0000.nii.gz")
    data, affine = scan(w)
    save(inp / "zero_0000.nii.gz", np.zeros_like(data), affine)
    return predict_args(w, inp, d / "out"), Expect(0, logged=("zero:", "all zero"), output=d / "out",
                                                   written={"a.nii.gz", "zero.nii.gz"})


@scenario
def sheared_affine(w, d):
    inp = folder_of(w, d, "a_0000.nii.gz")
    data, affine = scan(w)
    affine = affine.copy()
    affine[:3, 1] += 0.2 * affine[:3, 0]  # the second voxel axis leans towards the first
    save(inp / "shear_0000.nii.gz", data, affine)
    return predict_args(w, inp, d / "out"), Expect(0, logged=("shear:", "sheared"), output=d / "out",
                                                   written={"a.nii.gz", "shear.nii.gz"})


@scenario
def undeclared_predicted_labels(w, d):
    model = d / "model"
    shutil.copytree(w.model, model)
    plans = json.loads((model / "plans.json").read_text())
    plans["labels"] = {"background": 0, "cord": 2}  # three outputs, but value 1 is not declared
    (model / "plans.json").write_text(json.dumps(plans))
    args = predict_args(w, folder_of(w, d, "a_0000.nii.gz"), d / "out")
    args[args.index("-m") + 1] = model
    return args, Expect(0, logged=("a:", "predicted label value(s) [1]", "does not declare"), output=d / "out",
                        written={"a.nii.gz"})


# ---------------------------------------------------------------------------------------------
# class 3: ensemble writes every good case and reports the failed ones


def _copies(w, d):
    a, b = d / "a", d / "b"
    shutil.copytree(w.earlier_a, a)
    shutil.copytree(w.earlier_b, b)
    return a, b


@scenario
def ensemble_corrupt_and_missing_npz(w, d):
    a, b = _copies(w, d)
    (a / "phantom_004.npz").write_bytes(b"PK\x03\x04 truncated")
    (b / "phantom_005.npz").unlink()
    return ["ensemble", "-i", a, b, "-o", d / "out"], Expect(
        1, ("2 of 3 case(s) failed", "phantom_004"), logged=("phantom_005:", "missing;"), output=d / "out",
        written={"phantom_006.nii.gz"})


@scenario
def ensemble_shape_mismatch(w, d):
    a, b = _copies(w, d)
    shutil.copy(b / "phantom_006.npz", b / "phantom_005.npz")  # another image's probabilities
    return ["ensemble", "-i", a, b, "-o", d / "out", "--save-probabilities"], Expect(
        1, ("1 of 3 case(s) failed", "phantom_005", "differ"), output=d / "out",
        written={"phantom_004.nii.gz", "phantom_004.npz", "phantom_006.nii.gz", "phantom_006.npz"})


def _rewrite_npz(path: Path, **changes) -> None:
    with np.load(path) as z:
        items = {k: z[k] for k in z.files}
    for key, change in changes.items():
        items[key] = change(items[key])
    with open(path, "wb") as f:
        np.savez_compressed(f, **items)


@scenario
def ensemble_nan_probabilities(w, d):
    a, b = _copies(w, d)

    def nan(probs):
        probs[0, 0, 0, 0] = np.nan
        return probs
    _rewrite_npz(a / "phantom_006.npz", probabilities=nan)
    return ["ensemble", "-i", a, b, "-o", d / "out"], Expect(
        1, ("1 of 3 case(s) failed", "phantom_006", "not finite"), output=d / "out",
        written={"phantom_004.nii.gz", "phantom_005.nii.gz"})


@scenario
def ensemble_undeclared_labels(w, d):
    a, b = _copies(w, d)
    for folder in (a, b):  # probabilities of three labels, of which the models declare only 0 and 2
        _rewrite_npz(folder / "phantom_004.npz", labels=lambda _: np.asarray([0, 2]))
    return ["ensemble", "-i", a, b, "-o", d / "out"], Expect(
        0, logged=("phantom_004:", "predicted label value(s) [1]"), output=d / "out",
        written={"phantom_004.nii.gz", "phantom_005.nii.gz", "phantom_006.nii.gz"})


# ---------------------------------------------------------------------------------------------
# class 4: permission and path errors are one line naming the path


@scenario
def readonly_output(w, d):
    out = d / "out"
    out.mkdir()
    out.chmod(0o555)
    return predict_args(w, w.scans, out), Expect(1, (str(out), "output folder is not writable"), as_user=True, restore=(out,))


@scenario
def readonly_output_ensemble(w, d):
    out = d / "out"
    out.mkdir()
    out.chmod(0o555)
    return ["ensemble", "-i", w.earlier_a, w.earlier_b, "-o", out], Expect(1, (str(out), "not writable"), as_user=True,
                                                                          restore=(out,))


@scenario
def output_is_a_file(w, d):
    (d / "out").write_text("not a folder")
    return predict_args(w, w.scans, d / "out"), Expect(1, (str(d / "out"), "is not a folder"))


@scenario
def output_below_a_file(w, d):
    (d / "file").write_text("not a folder")
    return predict_args(w, w.scans, d / "file" / "out"), Expect(1, (str(d / "file" / "out"), "not writable"))


@scenario
def unreadable_input_file(w, d):
    inp = folder_of(w, d, "a_0000.nii.gz", "b_0000.nii.gz")
    (inp / "b_0000.nii.gz").chmod(0)
    return predict_args(w, inp, d / "out"), Expect(1, ("1 of 2 case(s) failed", "b_0000.nii.gz"), output=d / "out",
                                                   written={"a.nii.gz"}, as_user=True, restore=(inp / "b_0000.nii.gz",))


@scenario
def unreadable_input_folder(w, d):
    inp = folder_of(w, d, "a_0000.nii.gz")
    inp.chmod(0)
    return predict_args(w, inp, d / "out"), Expect(1, (str(inp), "cannot read the input folder"), absent=d / "out",
                                                   as_user=True, restore=(inp,))


@scenario
def case_output_is_a_folder(w, d):
    out = d / "out"
    (out / "a.nii.gz").mkdir(parents=True)
    return predict_args(w, folder_of(w, d, "a_0000.nii.gz", "b_0000.nii.gz"), out), Expect(
        1, ("1 of 2 case(s) failed", "a.nii.gz"), output=out, written={"a.nii.gz", "b.nii.gz"})


BAD_POSTPROCESSING = {
    "not_json": b'{"largest_component_labels": [1',
    "empty": b"",
    "binary": b"\xff\xfe\x00\x01",
    "a_list": b"[1, 2]",
    "null": b"null",
    "labels_a_string": b'{"largest_component_labels": "1"}',
    "labels_a_dict": b'{"largest_component_labels": {"1": 1}}',
    "float_label": b'{"largest_component_labels": [1.5]}',
    "bool_label": b'{"largest_component_labels": [true]}',
    "nan_label": b'{"largest_component_labels": [NaN]}',
    "negative_label": b'{"largest_component_labels": [-1]}',
    "background_label": b'{"largest_component_labels": [0]}',
    "deep_nesting": b"[" * 100_000,
}


def _bad_pp(name):
    def build(w, d):
        pp = d / "postprocessing.json"
        pp.write_bytes(BAD_POSTPROCESSING[name])
        return ["ensemble", "-i", w.earlier_a, w.earlier_b, "-o", d / "out", "--postprocessing", pp], Expect(
            1, (str(pp),), absent=d / "out")
    build.__name__ = f"ensemble_postprocessing_{name}"
    return scenario(build)


for _name in BAD_POSTPROCESSING:
    _bad_pp(_name)


@scenario
def ensemble_postprocessing_a_folder(w, d):
    (d / "pp").mkdir()
    return ["ensemble", "-i", w.earlier_a, w.earlier_b, "-o", d / "out", "--postprocessing", d / "pp"], Expect(
        1, (str(d / "pp"), "it is a folder"), absent=d / "out")


def _model_with_postprocessing(w, d, text: str):
    model = d / "model"
    shutil.copytree(w.model, model)
    (model / "postprocessing.json").write_text(text)
    args = predict_args(w, w.scans, d / "out")
    args[args.index("-m") + 1] = model
    return args, model / "postprocessing.json"


@scenario
def model_postprocessing_a_list(w, d):
    args, pp = _model_with_postprocessing(w, d, "[1]")
    return args, Expect(1, (str(pp), "not a postprocessing file"), absent=d / "out")


@scenario
def model_postprocessing_undeclared_label(w, d):
    args, pp = _model_with_postprocessing(w, d, '{"largest_component_labels": [7]}')
    return args, Expect(1, (str(pp), "[7] are not labels of the model"), absent=d / "out")


# ---------------------------------------------------------------------------------------------
# what a killed run left (see also test_kill_and_rerun)


@scenario
def stale_temporaries_of_a_killed_run(w, d):
    out = d / "out"
    out.mkdir()
    (out / ".a.nii.gz.k1ll3d00.tmp.nii.gz").write_bytes(b"\x1f\x8b half a mask")  # as io.atomic names them
    (out / ".a.npz.k1ll3d01.tmp.npz").write_bytes(b"PK half")
    return predict_args(w, folder_of(w, d, "a_0000.nii.gz"), out, "--save-probabilities"), Expect(
        0, output=out, written={"a.nii.gz", "a.npz"})


# ---------------------------------------------------------------------------------------------
# the runner


def _visible(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_broken_input(world, name, capsys):
    d = world.root / "s" / name
    d.mkdir()
    args, expect = SCENARIOS[name](world, d)
    if expect.as_user:
        d.chmod(0o777)  # the user may write its output there
    before = snapshot(world.root, skip=expect.output)
    try:
        with unprivileged() if expect.as_user else contextlib.nullcontext():
            code, _, err = run_cli(capsys, *map(str, args))
    finally:
        for p in expect.restore:
            p.chmod(0o755)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.lstrip().startswith("error:")]
    assert code == expect.code, err
    text = " ".join(err.split())
    if expect.error is None:
        assert errors == [], err
    else:
        assert len(errors) == 1, err
        line = " ".join(err[err.index("error:"):].split())  # the error line, unwrapped
        for word in expect.error:
            assert word in line, line
    for word in expect.logged:
        assert word in text, text
    assert snapshot(world.root, skip=expect.output) == before, "a file outside the expected outputs changed"
    if expect.absent is not None:
        assert not expect.absent.exists()
    if expect.written is not None:
        assert _visible(expect.output) == expect.written
        assert not [p.name for p in expect.output.iterdir() if TEMPORARY.match(p.name)]
        for name in expect.written:
            if name.endswith(".nii.gz") and (expect.output / name).is_file():
                assert nib.load(str(expect.output / name)).get_data_dtype() == np.uint8


# ---------------------------------------------------------------------------------------------
# kill and rerun


def _killable_predict(world: World, out: Path) -> subprocess.Popen:
    """`spineauto predict` of the six kill_in scans in a process of its own (its log beside ``out``)."""
    env = dict(os.environ, OMP_NUM_THREADS="2",  # as this process (torch.set_num_threads above)
               **{f"SPINEAUTO_{k.upper()}": str(world.root / k) for k in ("raw", "preprocessed", "results")})
    args = [sys.executable, "-m", "spineauto", *map(str, predict_args(world, world.kill_in, out, "--save-probabilities"))]
    with open(out.with_suffix(".log"), "w") as log:
        return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log)


def _predict(world: World, out: Path, capsys) -> dict[str, np.ndarray]:
    """The same command run to its end (in this process, to save a start-up): what it wrote."""
    code, _, err = run_cli(capsys, *map(str, predict_args(world, world.kill_in, out, "--save-probabilities")))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.name[:-12]}{e}" for p in world.kill_in.iterdir()
                                                            for e in (".nii.gz", ".npz"))  # and nothing else
    return _outputs(out)


def _outputs(out: Path) -> dict[str, np.ndarray]:
    """Masks and probabilities under their final names (temporaries, hidden, are left out)."""
    arrays = {}
    for p in sorted(out.iterdir()):
        if p.name.startswith("."):
            continue
        if p.name.endswith(".nii.gz"):
            arrays[p.name] = np.asarray(nib.load(str(p)).dataobj)
        elif p.name.endswith(".npz"):
            with np.load(p) as z:
                arrays[p.name] = z["probabilities"]
    return arrays


def _temporaries(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if TEMPORARY.match(p.name) and p.name != ".spineauto_write_test"] if out.is_dir() else []


@pytest.mark.parametrize("seed,moment", [(0, "between cases"), (1, "between cases"), (2, "in a write")])
def test_kill_and_rerun(world, seed, moment, capsys):
    """SIGKILL predict at a seeded moment: after a seeded number of finished cases plus a seeded
    delay, or as soon as a temporary file of a seeded write exists. Every file it left under a
    final name is complete and right, hidden files are only temporaries of an atomic write, and a
    rerun removes those and writes exactly the masks of an uninterrupted run."""
    reference = world.root / "uninterrupted"
    if not reference.is_dir():
        _predict(world, reference, capsys)
    uninterrupted = _outputs(reference)
    rng = random.Random(seed)
    after, delay = rng.randrange(0, KILL_CASES - 2), rng.uniform(0.0, 0.15)
    before = snapshot(world.kill_in)
    out = world.root / f"killed_{seed}"
    proc = _killable_predict(world, out)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        done = len([p for p in out.glob("*.nii.gz") if not p.name.startswith(".")]) if out.is_dir() else -1
        if done >= after and (moment == "between cases" or _temporaries(out)):
            break
        time.sleep(0.001)
    if moment == "between cases":
        time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, f"predict finished before the kill ({moment}, after {after} cases)"
    if out.is_dir():
        left = _outputs(out)
        assert set(left) <= set(uninterrupted)
        for name, array in left.items():  # written by another process: the same up to float rounding
            np.testing.assert_allclose(array, uninterrupted[name], atol=1e-6, err_msg=name)
        stray = [p.name for p in out.iterdir() if p.name.startswith(".") and not TEMPORARY.match(p.name)]
        assert not stray
    rerun = _predict(world, out, capsys)  # no temporary file remains (checked there)
    assert rerun.keys() == uninterrupted.keys()
    for name, array in uninterrupted.items():
        np.testing.assert_array_equal(rerun[name], array, err_msg=name)
    assert snapshot(world.kill_in) == before
