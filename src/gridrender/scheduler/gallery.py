"""The gallery page (layout.gallery): one static page, no external assets, no network.

Shows the comparison sheets and every cell with its parameters (on hover and on
click), filterable by the value of each axis that varies.
"""

from __future__ import annotations

import html
import json
from typing import Any

from . import layout
from .params import AXES
from .sheets import Sheet, axis_label, axis_values

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#222;background:#fafafa}
h1{font-size:1.4rem;margin:0 0 .3rem}h2{font-size:1.1rem;margin:1.5rem 0 .5rem}
.muted{color:#666}.sheets img{max-width:100%;border:1px solid #ddd;margin:.3rem 0;background:#fff}
.filters{display:flex;flex-wrap:wrap;gap:.8rem;margin:.5rem 0}.filters label{display:flex;gap:.3rem;align-items:center}
.cells{display:grid;grid-template-columns:repeat(auto-fill,minmax(140px,1fr));gap:.6rem}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:.3rem;cursor:pointer}
figure img{width:100%;height:auto;display:block;image-rendering:auto}
figcaption{font-size:.75rem;color:#555;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
#detail{position:fixed;right:1rem;bottom:1rem;max-width:28rem;background:#fff;border:1px solid #aaa;padding:.8rem;
white-space:pre-wrap;font:12px/1.4 ui-monospace,monospace;display:none;box-shadow:0 2px 12px #0003}
"""

_SCRIPT = """
const data = JSON.parse(document.getElementById('cells-data').textContent);
const grid = document.getElementById('cells');
const detail = document.getElementById('detail');
const selects = Array.from(document.querySelectorAll('select[data-axis]'));
function valueOf(cell, axis) { return cell.axes[axis]; }
function describe(cell) {
  return Object.entries(cell).filter(([k]) => !['status', 'axes', 'href'].includes(k)).map(([k, v]) => k + ': ' + v).join('\\n');
}
for (const cell of data.cells) {
  const fig = document.createElement('figure');
  fig.dataset.id = cell.cell_id;
  fig.title = describe(cell);
  const img = document.createElement('img');
  img.loading = 'lazy';
  img.alt = cell.prompt;
  img.src = cell.href;
  const cap = document.createElement('figcaption');
  cap.textContent = data.varying.map(a => a + '=' + valueOf(cell, a)).join(' ') || cell.cell_id;
  fig.append(img, cap);
  fig.addEventListener('click', () => { detail.textContent = describe(cell); detail.style.display = 'block'; });
  cell.element = fig;
  grid.append(fig);
}
detail.addEventListener('click', () => { detail.style.display = 'none'; });
function applyFilters() {
  let shown = 0;
  for (const cell of data.cells) {
    const ok = selects.every(s => s.value === '' || valueOf(cell, s.dataset.axis) === s.value);
    cell.element.hidden = !ok;
    if (ok) shown += 1;
  }
  document.getElementById('shown').textContent = shown + ' of ' + data.cells.length + ' cells';
}
selects.forEach(s => s.addEventListener('change', applyFilters));
applyFilters();
"""


def render_gallery(job_name: str, lines: list[dict[str, Any]], sheets: list[Sheet], note: str = "") -> bytes:
    values = axis_values(lines)
    varying = [a for a in AXES if len(values[a]) > 1]
    locked = {a: values[a][0] for a in AXES if len(values[a]) == 1}
    done = sum(line.get("status") == "done" for line in lines)
    filters = "".join(
        f'<label>{html.escape(axis)} <select data-axis="{html.escape(axis)}"><option value="">all</option>'
        + "".join(f'<option value="{html.escape(str(v))}">{html.escape(str(v))}</option>' for v in values[axis])
        + "</select></label>"
        for axis in varying
    )
    page_key = layout.gallery(job_name)
    cells = [
        {
            **{k: v for k, v in line.items() if k not in ("image", "record")},
            "href": layout.relative(page_key, line["image"]),
            "axes": {a: axis_label(line, a) for a in varying},
        }
        for line in lines
        if line.get("status") == "done"
    ]
    # "<" as \u003c: no prompt can close the script element or open a comment in it.
    payload = json.dumps({"cells": cells, "varying": varying}, ensure_ascii=False).replace("<", "\\u003c")
    sheet_tags = "".join(
        f'<figure><img src="{html.escape(layout.relative(page_key, layout.sheet(job_name, s.name)))}" '
        f'alt="{html.escape(s.title)}"><figcaption>{html.escape(s.title)}</figcaption></figure>'
        for s in sheets
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{html.escape(job_name)} — gridrender</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(job_name)}</h1>
<p class="muted">{done:,} of {len(lines):,} cells rendered · varies: {html.escape(", ".join(varying) or "nothing")} ·
locked: {html.escape(", ".join(f"{k}={v}" for k, v in locked.items()))}{(" · " + html.escape(note)) if note else ""}</p>
<h2>Sheets</h2><div class="sheets">{sheet_tags or '<p class="muted">no sheets</p>'}</div>
<h2>Cells</h2><div class="filters">{filters}<span id="shown" class="muted"></span></div>
<div class="cells" id="cells"></div>
<div id="detail" title="click to close"></div>
<script type="application/json" id="cells-data">{payload}</script>
<script>{_SCRIPT}</script>
</body></html>
"""
    return page.encode()
