"""Reading datasets the way users bring them: the bundled demo, a hub dataset by name, or local
jsonl / json / csv / parquet files (one file or a directory), through the `datasets` library.

Text files are checked first, so that bad bytes or a malformed JSON line are reported with the
file, line and byte offset instead of an Arrow stack trace.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from omegaconf import DictConfig

from lora_launch.data.templates import DataError

LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


# ---- checking text files ------------------------------------------------------------------------


def _check_utf8(path: Path) -> None:
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 (byte 0x{line[e.start]:02x} at byte offset "
                    f"{offset + e.start}); re-encode the file as UTF-8"
                ) from None
            offset += len(line)


def _check_jsonl(path: Path) -> None:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")


def check_file(path: Path) -> None:
    """Raise DataError naming the file, line and byte offset of the first unreadable content."""
    if path.suffix == ".parquet":
        return
    _check_utf8(path)
    with open(path, "rb") as f:
        if not any(line.strip() for line in f):
            raise DataError(f"{path}: the file is empty (no records); give a file with records in data.path")
    if path.suffix == ".jsonl":
        _check_jsonl(path)
    elif path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            _check_jsonl(path)  # JSON lines in a .json file; reports the first bad line


# ---- which files ---------------------------------------------------------------------------------


def local_files(path: str, split: str) -> list[Path]:
    """The data files of a local source: the file itself, or a directory's files of one kind.

    In a directory with files named after splits (train.jsonl, validation.jsonl), `split` picks
    the files whose name starts with it; otherwise every file is the training data.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.path={path}: no such file or directory")
    if p.is_file():
        if p.suffix not in LOADERS:
            raise DataError(f"data.path={path}: unsupported file type {p.suffix!r}; use one of {sorted(LOADERS)}")
        return [p]
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in LOADERS)
    if not files:
        raise DataError(
            f"data.path={path}: no {'/'.join(sorted(LOADERS))} files in this directory; "
            f"found: {sorted(f.name for f in p.iterdir())[:10]}"
        )
    named = [f for f in files if f.name.startswith(split)]
    if named:
        files = named
    elif any(f.name.startswith(s) for f in files for s in ("train", "val", "test")) or split != "train":
        raise DataError(f"data.path={path}: no file for split {split!r}; files: {[f.name for f in files]}")
    kinds = {LOADERS[f.suffix] for f in files}
    if len(kinds) > 1:
        raise DataError(f"data.path={path}: mixes {sorted(kinds)} files; keep one kind per directory")
    return files


def hub_id(d: DictConfig) -> str:
    """The hub dataset's name: data.path, or data.name when path is null (`data=hub data.name=…`)."""
    return d.path or d.name


def source_files(d: DictConfig, split: str) -> list[Path] | None:
    """Local files of the split, or None for a hub dataset."""
    if d.source == "hub":
        return None
    if not d.path:
        raise DataError(f"data.path is not set: data.source={d.source} needs a file or directory")
    return local_files(d.path, split)


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def source_fingerprint(d: DictConfig, split: str) -> str:
    """Identity of the raw data of `split`: the files' paths and bytes, or the hub name and revision.

    Content, not mtime: an edit in place that keeps the size and mtime is still a new dataset.
    """
    files = source_files(d, split)
    if files is None:
        ident = {"hub": hub_id(d), "revision": d.revision, "split": split}
    else:
        ident = [(str(f.resolve()), _file_digest(f)) for f in files]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()


# ---- loading ------------------------------------------------------------------------------------


def cache_home(d: DictConfig) -> Path:
    """This project's cache: data.cache_dir, $LORA_LAUNCH_CACHE or ~/.cache/lora-launch."""
    root = d.cache_dir or os.environ.get("LORA_LAUNCH_CACHE") or Path.home() / ".cache" / "lora-launch"
    return Path(root).expanduser()


def _hf_cache(d: DictConfig, hub: bool) -> str | None:
    """Where `datasets` keeps its Arrow files: for a hub dataset its usual cache (shared with other tools)
    unless data.cache_dir is set; for local files, a scratch dir in this project's cache (read once per
    content, so nothing of it is worth sharing, and it must not depend on a writable ~/.cache/huggingface)."""
    if hub:
        return str(Path(d.cache_dir) / "hf") if d.cache_dir else None
    return str(cache_home(d) / "hf")


def _quiet(datasets) -> None:
    """No "Generating train split" bars for a file of a few MB; LORA_LAUNCH_VERBOSE=1 shows them."""
    if not os.environ.get("LORA_LAUNCH_VERBOSE"):
        datasets.disable_progress_bars()


def _load_local(d: DictConfig, files: list[Path]):
    import datasets

    _quiet(datasets)
    for f in files:
        check_file(f)
    builder = LOADERS[files[0].suffix]
    try:  # datasets keys local files on mtime alone; we get here only when their content is new to our cache
        return datasets.load_dataset(
            builder,
            data_files=[str(f) for f in files],
            split="train",
            cache_dir=_hf_cache(d, hub=False),
            download_mode="force_redownload",
        )
    except Exception as e:  # Arrow's errors name neither the key nor the fix
        names = ", ".join(str(f) for f in files)
        raise DataError(
            f"data.path={d.path}: could not read {names} as {builder} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def _load_hub(d: DictConfig, split: str):
    import datasets

    _quiet(datasets)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        return datasets.load_dataset(hub_id(d), split=split, revision=d.revision, cache_dir=_hf_cache(d, hub=True))
    except Exception as e:
        hint = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if offline
            else "check the name, the split and your network / HF_TOKEN"
        )
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"data.name={hub_id(d)} (split {split!r}): could not load the hub dataset ({hint}): {first}"
        ) from None


def _class_labels(ds, column: str) -> list[str] | None:
    feature = ds.features.get(column)
    return list(feature.names) if hasattr(feature, "names") else None


def load_rows(d: DictConfig, split: str):
    """(rows, columns, where): the records of one split as a `datasets.Dataset`, its column names,
    and a phrase naming the source for error messages. ClassLabel ints become their names."""
    files = source_files(d, split)
    ds = _load_hub(d, split) if files is None else _load_local(d, files)
    where = f"data.name={hub_id(d)}" if files is None else ", ".join(str(f) for f in files)
    names = _class_labels(ds, d.fields.label) if d.format == "classification" else None
    if names:
        ds = _labels_as_names(ds, d.fields.label, names)
    return ds, list(ds.column_names), where


def _labels_as_names(ds, column: str, names: list[str]):
    """A ClassLabel column as its label names, which is what the model should learn to write."""
    import datasets

    features = ds.features.copy()
    features[column] = datasets.Value("string")
    return ds.map(lambda b: {column: [names[i] for i in b[column]]}, batched=True, features=features)
