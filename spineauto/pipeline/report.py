"""The folder-level report of a pipeline run: ``OUT/report.html`` and ``OUT/pipeline.csv``.

Built from the per-case JSON files alone (``OUT/<case>/<case>.json``), so ``spineauto report OUT``
can rebuild it at any time. The page is one self-contained file (inline CSS, SVG and script, no
server, nothing fetched; :mod:`spineauto.pipeline.report_assets`: sorting, filters, ratings,
overlay toggle, keys); cases with quality flags come first. The overlay mosaics are linked relatively as ``<case>/<png>`` rather than embedded: the
page stays small and quick to open for hundreds of cases, the PNGs stay single copies, and the
folder still moves as a whole. Files that cannot be read are skipped with a warning and listed.

Per-case JSON (``kind`` must be ``"spineauto.pipeline_case"``; other JSON files are ignored)::

    {"kind": "spineauto.pipeline_case", "case": str, "source": str,
     "status": "done"|"check"|"stopped"|"failed", "reason": str|null,
     "flags": [{"stage": str, "code": str, "reason": str}],  # quality flags: "check" when any (spineauto.pipeline.qc)
     "stages": [{"stage": "anatomy", "kind": "classification", "model": str, "folds": [str], "head": str,
                 "class": str, "probabilities": {cls: float}, "passed": bool, "seconds": float},
                {"stage": "cord", "kind": "segmentation", "model": str, "folds": [str],
                 "mask": "<case>_cord.nii.gz"|null, "skipped": str|null, "seconds": float}, ...],
     "measurements": {"cord": {"volume_mm3": float, "length_mm": float,
                               "csa_mm2": {"mean": float, "median": float, "min": float, "max": float,
                                           "per_slice": [{"z_mm": float, "csa_mm2": float, "angle_deg": float}]},
                               "plausible_csa_mm2": {"low": float, "high": float, "level": str}} | null,
                      "lesions": {"count": int, "total_volume_mm3": float,
                                  "items": [{"id": int, "volume_mm3": float, "craniocaudal_length_mm": float,
                                             "max_inplane_extent_mm": float, "slices": [int, int]}]} | null},
     "images": {"sagittal": "<case>_sagittal.png", "axial": "<case>_axial.png", "<view>_plain": "<case>_<view>_plain.png"},
     "image_notes": {"sagittal": str},  # why a view is left out (a thin axial slab)
     "versions": {"spineauto": str, "torch": str}, "seconds": float}
"""
from __future__ import annotations

import io
import json
import logging
import time
from html import escape
from pathlib import Path
from urllib.parse import quote

from spineauto.errors import SpineautoError
from spineauto.inference.export import writing
from spineauto.io import csv_cells
from spineauto.io.atomic import write_atomic
from spineauto.io.outputs import check_output_apart
from spineauto.pipeline.report_assets import CSS, SCRIPT

logger = logging.getLogger(__name__)

KIND = "spineauto.pipeline_case"
STATUSES = ("done", "check", "stopped", "failed")
CSV_MEASURES = (("cord_volume_mm3", ("cord", "volume_mm3")), ("cord_csa_mean_mm2", ("cord", "csa_mm2", "mean")),
                ("cord_length_mm", ("cord", "length_mm")), ("lesion_count", ("lesions", "count")),
                ("lesion_total_volume_mm3", ("lesions", "total_volume_mm3")))


