"""What `python -m bench.multi` runs and how it judges the figures, without running anything: the GPU
counts of this host, the scaling cases in priority order, how the cases share the GPUs, the ratios
against the 1-GPU run and the peer, the targets, and the resumed run's losses against two uninterrupted
runs."""

from __future__ import annotations

from bench.run import case

OPTIONS = ("ddp", "zero2", "zero3", "fsdp2")
QUANTS = ("lora", "qlora")
# per-GPU tokens/s against 1 GPU of the same option, at these GPU counts (printed next to the figures)
SCALING_TARGETS = {"ddp": 0.95, "zero2": 0.95, "zero3": 0.85, "fsdp2": 0.85}
TARGET_COUNTS = (4, 8)
VS_PEER_TARGET = 1.5
# the resumed run may differ from an uninterrupted one by this many times the two uninterrupted runs' own
# largest difference: three runs with the same nondeterminism differ by about as much as each other, while
# a resume error (data position, optimizer or RNG state) moves the losses by the size of a step's change
SPREAD_TOLERANCE = 2.0


def gpu_counts(n: int, only: list[int] | None = None) -> list[int]:
    """The GPU counts to measure on an n-GPU host, in the order they run: 1 (every ratio's base), then
    from n down. `only` keeps those counts (1 always stays: the ratios need it in the same call)."""
    counts = sorted({c for c in (1, 2, 4, 8) if c <= n} | {n}, reverse=True)
    counts = [c for c in counts if c != 1 and (not only or c in only)]
    return [1, *counts]


def project_case(quant: str, distributed: str, gpus: int) -> dict:
    """This project's Trainer on the Llama-2-7B shape (bench.case `project`), 3 warm-up + 8 timed steps."""
    spec = case(
        f"{quant}_{distributed}_{gpus}gpu",
        "project",
        nproc=gpus,
        distributed=distributed,
        warmup=3,
        steps=8,
        base=f"{quant}_{distributed}_1gpu",
        ddp_base=f"{quant}_ddp_1gpu",
        peer=f"peer_{quant}_{gpus}gpu",
    )
    if distributed != "ddp":
        spec["torchrun"] = True  # DeepSpeed and FSDP2 get their process group from torchrun, also at 1 GPU
    if distributed == "fsdp2":
        spec["optim"] = "adamw"  # bitsandbytes' optimizers cannot step FSDP2's sharded parameters
    if quant == "qlora":
        spec.update(quant="nf4", ckpt=True)
        if distributed in ("zero3", "fsdp2"):  # both shard the base: nf4 stored as the compute dtype
            spec["extra"] = ["quant.storage_dtype=bfloat16"]
    return spec


def peer_case(quant: str, gpus: int) -> dict:
    """TRL SFTTrainer with use_liger_kernel=True, under `accelerate launch --multi_gpu` above 1 GPU."""
    spec = case(f"peer_{quant}_{gpus}gpu", "peer", nproc=gpus, liger=True, warmup=3, steps=8, base=f"peer_{quant}_1gpu")
    if quant == "qlora":
        spec.update(quant="nf4", ckpt=True)
    return spec


def scaling_cases(quant: str, n: int, only: list[int] | None = None) -> list[dict]:
    """Every option and the peer at every GPU count, most important first: the 1-GPU bases, then the
    largest count down; at each count the peer first, so the project's rows find it when they arrive."""
    return [
        c for g in gpu_counts(n, only) for c in (peer_case(quant, g), *(project_case(quant, d, g) for d in OPTIONS))
    ]


def dry_case(spec: dict, tiny_model: str) -> dict:
    """The same case on CPU with the tiny model: 1 warm-up + 2 timed steps, torch's AdamW."""
    extra = [f"model.path={tiny_model}", "model.random_init=false", "train.seq_len=64", *spec.get("extra", [])]
    return {**spec, "model": "tiny", "warmup": 1, "steps": 2, "optim": "adamw", "extra": extra}


