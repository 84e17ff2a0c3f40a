"""distributed=fsdp2 without launching: the options compose and are refused where they cannot run, the run
dir's files and the preview describe it, and its checkpoint adapter (train/fsdp.py) saves and loads the
format the DDP and ZeRO adapters use, on a real FSDP2-sharded model in one process."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from lora_launch.cli.commands import help_text
from lora_launch.conf.compose import compose
from lora_launch.conf.schema import ConfigError
from lora_launch.launcher import preview as pv
from lora_launch.launcher.launch import write_launch_files
from lora_launch.launcher.topology import run_plan, topology
from lora_launch.run.plan import RunPlan
from lora_launch.strategies import strategy_for
from lora_launch.strategies.fsdp2 import config as fsdp2_config


@pytest.mark.parametrize("option,offload", [("fsdp2", False), ("fsdp2_offload", True)])
def test_the_run_dir_gets_a_torchrun_launch_and_the_sharding_plan(tmp_path, option, offload):
    cfg = compose([f"distributed={option}", "launcher.num_processes=2", f"run.dir={tmp_path}"])
    topo = topology(cfg)
    files = write_launch_files(cfg, tmp_path, topo, run_plan(cfg, topo))
    assert "deepspeed" not in files and not (tmp_path / "ds_config.json").exists()
    acc = yaml.safe_load(files["accelerate"].read_text())
    # torchrun starts the ranks (accelerate's MULTI_GPU launcher, gloo on CPU); the ranks shard themselves
    assert acc["distributed_type"] == "MULTI_GPU" and acc["num_processes"] == 2
    plan = json.loads(files["fsdp2"].read_text())
    assert plan["fsdp_version"] == 2 and plan["mesh"] == {"device_type": "cpu", "shape": [2]}
    assert plan["offload"]["params"] is offload and plan["offload"]["optimizer_step"] is offload
    assert plan["offload"]["pin_memory"] is False  # no GPU here
    assert plan["mixed_precision"] == {"param_dtype": None, "reduce_dtype": "float32", "autocast": None}


def test_the_sharding_plan_follows_the_hardware():
    cfg = compose(["distributed=fsdp2_offload"])
    gpu = fsdp2_config(cfg, RunPlan.from_config(cfg, 2, 8, on_gpu=True, bf16=True))
    assert gpu["mesh"] == {"device_type": "cuda", "shape": [2, 8], "dim_names": ["replicate", "shard"]}
    assert gpu["mixed_precision"]["autocast"] == "bfloat16" and gpu["offload"]["pin_memory"] is True
    assert gpu["compile"] == "layers"  # decoder layers compiled on GPUs, as under DDP
    plan = RunPlan.from_config(compose(["distributed=fsdp2"]), 1, 2, on_gpu=False)
    assert plan.shards_params and plan.compile == "none" and plan.strategy == "fsdp2"
    assert not RunPlan.from_config(compose([]), 1, 2, on_gpu=False).shards_params


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["optim=paged_adamw_32bit"], "optim.name=paged_adamw_32bit with distributed=fsdp2: bitsandbytes"),
        (["optim.name=adamw_bnb_8bit"], "use optim.name=adamw_torch"),
        (["train.precision=float16"], "train.precision=float16 with distributed=fsdp2"),
        (["distributed.zero_stage=3"], "distributed.zero_stage=3 with distributed=fsdp2"),
        (["distributed.offload_params=true"], "FSDP2 offloads both or neither"),
    ],
)
def test_what_fsdp2_cannot_run_is_refused_at_compose(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        compose(["distributed=fsdp2", *overrides])


def test_help_lists_the_fsdp2_options():
    line = next(line for line in help_text().splitlines() if line.strip().startswith("distributed "))
    assert "fsdp2" in line and "fsdp2_offload" in line


@pytest.fixture(scope="module")
def shape_7b():
    cfg = compose(["model=llama2_7b_random", "lora.r=64", "run.dir=/tmp/unused"])
    return pv.model_shape(pv.model_config(cfg), ["q_proj", "v_proj"], 64)


def test_fsdp2_memory_is_the_shard_plus_what_it_holds_gathered(shape_7b):
    def estimate(option):
        cfg = compose(["model=llama2_7b_random", "lora.r=64", f"distributed={option}", "run.dir=/tmp/unused"])
        return pv.memory_estimate(cfg, shape_7b, RunPlan.from_config(cfg, 1, 8, on_gpu=True, bf16=True))

    ddp, z3, fsdp, off = (estimate(o) for o in ("ddp", "zero3", "fsdp2", "fsdp2_offload"))
    whole = ddp.weights
    # embeddings + head + norms (bf16), a shard group of 4 of the 32 decoder layers' linears (auto) and a layer more
    gathered = (shape_7b.total_params - shape_7b.quantisable_params) * 2 + 5 * shape_7b.quantisable_params * 2 / 32
    assert fsdp.weights == pytest.approx(whole / 8 + gathered)
    assert fsdp.weights > z3.weights  # ZeRO-3's estimate leaves out its gathered layers
    assert fsdp.lora == pytest.approx(shape_7b.lora_params * 8 / 8)  # fp32 adapters and gradients, sharded
    assert fsdp.optimizer == pytest.approx(shape_7b.lora_params * 8 / 8)  # no fp32 master copy: adapters are fp32
    assert off.weights == pytest.approx(gathered) and off.optimizer == 0 and off.lora == 0
    assert 3.5 < fsdp.weights / 2**30 < 4.5  # 12.6 GiB of bf16 weights over 8 GPUs, plus ~2.4 GiB gathered


def test_keeping_the_gathered_layers_is_a_choice_the_plan_and_the_estimate_follow(shape_7b):
    """distributed.reshard_after_forward=false: fully_shard keeps each layer gathered from forward to backward
    (one gather a step), so the estimate holds the whole base on every GPU besides its shard."""

    def plan_and_estimate(*extra):
        cfg = compose(["model=llama2_7b_random", "lora.r=64", "distributed=fsdp2", "run.dir=/tmp/unused", *extra])
        plan = RunPlan.from_config(cfg, 1, 8, on_gpu=True, bf16=True)
        return fsdp2_config(cfg, plan), pv.memory_estimate(cfg, shape_7b, plan)

    (default, free), (keep, kept) = plan_and_estimate(), plan_and_estimate("distributed.reshard_after_forward=false")
    assert default["reshard_after_forward"] is True and keep["reshard_after_forward"] is False
    whole = shape_7b.total_params * 2
    assert kept.weights == pytest.approx(whole / 8 + whole)
    assert kept.weights > free.weights
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="reshard_after_forward"):
        compose(["distributed=fsdp2", "distributed.reshard_after_forward=sometimes", "run.dir=/tmp/unused"])


def test_groups_kept_gathered_are_in_the_plan_the_estimate_and_refused_where_they_cannot_be(shape_7b):
    """distributed.keep_gathered=N holds the last N shard groups whole from forward to backward: the plan says
    so, the estimate adds them (auto, decided on the GPU, adds nothing but is named in the preview), and a value
    that means nothing is refused at compose, naming the key."""

    def plan_and_estimate(*extra):
        cfg = compose(["model=llama2_7b_random", "lora.r=64", "distributed=fsdp2", "run.dir=/tmp/unused", *extra])
        plan = RunPlan.from_config(cfg, 1, 8, on_gpu=True, bf16=True)
        return fsdp2_config(cfg, plan), pv.memory_estimate(cfg, shape_7b, plan)

    (auto, free), (two, kept) = plan_and_estimate(), plan_and_estimate("distributed.keep_gathered=2")
    (none, zero), (_, all_kept) = (
        plan_and_estimate("distributed.keep_gathered=0"),
        plan_and_estimate("distributed.keep_gathered=100"),
    )
    assert (auto["keep_gathered"], two["keep_gathered"], none["keep_gathered"]) == ("auto", 2, 0)
    per_layer = 2 * (shape_7b.quantisable_params / shape_7b.layers)
    assert kept.weights - free.weights == pytest.approx(2 * 4 * per_layer, rel=1e-6)  # 2 groups of 4 layers
    assert zero.weights == pytest.approx(free.weights)
    whole = shape_7b.total_params * 2
    assert all_kept.weights == pytest.approx(whole / 8 + whole)  # as reshard_after_forward=false
    reshard_off, _ = plan_and_estimate("distributed.reshard_after_forward=false")
    assert reshard_off["keep_gathered"] == "all"
    for bad, needle in (
        ("distributed.keep_gathered=-1", "distributed.keep_gathered=-1 must be a whole number"),
        ("distributed.keep_gathered=some", "distributed.keep_gathered='some' must be"),
    ):
        with pytest.raises(ConfigError, match=needle):
            compose(["distributed=fsdp2", bad, "run.dir=/tmp/unused"])
    with pytest.raises(ConfigError, match="distributed.keep_gathered=2 with distributed=ddp: only fsdp2"):
        compose(["distributed.keep_gathered=2", "run.dir=/tmp/unused"])


def test_how_many_groups_fit_counts_from_the_last():
    from lora_launch.train.fsdp import groups_that_fit

    assert groups_that_fit([3, 2, 2, 1], 0) == 0
    assert groups_that_fit([3, 2, 2, 1], 1) == 1
    assert groups_that_fit([3, 2, 2, 1], 4.5) == 2  # 1 + 2; the third (2) would need 5
    assert groups_that_fit([3, 2, 2, 1], 100) == 4
    assert groups_that_fit([], 100) == 0


# ---- the checkpoint adapter on a real sharded model -----------------------------------------------------------


@pytest.fixture
def one_process_group():
    """A process group of this one process (what train/fsdp.py makes for a single rank started alone)."""
    import torch.distributed as dist

    assert not dist.is_initialized(), "another test left a process group behind"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _lora_model(seed: int, layers: int = 2):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    )
    return get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"),
    )


def _trained(model, sharded: bool, *overrides: str, losses: list | None = None):
    """A model after two AdamW steps, its optimizer, and the adapter for it (sharded: through train/fsdp.py,
    under `overrides`); each step's loss is appended to `losses`."""
    from lora_launch.train.fsdp import shard
    from lora_launch.train.state import adapter_for

    if sharded:
        cfg = compose(["distributed=fsdp2", *overrides])
        model = shard(cfg, RunPlan.from_config(cfg, 1, 1, on_gpu=False), model, main=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.arange(24).reshape(2, 12) % 64
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if losses is not None:
            losses.append(loss.item())
    return model, optimizer, adapter_for(optimizer)


def test_layers_grouped_and_prefetched_shard_and_train_as_one_layer_groups_do(one_process_group):
    """distributed.layers_per_group=2 distributed.prefetch=2: the 5 decoder layers share 3 shard groups (2, 2,
    1), each group gathers the next two ahead, and training matches the unsharded model's."""
    from lora_launch.train.fsdp import decoder_layers

    plain, sharded = [], []
    _trained(_lora_model(0, layers=5), False, losses=plain)
    model, _, _ = _trained(
        _lora_model(0, layers=5), True, "distributed.layers_per_group=2", "distributed.prefetch=2", losses=sharded
    )
    layers = decoder_layers(model.get_base_model())
    states = [layer._get_fsdp_state() for layer in layers]
    assert states[0] is states[1] and states[2] is states[3] and len({id(s) for s in states}) == 3
    assert states[0]._states_to_forward_prefetch == [states[2], states[4]]
    assert states[2]._states_to_forward_prefetch == [states[4]]
    assert states[4]._states_to_backward_prefetch == [states[2], states[0]]
    assert sharded == pytest.approx(plain, rel=1e-5) and sharded[-1] < sharded[0]


def test_grouping_and_prefetch_are_in_the_plan_and_the_estimate(shape_7b, tmp_path):
    """What a group gathers at once (the one computing and the ones prefetched) is in the estimate; the plan
    file says what was applied; a value out of range is refused at compose, naming the key."""

    def plan_and_estimate(*extra):
        cfg = compose(["model=llama2_7b_random", "distributed=fsdp2", "run.dir=/tmp/unused", *extra])
        plan = RunPlan.from_config(cfg, 1, 8, on_gpu=True, bf16=True)
        return fsdp2_config(cfg, plan), pv.memory_estimate(cfg, shape_7b, plan)

    (one, base), (four, grouped) = (
        plan_and_estimate(),
        plan_and_estimate("distributed.layers_per_group=4", "distributed.prefetch=2"),
    )
    assert (one["layers_per_group"], one["prefetch"]) == ("auto", None)
    assert (four["layers_per_group"], four["prefetch"]) == (4, 2)
    per_layer = 2 * (shape_7b.quantisable_params / shape_7b.layers)  # bf16 linear weights of one decoder layer
    # auto: 4 layers of a 7B in bf16 (0.38 GiB each) in a group, and a layer more prefetched; prefetch=2: two more
    assert grouped.weights - base.weights == pytest.approx(1 * per_layer, rel=1e-6)
    ((_, single),) = [plan_and_estimate("distributed.layers_per_group=1")]
    assert base.weights - single.weights == pytest.approx((5 - 2) * per_layer, rel=1e-6)
    from hydra.errors import ConfigCompositionException

    for bad in ("distributed.layers_per_group=0", "distributed.layers_per_group=some", "distributed.prefetch=0"):
        with pytest.raises((ConfigError, ConfigCompositionException), match=bad.split("=")[0].split(".")[1]):
            compose(["distributed=fsdp2", bad, "run.dir=/tmp/unused"])


def test_a_checkpoint_moves_between_the_ddp_and_fsdp2_adapters(one_process_group):
    from lora_launch.train.fsdp import Fsdp2Adapter
    from lora_launch.train.zero import TorchAdapter

    plain, _, plain_adapter = _trained(_lora_model(0), sharded=False)
    sharded, _, sharded_adapter = _trained(_lora_model(1), sharded=True)
    assert type(plain_adapter) is TorchAdapter and type(sharded_adapter) is Fsdp2Adapter
    assert sharded_adapter.loss_scaler() is None
    tensors, meta = plain_adapter.full_trainable_state(plain)
    theirs, their_meta = sharded_adapter.full_trainable_state(sharded)
    assert sorted(theirs) == sorted(tensors) and their_meta == meta == {"keys": ["exp_avg", "exp_avg_sq"], "step": 2.0}
    assert not any(torch.equal(tensors[k], theirs[k]) for k in tensors if k.startswith("param/") and "lora_A" in k)

    # the DDP checkpoint into the sharded model: saved back whole, it is the same, bit for bit
    sharded_adapter.load_full_trainable_state(sharded, tensors, meta)
    again, again_meta = sharded_adapter.full_trainable_state(sharded)
    assert again_meta == meta and all(torch.equal(again[k], tensors[k]) for k in tensors)
    # and the sharded one into the plain model
    fresh, _, fresh_adapter = _trained(_lora_model(2), sharded=False)
    fresh_adapter.load_full_trainable_state(fresh, theirs, their_meta)
    back, _ = fresh_adapter.full_trainable_state(fresh)
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)


