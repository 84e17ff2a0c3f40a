"""The runs on disk as `lora-launch runs` shows them: sorted, filtered, one table fitted to the terminal, and
what differs between two runs (the commands' flags: cli/runs.py; the same runs as a web page: catalog/report.py).
Everything is read from run dirs (catalog/runs.py).
"""

from __future__ import annotations

import fnmatch
import math
import re
from pathlib import Path

from lora_launch.catalog.runs import Run, find_runs, flatten, is_run_dir, read_run
from lora_launch.catalog.terminal import fit_table, wrap
from lora_launch.conf.schema import ConfigError

DEFAULT_FOLDERS = ("runs", "sweeps")
COLUMNS = (
    "name",
    "status",
    "steps",
    "model",
    "r",
    "alpha",
    "lr",
    "data",
    "distributed",
    "best_eval_loss",
    "final_eval_loss",
    "tokens_per_s",
    "adapter",
    "date",
)
HEADERS = {"best_eval_loss": "best eval", "final_eval_loss": "final eval", "tokens_per_s": "tok/s"}
ALIASES = {"eval_loss": "best_eval_loss", "loss": "best_eval_loss", "tok/s": "tokens_per_s", "speed": "tokens_per_s"}
METRICS = ("final_eval_loss", "best_eval_loss", "final_train_loss", "tokens_per_s", "steps", "peak_memory_gib")
NOT_COMPARED = ("run.dir", "launcher.main_process_port")  # each run's own; a sweep gives each trial a port
_WHERE = re.compile(r"^([^<>=!]+?)(<=|>=|!=|=|<|>)(.*)$")


# ---- values, sorting, filtering -------------------------------------------------------------------


def value(run: Run, key: str):
    """The value `--sort`/`--where` see for `key`: a column of the table (or its alias), else a dotted config
    key (`lora.dropout`); None when the run lacks it."""
    row = run.row()
    key = ALIASES.get(key, key)
    return row[key] if key in row else flatten(run.config or {}).get(key)


def check_key(runs: list[Run], key: str) -> None:
    """Refuse a key that is neither a column nor a config key of any run, in one line."""
    key = ALIASES.get(key, key)
    if runs and key not in runs[0].row() and not any(key in flatten(r.config or {}) for r in runs):
        raise ConfigError(
            f"unknown key {key!r}: use a column ({', '.join(runs[0].row())}) or a config key such as lora.dropout"
        )


def _order(v):
    """Numbers before text, each in its natural order (ISO dates sort as text)."""
    return (0, float(v), "") if _is_number(v) else (1, 0.0, text(v))


def sort_runs(runs: list[Run], spec: str) -> list[Run]:
    """Sorted by `spec` (`eval_loss`; `-date`: descending); runs without the value come last either way."""
    key = spec.lstrip("-")
    check_key(runs, key)
    have = [r for r in runs if value(r, key) is not None]
    lack = [r for r in runs if value(r, key) is None]
    return sorted(have, key=lambda r: _order(value(r, key)), reverse=spec.startswith("-")) + lack


def parse_where(condition: str) -> tuple[str, str, str]:
    """`key=value` (glob patterns allowed), `key!=value`, `key<value`, `key>=value`, ... as (key, op, value)."""
    match = _WHERE.match(condition)
    if not match:
        raise ConfigError(
            f"--where {condition!r}: write KEY=VALUE, KEY!=VALUE or KEY<VALUE (also <=, >, >=), "
            "e.g. --where status=finished"
        )
    return match.group(1).strip(), match.group(2), match.group(3).strip()


def matches(run: Run, condition: tuple[str, str, str]) -> bool:
    """Whether the run meets one parsed --where condition (numbers compare as numbers)."""
    key, op, wanted = condition
    have = value(run, key)
    if op in ("=", "!="):
        if have is None:  # only `key=` matches a run without the value
            same = wanted == ""
        elif _is_number(have) and _is_number(wanted):
            same = math.isclose(float(have), float(wanted), rel_tol=1e-9)
        else:
            same = fnmatch.fnmatchcase(text(have), wanted)
        return same == (op == "=")
    if have is None:
        return False
    a, b = (float(have), float(wanted)) if _is_number(have) and _is_number(wanted) else (text(have), wanted)
    return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]


def filter_runs(runs: list[Run], conditions: list[str]) -> list[Run]:
    """The runs meeting every condition."""
    parsed = [parse_where(c) for c in conditions]
    for key, _, _ in parsed:
        check_key(runs, key)
    return [r for r in runs if all(matches(r, c) for c in parsed)]


