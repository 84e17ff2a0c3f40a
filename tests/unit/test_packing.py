"""Packing: best-fit-decreasing rows (fill, every sample once, determinism, seeded row order, speed) and sample
boundaries passed to attention explicitly (a packed row's loss equals its samples run one by one)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from lora_launch.conf.compose import compose
from lora_launch.data.samples import (
    IGNORE,
    SampleSet,
    best_fit_decreasing_rows,
    build_splits,
    dataset_fingerprint,
    pack,
)
from lora_launch.train.attention import register
from lora_launch.train.data import collate, model_inputs
from lora_launch.train.evaluate import attention_of, token_loss_sum

PAD = 3


def lognormal_lengths(n: int, seq: int, median_share: float, sigma: float, seed: int = 0) -> np.ndarray:
    """Instruction-data-like token counts: log-normal around seq * median_share, clipped to [1, seq] (as
    truncation to train.seq_len leaves them)."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(seq * median_share), sigma, n)), 1, seq).astype(np.int64)


def numbered_samples(lengths: np.ndarray) -> SampleSet:
    """Sample i is the token i repeated (labels: i + 1), so every packed token says where it came from."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    ids = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    return SampleSet(ids, ids + 1, offsets, np.arange(len(lengths), dtype=np.int64))


def fill(rows: SampleSet, seq: int) -> float:
    return float(rows.lengths.sum()) / (len(rows) * seq)


# ---- the rows ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seq, median_share, sigma", [(512, 1 / 4, 1.0), (512, 1 / 8, 0.8), (4096, 1 / 4, 0.9), (4096, 1 / 8, 1.0)]
)
def test_bfd_fills_rows_where_next_fit_does_not(seq, median_share, sigma, capsys):
    samples = numbered_samples(lognormal_lengths(5000, seq, median_share, sigma))
    bfd, next_fit = fill(pack(samples, seq, seed=0), seq), fill(pack(samples, seq, seed=0, strategy="next_fit"), seq)
    with capsys.disabled():
        print(
            f"\nfill at seq {seq}, median seq*{median_share:g}, sigma {sigma}: bfd {bfd:.4f}, next_fit {next_fit:.4f}"
        )
    assert bfd >= 0.98
    assert next_fit < 0.90 and bfd - next_fit > 0.08  # the old packing wastes a tenth or more of every row


@pytest.mark.parametrize("strategy", ["bfd", "next_fit"])
def test_every_sample_once_whole_and_no_row_too_long(strategy):
    seq = 512
    lengths = lognormal_lengths(3000, seq, 1 / 4, 1.0, seed=1)
    samples = numbered_samples(lengths)
    rows = pack(samples, seq, seed=5, strategy=strategy)
    assert rows.lengths.max() <= seq and len(rows.seq_lens) == len(lengths)
    seen = []
    for row in rows:
        assert row["seq_lens"].sum() == len(row["input_ids"])
        ends = np.cumsum(row["seq_lens"])
        for start, end in zip(ends - row["seq_lens"], ends):
            part = row["input_ids"][start:end]
            i = int(part[0])
            assert (part == i).all() and len(part) == lengths[i]  # one sample, whole, in one piece
            assert row["labels"][start] == IGNORE and (row["labels"][start + 1 : end] == i + 1).all()
            assert (row["position_ids"][start:end] == np.arange(end - start)).all()
            seen.append(i)
    assert sorted(seen) == list(range(len(lengths)))


def test_rows_are_a_function_of_seed_and_data_and_shuffled_by_seed():
    samples = numbered_samples(lognormal_lengths(4000, 512, 1 / 4, 0.9, seed=2))
    a, b, other = pack(samples, 512, seed=3), pack(samples, 512, seed=3), pack(samples, 512, seed=4)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.offsets, b.offsets) and np.array_equal(a.seq_lens, b.seq_lens)
    assert np.array_equal(a.record, b.record)
    # another seed: the rows come in another order (and fill as well)
    assert not np.array_equal(a.ids, other.ids) and abs(fill(a, 512) - fill(other, 512)) < 0.002
    # the row order is a seeded shuffle, not best-fit-decreasing's longest-first order
    first = np.array([row["seq_lens"][0] for row in a])
    assert np.corrcoef(np.arange(len(first)), first)[0, 1] ** 2 < 0.01


@pytest.mark.slow  # its size is the point: packing a million samples twice takes some 5 s of CPU
def test_bfd_places_a_million_samples_quickly(capsys):
    """The row assignment alone (lengths in, sample indices per row out): gathering the tokens is numpy."""
    for seq in (512, 4096):
        lengths = lognormal_lengths(1_000_000, seq, 1 / 4, 1.0, seed=3)
        t0 = time.perf_counter()
        rows = best_fit_decreasing_rows(lengths, seq, np.random.default_rng(0).permutation(len(lengths)))
        seconds = time.perf_counter() - t0
        used = np.array([lengths[r].sum() for r in rows])
        with capsys.disabled():
            print(
                f"\nbfd: 1,000,000 samples into {len(rows)} rows of {seq} in {seconds:.2f} s, "
                f"fill {used.sum() / (len(rows) * seq):.4f}"
            )
        assert used.max() <= seq and sorted(i for r in rows for i in r) == list(range(len(lengths)))


def test_pack_refuses_a_sample_longer_than_the_row():
    with pytest.raises(ValueError, match="does not fit rows of 8"):
        pack(numbered_samples(np.array([3, 9])), 8, seed=0)


def test_packed_rows_do_not_depend_on_the_world_size(tiny, tmp_path):
    def splits(*overrides):
        return build_splits(
            compose(
                [
                    *tiny["overrides"],
                    f"run.dir={tmp_path / 'run'}",
                    f"data.cache_dir={tmp_path / 'cache'}",
                    "data.packing=true",
                    *overrides,
                ]
            ),
            _tokenizer(tiny),
            report=False,
        )

    one = splits("launcher.num_processes=1", "train.micro_batch_size=4")
    two = splits("launcher.num_processes=2", "train.micro_batch_size=2")
    assert one.train.packed and dataset_fingerprint(one) == dataset_fingerprint(two)
    assert splits("data.packing_strategy=next_fit").train.seq_lens is not None
    assert fill(one.train, 64) > fill(splits("data.packing_strategy=next_fit").train, 64)


def test_packing_strategy_is_a_typed_choice(tiny, tmp_path):
    from hydra.errors import ConfigCompositionException

    cfg = compose([*tiny["overrides"], f"run.dir={tmp_path / 'run'}"])
    assert cfg.data.packing is False and cfg.data.packing_strategy == "bfd"  # packing stays opt-in
    with pytest.raises(ConfigCompositionException) as failed:
        compose([*tiny["overrides"], f"run.dir={tmp_path / 'run'}", "data.packing_strategy=first_fit"])
    assert "full_key: data.packing_strategy" in str(failed.value.__cause__)


# ---- boundaries given to attention ---------------------------------------------------------------


def _tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["model"])


def _model(tiny, attention: str):
    from transformers import AutoModelForCausalLM

    register()  # sdpa_varlen, as loading a model for training does
    return AutoModelForCausalLM.from_pretrained(tiny["model"], attn_implementation=attention).eval()


def _rows(seq: int = 64):
    """Random samples (prompt tokens masked in some) and their bfd rows: several samples in each row."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 30, 14)
    ids = [rng.integers(4, 250, n) for n in lengths]
    labels = [np.where(np.arange(n) < n // 3, IGNORE, x) for n, x in zip(lengths, ids)]
    samples = SampleSet.from_lists(ids, labels, np.arange(len(lengths)))
    rows = pack(samples, seq, seed=0)
    assert len(rows) < len(samples) / 3
    return samples, rows


def _one_by_one(model, samples) -> tuple[float, int, list[torch.Tensor]]:
    loss, count, logits = 0.0, 0, []
    with torch.no_grad():
        for s in samples:
            batch = collate([s], PAD)
            part, n = token_loss_sum(model, batch)
            loss, count = loss + part.item(), count + n
            logits.append(model(**model_inputs(batch)).logits[0, : len(s["input_ids"])])
    return loss, count, logits


def _packed_logits(model, batch: dict, rows: SampleSet) -> list[torch.Tensor]:
    """Each sample's logits out of a forward of the packed batch, in pack order."""
    with torch.no_grad():
        logits = model(**model_inputs(batch, *attention_of(model))).logits.view(*batch["labels"].shape, -1)
    out = []
    for r, row in enumerate(rows):
        ends = np.cumsum(row["seq_lens"])
        out += [logits[r, start:end] for start, end in zip(ends - row["seq_lens"], ends)]
    return out


@pytest.mark.parametrize("attention", ["sdpa", "eager", "sdpa_varlen"])
def test_a_packed_row_is_its_samples_run_one_by_one(tiny, attention):
    model = _model(tiny, attention)
    samples, rows = _rows()
    batch = collate(list(rows), PAD)
    for r, row in enumerate(rows):  # positions restart at each sample (and in the padding)
        width = batch["input_ids"].shape[1]
        expected = np.concatenate([np.arange(n) for n in [*row["seq_lens"], width - len(row["input_ids"])]])
        assert batch["position_ids"][r].tolist() == expected.tolist()
    separate_loss, separate_count, separate_logits = _one_by_one(model, samples)
    with torch.no_grad():
        packed_loss, packed_count = token_loss_sum(model, batch)
    assert packed_count == separate_count  # the masked first label of each sample is never a target alone
    assert packed_loss.item() == pytest.approx(separate_loss, rel=1e-5)
    order = np.concatenate([_members(rows, samples, r) for r in range(len(rows))])
    for got, i in zip(_packed_logits(model, batch, rows), order):
        torch.testing.assert_close(got, separate_logits[i], rtol=1e-4, atol=1e-4)

    # without boundaries (one long sample per row) the loss is another: the check above can fail
    leaky = collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows], PAD)
    with torch.no_grad():
        leaky_loss, _ = token_loss_sum(model, leaky)
    assert abs(leaky_loss.item() - separate_loss) > 1e-4 * separate_loss


