"""Overlay mosaics and the folder report of a pipeline run, rendered in a real (headless) browser."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from spineauto.datasets.phantoms import PhantomSpec, make_phantom
from spineauto.pipeline.overlays import write_overlays
from spineauto.pipeline.report import build_report

EVIL = "<script>alert(1)</script>"


def _chromium() -> str:
    """The headless browser; a missing one fails the test in CI (CI set) and skips it elsewhere."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI"):
        pytest.fail("chromium is missing; .ci/run installs it (apt-get install chromium)")
    pytest.skip("chromium not installed (apt-get install chromium)")


def _anatomy(p: float) -> dict:
    return {"stage": "anatomy", "kind": "classification", "model": "Dataset101_Anatomy/2d", "folds": ["0", "1"],
            "head": "anatomy", "class": "spine" if p >= 0.5 else "brain",
            "probabilities": {"spine": p, "brain": round(1 - p, 3)}, "passed": p >= 0.5, "seconds": 0.4}


def _measure(label: nib.Nifti1Image) -> dict:
    """Rough cord and lesion measurements of a phantom label (the report only shows them)."""
    lab = nib.as_closest_canonical(label)
    data, zooms = np.asarray(lab.dataobj), np.asarray(lab.header.get_zooms()[:3], float)
    cord, lesion = data > 0, data == 2
    zs = np.nonzero(cord.any(axis=(0, 1)))[0]
    per_slice = [{"z_mm": float(lab.affine[2, 2] * z + lab.affine[2, 3]), "csa_mm2": float(cord[:, :, z].sum() * zooms[0] * zooms[1]),
                  "angle_deg": 0.0} for z in zs]
    csa = np.array([p["csa_mm2"] for p in per_slice])
    labels, n = ndimage.label(lesion)
    items = []
    for i, box in enumerate(ndimage.find_objects(labels), 1):
        items.append({"id": i, "volume_mm3": float((labels == i).sum() * zooms.prod()),
                      "craniocaudal_length_mm": float((box[2].stop - box[2].start) * zooms[2]),
                      "max_inplane_extent_mm": float(max(box[0].stop - box[0].start, box[1].stop - box[1].start) * zooms[0]),
                      "slices": [box[2].start, box[2].stop - 1]})
    return {"cord": {"volume_mm3": float(cord.sum() * zooms.prod()), "length_mm": float(len(zs) * zooms[2]),
                     "plausible_csa_mm2": {"low": 35.0, "high": 115.0, "level": "cervical"},
                     "csa_mm2": {"mean": float(csa.mean()), "median": float(np.median(csa)), "min": float(csa.min()),
                                 "max": float(csa.max()), "per_slice": per_slice}},
            "lesions": {"count": n, "total_volume_mm3": float(sum(x["volume_mm3"] for x in items)), "items": items}}


