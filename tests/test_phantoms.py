"""Synthetic spine phantoms: geometry, anatomy, lesions, contrasts and the dataset writer."""
from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from spineauto.datasets.phantoms import (
    CONTRASTS, LOCATIONS, TISSUES, VIEWS, PhantomSpec, make_phantom, render_phantom, write_phantom_dataset,
)

FULL = np.ones((3, 3, 3), bool)
WORLD_AXIS = {"L": "LR", "R": "LR", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}


def _axis_along(img: nib.Nifti1Image, world: str) -> int:
    """Voxel axis whose direction is closest to the world axis "LR", "AP" or "SI"."""
    return [WORLD_AXIS[c] for c in nib.aff2axcodes(img.affine)].index(world)


def _thick_world_axis(img: nib.Nifti1Image) -> str:
    zooms = np.asarray(img.header.get_zooms()[:3])
    return WORLD_AXIS[nib.aff2axcodes(img.affine)[int(np.argmax(zooms))]]


def _label(img: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(img.dataobj)


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("contrast", CONTRASTS)
def test_image_and_label_share_geometry(view, contrast):
    image, label = make_phantom(PhantomSpec(contrast, view, "cervical", lesions=1, seed=3))
    assert image.shape == label.shape and len(image.shape) == 3
    np.testing.assert_array_equal(image.affine, label.affine)
    assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
    assert np.asarray(image.dataobj).dtype == np.float32 and _label(label).dtype == np.uint8
    assert int(np.prod(image.shape)) <= 150_000 and min(image.shape) >= 6
    assert set(np.unique(_label(label))) == {0, 1, 2}
    data = image.get_fdata()
    assert np.isfinite(data).all() and data.min() >= 0 and data.max() > 10
    assert image.header["sform_code"] == 1 and image.header["qform_code"] == 1


@pytest.mark.parametrize("view, thick", [("axial", "SI"), ("sagittal", "LR"), ("coronal", "AP")])
def test_slice_thickness_lies_along_the_view_axis(view, thick):
    seen = set()
    for seed in range(8):
        image, _ = make_phantom(PhantomSpec("T2w", view, "thoracic", seed=seed))
        zooms = sorted(image.header.get_zooms()[:3])
        assert _thick_world_axis(image) == thick
        assert zooms[2] > 1.8 * zooms[1]  # anisotropic: one thick axis, two fine ones
        seen.add(nib.aff2axcodes(image.affine))
    assert len(seen) >= 2, f"{view}: every case has the orientation {seen}; scanners differ"


def test_axial_and_sagittal_spacing_ranges():
    ax, _ = make_phantom(PhantomSpec("T2w", "axial", "cervical", seed=5))
    sag, _ = make_phantom(PhantomSpec("T2w", "sagittal", "cervical", seed=5))
    az, sz = sorted(ax.header.get_zooms()), sorted(sag.header.get_zooms())
    assert 0.5 <= az[0] <= 0.8 and 3.0 <= az[2] <= 6.0
    assert 0.8 <= sz[0] <= 1.0 and 2.0 <= sz[2] <= 4.0


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("location", LOCATIONS)
def test_cord_is_one_tube_along_superior_inferior(view, location):
    image, label = make_phantom(PhantomSpec("T1w", view, location, seed=11))
    cord = _label(label) > 0
    assert ndimage.label(cord, FULL)[1] == 1
    si = _axis_along(image, "SI")
    other = tuple(a for a in range(3) if a != si)
    present = cord.any(axis=other)
    assert present.mean() >= 0.9, f"cord in {present.sum()} of {present.size} positions along S-I"
    # a tube, not a blob: its length along S-I exceeds its width in every other direction
    extent_mm = [np.ptp(np.nonzero(cord)[a]) * image.header.get_zooms()[a] for a in range(3)]
    assert extent_mm[si] > 2 * max(extent_mm[a] for a in other if image.header.get_zooms()[a] < 2)


def test_location_changes_cord_size():
    def area(location: str) -> float:  # mean cross-section of the cord on axial slices, mm^2
        areas = []
        for seed in range(4):
            image, label = make_phantom(PhantomSpec("T2w", "axial", location, seed=seed))
            zooms = image.header.get_zooms()
            areas.append((_label(label) > 0).sum(axis=(0, 1)).mean() * zooms[0] * zooms[1])
        return float(np.mean(areas))

    cervical, thoracic, lumbar = area("cervical"), area("thoracic"), area("lumbar")
    assert 55 < cervical < 100  # ellipse of ~12 x 8 mm
    assert thoracic < 0.8 * cervical and lumbar < 0.8 * cervical


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("count", [1, 2, 3])
def test_lesions_lie_inside_the_cord_and_are_counted(view, count):
    spec = PhantomSpec("T2w", view, "cervical", lesions=count, seed=20 + count)
    _, label = make_phantom(spec)
    lab = _label(label)
    lesion = lab == 2
    assert ndimage.label(lesion, FULL)[1] == count
    # the same case without lesions has exactly the same cord: lesions only relabel cord voxels
    _, clean = make_phantom(PhantomSpec("T2w", view, "cervical", lesions=0, seed=20 + count))
    np.testing.assert_array_equal(lab > 0, _label(clean) > 0)
    # every lesion voxel has cord or lesion around it, and each lesion is embedded in cord
    near = ndimage.maximum_filter((lab > 0).astype(np.uint8), size=3)
    assert near[lesion].all()
    components, n = ndimage.label(lesion, FULL)
    for k in range(1, n + 1):
        assert (ndimage.binary_dilation(components == k, FULL) & (lab == 1)).any()
    # lesion size: 2-6 mm ellipsoids
    zooms = label.header.get_zooms()
    assert lesion.sum() * np.prod(zooms) < count * 4 / 3 * np.pi * 3.0**3 + 1e-6


@pytest.mark.parametrize("view", ["axial", "sagittal"])
def test_contrasts_differ(view):
    ratios, lesion_ratios = {}, {}
    for contrast in CONTRASTS:
        p = render_phantom(PhantomSpec(contrast, view, "cervical", lesions=2, seed=7))
        data, t = p.image.get_fdata(), p.tissues
        cord = data[(t == TISSUES["white_matter"]) | (t == TISSUES["grey_matter"])].mean()
        ratios[contrast] = cord / data[t == TISSUES["csf"]].mean()
        lesion_ratios[contrast] = data[t == TISSUES["lesion"]].mean() / cord
        if contrast == "T2starw":
            assert data[t == TISSUES["grey_matter"]].mean() > 1.2 * data[t == TISSUES["white_matter"]].mean()
        np.testing.assert_array_equal(_label(p.label) == 1, (t == TISSUES["white_matter"]) | (t == TISSUES["grey_matter"]))
        np.testing.assert_array_equal(_label(p.label) == 2, t == TISSUES["lesion"])
    assert ratios["T1w"] > 1.5, ratios
    assert ratios["T2w"] < 0.7 and ratios["T2starw"] < 0.9, ratios
    assert lesion_ratios["T1w"] < 0.95 and lesion_ratios["T2w"] > 1.3 and lesion_ratios["T2starw"] > 1.3, lesion_ratios


def test_same_seed_same_phantom_other_seed_other_phantom():
    spec = PhantomSpec("T2starw", "sagittal", "lumbar", lesions=2, seed=42)
    (i1, l1), (i2, l2) = make_phantom(spec), make_phantom(PhantomSpec(**vars(spec)))
    np.testing.assert_array_equal(i1.get_fdata(), i2.get_fdata())
    np.testing.assert_array_equal(_label(l1), _label(l2))
    np.testing.assert_array_equal(i1.affine, i2.affine)
    i3, _ = make_phantom(PhantomSpec("T2starw", "sagittal", "lumbar", lesions=2, seed=43))
    assert i3.shape != i1.shape or not np.allclose(i3.get_fdata(), i1.get_fdata())


def test_cases_of_one_subject_share_anatomy():
    a, _ = make_phantom(PhantomSpec("T1w", "axial", "cervical", seed=1, subject_seed=9))
    b, _ = make_phantom(PhantomSpec("T2w", "axial", "cervical", seed=1, subject_seed=9))
    c, _ = make_phantom(PhantomSpec("T2w", "axial", "cervical", seed=1, subject_seed=10))
    _, la = make_phantom(PhantomSpec("T1w", "axial", "cervical", seed=1, subject_seed=9))
    _, lb = make_phantom(PhantomSpec("T2w", "axial", "cervical", seed=1, subject_seed=9))
    _, lc = make_phantom(PhantomSpec("T2w", "axial", "cervical", seed=1, subject_seed=10))
    np.testing.assert_array_equal(_label(la), _label(lb))
    assert not np.array_equal(_label(la), _label(lc))
    assert a.shape == b.shape == c.shape


def test_invalid_spec_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="T2starw"):
        make_phantom(PhantomSpec("FLAIR", "axial", "cervical"))
    with pytest.raises(ValueError, match="lesions"):
        make_phantom(PhantomSpec("T2w", "axial", "cervical", lesions=-1))


