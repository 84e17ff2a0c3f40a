"""Run a benchmark matrix on the GPU machine: `python -m bench.run --matrix single [--out DIR]`.

Every case runs in its own process (an out-of-memory case cannot take the others down) and
appends one JSON line to OUT/results.jsonl: the case's config, the card, the date, real
(non-padding) tokens/s per GPU, MFU against the bf16 matrix rate measured in the same run,
peak GPU memory and the step-time spread. A short table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.flops import LLAMA2_7B, flops_per_token

QV, ALL = ["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def case(name: str, kind: str, **spec) -> dict:
    return {"name": name, "kind": kind, **spec}


PEERS = [
    case("peer_qlora_ckpt", "peer", quant="nf4", ckpt=True),
    case("peer_lora_ckpt", "peer", ckpt=True),
    case("peer_lora", "peer"),
]

FUSED = "optim.name=adamw_torch_fused"  # torch's fused AdamW kernel (optim=adamw's name is adamw_torch: foreach)
FUSED_PROJECTIONS = "train.fused_projections=true"  # q/k/v and gate/up each one matmul (lora_launch.train.fused)
G1 = "distributed.layers_per_group=1"  # FSDP2 as it sharded before groups of layers (one layer a group)
K0 = "distributed.keep_gathered=0"  # FSDP2 as it ran before keep_gathered=auto: every group gathered twice a step


def _resharded(d: str, kw: dict) -> dict:
    """An FSDP2 case of the earlier sharding calls as they ran then: keep_gathered=0 unless the case sets
    reshard_after_forward (every group kept) itself."""
    extra = kw.get("extra", [])
    if d == "fsdp2" and not any("reshard_after_forward" in e for e in extra):
        return {**kw, "extra": [*extra, K0]}
    return kw


MATRICES = {
    # the headline: the peer's three configs and this project's, plus what each speed change gives
    "single": [
        case("matmul", "matmul"),
        case("prepare", "prepare"),
        *PEERS,
        case("lora", "project", vs="peer_lora"),
        case("lora_ckpt", "project", ckpt=True, vs="peer_lora_ckpt"),
        case("qlora_ckpt", "project", quant="nf4", ckpt=True, vs="peer_qlora_ckpt"),
        case("qlora_ckpt_compile_loss", "project", quant="nf4", ckpt=True, compile="loss", vs="peer_qlora_ckpt"),
        case("lora_eager", "project", compile="none", vs="peer_lora"),
        case(
            "qlora_ckpt_eager_upcast",
            "project",
            quant="nf4",
            ckpt=True,
            compile="none",
            extra=["quant.upcast_frozen=true"],
            vs="peer_qlora_ckpt",
        ),
        case("lora_mb8", "project", micro=8, vs="peer_lora"),
        case("lora_ckpt_mb16", "project", ckpt=True, micro=16, vs="peer_lora_ckpt"),
        case("lengths_padded", "project", lengths="lognormal"),
        case("lengths_packed", "project", lengths="lognormal", extra=["data.packing=true"]),
        case("lora_all_linear", "project", all_linear=True),
        case("checkpoint_7b", "checkpoint"),
    ],
    # the second H100 run: QLoRA and LoRA against the peer again, real lengths, all-linear, checkpoints
    "single2": [
        case("matmul", "matmul"),
        case("prepare", "prepare"),
        PEERS[0],
        case("qlora_ckpt", "project", quant="nf4", ckpt=True, vs="peer_qlora_ckpt"),
        PEERS[2],
        case("lora", "project", vs="peer_lora"),
        case("checkpoint_7b", "checkpoint"),
        case("lora_all_linear", "project", all_linear=True),
        case("lengths_padded", "project", lengths="lognormal"),
        case("lengths_packed", "project", lengths="lognormal", extra=["data.packing=true"]),
        case("lengths_padded_eager", "project", lengths="lognormal", compile="none"),
    ],
    # per-GPU tokens/s against 1 GPU, for every distributed option with LoRA and QLoRA
    "scaling": [
        case("prepare", "prepare"),
        *[
            case(
                f"{q}_{d}_{n}gpu",
                "project",
                nproc=n,
                distributed=d,
                ckpt=(q == "qlora"),
                **({"quant": "nf4"} if q == "qlora" else {}),
                warmup=4,
                steps=10,
            )
            for q in ("lora", "qlora")
            for n, ds in ((1, ["ddp"]), (2, ["ddp", "zero2", "zero3"]), (4, ["ddp", "zero2", "zero3"]))
            for d in ds
        ],
    ],
    # the step with one host sync: 1 GPU against 2 (per-GPU tokens/s; the "x peer" column is vs 1 GPU)
    "scaling2": [
        case("prepare", "prepare", save_7b=False),
        case("lora_ddp_1gpu", "project", warmup=3, steps=8),
        case("lora_ddp_2gpu", "project", nproc=2, warmup=3, steps=8, vs="lora_ddp_1gpu"),
        case("lora_zero2_2gpu", "project", nproc=2, distributed="zero2", warmup=3, steps=8, vs="lora_ddp_1gpu"),
    ],
    # checkpoint cost at the default interval (every checkpoint is a PEFT adapter too), and QLoRA of a
    # random model quantised layer by layer on the GPU (no saved model), 7B and 70B shapes
    "ckpt": [
        case("matmul", "matmul"),
        case("prepare", "prepare", save_7b=False),
        case("checkpoint_7b", "checkpoint"),
        case("lora_ckpt", "project", ckpt=True),
        case("qlora_ckpt_random_nf4", "project", quant="nf4", random_nf4=True, ckpt=True),
    ],
    # the preview's memory estimate against the measured peak, 7B and 70B shapes, bf16 and nf4, with and without
    # grad ckpt; nf4 drawn and quantised layer by layer on the GPU. A 70B in bf16 without ckpt does not fit one
    # H200 (129 GiB of weights + 42 GiB of activations): that row keeps the 70B's width with 40 of its 80 layers
    "big": [
        case("matmul", "matmul"),
        case("prepare", "prepare", save_7b=False),
        *[
            case(
                f"{q}{'_ckpt' if ck else ''}_7b",
                "project",
                ckpt=ck,
                **({"quant": "nf4", "random_nf4": True} if q == "qlora" else {}),
            )
            for q in ("qlora", "lora")
            for ck in (True, False)
        ],
        *[
            case(
                f"{q}{'_ckpt' if ck else ''}_70b_shape{'_40_layers' if layers == 40 else ''}_seq2048",
                "project",
                ckpt=ck,
                seq=2048,
                micro=1,
                warmup=2,
                steps=4,
                **({"quant": "nf4", "random_nf4": True} if q == "qlora" else {}),
                extra=[
                    "model.arch.hidden_size=8192",
                    "model.arch.intermediate_size=28672",
                    f"model.arch.num_hidden_layers={layers}",
                    "model.arch.num_attention_heads=64",
                    "model.arch.num_key_value_heads=8",
                ],
            )
            for q, ck, layers in (("qlora", True, 80), ("qlora", False, 80), ("lora", False, 40), ("lora", True, 80))
        ],
    ],
    # the peer in its three forms (TRL defaults, + use_liger_kernel, + padding_free on real lengths) against
    # this project, and what periodic checkpoints cost now that they are written in the background
    "speed": [
        case("matmul", "matmul"),
        case("prepare", "prepare"),
        case("checkpoint_7b", "checkpoint"),
        *[
            case(f"peer_{c}{form}", "peer", **kw, **fkw)
            for c, kw in (("lora", {}), ("lora_ckpt", {"ckpt": True}), ("qlora_ckpt", {"quant": "nf4", "ckpt": True}))
            for form, fkw in (("", {}), ("_liger", {"liger": True}))
        ],
        case("lora", "project", vs=["peer_lora", "peer_lora_liger"]),
        case("lora_ckpt", "project", ckpt=True, vs=["peer_lora_ckpt", "peer_lora_ckpt_liger"]),
        case("qlora_ckpt", "project", quant="nf4", ckpt=True, vs=["peer_qlora_ckpt", "peer_qlora_ckpt_liger"]),
        # bitsandbytes' matmul_4bit, the default before quant.kernel=auto (torch operations, fused by compile
        # into each decoder layer's graph); the 2026-11-30 speed-1/2 rows name the two qlora_ckpt (bitsandbytes)
        # and qlora_ckpt_torch_kernel
        case(
            "qlora_ckpt_bnb_kernel",
            "project",
            quant="nf4",
            ckpt=True,
            extra=["quant.kernel=bitsandbytes"],
            vs=["peer_qlora_ckpt", "peer_qlora_ckpt_liger"],
        ),
    ],
    # real lengths and long context, each against the peer's fastest form for it
    "lengths": [
        case("matmul", "matmul"),
        case("prepare", "prepare", save_7b=False),
        case("peer_lengths", "peer", lengths="lognormal"),
        case("peer_lengths_liger", "peer", lengths="lognormal", liger=True),
        case("peer_lengths_padding_free", "peer", lengths="lognormal", padding_free=True),
        case(
            "lengths_packed",
            "project",
            lengths="lognormal",
            extra=["data.packing=true"],
            vs=["peer_lengths", "peer_lengths_liger", "peer_lengths_padding_free"],
        ),
        case("lora_fixed", "project"),
        case("peer_seq4096_liger", "peer", seq=4096, micro=1, liger=True),
        case("seq4096", "project", seq=4096, micro=1, vs=["peer_seq4096_liger"]),
        case("peer_seq16384_ckpt_liger", "peer", seq=16384, micro=1, ckpt=True, liger=True, warmup=3, steps=6),
        case(
            "seq16384_ckpt",
            "project",
            seq=16384,
            micro=1,
            ckpt=True,
            warmup=3,
            steps=6,
            vs=["peer_seq16384_ckpt_liger"],
        ),
    ],
    # distributed=fsdp2 against ddp, bf16 LoRA and QLoRA (nf4 stored as bf16, which FSDP2 shards), per-GPU
    # tokens/s; torch's AdamW for both (bitsandbytes' optimizers cannot step FSDP2's shards). Rows of N GPUs
    # need N GPUs: pick with --only
    "fsdp2": [
        case("prepare", "prepare"),
        *[
            case(
                f"{q}_{d}_{n}gpu",
                "project",
                nproc=n,
                distributed=d,
                optim="adamw",
                ckpt=(q == "qlora"),
                warmup=4,
                steps=10,
                vs=None if d == "ddp" else f"{q}_ddp_{n}gpu",
                **({"quant": "nf4", "extra": ["quant.storage_dtype=bfloat16"]} if q == "qlora" else {}),
            )
            for q in ("lora", "qlora")
            for n in (1, 2, 4)
            for d in ("ddp", "fsdp2")
        ],
        case(
            "lora_fsdp2_offload_1gpu",
            "project",
            distributed="fsdp2_offload",
            optim="adamw",
            warmup=3,
            steps=6,
            vs="lora_ddp_1gpu",
        ),
    ],
    # packing on real lengths (log-normal, seeded): real tokens/s of rows packed best-fit-decreasing and
    # next-fit, and of padded batches, each against full-length rows of the same seq (the ratio column)
    "packing": [
        case("matmul", "matmul"),
        case("prepare", "prepare", save_7b=False),
        *[
            c
            for seq, micro in ((512, 4), (4096, 1))
            for c in (
                case(f"fixed_seq{seq}", "project", seq=seq, micro=micro),
                case(
                    f"lengths_bfd_seq{seq}",
                    "project",
                    seq=seq,
                    micro=micro,
                    lengths="lognormal",
                    extra=["data.packing=true"],
                    vs=f"fixed_seq{seq}",
                ),
                # the same rows through torch's varlen flash kernel, and through flex_attention's block mask
                case(
                    f"lengths_bfd_varlen_seq{seq}",
                    "project",
                    seq=seq,
                    micro=micro,
                    lengths="lognormal",
                    extra=["data.packing=true", "model.attn_implementation=sdpa_varlen"],
                    vs=f"fixed_seq{seq}",
                ),
                case(
                    f"lengths_bfd_flex_seq{seq}",
                    "project",
                    seq=seq,
                    micro=micro,
                    lengths="lognormal",
                    extra=["data.packing=true", "model.attn_implementation=flex_attention"],
                    vs=f"fixed_seq{seq}",
                ),
                case(
                    f"lengths_next_fit_seq{seq}",
                    "project",
                    seq=seq,
                    micro=micro,
                    lengths="lognormal",
                    extra=["data.packing=true", "data.packing_strategy=next_fit"],
                    vs=f"fixed_seq{seq}",
                ),
                case(
                    f"lengths_padded_seq{seq}",
                    "project",
                    seq=seq,
                    micro=micro,
                    lengths="lognormal",
                    vs=f"fixed_seq{seq}",
                ),
            )
        ],
    ],
    # what sharding costs per step at world size 1 (its hooks and gathers still run), bf16 LoRA on the 7B,
    # torch AdamW everywhere (FSDP2 cannot step bitsandbytes' optimizers), and each ZeRO-3 setting on its own
    # (through distributed.deepspeed_config, the user's own DeepSpeed JSON)
    "sharding": [
        case("prepare", "prepare", save_7b=False),
        *[
            case(
                name,
                "project",
                torchrun=True,
                optim="adamw",
                warmup=4,
                steps=30,
                vs=None if d.startswith("ddp") else base,
                distributed=d,
                ckpt=ckpt,
                **_resharded(d, kw),
            )
            for name, d, ckpt, base, kw in (
                ("ddp_ws1", "ddp", False, None, {"profile": 2}),
                # one decoder layer a shard group (distributed.layers_per_group=auto makes 4 for the 7B in bf16)
                ("fsdp2_ws1", "fsdp2", False, "ddp_ws1", {"profile": 2, "extra": [G1]}),
                ("zero3_ws1", "zero3", False, "ddp_ws1", {"profile": 2}),
                # FSDP2 keeping each layer's gathered weights from forward to backward (one gather a step)
                (
                    "fsdp2_keep_gathered_ws1",
                    "fsdp2",
                    False,
                    "ddp_ws1",
                    {"extra": ["distributed.reshard_after_forward=false", G1]},
                ),
                # fewer, larger shard groups (fewer hooks and copies a step), and gathers issued further ahead
                *[
                    (
                        f"fsdp2_groups{k}_ws1",
                        "fsdp2",
                        False,
                        "ddp_ws1",
                        {"extra": [f"distributed.layers_per_group={k}"]},
                    )
                    for k in (2, 4)
                ],
                ("fsdp2_prefetch2_ws1", "fsdp2", False, "ddp_ws1", {"extra": ["distributed.prefetch=2", G1]}),
                ("fsdp2_groups8_ws1", "fsdp2", False, "ddp_ws1", {"extra": ["distributed.layers_per_group=8"]}),
                (
                    "fsdp2_groups2_prefetch2_ws1",
                    "fsdp2",
                    False,
                    "ddp_ws1",
                    {"extra": ["distributed.layers_per_group=2", "distributed.prefetch=2"]},
                ),
                (
                    "fsdp2_groups2_ckpt_ws1",
                    "fsdp2",
                    True,
                    "ddp_ckpt_ws1",
                    {"extra": ["distributed.layers_per_group=2"]},
                ),
                (
                    "fsdp2_groups4_keep_gathered_ws1",
                    "fsdp2",
                    False,
                    "ddp_ws1",
                    {"extra": ["distributed.layers_per_group=4", "distributed.reshard_after_forward=false"]},
                ),
                # the fused AdamW kernel on FSDP2's sharded (DTensor) parameters
                ("fsdp2_fused_adamw_ws1", "fsdp2", False, "ddp_ws1", {"extra": ["optim.name=adamw_torch_fused", G1]}),
                ("ddp_ckpt_ws1", "ddp", True, None, {}),
                ("fsdp2_ckpt_ws1", "fsdp2", True, "ddp_ckpt_ws1", {"extra": [G1]}),
                ("zero3_ckpt_ws1", "zero3", True, "ddp_ckpt_ws1", {}),
                (
                    "zero3_persist_all_ws1",
                    "zero3",
                    False,
                    "ddp_ws1",
                    {"ds_json": {"zero_optimization": {"stage3_param_persistence_threshold": 1e10}}},
                ),
                (
                    "zero3_prefetch_5e8_ws1",
                    "zero3",
                    False,
                    "ddp_ws1",
                    {
                        "ds_json": {
                            "zero_optimization": {"stage3_prefetch_bucket_size": 5e8, "stage3_max_live_parameters": 3e9}
                        }
                    },
                ),
                ("zero3_compile_layers_ws1", "zero3", False, "ddp_ws1", {"compile": "layers"}),
                # one gather per decoder layer (DeepSpeed's leaf modules) works with grad ckpt only: without
                # it the frozen weights are freed before backward (DeepSpeed 0.19.8 with PEFT, seen on CPU)
                (
                    "zero3_leaf_layers_ckpt_ws1",
                    "zero3",
                    True,
                    "ddp_ckpt_ws1",
                    {
                        "ds_json": {
                            "zero_optimization": {
                                "leaf_module": {
                                    "classes": ["transformers.models.llama.modeling_llama.LlamaDecoderLayer"]
                                }
                            }
                        }
                    },
                ),
            )
        ],
    ],
    # distributed.keep_gathered=auto (the default) against every group gathered twice a step, at world size 1
    # with and without grad ckpt, and where ZeRO-3's step goes with its decoder layers gathered whole
    "keep": [
        case("prepare", "prepare", save_7b=False),
        *[
            case(
                name,
                "project",
                torchrun=True,
                optim="adamw",
                warmup=4,
                steps=30,
                distributed=d,
                ckpt=ckpt,
                vs=base,
                **kw,
            )
            for name, d, ckpt, base, kw in (
                ("ddp_ws1", "ddp", False, None, {}),
                ("fsdp2_resharded_ws1", "fsdp2", False, "ddp_ws1", {"extra": [K0]}),
                ("fsdp2_keep_auto_ws1", "fsdp2", False, "ddp_ws1", {}),
                ("fsdp2_keep_auto_profiled_ws1", "fsdp2", False, "ddp_ws1", {"profile": 2}),
                ("ddp_ckpt_ws1", "ddp", True, None, {}),
                ("fsdp2_resharded_ckpt_ws1", "fsdp2", True, "ddp_ckpt_ws1", {"extra": [K0]}),
                ("fsdp2_keep_auto_ckpt_ws1", "fsdp2", True, "ddp_ckpt_ws1", {}),
                ("zero3_ckpt_ws1", "zero3", True, "ddp_ckpt_ws1", {"profile": 2}),
                # DeepSpeed's own autograd function for every nn.Linear under ZeRO-3 (its host time led the
                # profile above) against torch's linear: zero_optimization.memory_efficient_linear=false
                (
                    "zero3_plain_linear_ckpt_ws1",
                    "zero3",
                    True,
                    "ddp_ckpt_ws1",
                    {"profile": 2, "ds_json": {"zero_optimization": {"memory_efficient_linear": False}}},
                ),
                ("zero3_ws1", "zero3", False, "ddp_ws1", {}),
                (
                    "zero3_plain_linear_ws1",
                    "zero3",
                    False,
                    "ddp_ws1",
                    {"ds_json": {"zero_optimization": {"memory_efficient_linear": False}}},
                ),
            )
        ],
    ],
    # where a step's time goes: each case timed as usual, then 3 more steps under torch's profiler (device busy
    # share, kernels per step, the top kernels); the QLoRA, LoRA and sharded steps whose speed is short of target
    "profile": [
        case("matmul", "matmul"),
        case("prepare", "prepare", save_7b=False),
        case("lora", "project", warmup=4, steps=8, profile=3),
        case("lora_ckpt", "project", ckpt=True, warmup=4, steps=8, profile=3),
        # drawn and quantised on the GPU: this matrix's prepare saves no 7B to load
        case("qlora_ckpt", "project", quant="nf4", random_nf4=True, ckpt=True, warmup=4, steps=8, profile=3),
        # the host's share (QLoRA + ckpt: GPU busy 61%, 5,021 kernels a step): layers under CUDA graphs
        *[
            case(
                f"{name}_cudagraphs",
                "project",
                compile_mode="reduce-overhead",
                warmup=6,
                steps=8,
                profile=2,
                vs=name,
                **kw,
            )
            for name, kw in (("qlora_ckpt", dict(quant="nf4", random_nf4=True, ckpt=True)), ("lora", {}))
        ],
        *[
            case(f"{d}_ws1", "project", torchrun=True, optim="adamw", distributed=d, warmup=4, steps=8, profile=3)
            for d in ("ddp", "fsdp2", "zero3")
        ],
    ],
    # bf16 LoRA's MFU and the ckpt cases' speed: what bitsandbytes' paged AdamW costs a step against torch's fused
    # and foreach AdamW over the same LoRA parameters, and CUDA graphs over the compiled layers
    "mfu": [
        case("matmul", "matmul"),
        case("prepare", "prepare", save_7b=False),
        case("lora", "project", warmup=4, steps=12, profile=3),
        case("lora_fused_adamw", "project", optim="adamw", extra=[FUSED], warmup=4, steps=12, profile=3, vs="lora"),
        case("lora_foreach_adamw", "project", optim="adamw", warmup=4, steps=12, vs="lora"),
        case(
            "lora_fused_adamw_cudagraphs",
            "project",
            optim="adamw",
            extra=[FUSED],
            compile_mode="reduce-overhead",
            warmup=6,
            steps=12,
            profile=2,
            vs="lora",
        ),
        case("lora_ckpt", "project", ckpt=True, warmup=4, steps=12),
        case(
            "lora_ckpt_fused_adamw",
            "project",
            ckpt=True,
            optim="adamw",
            extra=[FUSED],
            warmup=4,
            steps=12,
            vs="lora_ckpt",
        ),
        case("qlora_ckpt", "project", quant="nf4", random_nf4=True, ckpt=True, warmup=4, steps=12, profile=3),
        case(
            "qlora_ckpt_fused_adamw",
            "project",
            quant="nf4",
            random_nf4=True,
            ckpt=True,
            optim="adamw",
            extra=[FUSED],
            warmup=4,
            steps=12,
            profile=3,
            vs="qlora_ckpt",
        ),
    ],
    # torch's fused AdamW on both sides (bitsandbytes' paged AdamW took 12.8-17.2 ms of device time a step in the mfu
    # matrix, torch's fused 0.8 ms): the peer's forms with it against this project's, and where bf16 LoRA's step idles
    "optim": [
        case("matmul", "matmul"),
        case("prepare", "prepare"),
        case("lora_fused_adamw_profiled", "project", optim="adamw", extra=[FUSED], warmup=4, steps=12, profile=3),
        case(
            "qlora_ckpt_fused_adamw_profiled",
            "project",
            quant="nf4",
            ckpt=True,
            optim="adamw",
            extra=[FUSED],
            warmup=4,
            steps=12,
            profile=3,
        ),
        *[
            c
            for name, kw in (
                ("lora_ckpt", {"ckpt": True}),
                ("qlora_ckpt", {"quant": "nf4", "ckpt": True}),
                ("lora", {}),
            )
            for c in (
                case(f"peer_{name}_fused_adamw", "peer", optim="adamw_torch_fused", **kw),
                case(f"peer_{name}_liger_fused_adamw", "peer", optim="adamw_torch_fused", liger=True, **kw),
                case(
                    f"{name}_fused_adamw",
                    "project",
                    optim="adamw",
                    extra=[FUSED],
                    **kw,
                    vs=[f"peer_{name}_fused_adamw", f"peer_{name}_liger_fused_adamw"],
                ),
                # optim=adamw as it stands (adamw_torch: torch's foreach implementation)
                case(
                    f"{name}_adamw",
                    "project",
                    optim="adamw",
                    **kw,
                    vs=[f"peer_{name}_fused_adamw", f"peer_{name}_liger_fused_adamw"],
                ),
            )
        ],
    ],
    # Inductor's reduction block sizes chosen by rule (the project's default since exact resume needed it)
    # against timed on the device (TORCHINDUCTOR_DETERMINISTIC=0, torch's own default), alternated twice
    "determinism": [
        case("matmul", "matmul"),
        case("prepare", "prepare", save_7b=False),
        *[
            case(f"{name}_{how}_{rep}", "project", optim="adamw", extra=[FUSED], warmup=4, steps=12, env=env, **kw)
            for rep in (1, 2)
            for name, kw in (("lora", {}), ("qlora_ckpt", dict(quant="nf4", random_nf4=True, ckpt=True)))
            for how, env in (("rule", {}), ("timed", {"TORCHINDUCTOR_DETERMINISTIC": "0"}))
        ],
    ],
    # train.fused_projections (q/k/v and gate/up each one matmul, the adapters on their slices) against the separate
    # projections, bf16 LoRA as the optim matrix's lora_fused_adamw, alternated twice so the noise shows; then both
    # profiled (kernels a step, where the time goes)
    "fused": [
        case("matmul", "matmul"),
        case("prepare", "prepare", save_7b=False),
        *[
            case(
                f"{name}_{rep}",
                "project",
                optim="adamw",
                extra=[FUSED, *fused],
                vs=f"lora_fused_adamw_{rep}" if fused else None,
            )
            for rep in (1, 2)
            for name, fused in (("lora_fused_adamw", []), ("lora_fused_projections_fused_adamw", [FUSED_PROJECTIONS]))
        ],
        case("lora_fused_adamw_profiled", "project", optim="adamw", extra=[FUSED], warmup=4, steps=12, profile=3),
        case(
            "lora_fused_projections_fused_adamw_profiled",
            "project",
            optim="adamw",
            extra=[FUSED, FUSED_PROJECTIONS],
            warmup=4,
            steps=12,
            profile=3,
            vs="lora_fused_adamw_profiled",
        ),
    ],
    # sharded options at world size 1 as they now run, bf16 LoRA on the 7B, torch AdamW: fsdp2 (a copy on one
    # process keeps its frozen base whole) against ddp in three alternated pairs, then ZeRO-3 with DeepSpeed's
    # DeepCompile (compile.deepcompile in the user's DeepSpeed JSON) against ZeRO-3 as it runs by default
    "ws1": [
        case("prepare", "prepare", save_7b=False),
        *[
            case(
                f"{d}_ws1_{rep}",
                "project",
                torchrun=True,
                optim="adamw",
                warmup=4,
                steps=20,
                distributed=d,
                vs=None if d == "ddp" else f"ddp_ws1_{rep}",
            )
            for rep in (1, 2, 3)
            for d in ("ddp", "fsdp2")
        ],
        *[
            case(name, "project", torchrun=True, optim="adamw", warmup=4, steps=12, distributed="zero3", **kw)
            for name, kw in (
                ("zero3_ws1", {"vs": "ddp_ws1_1"}),
                ("zero3_deepcompile_ws1", {"ds_json": {"compile": {"deepcompile": True}}, "vs": "zero3_ws1"}),
            )
        ],
    ],
    # train.grad_ckpt as a budget and train.chunked_loss, bf16 LoRA on one GPU, against the peer's two forms with
    # torch's fused AdamW in the same call: full ckpt with the plain and the chunked loss, then fewer layers
    # recomputed (the first N of 32: the rest keep their activations) to see which still fit under the peer's
    # peak, auto (what the GPU's free memory holds), no ckpt with either loss
    "budget": [
        case("matmul", "matmul"),
        case("prepare", "prepare", save_7b=False),
        case("peer_lora_ckpt_fused_adamw", "peer", optim="adamw_torch_fused", ckpt=True),
        case("peer_lora_ckpt_liger_fused_adamw", "peer", optim="adamw_torch_fused", ckpt=True, liger=True),
        *[
            case(
                name,
                "project",
                optim="adamw",
                extra=[FUSED],
                warmup=3,
                steps=10,
                vs=["peer_lora_ckpt_fused_adamw", "peer_lora_ckpt_liger_fused_adamw"],
                **kw,
            )
            for name, kw in (
                ("lora_ckpt_plain_loss", dict(ckpt=True, chunked=False)),
                ("lora_ckpt_chunked_loss", dict(ckpt=True, chunked=True)),
                ("lora_ckpt28_chunked_loss", dict(ckpt=28, chunked=True)),
                ("lora_ckpt24_chunked_loss", dict(ckpt=24, chunked=True)),
                ("lora_ckpt16_chunked_loss", dict(ckpt=16, chunked=True)),
                ("lora_ckpt_auto", dict(ckpt="auto")),
                ("lora_plain_loss", dict(chunked=False)),
                ("lora_chunked_loss", dict(chunked=True)),
            )
        ],
    ],
    # the same for QLoRA nf4 (the 7B saved and loaded back through bitsandbytes), against the peer's QLoRA forms
    "budget_qlora": [
        case("matmul", "matmul"),
        case("prepare", "prepare"),
        case("peer_qlora_ckpt_fused_adamw", "peer", quant="nf4", optim="adamw_torch_fused", ckpt=True),
        case(
            "peer_qlora_ckpt_liger_fused_adamw", "peer", quant="nf4", optim="adamw_torch_fused", ckpt=True, liger=True
        ),
        *[
            case(
                name,
                "project",
                quant="nf4",
                optim="adamw",
                extra=[FUSED],
                warmup=3,
                steps=10,
                vs=["peer_qlora_ckpt_fused_adamw", "peer_qlora_ckpt_liger_fused_adamw"],
                **kw,
            )
            for name, kw in (
                ("qlora_ckpt_plain_loss", dict(ckpt=True, chunked=False)),
                ("qlora_ckpt_chunked_loss", dict(ckpt=True, chunked=True)),
                ("qlora_ckpt30_chunked_loss", dict(ckpt=30, chunked=True)),
                ("qlora_ckpt28_chunked_loss", dict(ckpt=28, chunked=True)),
                ("qlora_ckpt24_chunked_loss", dict(ckpt=24, chunked=True)),
                ("qlora_ckpt16_chunked_loss", dict(ckpt=16, chunked=True)),
                ("qlora_ckpt_auto", dict(ckpt="auto")),
            )
        ],
    ],
    # one truth: the same cases through the bench's in-process Trainer and through `lora-launch` itself (its
    # metrics.jsonl, and the rows' arrival), torch's fused AdamW, bf16 LoRA, LoRA + ckpt and QLoRA + ckpt
    "agree": [
        case("matmul", "matmul"),
        case("prepare", "prepare"),
        *[
            c
            for name, kw in (
                ("lora", {}),
                ("lora_ckpt", {"ckpt": True}),
                ("qlora_ckpt", {"quant": "nf4", "ckpt": True}),
            )
            for c in (
                case(f"{name}_fused_adamw", "project", optim="adamw", extra=[FUSED], **kw),
                case(f"{name}_fused_adamw_cli", "cli", optim="adamw", extra=[FUSED], vs=f"{name}_fused_adamw", **kw),
            )
        ],
    ],
    # a CPU-free check that the plumbing runs: one small case of each kind
    "smoke": [case("matmul", "matmul"), case("prepare", "prepare"), case("lora", "project", warmup=2, steps=3)],
}


def card() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"


def versions() -> dict:
    """The packages every figure depends on, as installed where it ran."""
    from importlib import metadata

    out = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "trl", "liger-kernel"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def command(spec: dict) -> list[str]:
    """One process, or torchrun (`"torchrun": true` also at 1); the peer above 1 GPU as its users start it."""
    n = spec.get("nproc", 1)
    if spec["kind"] == "peer" and n > 1:
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            f"--num_processes={n}",
            "--num_machines=1",
            "--mixed_precision=bf16",
            "--dynamo_backend=no",
            f"--main_process_port={free_port()}",
            "-m",
            "bench.case",
            json.dumps(spec),
        ]
    if n == 1 and not spec.get("torchrun"):
        return [sys.executable, "-m", "bench.case", json.dumps(spec)]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        "-m",
        "bench.case",
        json.dumps(spec),
    ]


def run_case(spec: dict, timeout: float, log, devices: str | None = None) -> dict:
    """Run one case in its own process(es) on `devices` (CUDA_VISIBLE_DEVICES; default GPU 0 or all)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **spec.get("env", {}))
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    elif spec.get("nproc", 1) == 1:
        env["CUDA_VISIBLE_DEVICES"] = "0"  # SFTTrainer refuses several visible GPUs in one process
    t0 = time.perf_counter()
    log.write(f"\n===== {spec['name']} {json.dumps(spec)}\n")
    log.flush()
    try:
        proc = subprocess.run(command(spec), env=env, capture_output=True, text=True, timeout=timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"), "timeout"
    log.write(out[-6000:])
    log.flush()
    results = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    row = results[-1] if results else {"name": spec["name"], "error": f"rc={rc}: " + _last_error(out)}
    row["wall_s"] = time.perf_counter() - t0
    return row


def _last_error(out: str) -> str:
    lines = [line for line in out.strip().splitlines() if line.strip()]
    errs = [line for line in lines if "Error" in line or "error:" in line]
    return (errs[-1] if errs else (lines[-1] if lines else "no output"))[:300]


def add_mfu(row: dict, spec: dict, rate: float | None) -> None:
    """MFU counts the model's FLOPs per token (4N + attention for a frozen base: what a step must do); HFU adds
    what grad ckpt recomputes (6N + attention). Without ckpt the two are equal."""
    if "tokens_per_s" not in row or not rate:
        return
    seq = spec.get("seq", 512)
    # attention spans a token's own sample (packed rows included): the project measures that; the peer's
    # figure falls back to the real tokens per sample
    per_sample = (
        seq
        if spec.get("lengths", "full") == "full"
        else row.get("attention_context", row.get("tokens_per_step", seq) / spec.get("micro", 4))
    )
    arch, targets = row.get("arch") or LLAMA2_7B, ALL if spec.get("all_linear") else QV
    model = flops_per_token(arch, min(per_sample, seq), False, 64, targets)
    # the share of the layers recomputed: as the case decided it (train.grad_ckpt's budgets), else from the spec
    recomputed = (
        row["checkpointed_layers"] / arch["num_hidden_layers"]
        if "checkpointed_layers" in row
        else bool(spec.get("ckpt"))
    )
    hardware = flops_per_token(arch, min(per_sample, seq), recomputed, 64, targets)
    row.update(
        flops_per_token=model,
        hardware_flops_per_token=hardware,
        mfu=row["tokens_per_s"] * model / (rate * 1e12),
        hfu=row["tokens_per_s"] * hardware / (rate * 1e12),
    )


def table(rows: list[dict]) -> str:
    by_name = {r["name"]: r for r in rows}
    lines = [
        f"{'case':28} {'tok/s/GPU':>10} {'x peer':>7} {'MFU':>6} {'HFU':>6} {'peak GiB':>9} {'est GiB':>8} "
        f"{'step cv':>8} {'ckpt':>5} {'chunks':>6}"
    ]
    for r in rows:
        if "tokens_per_s" not in r:
            extra = r.get("error") or {
                k: round(v, 2) if isinstance(v, float) else v
                for k, v in r.items()
                if k not in ("name", "spec", "card", "date", "wall_s")
            }
            lines.append(f"{r['name']:28} {str(extra)[:110]}")
            continue
        # the peer is the fastest of the cases named in "vs" (the peer's forms measured in the same call)
        vs = r["spec"].get("vs") or []
        peers = [by_name[v] for v in ([vs] if isinstance(vs, str) else vs) if "tokens_per_s" in by_name.get(v, {})]
        peer = max(peers, key=lambda p: p["tokens_per_s"], default={})
        ratio = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}" if peer else "-"
        lines.append(
            f"{r['name']:28} {r['tokens_per_s']:10.0f} {ratio:>7} {r.get('mfu', 0):6.1%} {r.get('hfu', 0):6.1%} "
            f"{r['peak_gib']:9.1f} {r.get('estimate_gib', float('nan')):8.1f} {r['step_time_cv']:8.3f} "
            f"{r.get('checkpointed_layers', '-'):>5} {r.get('loss_chunks', '-'):>6}"
        )
    return "\n".join(lines)