def _case(out: Path, name: str, spec: PhantomSpec, status: str, reason: str | None, segmented: bool,
          flags: list[dict] | None = None) -> None:
    image, label = make_phantom(spec)
    folder = out / name
    lab = np.asarray(label.dataobj)
    cord, lesion = (lab > 0, lab == 2) if segmented else (None, None)
    images = write_overlays(np.asarray(image.dataobj), image.affine, cord, lesion, folder, name) if status != "failed" else {}
    stages = [_anatomy(0.97 if status != "stopped" else 0.12)]
    if status == "check":  # more heads: the summary table must still fit the page
        stages += [{"stage": "location_view", "kind": "classification", "model": "m", "folds": ["0"],
                    "heads": {"location": {"class": "cervical", "probabilities": {"cervical": 0.91, "lumbar": 0.09}},
                              "view": {"class": "sagittal", "probabilities": {"sagittal": 0.97, "axial": 0.03}}}},
                   {"stage": "sequence", "kind": "classification", "model": "m", "folds": ["0"],
                    "heads": {"sequence": {"class": "T2w", "probabilities": {"T2w": 0.88, "T1w": 0.12}}}}]
    if status in ("done", "check"):
        stages += [{"stage": "cord", "kind": "segmentation", "model": "Dataset102_Cord/3d_fullres", "folds": ["all"],
                    "mask": f"{name}_cord.nii.gz", "skipped": None, "seconds": 2.1},
                   {"stage": "lesion", "kind": "segmentation", "model": "Dataset103_Lesion/3d_fullres", "folds": ["0"],
                    "mask": f"{name}_lesion.nii.gz", "skipped": None, "seconds": 1.7}]
    record = {"kind": "spineauto.pipeline_case", "case": name, "source": f"/data/{name}.nii.gz", "status": status,
              "reason": reason, "flags": flags or [], "stages": stages,
              "measurements": _measure(label) if segmented else {"cord": None, "lesions": None},
              "images": images, "versions": {"spineauto": "0.1.0", "torch": "2.4.0"}, "seconds": 5.2}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipeline_out")
    _case(out, "sub-01_T2w", PhantomSpec("T2w", "sagittal", "cervical", lesions=2, seed=3), "done", None, True)
    _case(out, "sub-02_T1w", PhantomSpec("T1w", "axial", "thoracic", seed=4), "stopped",
          f"anatomy: brain (p=0.88), not spine {EVIL}", False)
    _case(out, "sub-03_T2starw", PhantomSpec("T2starw", "coronal", "lumbar", seed=5), "failed",
          "cord: CUDA out of memory", False)
    flags = [{"stage": "cord", "code": "csa_range", "reason": "CSA median 140.0 mm² outside the plausible 35-115 mm² (cervical)"},
             {"stage": "cord", "code": "cord_pieces", "reason": "cord in 2 separate pieces"}]
    _case(out, "sub-04_T2w", PhantomSpec("T2w", "sagittal", "cervical", lesions=1, seed=6), "check",
          "; ".join(f["reason"] for f in flags), True, flags)
    (out / "broken").mkdir()
    (out / "broken" / "broken.json").write_text('{"kind": "spineauto.pipeline_case", "case": ')
    (out / "other").mkdir()
    (out / "other" / "other.json").write_text(json.dumps({"kind": "something else"}))
    return out


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)


def _count(px: np.ndarray, colour: str) -> int:
    r, g, b = px.T
    return int(((g > 200) & (r < 80) & (b < 80)).sum() if colour == "green" else ((r > 200) & (g < 80) & (b < 80)).sum())


def test_overlays(run_folder):
    done = run_folder / "sub-01_T2w"
    for view in ("sagittal", "axial"):
        px = _pixels(done / f"sub-01_T2w_{view}.png")
        assert _count(px, "green") > 100 and _count(px, "red") > 10, view
        plain = _pixels(run_folder / "sub-02_T1w" / f"sub-02_T1w_{view}.png")
        assert _count(plain, "green") == 0 and len(np.unique(plain, axis=0)) > 50, view


def test_overlays_radiological_whatever_the_storage_order(tmp_path):
    """A block at the patient's right shows on the left of the axial panels, in RAS and LPS storage alike."""
    vol = np.zeros((40, 30, 20), np.float32)
    vol[28:36, 10:20, :] = 1.0  # high x = patient's right
    cord = np.zeros(vol.shape, bool)
    cord[18:22, 13:17, 2:18] = True
    ras = np.diag([1.0, 1.0, 3.0, 1.0])
    lps = ras @ np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:2, 3] = [39.0, 29.0]  # same world positions, stored flipped
    a = write_overlays(vol, ras, cord, None, tmp_path / "ras", "c")
    write_overlays(vol[::-1, ::-1], lps, cord[::-1, ::-1], None, tmp_path / "lps", "c")
    for view in ("axial", "sagittal"):
        ras_px, lps_px = _pixels(tmp_path / "ras" / a[view]), _pixels(tmp_path / "lps" / a[view])
        assert ras_px.shape == lps_px.shape and (ras_px != lps_px).any(axis=1).mean() < 0.01, view  # only labels differ
    first = np.asarray(Image.open(tmp_path / "ras" / a["axial"]).convert("RGB"), int)[:, :170]
    cols = np.nonzero(first.min(axis=2) > 200)[1]  # bright grey: the block (labels are yellow, the cord green)
    assert cols.size > 100 and cols.max() < 85, "patient's right must be on the viewer's left"


