"""Tokenised train/validation samples and packing: what a run trains and evaluates on.

Records are read by `data.sources`, written out as text by `data.templates`, tokenised once into a
cache keyed on the bytes of the source, the tokenizer and the settings that shape samples, and
split into train and validation. The launcher runs `prepare` before any training process starts,
so data errors arrive before launch and the ranks read the cache; a rank that misses it (a direct
`accelerate launch`, another node's disk) tokenises on its own, rank 0 first. With `data.packing`
the training samples are packed into `train.seq_len` rows (best-fit decreasing by default) that
keep each sample's length, so attention can be kept within samples and position ids restart at
each one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from lora_launch.conf.schema import ConfigError, plain
from lora_launch.data import sources
from lora_launch.data.templates import (
    DataError,
    check_columns,
    check_template,
    render,
    resolve_format,
    resolve_template,
    resolved,
)
from lora_launch.run.rundir import atomic_path, write_json

__all__ = [
    "IGNORE",
    "DataError",
    "SampleSet",
    "Splits",
    "build_splits",
    "dataset_fingerprint",
    "tokenize",
    "pack",
    "cache_root",
    "prepare",
    "as_trained",
]

IGNORE = -100
CACHE_VERSION = 3  # bump when the tokenised layout or the templates change
BATCH = 1000  # records rendered and tokenised per call (fast tokenizers batch in Rust)


# ---- tokenised samples, held as flat arrays -----------------------------------------------------


class SampleSet:
    """Variable-length samples stored flat; `s[i]` is {"input_ids", "labels"}, and for a packed row also
    "seq_lens" (the lengths of the samples it holds, in order) and "position_ids" (restarting at each)."""

    def __init__(
        self,
        ids: np.ndarray,
        labels: np.ndarray,
        offsets: np.ndarray,
        record: np.ndarray,
        seq_lens: np.ndarray | None = None,
        seq_offsets: np.ndarray | None = None,
    ):
        self.ids, self.labels, self.offsets, self.record = ids, labels, offsets, record
        # packed rows: row i holds the samples of lengths seq_lens[seq_offsets[i]:seq_offsets[i + 1]]
        self.seq_lens, self.seq_offsets = seq_lens, seq_offsets

    @property
    def packed(self) -> bool:
        return self.seq_lens is not None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        i = int(i) % len(self)
        lo, hi = self.offsets[i], self.offsets[i + 1]
        item = {"input_ids": self.ids[lo:hi], "labels": self.labels[lo:hi]}
        if self.packed:
            lens = self.seq_lens[self.seq_offsets[i] : self.seq_offsets[i + 1]]
            item["seq_lens"] = lens
            item["position_ids"] = restarting_positions(lens)
        return item

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, keep: np.ndarray) -> SampleSet:
        """The (unpacked) samples at indices `keep`, in that order."""
        parts = [
            (self.ids[self.offsets[i] : self.offsets[i + 1]], self.labels[self.offsets[i] : self.offsets[i + 1]])
            for i in keep
        ]
        return SampleSet.from_lists([p[0] for p in parts], [p[1] for p in parts], self.record[keep])

    @staticmethod
    def from_lists(ids: list, labels: list, record) -> SampleSet:
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(x) for x in ids])

        def flat(xs):
            return np.concatenate(xs).astype(np.int32) if xs else np.zeros(0, np.int32)

        return SampleSet(flat(ids), flat(labels), offsets, np.asarray(record, dtype=np.int64))

    def digest(self, h) -> None:
        # packed rows hash as the positions they give the model (the same bytes for the same rows
        # as when rows were stored with their positions)
        positions = restarting_positions(self.seq_lens) if self.packed else None
        for a in (self.ids, self.labels, self.offsets, positions):
            h.update(b"-" if a is None else np.ascontiguousarray(a).tobytes())


def restarting_positions(seq_lens: np.ndarray) -> np.ndarray:
    """Position ids of samples of these lengths laid end to end: 0, 1, ... within each sample (int32)."""
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    starts = np.cumsum(seq_lens) - seq_lens
    return (np.arange(int(seq_lens.sum())) - np.repeat(starts, seq_lens)).astype(np.int32)


@dataclass
class Splits:
    train: SampleSet
    val: SampleSet
    report: dict = field(default_factory=dict)


def dataset_fingerprint(splits: Splits) -> str:
    """A stable hash of exactly what is trained and evaluated on (token ids, labels, packing)."""
    h = hashlib.sha256()
    splits.train.digest(h)
    splits.val.digest(h)
    return h.hexdigest()


# ---- tokenisation ---------------------------------------------------------------------------------


def _encode(tok, segments: list[list[tuple[str, bool]]]) -> list[tuple[list[int], list[bool]]]:
    """Token ids of each record's whole text, and which tokens start inside a response segment."""
    texts = ["".join(t for t, _ in segs) for segs in segments]
    try:
        enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError):
        return [_encode_by_segment(tok, segs) for segs in segments]
    out = []
    for segs, ids, offs in zip(segments, enc["input_ids"], enc["offset_mapping"]):
        starts = np.cumsum([0] + [len(t) for t, _ in segs[:-1]])
        seg = np.searchsorted(starts, [o[0] for o in offs], side="right") - 1
        out.append((ids, [segs[s][1] for s in seg]))
    return out