def test_phantoms_are_fast():
    specs = [PhantomSpec(c, v, loc, lesions=2, seed=i) for i, (c, v, loc) in
             enumerate(zip(CONTRASTS * 2, VIEWS * 2, LOCATIONS * 2))]
    start = time.perf_counter()
    for spec in specs:
        make_phantom(spec)
    assert (time.perf_counter() - start) / len(specs) < 1.0


def _cases(folder: Path) -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in folder.glob("*.nii.gz"))


def test_dataset_writer_layout_and_dataset_json(tmp_path):
    out = write_phantom_dataset(tmp_path / "Dataset001_Phantoms", n_train=7, n_test=3, seed=0)
    assert out == tmp_path / "Dataset001_Phantoms"
    meta = json.loads((out / "dataset.json").read_text())
    assert list(meta) == ["name", "description", "channel_names", "labels", "numTraining", "file_ending", "heads", "cases"]
    assert meta["name"] == "Dataset001_Phantoms"
    assert meta["description"] == "Synthetic spine phantoms generated by spineauto (seed 0)"
    assert meta["channel_names"] == {"0": "MRI"} and meta["file_ending"] == ".nii.gz"
    assert meta["labels"] == {"background": 0, "cord": 1, "lesion": 2}
    train = [c[: -len("_0000")] for c in _cases(out / "imagesTr")]
    test = [c[: -len("_0000")] for c in _cases(out / "imagesTs")]
    assert meta["numTraining"] == len(train) == 7 and len(test) == 3
    assert _cases(out / "labelsTr") == train and _cases(out / "labelsTs") == test
    assert sorted(meta["cases"]) == sorted(train + test) == [f"phantom_{i:03d}" for i in range(10)]
    assert meta["heads"] == {"sequence": ["T1w", "T2w", "T2starw"], "view": ["axial", "sagittal"],
                             "location": ["cervical", "thoracic", "lumbar"]}
    subjects: dict[str, list[str]] = {}
    for case, info in meta["cases"].items():
        assert set(info) == {"subject", "classes"} and set(info["classes"]) == set(meta["heads"])
        for head, value in info["classes"].items():
            assert value in meta["heads"][head]
        subjects.setdefault(info["subject"], []).append(case)
    assert all(len(cases) >= 2 for cases in subjects.values()), subjects
    for cases in subjects.values():  # no subject on both sides of the split, same location, distinct scans
        assert len({c in train for c in cases}) == 1
        assert len({meta["cases"][c]["classes"]["location"] for c in cases}) == 1
        assert len({tuple(meta["cases"][c]["classes"].values()) for c in cases}) == len(cases)
    with_lesion = 0
    for case in train:
        image = nib.load(out / "imagesTr" / f"{case}_0000.nii.gz")
        label = nib.load(out / "labelsTr" / f"{case}.nii.gz")
        assert image.shape == label.shape and np.array_equal(image.affine, label.affine)
        view = meta["cases"][case]["classes"]["view"]
        assert _thick_world_axis(image) == {"axial": "SI", "sagittal": "LR"}[view]
        with_lesion += bool((_label(label) == 2).any())
    assert 2 <= with_lesion <= 5  # about half


