"""`lora-launch runs [DIR ...]`: every run and sweep trial on disk in one table, sorted and filtered;
`lora-launch runs diff A B`: what differs between two runs, settings and results; `lora-launch report`: the same
runs as one web page. Their flags, parsed; what they show comes from the runs repository (catalog/).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lora_launch.catalog.report import write_report
from lora_launch.catalog.table import (
    COLUMNS,
    DEFAULT_FOLDERS,
    collect,
    diff_json,
    diff_text,
    filter_runs,
    nothing_found,
    resolve,
    sort_runs,
    table,
)
from lora_launch.catalog.terminal import terminal_width
from lora_launch.conf.errors import UserError, reports_user_errors
from lora_launch.conf.schema import ConfigError
from lora_launch.run.rundir import fault_message

# `lora-launch --help`'s lines for these commands
HELP = {
    "runs": "List runs and sweep trials: runs [DIR ...] [--sort KEY] [--where KEY=VALUE ...] [--json].",
    "runs diff": "Compare two runs' settings and results: runs diff A B (names or paths).",
    "report": "Write runs and sweeps as one self-contained HTML page: report [DIR ...] [--out FILE].",
}
DESCRIPTIONS = {
    "runs": "Every run and sweep trial under the folders, one line each, read from the run dirs alone. "
    "`lora-launch runs diff A B` compares two.",
    "runs diff": "The config keys whose values differ between runs A and B, and their results side by side.",
    "report": "Write the runs as one HTML page that needs no network: the table (click a column to sort), "
    "each sweep's eval loss against its swept keys, each run's loss curves and links to its adapter.",
}


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
    p = _Parser(
        prog=f"lora-launch {command}",
        description=DESCRIPTIONS[command],
        epilog=None if command == "runs diff" else keys,
    )
    if command == "runs diff":
        p.add_argument("a", metavar="A", help="a run dir, or a run's name under runs/ or sweeps/")
        p.add_argument("b", metavar="B", help="the run to compare with A")
        p.add_argument("--json", action="store_true", help="print JSON")
        return p
    p.add_argument("dirs", nargs="*", metavar="DIR", help="folders of runs (default: runs/ and sweeps/ here)")
    p.add_argument(
        "--sort",
        default="date",
        metavar="KEY",
        help="a column or config key; -KEY sorts descending (default: date); e.g. eval_loss, -date",
    )
    p.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep runs where KEY=VALUE (globs allowed), KEY!=VALUE, KEY<VALUE, KEY>=VALUE ...; "
        "several must all hold; e.g. --where status=finished --where lora.r=16",
    )
    if command == "runs":
        p.add_argument("--json", action="store_true", help="print the runs as JSON")
    else:
        p.add_argument(
            "--out", metavar="FILE", help="the HTML file (default: DIR/report.html for one DIR, else ./report.html)"
        )
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
    args = _parser("report").parse_args(argv)
    runs = collect(args.dirs)
    if not runs:
        print(nothing_found(args.dirs))
        return 0
    runs = sort_runs(filter_runs(runs, args.where), args.sort)
    out = (
        Path(args.out)
        if args.out
        else Path(args.dirs[0]) / "report.html"
        if len(args.dirs) == 1
        else Path("report.html")
    )
    write_report(runs, out, args.dirs or [f"{d}/" for d in DEFAULT_FOLDERS])
    print(f"wrote {out}: {len(runs)} run{'' if len(runs) == 1 else 's'}; open it in a browser (it needs no network)")
    return 0


@reports_user_errors
def main(command: str, argv: list[str]) -> int:
    """Run `runs` or `report`; bad input is one `error:` line and exit code 2."""
    try:
        return runs_command(argv) if command == "runs" else report_command(argv)
    except UserError as e:
        raise UserError(f"{command}: {e}") from None
    except BrokenPipeError:  # `lora-launch runs | head -1`: the console script ends quietly
        raise
    except OSError as e:  # the page cannot be written (read-only, disk full): one line
        raise UserError(f"{command}: {fault_message(e) or f'{e.filename}: {e.strerror}'}") from None