def _members(rows: SampleSet, samples: SampleSet, r: int) -> np.ndarray:
    """Indices in `samples` of the samples of row r, in row order (found by their tokens)."""
    row, out = rows[r], []
    ends = np.cumsum(row["seq_lens"])
    for start, end in zip(ends - row["seq_lens"], ends):
        part = row["input_ids"][start:end]
        out.append(next(i for i, s in enumerate(samples) if np.array_equal(s["input_ids"], part)))
    return np.array(out)


@pytest.mark.parametrize("attention", ["sdpa", "eager", "sdpa_varlen"])
def test_boundaries_come_from_the_batch_not_from_position_ids(tiny, attention):
    """With position ids that do not restart, transformers alone would let samples attend to each other; the
    explicit boundaries still keep them apart (rotary attention depends only on position differences, so
    the loss stays the one-by-one loss up to float rounding)."""
    model = _model(tiny, attention)
    samples, rows = _rows()
    batch = collate(list(rows), PAD)
    separate_loss, _, _ = _one_by_one(model, samples)
    width = batch["input_ids"].shape[1]
    batch["position_ids"] = torch.arange(width).expand(len(rows), width).clone()
    with torch.no_grad():
        loss, _ = token_loss_sum(model, batch)
    assert loss.item() == pytest.approx(separate_loss, rel=1e-4)
    inferred = {k: batch[k] for k in ("input_ids", "position_ids")}
    with torch.no_grad():
        logits = model(**inferred).logits
    from lora_launch.train.fast import cross_entropy_sum

    assert abs(cross_entropy_sum(logits, batch["labels"]).item() - separate_loss) > 1e-4 * separate_loss