def _encode_by_segment(tok, segs) -> tuple[list[int], list[bool]]:
    """Slow tokenizers have no offsets: encode segment by segment."""
    ids, resp = [], []
    for text, is_resp in segs:
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        resp += [is_resp] * len(part)
    return ids, resp


def _sample(ids: list[int], resp: list[bool], seq_len: int, d: DictConfig) -> tuple[str, list, list]:
    """(status, input_ids, labels) of one record: ok | truncated | too_long | no_target."""
    mask_prompt = not d.train_on_prompt and d.format != "text"
    labels = [i if (r or not mask_prompt) else IGNORE for i, r in zip(ids, resp)]
    status = "ok"
    if len(ids) > seq_len:
        if not d.truncation:
            return "too_long", [], []
        ids, labels, status = ids[:seq_len], labels[:seq_len], "truncated"
    if all(label == IGNORE for label in labels[1:]):
        return "no_target", [], []
    return status, ids, labels


def tokenize(tok, prompt: str, response: str, seq_len: int, train_on_prompt: bool) -> dict:
    """input_ids and labels of one prompt/response pair: bos + prompt + response + eos, prompt masked."""
    p = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labels = (p if train_on_prompt else [IGNORE] * len(p)) + r
    return {"input_ids": (p + r)[:seq_len], "labels": labels[:seq_len]}


def synthetic_samples(cfg: DictConfig, tok) -> tuple[SampleSet, dict]:
    """Random-token samples for benchmarks (data.source=synthetic): the shapes matter, not the text."""
    d, seq_len = cfg.data, cfg.train.seq_len
    n = d.max_samples if d.max_samples > 0 else 1024
    rng = np.random.default_rng([cfg.seed, 2])
    if d.synthetic_lengths == "full":
        lengths = np.full(n, seq_len)
    else:  # instruction data: most samples short, a long tail
        lengths = np.clip(rng.lognormal(np.log(seq_len / 4), 0.7, n).astype(int), 8, seq_len)
    low = min(4, len(tok) - 1)  # the first ids are the special tokens in most vocabularies
    ids = [rng.integers(low, len(tok), int(n_tok)) for n_tok in lengths]
    stats = {
        "source": "synthetic",
        "records": n,
        "ok": n,
        "truncated": 0,
        "too_long": 0,
        "no_target": 0,
        "raw_length": _distribution(lengths),
    }
    return SampleSet.from_lists(ids, ids, np.arange(n)), stats


def _progress(total: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="tokenizing", unit="rec", disable=not show or total < 5 * BATCH)


