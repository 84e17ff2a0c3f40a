"""Data: sources, formats and templates, prompt masking, errors, splits, packing, grouping, cache."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

from lora_launch.conf.compose import compose
from lora_launch.conf.schema import ConfigError
from lora_launch.data import sources as data_sources
from lora_launch.data.samples import IGNORE, DataError, build_splits, dataset_fingerprint, pack
from lora_launch.train.data import SampleStream, collate, train_stream

ROWS = [
    {"instruction": f"Reverse: {a} {b}", "input": "", "output": f"{b} {a}"}
    for a in ("cat", "dog", "sun", "red")
    for b in ("blue", "tree", "fish", "bird", "moon")
]


@pytest.fixture(scope="module")
def tok(tiny):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny["model"])
    return t


def cfg_for(tiny, tmp_path, *overrides):
    return compose(
        [
            f"model.path={tiny['model']}",
            "data.source=local",
            f"run.dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "train.seq_len=64",
            *overrides,
        ]
    )


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def response_text(tok, sample) -> str:
    ids = [i for i, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE]
    return tok.decode(ids)


# ---- sources ---------------------------------------------------------------------------------


def test_jsonl_json_csv_parquet_and_directory_give_the_same_samples(tiny, tok, tmp_path):
    import pandas as pd

    write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    pd.DataFrame(ROWS).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "part1.jsonl", ROWS[:7])
    write_jsonl(tmp_path / "dir" / "part2.jsonl", ROWS[7:])
    got = {}
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet", "dir"):
        splits = build_splits(cfg_for(tiny, tmp_path, f"data.path={tmp_path / name}", "data.val_split=0"), tok)
        got[name] = [s["input_ids"].tolist() for s in splits.train]
    assert len(got["d.jsonl"]) == len(ROWS)
    assert all(v == got["d.jsonl"] for v in got.values())


# ---- errors that name the file, line or field --------------------------------------------------


def test_missing_file(tiny, tok, tmp_path):
    with pytest.raises(DataError, match=r"data.path=.*nope.jsonl: no such file"):
        build_splits(cfg_for(tiny, tmp_path, f"data.path={tmp_path / 'nope.jsonl'}"), tok)


def test_malformed_jsonl_line_is_named(tiny, tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + '\n{"instruction": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: not valid JSON"):
        build_splits(cfg_for(tiny, tmp_path, f"data.path={path}"), tok)


def test_non_utf8_bytes_are_located(tiny, tok, tmp_path):
    path = tmp_path / "latin.jsonl"
    good = (json.dumps(ROWS[0]) + "\n").encode()
    path.write_bytes(good + b'{"instruction": "caf\xe9", "output": "x"}\n')
    offset = len(good) + len(b'{"instruction": "caf')
    with pytest.raises(DataError, match=rf"latin.jsonl:2: not UTF-8 \(byte 0xe9 at byte offset {offset}\)"):
        build_splits(cfg_for(tiny, tmp_path, f"data.path={path}"), tok)


def test_missing_field_lists_the_fields_present(tiny, tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(
        DataError,
        match=r"no field 'instruction' \(data.fields.instruction\); fields present: "
        r"\['prompt', 'response'\]",
    ):
        build_splits(cfg_for(tiny, tmp_path, f"data.path={path}"), tok)
    with pytest.raises(DataError, match=r"no field 'text' \(data.text_field\)"):
        build_splits(cfg_for(tiny, tmp_path, f"data.path={path}", "data.format=text"), tok)
    # renaming the fields makes it work
    splits = build_splits(
        cfg_for(
            tiny,
            tmp_path,
            f"data.path={path}",
            "data.fields.instruction=prompt",
            "data.fields.output=response",
            "data.val_split=0",
        ),
        tok,
    )
    assert response_text(tok, splits.train[0]) == " b </s>"


def test_template_needing_a_field_the_data_lacks(tiny, tok, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q?", "answer": "a"}])
    with pytest.raises(
        DataError,
        match=r"no field 'context' \(data.fields.context\); fields present: "
        r"\['answer', 'question'\]",
    ):
        build_splits(cfg_for(tiny, tmp_path, f"data.path={path}", "data.format=qa"), tok)
    with pytest.raises(DataError, match="data.template=tokenizer: the tokenizer .* has no chat template"):
        build_splits(cfg_for(tiny, tmp_path, f"data.path={path}", "data.format=qa", "data.template=tokenizer"), tok)


def test_null_value_names_the_record(tiny, tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:3] + [{"instruction": "x", "output": None}])
    with pytest.raises(DataError, match=r"d.jsonl: record 4: field 'output' \(data.fields.output\) is missing or null"):
        build_splits(cfg_for(tiny, tmp_path, f"data.path={path}"), tok)


def test_every_sample_too_long_without_truncation(tiny, tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(
        DataError,
        match=r"every sample is longer than train.seq_len=8 \(shortest \d+ tokens\); "
        r"raise train.seq_len or set data.truncation=true",
    ):
        build_splits(cfg_for(tiny, tmp_path, f"data.path={path}", "data.truncation=false", "train.seq_len=8"), tok)


def test_empty_after_filtering(tiny, tok, tmp_path):
    # the prompt alone fills seq_len: truncation leaves no response token in any sample
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "word " * 40, "output": "x"}] * 3)
    with pytest.raises(
        DataError,
        match=r"no sample left after filtering \(0 longer than train.seq_len=16, "
        r"3 without response tokens",
    ):
        build_splits(cfg_for(tiny, tmp_path, f"data.path={path}", "train.seq_len=16"), tok)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records|could not read"):
        build_splits(cfg_for(tiny, tmp_path, f"data.path={tmp_path / 'empty.jsonl'}"), tok)


# ---- formats, templates and masking ------------------------------------------------------------


def one_sample(tiny, tok, tmp_path, row, *overrides):
    path = write_jsonl(tmp_path / "one.jsonl", [row])
    return build_splits(
        cfg_for(tiny, tmp_path, f"data.path={path}", "data.val_split=0", "train.seq_len=512", *overrides), tok
    ).train[0]


def test_llama2_instruction_masks_the_prompt(tiny, tok, tmp_path):
    s = one_sample(tiny, tok, tmp_path, {"instruction": "Reverse: cat dog", "input": "", "output": "dog cat"})
    assert tok.decode(s["input_ids"]) == "<s>[INST] Reverse: cat dog [/INST] dog cat </s>"
    assert response_text(tok, s) == " dog cat </s>"
    assert list(s["input_ids"]).count(tok.bos_token_id) == 1
    full = one_sample(
        tiny, tok, tmp_path, {"instruction": "Reverse: cat dog", "output": "dog cat"}, "data.train_on_prompt=true"
    )
    assert full["labels"].tolist() == full["input_ids"].tolist()


def test_alpaca_and_chatml_templates(tiny, tok, tmp_path):
    row = {"instruction": "Reverse", "input": "cat dog", "output": "dog cat"}
    s = one_sample(tiny, tok, tmp_path, row, "data.template=alpaca", "train.seq_len=512")
    text = tok.decode(s["input_ids"])
    assert text.startswith("<s>Below is an instruction that describes a task, paired with an input")
    assert text.endswith("### Instruction:\nReverse\n\n### Input:\ncat dog\n\n### Response:\ndog cat</s>")
    assert response_text(tok, s) == "dog cat</s>"
    s = one_sample(
        tiny, tok, tmp_path, row, "data.template=chatml", "data.system_prompt=Be brief.", "train.seq_len=512"
    )
    assert tok.decode(s["input_ids"]) == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        "Reverse\n\ncat dog<|im_end|>\n<|im_start|>assistant\ndog cat<|im_end|></s>"
    )
    assert response_text(tok, s) == "dog cat<|im_end|></s>"


def test_messages_mask_every_assistant_turn(tiny, tok, tmp_path):
    row = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "one"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "two"},
        ]
    }
    s = one_sample(tiny, tok, tmp_path, row, "data.format=messages")
    assert tok.decode(s["input_ids"]) == (
        "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nhi [/INST] one </s><s>[INST] again [/INST] two </s>"
    )
    assert response_text(tok, s) == " one </s> two </s>"


def test_tokenizer_chat_template(tiny, tok, tmp_path):
    tok2 = type(tok).from_pretrained(tiny["model"])
    tok2.chat_template = (
        "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
    )
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    s = build_splits(
        cfg_for(
            tiny, tmp_path, f"data.path={path}", "data.val_split=0", "data.format=messages", "data.template=tokenizer"
        ),
        tok2,
    ).train[0]
    assert tok2.decode(s["input_ids"]) == "<user>hi\n<assistant>yo\n"
    assert response_text(tok2, s) == "yo\n"


def test_task_types_classification_summary_qa(tiny, tok, tmp_path):
    s = one_sample(
        tiny,
        tok,
        tmp_path,
        {"text": "great film", "label": 1},
        "data.format=classification",
        "data.label_names=[negative,positive]",
    )
    assert tok.decode(s["input_ids"]) == (
        "<s>[INST] Classify the following text. Answer with one of: negative, "
        "positive.\n\ngreat film [/INST] positive </s>"
    )
    s = one_sample(tiny, tok, tmp_path, {"document": "long text", "summary": "short"}, "data.format=summary")
    assert response_text(tok, s) == " short </s>" and "Summarize the following document." in tok.decode(s["input_ids"])
    s = one_sample(
        tiny,
        tok,
        tmp_path,
        {"ctx": "Rome is in Italy.", "q": "Where is Rome?", "a": "Italy"},
        "data.format=qa",
        "data.fields.context=ctx",
        "data.fields.question=q",
        "data.fields.answer=a",
    )
    assert "Context: Rome is in Italy.\n\nQuestion: Where is Rome? [/INST]" in tok.decode(s["input_ids"])
    assert response_text(tok, s) == " Italy </s>"


def test_guanaco_text_keeps_one_bos_and_one_eos(tiny, tok, tmp_path):
    text = "<s>[INST] Where is Italy? [/INST] In Europe. </s>"
    s = one_sample(tiny, tok, tmp_path, {"text": text}, "data.format=text")
    ids = s["input_ids"].tolist()
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    assert s["labels"].tolist() == ids  # pre-formatted text trains on the whole text
    plain = one_sample(tiny, tok, tmp_path, {"text": "[INST] Where is Italy? [/INST] In Europe. "}, "data.format=text")
    assert plain["input_ids"].tolist() == ids  # BOS/EOS added when the text lacks them


# ---- splits, report, cache, fingerprint --------------------------------------------------------


def test_val_split_is_drawn_by_seed(tiny, tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)

    def val_ids(seed):
        s = build_splits(cfg_for(tiny, tmp_path, f"data.path={path}", "data.val_split=0.25", f"seed={seed}"), tok)
        assert len(s.train) + len(s.val) == len(ROWS) and len(s.val) == 5
        return sorted(tuple(x["input_ids"].tolist()) for x in s.val)

    assert val_ids(0) == val_ids(0)
    assert val_ids(0) != val_ids(1)


def test_val_split_name_reads_the_datasets_own_split(tiny, tok, tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    write_jsonl(d / "train.jsonl", ROWS[:15])
    write_jsonl(d / "validation.jsonl", ROWS[15:])
    s = build_splits(cfg_for(tiny, tmp_path, f"data.path={d}", "data.val_split_name=validation"), tok)
    assert (len(s.train), len(s.val)) == (15, 5)
    with pytest.raises(DataError, match="no file for split 'test'"):
        build_splits(cfg_for(tiny, tmp_path, f"data.path={d}", "data.val_split_name=test"), tok)


def test_report_counts_truncation_and_lengths(tiny, tok, tmp_path):
    rows = ROWS[:4] + [{"instruction": "Reverse: " + "cat " * 30, "output": "x y"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = cfg_for(tiny, tmp_path, f"data.path={path}", "data.val_split=0", "train.seq_len=24")
    s = build_splits(cfg, tok)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    stats = report["sources"]["train"]
    assert stats["records"] == 5 and stats["truncated"] == 0 and stats["no_target"] == 1
    assert stats["raw_length"]["max"] > 24 and report["length"]["max"] <= 24
    assert report["fingerprint"] == dataset_fingerprint(s) and report["train_samples"] == 4
    cfg = cfg_for(
        tiny, tmp_path, f"data.path={path}", "data.val_split=0", "train.seq_len=24", "data.train_on_prompt=true"
    )
    stats = build_splits(cfg, tok).report["sources"]["train"]
    assert stats["truncated"] == 1 and stats["no_target"] == 0


def test_tokenised_once_then_read_from_cache(tiny, tok, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = cfg_for(tiny, tmp_path, f"data.path={path}")
    first = build_splits(cfg, tok)
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.npz"))) == 1

    def no_reading(*a, **k):
        raise AssertionError("read the data again")

    monkeypatch.setattr(data_sources, "load_rows", no_reading)
    second = build_splits(cfg, tok)
    assert dataset_fingerprint(first) == dataset_fingerprint(second)
    with pytest.raises(AssertionError, match="read the data again"):  # another seq_len is another cache entry
        build_splits(cfg_for(tiny, tmp_path, f"data.path={path}", "train.seq_len=32"), tok)


def test_fingerprint_follows_the_tokens(tiny, tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    a = dataset_fingerprint(build_splits(cfg_for(tiny, tmp_path, f"data.path={path}"), tok))
    b = dataset_fingerprint(
        build_splits(cfg_for(tiny, tmp_path, f"data.path={path}", "data.train_on_prompt=true"), tok)
    )
    assert a != b and len(a) == 64


def test_an_edit_in_place_keeping_size_and_mtime_is_tokenised_again(tiny, tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = cfg_for(tiny, tmp_path, f"data.path={path}", "data.val_split=0")
    fingerprint = data_sources.source_fingerprint(cfg.data, "train")
    first = build_splits(cfg, tok)
    assert data_sources.source_fingerprint(cfg.data, "train") == fingerprint  # nothing changed, nor the key

    st = path.stat()
    path.write_text(path.read_text().replace("Reverse:", "Mirror: "))  # same length: same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert data_sources.source_fingerprint(cfg.data, "train") != fingerprint
    second = build_splits(cfg, tok)
    assert dataset_fingerprint(second) != dataset_fingerprint(first)
    text = tok.decode(second.train[0]["input_ids"])
    assert "Mirror" in text and "Reverse" not in text


# ---- packing and length grouping ----------------------------------------------------------------


def _loss(model, samples, pad_id):
    from lora_launch.train.evaluate import token_loss_sum

    with torch.no_grad():
        loss, n = token_loss_sum(model, collate(samples, pad_id))
    return loss.item(), n


def test_packed_loss_equals_unpacked_loss(tiny, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = cfg_for(tiny, tmp_path, f"data.path={path}", "data.val_split=0", "data.train_on_prompt=true")
    samples = build_splits(cfg, tok).train
    packed = pack(samples, 64, seed=0)
    assert len(packed) < len(samples) / 2 and packed.lengths.max() <= 64
    model = AutoModelForCausalLM.from_pretrained(tiny["model"], attn_implementation="sdpa").eval()
    unpacked_sum, unpacked_n = _loss(model, list(samples), tok.pad_token_id)
    packed_sum, packed_n = _loss(model, list(packed), tok.pad_token_id)
    assert packed_n == unpacked_n - 0  # first tokens are never targets, packed or not
    assert packed_sum == pytest.approx(unpacked_sum, rel=1e-5)
    # the same rows without restarting positions (attention across samples) give another loss;
    # a random tiny model attends almost uniformly, so the gap is small, but 10x the tolerance
    leaky = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in packed]
    assert abs(_loss(model, leaky, tok.pad_token_id)[0] - unpacked_sum) > 1e-4 * unpacked_sum


def test_packing_in_the_config_packs_train_only(tiny, tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    s = build_splits(cfg_for(tiny, tmp_path, f"data.path={path}", "data.packing=true", "data.val_split=0.2"), tok)
    assert "position_ids" in s.train[0] and "position_ids" not in s.val[0]
    plain = build_splits(cfg_for(tiny, tmp_path, f"data.path={path}", "data.val_split=0.2"), tok)
    assert int(s.train.lengths.sum()) == int(plain.train.lengths.sum()) and len(s.train) < len(plain.train)


def test_group_by_length_is_a_resumable_permutation(tiny, tok, tmp_path):
    rng = np.random.default_rng(3)
    lengths = rng.integers(5, 100, 97)
    a = SampleStream(97, seed=5, lengths=lengths, group_size=16)
    epoch0 = [a.index(p) for p in range(97)]
    assert sorted(epoch0) == list(range(97))
    for lo in range(0, 97, 16):
        group = lengths[epoch0[lo : lo + 16]]
        assert (np.diff(group) <= 0).all()  # longest first within each group
    b = SampleStream(97, seed=5, lengths=lengths, group_size=16)
    assert [b.index(p) for p in range(250, 100, -7)] == [a.index(p) for p in range(250, 100, -7)]
    assert [a.index(p) for p in range(97, 194)] != epoch0
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = cfg_for(tiny, tmp_path, f"data.path={path}", "data.group_by_length=true")
    stream = train_stream(cfg, build_splits(cfg, tok))
    assert stream.group_size == 50 * cfg.train.micro_batch_size and stream.lengths is not None


# ---- data.format=auto and data.template=auto ----------------------------------------------------


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages"),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "sharegpt"),
        ({"instruction": "hi", "input": "", "output": "yo"}, "instruction"),
        ({"prompt": "hi", "completion": " yo"}, "prompt_completion"),
        ({"text": "hi yo"}, "text"),
    ],
)
def test_auto_format_follows_the_fields(tiny, tok, tmp_path, row, fmt):
    path = write_jsonl(tmp_path / "d.jsonl", [row] * 3)
    splits = build_splits(
        cfg_for(tiny, tmp_path, f"data.path={path}", "data.val_split=0", "data.format=auto", "data.template=llama2"),
        tok,
        report=False,
    )
    assert splits.report["format"] == fmt
    text = tok.decode(splits.train[0]["input_ids"])
    assert "hi" in text and "yo" in text


def test_auto_format_without_a_known_layout_names_the_fields(tiny, tok, tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question_text": "q", "reply": "r"}])
    with pytest.raises(
        DataError,
        match=r"odd.jsonl: data.format=auto found no known layout in the fields "
        r"\['question_text', 'reply'\].*set data.format",
    ):
        build_splits(cfg_for(tiny, tmp_path, f"data.path={path}", "data.format=auto"), tok)


def test_sharegpt_and_prompt_completion_mask_the_prompt(tiny, tok, tmp_path):
    s = one_sample(
        tiny,
        tok,
        tmp_path,
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "one"},
            ]
        },
        "data.format=sharegpt",
    )
    assert tok.decode(s["input_ids"]) == "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nhi [/INST] one </s>"
    assert response_text(tok, s) == " one </s>"
    # prompt-completion is written as it is (no template): the loss on the completion and EOS
    s = one_sample(
        tiny, tok, tmp_path, {"prompt": "Reverse: cat dog =", "completion": " dog cat"}, "data.format=prompt_completion"
    )
    assert tok.decode(s["input_ids"]) == "<s>Reverse: cat dog = dog cat</s>"
    assert response_text(tok, s) == " dog cat</s>"


def test_auto_template_uses_the_tokenizers_chat_template_else_chatml(tok):
    from omegaconf import OmegaConf

    from lora_launch.data.templates import FALLBACK_TEMPLATE, resolve_template

    d = OmegaConf.create({"template": "auto"})
    plain_tok = copy.deepcopy(tok)
    plain_tok.chat_template = None
    assert resolve_template(d, plain_tok) == FALLBACK_TEMPLATE == "chatml"
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    assert resolve_template(d, chat_tok) == "tokenizer"
    chat_tok.chat_template = "{{ raise_exception('no') }}"  # a template that cannot render: the fallback
    assert resolve_template(d, chat_tok) == "chatml"


def test_prompts_for_generation_follow_the_template(tok):
    from omegaconf import OmegaConf

    from lora_launch.data.templates import prompt_text

    d = OmegaConf.create({"format": "instruction", "template": "alpaca", "system_prompt": None})
    text = prompt_text(d, tok, "Reverse", input_text="cat dog")
    assert text.endswith("### Instruction:\nReverse\n\n### Input:\ncat dog\n\n### Response:\n")
    d = OmegaConf.create({"format": "messages", "template": "chatml", "system_prompt": None})
    text = prompt_text(
        d,
        tok,
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
    )
    assert text == (
        "<s><|im_start|>system\nS<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n"
        "b<|im_end|>\n<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"
    )
    d = OmegaConf.create({"format": "text", "template": "auto", "system_prompt": None})
    assert prompt_text(d, tok, "raw text") == "raw text"


def test_unknown_tokens_are_counted_and_warned_about(tmp_path, capsys):
    """The bundled tiny model's byte-level tokenizer knows any text; words a tokenizer lacks become <unk>:
    the report gives their share and a warning says what it means."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lora_launch.data.samples import unknown_tokens_warning
    from lora_launch.data.tokenizer import load_tokenizer

    def splits_of(rows, *overrides):
        path = write_jsonl(tmp_path / "d.jsonl", rows)
        cfg = compose(
            [
                "data.source=local",
                f"data.path={path}",
                f"data.cache_dir={tmp_path / 'c'}",
                f"run.dir={tmp_path / 'run'}",
                "data.val_split=0",
                *overrides,
            ]
        )
        return build_splits(cfg, load_tokenizer(cfg)), load_tokenizer(cfg)

    foreign = [{"instruction": "Translate: the cat sleeps", "output": "le chat dort, grüße aus 東京 🍕"}] * 20
    for rows in ([{"instruction": "Where is Italy?", "output": "Italy is in Europe."}] * 20, foreign):
        splits, _ = splits_of(rows)
        assert splits.report["sources"]["train"]["unknown_tokens"] == 0.0
        assert unknown_tokens_warning(splits.report) is None
    # a word-level tokenizer that knows only the demo's words
    words = ["<unk>", "<s>", "</s>", "<pad>", "Where", "is", "Italy", "?", "in", "Europe", "."]
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=word_level, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    ).save_pretrained(tmp_path / "words")
    splits, tok = splits_of(foreign, f"model.tokenizer={tmp_path / 'words'}")
    ids = np.concatenate([s["input_ids"] for s in splits.train])
    share = splits.report["sources"]["train"]["unknown_tokens"]
    assert share == pytest.approx(float((ids == tok.unk_token_id).mean()), abs=1e-6) and share > 0.01
    out = capsys.readouterr().out
    assert f"{share:.2%} unknown tokens" in out and "warning: " in out and "unknown to the tokenizer" in out