def test_the_saved_snapshot_does_not_follow_later_steps(one_process_group):
    model, optimizer, adapter = _trained(_lora_model(0), sharded=True)
    tensors, meta = adapter.full_trainable_state(model)
    before = {k: t.clone() for k, t in tensors.items()}
    ids = torch.arange(24).reshape(2, 12) % 64
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(torch.equal(tensors[k], before[k]) for k in tensors) and meta["step"] == 2.0


def test_several_nodes_shard_within_a_copy_of_the_model_per_node():
    """distributed.replicate=auto: one copy per node (hybrid sharding, gathers stay inside a node); an explicit
    count must divide the world; other strategies have no copies to set."""
    cfg = compose(["distributed=fsdp2"])
    one_node = fsdp2_config(cfg, RunPlan.from_config(cfg, 1, 8, on_gpu=True, bf16=True))
    assert one_node["mesh"] == {"device_type": "cuda", "shape": [8]}
    two_nodes = fsdp2_config(cfg, RunPlan.from_config(cfg, 2, 8, on_gpu=True, bf16=True))
    assert two_nodes["mesh"] == {"device_type": "cuda", "shape": [2, 8], "dim_names": ["replicate", "shard"]}
    # a node of one process would hold a whole copy: auto shards over the nodes instead
    assert fsdp2_config(cfg, RunPlan.from_config(cfg, 4, 1, on_gpu=True))["mesh"]["shape"] == [4]
    flat = compose(["distributed=fsdp2", "distributed.replicate=1"])
    assert fsdp2_config(flat, RunPlan.from_config(flat, 2, 8, on_gpu=True))["mesh"]["shape"] == [16]
    three = compose(["distributed=fsdp2", "distributed.replicate=3"])
    [problem] = strategy_for(three).launch_problems(three, RunPlan.from_config(three, 2, 8, on_gpu=True))
    assert problem.startswith("distributed.replicate=3 does not divide the world size 16")
    with pytest.raises(ConfigError, match=r"distributed.replicate=2 with distributed=ddp: only fsdp2"):
        compose(["distributed.replicate=2"])
    with pytest.raises(ConfigError, match=r"distributed.replicate=0 must be a positive integer or 'auto'"):
        compose(["distributed=fsdp2", "distributed.replicate=0"])


