"""One benchmark case in its own process: `python -m bench.case '<json spec>'`.

Prints one line `RESULT {json}` (rank 0). Kinds: `matmul` (the card's bf16 matrix rate),
`prepare` (tokenizer and a saved random 7B for QLoRA), `project` (this project's Trainer),
`peer` (the article's TRL SFTTrainer recipe), `checkpoint` (checkpoint time and size).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

WORK = Path(os.environ.get("BENCH_WORK", "/tmp/bench"))
TOKENIZER = WORK / "tokenizer"
SAVED_7B = WORK / "llama2-7b-random"


def emit(result: dict) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(result), flush=True)


def step_stats(times: list[float], tokens: list[int]) -> dict:
    """tokens/s over the measured steps (total tokens / total time), the step-time spread, and each step's time
    (a mean held down by one slow step shows which step it was)."""
    ranked = sorted(times)
    p10, p90 = ranked[round(0.1 * (len(ranked) - 1))], ranked[round(0.9 * (len(ranked) - 1))]
    return {
        "tokens_per_s": sum(tokens) / sum(times),
        "steps": len(times),
        "step_time_median": statistics.median(times),
        "step_time_p10": p10,
        "step_time_p90": p90,
        "step_time_cv": statistics.pstdev(times) / statistics.mean(times),
        "tokens_per_step": statistics.mean(tokens),
        "step_times": [round(t, 5) for t in times],
    }


def attention_context(samples) -> float:
    """The mean number of positions a trained token's sample spans, sum(n^2) / sum(n) over the samples: each
    sample attends only within itself, whether padded to the batch or packed with others into a row (its
    boundaries are passed to attention), so this, not the row length, sets the attention FLOPs per token."""
    import numpy as np

    lengths = (samples.seq_lens if samples.packed else np.diff(samples.offsets)).astype(np.float64)
    return float((lengths**2).sum() / lengths.sum())


def profiled(step, steps: int, step_s: float | None = None) -> dict:
    """`steps` calls of `step` under torch's profiler, summarised by `profile_summary` (`step_s`: the step's
    time measured without the profiler, for the device's busy share)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with torch.profiler.record_function(STEP_MARK):
                step()
        if cuda:
            torch.cuda.synchronize()
    out = profile_summary(prof.key_averages(), time.perf_counter() - t0, steps, cuda, step_s)
    if cuda:
        out["idle"] = idle_gaps(prof.events())
    return out


STEP_MARK = "bench.step"