# ---- several sources mixed by weight ----------------------------------------------------------------


def test_sources_are_mixed_by_weight_deterministically(tiny, tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)  # 20 records
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"plain text number {i}"} for i in range(10)])
    sources = f"data.sources=[{{path: {a}, weight: 3}},{{path: {b}, weight: 1, format: text}}]"
    cfg = cfg_for(tiny, tmp_path, sources, "data.val_split=0.1")
    splits = build_splits(cfg, tok, report=False)
    mixture = {k: v for k, v in splits.report["sources"].items()}
    drawn = [v["train_samples_drawn"] for v in mixture.values()]
    assert sum(drawn) == len(splits.train) == 18 + 9 and drawn == [round(27 * 3 / 4), round(27 / 4)]
    assert len(splits.val) == 2 + 1  # each source keeps its own validation share
    texts = [tok.decode(s["input_ids"]) for s in splits.train]
    assert sum("plain text" in x for x in texts) == drawn[1] and sum("[INST]" in x for x in texts) == drawn[0]
    again = build_splits(cfg, tok, report=False)
    assert dataset_fingerprint(again) == dataset_fingerprint(splits)


@pytest.mark.parametrize(
    "entry, message",
    [
        ("{path: a.jsonl, weight: 0}", r"data.sources\[0\].weight=0 must be a number > 0"),
        ("{path: a.jsonl, colour: red}", r"data.sources\[0\]: unknown key\(s\) \['colour'\]"),
        ("{weight: 1}", r"data.sources\[0\]: no path"),
    ],
)
def test_bad_source_entries_are_named(entry, message):
    with pytest.raises(ConfigError, match=message):
        compose(["data.source=local", f"data.sources=[{entry}]"])
