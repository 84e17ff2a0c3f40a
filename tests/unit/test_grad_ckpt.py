"""train.grad_ckpt as a budget: what each value means, the one-line errors, and which decoder layers of the tiny
Llama recompute their activations in backward (and, under ZeRO-3, which are gathered whole)."""

from __future__ import annotations

import pytest
import torch

from lora_launch.conf.compose import compose
from lora_launch.conf.grad_ckpt import GradCkpt, read
from lora_launch.conf.schema import ConfigError, chunked_loss
from lora_launch.run.activations import layer_activations
from lora_launch.run.plan import RunPlan


@pytest.mark.parametrize(
    "value,meaning",
    [
        (False, GradCkpt("none")),
        (True, GradCkpt("all")),
        (0, GradCkpt("none")),
        (12, GradCkpt("layers", layers=12)),
        ("auto", GradCkpt("auto")),
        ("20GiB", GradCkpt("memory", budget=20 * 2**30)),
        ("1.5 gib", GradCkpt("memory", budget=1.5 * 2**30)),
        ("512MiB", GradCkpt("memory", budget=512 * 2**20)),
    ],
)
def test_values_and_what_they_mean(value, meaning):
    assert read(value) == meaning
    assert compose([f"train.grad_ckpt={str(value).lower() if isinstance(value, bool) else value}"])


@pytest.mark.parametrize("value", ["maybe", "-1", "1.5", "0GiB", "20GB", "[1,2]"])
def test_a_bad_value_is_one_line_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"^train\.grad_ckpt=.* must be true, false, a number of decoder layers") as e:
        compose([f"train.grad_ckpt={value}"])
    assert "\n" not in str(e.value)


def test_checkpointed_counts_follow_from_the_value_alone_where_they_can():
    assert [read(v).checkpointed(32) for v in (False, True, 0, 8, 99)] == [0, 32, 0, 8, 32]
    assert read("auto").checkpointed(32) is None and read("1GiB").checkpointed(32) is None


def test_chunked_loss_auto_follows_grad_ckpt():
    assert not chunked_loss(compose([]))
    assert chunked_loss(compose(["train.grad_ckpt=4"])) and chunked_loss(compose(["train.grad_ckpt=auto"]))
    assert not chunked_loss(compose(["train.grad_ckpt=true", "train.chunked_loss=false"]))
    assert chunked_loss(compose(["train.chunked_loss=true"]))
    with pytest.raises(ConfigError, match=r"^train\.chunked_loss='sometimes' must be true, false or auto$"):
        compose(["train.chunked_loss=sometimes"])


def _model(tiny, *overrides):
    from lora_launch.train.model import apply_lora, load_base_model

    cfg = compose([*tiny["overrides"], "run.dir=/tmp/unused", "lora.dropout=0", *overrides])
    plan = RunPlan.from_config(cfg, 1, 1, on_gpu=False)
    return cfg, plan, apply_lora(cfg, load_base_model(cfg, torch.device("cpu"), plan))


def _recomputed(model) -> list[int]:
    """How many times each decoder layer's MLP ran in one forward and backward (2: recomputed in backward)."""
    from lora_launch.train.activations import decoder_layers

    runs = []
    for i, layer in enumerate(decoder_layers(model)):  # the MLP's forward itself: hooks do not run in a recompute
        runs.append(0)

        def counted(*args, i=i, forward=layer.mlp.forward, **kwargs):
            runs[i] += 1
            return forward(*args, **kwargs)

        layer.mlp.forward = counted
    model.train()
    ids = torch.randint(4, 100, (2, 16))
    model(input_ids=ids).logits.float().sum().backward()
    return runs