def test_dataset_writer_is_deterministic_and_cleans_up(tmp_path):
    a = write_phantom_dataset(tmp_path / "a", n_train=4, n_test=2, seed=3)
    b = write_phantom_dataset(tmp_path / "b", n_train=4, n_test=2, seed=3)
    c = write_phantom_dataset(tmp_path / "c", n_train=4, n_test=2, seed=4)
    ja, jb = (json.loads((d / "dataset.json").read_text()) for d in (a, b))
    assert ja["cases"] == jb["cases"] and ja["name"] == "a" and jb["name"] == "b"
    for rel in ["imagesTr/phantom_000_0000.nii.gz", "labelsTs/phantom_005.nii.gz"]:
        np.testing.assert_array_equal(nib.load(a / rel).get_fdata(), nib.load(b / rel).get_fdata())
    first = nib.load(a / "imagesTr/phantom_000_0000.nii.gz")
    other = nib.load(c / "imagesTr/phantom_000_0000.nii.gz")
    assert first.shape != other.shape or not np.allclose(first.get_fdata(), other.get_fdata())
    # a smaller rerun into the same folder leaves no stale cases behind
    write_phantom_dataset(a, n_train=2, n_test=0, seed=3, lesions=False, views=("axial",), name="Dataset002_Small")
    meta = json.loads((a / "dataset.json").read_text())
    assert meta["name"] == "Dataset002_Small" and meta["numTraining"] == 2
    assert _cases(a / "imagesTr") == ["phantom_000_0000", "phantom_001_0000"] and _cases(a / "imagesTs") == []
    assert meta["labels"] == {"background": 0, "cord": 1}
    assert "view" not in meta["heads"] and all("view" not in i["classes"] for i in meta["cases"].values())
    assert all(_label(nib.load(p)).max() == 1 for p in (a / "labelsTr").glob("*.nii.gz"))
    assert not list(a.glob("**/.*tmp*")) and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_limb_phantoms_have_no_cord_and_an_anatomy_class(tmp_path):
    """The non-spine anatomy for anatomy gates: tissue but no cord, CSF or lesion; a dataset that
    mixes it with spines labels each case's anatomy."""
    import json

    from spineauto.datasets.phantoms import TISSUES, PhantomSpec, render_phantom, write_phantom_dataset

    p = render_phantom(PhantomSpec("T2w", "axial", "thoracic", lesions=0, seed=4, anatomy="limb"))
    present = set(np.unique(p.tissues).tolist())
    assert {TISSUES["muscle"], TISSUES["fat"], TISSUES["bone"]} <= present
    assert not present & {TISSUES["csf"], TISSUES["white_matter"], TISSUES["grey_matter"], TISSUES["lesion"]}
    assert np.asarray(p.label.dataobj).max() == 0
    write_phantom_dataset(tmp_path / "Dataset001_Mixed", n_train=8, n_test=2, seed=1, anatomies=("spine", "limb"))
    data = json.loads((tmp_path / "Dataset001_Mixed" / "dataset.json").read_text())
    kinds = {c["classes"]["anatomy"] for c in data["cases"].values()}
    assert data["heads"]["anatomy"] == ["spine", "limb"] and kinds == {"spine", "limb"}