def test_the_memory_estimate_shards_within_one_copy(shape_7b):
    """Under hybrid sharding a device holds 1/(ranks per copy) of the model, not 1/world."""
    flat = compose(["model=llama2_7b_random", "distributed=fsdp2", "distributed.replicate=1"])
    hybrid = compose(["model=llama2_7b_random", "distributed=fsdp2"])
    plan = RunPlan.from_config(flat, 2, 4, on_gpu=True, bf16=True)
    one, two = pv.memory_estimate(flat, shape_7b, plan), pv.memory_estimate(hybrid, shape_7b, plan)
    single = pv.memory_estimate(flat, shape_7b, RunPlan.from_config(flat, 1, 4, on_gpu=True, bf16=True))
    assert two.weights > one.weights and two.weights == pytest.approx(single.weights)


@pytest.mark.parametrize("layer_gib,expected", [(0.38, 4), (0.59, 3), (1.6, 1), (3.0, 1), (0.1, 4)])
def test_auto_groups_as_many_layers_as_hold_2_gib_up_to_4(layer_gib, expected):
    """distributed.layers_per_group=auto: 7B, 13B, 70B in bf16, a layer larger than the budget, a small one."""
    from lora_launch.strategies.fsdp2 import layers_per_group

    assert layers_per_group("auto", layer_gib * 2**30) == expected
    assert layers_per_group(3, layer_gib * 2**30) == 3


