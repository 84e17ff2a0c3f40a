"""train.fused_projections against the separate projections: outputs and gradients (float32, GQA, biased q/k/v,
dropout), the parameters and adapter the model keeps, one product per group in the compiled layer's graph, and the
refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_launch.conf.compose import compose
from lora_launch.conf.schema import ConfigError
from lora_launch.train.fused import check_joined, fuse_projections, install, still_joined

TIGHT = dict(rtol=1e-5, atol=1e-6)


def _lora_model(arch: str, targets, dropout: float):
    """A tiny random model with GQA (4 heads, 2 key/value heads) and LoRA, its lora_B away from zero: `llama`, or
    `qwen2` (biased q/k/v projections)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    if arch == "llama":
        base = LlamaForCausalLM(LlamaConfig(**shape, num_key_value_heads=2))
    else:
        base = Qwen2ForCausalLM(Qwen2Config(**shape, num_key_value_heads=2))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def _ids():
    return torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def _step(model):
    """Logits, loss and every trainable gradient of one forward and backward (dropout's masks drawn from seed 1)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = model(input_ids=_ids(), labels=_ids())
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


CASES = [
    ("llama", ["q_proj", "v_proj"], 0.0),  # q and v's lora_A as one product
    ("qwen2", "all-linear", 0.0),  # every projection adapted, biases joined
    ("llama", ["q_proj", "v_proj"], 0.1),  # dropout: each adapter draws its mask, in the separate layers' order
    ("qwen2", ["k_proj", "up_proj"], 0.1),
]


@pytest.mark.parametrize("arch,targets,dropout", CASES)
def test_joined_projections_give_the_separate_outputs_and_gradients(arch, targets, dropout):
    plain, joined = _lora_model(arch, targets, dropout), _lora_model(arch, targets, dropout)
    assert fuse_projections(joined) == {"q_proj+k_proj+v_proj": 2, "gate_proj+up_proj": 2}
    want_logits, want_loss, want_grads = _step(plain)
    logits, loss, grads = _step(joined)
    torch.testing.assert_close(logits, want_logits, **TIGHT)
    torch.testing.assert_close(loss, want_loss, **TIGHT)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], **TIGHT, msg=name)
    for group in {id(m.fused_group): m.fused_group for m in joined.modules() if hasattr(m, "fused_group")}.values():
        assert group.pending is None  # nothing of the step is held after it


def test_layers_that_recompute_in_backward_join_again():
    """train.grad_ckpt: a checkpointed layer's forward runs again in backward, through the joined products too."""
    plain, joined = _lora_model("llama", ["q_proj", "v_proj"], 0.1), _lora_model("llama", ["q_proj", "v_proj"], 0.1)
    for model in (plain, joined):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fuse_projections(joined)
    _, want_loss, want_grads = _step(plain)
    _, loss, grads = _step(joined)
    torch.testing.assert_close(loss, want_loss, **TIGHT)
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], **TIGHT, msg=name)


