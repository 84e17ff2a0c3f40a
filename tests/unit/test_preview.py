"""Preview arithmetic against hand-computed cases, and `preview=true` starting nothing."""

from __future__ import annotations

import pytest

from lora_launch.launcher import preview as pv
from lora_launch.conf.compose import compose
from lora_launch.launcher.topology import Topology
from lora_launch.run.plan import RunPlan


def _gpu_plan(cfg, world: int) -> RunPlan:
    """The plan on `world` bf16 GPUs of one node (the estimates are checked against H100 figures)."""
    return RunPlan.from_config(cfg, 1, world, on_gpu=True, bf16=True)

GIB = 2**30

# Llama-2-7B by hand: embeddings + lm_head 2 x 32000 x 4096; per layer q,k,v,o 4 x 4096^2,
# gate/up/down 3 x 4096 x 11008, two norms 2 x 4096; final norm 4096
LAYER_LINEAR = 4 * 4096**2 + 3 * 4096 * 11008
LLAMA2_7B = 2 * 32000 * 4096 + 32 * (LAYER_LINEAR + 2 * 4096) + 4096


@pytest.fixture(scope="module")
def shape_7b():
    cfg = compose(["model=llama2_7b_random", "lora.r=64", "run.dir=/tmp/unused"])
    return pv.model_shape(pv.model_config(cfg), ["q_proj", "v_proj"], 64)


def test_7b_parameters_counted_exactly(shape_7b):
    assert LLAMA2_7B == 6_738_415_616
    assert shape_7b.total_params == LLAMA2_7B
    assert shape_7b.quantisable_params == 32 * LAYER_LINEAR
    # 32 layers x 2 modules x r x (in + out)
    assert shape_7b.lora_params == 32 * 2 * 64 * (4096 + 4096) == 33_554_432


def test_all_linear_lora_count(shape_7b):
    cfg = compose(["model=llama2_7b_random", "run.dir=/tmp/unused"])
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    shape = pv.model_shape(pv.model_config(cfg), modules, 16)
    assert shape.lora_params == 32 * 16 * (4 * 8192 + 3 * (4096 + 11008))


def test_weight_bytes_by_hand(shape_7b):
    assert pv.weight_bytes(shape_7b, "none", 2, 2, True) == LLAMA2_7B * 2
    rest = LLAMA2_7B - 32 * LAYER_LINEAR
    assert pv.weight_bytes(shape_7b, "nf4", 2, 2, False) == 32 * LAYER_LINEAR * (0.5 + 4 / 64) + rest * 2
    assert pv.weight_bytes(shape_7b, "nf4", 2, 2, True) < pv.weight_bytes(shape_7b, "nf4", 2, 2, False)


def test_activation_bytes_by_hand(shape_7b):
    tokens = 4 * 512
    per_layer = tokens * (12 * 4096 + 4 * 11008) * 2
    logits = tokens * 32000 * 10
    assert pv.activation_bytes(shape_7b, tokens, 2, False) == 32 * per_layer + logits
    assert pv.activation_bytes(shape_7b, tokens, 2, True) == 32 * tokens * 4096 * 2 + per_layer + logits


def test_zero_sharding_divides_by_world(shape_7b):
    base = compose(["model=llama2_7b_random", "lora.r=64", "run.dir=/tmp/unused"])
    z3 = compose(["model=llama2_7b_random", "lora.r=64", "distributed=zero3", "run.dir=/tmp/unused"])
    off = compose(["model=llama2_7b_random", "lora.r=64", "distributed=zero3_offload", "run.dir=/tmp/unused"])
    m1, m3, mo = (pv.memory_estimate(c, shape_7b, _gpu_plan(c, 8)) for c in (base, z3, off))
    assert m3.weights == m1.weights / 8
    assert m3.optimizer == shape_7b.lora_params * 12 / 8
    assert mo.weights == 0 and mo.optimizer == 0
    assert m1.optimizer == shape_7b.lora_params * 8


@pytest.mark.parametrize("overrides,measured_gib", [
    (["train.grad_ckpt=false"], 25.3),
    (["train.grad_ckpt=true"], 16.7),
    (["quant=nf4", "train.grad_ckpt=true"], 5.0),
])
def test_estimate_is_near_h100_measurements(shape_7b, overrides, measured_gib):
    # peak memory of the 7B-shaped TRL recipe (seq 512, batch 4) on one H100, ../shared/FIELD_NOTES.md
    cfg = compose(["model=llama2_7b_random", "lora.r=64", "train.seq_len=512", "train.micro_batch_size=4",
                   "run.dir=/tmp/unused", *overrides])
    est = pv.memory_estimate(cfg, shape_7b, _gpu_plan(cfg, 1)).total / GIB
    assert abs(est - measured_gib) / measured_gib < 0.15, est


def test_preview_text_for_two_nodes(tmp_path, tiny):
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=2\nnode-b slots=2\n")
    overrides = [*tiny["overrides"], "launcher=hostfile", f"launcher.hostfile={hosts}", f"run.dir={tmp_path}/r",
                 "train.micro_batch_size=3", "train.grad_accum=2", "data.val_split=0.25"]
    cfg = compose(overrides)
    topo = Topology(2, 2, 0, "node-a", 29500, ("node-a", "node-b"))
    text = pv.preview(cfg, topo, RunPlan.from_config(cfg, 2, 2, on_gpu=False), overrides)
    assert "world size 4" in text
    assert "global batch = micro 3 x accum 2 x world 4 = 24" in text
    assert "tokens per step <= 24 x seq_len 64 = 1536" in text
    # 400 records, 100 to validation: ceil(300 / 24) = 13
    assert "train samples ~300" in text and "steps per epoch 13, total steps 13" in text
    assert "node 1 (node-b): lora-launch" in text and "launcher.node_rank=1" in text
    assert "--machine_rank 1" in text