def _tokenize_rows(cfg: DictConfig, d: DictConfig, tok, ds, where: str, show: bool) -> tuple[SampleSet, dict]:
    """Render (under `d`, the data config with format and template resolved) and tokenise every row."""
    seq_len = cfg.train.seq_len
    ids_l, labels_l, record, raw_len = [], [], [], []
    counts = {"ok": 0, "truncated": 0, "too_long": 0, "no_target": 0}
    unk, unknown = tok.unk_token_id, 0
    bar = _progress(len(ds), show)
    for lo in range(0, len(ds), BATCH):
        rows = ds[lo : lo + BATCH]  # columnar dict
        n = len(next(iter(rows.values()))) if rows else 0
        segments = [
            render(d, tok, {k: v[j] for k, v in rows.items()}, f"{where}: record {lo + j + 1}") for j in range(n)
        ]
        for j, (ids, resp) in enumerate(_encode(tok, segments)):
            raw_len.append(len(ids))
            if unk is not None:
                unknown += ids.count(unk)
            status, ids, labels = _sample(ids, resp, seq_len, d)
            counts[status] += 1
            if ids:
                ids_l.append(np.asarray(ids)), labels_l.append(np.asarray(labels)), record.append(lo + j)
        bar.update(n)
    bar.close()
    stats = {
        "records": len(ds),
        **counts,
        "raw_length": _distribution(np.asarray(raw_len)),
        "unknown_tokens": round(unknown / max(sum(raw_len), 1), 6),
    }  # share of tokens the tokenizer lacks
    return SampleSet.from_lists(ids_l, labels_l, record), stats


def _distribution(lengths: np.ndarray) -> dict:
    if len(lengths) == 0:
        return {}
    q = np.percentile(lengths, [50, 90, 99])
    return {
        "min": int(lengths.min()),
        "p50": float(q[0]),
        "p90": float(q[1]),
        "p99": float(q[2]),
        "max": int(lengths.max()),
        "mean": round(float(lengths.mean()), 2),
        "tokens": int(lengths.sum()),
    }


# ---- the tokenisation cache -----------------------------------------------------------------------


def cache_root(d: DictConfig) -> Path:
    """Where tokenised datasets are kept: tokenized/ in data.cache_dir, $LORA_LAUNCH_CACHE or ~/.cache/lora-launch."""
    return sources.cache_home(d) / "tokenized"


def check_cache_writable(d: DictConfig) -> None:
    """The cache takes files, or one line saying which dir and what to set (not a data error later)."""
    root = cache_root(d)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test."):
            pass
    except OSError as e:
        raise DataError(
            f"data.cache_dir: cannot write the data cache {root} ({e.strerror}); set data.cache_dir "
            "or LORA_LAUNCH_CACHE to a writable directory"
        ) from None


