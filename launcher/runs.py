"""`lora-launch runs [DIR ...]`: every run and sweep trial on disk in one table, sorted and filtered;
`lora-launch runs diff A B`: what differs between two runs, settings and results; `lora-launch report`
(launcher/report.py) draws the same runs as a web page. Everything is read from run dirs (run/catalog.py).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import re
import sys
from pathlib import Path

from lora_launch.conf.schema import ConfigError
from lora_launch.launcher.terminal import fit_table, terminal_width, wrap
from lora_launch.run.catalog import Run, find_runs, flatten, is_run_dir, read_run
from lora_launch.run.rundir import fault_message

# `lora-launch --help`'s lines for these commands
HELP = {"runs": "List runs and sweep trials: runs [DIR ...] [--sort KEY] [--where KEY=VALUE ...] [--json].",
        "runs diff": "Compare two runs' settings and results: runs diff A B (names or paths).",
        "report": "Write runs and sweeps as one self-contained HTML page: report [DIR ...] [--out FILE]."}
DESCRIPTIONS = {
    "runs": "Every run and sweep trial under the folders, one line each, read from the run dirs alone. "
            "`lora-launch runs diff A B` compares two.",
    "runs diff": "The config keys whose values differ between runs A and B, and their results side by side.",
    "report": "Write the runs as one HTML page that needs no network: the table (click a column to sort), "
              "each sweep's eval loss against its swept keys, each run's loss curves and links to its adapter."}
DEFAULT_FOLDERS = ("runs", "sweeps")
COLUMNS = ("name", "status", "steps", "model", "r", "alpha", "lr", "data", "distributed", "best_eval_loss",
           "final_eval_loss", "tokens_per_s", "adapter", "date")
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
        raise ConfigError(f"unknown key {key!r}: use a column ({', '.join(runs[0].row())}) or a config key "
                          "such as lora.dropout")


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
        raise ConfigError(f"--where {condition!r}: write KEY=VALUE, KEY!=VALUE or KEY<VALUE (also <=, >, >=), "
                          "e.g. --where status=finished")
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
DROPPED_FIRST = ("adapter", "distributed", "alpha", "tokens_per_s", "final_eval_loss", "data", "date", "model",
                 "r", "lr")


def table(runs: list[Run], width: int | None = None) -> str:
    """The runs as an aligned text table (a `note` column when any run has one: why it failed, ...), cut down
    to `width` columns (None: every column whole) with a last line naming the columns left out."""
    rows = [r.row() for r in runs]
    columns = list(COLUMNS) + (["note"] if any(row["note"] for row in rows) else [])
    cells = [[HEADERS.get(c, c) for c in columns]]
    cells += [[cell(c, row)[:70] for c in columns] for row in rows]
    cells, dropped = fit_table(cells, width, [columns.index(c) for c in DROPPED_FIRST],
                               [columns.index(c) for c in ("note", "name") if c in columns], keep_end=(0,))
    kept = [c for i, c in enumerate(columns) if i not in dropped]
    widths = [max(len(line[i]) for line in cells) for i in range(len(kept))]
    numeric = {i for i, c in enumerate(kept) if c in ("steps", "r", "alpha", "lr") or c in METRICS}
    lines = ["  ".join(v.rjust(w) if i in numeric else v.ljust(w)
                       for i, (v, w) in enumerate(zip(line, widths))).rstrip() for line in cells]
    if dropped:
        left_out = ", ".join(HEADERS.get(columns[i], columns[i]) for i in dropped)
        lines.append(wrap(f"(left out to fit {width} columns: {left_out}; --json or a wider terminal shows them)",
                          width))
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
    return {"a": a.row(), "b": b.row(),
            "config": {k: {"a": va, "b": vb} for k, va, vb in config_diff(a, b)},
            "metrics": {m: {"a": va, "b": vb} for m, va, vb in metric_diff(a, b)}}


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
        raise ConfigError(f"{ref}: no such run dir, and no run of that name under runs/ or sweeps/ here "
                          "(give its path; `lora-launch runs` lists them)")
    raise ConfigError(f"{ref}: {len(found)} runs have that name ({', '.join(r.name for r in found[:5])}); "
                      "give its path")


# ---- the commands -------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise ConfigError(f"{message} (see {self.prog} --help)")

    def parse_args(self, argv):
        args, rest = [], iter(argv)
        for arg in rest:  # `--sort -date`: argparse alone would take -date for an option
            value = next(rest, None) if arg == "--sort" else None
            args += [arg] if value is None else [f"--sort={value}"]
        return super().parse_args(args)


def _parser(command: str) -> argparse.ArgumentParser:
    keys = f"KEY: a column ({', '.join(COLUMNS)}; eval_loss is the best) or a config key (lora.dropout)."
    p = _Parser(prog=f"lora-launch {command}", description=DESCRIPTIONS[command],
                epilog=None if command == "runs diff" else keys)
    if command == "runs diff":
        p.add_argument("a", metavar="A", help="a run dir, or a run's name under runs/ or sweeps/")
        p.add_argument("b", metavar="B", help="the run to compare with A")
        p.add_argument("--json", action="store_true", help="print JSON")
        return p
    p.add_argument("dirs", nargs="*", metavar="DIR", help="folders of runs (default: runs/ and sweeps/ here)")
    p.add_argument("--sort", default="date", metavar="KEY",
                   help="a column or config key; -KEY sorts descending (default: date); e.g. eval_loss, -date")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs where KEY=VALUE (globs allowed), KEY!=VALUE, KEY<VALUE, KEY>=VALUE ...; "
                        "several must all hold; e.g. --where status=finished --where lora.r=16")
    if command == "runs":
        p.add_argument("--json", action="store_true", help="print the runs as JSON")
    else:
        p.add_argument("--out", metavar="FILE",
                       help="the HTML file (default: DIR/report.html for one DIR, else ./report.html)")
    return p


def runs_command(argv: list[str]) -> int:
    """`lora-launch runs [DIR ...]` and `lora-launch runs diff A B`."""
    if argv[:1] == ["diff"]:
        args = _parser("runs diff").parse_args(argv[1:])
        a, b = resolve(args.a), resolve(args.b)
        print(json.dumps(diff_json(a, b), indent=1) if args.json else diff_text(a, b))
        return 0
    args = _parser("runs").parse_args(argv)
    runs = sort_runs(filter_runs(collect(args.dirs), args.where), args.sort)
    if args.json:
        print(json.dumps([r.row() for r in runs], indent=1))
    elif runs:
        print(table(runs, terminal_width(fallback=None)))  # into a pipe: every column, for grep and scripts
    else:
        print(nothing_found(args.dirs) if not args.where else f"no run meets {' and '.join(args.where)}")
    return 0


def report_command(argv: list[str]) -> int:
    """`lora-launch report [DIR ...]`: the runs as one self-contained HTML page."""
    from lora_launch.launcher.report import write_report

    args = _parser("report").parse_args(argv)
    runs = collect(args.dirs)
    if not runs:
        print(nothing_found(args.dirs))
        return 0
    runs = sort_runs(filter_runs(runs, args.where), args.sort)
    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report.html" if len(args.dirs) == 1 \
        else Path("report.html")
    write_report(runs, out, args.dirs or [f"{d}/" for d in DEFAULT_FOLDERS])
    print(f"wrote {out}: {len(runs)} run{'' if len(runs) == 1 else 's'}; open it in a browser (it needs no network)")
    return 0


def main(command: str, argv: list[str]) -> int:
    """Run `runs` or `report`; bad input is one `error:` line and exit code 2."""
    try:
        return runs_command(argv) if command == "runs" else report_command(argv)
    except ConfigError as e:
        print(f"error: {command}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `lora-launch runs | head -1`: the console script ends quietly
        raise
    except OSError as e:  # the page cannot be written (read-only, disk full): one line
        print(f"error: {command}: {fault_message(e) or f'{e.filename}: {e.strerror}'}", file=sys.stderr)
        return 2
