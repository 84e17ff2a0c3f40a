"""Read back what wandb wrote in offline mode: the records of a run's `.wandb` file.

wandb keeps its records in a log of 32 KiB blocks (the LevelDB log layout): a 7-byte file header
(":W&B", a magic number, a version), then per record chunk a 7-byte header (crc32, length, kind:
1 full, 2 first, 3 middle, 4 last) and protobuf bytes of wandb's `Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7


def records(path: Path):
    """Every Record in a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a wandb run file"
    pos, chunks = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunks += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def history(run_dir: Path) -> list[dict]:
    """The rows a run logged to wandb (offline), keys as wandb shows them."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def config_keys(run_dir: Path) -> list[str]:
    """Top-level keys of the config the run gave wandb."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return [
        item.key or "/".join(item.nested_key)
        for record in records(path)
        if record.WhichOneof("record_type") == "config"
        for item in record.config.update
    ]