def build_report(out_dir: Path, require_cases: bool = False) -> Path:
    """Write ``out_dir/report.html`` and ``out_dir/pipeline.csv`` from the case JSONs; return the page.
    ``require_cases``: a folder without any case JSON is refused (not a pipeline output: never written into)."""
    out_dir = Path(out_dir)
    check_output_apart([], out_dir, what="the report's folder", hint="pass the -o folder of `spineauto pipeline`")
    cases, malformed = load_cases(out_dir)
    if require_cases and not cases and not malformed:
        raise SpineautoError(f"{out_dir}: no pipeline case (<case>/<case>.json) in it, so not a `spineauto pipeline` output; "
                             "pass the -o folder of `spineauto pipeline`")
    with writing(out_dir / "report.html"):
        write_atomic(out_dir / "pipeline.csv", lambda p: p.write_text(_csv(cases), encoding="utf-8", newline=""))
        page = write_atomic(out_dir / "report.html", lambda p: p.write_text(_html(out_dir, cases, malformed), encoding="utf-8"))
    logger.info("report of %d cases (%d files skipped): %s", len(cases), len(malformed), page)
    return page


def load_cases(out_dir: Path) -> tuple[list[tuple[str, dict]], list[tuple[str, str]]]:
    """([(folder, case JSON)] sorted by case, [(relative path, problem)] of the unreadable files)."""
    cases, malformed = [], []
    for path in sorted(Path(out_dir).glob("*/*.json")):
        rel = path.relative_to(out_dir).as_posix()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("kind") == KIND:
                _check(data)
                cases.append((path.parent.name, data))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            logger.warning("report: skipping %s: %s", path, e)
            malformed.append((rel, str(e)))
    return sorted(cases, key=lambda c: str(c[1]["case"])), malformed


def _check(d: dict) -> None:
    if not isinstance(d.get("case"), str) or not d["case"]:
        raise ValueError("'case' must be a non-empty string")
    if d.get("status") not in STATUSES:
        raise ValueError(f"'status' must be one of {list(STATUSES)}, got {d.get('status')!r}")
    if not isinstance(d.get("stages", []), list) or not all(isinstance(s, dict) for s in d.get("stages", [])):
        raise ValueError("'stages' must be a list of objects")
    for key in ("measurements", "images", "versions"):
        if not isinstance(d.get(key) or {}, dict):
            raise ValueError(f"'{key}' must be an object")


def _get(d, *keys):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def _num(v, digits: int = 1) -> str:
    return f"{v:,.{digits}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"


def _head_decisions(s: dict) -> list[tuple[str, str, dict]]:
    """(head, class, probabilities) of a classification stage: every head of ``heads``, else its one ``head``."""
    heads = _dict(s.get("heads"))
    if heads:
        return [(str(h), str(_dict(v).get("class")), _dict(_dict(v).get("probabilities"))) for h, v in heads.items()]
    if s.get("class") is None:
        return []
    return [(str(s.get("head") or s.get("stage")), str(s["class"]), _dict(s.get("probabilities")))]


def _classifications(cases) -> list[tuple[str, str]]:
    """(stage, head) columns, in order of appearance."""
    names: list[tuple[str, str]] = []
    for _, d in cases:
        for s in d.get("stages", []):
            if s.get("kind") == "classification":
                for head, _, _ in _head_decisions(s):
                    if (str(s.get("stage")), head) not in names:
                        names.append((str(s.get("stage")), head))
    return names


def _decision(d: dict, stage: str, head: str) -> tuple[str | None, float | None, str | None]:
    """(class, its probability, who decided it: header or image) of one head of one case."""
    s = next((s for s in d.get("stages", []) if s.get("stage") == stage), None)
    for h, cls, probs in _head_decisions(s or {}):
        if h == head:
            p = probs.get(cls)
            return cls, p if isinstance(p, (int, float)) else None, _dict(_dict(_dict(s).get("heads")).get(h)).get("source", "image")
    return None, None, None


def _flags(d: dict) -> list[dict]:
    flags = d.get("flags")
    return [f for f in flags if isinstance(f, dict)] if isinstance(flags, list) else []


def _flag_codes(d: dict) -> list[str]:
    """The distinct flag codes of a case, in order."""
    return list(dict.fromkeys(str(f.get("code", "?")) for f in _flags(d)))


