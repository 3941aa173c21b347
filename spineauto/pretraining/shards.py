"""Image folders and raw datasets -> a few large memory-mapped shards with one index.

Layout of a shard folder (what ``spineauto pretrain`` writes under ``OUT/shards/``)::

    index.json              what was converted: sources, size, channels, classes, the shards, the skipped files
    shard_00000.npy         uint8 array (n, channels, size, size), read with np.load(mmap_mode="r")
    shard_00000.labels.npy  int32 (n,): class index; -1 = the image was unreadable (skipped, listed in index.json)
    shard_00000.done.json   written last: the shard is complete (a rerun skips it)

Conversion is planned first (every file listed, sorted, its images counted from the header), then
each shard is converted by a worker process into a temporary file renamed when complete: a rerun
after an interruption converts only the shards without ``done.json``; nothing is duplicated, since
shard k always holds the same items. A plan that differs from the interrupted one (other files,
size or channels) is refused unless ``overwrite``.

Every image becomes ``channels`` x ``size`` x ``size`` uint8: 8-bit pictures keep their values, any
other (16-bit PNG, DICOM, NIfTI) is clipped to its 0.5-99.5 percentiles and scaled to 0-255; colour
becomes grey (luminance) for 1 channel, grey is repeated for 3; the longer side is resized to
``size`` (bilinear) and the shorter one zero-padded, centred (nothing is cut off). Supervised: one
image per file (the middle slice of a volume or multi-frame DICOM). Unlabeled: every slice of a
volume across its acquisition axis (the axis of the largest voxel spacing; ties: the fewest voxels).
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from spineauto.errors import SpineautoError
from spineauto.io.atomic import read_json, write_json

log = logging.getLogger(__name__)
FORMAT = 1
PICTURES = (".png", ".jpg", ".jpeg")
SUFFIXES = (*PICTURES, ".dcm", ".nii", ".nii.gz")
INDEX = "index.json"


def _suffix(p: Path) -> str:
    name = p.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else p.suffix.lower()


def _is_image(p: Path) -> bool:
    return _suffix(p) in SUFFIXES and not p.name.startswith(".") and p.is_file()


@dataclass
class Item:
    path: str
    slice: int  # -1: the file's one image (or middle slice); k: slice k across the acquisition axis
    label: int


def _slice_axis(shape: tuple, zooms: tuple) -> int:
    axes = list(range(min(len(shape), 3)))
    return max(axes, key=lambda a: (round(float(zooms[a]), 3), -shape[a]))


def count_slices(path: Path) -> int:
    """Images a file holds in unlabeled mode (volume slices); 0 when its header is unreadable."""
    suffix = _suffix(path)
    if suffix in (".nii", ".nii.gz"):
        import nibabel as nib

        try:
            img = nib.load(path)
            shape, zooms = img.shape, img.header.get_zooms()
        except Exception:  # noqa: BLE001 - a broken header: the file is skipped and listed
            return 0
        if len(shape) < 3 or any(s < 1 for s in shape):
            return 1 if len(shape) == 2 else 0
        return int(shape[_slice_axis(shape, zooms)])
    return 1


def read_image(path: Path, slice_index: int = -1) -> np.ndarray:
    """One 2D image (H, W) or (H, W, 3) from a picture, DICOM or NIfTI file; raises on a bad file."""
    suffix = _suffix(path)
    if suffix in PICTURES:
        from PIL import Image

        with Image.open(path) as im:
            im.load()  # a truncated file raises here
            if im.mode in ("RGBA", "LA", "P", "CMYK", "YCbCr"):
                im = im.convert("RGB")
            return np.asarray(im)
    if suffix == ".dcm":
        import pydicom

        ds = pydicom.dcmread(path)
        arr = np.asarray(ds.pixel_array)
        if arr.ndim == 3 and arr.shape[-1] not in (3, 4):  # multi-frame: the middle frame
            arr = arr[arr.shape[0] // 2]
        return arr[..., :3] if arr.ndim == 3 else arr
    import nibabel as nib

    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    data = data.reshape(data.shape[:3]) if data.ndim > 3 else data
    if data.ndim == 2:
        return np.asarray(data, dtype=np.float32)
    axis = _slice_axis(data.shape, img.header.get_zooms())
    k = data.shape[axis] // 2 if slice_index < 0 else slice_index
    return np.asarray(np.take(data, k, axis=axis), dtype=np.float32)


def to_uint8(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """(channels, size, size) uint8, as documented in the module docstring."""
    from PIL import Image

    a = np.asarray(image)
    if not np.all(np.isfinite(a)) if a.dtype.kind == "f" else False:
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        lo, hi = np.percentile(a, [0.5, 99.5])
        a = np.clip((a - lo) / (hi - lo) * 255.0, 0, 255) if hi > lo else np.zeros_like(a)
        a = a.astype(np.uint8)
    if a.ndim != 2 and not (a.ndim == 3 and a.shape[-1] == 3):
        raise ValueError(f"unsupported image shape {a.shape}")
    im = Image.fromarray(a)
    im = im.convert("L") if channels == 1 else im.convert("RGB")
    w, h = im.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    im = im.resize((nw, nh), Image.BILINEAR)
    out = np.zeros((size, size, channels), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = np.asarray(im).reshape(nh, nw, channels)
    return out.transpose(2, 0, 1)


# -- planning the conversion -----------------------------------------------------------------------

def list_supervised(root: Path, class_depth: int | None) -> tuple[list[Item], list[str], list[tuple[str, str]]]:
    """Items of a class-folder tree: class = the first ``class_depth`` folders under ``root``
    (default: the whole folder path, i.e. leaf folders). Returns (items, classes, skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise SpineautoError(f"{root}: not a folder; supervised pretraining reads ROOT/<class>/.../<image> (PNG, JPEG, DICOM, NIfTI)")
    if class_depth is not None and class_depth < 1:
        raise SpineautoError(f"--class-depth {class_depth}: must be >= 1 (the number of folder levels that name a class)")
    files = sorted(p for p in root.rglob("*") if _is_image(p))
    found, skipped = [], []
    for p in files:
        parts = p.relative_to(root).parts[:-1]
        if not parts or (class_depth is not None and len(parts) < class_depth):
            skipped.append((str(p), f"not inside {class_depth or 1} class folder level(s)"))
            continue
        found.append((p, "/".join(parts if class_depth is None else parts[:class_depth])))
    classes = sorted({c for _, c in found})
    if not found:
        raise SpineautoError(f"{root}: no images in class folders (ROOT/<class>/.../*.png|jpg|jpeg|dcm|nii|nii.gz)")
    if len(classes) < 2:
        raise SpineautoError(f"{root}: only one class ({classes[0]!r}); supervised pretraining needs two or more "
                             "(another --class-depth, or --self-supervised for unlabeled images)")
    index = {c: i for i, c in enumerate(classes)}
    return [Item(str(p), -1, index[c]) for p, c in found], classes, skipped


def source_files(source: Path) -> list[Path]:
    """The image files of one unlabeled source: a raw dataset (imagesTr/imagesTs), a folder, a file."""
    source = Path(source)
    if source.is_file():
        if not _is_image(source):
            raise SpineautoError(f"{source}: not an image file ({', '.join(SUFFIXES)})")
        return [source]
    if not source.is_dir():
        raise SpineautoError(f"{source}: no such file or folder")
    if (source / "dataset.json").is_file():  # a raw dataset: every channel of every case, labelled or not
        return sorted(p for sub in ("imagesTr", "imagesTs") if (source / sub).is_dir() for p in (source / sub).iterdir() if _is_image(p))
    return sorted(p for p in source.rglob("*") if _is_image(p) and "labelsTr" not in p.parts and "labelsTs" not in p.parts)


def list_unlabeled(sources: list[Path], workers: int = 1) -> tuple[list[Item], list[tuple[str, str]]]:
    from spineauto.parallel import map_cases

    files = sorted({p.resolve() for s in sources for p in source_files(s)})
    if not files:
        raise SpineautoError(f"{', '.join(map(str, sources))}: no images (PNG, JPEG, DICOM, NIfTI) found")
    counts = map_cases(count_slices, [str(p) for p in files], [(p,) for p in files], workers) if len(files) > 64 else \
        [count_slices(p) for p in files]
    items, skipped = [], []
    for p, n in zip(files, counts):
        if n == 0:
            skipped.append((str(p), "unreadable header"))
        elif _suffix(p) in (".nii", ".nii.gz") and n > 1:
            items += [Item(str(p), k, 0) for k in range(n)]
        else:
            items.append(Item(str(p), -1, 0))
    return items, skipped


# -- converting ------------------------------------------------------------------------------------

def _plan_sha(items: list[Item], size: int, channels: int, mode: str) -> str:
    h = hashlib.sha1(f"{FORMAT}|{size}|{channels}|{mode}".encode())
    for it in items:
        h.update(f"{it.path}|{it.slice}|{it.label}\n".encode())
    return h.hexdigest()[:16]


def _convert_shard(folder: str, name: str, items: list[tuple[str, int, int]], size: int, channels: int, strict: bool) -> dict:
    folder = Path(folder)
    tmp_data, tmp_labels = folder / f".{name}.npy.tmp", folder / f".{name}.labels.npy.tmp"
    data = np.lib.format.open_memmap(tmp_data, mode="w+", dtype=np.uint8, shape=(len(items), channels, size, size))
    labels = np.full(len(items), -1, np.int32)
    skipped, cache = [], {}
    for i, (path, k, label) in enumerate(items):
        try:
            if k >= 0:  # slices of one volume come in a row: read it once
                if cache.get("path") != path:
                    cache = {"path": path, "slices": _volume_slices(Path(path))}
                image = cache["slices"][k]
            else:
                image = read_image(Path(path))
            data[i] = to_uint8(image, size, channels)
            labels[i] = label
        except Exception as e:  # noqa: BLE001 - any decoding failure is a bad image: listed, or refused with --strict
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
            if strict:
                raise SpineautoError(f"{path}: unreadable image ({reason}); --strict refuses the folder: fix or remove it and rerun "
                                     "(shards converted so far are kept and the rerun resumes)") from None
            skipped.append([path if k < 0 else f"{path}[slice {k}]", reason])
    data.flush()
    del data
    with open(tmp_labels, "wb") as f:  # a handle: np.save would append .npy to the name
        np.save(f, labels)
    os.replace(tmp_labels, folder / f"{name}.labels.npy")
    os.replace(tmp_data, folder / f"{name}.npy")
    done = {"items": len(items), "valid": int((labels >= 0).sum()), "skipped": skipped}
    write_json(folder / f"{name}.done.json", done)
    return done


def _volume_slices(path: Path) -> np.ndarray:
    import nibabel as nib

    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    data = data.reshape(data.shape[:3]) if data.ndim > 3 else data
    axis = _slice_axis(data.shape, img.header.get_zooms())
    return np.moveaxis(np.asarray(data, dtype=np.float32), axis, 0)


def convert(items: list[Item], folder: Path, *, size: int, channels: int, mode: str, classes: list[str] | None,
            sources: list[str], listed_skipped: list[tuple[str, str]], shard_size: int = 8192, workers: int = 1,
            strict: bool = False, overwrite: bool = False, class_depth: int | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Convert ``items`` into shards under ``folder`` (resumable; see the module docstring); returns the index."""
    from spineauto.parallel import map_cases

    if size < 16 or channels not in (1, 3) or shard_size < 1:
        raise SpineautoError(f"--size {size} / --channels {channels} / --shard-size {shard_size}: size >= 16, channels 1 or 3, shard size >= 1")
    if strict and listed_skipped:
        path, why = listed_skipped[0]
        raise SpineautoError(f"{path}: {why}; --strict refuses the folder ({len(listed_skipped)} such file(s)); fix or remove them")
    folder = Path(folder)
    sha = _plan_sha(items, size, channels, mode)
    chunks = [items[i:i + shard_size] for i in range(0, len(items), shard_size)]
    names = [f"shard_{k:05d}" for k in range(len(chunks))]
    index_path = folder / INDEX
    if index_path.is_file():
        try:
            old = read_json(index_path)
        except ValueError:
            old = {}
        if old.get("plan_sha") != sha:
            if not overwrite:
                raise SpineautoError(f"{folder}: holds a conversion of other images or settings (size, channels, classes); "
                                     "pass --overwrite to replace it, or another output folder")
            for p in folder.glob("shard_*"):
                p.unlink()
        elif old.get("state") == "complete":
            log.info("%s: already converted (%d images)", folder, old.get("images", 0))
            return old
    folder.mkdir(parents=True, exist_ok=True)
    for p in folder.glob(".shard_*.tmp"):  # a killed worker's half-written shard
        p.unlink()
    index = {"format": FORMAT, "state": "converting", "plan_sha": sha, "mode": mode, "size": size, "channels": channels,
             "classes": classes, "class_depth": class_depth, "sources": sources,
             "shards": [{"name": n, "items": len(c)} for n, c in zip(names, chunks)]}
    write_json(index_path, index)
    todo = [k for k, n in enumerate(names) if not (folder / f"{n}.done.json").is_file()]
    if len(todo) < len(names):
        log.info("%s: resuming, %d of %d shard(s) already converted", folder, len(names) - len(todo), len(names))
    done_count = [len(names) - len(todo)]

    def step(name: str) -> None:
        done_count[0] += 1
        if progress:
            progress(name, done_count[0], len(names))

    args = [(str(folder), names[k], [(it.path, it.slice, it.label) for it in chunks[k]], size, channels, strict) for k in todo]
    map_cases(_convert_shard, [names[k] for k in todo], args, max(1, min(workers, len(todo) or 1)), step)
    skipped = [list(s) for s in listed_skipped]
    valid = 0
    for n in names:
        done = read_json(folder / f"{n}.done.json")
        skipped += done["skipped"]
        valid += done["valid"]
    if valid == 0:
        raise SpineautoError(f"{folder}: none of the {len(items)} image(s) could be read; see {INDEX} for the reasons")
    index.update(state="complete", images=valid, skipped=skipped)
    write_json(index_path, index)
    if skipped:
        log.warning("%d unreadable image(s) skipped (listed in %s), e.g. %s: %s", len(skipped), index_path, *skipped[0])
    return index


# -- reading -------------------------------------------------------------------------------------

class ShardSet:
    """The converted images, memory-mapped: ``images(rows)`` -> uint8 (n, C, S, S), ``labels``."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        path = folder / INDEX
        if not path.is_file():
            raise SpineautoError(f"{folder}: no {INDEX}; convert images first (spineauto pretrain)")
        self.index = read_json(path)
        if self.index.get("state") != "complete":
            raise SpineautoError(f"{folder}: the conversion was interrupted; rerun the same pretrain command to finish it")
        self.folder = folder
        self.size, self.channels = int(self.index["size"]), int(self.index["channels"])
        self.classes = self.index.get("classes")
        self._data, shard_of, row_of, labels = [], [], [], []
        for k, s in enumerate(self.index["shards"]):
            self._data.append(np.load(folder / f"{s['name']}.npy", mmap_mode="r"))
            lab = np.load(folder / f"{s['name']}.labels.npy")
            ok = np.flatnonzero(lab >= 0)
            shard_of.append(np.full(len(ok), k, np.int32))
            row_of.append(ok.astype(np.int64))
            labels.append(lab[ok])
        self.shard_of, self.row_of = np.concatenate(shard_of), np.concatenate(row_of)
        self.labels = np.concatenate(labels).astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx)
        out = np.empty((len(idx), self.channels, self.size, self.size), np.uint8)
        order = np.argsort(self.shard_of[idx].astype(np.int64) * (1 << 40) + self.row_of[idx], kind="stable")  # sequential reads per shard
        for j in order:
            i = idx[j]
            out[j] = self._data[self.shard_of[i]][self.row_of[i]]
        return out


def describe(index: dict) -> str:
    return (f"{index['images']} image(s) in {len(index['shards'])} shard(s), {index['channels']}x{index['size']}x{index['size']}"
            + (f", {len(index['classes'])} classes" if index.get("classes") else "") + f", {len(index.get('skipped', []))} skipped")

