"""quant.kernel=torch (train/nf4.py): bitsandbytes' NF4 dequantisation written in torch operations gives the
same weights bit for bit, and a QLoRA model routed through it computes what bitsandbytes' matmul_4bit does,
forward and backward, keeping only the packed weight for backward."""

from __future__ import annotations

import pytest
import torch

from lora_launch.conf.compose import compose
from lora_launch.conf.schema import ConfigError


@pytest.fixture(scope="module", autouse=True)
def bitsandbytes():
    """The module is skipped without bitsandbytes. Imported here rather than at collection (some 2 s): only the
    worker that runs these tests (together, by this fixture's scope) pays for it."""
    return pytest.importorskip("bitsandbytes")


TINY = [
    "model=llama2_7b_random",
    "quant=nf4",
    "model.arch.hidden_size=128",
    "model.arch.vocab_size=300",
    "model.arch.intermediate_size=256",
    "model.arch.num_hidden_layers=2",
    "model.arch.num_attention_heads=4",
    "model.arch.num_key_value_heads=2",
]


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(256, 192), (96, 320), (64, 64)])  # scale blocks a whole, partial, single 256
def test_dequantize_matches_bitsandbytes_bit_for_bit(nested, shape):
    from bitsandbytes import functional as bf

    from lora_launch.train.nf4 import dequantize

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 0.05
    packed, st = bf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    ours = dequantize(
        packed,
        st.absmax,
        st.code,
        st.blocksize,
        st.state2.absmax if nested else None,
        st.state2.code if nested else None,
        st.state2.blocksize if nested else 0,
        torch.as_tensor(st.offset) if nested else None,
        tuple(st.shape),
        torch.bfloat16,
    )
    assert torch.equal(ours, bf.dequantize_4bit(packed, st))


def _model(kernel: str):
    from lora_launch.train.model import apply_lora, load_base_model

    cfg = compose([*TINY, f"quant.kernel={kernel}"])
    torch.manual_seed(0)
    return apply_lora(cfg, load_base_model(cfg, torch.device("cpu")))


def test_a_qlora_model_through_the_torch_kernel_computes_what_bitsandbytes_does():
    from lora_launch.train import nf4

    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    results = {}
    for kernel in ("bitsandbytes", "torch"):
        model = _model(kernel)
        routed = [m for m in model.modules() if getattr(getattr(m, "forward", None), "__func__", None) is nf4._forward]
        assert len(routed) == (14 if kernel == "torch" else 0)  # q k v o gate up down, 2 layers
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[kernel] = loss.item(), grads, saved
        # no state_dict entry is added or lost: the packed weights stay bitsandbytes' own parameters
        assert not any(k.split(".")[-1].startswith("nf4_") for k in model.state_dict())
    (loss_b, grads_b, _), (loss_t, grads_t, saved_t) = results["bitsandbytes"], results["torch"]
    assert loss_t == pytest.approx(loss_b, rel=1e-5)
    assert grads_t.keys() == grads_b.keys() and all("lora_" in n for n in grads_t)
    for n in grads_b:
        torch.testing.assert_close(grads_t[n], grads_b[n], rtol=1e-3, atol=1e-6)
    # backward keeps the packed 4-bit weights, never a dequantised one: no saved tensor has a 4-bit layer's shape
    shapes = {tuple(m.nf4_shape) for m in _model("torch").modules() if hasattr(m, "nf4_shape")}
    assert shapes and not any(tuple(t.shape) in shapes for t in saved_t)


def test_the_torch_kernel_is_the_default_where_weights_are_whole_and_refused_where_they_are_sharded():
    from lora_launch.conf.schema import quant_kernel

    for option in ("fsdp2", "zero3"):
        with pytest.raises(ConfigError, match=f"quant.kernel=torch with distributed={option}: the 4-bit weights"):
            compose(["quant=nf4", "quant.kernel=torch", f"distributed={option}", "quant.storage_dtype=bfloat16"])
        assert quant_kernel(compose(["quant=nf4", f"distributed={option}", "quant.storage_dtype=bfloat16"])) == (
            "bitsandbytes"
        )
    for option in ("ddp", "zero2"):
        assert quant_kernel(compose(["quant=nf4", f"distributed={option}"])) == "torch"
    assert quant_kernel(compose(["quant=nf4", "quant.kernel=bitsandbytes"])) == "bitsandbytes"