def test_generation_with_its_cache_gives_the_same_tokens():
    plain, joined = _lora_model("qwen2", "all-linear", 0.0), _lora_model("qwen2", "all-linear", 0.0)
    fuse_projections(joined)
    prompt = _ids()[:1, :5]
    want = plain.eval().generate(input_ids=prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(
        joined.eval().generate(input_ids=prompt, max_new_tokens=6, do_sample=False, use_cache=True), want
    )


def test_the_model_keeps_its_parameters_names_and_adapter_and_holds_the_weights_once():
    from peft import get_peft_model_state_dict

    plain, joined = _lora_model("qwen2", "all-linear", 0.0), _lora_model("qwen2", "all-linear", 0.0)
    trainable_before = [p for p in joined.parameters() if p.requires_grad]
    fuse_projections(joined)
    assert [p for p in joined.parameters() if p.requires_grad] == trainable_before  # the same Parameter objects
    want, got = plain.state_dict(), joined.state_dict()
    assert list(got) == list(want)
    for name, value in got.items():
        assert torch.equal(value, want[name]), name
    assert get_peft_model_state_dict(joined).keys() == get_peft_model_state_dict(plain).keys()
    assert still_joined(joined)
    attn = joined.base_model.model.model.layers[0].self_attn
    group = attn.q_proj.fused_group
    assert group.weight.shape == (64 + 2 * 32, 64)  # q: 4 heads of 16, k and v: 2 heads of 16 (GQA)
    weights = [attn.q_proj.base_layer.weight, attn.k_proj.base_layer.weight, attn.v_proj.base_layer.weight]
    assert all(w.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr() for w in weights)


def _linear_calls(model) -> int:
    """F.linear calls in the first decoder layer's graph as dynamo traces it whole (fullgraph: no break)."""
    calls = []

    def count(gm, _inputs):
        calls.append(
            sum(n.op == "call_function" and n.target in (F.linear, torch._C._nn.linear) for n in gm.graph.nodes)
        )
        return gm.forward

    import torch._dynamo

    torch._dynamo.reset()
    layer = model.base_model.model.model.layers[0]
    layer.compile(backend=count, fullgraph=True)
    _step(model)
    return calls[0]


def test_the_compiled_layer_runs_one_product_per_group_and_matches():
    """q/v targeted, no dropout: seven base products and four adapter products become four and three."""
    plain, joined = _lora_model("llama", ["q_proj", "v_proj"], 0.0), _lora_model("llama", ["q_proj", "v_proj"], 0.0)
    fuse_projections(joined)
    want = _step(plain)
    assert _linear_calls(plain) == 7 + 4
    assert _linear_calls(joined) == 4 + 3
    got = _step(joined)
    torch.testing.assert_close(got[1], want[1], **TIGHT)
    for name, g in got[2].items():
        torch.testing.assert_close(g, want[2][name], **TIGHT, msg=name)


def test_a_model_without_projections_to_join_is_refused():
    with pytest.raises(ConfigError, match=r"train\.fused_projections=true: the model has no q_proj"):
        install(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_dora_layers_are_left_separate():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    )
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    assert fuse_projections(model) == {"gate_proj+up_proj": 1}


def test_weights_recreated_after_joining_are_refused():
    model = _lora_model("llama", ["q_proj", "v_proj"], 0.0)
    fuse_projections(model)
    cfg = compose(["train.fused_projections=true"])
    check_joined(cfg, model)
    model.double()  # what a strategy that casts the model would do: every weight a new tensor
    with pytest.raises(ConfigError, match=r"train\.fused_projections=true with distributed=ddp: the strategy"):
        check_joined(cfg, model)


@pytest.mark.parametrize(
    "overrides,line",
    [
        (["quant=nf4"], "train.fused_projections=true with quant=nf4: the 4-bit weights are packed"),
        (["distributed=fsdp2"], "train.fused_projections=true with distributed=fsdp2: each process holds shards"),
        (["distributed=zero3"], "train.fused_projections=true with distributed=zero3: each process holds shards"),
    ],
)
def test_configs_it_cannot_run_are_refused_at_compose(overrides, line):
    with pytest.raises(ConfigError) as refused:
        compose(["train.fused_projections=true", *overrides])
    assert str(refused.value).startswith(line) and "set train.fused_projections=false" in str(refused.value)
    compose(["train.fused_projections=false", *overrides])  # the same config without it composes


def test_ddp_and_zero2_compose_with_it():
    for distributed in ("ddp", "zero2"):
        assert compose(["train.fused_projections=true", f"distributed={distributed}"]).train.fused_projections


def test_identical_layers_still_share_one_compiled_graph():
    """The joined weight is an input of the layer's graph, not a constant of it: no recompile per layer (beyond the
    first layer's, whose input needs no gradient), which would pass dynamo's limit on a 32-layer model."""
    import torch._dynamo
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.config.use_cache = False  # as the trainer loads it
    fuse_projections(model)
    graphs = []

    def backend(gm, _inputs):  # one backend for every layer, as torch.compile's own is
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    for layer in model.base_model.model.model.layers:
        layer.compile(backend=backend)
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    assert len(graphs) == 2