def test_report_csv_and_html(run_folder):
    page = build_report(run_folder)
    assert page == run_folder / "report.html"
    rows = list(csv.DictReader((run_folder / "pipeline.csv").open()))
    assert [r["case"] for r in rows] == ["sub-01_T2w", "sub-02_T1w", "sub-03_T2starw", "sub-04_T2w"]
    assert [r["status"] for r in rows] == ["done", "stopped", "failed", "check"]
    assert [r["flags"] for r in rows] == ["", "", "", "csa_range cord_pieces"]
    assert rows[2]["reason"] == "cord: CUDA out of memory" and EVIL in rows[1]["reason"]
    assert [r["anatomy_class"] for r in rows] == ["spine", "brain", "spine", "spine"]
    assert float(rows[1]["anatomy_probability"]) == pytest.approx(0.88)
    assert int(rows[0]["lesion_count"]) == 2 and float(rows[0]["lesion_total_volume_mm3"]) > 0
    assert float(rows[0]["cord_volume_mm3"]) > 0 and rows[1]["cord_volume_mm3"] == ""
    text = page.read_text()
    for name, status in (("sub-01_T2w", "done"), ("sub-02_T1w", "stopped"), ("sub-03_T2starw", "failed")):
        assert name in text and f"class='badge {status}'" in text
    assert "cord: CUDA out of memory" in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text and EVIL not in text
    assert "broken/broken.json" in text and "other.json" not in text
    assert "src='sub-01_T2w/sub-01_T2w_sagittal.png'" in text and "no overlay images" in text
    assert "<svg" in text and "http" not in text.replace("http://www.w3.org", "")