def profile_table(rows: list[dict]) -> str:
    """The profiled cases: device busy share, kernels per step and the three costliest kernels."""
    lines = []
    for r in rows:
        if "kernels_per_step" not in r:
            continue
        busy = r.get("device_busy")
        top = "; ".join(f"{k['name'][:40]} {k['ms_per_step']:.1f} ms x{k['calls_per_step']:.0f}" for k in r["top"][:3])
        host = "; ".join(
            f"{k['name'][:40]} {k['ms_per_step']:.1f} ms x{k['calls_per_step']:.0f}" for k in r.get("host_top", [])[:4]
        )
        lines.append(
            f"{r['name']:28} busy {'-' if busy is None else f'{busy:.0%}':>4}  "
            f"kernels/step {r['kernels_per_step']:7.0f}  {top}"
        )
        if host:
            lines.append(f"{'':28} host: {host}")
        if r.get("kinds_ms_per_step"):
            kinds = sorted(r["kinds_ms_per_step"].items(), key=lambda kv: -kv[1])
            lines.append(
                f"{'':28} device ms/step: "
                + ", ".join(f"{k} {v:.1f}" for k, v in kinds)
                + f" (step {r['step_time_median'] * 1e3:.1f})"
            )
        idle = r.get("idle") or {}
        if idle.get("steps"):
            st = idle["steps"]
            bound = [x["boundary_ms"] for x in st if x["boundary_ms"] is not None]
            lines.append(
                f"{'':28} idle ms/step: at the step boundary "
                f"{sum(bound) / max(len(bound), 1):.1f}, inside {sum(x['inside_ms'] for x in st) / len(st):.1f} "
                f"(gaps < 50 us: {idle['small_gaps_ms']:.1f}); longest: "
                + ", ".join(f"{g['ms']:.2f} at {g['at_ms']:.0f}/{g['of_ms']:.0f}" for g in idle["longest"][:6])
            )
    return "\n".join(["", "# profile (3 steps under torch.profiler)", *lines]) if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--matrix", choices=sorted(MATRICES), default="single")
    parser.add_argument("--only", nargs="*", help="run only these case names (plus matmul/prepare)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--budget", type=float, default=560.0, help="seconds for the whole matrix")
    parser.add_argument("--case-timeout", type=float, default=240.0)
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = [
        s
        for s in MATRICES[args.matrix]
        if not args.only or s["name"] in args.only or s["kind"] in ("matmul", "prepare")
    ]
    meta = {"card": card(), "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"), "versions": versions()}
    start, rows, rate = time.perf_counter(), [], None
    with open(out / "log.txt", "a") as log, open(out / "results.jsonl", "a") as results:
        for spec in specs:
            left = args.budget - (time.perf_counter() - start)
            if left < 30:
                row = {"name": spec["name"], "error": "not run: matrix time budget spent"}
            else:
                row = run_case(spec, min(args.case_timeout, left), log)
            rate = rate or row.get("tflops_square_8192")
            add_mfu(row, spec, rate)
            row.update(spec=spec, matmul_tflops=rate, **meta)
            rows.append(row)
            results.write(json.dumps(row) + "\n")
            results.flush()
            print(
                f"[{time.perf_counter() - start:6.0f}s] {spec['name']}: "
                f"{row.get('tokens_per_s', row.get('error', ''))}",
                flush=True,
            )
    text = (
        f"{meta['card']}, {meta['date']}, bf16 matmul {rate and round(rate)} TFLOP/s\n"
        f"{' '.join(f'{k} {v}' for k, v in meta['versions'].items() if v)}\n" + table(rows) + profile_table(rows)
    )
    (out / "table.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
