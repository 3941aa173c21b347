"""Opening bundles: a zip (``spineauto export``) that ``predict`` and ``pipeline`` accept directly.

A bundle holds one top-level folder: a model folder (``plans.json``, ``dataset.json``,
``postprocessing.json`` when decided, the chosen checkpoints; no raw or preprocessed data, as
nnU-Net's model zips) or a pipeline (``pipeline.yaml`` and its model folders). Opening a bundle
extracts it once per process into a temporary folder that is removed at exit (or SIGTERM); one
left by a killed process is removed by the next bundle opened.

What a bundle can do on opening: be unpacked and read. Its member names, sizes and total are checked
before anything is extracted (no absolute or ``..`` path, no member over :data:`MAX_MEMBER_BYTES`,
none compressed more than :data:`MAX_RATIO` times, at most :data:`MAX_TOTAL_BYTES` in all and no
more than the temporary folder's free space); a damaged member (bad CRC) is one line. Its
checkpoints are loaded without running code (:mod:`spineauto.io.checkpoints`) and the network its
``plans.json`` names must be a built-in or an ``nn.Module`` class (:mod:`spineauto.networks.registry`).
A bundle too large for these limits can be unzipped by hand and its folder passed instead.
"""
from __future__ import annotations

import atexit
import errno
import os
import shutil
import socket
import tempfile
import zipfile
import zlib
from pathlib import Path

from spineauto.errors import SpineautoError
from spineauto.io.atomic import write_atomic
from spineauto.io.outputs import check_output_apart

_opened: dict[Path, Path] = {}
MAX_MEMBER_BYTES = 768 << 20  # the largest checkpoint a plan of ours writes (a 32-512 U-Net with Adam state) is ~530 MB
MAX_TOTAL_BYTES = 16 << 30  # a pipeline of five models with five folds each
MAX_RATIO = 100  # checkpoints barely compress; JSON/YAML ~10x; a zip bomb 1000x


def write_zip(target: Path, write) -> Path:
    if target.suffix != ".zip":
        raise SpineautoError(f"{target}: a bundle is a .zip file; name it e.g. model.zip")
    check_output_apart([], target, what="the bundle", hint="write it outside datasets and model folders")
    return write_atomic(target, write, suffix=".zip")


def open_bundle(path: Path) -> Path:
    """The folder a bundle unpacks to (once per process); its single top-level folder."""
    path = Path(path).resolve()
    if path in _opened:
        return _opened[path]
    if not zipfile.is_zipfile(path):
        raise SpineautoError(f"{path}: not a zip bundle; write one with `spineauto export`")
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
            check_members(path, members, Path(tempfile.gettempdir()))
            remove_orphans(Path(tempfile.gettempdir()))
            dest = Path(tempfile.mkdtemp(prefix=f"spineauto_bundle_{os.getpid()}_{_HOST}_"))
            atexit.register(shutil.rmtree, dest, True)
            z.extractall(dest)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise SpineautoError(f"{path}: a damaged bundle ({' '.join(str(e).split())[:200]}); copy it again or write it again with "
                             "`spineauto export`") from None
    except OSError as e:
        raise SpineautoError(f"{e.filename or tempfile.gettempdir()}: cannot unpack the bundle {path.name} "
                             f"({'no space left' if e.errno == errno.ENOSPC else e.strerror or e}); free space or set TMPDIR") from None
    tops = [p for p in dest.iterdir()]
    if len(tops) != 1 or not tops[0].is_dir():
        raise SpineautoError(f"{path}: a bundle holds exactly one top-level folder; rewrite it with `spineauto export`")
    _opened[path] = tops[0]
    return tops[0]


_HOST = "".join(c for c in socket.gethostname() if c.isalnum())[:32] or "host"  # process ids mean something on one host only


def remove_orphans(tmp: Path) -> None:
    """Remove the unpacked bundles of this host's processes that are gone (killed before their exit
    handler ran); a folder of another host (a shared TMPDIR) or of an older naming is left alone."""
    for folder in tmp.glob(f"spineauto_bundle_*_{_HOST}_*"):
        pid = folder.name.split("_")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # alive, another user's
            continue


def check_members(path: Path, members: list[zipfile.ZipInfo], into: Path) -> None:
    """Refuse unsafe names and sizes before anything is extracted (declared sizes bound what zipfile extracts)."""
    total = 0
    for m in members:
        name = m.filename
        if name.startswith("/") or ".." in Path(name).parts:
            raise SpineautoError(f"{path}: unsafe path {name[:200]!r} in the bundle; refusing to unpack it")
        if m.file_size > MAX_MEMBER_BYTES:
            raise SpineautoError(f"{path}: member {name[:200]!r} is {m.file_size / 2**20:.0f} MiB unpacked, more than a bundle's "
                                 f"{MAX_MEMBER_BYTES >> 20} MiB per file; refusing to unpack it (unzip it yourself if you trust it)")
        if m.file_size > MAX_RATIO * max(m.compress_size, 1) and m.file_size > 1 << 20:
            raise SpineautoError(f"{path}: member {name[:200]!r} unpacks {m.file_size // max(m.compress_size, 1)} times larger than it is "
                                 "stored (a zip bomb?); refusing to unpack it")
        total += m.file_size
    if total > MAX_TOTAL_BYTES:
        raise SpineautoError(f"{path}: unpacks to {total / 2**30:.1f} GiB, more than a bundle's {MAX_TOTAL_BYTES >> 30} GiB; "
                             "refusing to unpack it (unzip it yourself if you trust it)")
    free = shutil.disk_usage(into).free
    if total > free:
        raise SpineautoError(f"{into}: no space left to unpack {path.name} ({total / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free); "
                             "free space or set TMPDIR to a larger disk")


def model_folder_of(path: Path) -> Path:
    """A model folder, or the folder inside a model bundle (.zip)."""
    path = Path(path)
    return open_bundle(path) if path.is_file() and path.suffix == ".zip" else path