def test_flash_attention_gets_the_rows_flattened_with_cu_seq_lens(tiny, monkeypatch):
    """The flash-attention form (FlashAttentionKwargs through transformers' attention interface), checked on
    the CPU with a stand-in kernel registered the way transformers registers flash kernels: it computes
    causal attention within each cu_seq_lens segment of the flattened rows."""
    import torch.nn.functional as F
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    calls = []

    def varlen_attention(
        module,
        query,
        key,
        value,
        attention_mask,
        scaling=None,
        dropout=0.0,
        cu_seq_lens_q=None,
        cu_seq_lens_k=None,
        max_length_q=None,
        max_length_k=None,
        **kwargs,
    ):
        assert attention_mask is None and query.shape[0] == 1  # one flattened row, no mask
        bounds = cu_seq_lens_q.tolist()
        assert cu_seq_lens_k is cu_seq_lens_q and bounds[-1] == query.shape[2]
        assert isinstance(max_length_q, int) and max_length_q == max(np.diff(bounds)) == max_length_k
        out = torch.empty_like(query)
        for lo, hi in zip(bounds, bounds[1:]):
            out[:, :, lo:hi] = F.scaled_dot_product_attention(
                query[:, :, lo:hi], key[:, :, lo:hi], value[:, :, lo:hi], is_causal=True, scale=scaling
            )
        calls.append(len(bounds) - 1)
        return out.transpose(1, 2).contiguous(), None

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "varlen_stand_in", varlen_attention)
    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS, "varlen_stand_in", flash_attention_mask)
    model = _model(tiny, "sdpa")
    model.config._attn_implementation = "varlen_stand_in"
    samples, rows = _rows()
    batch = collate(list(rows), PAD)
    inputs = model_inputs(batch, *attention_of(model))
    assert inputs["input_ids"].shape == (1, batch["input_ids"].numel()) and "attention_mask" not in inputs
    separate_loss, _, _ = _one_by_one(_model(tiny, "sdpa"), samples)
    with torch.no_grad():
        loss, _ = token_loss_sum(model, batch)
    padded_rows = int((batch["attention_mask"].sum(1) < batch["input_ids"].shape[1]).sum())
    assert calls and calls[0] == len(samples) + padded_rows  # every sample and each row's padding
    assert loss.item() == pytest.approx(separate_loss, rel=1e-5)