def test_report_renders_in_chromium(run_folder, tmp_path):
    browser = _chromium()
    page = build_report(run_folder)
    shot = tmp_path / "report.png"
    cmd = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0 and shot.is_file(), f"chromium failed ({run.returncode}): {run.stderr[-2000:]}"
    if os.environ.get("SPINEAUTO_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["SPINEAUTO_KEEP_SCREENSHOT"])
    img = Image.open(shot)
    assert img.size == (1200, 2000)
    px = _pixels(shot)
    non_white = (px < 240).any(axis=1).mean()
    assert non_white > 0.2, f"screenshot mostly blank ({non_white:.1%} non-white pixels)"
    assert len(np.unique(px, axis=0)) > 500
    assert _count(px, "green") > 100 and _count(px, "red") > 10, "cord (green) / lesion (red) overlays not visible"


def test_report_survives_odd_values(tmp_path):
    """Wrong types inside a readable case file never stop the report; an unreadable status is listed."""
    odd = {"kind": "spineauto.pipeline_case", "case": "odd", "status": "done", "reason": None,
           "stages": [{"stage": "anatomy", "kind": "classification", "class": "spine", "probabilities": [0.9]},
                      {"stage": "cord", "kind": "segmentation", "mask": None, "skipped": "no spine"}],
           "measurements": {"cord": {"csa_mm2": {"per_slice": [{"z_mm": "a"}, 3]}}, "lesions": {"items": [{"slices": 5}]}},
           "images": {"sagittal": "../../etc/passwd"}, "seconds": "slow"}
    bad_status = dict(odd, case="bad", status="maybe")
    for name, record in (("odd", odd), ("bad", bad_status)):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.json").write_text(json.dumps(record))
    text = build_report(tmp_path).read_text()
    assert "odd" in text and "bad/bad.json" in text and "must be one of" in text and "cannot show" in text
    assert "passwd" not in text
    assert (tmp_path / "pipeline.csv").read_text().splitlines()[1].startswith("odd,done,")


HARNESS = """<!DOCTYPE html><html><body><pre id='out'>not run</pre>
<iframe id='r' src='%(report)s' style='width:1400px;height:900px;border:0'></iframe><script>
document.getElementById('r').addEventListener('load', function () {
  var f = document.getElementById('r'), w = f.contentWindow, d = f.contentDocument, R = w.spineautoReview, out = {};
  try {
    var key = function (k) { d.dispatchEvent(new w.KeyboardEvent('keydown', {key: k, bubbles: true})); };
    var visible = function () { return Array.prototype.filter.call(d.querySelectorAll('#summary tbody tr'),
                                       function (tr) { return !tr.hidden; }).map(function (tr) { return tr.dataset.case; }); };
    out.stored = R.ratings();
    out.order = R.rows().map(function (r) { return r.case; });
    out.sections = Array.prototype.map.call(d.querySelectorAll('section.case'), function (s) { return s.dataset.case; });
    if (location.hash === '#rate') {
      key('j'); key('f'); key('j'); key('p'); key('j'); key('a'); key('u');
      d.querySelector('section[data-case="sub-01_T2w"] .rating button[data-rating=artefact]').click();
      out.ratings = R.ratings();
      out.ratedCells = Array.prototype.map.call(d.querySelectorAll('#summary tbody tr'), function (tr) {
        return tr.dataset.case + '=' + tr.querySelector('.rated').textContent; });
      var img = d.querySelector('img[data-plain]');
      out.src = [img.getAttribute('src')]; key('o'); out.src.push(img.getAttribute('src'));
      out.plainClass = d.body.classList.contains('plain'); key('o'); out.src.push(img.getAttribute('src'));
      var ths = Array.prototype.slice.call(d.querySelectorAll('#summary th'));
      var csa = ths.filter(function (t) { return t.textContent.indexOf('CSA') === 0; })[0];
      csa.click(); out.csaAsc = R.rows().map(function (r) { return r.case; });
      csa.click(); out.csaDesc = R.rows().map(function (r) { return r.case; }); out.sortMark = csa.getAttribute('aria-sort');
      ths[0].click(); out.byName = R.rows().map(function (r) { return r.case; });
      var set = function (id, v) { var e = d.getElementById(id); e.value = v; e.dispatchEvent(new w.Event('input')); };
      set('f-status', 'check'); out.onlyCheck = visible();
      out.hiddenSections = Array.prototype.filter.call(d.querySelectorAll('section.case'), function (s) { return s.hidden; }).length;
      set('f-status', ''); set('f-flag', '-'); out.noFlag = visible();
      set('f-flag', ''); set('f-csa-min', '60'); set('f-csa-max', '100'); out.csaRange = visible(); out.shown = d.getElementById('shown').textContent;
      set('f-csa-min', ''); set('f-csa-max', ''); set('f-text', 'T1'); out.text = visible();
      out.csv = R.exportText('csv'); out.json = JSON.parse(R.exportText('json'));
      var scroll = d.querySelector('.scroll');
      out.fits = [d.getElementById('summary').scrollWidth, scroll.clientWidth];
      out.band = d.querySelectorAll('svg rect.normal-range').length;
    }
  } catch (e) { out.error = String(e) + ' ' + e.stack; }
  document.getElementById('out').textContent = JSON.stringify(out);
});
</script></body></html>"""


def _harness(browser: str, page: Path, tmp_path: Path, mode: str) -> dict:
    """Load the report in an iframe of a harness page, drive it, read what the harness wrote (headless --dump-dom)."""
    harness = tmp_path / "harness.html"
    harness.write_text(HARNESS % {"report": page.as_uri()})
    cmd = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage", "--allow-file-access-from-files",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1440,1000", "--virtual-time-budget=10000", "--dump-dom",
           harness.as_uri() + mode]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    text = run.stdout.split("<pre id=\"out\">", 1)[1].split("</pre>", 1)[0]
    import html as html_lib

    out = json.loads(html_lib.unescape(text))
    assert "error" not in out, out["error"]
    return out