@pytest.mark.parametrize(
    "setting,checkpointed",
    [("false", 0), ("true", 2), ("1", 1), ("5", 2), ("auto", 0), ("one layer's budget", 1), ("1GiB", 0)],
)
def test_the_first_layers_are_the_ones_recomputed(tiny, setting, checkpointed):
    from lora_launch.train.activations import checkpointed_layers

    if setting == "one layer's budget":  # between the two layers' worth: the tiny model, seq 64 x micro 4, float32
        acts = layer_activations(2, 64, 64, 128, 4 * 64, 4, False)
        setting = f"{(acts.total(1) + 1) / 2**20:.6f}".rstrip("0") + "MiB"
        assert acts.total(0) > acts.total(1)
    cfg, plan, model = _model(tiny, f"train.grad_ckpt={setting}")
    n = checkpointed_layers(cfg, plan, model, torch.device("cpu"), main=False)
    assert n == checkpointed
    assert _recomputed(model) == [2] * n + [1] * (2 - n)


def test_zero3_gathers_only_the_checkpointed_layers_whole(tiny):
    pytest.importorskip("deepspeed")
    from lora_launch.train.activations import checkpointed_layers, decoder_layers
    from lora_launch.train.zero import gather_whole_layers

    cfg, plan, model = _model(tiny, "distributed=zero3", "train.grad_ckpt=1")
    n = checkpointed_layers(cfg, plan, model, torch.device("cpu"), main=False)
    own = {"zero_optimization": {"leaf_module": {"classes": ["LlamaMLP"]}}}  # a user's own DeepSpeed JSON: theirs
    assert gather_whole_layers(cfg, model, own, n) == []
    assert [getattr(layer, "_z3_leaf", False) for layer in decoder_layers(model)] == [False, False]
    assert gather_whole_layers(cfg, model, {}, n) == ["LlamaDecoderLayer"]
    assert [getattr(layer, "_z3_leaf", False) for layer in decoder_layers(model)] == [True, False]


def test_a_compiled_4bit_layer_counts_its_dequantised_weights(tiny):
    """Compiled layers of 4-bit weights through the torch kernel keep each linear's dequantised weight for
    backward (0.38 GiB a 7B layer, measured on an H100: bench/results/2026-12-06-h100-budget-qlora.jsonl): the
    trainer's layer count and the preview's both count it, from the same linear weights; bitsandbytes' kernel
    and eager layers keep the packed weight alone."""
    from lora_launch.launcher import preview as pv
    from lora_launch.run.activations import dequantised_bytes
    from lora_launch.train.activations import decoder_layers, frozen_linear_params

    cfg, plan, model = _model(tiny)
    shape = pv.model_shape(pv.model_config(cfg), ["q_proj", "v_proj"], cfg.lora.r)
    assert (
        frozen_linear_params(decoder_layers(model)[0])
        == shape.quantisable_params // shape.layers
        == 64 * 256 + 3 * 64 * 128
    )

    def kept(*overrides, on_gpu=True):
        cfg = compose(["model=llama2_7b_random", "lora.r=64", "run.dir=/tmp/unused", *overrides])
        return dequantised_bytes(cfg, RunPlan.from_config(cfg, 1, 1, on_gpu=on_gpu), 202_375_168)

    assert kept("quant=nf4") == 202_375_168 * 2  # bf16: one 7B layer's linears
    assert kept("quant=nf4", "quant.kernel=bitsandbytes") == kept("quant=nf4", "train.compile=none") == 0
    assert kept("quant=nf4", on_gpu=False) == kept() == 0  # eager on CPU; no 4-bit weights
    budget = ["model=llama2_7b_random", "lora.r=64", "run.dir=/tmp/unused", "quant=nf4", "train.grad_ckpt=6GiB"]
    torch_kernel, bnb_kernel = (
        pv.memory_estimate(cfg, shape_7b, RunPlan.from_config(cfg, 1, 1, on_gpu=True))
        for cfg in (compose(budget), compose([*budget, "quant.kernel=bitsandbytes"]))
        for shape_7b in [pv.model_shape(pv.model_config(cfg), ["q_proj", "v_proj"], 64)]
    )
    assert 0 < bnb_kernel.checkpointed < torch_kernel.checkpointed < 32  # fewer layers fit the same budget