def _is_number(v) -> bool:
    if isinstance(v, bool) or v is None:
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def text(v) -> str:
    """A value as the command line writes it (true, null, [q_proj,v_proj])."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ",".join(map(text, v)) + "]"
    return str(v)


# ---- the table --------------------------------------------------------------------------------------


def cell(key: str, row: dict) -> str:
    """One table cell: losses to 4 digits, speed whole, steps of the planned steps when unfinished."""
    v = row.get(key)
    if v is None:
        return "-"
    if key == "steps" and row.get("max_steps") and v < row["max_steps"]:
        return f"{v}/{row['max_steps']}"
    if key == "tokens_per_s":
        return f"{v:.0f}"
    if key == "distributed" and row.get("processes") not in (None, 1):
        return f"{v}×{row['processes']}"
    if key == "date":
        return v[:16].replace("T", " ")
    if isinstance(v, float):
        return f"{v:g}" if key == "lr" else f"{v:.4g}"
    return text(v)


# what goes first when the table is wider than the terminal; name, status, steps and best eval stay
DROPPED_FIRST = (
    "adapter",
    "distributed",
    "alpha",
    "tokens_per_s",
    "final_eval_loss",
    "data",
    "date",
    "model",
    "r",
    "lr",
)


def table(runs: list[Run], width: int | None = None) -> str:
    """The runs as an aligned text table (a `note` column when any run has one: why it failed, ...), cut down
    to `width` columns (None: every column whole) with a last line naming the columns left out."""
    rows = [r.row() for r in runs]
    columns = list(COLUMNS) + (["note"] if any(row["note"] for row in rows) else [])
    cells = [[HEADERS.get(c, c) for c in columns]]
    cells += [[cell(c, row)[:70] for c in columns] for row in rows]
    cells, dropped = fit_table(
        cells,
        width,
        [columns.index(c) for c in DROPPED_FIRST],
        [columns.index(c) for c in ("note", "name") if c in columns],
        keep_end=(0,),
    )
    kept = [c for i, c in enumerate(columns) if i not in dropped]
    widths = [max(len(line[i]) for line in cells) for i in range(len(kept))]
    numeric = {i for i, c in enumerate(kept) if c in ("steps", "r", "alpha", "lr") or c in METRICS}
    lines = [
        "  ".join(v.rjust(w) if i in numeric else v.ljust(w) for i, (v, w) in enumerate(zip(line, widths))).rstrip()
        for line in cells
    ]
    if dropped:
        left_out = ", ".join(HEADERS.get(columns[i], columns[i]) for i in dropped)
        lines.append(
            wrap(f"(left out to fit {width} columns: {left_out}; --json or a wider terminal shows them)", width)
        )
    return "\n".join(lines)


# ---- diff -------------------------------------------------------------------------------------------


def config_diff(a: Run, b: Run) -> list[tuple[str, object, object]]:
    """(dotted key, A's value, B's value) of every config key whose values differ (missing: None)."""
    fa, fb = flatten(a.config or {}), flatten(b.config or {})
    keys = [k for k in {**fa, **fb} if k not in NOT_COMPARED]
    return [(k, fa.get(k), fb.get(k)) for k in keys if fa.get(k) != fb.get(k)]


def metric_diff(a: Run, b: Run) -> list[tuple[str, object, object]]:
    """(metric, A's value, B's value) of the results compared: eval losses, speed, steps, peak memory."""
    ra, rb = a.row(), b.row()
    return [(m, ra[m], rb[m]) for m in METRICS]


def diff_text(a: Run, b: Run) -> str:
    """`lora-launch runs diff`'s output: the runs, the config keys that differ, the results side by side."""
    lines = [f"A: {a.name} ({a.status}, step {a.steps})", f"B: {b.name} ({b.status}, step {b.steps})", ""]
    for run in (a, b):
        if run.config is None:
            lines.append(f"{run.name}: {run.note}: its settings are not compared")
    changed = config_diff(a, b)
    rows = [("config", "A", "B")] + [(k, text(va) or "(absent)", text(vb) or "(absent)") for k, va, vb in changed]
    if not changed:
        rows.append(("(the same settings)", "", ""))
    rows += [("", "", ""), ("result", "A", "B", "B - A")]
    for m, va, vb in metric_diff(a, b):
        change = ""
        if _is_number(va) and _is_number(vb) and va != vb:
            change = f"{vb - va:+.4g}" + (f" ({(vb - va) / va:+.2%})" if va else "")
        rows.append((m, cell(m, {m: va}), cell(m, {m: vb}), change))
    widths = [max(len(r[i]) for r in rows if len(r) > i) for i in range(4)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def diff_json(a: Run, b: Run) -> dict:
    return {
        "a": a.row(),
        "b": b.row(),
        "config": {k: {"a": va, "b": vb} for k, va, vb in config_diff(a, b)},
        "metrics": {m: {"a": va, "b": vb} for m, va, vb in metric_diff(a, b)},
    }


# ---- finding the runs a command names -----------------------------------------------------------------


def collect(dirs: list[str]) -> list[Run]:
    """The runs under `dirs` (default: runs/ and sweeps/ here); an explicitly named missing dir is refused."""
    for d in dirs:
        if not Path(d).is_dir():
            raise ConfigError(f"{d}: no such directory (name a folder of runs, e.g. runs/ or sweeps/sweep-...)")
    folders = [Path(d) for d in dirs] or [Path(d) for d in DEFAULT_FOLDERS if Path(d).is_dir()]
    return find_runs(folders)


def nothing_found(dirs: list[str]) -> str:
    where = ", ".join(dirs) if dirs else f"{' or '.join(f + '/' for f in DEFAULT_FOLDERS)} in {Path.cwd()}"
    return f"no runs under {where} (a run dir holds config.yaml, status.json or metrics.jsonl)"


def resolve(ref: str) -> Run:
    """A run named by its path, or by its name (or the end of it) under runs/ and sweeps/ here."""
    path = Path(ref)
    if path.is_dir() and is_run_dir(path):
        return read_run(path, ref)
    if path.is_dir():
        raise ConfigError(f"{ref}: not a run dir (no config.yaml, status.json or metrics.jsonl in it)")
    found = [r for r in collect([]) if r.name == ref or r.name.endswith("/" + ref.strip("/"))]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConfigError(
            f"{ref}: no such run dir, and no run of that name under runs/ or sweeps/ here "
            "(give its path; `lora-launch runs` lists them)"
        )
    raise ConfigError(
        f"{ref}: {len(found)} runs have that name ({', '.join(r.name for r in found[:5])}); give its path"
    )