def waves(specs: list[dict], n: int, serial: bool = False) -> list[list[tuple[dict, str]]]:
    """Groups of cases that run at once on disjoint GPUs, in priority order: each wave takes the first
    cases that still fit (first fit), each case the lowest free GPU ids (CUDA_VISIBLE_DEVICES)."""
    left, out = list(specs), []
    while left:
        free, wave = list(range(n)), []
        for spec in list(left):
            k = spec.get("nproc", 1)
            if k <= len(free) and not (serial and wave):
                wave.append((spec, ",".join(str(g) for g in free[:k])))
                free = free[k:]
                left.remove(spec)
        if not wave:
            raise ValueError(f"{left[0]['name']} needs {left[0].get('nproc', 1)} GPUs, the host has {n}")
        out.append(wave)
    return out


def node_devices(n: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES of the two hostfile "nodes" of an n-GPU host: each its own half."""
    half = n // 2
    return [",".join(str(g) for g in range(r * half, (r + 1) * half)) for r in (0, 1)]


def latest(rows: list[dict], name: str | None) -> dict | None:
    """The last measured row of that name."""
    return next((r for r in reversed(rows) if r.get("name") == name and "tokens_per_s" in r), None) if name else None


def judge(row: dict, rows: list[dict]) -> dict:
    """The row with its ratios (per-GPU tokens/s against its 1-GPU base, the 1-GPU ddp base, the peer at the
    same count) and the targets they are held to; nothing is added for what is missing."""
    spec = row.get("spec") or {}
    if "tokens_per_s" not in row:
        return row
    out = dict(row)
    gpus = spec.get("nproc", 1)
    refs = (("vs_1gpu", spec.get("base")), ("vs_1gpu_ddp", spec.get("ddp_base")), ("vs_peer", spec.get("peer")))
    for key, ref in refs:
        base = latest(rows, ref) if ref != row.get("name") else None
        if base is not None and base["tokens_per_s"] > 0:
            out[key] = row["tokens_per_s"] / base["tokens_per_s"]
    target = SCALING_TARGETS.get(spec.get("distributed")) if spec.get("kind") == "project" else None
    if target is not None and gpus in TARGET_COUNTS:
        out["target_vs_1gpu"] = target
        if "vs_1gpu" in out:
            out["met_vs_1gpu"] = out["vs_1gpu"] >= target
    if spec.get("kind") == "project" and spec.get("peer"):
        out["target_vs_peer"] = VS_PEER_TARGET
        if "vs_peer" in out:
            out["met_vs_peer"] = out["vs_peer"] >= VS_PEER_TARGET
    return out


def target_cell(row: dict, key: str) -> str:
    """`>=95% met`, `>=1.5x MISS`, or `-` where no target applies or the ratio is missing."""
    target = row.get(f"target_{key}")
    if target is None:
        return "-"
    text = f">={target:.0%}" if key == "vs_1gpu" else f">={target}x"
    met = row.get(f"met_{key}")
    return f"{text} {'?' if met is None else 'met' if met else 'MISS'}"


def loss_spread(
    ref_a: dict[int, float], ref_b: dict[int, float], resumed: dict[int, float], resumed_at: int | None
) -> dict:
    """Losses by step of two uninterrupted runs and the killed-and-resumed one: the references' run-to-run
    spread, the resumed run's difference from them (all steps, and those after the resume), and whether
    that difference stays within SPREAD_TOLERANCE x the spread (bitwise equality where the spread is 0)."""
    steps = sorted(set(ref_a) & set(ref_b) & set(resumed))
    if not steps:
        return {"compared_steps": 0, "within_spread": False}
    spread = max(abs(ref_a[s] - ref_b[s]) for s in steps)
    diffs = {s: max(abs(resumed[s] - ref_a[s]), abs(resumed[s] - ref_b[s])) for s in steps}
    after = [d for s, d in diffs.items() if resumed_at is not None and s > resumed_at]
    worst = max(diffs.values())
    return {
        "compared_steps": len(steps),
        "reference_spread": spread,
        "reference_bitwise_equal_steps": sum(ref_a[s] == ref_b[s] for s in steps),
        "resumed_max_diff": worst,
        "resumed_max_diff_after_resume": max(after, default=None),
        "resumed_bitwise_equal_steps": sum(resumed[s] == ref_a[s] for s in steps),
        "resumed_vs_spread": worst / spread if spread else (0.0 if worst == 0 else None),
        "tolerance": f"{SPREAD_TOLERANCE:g}x the references' spread" if spread else "bitwise (spread 0)",
        "within_spread": worst <= SPREAD_TOLERANCE * spread,
    }
