"""The data files a studio offers: those under its root, and files the page uploads into ROOT/data.

An upload is one file's bytes with its name; the name is reduced to a plain file name of a data kind the
loader reads, the content checked as the launcher checks a data file (UTF-8, one JSON object per line), and the
file written whole (a temporary file renamed) under ROOT/data without replacing one that is there.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from lora_launch.conf.schema import ConfigError

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
UPLOAD_DIR = "data"
MAX_UPLOAD = 32 << 20  # bytes: a fine-tuning set to try in the studio; larger ones are copied in by hand
MAX_LISTED = 200
SKIPPED = {"runs", "sweeps", "cache", "node_modules", "__pycache__"}  # folders of outputs, not of data
_NAME = re.compile(r"^[\w][\w.-]{0,99}$")


def data_files(root: Path, depth: int = 4) -> list[str]:
    """Data files under `root` (relative paths, sorted), outside hidden and output folders, at most MAX_LISTED."""
    out = []
    for here, dirs, files in os.walk(root):
        rel = Path(here).relative_to(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED and len(rel.parts) < depth)
        out += [str(rel / f) for f in sorted(files) if f.endswith(DATA_SUFFIXES) and not f.startswith(".")]
        if len(out) >= MAX_LISTED:
            break
    return sorted(out)[:MAX_LISTED]


def save_upload(root: Path, name: str, content: bytes) -> str:
    """Write an uploaded data file under ROOT/data; its path relative to the root. The same bytes uploaded again
    are the same file; other bytes under a taken name get a new name (NAME-2.jsonl)."""
    from lora_launch.data.samples import DataError
    from lora_launch.data.sources import check_file

    base = re.sub(r"[^\w.-]+", "-", Path(name.replace("\\", "/")).name).lstrip(".-")  # "my data.jsonl": my-data.jsonl
    if not _NAME.match(base) or not base.endswith(DATA_SUFFIXES):
        raise ConfigError(f"upload {name!r}: give a data file named like NAME.jsonl ({', '.join(DATA_SUFFIXES)})")
    if not content:
        raise ConfigError(f"upload {base}: the file is empty")
    folder = root / UPLOAD_DIR
    folder.mkdir(exist_ok=True)
    stem, suffix = base[: -len(Path(base).suffix)], Path(base).suffix
    target, n = folder / base, 1
    while target.exists():
        if target.is_file() and target.read_bytes() == content:
            return str(target.relative_to(root))
        n += 1
        target = folder / f"{stem}-{n}{suffix}"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".upload-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        try:
            check_file(Path(tmp))
        except DataError as e:
            raise ConfigError(f"upload: {str(e).replace(tmp, base)}") from None
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(target.relative_to(root))