def _csv(cases) -> str:
    stages = _classifications(cases)
    buf = io.StringIO()
    w = csv_cells.writer(buf, lineterminator="\n")
    w.writerow(["case", "status", "reason", "flags", *[f"{s}_{h}_{x}" if h != s else f"{s}_{x}" for s, h in stages for x in ("class", "probability", "source")],
                *[name for name, _ in CSV_MEASURES]])
    for _, d in cases:
        ms = _dict(d.get("measurements"))
        w.writerow([d["case"], d["status"], str(d.get("reason") or ""), " ".join(_flag_codes(d)), *[v if v is not None else "" for s, h in stages for v in _decision(d, s, h)],
                    *[_get(ms, *keys) if _get(ms, *keys) is not None else "" for _, keys in CSV_MEASURES]])
    return buf.getvalue()


STATUS_ORDER = {"check": 0, "failed": 1, "stopped": 2, "done": 3}  # the page shows what needs a look first


def _html(out_dir: Path, cases, malformed) -> str:
    counts = ", ".join(f"{sum(d['status'] == s for _, d in cases)} {s}" for s in STATUSES)
    cases = sorted(cases, key=lambda c: (STATUS_ORDER.get(c[1]["status"], 9), str(c[1]["case"])))
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>spineauto report: {escape(out_dir.name)}</title>"
             f"<style>{CSS}</style></head><body data-report='{escape(str(out_dir.resolve()))}'><main><h1>spineauto pipeline report</h1>"
             f"<p class='muted'>{escape(str(out_dir.resolve()))} · {len(cases)} cases: {counts} · built "
             f"{escape(time.strftime('%Y-%m-%d %H:%M'))} from the case JSON files (rebuild: <code>spineauto report OUT</code>). "
             "A case is <b>done</b> only when no quality check flagged it; <b>check</b> cases list why, and come first.</p>"]
    if malformed:
        items = "".join(f"<li><code>{escape(p)}</code>: {escape(e)}</li>" for p, e in malformed)
        parts.append(f"<div class='card warn'><b>{len(malformed)} file(s) could not be read and are left out:</b><ul>{items}</ul></div>")
    parts.append(_tools(cases))
    parts.append(_summary(cases))
    for i, (folder, d) in enumerate(cases):
        try:
            parts.append(_section(i, folder, d, out_dir))
        except (AttributeError, TypeError, ValueError, KeyError) as e:  # odd values inside a readable file
            logger.warning("report: cannot show case %s: %r", d["case"], e)
            parts.append(f"<section id='case-{i}' class='card case failed' data-case='{escape(d['case'])}'><h2>{escape(d['case'])}</h2>"
                         f"<div class='why failed'>this case's JSON holds values the report cannot show: {escape(repr(e))}</div></section>")
    return "".join(parts) + f"</main><script>{SCRIPT}</script></body></html>\n"


def _badge(status: str) -> str:
    return f"<span class='badge {escape(status)}'>{escape(status)}</span>"


def _tools(cases) -> str:
    """Review controls: filters, overlay toggle, rating export, the keys."""
    statuses = [s for s in STATUSES if any(d["status"] == s for _, d in cases)]
    codes = list(dict.fromkeys(c for _, d in cases for c in _flag_codes(d)))
    status_opts = "".join(f"<option value='{escape(s)}'>{escape(s)}</option>" for s in statuses)
    flag_opts = "".join(f"<option value='{escape(c)}'>{escape(c)}</option>" for c in codes)
    return ("<div class='card'><div class='tools'>"
            f"<label>status <select id='f-status'><option value=''>all</option>{status_opts}</select></label>"
            f"<label>flag <select id='f-flag'><option value=''>any</option><option value='-'>none</option>{flag_opts}</select></label>"
            "<label>CSA mean (mm²) <input id='f-csa-min' type='number' step='any' placeholder='min'> – "
            "<input id='f-csa-max' type='number' step='any' placeholder='max'></label>"
            "<label>case <input id='f-text' type='search' placeholder='name contains'></label>"
            "<span id='shown' class='muted'></span></div>"
            "<div class='tools' style='margin-top:8px'><button id='toggle' type='button'>overlays on/off</button>"
            "<button id='export-csv' type='button'>export ratings (CSV)</button>"
            "<button id='export-json' type='button'>export ratings (JSON)</button>"
            "<span class='muted'>keys: <kbd>o</kbd> overlays · <kbd>j</kbd>/<kbd>k</kbd> next/previous case · "
            "<kbd>p</kbd> pass · <kbd>f</kbd> fail · <kbd>a</kbd> artefact · <kbd>u</kbd> clear; ratings stay in this browser "
            "until exported</span></div></div>")


