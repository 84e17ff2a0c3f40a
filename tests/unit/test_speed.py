"""The preview's time estimate against this project's own measured tokens/s (bench/results), and its refusals."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest

from lora_launch.conf.compose import compose
from lora_launch.launcher import preview as pv
from lora_launch.launcher import speed
from lora_launch.run.plan import RunPlan
from support.measured import as_measured

RESULTS = Path(__file__).parents[2] / "bench" / "results"
FUSED = "optim.name=adamw_torch_fused"  # torch's AdamW in its fused form: the default's step, 1% apart
REVERTED = {"2026-12-06-h200-nf4-checkpointed-dequantisation.jsonl"}  # measured code since reverted


def _current_rows() -> list[tuple[str, dict]]:
    """This project's rows measured on the code path a run takes today, one GPU of the 7B shape at seq 512: from
    2026-11-30 on (quant.kernel=auto, distributed.keep_gathered=auto), torch's AdamW (the default optimizer),
    full-length samples, under ddp or no strategy, no DeepSpeed JSON, compile or other override."""
    rows = []
    for path in sorted(set(RESULTS.glob("*.jsonl")) - {RESULTS / name for name in REVERTED}):
        for row in map(json.loads, path.read_text().splitlines()):
            spec = row.get("spec", {})
            if (
                "tokens_per_s" not in row
                or spec.get("kind") != "project"
                or row["date"] < "2026-11-30"
                or spec.get("optim") != "adamw"
                or row.get("world", 1) != 1
            ):
                continue
            if (
                spec.get("distributed", "ddp") != "ddp"
                or spec.get("lengths", "full") != "full"
                or set(spec) & {"ds_json", "compile", "compile_mode", "seq", "micro"}
                or set(spec.get("extra", [])) - {FUSED}
            ):
                continue
            rows.append((f"{path.name}:{row['name']}", row))
    return rows


CURRENT = _current_rows()


@functools.cache
def _composed(overrides: tuple[str, ...]):
    """The config of overrides, composed once: the measured rows share a few configs (42 rows, 13 configs)."""
    return compose(list(overrides))


def _grad_ckpt(row: dict) -> str:
    """The row's train.grad_ckpt as it ran: the layers the case recomputed where it says (a budget, or auto's
    choice on that card), else on or off."""
    if "checkpointed_layers" in row:
        return str(row["checkpointed_layers"])
    return str(bool(row["spec"].get("ckpt"))).lower()


def _estimated_tokens_per_s(row: dict, world: int = 1, device: str = "NVIDIA H200") -> float:
    """Per-GPU tokens/s the preview's estimate gives for the row's config on `world` GPUs named `device`."""
    spec = row["spec"]
    overrides = [
        "model=llama2_7b_random",
        "lora.r=64",
        f"train.seq_len={spec.get('seq', 512)}",
        f"train.micro_batch_size={spec.get('micro', 4)}",
        "run.dir=/tmp/unused",
        f"train.grad_ckpt={_grad_ckpt(row)}",
        f"distributed={spec.get('distributed', 'ddp')}",
        *(["quant=nf4"] if spec.get("quant") == "nf4" else []),
        *[o for o in spec.get("extra", []) if o.startswith("model.arch.")],
    ]
    cfg = copy.deepcopy(_composed(tuple(overrides)))
    plan = RunPlan.from_config(cfg, 1, world, on_gpu=True, bf16=True)
    est = pv.step_estimate(cfg, plan, pv.model_shape(pv.model_config(cfg), ["q_proj", "v_proj"], 64), device)
    return plan.global_batch * cfg.train.seq_len / est.step_seconds / world


def test_the_rows_cover_each_measured_kind_of_run():
    kinds = {(row["spec"].get("quant", "none"), bool(row["spec"].get("ckpt"))) for _, row in CURRENT}
    assert kinds == {("none", False), ("none", True), ("nf4", True)} and len(CURRENT) >= 20


@pytest.mark.parametrize("name,row", CURRENT, ids=[name for name, _ in CURRENT])
def test_estimate_is_within_15_percent_of_the_measured_tokens_per_s(name, row):
    """bf16 LoRA, LoRA + grad ckpt and QLoRA + grad ckpt on one GPU: each measured row within the spread the
    preview prints (speed.SPREAD) of the estimate."""
    est = _estimated_tokens_per_s(row)
    assert speed.SPREAD == 0.15
    # the steady step (the median), which one slow step does not move (one row's mean is lowered 20% by one)
    steady = row["tokens_per_step"] / row["step_time_median"]
    assert abs(steady - est) / est < speed.SPREAD, (name, round(est), round(steady), row["tokens_per_s"])


def _row(results: str, name: str) -> dict:
    return next(r for r in map(json.loads, (RESULTS / results).read_text().splitlines()) if r["name"] == name)


# several GPUs of one host, per-GPU tokens/s (bf16 LoRA; the 4 x H100 rows with paged AdamW, 2026-11-27), and the
# sharding strategies at world size 1 since keep_gathered=auto
SCALED = [
    ("2026-11-27-4xh100-multi-1.jsonl", "lora_ddp_4gpu", 4, "NVIDIA H100 80GB HBM3"),
    ("2026-11-27-4xh100-multi-1.jsonl", "lora_zero2_4gpu", 4, "NVIDIA H100 80GB HBM3"),
    ("2026-11-27-4xh100-multi-1.jsonl", "lora_zero3_4gpu", 4, "NVIDIA H100 80GB HBM3"),
    ("2026-11-29-h200x2-fsdp2-2.jsonl", "lora_ddp_2gpu", 2, "NVIDIA H200"),
    ("2026-11-29-h200x2-fsdp2-2.jsonl", "lora_fsdp2_2gpu", 2, "NVIDIA H200"),
    ("2026-11-30-h200-keep-1.jsonl", "fsdp2_keep_auto_ws1", 1, "NVIDIA H200"),
    ("2026-11-30-h200-keep-1.jsonl", "fsdp2_keep_auto_ckpt_ws1", 1, "NVIDIA H200"),
    ("2026-11-30-h200-keep-3.jsonl", "fsdp2_keep_auto_profiled_ws1", 1, "NVIDIA H200"),
    ("2026-11-30-h200-keep-2.jsonl", "zero3_ws1", 1, "NVIDIA H200"),
    ("2026-11-30-h200-keep-1.jsonl", "zero3_ckpt_ws1", 1, "NVIDIA H200"),
    # fsdp2 at world size 1 with the base whole (the pairs' ddp rows are among the rows above)
    *[("2026-12-06-h100-ws1.jsonl", f"fsdp2_ws1_{k}", 1, "NVIDIA H100 80GB HBM3") for k in (1, 2, 3)],
]


@pytest.mark.parametrize("results,case,world,device", SCALED)
def test_strategies_scaling_reproduces_the_measured_rows(results, case, world, device, monkeypatch):
    as_measured(results, monkeypatch)
    row = _row(results, case)
    est = _estimated_tokens_per_s(row, world, device)
    assert abs(row["tokens_per_s"] - est) / est < speed.SPREAD, (case, round(est), row["tokens_per_s"])


# other shapes and lengths, one H200, 2026-11-29 (bitsandbytes' paged AdamW, QLoRA through its matmul then)
OTHER = [
    ("2026-11-29-h200-big-estimates.jsonl", "lora_ckpt_70b_shape_seq2048"),
    ("2026-11-29-h200-big-estimates.jsonl", "lora_70b_shape_40_layers_seq2048"),
    ("2026-11-29-h200-packing-3.jsonl", "fixed_seq4096"),
    ("2026-11-29-h200-lengths-1.jsonl", "seq16384_ckpt"),
]


@pytest.mark.parametrize("results,case", OTHER)
def test_bigger_shapes_and_longer_rows_run_no_slower_than_estimated(results, case):
    """The rates come from the 7B at seq 512; a 70B shape's wider matmuls keep the GPU busier, so there the
    estimate is on the long side (by up to 30%, as the preview's basis line says), never on the short side by more
    than the spread."""
    row = _row(results, case)
    est = _estimated_tokens_per_s(row)
    assert -speed.SPREAD < (row["tokens_per_s"] - est) / est < 0.30, (case, round(est), row["tokens_per_s"])


@pytest.fixture(scope="module")
def small():
    cfg = compose(["model=llama2_7b_random", "lora.r=64", "run.dir=/tmp/unused", "train.max_steps=1000"])
    return cfg, pv.model_shape(pv.model_config(cfg), ["q_proj", "v_proj"], 64)


def test_the_time_says_its_basis(small):
    cfg, shape = small
    text = "\n".join(
        pv.time_lines(cfg, RunPlan.from_config(cfg, 1, 8, on_gpu=True, bf16=True), shape, 1000, "NVIDIA H100 80GB HBM3")
    )
    assert "1000 steps x 32 samples x <= 512 (seq_len: an upper bound" in text
    assert "time         ≈ " in text and " on 8 x H100 SXM" in text
    assert "989.4 TFLOP/s bf16 peak (H100 SXM) x 69% reached by bf16 matmuls x 75% MFU" in text
    assert "x 8 GPUs x 88% each (DDP on 4 GPUs of one host" in text


@pytest.mark.parametrize(
    "device,on_gpu,precision,says",
    [
        (None, False, "float32", "not estimated on the CPU"),
        (None, True, "bfloat16", "not estimated: this host has no GPU to name"),
        ("NVIDIA Tesla T4", True, "bfloat16", "not estimated: no bf16 peak known for 'NVIDIA Tesla T4'"),
        ("NVIDIA A100-SXM4-80GB", True, "float32", "not estimated: the rates were measured in bfloat16"),
    ],
)
def test_an_unknown_device_gets_no_time_and_a_reason(device, on_gpu, precision, says):
    est = speed.estimate(1e15, device, 1, on_gpu, precision, "none", False, (1.0, "one GPU"))
    assert est.step_seconds is None and est.basis[0].startswith(says)


def test_the_cpu_preview_says_why_there_is_no_time(small):
    cfg, shape = small
    lines = pv.time_lines(cfg, RunPlan.from_config(cfg, 1, 1, on_gpu=False), shape, 1000, None)
    assert lines[-1].startswith("time         not estimated on the CPU")
    assert any(line.startswith("FLOPs        2.7e10 a token (4N: frozen base") for line in lines)


def test_gpu_names_as_torch_gives_them():
    assert speed.gpu_peak("NVIDIA H100 80GB HBM3") == ("H100 SXM", 989.4)
    assert speed.gpu_peak("NVIDIA H100 PCIe") == ("H100 PCIe", 756.0)
    assert speed.gpu_peak("NVIDIA A100-SXM4-40GB") == ("A100", 312.0)
    assert speed.gpu_peak("NVIDIA A10") == ("A10", 125.0)
    assert speed.gpu_peak("NVIDIA A10G") is None  # not the A10's figure
    assert speed.gpu_peak("NVIDIA GeForce RTX 4090") == ("RTX 4090", 165.2)
    assert speed.gpu_peak("NVIDIA L40S") == ("L40S", 362.1) and speed.gpu_peak("NVIDIA L4") == ("L4", 121.0)


def test_durations_read_as_a_person_says_them():
    assert [speed.duration(s) for s in (45, 125, 720, 6600, 3 * 86400 + 4 * 3600)] == [
        "45 s",
        "2 min 5 s",
        "12 min",
        "1 h 50 min",
        "3 d 4 h",
    ]