def _tokenizer_fingerprint(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    ident = [
        backend.to_str() if backend is not None else tok.name_or_path,
        len(tok),
        tok.bos_token,
        tok.eos_token,
        getattr(tok, "chat_template", None),
    ]
    return hashlib.sha256(json.dumps(ident, default=str).encode()).hexdigest()


def _cache_key(cfg: DictConfig, tok, split: str, source: str) -> str:
    d = plain(cfg.data)
    for k in (
        "name",
        "val_split",
        "val_split_name",
        "packing",
        "packing_strategy",
        "group_by_length",
        "cache_dir",
        "sources",
    ):
        d.pop(k, None)  # these act after tokenisation
    ident = [CACHE_VERSION, source, _tokenizer_fingerprint(tok), d, split, cfg.train.seq_len]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _save(path: Path, s: SampleSet, stats: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # readers see the whole file or none
        np.savez(f, ids=s.ids, labels=s.labels, offsets=s.offsets, record=s.record, stats=np.array(json.dumps(stats)))


def _load(path: Path) -> tuple[SampleSet, dict] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return SampleSet(z["ids"], z["labels"], z["offsets"], z["record"]), json.loads(str(z["stats"]))
    except (OSError, ValueError, KeyError):
        return None


def tokenized_split(cfg: DictConfig, tok, split: str, show: bool) -> tuple[SampleSet, dict]:
    """The tokenised samples of one split of the source, from the cache when it has them."""
    d = cfg.data
    ds = None
    if d.source == "hub":  # the hub revision may move: key on what was actually loaded
        ds, columns, where = sources.load_rows(d, split)
        source = ds._fingerprint
    else:
        source = sources.source_fingerprint(d, split)
    path = cache_root(d) / f"{_cache_key(cfg, tok, split, source)}.npz"
    cached = _load(path) if path.exists() else None
    if cached is not None:
        return cached[0], {**cached[1], "cache": "hit"}
    if ds is None:
        ds, columns, where = sources.load_rows(d, split)
    fmt = resolve_format(d, columns, where)
    d = resolved(d, fmt, resolve_template(d, tok) if fmt not in ("text", "prompt_completion") else str(d.template))
    check_template(d, tok)
    check_columns(d, columns, where)
    if d.max_samples > 0:
        ds = ds.select(range(min(d.max_samples, len(ds))))
    samples, stats = _tokenize_rows(cfg, d, tok, ds, where, show)
    stats.update(source=where, format=fmt, template=str(d.template), fields=sorted(columns))
    _check_nonempty(cfg, samples, stats)
    try:
        _save(path, samples, stats)
    except OSError as e:
        raise DataError(
            f"data.cache_dir: cannot write {path} ({e.strerror}); free space there, or set "
            "data.cache_dir or LORA_LAUNCH_CACHE to another directory"
        ) from None
    return samples, {**stats, "cache": "written"}


def _check_nonempty(cfg: DictConfig, samples: SampleSet, stats: dict) -> None:
    if len(samples):
        return
    where, seq_len = stats["source"], cfg.train.seq_len
    if stats["records"] == 0:
        raise DataError(f"{where}: no records")
    if stats["too_long"] == stats["records"]:
        raise DataError(
            f"{where}: every sample is longer than train.seq_len={seq_len} (shortest "
            f"{stats['raw_length']['min']} tokens); raise train.seq_len or set data.truncation=true"
        )
    raise DataError(
        f"{where}: no sample left after filtering ({stats['too_long']} longer than "
        f"train.seq_len={seq_len}, {stats['no_target']} without response tokens within it)"
    )


# ---- splits, packing and the report ---------------------------------------------------------------


def _split_by_seed(samples: SampleSet, records: int, ratio: float, seed: int) -> tuple[SampleSet, SampleSet]:
    """Validation = a seeded choice of records (not of samples), so it does not move with seq_len."""
    n_val = int(round(records * ratio))
    val_records = np.random.default_rng(seed).permutation(records)[:n_val]
    in_val = np.isin(samples.record, val_records)
    return samples.subset(np.flatnonzero(~in_val)), samples.subset(np.flatnonzero(in_val))


PACKING_STRATEGIES = ("bfd", "next_fit")


def pack(samples: SampleSet, seq_len: int, seed: int, strategy: str = "bfd") -> SampleSet:
    """Samples packed into rows of at most seq_len tokens; each row keeps the lengths of its samples.

    `bfd` (best-fit decreasing): longest sample first, each into the row it fills most tightly, then
    the rows in a seeded order (~99% of each row is samples on instruction-like lengths). `next_fit`:
    samples in a seeded order, a new row whenever the next one does not fit (~80%; how rows were
    packed before `bfd`, kept so that older packed runs resume on the same rows). A pure function of
    the samples, seq_len and seed: every rank, whatever the world size, gets the same rows.

    The first label of each sample is masked: in a row it would be predicted from the previous sample.
    """
    lengths = samples.lengths
    if len(lengths) and int(lengths.max()) > seq_len:
        raise ValueError(f"pack: a sample of {int(lengths.max())} tokens does not fit rows of {seq_len}")
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(f"pack: strategy {strategy!r} is not one of {PACKING_STRATEGIES}")
    order = np.random.default_rng([seed, 1]).permutation(len(samples))
    if strategy == "next_fit":
        rows = next_fit_rows(lengths, seq_len, order)
    else:
        rows = best_fit_decreasing_rows(lengths, seq_len, order)
        rows = [rows[k] for k in np.random.default_rng([seed, 1, 1]).permutation(len(rows))]
    return _packed(samples, rows)


def next_fit_rows(lengths: np.ndarray, capacity: int, order: np.ndarray) -> list[list[int]]:
    """Sample indices per row: `order` cut into consecutive runs of at most `capacity` tokens."""
    rows, cur, used = [], [], 0
    for i, n in zip(order.tolist(), lengths[order].tolist()):
        if cur and used + n > capacity:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    return rows


def best_fit_decreasing_rows(lengths: np.ndarray, capacity: int, order: np.ndarray) -> list[list[int]]:
    """Sample indices per row by best-fit decreasing: longest first (equal lengths in `order`'s order),
    each sample into the open row with the least free space that still takes it, else a new row.

    Open rows sit in buckets by free space, and one integer holds a bit per non-empty bucket, so the
    best row is a shift and a lowest-set-bit away on a (capacity + 1)-bit integer, done in C: after
    the O(n log n) sort, about a microsecond a sample (a million in one to two seconds). Rows of equal
    free space are taken last in, first out, so the result depends on the lengths and `order` alone.
    """
    by_length = order[np.argsort(-lengths[order], kind="stable")]
    rows: list[list[int]] = []
    bucket: list[list[int]] = [[] for _ in range(capacity + 1)]  # bucket[c]: open rows with c tokens free
    nonempty = 0  # bit c set while bucket[c] holds a row
    for i, n in zip(by_length.tolist(), lengths[by_length].tolist()):
        fits = nonempty >> n  # bit k: a row with n + k tokens free
        if fits:
            free = n + (fits & -fits).bit_length() - 1
            row = bucket[free].pop()
            if not bucket[free]:
                nonempty ^= 1 << free
        else:
            row, free = len(rows), capacity
            rows.append([])
        rows[row].append(i)
        free -= n
        if free:
            if not bucket[free]:
                nonempty |= 1 << free
            bucket[free].append(row)
    return rows


def _packed(samples: SampleSet, rows: list[list[int]]) -> SampleSet:
    """The rows (lists of sample indices) as one flat set: tokens gathered in row order, each sample's
    first label masked, each row's sample lengths kept."""
    counts = np.fromiter((len(r) for r in rows), np.int64, len(rows))
    order = np.fromiter((i for r in rows for i in r), np.int64, int(counts.sum()))
    lens = samples.lengths[order]
    starts = np.cumsum(lens) - lens  # where each sample starts in the packed arrays
    source = np.repeat(samples.offsets[order] - starts, lens) + np.arange(int(lens.sum()))
    ids, labels = samples.ids[source], samples.labels[source]
    labels[starts] = IGNORE
    seq_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    seq_offsets[1:] = np.cumsum(counts)
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lens)[seq_offsets[1:] - 1] if len(rows) else []
    return SampleSet(ids, labels, offsets, samples.record[order[seq_offsets[:-1]]], lens, seq_offsets)


def _report(cfg: DictConfig, stats: dict, splits: Splits) -> dict:
    lengths = np.concatenate([splits.train.lengths, splits.val.lengths]) if not cfg.data.packing else splits.val.lengths
    first = next(iter(stats.values()))
    report = {
        "format": first.get("format", "text"),
        "template": first.get("template"),
        "sources": stats,
        "seq_len": cfg.train.seq_len,
        "truncation": cfg.data.truncation,
        "train_samples": len(splits.train),
        "val_samples": len(splits.val),
        "packing": bool(cfg.data.packing),
        "fingerprint": dataset_fingerprint(splits),
    }
    if cfg.data.packing:
        report["packing_strategy"] = str(cfg.data.packing_strategy)
        report["train_samples_packed"] = len(splits.train.seq_lens)
        report["train_rows_fill"] = round(
            float(splits.train.lengths.sum()) / (len(splits.train) * cfg.train.seq_len), 4
        )
    else:
        report["length"] = _distribution(lengths)
    return report


UNKNOWN_WARN = 0.01  # above this share of unknown tokens the run says what it means


def unknown_tokens_warning(report: dict) -> str | None:
    """One line when the tokenizer does not know a noticeable share of the data's tokens, else None."""
    worst = max(report["sources"].items(), key=lambda kv: kv[1].get("unknown_tokens", 0.0))
    share = worst[1].get("unknown_tokens", 0.0)
    if share <= UNKNOWN_WARN:
        return None
    return (
        f"warning: {share:.1%} of the tokens of {worst[1]['source']} are unknown to the tokenizer: the model "
        "sees them all as one token and cannot learn or write them; use a tokenizer (model) that covers "
        "this text"
    )


def _announce(cfg: DictConfig, report: dict, run_dir: Path | None) -> None:
    picked = [
        f"data.{key}=auto: {report[key]}"
        for key in ("format", "template")
        if cfg.data[key] == "auto"
        and report.get(key)
        and not (key == "template" and report["format"] in ("text", "prompt_completion"))
    ]
    if picked:
        fields = sorted(set().union(*(s.get("fields", []) for s in report["sources"].values())))
        print(f"{', '.join(picked)} (fields present: {', '.join(fields)})", flush=True)
    for split, s in report["sources"].items():
        raw = s.get("raw_length", {})
        print(
            f"data [{split}] {s['source']}: {s['records']} records, {s['truncated']} truncated, "
            f"{s['too_long']} dropped as longer than seq_len, {s['no_target']} dropped with no response "
            f"tokens; tokens per record p50 {raw.get('p50')} p90 {raw.get('p90')} max {raw.get('max')}; "
            f"{s.get('unknown_tokens', 0.0):.2%} unknown tokens"
            f"{' (tokenised before launch, read from the cache)' if s.get('cache') == 'hit' else ''}",
            flush=True,
        )
    rows = (
        f"rows ({report['train_samples_packed']} samples packed by {report['packing_strategy']}, "
        f"{report['train_rows_fill']:.1%} full)"
        if report["packing"]
        else "samples"
    )
    print(
        f"data: {report['train_samples']} train {rows}, "
        f"{report['val_samples']} val samples, fingerprint {report['fingerprint'][:12]}",
        flush=True,
    )
    warning = unknown_tokens_warning(report)
    if warning:
        print(warning, flush=True)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "data_report.json", report, indent=2)