def test_report_review_in_chromium(run_folder, tmp_path):
    """Keys, clicks and filters as a reviewer uses them: ratings kept across page loads (localStorage)
    and exported; overlays toggle; sorting, filters; flagged cases first; the table fits 1,400 px."""
    browser = _chromium()
    page = build_report(run_folder)
    first = _harness(browser, page, tmp_path, "#rate")
    flagged_first = ["sub-04_T2w", "sub-03_T2starw", "sub-02_T1w", "sub-01_T2w"]  # check, failed, stopped, done
    assert first["order"] == flagged_first and first["sections"] == flagged_first and first["stored"] == {}
    # j f: first case fail; j p: second pass; j a u: third rated then cleared; a click rates the fourth
    assert first["ratings"] == {"sub-04_T2w": "fail", "sub-03_T2starw": "pass", "sub-01_T2w": "artefact"}
    assert first["ratedCells"] == ["sub-04_T2w=fail", "sub-03_T2starw=pass", "sub-02_T1w=–", "sub-01_T2w=artefact"]
    assert first["src"] == ["sub-04_T2w/sub-04_T2w_sagittal.png", "sub-04_T2w/sub-04_T2w_sagittal_plain.png",
                            "sub-04_T2w/sub-04_T2w_sagittal.png"] and first["plainClass"] is True
    assert first["csaAsc"][:2] in (["sub-01_T2w", "sub-04_T2w"], ["sub-04_T2w", "sub-01_T2w"])  # the two with a cord, then none
    assert first["csaDesc"][:2] == first["csaAsc"][:2][::-1] and first["sortMark"] == "descending"
    assert first["byName"] == sorted(flagged_first)
    assert first["onlyCheck"] == ["sub-04_T2w"] and first["hiddenSections"] == 3
    assert sorted(first["noFlag"]) == ["sub-01_T2w", "sub-02_T1w", "sub-03_T2starw"]
    csa = {r["case"]: r["csa_mean_mm2"] for r in first["json"]["ratings"]}
    assert sorted(first["csaRange"]) == sorted(c for c, v in csa.items() if v is not None and 60 <= v <= 100)
    assert first["shown"] == f"{len(first['csaRange'])} of 4 cases shown" and first["text"] == ["sub-02_T1w"]
    lines = first["csv"].splitlines()
    assert lines[0] == "case,status,flags,csa_mean_mm2,rating" and "sub-04_T2w,check,csa_range cord_pieces," in first["csv"]
    assert lines[1].endswith(",artefact") or any(x.startswith("sub-01_T2w,done,,") and x.endswith(",artefact") for x in lines)
    assert first["json"]["report"] == str(run_folder.resolve())
    assert first["fits"][0] <= first["fits"][1], f"summary table {first['fits'][0]} px wider than its {first['fits'][1]} px card"
    assert first["band"] == 2  # the normal-range shading of the two measured cords
    again = _harness(browser, page, tmp_path, "#read")  # same browser profile: the ratings are still there
    assert again["stored"] == first["ratings"]


def test_thin_axial_slab_has_no_sagittal_strip_and_says_why(tmp_path):
    """8 axial slices of 3 mm (24 mm along S-I): axial mosaics only, and the report says why."""
    from spineauto.pipeline.overlays import sagittal_left_out

    vol = np.random.default_rng(0).random((60, 60, 8)).astype(np.float32)
    cord = np.zeros(vol.shape, bool)
    cord[28:33, 28:33, :] = True
    affine = np.diag([0.5, 0.5, 3.0, 1.0])
    note = sagittal_left_out(affine, vol.shape)
    assert note.startswith("no sagittal view: the image covers 24 mm along S-I (8 axial slice(s) of 3 mm)")
    images = write_overlays(vol, affine, cord, None, tmp_path / "c", "c")
    assert sorted(images) == ["axial", "axial_plain"]
    assert sagittal_left_out(np.diag([0.5, 0.5, 3.0, 1.0]), (60, 60, 14)) is None  # 42 mm: shown
    record = {"kind": "spineauto.pipeline_case", "case": "c", "status": "done", "stages": [], "images": images,
              "image_notes": {"sagittal": note}}
    (tmp_path / "c" / "c.json").write_text(json.dumps(record))
    assert "no sagittal view: the image covers 24 mm" in build_report(tmp_path).read_text()
