"""`lora-launch report [DIR ...]`: the runs as one self-contained HTML page (inline CSS, JS and SVG; no
network): the runs table, sortable by clicking a column (or opening the page at `#sort=KEY`, `#sort=-KEY`),
each sweep's best eval loss against each swept key, and each run's loss curves, with relative links to the
adapters and run dirs, so the page works wherever the folder is copied with it.
"""

from __future__ import annotations

import os
import time
from html import escape
from pathlib import Path
from urllib.parse import quote

from lora_launch.catalog.charts import Series, chart
from lora_launch.catalog.runs import Run
from lora_launch.catalog.table import COLUMNS, HEADERS, NOT_COMPARED, cell, text
from lora_launch.run.rundir import write_atomic

TRAIN, EVAL, DONE, OTHER = "#1f77b4", "#d62728", "#1f77b4", "#999"

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; } h3 { font-size: 15px; margin: 0 0 4px; }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; white-space: nowrap; }
th { background: #f0f0f0; cursor: pointer; user-select: none; }
th[aria-sort=ascending]::after { content: " \\25B2"; } th[aria-sort=descending]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.status { padding: 1px 6px; border-radius: 8px; background: #eee; }
.s-finished { background: #d6f5d6; } .s-running { background: #d6e6ff; }
.s-failed, .s-broken, .s-killed { background: #ffd9d9; }
.s-preempted, .s-interrupted, .s-pruned { background: #fff0c2; }
.cards { display: flex; flex-wrap: wrap; gap: 16px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px; max-width: 540px; }
.meta, .note { color: #666; } .chart text { font-size: 11px; fill: #333; }
code { background: #f3f3f3; padding: 0 3px; overflow-wrap: anywhere; }
"""

# sorts the table by the URL's #sort=KEY (or #sort=-KEY); a click on a column header sets it
SCRIPT = """
const table = document.getElementById('runs');
const heads = [...table.tHead.rows[0].cells];
function sortBy(spec) {
  const desc = spec.startsWith('-'), key = desc ? spec.slice(1) : spec;
  const col = heads.findIndex(th => th.dataset.key === key);
  if (col < 0) return;
  const body = table.tBodies[0], value = row => row.cells[col].dataset.v;
  const rows = [...body.rows].sort((a, b) => {
    const x = value(a), y = value(b);
    if (x === '' || y === '') return (x === '') - (y === '');
    const nx = Number(x), ny = Number(y);
    const c = !isNaN(nx) && !isNaN(ny) ? nx - ny : x.localeCompare(y);
    return desc ? -c : c;
  });
  rows.forEach(row => body.appendChild(row));
  heads.forEach(th => th.removeAttribute('aria-sort'));
  heads[col].setAttribute('aria-sort', desc ? 'descending' : 'ascending');
}
function fromHash() {
  const m = location.hash.match(/^#sort=(.+)$/);
  if (m) sortBy(decodeURIComponent(m[1]));
}
heads.forEach(th => th.addEventListener('click', () => {
  const now = decodeURIComponent(location.hash.slice(6));
  location.hash = 'sort=' + (now === th.dataset.key ? '-' : '') + th.dataset.key;
}));
window.addEventListener('hashchange', fromHash);
fromHash();
"""


def _link(target: Path, page_dir: Path, label: str) -> str:
    """A link from the page to `target` by a relative path: it survives moving the folder."""
    href = quote(os.path.relpath(target.resolve(), page_dir.resolve()).replace(os.sep, "/"))
    return f'<a href="{escape(href)}">{escape(label)}</a>'


def _badge(run: Run) -> str:
    """The run's status, coloured, its note (why it failed, ...) on hover."""
    kind = escape(run.status.replace(" ", "-"))
    return f'<span class="status s-{kind}" title="{escape(run.note)}">{escape(run.status)}</span>'


def _table(runs: list[Run], page_dir: Path) -> str:
    """The runs table; each cell keeps its raw value in data-v for the page's sorting."""
    heads = "".join(f'<th data-key="{c}">{escape(HEADERS.get(c, c))}</th>' for c in COLUMNS)
    rows = []
    for i, run in enumerate(runs):
        row, cells = run.row(), []
        for c in COLUMNS:
            shown = escape(cell(c, row))
            if c == "name":
                shown = f'<a href="#run-{i}">{shown}</a>'
            elif c == "status":
                shown = _badge(run)
            elif c == "adapter" and run.adapter:
                shown = _link(run.adapter, page_dir, "adapter/")
            numeric = ' class="num"' if isinstance(row[c], (int, float)) else ""
            cells.append(f'<td data-v="{escape(text(row[c]))}"{numeric}>{shown}</td>')
        rows.append(f'<tr data-name="{escape(run.name)}">{"".join(cells)}</tr>')
    return f'<table id="runs"><thead><tr>{heads}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _value(raw: str):
    try:
        return float(raw)
    except ValueError:
        return raw


def swept_values(trials: list[Run]) -> dict[str, list]:
    """For each key the trials' overrides set to different values: each trial's value (None: not set)."""
    per_trial = [dict(o.split("=", 1) for o in t.overrides if "=" in o) for t in trials]
    keys = sorted({k for d in per_trial for k in d if k.lstrip("+~") not in NOT_COMPARED})
    swept = [k for k in keys if len({d.get(k) for d in per_trial}) > 1]
    return {k.lstrip("+~"): [None if d.get(k) is None else _value(d[k]) for d in per_trial] for k in swept}


def _sweep(sweep: Path, trials: list[Run], index: dict[int, int], page_dir: Path) -> str:
    """A sweep's trials and, for each swept key, their best eval loss against its values."""
    done = sum(t.status == "finished" for t in trials)
    links = " · ".join(_link(sweep / f, page_dir, f) for f in ("summary.md", "sweep.png") if (sweep / f).is_file())
    charts = []
    for key, values in swept_values(trials).items():
        points = [
            (v, t.best_eval_loss, t.status == "finished")
            for v, t in zip(values, trials)
            if v is not None and t.best_eval_loss is not None
        ]
        series = [
            Series("finished", [(v, y) for v, y, ok in points if ok], DONE, line=False, markers=True),
            Series("not finished", [(v, y) for v, y, ok in points if not ok], OTHER, line=False, markers=True),
        ]
        charts.append(
            f'<div class="card"><h3>best eval loss against {escape(key)}</h3>'
            f"{chart(series, key, 'best eval loss', log_x=True)}</div>"
        )
    if not charts:
        charts.append('<p class="note">no key takes different values in these trials: nothing to plot</p>')
    names = ", ".join(f'<a href="#run-{index[id(t)]}">{escape(t.path.name)}</a>' for t in trials)
    return (
        f'<section class="sweep"><h2>Sweep {escape(str(sweep))}</h2>'
        f'<p class="meta">{_count(trials, "trial")}, {done} finished: {names}. {links}</p>'
        f'<div class="cards">{"".join(charts)}</div></section>'
    )


def _run(i: int, run: Run, page_dir: Path) -> str:
    """One run's card: status, settings, overrides, links, sample, and its train and eval loss curves."""
    row = run.row()
    settings = ", ".join(
        f"{k} {cell(k, row)}" for k in ("model", "r", "alpha", "lr", "data", "distributed") if row[k] is not None
    )
    facts = [
        f"{_badge(run)} step {run.steps}" + (f" of {row['max_steps']}" if row["max_steps"] else ""),
        escape(settings),
    ]
    if run.note:
        facts.append(f'<span class="note">{escape(run.note)}</span>')
    if run.overrides:
        facts.append("overrides: <code>" + escape(" ".join(run.overrides)) + "</code>")
    facts.append(
        _link(run.path, page_dir, "run dir") + (" · " + _link(run.adapter, page_dir, "adapter/") if run.adapter else "")
    )
    if run.sample:
        facts.append("sample: <code>" + escape(run.sample) + "</code>")
    curves = chart(
        [Series("train loss", run.train, TRAIN), Series("eval loss", run.evals, EVAL, markers=True)],
        "optimizer step",
        "loss",
    )
    return (
        f'<section class="card run" id="run-{i}"><h3>{escape(run.name)}</h3>'
        f"<p>{'<br>'.join(facts)}</p>{curves}</section>"
    )


def _count(items, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def render(runs: list[Run], page_dir: Path, dirs: list[str]) -> str:
    """The whole page as one string."""
    index = {id(r): i for i, r in enumerate(runs)}
    sweeps: dict[Path, list[Run]] = {}
    for run in runs:
        if run.sweep is not None:
            sweeps.setdefault(run.sweep, []).append(run)
    finished = sum(r.status == "finished" for r in runs)
    parts = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>lora-launch runs: {escape(', '.join(dirs))}</title><style>{STYLE}</style></head><body>",
        f"<h1>Runs under {escape(', '.join(dirs))}</h1>",
        f'<p class="meta">{_count(runs, "run")}, {finished} finished, {_count(sweeps, "sweep")}; written '
        f"{time.strftime('%Y-%m-%d %H:%M')} by <code>lora-launch report</code>. Click a column to sort.</p>",
        _table(runs, page_dir),
    ]
    parts += [_sweep(s, trials, index, page_dir) for s, trials in sorted(sweeps.items())]
    parts += [
        '<h2>Loss curves</h2><div class="cards">',
        *(_run(i, r, page_dir) for i, r in enumerate(runs)),
        f"</div><script>{SCRIPT}</script></body></html>",
    ]
    return "\n".join(parts)


def write_report(runs: list[Run], out: Path, dirs: list[str]) -> Path:
    """Write the page to `out` (atomically: a reader never sees half of it)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(out, render(runs, out.parent, dirs))
