"""train.chunked_loss against the plain loss: the summed loss, the correct predictions and the gradients, in float32
and bfloat16, for a bare head and for the tiny Llama with LoRA (padded and packed batches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lora_launch.data.samples import IGNORE
from lora_launch.train import fast
from lora_launch.train.chunked_loss import (
    ChunkedLoss,
    chunked_cross_entropy,
    head_refusal,
    next_tokens,
    token_cross_entropy_sum,
)
from lora_launch.train.data import collate
from lora_launch.train.evaluate import correct_tokens, forward_loss_sum

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1e-2, atol=1e-3)}


def _head_case(dtype, trainable_weight=False):
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, dtype=dtype, requires_grad=True)
    weight = (torch.randn(50, 16) * 0.3).to(dtype).requires_grad_(trainable_weight)
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :4] = IGNORE  # a prompt
    labels[2, 7:] = IGNORE  # padding
    return hidden, weight, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunks", [1, 4, 33])
def test_chunks_give_the_plain_loss_hits_and_hidden_gradient(dtype, chunks):
    hidden, weight, labels = _head_case(dtype)
    logits = F.linear(hidden, weight)
    want = fast.cross_entropy_sum(logits, labels)
    (want * 0.37).backward()  # the loop scales the summed loss before backward
    want_grad, hidden.grad = hidden.grad.clone(), None

    loss, hits = chunked_cross_entropy(
        hidden.reshape(-1, 16), weight, None, next_tokens(labels), chunks, token_cross_entropy_sum
    )
    (loss * 0.37).backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, **TOLERANCE[dtype])
    assert hits == correct_tokens(logits.detach(), labels)
    torch.testing.assert_close(hidden.grad, want_grad, **TOLERANCE[dtype])
    if dtype == torch.float32 and chunks == 1:  # one chunk computes what the plain loss does, op for op
        assert torch.equal(hidden.grad, want_grad)


def test_a_trainable_head_gets_its_weight_gradient():
    hidden, weight, labels = _head_case(torch.float32, trainable_weight=True)
    fast.cross_entropy_sum(F.linear(hidden, weight), labels).backward()
    want_h, want_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss, _ = chunked_cross_entropy(
        hidden.reshape(-1, 16), weight, None, next_tokens(labels), 3, token_cross_entropy_sum
    )
    loss.backward()
    torch.testing.assert_close(hidden.grad, want_h)
    torch.testing.assert_close(weight.grad, want_w)


def test_without_gradients_nothing_is_kept():
    hidden, weight, labels = _head_case(torch.float32)
    with torch.no_grad():
        loss, _ = chunked_cross_entropy(
            hidden.reshape(-1, 16), weight, None, next_tokens(labels), 3, token_cross_entropy_sum
        )
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, fast.cross_entropy_sum(F.linear(hidden, weight), labels).detach())


def _lora_tiny(tiny, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for name, p in model.named_parameters():  # adapters away from zero, so every gradient is non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def _padded_batch(vocab: int):
    rng = np.random.default_rng(0)
    samples = []
    for n in (13, 20, 7):
        ids = rng.integers(4, vocab, n).tolist()
        labels = [IGNORE] * (n // 3) + ids[n // 3 :]  # prompt tokens masked
        samples.append({"input_ids": ids, "labels": labels})
    return collate(samples, pad_id=3)


def _packed_batch(vocab: int):
    rng = np.random.default_rng(1)
    rows = []
    for lengths in ((9, 12), (15,)):
        ids, labels, positions = [], [], []
        for n in lengths:
            sample = rng.integers(4, vocab, n).tolist()
            ids += sample
            labels += [IGNORE] + sample[1:]  # no sample predicts the next one's first token
            positions += list(range(n))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": positions, "seq_lens": np.array(lengths)})
    return collate(rows, pad_id=3)


def _loss_and_grads(model, batch, ce):
    model.zero_grad(set_to_none=True)
    loss, hits = forward_loss_sum(model, batch, ce, hits=True)
    (loss * 0.5).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), hits, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch_of", [_padded_batch, _packed_batch])
def test_the_tiny_llama_with_lora_trains_alike_with_either_loss(tiny, dtype, batch_of):
    """The output head is frozen and a plain linear layer: the model's own forward returns the loss from it, and the
    adapters' gradients match the plain loss's (packed rows run as one flattened row under sdpa_varlen)."""
    from lora_launch.train.attention import register

    register()
    model = _lora_tiny(tiny, dtype)
    model.config._attn_implementation = "sdpa_varlen"
    assert head_refusal(model) is None
    batch = batch_of(model.config.vocab_size)
    want_loss, want_hits, want_grads = _loss_and_grads(model, batch, fast.cross_entropy_sum)
    chunked = ChunkedLoss(model, token_cross_entropy_sum)
    assert chunked.chunks > 1
    loss, hits, grads = _loss_and_grads(model, batch, chunked)
    torch.testing.assert_close(loss, want_loss, **TOLERANCE[dtype])
    assert hits == want_hits
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], **TOLERANCE[dtype], msg=name)
    # outside a loss the head gives logits, as generation needs
    with torch.no_grad():
        assert model(input_ids=batch["input_ids"]).logits.shape[-1] == model.config.vocab_size


def test_a_lora_head_keeps_the_plain_loss(tiny):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny["model"])
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert "not a plain linear layer" in head_refusal(model)