def test_groups_kept_gathered_train_alike_and_are_freed_for_a_checkpoint(one_process_group):
    """distributed.keep_gathered=1 with 3 shard groups: only the last stays gathered after forward, training
    matches the unsharded model's, a forward without backward (evaluation) leaves that group gathered, and the
    checkpoint adapter then still saves what the unsharded model's adapter saves (FSDP2 reshards before a
    state_dict). On the CPU, auto keeps none."""
    from lora_launch.train.fsdp import is_dtensor, keep_gathered_after_first_step, shard_groups

    plain, sharded = [], []
    ref, _, ref_adapter = _trained(_lora_model(0, layers=5), False, losses=plain)
    model, _, adapter = _trained(
        _lora_model(0, layers=5), True, "distributed.layers_per_group=2", "distributed.keep_gathered=1", losses=sharded
    )
    assert sharded == pytest.approx(plain, rel=1e-5)
    groups = shard_groups(model)
    assert [len(g) for g in groups] == [2, 2, 1]
    assert [g[0]._get_fsdp_state()._fsdp_param_group._reshard_after_forward for g in groups] == [True, True, False]
    with torch.no_grad():
        model(input_ids=torch.arange(12).reshape(1, 12))
    gathered = lambda g: not any(is_dtensor(p) for layer in g for p in layer.parameters())  # noqa: E731
    assert [gathered(g) for g in groups] == [False, False, True]
    saved, _ = adapter.full_trainable_state(model)
    assert not any(gathered(g) for g in groups)
    expected, _ = ref_adapter.full_trainable_state(ref)
    assert saved.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(saved[k], expected[k], rtol=1e-4, atol=1e-6)

    cfg = compose(["distributed=fsdp2", "run.dir=/tmp/unused"])
    kept, count, spare = keep_gathered_after_first_step(cfg, model, torch.device("cpu"), 0, 1.0)
    assert (kept, count, spare) == (0, 3, 0.0)
    assert all(g[0]._get_fsdp_state()._fsdp_param_group._reshard_after_forward for g in groups)
    assert (
        keep_gathered_after_first_step(
            compose(["distributed=fsdp2", "distributed.keep_gathered=1"]), model, torch.device("cpu"), 0, 1.0
        )
        is None
    )


