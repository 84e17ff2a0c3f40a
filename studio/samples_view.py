"""A dataset as the model will see it: the first samples token by token, the tokens masked from the loss
marked, and the data report (kept, truncated, dropped, lengths). The data layer does the work, as it does
before a launch (the same cache); this only lays out what it returns."""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

from lora_launch.conf.schema import ConfigError
from lora_launch.data.samples import IGNORE, DataError, build_splits
from lora_launch.data.tokenizer import load_tokenizer

MAX_TOKENS_SHOWN = 400  # per sample
MAX_RAW_CHARS = 600  # per record as read


def _tokens(tok, ids: np.ndarray, labels: np.ndarray, seq_lens) -> list[dict]:
    starts = set(np.cumsum([0, *seq_lens[:-1]]).tolist()) if seq_lens is not None else {0}
    return [
        {"text": tok.decode([int(i)]), "masked": bool(label == IGNORE), "starts_sample": j in starts}
        for j, (i, label) in enumerate(zip(ids[:MAX_TOKENS_SHOWN], labels[:MAX_TOKENS_SHOWN]))
    ]


def histogram(lengths: np.ndarray, bins: int = 20) -> dict:
    """Counts of sample lengths (tokens) in equal bins."""
    if len(lengths) == 0:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(lengths, bins=min(bins, max(1, int(lengths.max() - lengths.min()) + 1)))
    return {"edges": [round(float(e), 1) for e in edges], "counts": counts.tolist()}


def data_view(cfg: DictConfig, records: int = 3) -> dict:
    """The first `records` training samples (rows, when packed) token by token, the data report and a
    length histogram; a data error is one line (ConfigError), as before a launch."""
    try:
        tok = load_tokenizer(cfg)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(
            f"model.path={cfg.model.tokenizer or cfg.model.path}: cannot load a tokenizer from it ({first})"
        ) from None
    try:
        splits = build_splits(cfg, tok, main_process=False, report=False)
    except DataError as e:
        raise ConfigError(str(e)) from None
    train = splits.train
    shown = []
    for i in range(min(records, len(train))):
        item = train[i]
        seq_lens = item.get("seq_lens")
        shown.append(
            {
                "record": int(train.record[i]),
                "length": int(len(item["input_ids"])),
                "target_tokens": int(np.sum(item["labels"] != IGNORE)),
                "tokens": _tokens(tok, item["input_ids"], item["labels"], seq_lens),
            }
        )
    raw, columns = _raw_records(cfg, [s["record"] for s in shown])
    lengths = np.concatenate([train.seq_lens if train.packed else train.lengths, splits.val.lengths])
    report = splits.report
    sources = report.get("sources", {})
    totals = {
        k: sum(int(s.get(k, 0)) for s in sources.values())
        for k in ("records", "ok", "truncated", "too_long", "no_target")
    }
    for s, row in zip(shown, raw):
        s["raw"] = row
    return {
        "records": shown,
        "fields": columns,
        "report": report,
        "histogram": histogram(lengths),
        "kept": totals["ok"] + totals["truncated"],
        "truncated": totals["truncated"],
        "dropped": totals["too_long"] + totals["no_target"],
        "total": totals["records"],
    }


def _raw_records(cfg: DictConfig, records: list[int]) -> tuple[list[str | None], list[str]]:
    """The records as read (JSON, cut to MAX_RAW_CHARS) and the source's fields; none for mixed sources."""
    import json

    from lora_launch.data.sources import load_rows

    if cfg.data.sources or cfg.data.source == "synthetic":
        return [None] * len(records), []
    ds, columns, _ = load_rows(cfg.data, cfg.data.split)  # read through the datasets cache, as just built
    out = []
    for i in records:
        text = json.dumps(ds[int(i)], ensure_ascii=False, default=str)
        out.append(text if len(text) <= MAX_RAW_CHARS else text[:MAX_RAW_CHARS] + "…")
    return out, columns
