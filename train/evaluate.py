"""Loss and generation, one implementation for the training loop (every rank) and for `lora-launch eval`
and `generate` after training (one process)."""

from __future__ import annotations

import math

import torch

from lora_launch.data.samples import IGNORE
from lora_launch.train import fast
from lora_launch.train.chunked_loss import ChunkedLoss
from lora_launch.train.data import collate, model_inputs


def attention_of(model) -> tuple[str, torch.dtype]:
    """The attn_implementation a (PEFT, DDP or DeepSpeed wrapped) model runs, and its activations' dtype."""
    while hasattr(model, "module"):  # DDP, DeepSpeed
        model = model.module
    return str(model.config._attn_implementation), model.get_input_embeddings().weight.dtype


def forward_loss_sum(model, batch: dict, ce=fast.cross_entropy_sum, hits: bool = False):
    """Summed next-token cross-entropy over the unmasked labels (no host sync); with `hits`, also how many
    of those tokens the model's top prediction gets right (for the mean token accuracy). `ce`: a summed
    cross-entropy of logits and labels, or a ChunkedLoss (the output head computes the loss itself)."""
    if isinstance(ce, ChunkedLoss):
        with ce.labels(batch["labels"]):
            loss = model(**model_inputs(batch, *attention_of(model))).logits  # the head returned the loss
        return (loss, ce.hits) if hits else loss
    logits = model(**model_inputs(batch, *attention_of(model))).logits
    logits = logits.view(*batch["labels"].shape, -1)  # packed rows under flash attention run as one row
    loss = ce(logits, batch["labels"])
    if not hits:
        return loss
    return loss, correct_tokens(logits.detach(), batch["labels"])


def correct_tokens(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many unmasked next tokens are the logits' argmax (a device scalar, no host sync)."""
    target = labels[:, 1:]
    return ((logits[:, :-1].argmax(-1) == target) & (target != IGNORE)).sum()


def token_loss_sum(model, batch: dict, ce=fast.cross_entropy_sum) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the unmasked labels, and how many there were."""
    return forward_loss_sum(model, batch, ce), int((batch["labels"][:, 1:] != IGNORE).sum())


@torch.no_grad()
def loss_sum(
    model,
    samples,
    micro: int,
    pad_id: int,
    device,
    rank: int = 0,
    world: int = 1,
    max_batches: int = -1,
    ce=fast.cross_entropy_sum,
) -> tuple[float, int]:
    """This rank's share of the summed token loss over `samples`, and its target-token count.

    Round b gives rank r the samples [b*micro*world + r*micro, +micro); every rank runs the same
    number of forwards (ZeRO-3 gathers weights collectively), so a rank past the end repeats a
    sample and does not count it. Summed over ranks, the result is the same for any world size.
    """
    per_round = micro * world
    rounds = math.ceil(len(samples) / per_round)
    if max_batches > 0:
        rounds = min(rounds, max_batches)
    total, count = 0.0, 0
    for b in range(rounds):
        lo = b * per_round + rank * micro
        mine = samples[lo : lo + micro]
        batch = {
            k: v.to(device) if isinstance(v, torch.Tensor) else v
            for k, v in collate(mine or samples[:1], pad_id).items()
        }
        loss, n = token_loss_sum(model, batch, ce)
        if mine:
            total, count = total + loss.item(), count + n
    return total, count


def prompt_ids(tok, prompt: str) -> list[int]:
    """The prompt's token ids with one BOS in front (none added if the text already starts with it)."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    return ids


@torch.no_grad()
def complete(
    model,
    tok,
    prompt: str,
    max_new_tokens: int,
    sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    synced_gpus: bool = False,
    device=None,
) -> str:
    """The model's continuation of `prompt`: greedy, or sampled with temperature / top-p.

    synced_gpus: every rank runs the same number of steps (ZeRO-3 and FSDP2 shard the weights).
    device: where it computes, when that is not where its weights are kept (FSDP2 offloads them to CPU).
    """
    ids = prompt_ids(tok, prompt)
    input_ids = torch.tensor([ids], device=device or model.device)
    kwargs = dict(do_sample=sample)
    if sample:
        torch.manual_seed(seed)
        kwargs.update(temperature=temperature, top_p=top_p)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
        synced_gpus=synced_gpus,
        **kwargs,
    )
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True)