def idle_gaps(events, top: int = 8) -> dict:
    """Where the device waits for the host, from the profiled kernels' timeline: per step, the wait between the
    previous step's last kernel and this step's first (the step boundary: the host's sync and its next launches)
    and the gaps inside the step; the longest gaps with their place in the step (ms after its first kernel, and the
    step's length), which tell forward, backward and the optimizer apart."""
    from torch.autograd import DeviceType

    steps = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.name == STEP_MARK and e.device_type == DeviceType.CPU
    )
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == DeviceType.CUDA and e.name != STEP_MARK and e.time_range.end > e.time_range.start
    )
    merged: list[list[float]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    if not merged or not steps:
        return {}
    per_step, gaps = [], []
    for i, (s0, _) in enumerate(steps):
        end = steps[i + 1][0] if i + 1 < len(steps) else merged[-1][1]
        mine = [m for m in merged if s0 <= m[0] < end]
        if not mine:
            continue
        before = [m for m in merged if m[0] < s0]
        boundary = (mine[0][0] - before[-1][1]) / 1e3 if before else None
        inner = [(b[0] - a[1], a[1] - mine[0][0]) for a, b in zip(mine, mine[1:])]
        per_step.append(
            {
                "boundary_ms": boundary,
                "inside_ms": sum(g for g, _ in inner) / 1e3,
                "kernels_span_ms": (mine[-1][1] - mine[0][0]) / 1e3,
            }
        )
        gaps += [{"ms": g / 1e3, "at_ms": at / 1e3, "of_ms": (mine[-1][1] - mine[0][0]) / 1e3} for g, at in inner]
    gaps.sort(key=lambda g: -g["ms"])
    return {
        "steps": per_step,
        "longest": gaps[:top],
        "small_gaps_ms": sum(g["ms"] for g in gaps if g["ms"] < 0.05) / max(len(per_step), 1),
    }


def profile_summary(events, wall_s: float, steps: int, cuda: bool, step_s: float | None = None, top: int = 10) -> dict:
    """Where a step's time goes: the share of a step the device was busy (kernel time per step over `step_s`,
    a step timed without the profiler, whose own start-up would swamp its wall time), a low share meaning the
    host cannot feed it; where there is no GPU, the share of the profiled wall time in CPU ops (a lower bound:
    the profiler slows the host). Also kernels (or ops) per step, and the `top` by self time, device and host."""
    from torch.autograd import DeviceType

    def self_time(e) -> float:  # microseconds
        if cuda:
            return getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        return e.self_cpu_time_total

    device = DeviceType.CUDA if cuda else DeviceType.CPU
    rows = [
        (e.key, self_time(e), e.count)
        for e in events
        if e.device_type == device and self_time(e) > 0 and e.key != STEP_MARK
    ]
    busy_s = sum(t for _, t, _ in rows) / 1e6
    ranked = sorted(rows, key=lambda r: -r[1])[:top]
    # the host's side: the operators (and Python-level hooks torch records) with the most CPU time of their own
    host = sorted(
        (
            (e.key, e.self_cpu_time_total, e.count)
            for e in events
            if e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0
        ),
        key=lambda r: -r[1],
    )[:top]
    kinds: dict[str, float] = {}  # device ms per step by kind of kernel (host: empty)
    if cuda:
        for k, t, _ in rows:
            kind = kernel_kind(k)
            kinds[kind] = kinds.get(kind, 0.0) + t / 1e3 / steps
    return {
        "profile_steps": steps,
        "profile_wall_s": wall_s,
        "kinds_ms_per_step": kinds,
        "device_busy": min(1.0, busy_s / steps / step_s) if cuda and step_s else None,
        "device_ms_per_step": busy_s * 1e3 / steps if cuda else None,
        "host_op_share": None if cuda else min(1.0, busy_s / wall_s),
        "kernels_per_step": sum(c for _, _, c in rows) / steps,
        "top": [{"name": k[:90], "ms_per_step": t / 1e3 / steps, "calls_per_step": c / steps} for k, t, c in ranked],
        "host_top": [{"name": k[:90], "ms_per_step": t / 1e3 / steps, "calls_per_step": c / steps} for k, t, c in host],
    }


KERNEL_KINDS = (
    ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "sm90_")),
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("optimizer", ("optimizer", "adam", "multi_tensor")),
    ("fused (triton)", ("triton",)),
    ("copy", ("memcpy", "memset", "copy")),
)


def kernel_kind(name: str) -> str:
    """The kind of a device kernel by its name: matmul, attention, optimizer, copies, compiled (Triton) or
    other (eager elementwise and reductions)."""
    low = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(m in low for m in marks)), "other")


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


# ---- the card ---------------------------------------------------------------------------------


def matmul(spec: dict) -> dict:
    """Median bf16 matrix-product rate (TFLOP/s) at 8192^3 and at the 7B's MLP shape."""
    from triton.testing import do_bench

    out = {}
    for name, (m, k, n) in {"square_8192": (8192, 8192, 8192), "mlp_2048x4096x11008": (2048, 4096, 11008)}.items():
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        ms = do_bench(lambda a=a, b=b: a @ b, warmup=200, rep=1000, return_mode="median")
        out[f"tflops_{name}"] = 2 * m * k * n / ms / 1e9
    return out


# ---- shared inputs ----------------------------------------------------------------------------


def make_tokenizer() -> None:
    """A Llama-2-sized word-level tokenizer (32000 ids, Llama's special tokens, pad = unk).

    Synthetic data draws its ids from the tokenizer's vocabulary: a full-size one keeps the
    token ids, and so the activations, as varied as real text's.
    """
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 32000)}}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
    )
    tok.save_pretrained(TOKENIZER)


