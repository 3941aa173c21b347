"""The report page's inline style and script (:mod:`spineauto.pipeline.report` writes them into the page).

The script makes the page a review tool and needs nothing outside the page: the summary table sorts
(click a heading) and filters (status, flag, CSA range, case name); every case gets a pass / fail /
artefact rating kept in the browser's localStorage (per report folder) and exported as CSV or JSON;
the overlays switch on and off. Keys: ``o`` overlays, ``j`` / ``k`` next / previous case, ``p`` /
``f`` / ``a`` rate the current case, ``u`` clear its rating. ``window.spineautoReview`` exposes the
same actions (what the browser tests drive).
"""

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;background:#f6f7f9;margin:0}
main{max-width:1400px;margin:0 auto;padding:16px 20px 40px;box-sizing:border-box}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:18px;margin:0 0 4px;display:flex;gap:10px;align-items:center;flex-wrap:wrap}
h3{font-size:14px;margin:16px 0 6px;color:#57606a;text-transform:uppercase;letter-spacing:.04em}
.muted{color:#57606a}.card{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:14px 16px;margin:16px 0}
.case{border-left:6px solid #8c959f}.case.done{border-left-color:#2da44e}.case.check{border-left-color:#bf8700}
.case.stopped{border-left-color:#d4a72c}.case.failed{border-left-color:#cf222e}.case.current{box-shadow:0 0 0 3px #0969da55}
table{border-collapse:collapse;font-size:13px}th,td{padding:4px 8px;border-bottom:1px solid #e5e8eb;text-align:left;vertical-align:top}
th{background:#f0f2f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}.nw{white-space:nowrap}
#summary{width:100%;table-layout:auto}#summary th{cursor:pointer;user-select:none;vertical-align:bottom}.scroll{overflow-x:auto}
#summary th[aria-sort=ascending]::after{content:" ▲"}#summary th[aria-sort=descending]::after{content:" ▼"}
.reason{display:block;max-width:18em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.badge{display:inline-block;padding:1px 9px;border-radius:10px;font-size:12px;font-weight:600}
.badge.done{background:#dafbe1;color:#116329}.badge.check{background:#fff1c2;color:#7d4e00;outline:1px solid #d4a72c}
.badge.stopped{background:#fff8c5;color:#7d4e00}.badge.failed{background:#ffebe9;color:#a40e26}
.chip{display:inline-block;padding:0 6px;margin:1px 2px 1px 0;border-radius:4px;background:#eef1f4;font-size:11px;white-space:nowrap}
.why{border-radius:6px;padding:8px 12px;margin:8px 0}.why.stopped,.why.check{background:#fff8c5}.why.failed{background:#ffebe9}
.why ul{margin:4px 0 0;padding-left:20px}
.warn{background:#fff8c5;border:1px solid #d4a72c}
.bar{display:inline-block;height:8px;background:#0969da;border-radius:2px;vertical-align:middle;margin-right:6px}
.probs{color:#57606a;font-size:12px}
figure{margin:6px 0 12px}figure img{max-width:100%;display:block;border-radius:4px;background:#111}
figcaption{font-size:12px;color:#57606a;margin-top:3px}
.key{display:inline-block;width:11px;height:11px;border-radius:2px;vertical-align:-1px;margin:0 4px 0 10px}
.noimg{padding:14px 20px;margin:6px 0 12px;background:#eef0f2;color:#57606a;border-radius:4px}
.row{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
details summary{cursor:pointer;color:#0969da;margin:2px 0}a{color:#0969da}
.tools{display:flex;gap:14px;flex-wrap:wrap;align-items:center;font-size:13px}.tools label{white-space:nowrap}
.tools input[type=number]{width:5.5em}.tools input[type=search]{width:11em}
kbd{border:1px solid #d0d7de;border-bottom-width:2px;border-radius:4px;padding:0 5px;font-size:12px;background:#f6f8fa}
.rating button{font:inherit;font-size:12px;padding:2px 10px;margin-right:4px;border:1px solid #d0d7de;border-radius:12px;background:#fff;cursor:pointer}
.rating button[aria-pressed=true][data-rating=pass]{background:#2da44e;color:#fff;border-color:#2da44e}
.rating button[aria-pressed=true][data-rating=fail]{background:#cf222e;color:#fff;border-color:#cf222e}
.rating button[aria-pressed=true][data-rating=artefact]{background:#8250df;color:#fff;border-color:#8250df}
.rated-pass{color:#116329;font-weight:600}.rated-fail{color:#a40e26;font-weight:600}.rated-artefact{color:#6639ba;font-weight:600}
body.plain .overlay-key{opacity:.35;text-decoration:line-through}
"""

SCRIPT = r"""
(function () {
  'use strict';
  var body = document.body, store = 'spineauto-ratings:' + body.dataset.report;
  var table = document.getElementById('summary'), tbody = table.tBodies[0];
  var sections = Array.prototype.slice.call(document.querySelectorAll('section.case'));
  var current = -1;
  function load() { try { return JSON.parse(localStorage.getItem(store) || '{}'); } catch (e) { return {}; } }
  function save(r) { try { localStorage.setItem(store, JSON.stringify(r)); } catch (e) {} }
  var ratings = load();
  function show() {
    sections.forEach(function (s) {
      var r = ratings[s.dataset.case] || '';
      s.querySelectorAll('.rating button').forEach(function (b) { b.setAttribute('aria-pressed', String(b.dataset.rating === r)); });
    });
    Array.prototype.forEach.call(tbody.rows, function (tr) {
      var r = ratings[tr.dataset.case] || '', cell = tr.querySelector('.rated');
      cell.textContent = r || '–'; cell.className = 'rated' + (r ? ' rated-' + r : '');
    });
  }
  function rate(name, r) {
    if (r) { ratings[name] = r; } else { delete ratings[name]; }
    save(ratings); show();
  }
  function overlays(on) {
    if (on === undefined) { on = body.classList.contains('plain'); }
    body.classList.toggle('plain', !on);
    document.querySelectorAll('img[data-plain]').forEach(function (img) { img.src = on ? img.dataset.overlay : img.dataset.plain; });
    return on;
  }
  function num(v) { var x = parseFloat(v); return isNaN(x) ? null : x; }
  function filter() {
    var st = document.getElementById('f-status').value, fl = document.getElementById('f-flag').value;
    var lo = num(document.getElementById('f-csa-min').value), hi = num(document.getElementById('f-csa-max').value);
    var text = document.getElementById('f-text').value.toLowerCase(), shown = 0;
    Array.prototype.forEach.call(tbody.rows, function (tr) {
      var flags = tr.dataset.flags ? tr.dataset.flags.split(' ') : [], csa = num(tr.dataset.csa);
      var ok = (!st || tr.dataset.status === st) && (!fl || (fl === '-' ? flags.length === 0 : flags.indexOf(fl) >= 0))
        && (lo === null || (csa !== null && csa >= lo)) && (hi === null || (csa !== null && csa <= hi))
        && (!text || tr.dataset.case.toLowerCase().indexOf(text) >= 0);
      tr.hidden = !ok; if (ok) { shown += 1; }
      var sec = document.getElementById(tr.dataset.section); if (sec) { sec.hidden = !ok; }
    });
    document.getElementById('shown').textContent = shown + ' of ' + tbody.rows.length + ' cases shown';
    return shown;
  }
  function sortBy(col, dir) {
    var th = table.tHead.rows[0].cells[col];
    dir = dir || (th.getAttribute('aria-sort') === 'ascending' ? 'descending' : 'ascending');
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) { c.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', dir);
    var rows = Array.prototype.slice.call(tbody.rows), sign = dir === 'ascending' ? 1 : -1;
    function key(tr) { var c = tr.cells[col]; return c.dataset.v !== undefined ? c.dataset.v : c.textContent.trim(); }
    rows.sort(function (a, b) {
      var x = key(a), y = key(b), nx = num(x), ny = num(y);
      if (th.dataset.type === 'number') {
        if (nx === null && ny === null) { return 0; } if (nx === null) { return 1; } if (ny === null) { return -1; }
        return sign * (nx - ny);
      }
      return sign * x.localeCompare(y);
    });
    rows.forEach(function (tr) { tbody.appendChild(tr); });
    return rows.map(function (tr) { return tr.dataset.case; });
  }
  function visible() { return sections.filter(function (s) { return !s.hidden; }); }
  function go(step) {
    var list = visible(); if (!list.length) { return null; }
    var at = list.indexOf(sections[current]);
    var next = list[Math.max(0, Math.min(list.length - 1, at < 0 ? 0 : at + step))];
    sections.forEach(function (s) { s.classList.remove('current'); });
    next.classList.add('current'); current = sections.indexOf(next);
    if (next.scrollIntoView) { next.scrollIntoView({block: 'start'}); }
    return next.dataset.case;
  }
  function rows() {
    return Array.prototype.map.call(tbody.rows, function (tr) {
      return {case: tr.dataset.case, status: tr.dataset.status, flags: tr.dataset.flags, csa_mean_mm2: num(tr.dataset.csa),
              rating: ratings[tr.dataset.case] || ''};
    });
  }
  function exportText(kind) {
    var data = rows();
    if (kind === 'json') { return JSON.stringify({report: body.dataset.report, ratings: data}, null, 1); }
    var q = function (v) { v = v === null ? '' : String(v); return /[",\n]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v; };
    return ['case,status,flags,csa_mean_mm2,rating'].concat(data.map(function (r) {
      return [r.case, r.status, r.flags, r.csa_mean_mm2, r.rating].map(q).join(',');
    })).join('\n') + '\n';
  }
  function download(kind) {
    var blob = new Blob([exportText(kind)], {type: kind === 'json' ? 'application/json' : 'text/csv'});
    var a = document.createElement('a'); a.href = URL.createObjectURL(blob); a.download = 'ratings.' + kind;
    document.body.appendChild(a); a.click(); a.remove();
  }
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) { th.addEventListener('click', function () { sortBy(i); }); });
  ['f-status', 'f-flag', 'f-csa-min', 'f-csa-max', 'f-text'].forEach(function (id) {
    document.getElementById(id).addEventListener('input', filter);
  });
  document.querySelectorAll('.rating button').forEach(function (b) {
    b.addEventListener('click', function () {
      var name = b.closest('section').dataset.case;
      rate(name, ratings[name] === b.dataset.rating ? '' : b.dataset.rating);
    });
  });
  document.getElementById('toggle').addEventListener('click', function () { overlays(); });
  document.getElementById('export-csv').addEventListener('click', function () { download('csv'); });
  document.getElementById('export-json').addEventListener('click', function () { download('json'); });
  document.addEventListener('keydown', function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey || /INPUT|SELECT|TEXTAREA/.test((e.target || {}).tagName || '')) { return; }
    var k = e.key, name = current >= 0 ? sections[current].dataset.case : null;
    if (k === 'o') { overlays(); } else if (k === 'j') { go(1); } else if (k === 'k') { go(-1); }
    else if (name && (k === 'p' || k === 'f' || k === 'a')) { rate(name, {p: 'pass', f: 'fail', a: 'artefact'}[k]); }
    else if (name && k === 'u') { rate(name, ''); } else { return; }
    e.preventDefault();
  });
  show(); filter();
  window.spineautoReview = {rate: rate, ratings: function () { return JSON.parse(JSON.stringify(ratings)); }, overlays: overlays,
                            filter: filter, sortBy: sortBy, next: go, rows: rows, exportText: exportText};
})();
"""