def _summary(cases) -> str:
    stages = _classifications(cases)
    head = [("case", "text"), ("status", "text"), ("rating", "text"), ("flags", "text"), ("reason", "text"),
            *([("classes", "text")] if stages else []), ("cord volume (mm³)", "number"),
            ("CSA mean (mm²)", "number"), ("length (mm)", "number"), ("lesions", "number"), ("lesion volume (mm³)", "number"),
            ("time (s)", "number")]
    rows = []
    for i, (_, d) in enumerate(cases):
        ms = _dict(d.get("measurements"))
        decided = [_decision(d, st, h) for st, h in stages]
        codes = _flag_codes(d)
        reason = str(d.get("reason") or "–")
        cells = [f"<td><a class='nw' href='#case-{i}'>{escape(d['case'])}</a></td>",
                 f"<td data-v='{STATUS_ORDER.get(d['status'], 9)}'>{_badge(d['status'])}</td>", "<td class='rated'>–</td>",
                 f"<td>{''.join(f'<span class=chip>{escape(c)}</span>' for c in codes) or '–'}</td>",
                 f"<td><span class='reason' title='{escape(reason)}'>{escape(reason)}</span></td>"]
        if stages:  # one column, a line per head: the table stays within the page however many heads there are
            lines = [f"<div class='nw'><span class='muted'>{escape(h)}</span> {escape(c)} "
                     f"<span class='muted'>{'header' if src == 'header' else _num(p, 2)}</span></div>"
                     for (_, h), (c, p, src) in zip(stages, decided) if c]
            cells.append(f"<td>{''.join(lines) or '–'}</td>")
        values = [_get(ms, "cord", "volume_mm3"), _get(ms, "cord", "csa_mm2", "mean"), _get(ms, "cord", "length_mm"),
                  _get(ms, "lesions", "count"), _get(ms, "lesions", "total_volume_mm3"), d.get("seconds")]
        shown = [_num(values[0], 0), _num(values[1]), _num(values[2]), _num(values[3], 0), _num(values[4]), _num(values[5])]
        cells += [f"<td class='n' data-v='{v if _is_num(v) else ''}'>{n}</td>" for v, n in zip(values, shown)]
        csa = values[1] if _is_num(values[1]) else ""
        rows.append(f"<tr data-case='{escape(d['case'])}' data-section='case-{i}' data-status='{escape(d['status'])}' "
                    f"data-flags='{escape(' '.join(codes))}' data-csa='{csa}'>" + "".join(cells) + "</tr>")
    if not rows:
        rows = [f"<tr data-case='' data-status='' data-flags='' data-csa=''><td colspan='{len(head)}' class='muted'>no case JSON files "
                "found</td><td class='rated' hidden></td></tr>"]
    ths = "".join(f"<th data-type='{t}' title='sort'>{escape(h)}</th>" for h, t in head)
    return (f"<div class='card'><h3 style='margin-top:0'>Summary</h3><div class='scroll'><table id='summary'><thead><tr>{ths}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div></div>")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _section(i: int, folder: str, d: dict, out_dir: Path) -> str:
    status, versions = d["status"], _dict(d.get("versions"))
    meta = [f"source <code>{escape(str(d.get('source', '–')))}</code>", f"{_num(d.get('seconds'))} s",
            *[f"{escape(str(k))} {escape(str(v))}" for k, v in versions.items()]]
    rating = "".join(f"<button type='button' data-rating='{r}' aria-pressed='false'>{r}</button>" for r in ("pass", "fail", "artefact"))
    out = [f"<section id='case-{i}' class='card case {escape(status)}' data-case='{escape(d['case'])}'>"
           f"<h2>{escape(d['case'])} {_badge(status)} <span class='rating'>{rating}</span></h2>"
           f"<div class='muted'>{' · '.join(meta)}</div>"]
    flags = _flags(d)
    if status == "check" or flags:
        items = "".join(f"<li><b>{escape(str(f.get('stage', '?')))}</b> <span class='chip'>{escape(str(f.get('code', '?')))}</span> "
                        f"{escape(str(f.get('reason', '')))}</li>" for f in flags)
        out.append(f"<div class='why check'><b>Check:</b> {len(flags)} quality flag(s)<ul>{items}</ul></div>")
    if status in ("stopped", "failed"):
        out.append(f"<div class='why {escape(status)}'><b>{'Stopped' if status == 'stopped' else 'Failed'}:</b> "
                   f"{escape(str(d.get('reason') or 'no reason recorded'))}</div>")
    out.append(_stages(d.get("stages", []), folder, out_dir))
    out.append(_images(_dict(d.get("images")), folder, out_dir, _dict(d.get("image_notes"))))
    out.append(_measurements(_dict(d.get("measurements"))))
    return "".join(out) + "</section>"