def test_one_process_per_copy_keeps_the_frozen_base_whole_and_out_of_the_gathers(one_process_group, monkeypatch):
    """A copy of the model on one process has nothing to shard: its frozen base stays plain tensors (no gather
    copies them each step) and only the adapters are FSDP2's; training matches the base sharded as before. Across
    processes, or offloaded, the base is sharded; the plan file and the memory estimate say which."""
    from lora_launch.train.fsdp import gathered_bytes, is_dtensor, shard_groups

    whole_losses, sharded_losses = [], []
    model, _, _ = _trained(_lora_model(0, layers=3), True, "distributed.layers_per_group=1", losses=whole_losses)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert frozen and not any(is_dtensor(p) for p in frozen) and all(is_dtensor(p) for p in trainable)
    lora_bytes = [sum(p.numel() * 4 for p in layer.parameters() if p.requires_grad) for [layer] in shard_groups(model)]
    assert [gathered_bytes(g) for g in shard_groups(model)] == lora_bytes

    monkeypatch.setattr("lora_launch.strategies.fsdp2.shards_frozen_weights", lambda cfg, plan: True)
    model, _, _ = _trained(_lora_model(0, layers=3), True, "distributed.layers_per_group=1", losses=sharded_losses)
    assert all(is_dtensor(p) for p in model.parameters())
    assert whole_losses == pytest.approx(sharded_losses, rel=1e-6)
    monkeypatch.undo()

    def plan(option, procs):
        cfg = compose(["model=llama2_7b_random", f"distributed={option}", "run.dir=/tmp/unused"])
        return cfg, RunPlan.from_config(cfg, 1, procs, on_gpu=True, bf16=True)

    assert fsdp2_config(*plan("fsdp2", 1))["frozen_weights"] == "whole"
    assert fsdp2_config(*plan("fsdp2", 8))["frozen_weights"] == "sharded"
    assert fsdp2_config(*plan("fsdp2_offload", 1))["frozen_weights"] == "sharded"
    (ddp_cfg, ddp_plan), (fsdp_cfg, fsdp_plan) = plan("ddp", 1), plan("fsdp2", 1)
    shape = pv.model_shape(pv.model_config(ddp_cfg), ["q_proj", "v_proj"], 16)
    ddp, fsdp = pv.memory_estimate(ddp_cfg, shape, ddp_plan), pv.memory_estimate(fsdp_cfg, shape, fsdp_plan)
    assert fsdp.weights == ddp.weights  # held once, nothing gathered besides