def as_trained(d: DictConfig, report: dict) -> DictConfig:
    """The data config with the format and template a run's data report says were used (for prompts)."""
    return resolved(d, report.get("format", "text"), report.get("template") or str(d.template))


def prepare(cfg: DictConfig) -> Splits:
    """What the launcher runs before any training process starts: read, format and tokenise the data
    into the cache (the ranks then read it), so that every data error is one line before launch.
    Nothing is written into the run dir; the train rows are left unpacked (the ranks pack them)."""
    from lora_launch.data.tokenizer import load_tokenizer

    if cfg.data.source != "synthetic":
        check_cache_writable(cfg.data)
    source = cfg.model.tokenizer or cfg.model.path
    try:
        tok = load_tokenizer(cfg)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
        raise ConfigError(
            f"{key}={source}: cannot load a tokenizer from it ({first}); give a directory with "
            "tokenizer files, or set model.tokenizer"
        ) from None
    return build_splits(cfg, tok, report=False, packed=False)


def source_configs(cfg: DictConfig) -> list[tuple[DictConfig, float]]:
    """(config, weight) per data source: the run's own data, or one per data.sources entry, each entry's
    keys laid over the run's data settings."""
    from omegaconf import OmegaConf, open_dict

    if not cfg.data.get("sources"):
        return [(cfg, 1.0)]
    out = []
    for entry in cfg.data.sources:
        entry = OmegaConf.to_container(entry, resolve=True)
        weight = float(entry.pop("weight", 1.0))
        sub = copy.deepcopy(cfg)
        with open_dict(sub):
            sub.data = OmegaConf.merge(cfg.data, entry)
            sub.data.sources = []
        out.append((sub, weight))
    return out