def _stages(stages: list[dict], folder: str, out_dir: Path) -> str:
    if not stages:
        return "<h3>Stages</h3><p class='muted'>no stage ran</p>"
    rows = []
    for s in stages:
        if s.get("kind") == "classification":
            verdict = "" if s.get("passed") is None else (" ✓ passed" if s.get("passed") else " ✗ did not pass")
            lines = []
            for head, cls, probabilities in _head_decisions(s):
                probs = sorted(((str(k), v) for k, v in probabilities.items() if isinstance(v, (int, float))), key=lambda kv: -kv[1])
                p = probabilities.get(cls)
                bar = f"<span class='bar' style='width:{max(2, round(60 * p))}px'></span>" if isinstance(p, (int, float)) else ""
                label = f"<span class='muted'>{escape(head)}</span> " if len(_head_decisions(s)) > 1 else ""
                lines.append(f"<div>{label}{bar}<b>{escape(cls)}</b> {_num(p, 2)}<div class='probs'>"
                             + ", ".join(f"{escape(k)} {_num(v, 2)}" for k, v in probs) + "</div></div>")
            result = "".join(lines) + verdict
        elif s.get("skipped"):
            result = f"skipped: {escape(str(s['skipped']))}"
        elif s.get("mask"):
            name = Path(str(s["mask"])).name
            link = (out_dir / folder / name).is_file()
            result = f"mask <a href='{escape(quote(f'{folder}/{name}'))}'>{escape(name)}</a>" if link else f"mask {escape(name)}"
        else:
            result = "no mask"
        folds = ", ".join(str(f) for f in s.get("folds") or [])
        model = _model(str(s.get("model", "–"))) + (f" <span class='muted'>(folds {escape(folds)})</span>" if folds else "")
        head = f" <span class='muted'>head {escape(str(s['head']))}</span>" if s.get("head") else ""
        rows.append(f"<tr><td><b>{escape(str(s.get('stage', '?')))}</b><br><span class='muted'>{escape(str(s.get('kind', '')))}</span></td>"
                    f"<td>{result}</td><td>{model}{head}</td><td class='n'>{_num(s.get('seconds'))} s</td></tr>")
    return ("<h3>Stages</h3><table><tr><th>stage</th><th>decision</th><th>model</th><th>time</th></tr>"
            + "".join(rows) + "</table>")


