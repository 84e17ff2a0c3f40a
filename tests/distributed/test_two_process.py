"""Tier 3: real 2-process CPU runs (gloo) through the real entry points."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from support.cli import lora_launch, read_jsonl, subprocess_env

pytestmark = pytest.mark.slow


def _eval_loss_from_saved_adapter(run_dir: Path, base_dir: Path) -> float:
    """Eval loss on the run's validation split, recomputed from the saved adapter with plain PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_launch.conf.schema import load
    from lora_launch.data.samples import build_splits
    from lora_launch.train.data import collate
    from lora_launch.train.evaluate import token_loss_sum

    cfg = load(str(run_dir / "config.yaml"))
    tok = AutoTokenizer.from_pretrained(run_dir / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run_dir / "adapter").eval()
    val = build_splits(cfg, tok).val
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(val), 4):
            loss, n = token_loss_sum(model, collate(val[i : i + 4], tok.pad_token_id))
            total, count = total + loss.item(), count + n
    return total / count


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_split_data_sync_gradients_and_save_a_loadable_adapter(tiny, tmp_path, strategy):
    run = tmp_path / "run"
    result = lora_launch(
        *tiny["overrides"],
        f"run.dir={run}",
        "launcher.num_processes=2",
        f"distributed={strategy}",
        "train.max_steps=4",
        "train.micro_batch_size=4",
        "eval.every_steps=2",
        "optim.lr=1e-3",
        "logging.rank_audit=true",
        "logging.wandb.mode=offline",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    out = result.stdout + result.stderr
    # accelerate set up both processes (not one each) and the strategy asked for
    assert "(4 x 1 accum x 2 processes)" in out and f"2 processes on the CPU, {strategy.upper()}" in out

    ranks = [read_jsonl(run / "ranks" / f"rank{r}.jsonl") for r in (0, 1)]
    assert [row["step"] for row in ranks[0]] == [row["step"] for row in ranks[1]] == [1, 2, 3, 4]
    for a, b in zip(*ranks):
        assert len(a["samples"]) == len(b["samples"]) == 4
        assert not set(a["samples"]) & set(b["samples"]), "both ranks trained on the same samples"
        if strategy == "ddp":
            assert a["trainable_sha256"] == b["trainable_sha256"], f"ranks diverged at step {a['step']}"
        else:  # each rank holds (and digests) only its shard of the adapters
            assert a["trainable_sha256"] != b["trainable_sha256"], f"the adapters are not sharded at step {a['step']}"
    assert ranks[0][0]["trainable_sha256"] != ranks[0][-1]["trainable_sha256"], "weights never changed"

    rows = read_jsonl(run / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(r["tokens"] > 0 for r in train_rows)
    lrs = [r["lr"] for r in train_rows]  # model=tiny warms up over 20 steps from 0
    assert lrs == sorted(lrs) and lrs[-1] > 0
    assert [r["step"] for r in eval_rows] == [0, 2, 4]

    logged = eval_rows[-1]["eval_loss"]
    assert _eval_loss_from_saved_adapter(run, tiny["model"]) == pytest.approx(logged, rel=1e-5)

    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "no wandb offline run was written"


def test_accelerate_launch_module_gives_one_run_dir_for_all_ranks(tiny, tmp_path):
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29533",
        "-m",
        "lora_launch.train",
        *tiny["overrides"],
        "train.max_steps=2",
        "sample.max_new_tokens=0",
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1, run_dirs
    assert "x 2 processes" in result.stdout + result.stderr
    assert [r["step"] for r in read_jsonl(run_dirs[0] / "metrics.jsonl") if "loss" in r] == [1, 2]


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_qlora_sharded_trains_after_the_step0_eval(tiny, tmp_path, strategy):
    """nf4 base (stored as bf16, which ZeRO-3 and FSDP2 shard) + LoRA with 2 processes: gradients flow (the
    eval at step 0 used to repack the 4-bit weights into an inference layout with no autograd, zeroing every
    gradient)."""
    run = tmp_path / "run"
    result = lora_launch(
        *tiny["overrides"],
        f"run.dir={run}",
        "launcher.num_processes=2",
        "quant=nf4",
        f"distributed={strategy}",
        "quant.storage_dtype=bfloat16",
        "train.max_steps=3",
        "optim.lr=1e-3",
        "sample.max_new_tokens=0",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = read_jsonl(run / "metrics.jsonl")
    assert all(r["grad_norm"] > 0 for r in rows if "loss" in r)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert evals[0] != evals[-1]


def test_qlora_under_ddp_trains_alike_through_either_4bit_kernel(tiny, tmp_path):
    """quant=nf4 with 2 DDP processes: the default (quant.kernel=auto: torch operations here) and bitsandbytes'
    matmul_4bit give the same losses and adapters, from the user's own directory."""
    from safetensors.torch import load_file

    losses = {}
    for kernel in ("auto", "bitsandbytes"):
        run = tmp_path / kernel
        result = lora_launch(
            *tiny["overrides"],
            f"run.dir={run}",
            "launcher.num_processes=2",
            "quant=nf4",
            f"quant.kernel={kernel}",
            "train.max_steps=4",
            "optim.lr=1e-3",
            "sample.max_new_tokens=2",
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        said = "torch (quant.kernel=auto)" if kernel == "auto" else "bitsandbytes (quant.kernel=bitsandbytes)"
        assert f"QLoRA: the 4-bit layers' matmul through {said}" in result.stdout + result.stderr
        losses[kernel] = [(r["step"], r.get("loss", r.get("eval_loss"))) for r in read_jsonl(run / "metrics.jsonl")]
    assert [s for s, _ in losses["auto"]] == [s for s, _ in losses["bitsandbytes"]] and len(losses["auto"]) > 4
    assert [v for _, v in losses["auto"]] == pytest.approx([v for _, v in losses["bitsandbytes"]], rel=1e-4)
    assert losses["auto"][-1][1] < losses["auto"][0][1]
    ours, theirs = (load_file(tmp_path / k / "adapter" / "adapter_model.safetensors") for k in ("auto", "bitsandbytes"))
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-3, atol=1e-5)


def test_fsdp2_in_bfloat16_trains_as_ddp_does(tiny, tmp_path):
    """bf16 mixed precision, the GPU default, on CPU: bf16 base weights, fp32 adapters, compute under autocast.
    FSDP2 runs the same arithmetic as DDP; only the gradient norm's summation order differs."""
    losses = {}
    for strategy in ("ddp", "fsdp2"):
        run = tmp_path / strategy
        result = lora_launch(
            *tiny["overrides"],
            f"run.dir={run}",
            "launcher.num_processes=2",
            f"distributed={strategy}",
            "train.precision=bfloat16",
            "train.max_steps=4",
            "optim.lr=1e-3",
            "sample.max_new_tokens=0",
        )
        assert result.returncode == 0, result.stderr[-4000:]
        assert "bfloat16" in (run / "config.yaml").read_text()
        losses[strategy] = [(r["step"], r.get("loss", r.get("eval_loss"))) for r in read_jsonl(run / "metrics.jsonl")]
    assert [s for s, _ in losses["fsdp2"]] == [s for s, _ in losses["ddp"]]
    assert [v for _, v in losses["fsdp2"]] == pytest.approx([v for _, v in losses["ddp"]], rel=1e-3)


def test_fsdp2_ranks_other_than_0_never_hold_the_whole_base(tiny, tmp_path):
    """Under FSDP2 rank 0 alone builds the base; rank 1 builds its shape on the meta device and receives its
    shards, so once the model is in place its peak host memory is about half a model below that of DDP's rank 1,
    which holds it all. A random 32-layer base of ~140M float32 parameters (~530 MiB) makes the difference
    plain. (Training itself is not compared: FSDP2's gathers on the CPU leave the host allocator larger.)"""
    arch = [
        "model.random_init=true",
        "model.path=null",
        "+model.arch.model_type=llama",
        "+model.arch.vocab_size=4096",
        "+model.arch.hidden_size=512",
        "+model.arch.intermediate_size=2048",
        "+model.arch.num_hidden_layers=32",
        "+model.arch.num_attention_heads=8",
        "+model.arch.num_key_value_heads=8",
        "+model.arch.max_position_embeddings=256",
    ]
    model_mib = (32 * (4 * 512 * 512 + 3 * 512 * 2048) + 2 * 4096 * 512) * 4 / 2**20
    peaks, losses = {}, {}
    (tmp_path / "train.py").write_text("open('USER_TRAIN_RAN', 'w').close()\n")  # a user's own, never run
    for strategy in ("ddp", "fsdp2"):
        run = tmp_path / strategy
        result = lora_launch(
            *tiny["overrides"],
            *arch,
            f"model.tokenizer={tiny['model']}",
            f"run.dir={run}",
            "launcher.num_processes=2",
            f"distributed={strategy}",
            "train.max_steps=1",
            "data.val_split=0",  # no evaluation: what is measured is the start
            "logging.rank_audit=true",
            "sample.max_new_tokens=0",
            cwd=tmp_path,
        )  # from a directory of the user's, not the repository
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        peaks[strategy] = [read_jsonl(run / "ranks" / f"rank{r}.jsonl")[-1]["host_peak_at_start_mib"] for r in (0, 1)]
        losses[strategy] = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert not (tmp_path / "USER_TRAIN_RAN").exists()
    print(f"host peak MiB (rank 0, rank 1): {peaks}; the base is {model_mib:.0f} MiB")
    assert peaks["fsdp2"][1] < peaks["ddp"][1] - 0.35 * model_mib, peaks
    assert peaks["fsdp2"][1] < peaks["fsdp2"][0] - 0.6 * model_mib, peaks
    # the same weights reached the shards: the same first loss as DDP's (later ones differ in summation order)
    assert losses["fsdp2"][0] == pytest.approx(losses["ddp"][0], rel=1e-6)


def test_zero3_with_grad_ckpt_gathers_whole_layers_and_trains_as_ddp_does(tiny, tmp_path):
    """Under zero3 with grad ckpt DeepSpeed gathers each decoder layer at once (its leaf modules): the log says
    so, and the losses are DDP's (with grad ckpt too) but for summation order. (A leaf_module in the user's own
    DeepSpeed JSON is theirs: test_grad_ckpt.py.) With the first layer alone checkpointed (train.grad_ckpt=1),
    under zero3 (only it gathered whole) and fsdp2, the losses are DDP's too; every run here computes the loss
    in chunks (train.chunked_loss=auto with grad ckpt)."""
    common = [
        *tiny["overrides"],
        "launcher.num_processes=2",
        "train.grad_ckpt=true",
        "train.max_steps=4",
        "optim.lr=1e-3",
        "sample.max_new_tokens=0",
    ]
    losses, logs = {}, {}
    (tmp_path / "train.py").write_text("open('USER_TRAIN_RAN', 'w').close()\n")  # a user's own, never run
    for name, extra in (
        ("ddp", ["distributed=ddp"]),
        ("zero3", ["distributed=zero3"]),
        ("zero3_first", ["distributed=zero3", "train.grad_ckpt=1"]),
        ("fsdp2_first", ["distributed=fsdp2", "train.grad_ckpt=1"]),
    ):
        run = tmp_path / name
        result = lora_launch(*common, f"run.dir={run}", *extra, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-4000:]
        logs[name] = result.stdout + result.stderr
        losses[name] = [r.get("loss", r.get("eval_loss")) for r in read_jsonl(run / "metrics.jsonl")]
    assert not (tmp_path / "USER_TRAIN_RAN").exists()
    assert "ZeRO-3: each LlamaDecoderLayer gathered whole" in logs["zero3"]
    assert "gathered whole" not in logs["ddp"]
    assert losses["zero3"] == pytest.approx(losses["ddp"], rel=1e-4)
    assert "loss in 5 chunks of tokens" in logs["ddp"]
    for name in ("zero3_first", "fsdp2_first"):
        assert "grad ckpt: the first 1 of 2 decoder layers recompute" in logs[name]
        assert losses[name] == pytest.approx(losses["ddp"], rel=1e-4), name


def test_fsdp2_shard_groups_train_as_one_layer_groups_do(tiny, tmp_path):
    """Both of the tiny model's layers in one shard group (distributed.layers_per_group=auto) against one layer a
    group with explicit prefetch, and one layer a group with the last kept gathered from forward to backward
    (distributed.keep_gathered=1), evaluated and checkpointed between steps: two processes started from the
    user's own directory, the log naming the groups and what was kept, the same losses, and the kept run's
    checkpoint and adapter the same as the others'."""
    from support.resume import launch

    losses, logs = {}, {}
    for name, extra in (
        ("one", ["distributed.layers_per_group=1", "distributed.prefetch=1"]),
        ("auto", []),
        ("kept", ["distributed.layers_per_group=1", "distributed.keep_gathered=1"]),
    ):
        run = tmp_path / name
        rc, log = launch(
            run,
            [
                *tiny["overrides"],
                "launcher.num_processes=2",
                "distributed=fsdp2",
                "train.max_steps=4",
                "optim.lr=1e-3",
                "sample.max_new_tokens=2",
                "eval.every_steps=2",
                "checkpoint.every_steps=2",
                *extra,
            ],
        )
        assert rc == 0, log[-3000:]
        logs[name] = log
        losses[name] = [(r["step"], r.get("loss", r.get("eval_loss"))) for r in read_jsonl(run / "metrics.jsonl")]
    assert "FSDP2: 2 decoder layers, 2 shard groups of up to 1 (distributed.layers_per_group=1)" in logs["one"]
    assert "FSDP2: 2 decoder layers, 1 shard group of up to 2 (distributed.layers_per_group=auto)" in logs["auto"]
    # auto on CPUs: nothing kept (no GPU memory to judge by), said once, after the first step
    assert (
        logs["auto"].count(
            "FSDP2: the last 0 of 1 shard groups stay gathered from forward to backward "
            "(distributed.keep_gathered=auto: no GPU memory to hold them)"
        )
        == 1
    )
    assert "stay gathered" not in logs["kept"]  # a number is applied at sharding, not decided
    for name in ("auto", "kept"):
        assert [s for s, _ in losses[name]] == [s for s, _ in losses["one"]] and len(losses["one"]) > 4
        assert [v for _, v in losses[name]] == pytest.approx([v for _, v in losses["one"]], rel=1e-5)
    from safetensors.torch import load_file

    for step in ("step-2", "step-4"):  # saved after an evaluation left the kept group gathered
        ckpts = {
            n: sorted(
                p for p in (tmp_path / n / "checkpoints" / step).rglob("*.safetensors") if not p.name.startswith("rng-")
            )
            for n in ("one", "kept")
        }  # RNG: each process's own
        assert ckpts["kept"] and [p.name for p in ckpts["kept"]] == [p.name for p in ckpts["one"]]
        for a, b in zip(ckpts["one"], ckpts["kept"]):
            one, kept = load_file(a), load_file(b)
            assert one.keys() == kept.keys()
            for k in one:
                torch.testing.assert_close(kept[k], one[k], rtol=1e-4, atol=1e-6)