def _source_splits(cfg: DictConfig, tok, main_process: bool) -> tuple[SampleSet, SampleSet, dict]:
    """(train, val, stats by split) of one source."""
    d = cfg.data
    if d.source == "synthetic":
        samples, stats = synthetic_samples(cfg, tok)
    else:
        samples, stats = tokenized_split(cfg, tok, d.split, main_process)
    all_stats = {d.split: stats}
    if d.val_split_name and d.source != "synthetic":
        train = samples
        val, all_stats[d.val_split_name] = tokenized_split(cfg, tok, d.val_split_name, main_process)
    else:
        train, val = _split_by_seed(samples, stats["records"], d.val_split, cfg.seed)
    if not len(train):
        raise DataError(f"{stats['source']}: no training sample left after data.val_split={d.val_split}")
    return train, val, all_stats


def concat(sets: list[SampleSet]) -> SampleSet:
    """The samples of every set, in order; record ids stay distinct (offset by the sets before). Packed
    rows stay packed when every set is."""
    offsets, shift, records, base = [np.zeros(1, np.int64)], 0, [], 0
    seq_offsets, seq_shift = [np.zeros(1, np.int64)], 0
    packed = bool(sets) and all(s.packed for s in sets)
    for s in sets:
        offsets.append(s.offsets[1:] + shift)
        shift += int(s.offsets[-1])
        records.append(s.record + base)
        base += int(s.record.max()) + 1 if len(s.record) else 0
        if packed:
            seq_offsets.append(s.seq_offsets[1:] + seq_shift)
            seq_shift += int(s.seq_offsets[-1])
    seq_lens = (np.concatenate([s.seq_lens for s in sets]), np.concatenate(seq_offsets)) if packed else (None, None)
    return SampleSet(
        np.concatenate([s.ids for s in sets]),
        np.concatenate([s.labels for s in sets]),
        np.concatenate(offsets),
        np.concatenate(records),
        *seq_lens,
    )