def test_sdpa_varlen_flattens_packed_rows_and_is_sdpa_otherwise(tiny):
    """Packed rows reach sdpa_varlen's attention as one row with their boundaries (and no mask is built for
    them); a batch that is not packed, and generation, are sdpa's to the bit."""
    from transformers import AttentionInterface

    varlen, sdpa = _model(tiny, "sdpa_varlen"), _model(tiny, "sdpa")
    samples, rows = _rows()
    batch = collate(list(rows), PAD)
    inputs = model_inputs(batch, *attention_of(varlen))
    assert inputs["input_ids"].shape == (1, batch["input_ids"].numel())
    seen = []
    original = AttentionInterface._global_mapping["sdpa_varlen"]

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((query.shape, attention_mask, kwargs.get("cu_seq_lens_q")))
        return original(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("sdpa_varlen", spy)
    try:
        with torch.no_grad():
            varlen(**inputs)
    finally:
        AttentionInterface.register("sdpa_varlen", original)
    assert len(seen) == varlen.config.num_hidden_layers
    assert all(mask is None and cu is batch["cu_seq_lens"] for _, mask, cu in seen)

    plain = collate(list(samples)[:4], PAD)  # padded rows, not packed
    assert plain["attention_mask"].min() == 0
    with torch.no_grad():
        assert torch.equal(
            varlen(**model_inputs(plain, *attention_of(varlen))).logits,
            sdpa(**model_inputs(plain, *attention_of(sdpa))).logits,
        )
    prompt = plain["input_ids"][:1, :5]
    assert torch.equal(
        varlen.generate(prompt, max_new_tokens=6, do_sample=False),
        sdpa.generate(prompt, max_new_tokens=6, do_sample=False),
    )


def test_sdpa_varlen_keeps_a_sliding_window_within_each_sample():
    """A Mistral-style model whose layers see 4 tokens back: packed rows under sdpa_varlen give each sample the
    logits it has alone under sdpa (the window applies, and no sample sees another)."""
    from transformers import AutoModelForCausalLM, MistralConfig

    register()
    config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        sliding_window=4,
    )
    torch.manual_seed(0)
    varlen = AutoModelForCausalLM.from_config(MistralConfig(**config), attn_implementation="sdpa_varlen").eval()
    sdpa = AutoModelForCausalLM.from_config(MistralConfig(**config), attn_implementation="sdpa").eval()
    sdpa.load_state_dict(varlen.state_dict())
    lengths = [9, 3, 12]
    ids = [torch.randint(0, 64, (n,)).numpy() for n in lengths]
    rows = pack(SampleSet.from_lists(ids, ids, np.arange(3)), 32, seed=0)
    batch = collate(list(rows), PAD)
    with torch.no_grad():
        packed = varlen(**model_inputs(batch, *attention_of(varlen))).logits[0]
        order = [
            next(i for i in range(3) if np.array_equal(ids[i], rows[0]["input_ids"][lo : lo + n]))
            for lo, n in zip(np.cumsum([0, *rows[0]["seq_lens"][:-1]]), rows[0]["seq_lens"])
        ]
        alone = torch.cat([sdpa(input_ids=torch.as_tensor(ids[i])[None]).logits[0] for i in order])
    torch.testing.assert_close(packed[: sum(lengths)], alone, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the window matters here: without it the longest sample's logits are others
        unwindowed = AutoModelForCausalLM.from_config(
            MistralConfig(**{**config, "sliding_window": None}), attn_implementation="sdpa"
        ).eval()
        unwindowed.load_state_dict(varlen.state_dict())
        longest = torch.as_tensor(ids[2])[None]
        assert not torch.allclose(unwindowed(input_ids=longest).logits, sdpa(input_ids=longest).logits, atol=1e-3)


@pytest.mark.parametrize("api", ["window_size, scale, enable_gqa", "is_causal"])
def test_sdpa_varlen_calls_the_kernel_as_this_torch_takes_it(monkeypatch, api):
    """The GPU path, on the CPU with stand-in kernels of the two forms torch's varlen_attn has had (causal as a
    window with scale and grouped KV heads; or is_causal alone, which scales by 1/sqrt(dim) and needs as many
    KV heads as query heads): the result is sdpa run on each sample alone, with the model's own scaling."""
    import torch.nn.functional as F

    from lora_launch.train import attention

    takes = {name.strip() for name in api.split(",")}

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        assert set(kwargs) <= takes and cu_q.dtype == torch.int32 and cu_k is cu_q
        assert max_q == max_k == int(cu_q.diff().max())
        assert kwargs.get("window_size", (-1, 0)) == (-1, 0) and kwargs.get("is_causal", True)
        if "enable_gqa" not in takes:
            assert k.shape[1] == q.shape[1]
        out = torch.empty_like(q)
        for lo, hi in zip(cu_q.tolist(), cu_q.tolist()[1:]):
            out[lo:hi] = F.scaled_dot_product_attention(
                *(t[lo:hi].transpose(0, 1) for t in (q, k, v)),
                is_causal=True,
                scale=kwargs.get("scale"),
                enable_gqa=kwargs.get("enable_gqa", False),
            ).transpose(0, 1)
        return out

    monkeypatch.setattr(attention, "_KERNEL", (kernel, frozenset(takes)))
    torch.manual_seed(0)
    lengths = [7, 1, 12, 5]
    q, k, v = torch.randn(30, 8, 16), torch.randn(30, 2, 16), torch.randn(30, 2, 16)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
    scaling = 0.3  # not 1/sqrt(16): the kernel without `scale` gets it folded into the query
    got = attention._flash(q[:25], k[:25], v[:25], cu, max(lengths), scaling)
    want = attention._masked(q[:25], k[:25], v[:25], cu, scaling)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    first = F.scaled_dot_product_attention(
        q[:7].transpose(0, 1),
        k[:7].transpose(0, 1),
        v[:7].transpose(0, 1),
        is_causal=True,
        scale=scaling,
        enable_gqa=True,
    ).transpose(0, 1)
    torch.testing.assert_close(want[:7], first, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_flex_attention_gets_a_block_mask(tiny):
    """flex_attention on the CPU compiles its kernel first (about half a minute here)."""
    model = _model(tiny, "flex_attention")
    samples, rows = _rows()
    batch = collate(list(rows), PAD)
    from torch.nn.attention.flex_attention import BlockMask

    assert isinstance(model_inputs(batch, *attention_of(model))["attention_mask"], BlockMask)
    separate_loss, _, _ = _one_by_one(model, samples)
    with torch.no_grad():
        loss, _ = token_loss_sum(model, batch)
    assert loss.item() == pytest.approx(separate_loss, rel=1e-5)