def test_other_anatomies_brain_noise_have_no_cord(tmp_path):
    """The "none of these" class of an anatomy gate: brain-like heads (cortex, white matter, CSF),
    pure noise and limbs, drawn per subject; never a cord label."""
    import json

    from spineauto.datasets.phantoms import TISSUES, PhantomSpec, render_phantom, write_phantom_dataset

    brain = render_phantom(PhantomSpec("T1w", "axial", "cervical", lesions=0, seed=2, anatomy="brain"))
    present = set(np.unique(brain.tissues).tolist())
    assert {TISSUES["white_matter"], TISSUES["grey_matter"], TISSUES["csf"]} <= present
    assert np.asarray(brain.label.dataobj).max() == 0
    noise = render_phantom(PhantomSpec("T2w", "sagittal", "lumbar", lesions=0, seed=2, anatomy="noise"))
    assert set(np.unique(noise.tissues).tolist()) == {TISSUES["background"]} and np.asarray(noise.label.dataobj).max() == 0
    assert np.asarray(noise.image.dataobj).std() > 0
    write_phantom_dataset(tmp_path / "Dataset001_Other", n_train=14, n_test=2, seed=1, anatomies=("spine", "other"))
    data = json.loads((tmp_path / "Dataset001_Other" / "dataset.json").read_text())
    assert data["heads"]["anatomy"] == ["spine", "other"]
    for case, info in data["cases"].items():
        split = "Tr" if (tmp_path / "Dataset001_Other" / "labelsTr" / f"{case}.nii.gz").is_file() else "Ts"
        label = np.asarray(nib.load(str(tmp_path / "Dataset001_Other" / f"labels{split}" / f"{case}.nii.gz")).dataobj)
        assert (label.max() > 0) == (info["classes"]["anatomy"] == "spine"), case