def _model(path: str) -> str:
    """A model's folder name, its full path (or place in a bundle) folded away."""
    name = path.replace(":", "/").rstrip("/").rsplit("/", 1)[-1] or path
    return f"<details><summary>{escape(name)}</summary><code style='font-size:11px'>{escape(path)}</code></details>"


def _images(images: dict, folder: str, out_dir: Path, notes: dict | None = None) -> str:
    captions = {"sagittal": "sagittal slices (anterior left, superior up)",
                "axial": "axial slices, superior first (radiological: the patient's right on the left)"}
    names = {v: Path(str(images.get(v) or "")).name for v in captions}
    found = {v: n for v, n in names.items() if n and (out_dir / folder / n).is_file()}
    if not found:
        return "<h3>Images</h3><p class='muted'>no overlay images</p>"
    out = ["<h3>Images</h3>"]
    for view, caption in captions.items():
        if view in found:
            src = escape(quote(f"{folder}/{found[view]}"))
            plain = Path(str(images.get(f"{view}_plain") or "")).name
            toggle = (f" data-overlay='{src}' data-plain='{escape(quote(f'{folder}/{plain}'))}'"
                      if plain and (out_dir / folder / plain).is_file() else "")
            out.append(f"<figure><img src='{src}'{toggle} alt='{escape(view)} mosaic'>"
                       f"<figcaption>{escape(caption)}; panel labels: voxel index in the original image</figcaption></figure>")
        else:
            out.append(f"<div class='noimg'>{escape(str((notes or {}).get(view) or f'no {view} image'))}</div>")
    out.append("<div class='muted overlay-key' style='font-size:12px'><span class='key' style='background:#00ff00;margin-left:0'>"
               "</span>cord<span class='key' style='background:#ff2020'></span>lesion (<kbd>o</kbd>: overlays on/off)</div>")
    return "".join(out)


def _measurements(ms: dict) -> str:
    cord, lesions = ms.get("cord"), ms.get("lesions")
    if not cord and not lesions:
        return "<h3>Measurements</h3><p class='muted'>no measurements</p>"
    out = ["<h3>Measurements</h3><div class='row'>"]
    if isinstance(cord, dict):
        csa = _dict(cord.get("csa_mm2"))
        rows = [("cord volume", _num(cord.get("volume_mm3")), "mm³"), ("cord length", _num(cord.get("length_mm")), "mm"),
                *[(f"CSA {k}", _num(csa.get(k), 2), "mm²") for k in ("mean", "median", "min", "max")]]
        out.append("<table>" + "".join(f"<tr><th>{k}</th><td class='n'>{v}</td><td>{u}</td></tr>" for k, v, u in rows) + "</table>")
        per_slice = [p for p in csa.get("per_slice") or [] if isinstance(p, dict)]
        if per_slice:
            out.append(f"<div>{_csa_svg(per_slice, _dict(cord.get('plausible_csa_mm2')))}<details><summary>CSA per slice ({len(per_slice)} slices)</summary><table>"
                       "<tr><th>z (mm)</th><th>CSA (mm²)</th><th>angle (°)</th></tr>"
                       + "".join(f"<tr><td class='n'>{_num(p.get('z_mm'))}</td><td class='n'>{_num(p.get('csa_mm2'), 2)}</td>"
                                 f"<td class='n'>{_num(p.get('angle_deg'))}</td></tr>" for p in per_slice) + "</table></details></div>")
    out.append("</div>")
    if isinstance(lesions, dict):
        out.append(f"<p><b>{_num(lesions.get('count'), 0)} lesion(s)</b>, total volume {_num(lesions.get('total_volume_mm3'))} mm³</p>")
        items = [x for x in lesions.get("items") or [] if isinstance(x, dict)]
        if items:
            out.append("<table><tr><th>lesion</th><th>volume (mm³)</th><th>craniocaudal length (mm)</th>"
                       "<th>largest in-plane extent (mm)</th><th>slices</th></tr>")
            for x in items:
                sl = x.get("slices") or []
                out.append(f"<tr><td>{escape(str(x.get('id', '?')))}</td><td class='n'>{_num(x.get('volume_mm3'))}</td>"
                           f"<td class='n'>{_num(x.get('craniocaudal_length_mm'))}</td><td class='n'>{_num(x.get('max_inplane_extent_mm'))}</td>"
                           f"<td>{escape('–'.join(str(v) for v in sl)) or '–'}</td></tr>")
            out.append("</table>")
    return "".join(out)


