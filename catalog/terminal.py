"""Text fitted to the terminal: help folded to its width, tables cut down to it (COLUMNS, else the terminal's
size; shutil.get_terminal_size reads both)."""

from __future__ import annotations

import re
import shutil
import textwrap

# where a line's second column starts: after its first word group and a gap of two or more spaces
_SECOND_COLUMN = re.compile(r"^ *\S.*?\S {2,}(?=\S)")
SHORTEST = 20  # a column cut short keeps this many characters
MIN_TEXT = 20  # a continuation never gets fewer columns than this: it goes under the first column instead


def terminal_width(fallback: int | None = 80) -> int | None:
    """Columns to fit: $COLUMNS, else the terminal's; `fallback` when neither is known (output into a pipe)."""
    return shutil.get_terminal_size((0, 0)).columns or fallback


def wrap(text: str, width: int | None) -> str:
    """Each line of `text` folded to `width`; a continuation lines up under the line's second column."""
    if width is None:
        return text
    out = []
    for line in text.splitlines():
        if len(line) <= width:
            out.append(line)
            continue
        leading = len(line) - len(line.lstrip())
        column = _SECOND_COLUMN.match(line)
        indent = len(column.group(0)) if column else leading
        if width - indent < max(MIN_TEXT, *map(len, line.split())):  # a long word (a path) goes whole, on the left
            indent = min(leading + 4, max(width - MIN_TEXT, 0))
        out += textwrap.wrap(line, width, subsequent_indent=" " * indent, break_on_hyphens=False) or [""]
    return "\n".join(out)


def fit_table(
    cells: list[list[str]], width: int | None, drop_order: list[int], shrink: list[int], keep_end: tuple[int, ...] = ()
) -> tuple[list[list[str]], list[int]]:
    """A table (header row first) cut down to `width` columns as `  `-joined lines: columns in `drop_order` go
    first, then the `shrink` columns are cut short with … (at their start for those in `keep_end`, such as a
    path whose last part tells rows apart); returns the cells and the dropped column indices."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]

    def total(kept: list[int]) -> int:
        return sum(widths[i] for i in kept) + 2 * (len(kept) - 1)

    kept = list(range(len(widths)))
    if width is None or total(kept) <= width:
        return cells, []
    for i in drop_order:  # a shrinkable column counts at its shortest while deciding what to drop
        if total(kept) - sum(widths[j] - min(widths[j], SHORTEST) for j in shrink if j in kept) <= width:
            break
        kept.remove(i)
    for i in shrink:
        if i in kept and total(kept) > width:
            widths[i] = max(widths[i] - (total(kept) - width), SHORTEST)
    cut = [[_cut(row[i], widths[i], i in keep_end) for i in kept] for row in cells]
    return cut, [i for i in range(len(widths)) if i not in kept]


def _cut(text: str, width: int, keep_end: bool) -> str:
    if len(text) <= width:
        return text
    return "…" + text[len(text) - width + 1 :] if keep_end else text[: width - 1] + "…"
