"""Tier 2: pure pieces, no processes."""

from __future__ import annotations

import pytest
import torch

from lora_launch.conf.compose import compose
from lora_launch.conf.schema import redact
from lora_launch.data.samples import IGNORE, tokenize
from lora_launch.launcher.accelerate_config import accelerate_config
from lora_launch.run.plan import RunPlan
from lora_launch.strategies import strategy_for
from lora_launch.train.data import SampleStream, collate, micro_batch_positions


@pytest.mark.parametrize("micro,accum,world", [(1, 1, 1), (2, 3, 2), (4, 2, 4), (3, 1, 2)])
def test_one_step_covers_each_position_once(micro, accum, world):
    start = 17
    seen = [
        p for r in range(world) for k in range(accum) for p in micro_batch_positions(start, micro, accum, world, r, k)
    ]
    assert sorted(seen) == list(range(start, start + micro * accum * world))


def test_ranks_get_disjoint_positions():
    a = set(micro_batch_positions(0, 4, 2, 2, 0, 0)) | set(micro_batch_positions(0, 4, 2, 2, 0, 1))
    b = set(micro_batch_positions(0, 4, 2, 2, 1, 0)) | set(micro_batch_positions(0, 4, 2, 2, 1, 1))
    assert not a & b


def test_stream_is_a_fresh_permutation_each_epoch_and_deterministic():
    s, t = SampleStream(10, seed=3), SampleStream(10, seed=3)
    epoch0 = [s.index(p) for p in range(10)]
    epoch1 = [s.index(p) for p in range(10, 20)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    # random access (as after a resume) gives the same answer as sequential reading
    assert [t.index(p) for p in range(19, 9, -1)] == epoch1[::-1]
    assert [SampleStream(10, seed=4).index(p) for p in range(10)] != epoch0


def test_collate_pads_and_masks():
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [5], "labels": [5]}], pad_id=0, multiple_of=4
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE], [5, IGNORE, IGNORE, IGNORE]]


class _Tok:
    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [10 + ord(c) % 50 for c in text]}


def test_prompt_is_masked_and_truncated():
    s = tokenize(_Tok(), "ab", "cd", seq_len=100, train_on_prompt=False)
    assert s["input_ids"][0] == 1 and s["input_ids"][-1] == 2 and len(s["input_ids"]) == 6
    assert s["labels"][:3] == [IGNORE] * 3 and s["labels"][3:] == s["input_ids"][3:]
    assert tokenize(_Tok(), "ab", "cd", seq_len=100, train_on_prompt=True)["labels"] == s["input_ids"]
    assert len(tokenize(_Tok(), "ab", "cdefgh", seq_len=4, train_on_prompt=False)["input_ids"]) == 4


@pytest.mark.parametrize("dist,stage", [("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_deepspeed_json_is_derived_from_the_config(dist, stage):
    cfg = compose([f"distributed={dist}", "train.micro_batch_size=3", "train.grad_accum=5", "optim.max_grad_norm=0.3"])
    plan = RunPlan.from_config(cfg, 2, 2, on_gpu=False)
    ds = strategy_for(cfg).deepspeed_config(cfg, plan)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 5 * 4
    assert ds["gradient_clipping"] == 0.3
    assert ("offload_optimizer" in ds["zero_optimization"]) == (dist == "zero3_offload")
    acc = accelerate_config(cfg, plan, "/x/ds.json")
    assert acc["distributed_type"] == "DEEPSPEED" and acc["num_processes"] == 4
    assert acc["deepspeed_config"]["deepspeed_config_file"] == "/x/ds.json"


def test_accelerate_config_for_ddp():
    cfg = compose([])
    assert accelerate_config(cfg, RunPlan.from_config(cfg, 1, 1, on_gpu=False))["distributed_type"] == "NO"
    assert accelerate_config(cfg, RunPlan.from_config(cfg, 1, 2, on_gpu=False))["distributed_type"] == "MULTI_GPU"


def test_secrets_never_reach_files():
    tree = {"logging": {"wandb": {"api_key": "abc"}}, "hub": {"token": "hf_x"}, "sample": {"max_new_tokens": 5}}
    out = redact(tree)
    assert out["logging"]["wandb"]["api_key"] == "<redacted>" and out["hub"]["token"] == "<redacted>"
    assert out["sample"]["max_new_tokens"] == 5


def test_random_init_with_nf4_is_quantised_and_trains():
    """model=*_random quant=nf4 gives 4-bit linear layers (it used to train unquantised without a word);
    LoRA wraps them, and a backward pass reaches the adapters only."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from lora_launch.train.model import apply_lora, load_base_model

    cfg = compose(
        [
            "model=llama2_7b_random",
            "quant=nf4",
            "model.arch.hidden_size=64",
            "model.arch.vocab_size=300",
            "model.arch.intermediate_size=128",
            "model.arch.num_hidden_layers=2",
            "model.arch.num_attention_heads=4",
            "model.arch.num_key_value_heads=4",
        ]
    )
    model = load_base_model(cfg, torch.device("cpu"))
    linear4 = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * 7 and not any("lm_head" in n for n in linear4)  # q k v o gate up down per layer
    assert not any(p.device.type == "meta" for p in model.parameters())
    model = apply_lora(cfg, model)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert abs(loss.item() - torch.log(torch.tensor(300.0)).item()) < 0.5  # random weights: about uniform
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)


@pytest.mark.parametrize("tied", [True, False])
def test_random_init_drawn_elsewhere_is_a_whole_model_where_it_is_kept(tied, monkeypatch):
    """FSDP2's rank 0 keeps a random_init model on its CPU but draws it on its GPU, one tensor at a time
    (`draw`; drawn on the CPU here): every parameter real and frozen where it is kept, matrices
    normal(0, initializer_range), norm scales 1, rotary buffers real, the embeddings tied when the config ties
    them, and the model scores random tokens about uniformly."""
    from lora_launch.train import model as model_module
    from lora_launch.train.model import load_base_model

    cfg = compose(
        [
            "model=llama2_7b_random",
            "model.arch.hidden_size=64",
            "model.arch.vocab_size=300",
            "model.arch.intermediate_size=128",
            "model.arch.num_hidden_layers=2",
            "model.arch.num_attention_heads=4",
            "model.arch.num_key_value_heads=4",
            f"+model.arch.tie_word_embeddings={str(tied).lower()}",
        ]
    )
    asked = []
    drawn_on = model_module._random_drawn_on

    def on_cpu(config, dtype, draw, keep, common):  # this machine has no GPU to draw on: the CPU draws
        asked.append((draw, keep))
        return drawn_on(config, dtype, torch.device("cpu"), keep, common)

    monkeypatch.setattr(model_module, "_random_drawn_on", on_cpu)
    model = load_base_model(cfg, torch.device("cpu"), draw=torch.device("cuda", 0))
    assert asked == [(torch.device("cuda", 0), torch.device("cpu"))]
    for same in (torch.device("cpu"), torch.device("cpu", 0)):  # the same kind of device: as before
        assert load_base_model(cfg, torch.device("cpu"), draw=same) and len(asked) == 1
    params = dict(model.named_parameters())
    assert all(p.device.type == "cpu" and not p.requires_grad for p in params.values())
    assert all(b.device.type == "cpu" for b in model.buffers())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.dtype == torch.float32 and abs(q.std().item() - 0.02) < 0.002 and abs(q.mean().item()) < 0.002
    assert not torch.equal(q, model.model.layers[1].self_attn.q_proj.weight)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - torch.log(torch.tensor(300.0)).item()) < 0.1