def _csa_svg(per_slice: list[dict], plausible: dict | None = None, w: int = 460, h: int = 170) -> str:
    """CSA along the cord as an inline SVG line plot (inferior left, superior right), the plausible
    range (``plausible``: low, high, level) shaded."""
    pts = sorted((p["z_mm"], p["csa_mm2"]) for p in per_slice
                 if all(isinstance(p.get(k), (int, float)) for k in ("z_mm", "csa_mm2")))
    if len(pts) < 2:
        return ""
    band = (plausible or {}).get("low"), (plausible or {}).get("high")
    band = band if all(_is_num(v) for v in band) and band[0] < band[1] else None
    top_value = max([p[1] for p in pts] + ([band[1]] if band else []))
    (z0, z1), (c0, c1) = (min(p[0] for p in pts), max(p[0] for p in pts)), (0.0, top_value * 1.1 or 1.0)
    left, right, top, bottom = 46, w - 10, 10, h - 30
    sx = lambda z: left + (z - z0) / ((z1 - z0) or 1) * (right - left)  # noqa: E731
    sy = lambda c: bottom - (c - c0) / (c1 - c0) * (bottom - top)  # noqa: E731
    line = " ".join(f"{sx(z):.1f},{sy(c):.1f}" for z, c in pts)
    ticks = "".join(f"<text x='{left - 6}' y='{sy(v) + 4:.1f}' text-anchor='end'>{v:.0f}</text>"
                    f"<line x1='{left}' x2='{right}' y1='{sy(v):.1f}' y2='{sy(v):.1f}' stroke='#e5e8eb'/>" for v in (c0, c1 / 2, c1))
    shade = ""
    if band:
        level = escape(str((plausible or {}).get("level") or ""))
        shade = (f"<rect class='normal-range' x='{left}' y='{sy(band[1]):.1f}' width='{right - left}' height='{sy(band[0]) - sy(band[1]):.1f}' "
                 f"fill='#2da44e' fill-opacity='0.12'><title>plausible adult CSA {band[0]:g}-{band[1]:g} mm² ({level})</title></rect>"
                 f"<text x='{right - 4}' y='{sy(band[1]) + 12:.1f}' text-anchor='end' font-size='10'>plausible {band[0]:g}-{band[1]:g} mm² "
                 f"({level})</text>")
    return (f"<svg width='{w}' height='{h}' viewBox='0 0 {w} {h}' font-size='11' fill='#57606a' role='img' aria-label='CSA per slice'>"
            f"{shade}{ticks}<polyline points='{line}' fill='none' stroke='#1a7f37' stroke-width='1.8'/>"
            f"<text x='{left}' y='{h - 12}'>{z0:.0f}</text><text x='{right}' y='{h - 12}' text-anchor='end'>{z1:.0f}</text>"
            f"<text x='{(left + right) / 2}' y='{h - 12}' text-anchor='middle'>z (mm), inferior → superior</text>"
            f"<text x='12' y='{(top + bottom) / 2}' transform='rotate(-90 12 {(top + bottom) / 2})' text-anchor='middle'>CSA (mm²)</text></svg>")