def random_7b(seed: int = 0):
    """The Llama-2-7B shape with random bf16 weights, built on the GPU (the project's recipe)."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf/model/llama2_7b_random.yaml").arch)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch), dtype=torch.bfloat16)


def prepare(spec: dict) -> dict:
    """Tokenizer plus the random 7B saved as safetensors, so QLoRA can load it through bitsandbytes.

    `"save_7b": false` makes the tokenizer only (bf16 LoRA builds its model on the GPU).
    """
    t0 = time.perf_counter()
    make_tokenizer()
    if spec.get("save_7b", True) and not (SAVED_7B / "config.json").exists():
        random_7b().save_pretrained(SAVED_7B, safe_serialization=True)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(SAVED_7B)
    return {"seconds": time.perf_counter() - t0}


# ---- this project -----------------------------------------------------------------------------


def _word(value) -> str:
    """A spec value as the command line writes it: true/false, a number, auto, 20GiB."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def project_overrides(spec: dict, run_dir: str) -> list[str]:
    """lora-launch overrides for a case: the article's LoRA on the random 7B, synthetic tokens."""
    model = spec.get("model", "llama2_7b_random")
    o = [f"model={model}"] + ([f"model.tokenizer={TOKENIZER}"] if model == "llama2_7b_random" else [])
    o += [
        "data.source=synthetic",
        f"data.synthetic_lengths={spec.get('lengths', 'full')}",
        "data.max_samples=2048",
        "data.val_split=0.0",
        "lora.r=64",
        "lora.alpha=16",
        "lora.dropout=0.1",
        f"train.seq_len={spec.get('seq', 512)}",
        f"train.micro_batch_size={spec.get('micro', 4)}",
        f"train.grad_ckpt={_word(spec.get('ckpt', False))}",
        f"train.compile={spec.get('compile', 'auto')}",
        "train.max_steps=1000",
        "eval.at_start=false",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        f"run.dir={run_dir}",
        f"distributed={spec.get('distributed', 'ddp')}",
        f"optim={spec.get('optim', 'paged_adamw_32bit')}",
        "optim.max_grad_norm=0.3",
    ]
    if "chunked" in spec:  # else the project's default (train.chunked_loss=auto: chunked with grad ckpt)
        o.append(f"train.chunked_loss={_word(spec['chunked'])}")
    if spec.get("all_linear"):
        o.append("lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]")
    if spec.get("quant") == "nf4" and spec.get("random_nf4"):  # drawn and quantised layer by layer on the GPU
        o += ["quant=nf4"]
    elif spec.get("quant") == "nf4":
        o += ["quant=nf4", f"model.path={SAVED_7B}", "model.random_init=false"]
    if spec.get("ds_json"):  # the user's own DeepSpeed JSON, laid under the run's (distributed.deepspeed_config)
        path = WORK / f"ds-{spec['name']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(spec["ds_json"]))
        o.append(f"distributed.deepspeed_config={path}")
    return o + [f"seed={spec.get('seed', 0)}"] + list(spec.get("extra", []))


def preview_estimate(cfg) -> dict:
    """What `preview=true` estimates for this run's peak device memory, and the shape the MFU needs. Called
    before the Trainer exists: under ZeRO-3, transformers builds every model (the meta one here too) through
    DeepSpeed once a DeepSpeed engine is configured."""
    from lora_launch.conf.compose import plain
    from lora_launch.conf.schema import lora_targets
    from lora_launch.launcher.preview import GIB, gpu_memory_here, memory_estimate, model_config, model_shape
    from lora_launch.run.plan import RunPlan

    shape = model_shape(model_config(cfg), lora_targets(cfg), cfg.lora.r)
    mem = memory_estimate(cfg, shape, RunPlan.for_this_process(cfg), gpu_memory_here())
    out = {"estimate_gib": mem.total / GIB, "estimate_checkpointed_layers": mem.checkpointed, "layers": shape.layers}
    if cfg.model.random_init:
        out["arch"] = plain(cfg.model.arch)
    return out


def project_config(spec: dict):
    from lora_launch.conf.compose import compose

    return compose(project_overrides(spec, str(WORK / "runs" / spec["name"])))


def build_trainer(spec: dict):
    from lora_launch.train.loop import Trainer

    return Trainer(project_config(spec))