def mix(sets: list[SampleSet], weights: list[float], seed: int) -> tuple[SampleSet, list[int]]:
    """One training set drawing source i in proportion weights[i] (as many samples in all as the sources
    hold): a source below its share is repeated, one above it subsampled, by a seeded choice. The result
    is a plain sample set, so the resumable stream and its exact resume work unchanged. Returns it and how
    many samples each source gave."""
    total, wsum = sum(len(s) for s in sets), float(sum(weights))
    rng = np.random.default_rng([seed, 3])
    picked = []
    for s, w in zip(sets, weights):
        want = max(1, round(total * w / wsum))
        reps, rest = divmod(want, len(s))
        keep = np.concatenate([np.tile(np.arange(len(s)), reps), np.sort(rng.permutation(len(s))[:rest])])
        picked.append(s.subset(keep.astype(np.int64)))
    return concat(picked), [len(s) for s in picked]


def build_splits(cfg: DictConfig, tok, main_process: bool = True, report: bool = True, packed: bool = True) -> Splits:
    """Tokenised train and validation samples (train packed with data.packing, unless not `packed`).

    Validation is data.val_split_name (the dataset's own split) or a data.val_split share of the
    records drawn by `seed`. With data.sources, each source is read and split so, and the training
    set is their mixture by weight (`mix`). The main process prints the data report and writes
    run_dir/data_report.json when `report`.
    """
    d = cfg.data
    sources = source_configs(cfg)
    parts = [_source_splits(sub, tok, main_process) for sub, _ in sources]
    if len(parts) == 1:
        train, val, all_stats = parts[0]
    else:
        weights = [w for _, w in sources]
        train, drawn = mix([p[0] for p in parts], weights, cfg.seed)
        val = concat([p[1] for p in parts])
        all_stats = {
            f"{split} [{i}]": {**s, "weight": weights[i], "train_samples_drawn": drawn[i]}
            for i, p in enumerate(parts)
            for split, s in p[2].items()
        }
    if d.packing and packed:
        train = pack(train, cfg.train.seq_len, cfg.seed, str(d.packing_strategy))
    splits = Splits(train=train, val=val)
    if not packed:  # the launcher's check: the ranks build the report of what they train on
        return splits
    splits.report = _report(cfg, all_stats, splits)
    if main_process and report:
        _announce(cfg, splits.report, Path(cfg.run.dir) if cfg.run.dir else None)
    return splits