def project(spec: dict) -> dict:
    """Warm-up steps (compilation happens here), then timed steps of the project's Trainer."""
    from lora_launch.train.loop import Trainer

    cfg = project_config(spec)
    estimate = preview_estimate(cfg)
    if spec.get("compile_mode"):  # an experiment, not a project setting: torch.compile's mode for the layers
        _compile_layers_with_mode(spec["compile_mode"])
    trainer = Trainer(cfg)
    loaded = peak_gib()
    try:
        for _ in range(spec.get("warmup", 5)):
            trainer.train_step()
        times, tokens = [], []
        for _ in range(spec.get("steps", 15)):
            row = trainer.train_step()
            times.append(row["step_time"])
            tokens.append(row["tokens"] // trainer.world)  # per GPU
        out = step_stats(times, tokens)
        out.update(
            world=trainer.world,
            peak_gib=peak_gib(),
            peak_after_load_gib=loaded,
            loss=row["loss"],
            attention_context=attention_context(trainer.splits.train),
            **estimate,
        )
        out["checkpointed_layers"] = trainer.checkpointed_layers  # train.grad_ckpt as decided (the log says why)
        out["loss_chunks"] = getattr(trainer.loss_fn, "chunks", 0)  # 0: the plain loss
        if trainer.kept_gathered:  # FSDP2's keep_gathered=auto: (groups kept, groups)
            out["kept_gathered"] = list(trainer.kept_gathered)
        if spec.get("profile"):  # after the timed steps, so the profiler's overhead stays out of tokens/s
            out.update(profiled(trainer.train_step, int(spec["profile"]), out["step_time_median"]))
        if trainer.splits.report.get("packing"):  # share of each packed row that is samples, not padding
            out.update(
                row_fill=trainer.splits.report["train_rows_fill"],
                packing_strategy=trainer.splits.report["packing_strategy"],
            )
        return out
    finally:
        trainer.close()


def cli(spec: dict) -> dict:
    """The same case through the product's own command line, as a user runs it: tokens/s as metrics.jsonl reports
    them (each step's own time), and as the rows' arrival gives them (the whole loop, step boundaries included)."""
    import shutil
    import subprocess

    run_dir = WORK / "runs" / f"{spec['name']}-cli"
    shutil.rmtree(run_dir, ignore_errors=True)
    warm, steps = spec.get("warmup", 5), spec.get("steps", 15)
    overrides = [o for o in project_overrides(spec, str(run_dir)) if not o.startswith("train.max_steps=")]
    overrides += [f"train.max_steps={warm + steps}", "logging.every_steps=1", "sample.max_new_tokens=0"]
    metrics = run_dir / "metrics.jsonl"
    arrived: dict[int, float] = {}  # step -> when its row was first seen
    rows: dict[int, dict] = {}
    proc = subprocess.Popen([sys.executable, "-m", "lora_launch.cli", *overrides], stdout=sys.stderr)
    while True:
        done = proc.poll() is not None
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                row = json.loads(line) if line.strip().endswith("}") else {}
                if "loss" in row and row["step"] not in rows:
                    rows[row["step"]], arrived[row["step"]] = row, time.monotonic()
        if done:
            break
        time.sleep(0.005)
    if proc.returncode != 0 or len(rows) < warm + steps:
        raise RuntimeError(f"lora-launch exited {proc.returncode} after {len(rows)} steps (see the log above)")
    timed = [rows[s] for s in range(warm + 1, warm + steps + 1)]
    out = step_stats([r["step_time"] for r in timed], [r["tokens"] for r in timed])
    # from the arrival of the last warm-up step's row to the last timed one's: every step's whole cycle
    wall = arrived[warm + steps] - arrived[warm]
    out.update(
        tokens_per_s_arrival=sum(r["tokens"] for r in timed) / wall,
        peak_gib=timed[-1].get("peak_memory_gib"),
        loss=timed[-1]["loss"],
    )
    return out


def _compile_layers_with_mode(mode: str) -> None:
    """Compile the decoder layers with torch.compile's `mode` (e.g. reduce-overhead: CUDA graphs) in this
    bench process only, to see what the host's share of a step is worth."""
    import functools

    from lora_launch.train import fast

    fast.compile_decoder_layers = functools.partial(fast.compile_decoder_layers, mode=mode)


def checkpoint(spec: dict) -> dict:
    """What periodic checkpoints cost at 7B, as training sees it: the time of a window of steps in which one
    background save is started, committed and waited for, against the same window without a save
    (interleaved, medians); and the at-once save for comparison."""
    trainer = build_trainer(spec)
    ck = trainer.checkpointer

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def window(n: int, save: bool) -> tuple[float, dict]:
        sync()
        t0 = time.perf_counter()
        for i in range(n):
            trainer.train_step()
            if save and i == 0:
                ck.save(trainer.step, background=True)
            else:
                ck.maybe_save(trainer.step)  # commits the pending save once every rank wrote it
        ck.finish()  # a save still writing at the end of the window counts in full
        sync()
        return time.perf_counter() - t0, dict(ck.last_save)

    times = [trainer.train_step()["step_time"] for _ in range(6)]
    out = {"step_time_median": statistics.median(times[2:])}
    n = spec.get("window", 40)
    plain, saving, saves = [], [], []
    for _ in range(spec.get("repeats", 3)):
        plain.append(window(n, save=False)[0])
        seconds, cost = window(n, save=True)
        saving.append(seconds)
        saves.append(cost)
    sync()
    t0 = time.perf_counter()
    ck.save(trainer.step)
    out["at_once_save_seconds"] = time.perf_counter() - t0
    extra = statistics.median(saving) - statistics.median(plain)
    every = trainer.cfg.checkpoint.every_steps or 500
    out.update(
        window_steps=n,
        window_plain_s=statistics.median(plain),
        window_saving_s=statistics.median(saving),
        extra_seconds=extra,
        background=all(c.get("background") for c in saves),
        paused_seconds=statistics.median(c["seconds"] for c in saves),
        write_seconds=statistics.median(c["write_seconds"] for c in saves),
        overhead_at_default_interval=max(extra, 0.0) / (every * out["step_time_median"]),
        at_once_overhead_at_default_interval=out["at_once_save_seconds"] / (every * out["step_time_median"]),
        size_mib=sum(f.stat().st_size for f in (trainer.run_dir / "checkpoints").glob("step-*/*"))
        / 2**20
        / max(len(list((trainer.run_dir / "checkpoints").glob("step-*"))), 1),
        peak_gib=peak_gib(),
    )
    trainer.close()
    return out


# ---- the peer: the article's TRL recipe -------------------------------------------------------


def lognormal_lengths(n: int, seq: int, seed: int = 0) -> list[int]:
    """Instruction-data-like sample lengths: log-normal, median seq/4, clipped to [8, seq] (as the project's
    data.synthetic_lengths=lognormal draws them)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(seq / 4), 0.7, n).astype(int), 8, seq).tolist()


def peer(spec: dict) -> dict:
    """TRL SFTTrainer + PEFT (+ bitsandbytes), paged_adamw_32bit unless `optim` names another of the Trainer's
    optimizers (adamw_torch_fused), same model and data. Forms: TRL's defaults;
    `liger`: its own use_liger_kernel=True; `padding_free`: that plus padding_free=True (real lengths).
    Tokens/s counts real (non-padding) tokens, counted at the embedding of every forward (rank 0's: per GPU).

    Under `accelerate launch --multi_gpu` each rank loads the model onto its own GPU and HF's Trainer wraps it
    in DDP, with the usual settings for DDP and checkpointing: non-reentrant checkpointing (the reentrant kind
    is limited under DDP) and no search for unused parameters (the Trainer's choice for a PEFT model)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    micro, seq, warm, steps = spec.get("micro", 4), spec.get("seq", 512), spec.get("warmup", 5), spec.get("steps", 15)
    local, world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    torch.cuda.set_device(local)
    if spec.get("quant") == "nf4":
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=False,
        )
        model = AutoModelForCausalLM.from_pretrained(
            SAVED_7B, quantization_config=bnb, dtype=torch.bfloat16, device_map={"": local}
        )
    else:
        model = random_7b()
    model.config.use_cache = False
    n = micro * (warm + steps + 2) * world
    lengths = lognormal_lengths(n, seq) if spec.get("lengths") == "lognormal" else [seq] * n
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, model.config.vocab_size, (k,), generator=g).tolist() for k in lengths]
    liger = bool(spec.get("liger") or spec.get("padding_free"))
    ddp = {"gradient_checkpointing_kwargs": {"use_reentrant": False}, "ddp_find_unused_parameters": False}
    args = SFTConfig(
        output_dir=str(WORK / "runs" / spec["name"]),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=1,
        optim=spec.get("optim", "paged_adamw_32bit"),
        learning_rate=2e-4,
        weight_decay=0.001,
        max_grad_norm=0.3,
        lr_scheduler_type="cosine",
        bf16=torch.cuda.is_available(),
        disable_tqdm=True,
        max_steps=warm + steps,
        gradient_checkpointing=spec.get("ckpt", False),
        # padding-free rows are not cut to max_length by TRL: the samples are no longer than seq
        packing=False,
        max_length=None if spec.get("padding_free") else seq,
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        use_liger_kernel=liger,
        padding_free=bool(spec.get("padding_free")),
        **(ddp if world > 1 else {}),
    )
    lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, bias="none", task_type="CAUSAL_LM")
    stamps, seen, loaded = [], [0], []

    def count(module, inputs):  # real tokens of each micro-batch: the data's ids are >= 3, padding is id 0
        seen[0] += int((inputs[0] != 0).sum())

    model.get_input_embeddings().register_forward_pre_hook(count)
    per_step = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            loaded.append(peak_gib())

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            per_step.append(seen[0])
            seen[0] = 0

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": ids}),
        processing_class=AutoTokenizer.from_pretrained(TOKENIZER),
        peft_config=lora,
        callbacks=[Clock()],
    )
    trainer.train()
    times = [b - a for a, b in zip(stamps[warm - 1 :], stamps[warm:])]
    out = step_stats(times, per_step[warm:])
    out.update(world=world, peak_gib=peak_gib(), peak_after_load_gib=loaded[0])
    return out


KINDS = {
    "matmul": matmul,
    "prepare": prepare,
    "project": project,
    "cli": cli,
    "peer": peer,
    "checkpoint": checkpoint,
}


def main() -> int:
    spec = json.loads(sys.argv[1])
    result = KINDS[spec["kind"]](spec)
    emit({"name": spec["name"], **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
