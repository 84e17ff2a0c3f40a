"""From a dataset record to text segments: the data formats (what the fields mean) and the
prompt templates (how a conversation is written out).

A format turns a record into a conversation: an optional system prompt and a list of turns
(`{"role": "user" | "assistant", "content": …}`, a user turn may carry a separate `input`).
A template writes the conversation as a list of `(text, is_response)` segments; response
segments are what the loss is computed on when prompts are masked. BOS/EOS appear in the
text as the tokenizer's own special-token strings, so they tokenize to their ids exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from lora_launch.conf.errors import UserError


class DataError(UserError, ValueError):
    """Data that cannot be used; the message names the file, line or field."""


Conversation = tuple[str | None, list[dict]]
Segments = list[tuple[str, bool]]

TASK_INSTRUCTIONS = {
    "classification": "Classify the following text.",
    "summary": "Summarize the following document.",
    "qa": "Answer the question using the context.",
}

# Fields each format reads: (config key under data.fields or `text_field`, required).
FORMAT_FIELDS = {
    "text": [("text_field", True)],
    "instruction": [("instruction", True), ("input", False), ("output", True), ("system", False)],
    "messages": [("messages", True)],
    "sharegpt": [("conversations", True)],
    "prompt_completion": [("prompt", True), ("completion", True)],
    "classification": [("text_field", True), ("label", True), ("system", False)],
    "summary": [("document", True), ("summary", True), ("system", False)],
    "qa": [("context", True), ("question", True), ("answer", True), ("system", False)],
}


def field_name(d: DictConfig, key: str) -> str:
    """The dataset column that the format's `key` reads."""
    return d.text_field if key == "text_field" else d.fields[key]


def field_key(key: str) -> str:
    """The config key a user changes to point `key` at another column."""
    return "data.text_field" if key == "text_field" else f"data.fields.{key}"


def required_columns(d: DictConfig) -> list[tuple[str, str]]:
    """(config key, column) pairs the configured format cannot do without."""
    return [(field_key(k), field_name(d, k)) for k, req in FORMAT_FIELDS[d.format] if req]


# data.format=auto: the first format whose required fields the data has (classification is never
# guessed: a text + label dataset may as well be for language modelling)
AUTO_ORDER = ("messages", "sharegpt", "instruction", "prompt_completion", "qa", "summary", "text")
FALLBACK_TEMPLATE = "chatml"  # data.template=auto for a tokenizer without a usable chat template


def resolve_format(d: DictConfig, columns: list[str], where: str) -> str:
    """data.format, or for `auto` the format the fields present call for (DataError when none fits)."""
    if d.format != "auto":
        return str(d.format)
    for fmt in AUTO_ORDER:
        if all(field_name(d, k) in columns for k, req in FORMAT_FIELDS[fmt] if req):
            return fmt
    wants = "; ".join(
        f"{fmt}: {' + '.join(field_name(d, k) for k, req in FORMAT_FIELDS[fmt] if req)}" for fmt in AUTO_ORDER
    )
    raise DataError(
        f"{where}: data.format=auto found no known layout in the fields {sorted(columns)} ({wants}); "
        "set data.format, or point data.fields.* / data.text_field at your columns"
    )


def resolve_template(d: DictConfig, tok) -> str:
    """data.template, or for `auto` the tokenizer's chat template when it has one whose turns render as
    prefixes of each other (so prompts can be masked), else FALLBACK_TEMPLATE."""
    if d.template != "auto":
        return str(d.template)
    if getattr(tok, "chat_template", None):
        try:
            _tokenizer_template(
                tok,
                None,
                [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                    {"role": "assistant", "content": "d"},
                ],
            )
            return "tokenizer"
        except Exception:  # noqa: BLE001 - a template that raises or does not nest: the fallback serves
            pass
    return FALLBACK_TEMPLATE


def resolved(d: DictConfig, fmt: str, template: str) -> DictConfig:
    """A copy of the data config with format and template as resolved."""
    from omegaconf import OmegaConf, open_dict

    out = OmegaConf.create(OmegaConf.to_container(d, resolve=True))
    with open_dict(out):
        out.format, out.template = fmt, template
    return out


def check_columns(d: DictConfig, columns: list[str], where: str) -> None:
    """Every column the format needs is there, or one line naming the missing one and what to set: the
    format whose columns the data does have (e.g. data.format=text for a `text` column), else the key."""
    missing = [(key, column) for key, column in required_columns(d) if column not in columns]
    if not missing:
        return
    key, column = missing[0]
    fits = [
        f
        for f in FORMAT_FIELDS
        if f != d.format and all(field_name(d, k) in columns for k, req in FORMAT_FIELDS[f] if req)
    ]
    hint = (
        f"set data.format={fits[0]}"
        if fits
        else f"set {key} to the column that holds it (data.format={d.format} reads it)"
    )
    raise DataError(f"{where}: no field {column!r} ({key}); fields present: {sorted(columns)}; {hint}")


# ---- formats: record -> conversation -----------------------------------------------------------


def _value(row: dict, d: DictConfig, key: str, where: str, required: bool = True) -> str:
    name = field_name(d, key)
    value = row.get(name)
    if value is None:
        if required:
            raise DataError(
                f"{where}: field {name!r} ({field_key(key)}) is missing or null; "
                f"fields present: {sorted(k for k, v in row.items() if v is not None)}"
            )
        return ""
    if isinstance(value, (list, dict)):  # a number is written as its text (CSV digits); a structure is not text
        raise DataError(
            f"{where}: field {name!r} ({field_key(key)}) must be text, got a {type(value).__name__}; "
            "fix the record, or point the key at another column"
        )
    return value if isinstance(value, str) else str(value)


def _task_turn(d: DictConfig, body: str) -> dict:
    instruction = d.task_instruction or TASK_INSTRUCTIONS[d.format]
    if d.format == "classification" and d.label_names:
        instruction += f" Answer with one of: {', '.join(map(str, d.label_names))}."
    return {"role": "user", "content": instruction, "input": body}


def _label(d: DictConfig, row: dict, where: str) -> str:
    value = row.get(field_name(d, "label"))
    if isinstance(value, int) and not isinstance(value, bool) and d.label_names:
        if not 0 <= value < len(d.label_names):
            raise DataError(f"{where}: label {value} is outside data.label_names (0..{len(d.label_names) - 1})")
        return str(d.label_names[value])
    return _value(row, d, "label", where)


def _messages(d: DictConfig, row: dict, where: str) -> Conversation:
    name = field_name(d, "messages")
    msgs = row.get(name)
    if not isinstance(msgs, list) or not msgs:
        raise DataError(
            f"{where}: field {name!r} (data.fields.messages) must be a non-empty list of "
            f"{{role, content}}; fields present: {sorted(row)}"
        )
    system, turns = None, []
    for m in msgs:
        if (
            not isinstance(m, dict)
            or m.get("role") not in ("system", "user", "assistant")
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(f"{where}: message {m!r} needs role system|user|assistant and a string content")
        if m["role"] == "system":
            system = m["content"]
        else:
            turns.append({"role": m["role"], "content": m["content"]})
    if not any(t["role"] == "assistant" for t in turns):
        raise DataError(f"{where}: field {name!r} has no assistant message to learn from")
    return system, turns


SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}


def _sharegpt(d: DictConfig, row: dict, where: str) -> Conversation:
    name = field_name(d, "conversations")
    convo = row.get(name)
    if not isinstance(convo, list) or not convo:
        raise DataError(
            f"{where}: field {name!r} (data.fields.conversations) must be a non-empty list of "
            f"{{from, value}}; fields present: {sorted(row)}"
        )
    messages = []
    for m in convo:
        role = SHAREGPT_ROLES.get(m.get("from")) if isinstance(m, dict) else None
        if role is None or not isinstance(m.get("value"), str):
            raise DataError(f"{where}: turn {m!r} needs `from` (one of {sorted(SHAREGPT_ROLES)}) and a string `value`")
        messages.append({"role": role, "content": m["value"]})
    return _messages(d, {**row, field_name(d, "messages"): messages}, where)


def to_conversation(d: DictConfig, row: dict, where: str) -> Conversation:
    """The conversation of one record under `data.format` (not used for `text` and `prompt_completion`)."""
    fmt = d.format
    if fmt in ("messages", "sharegpt"):
        system, turns = (_messages if fmt == "messages" else _sharegpt)(d, row, where)
        return system or d.system_prompt, turns
    system = _value(row, d, "system", where, required=False) or d.system_prompt
    if fmt == "instruction":
        user = {
            "role": "user",
            "content": _value(row, d, "instruction", where),
            "input": _value(row, d, "input", where, required=False),
        }
        answer = _value(row, d, "output", where)
    elif fmt == "classification":
        user, answer = _task_turn(d, _value(row, d, "text_field", where)), _label(d, row, where)
    elif fmt == "summary":
        user, answer = _task_turn(d, _value(row, d, "document", where)), _value(row, d, "summary", where)
    else:  # qa
        body = f"Context: {_value(row, d, 'context', where)}\n\nQuestion: {_value(row, d, 'question', where)}"
        user, answer = _task_turn(d, body), _value(row, d, "answer", where)
    return system, [user, {"role": "assistant", "content": answer}]


# ---- templates: conversation -> segments -------------------------------------------------------


def _joined(turn: dict) -> str:
    return turn["content"] + (f"\n\n{turn['input']}" if turn.get("input") else "")


def _llama2(tok, system, turns) -> Segments:
    segs, bos, eos = [], tok.bos_token or "", tok.eos_token or ""
    for i, t in enumerate(turns):
        if t["role"] == "user":
            sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system and i == 0 else ""
            segs.append((f"{bos}[INST] {sys_block}{_joined(t).strip()} [/INST]", False))
        else:
            segs.append((f" {t['content'].strip()} {eos}", True))
    return segs


ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_HEADER_INPUT = (
    "Below is an instruction that describes a task, paired with an input that "
    "provides further context. Write a response that appropriately completes the request."
)


def _alpaca(tok, system, turns) -> Segments:
    has_input = any(t.get("input") for t in turns)
    header = system or (ALPACA_HEADER_INPUT if has_input else ALPACA_HEADER)
    segs, eos = [], tok.eos_token or ""
    prefix = f"{tok.bos_token or ''}{header}\n\n"
    for t in turns:
        if t["role"] == "user":
            text = f"{prefix}### Instruction:\n{t['content']}\n\n"
            if t.get("input"):
                text += f"### Input:\n{t['input']}\n\n"
            segs.append((text + "### Response:\n", False))
            prefix = ""
        else:
            segs.append((f"{t['content']}{eos}", True))
            prefix = "\n\n"
    return segs


def _chatml(tok, system, turns) -> Segments:
    text = (tok.bos_token or "") + (f"<|im_start|>system\n{system}<|im_end|>\n" if system else "")
    segs = []
    for t in turns:
        if t["role"] == "user":
            segs.append((f"{text}<|im_start|>user\n{_joined(t)}<|im_end|>\n<|im_start|>assistant\n", False))
            text = ""
        else:
            segs.append((f"{t['content']}<|im_end|>", True))
            text = "\n"
    segs[-1] = (segs[-1][0] + (tok.eos_token or ""), segs[-1][1])
    return segs


def _tokenizer_template(tok, system, turns) -> Segments:
    """The tokenizer's own chat template; a response is what the template adds for an assistant turn."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": t["role"], "content": _joined(t)} for t in turns
    ]
    segs, done = [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise DataError(
                "data.template=tokenizer: the tokenizer's chat template does not render turns "
                "as prefixes of each other, so prompts cannot be masked; use llama2, alpaca or "
                "chatml, or set data.train_on_prompt=true"
            )
        segs += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return segs


TEMPLATES: dict[str, Callable[[Any, str | None, list[dict]], Segments]] = {
    "llama2": _llama2,
    "alpaca": _alpaca,
    "chatml": _chatml,
    "tokenizer": _tokenizer_template,
}


def check_template(d: DictConfig, tok) -> None:
    """Refuse a template the tokenizer cannot serve, before any record is read."""
    if d.format != "text" and d.template == "tokenizer" and not getattr(tok, "chat_template", None):
        raise DataError(
            f"data.template=tokenizer: the tokenizer ({tok.name_or_path}) has no chat template; "
            "use data.template=llama2|alpaca|chatml"
        )


def _text_segments(d: DictConfig, tok, row: dict, where: str) -> Segments:
    text = _value(row, d, "text_field", where)
    # pre-formatted text such as guanaco's "<s>[INST] … [/INST] … </s>" may carry BOS/EOS already
    bos = "" if not tok.bos_token or text.lstrip().startswith(tok.bos_token) else tok.bos_token
    eos = "" if not tok.eos_token or text.rstrip().endswith(tok.eos_token) else tok.eos_token
    return [(bos + text + eos, True)]


def _prompt_completion_segments(d: DictConfig, tok, row: dict, where: str) -> Segments:
    """Prompt and completion written as they are (no template), BOS before, EOS after; the loss on the
    completion (as TRL treats a standard prompt-completion dataset)."""
    prompt, completion = _value(row, d, "prompt", where), _value(row, d, "completion", where)
    return [((tok.bos_token or "") + prompt, False), (completion + (tok.eos_token or ""), True)]


def render(d: DictConfig, tok, row: dict, where: str) -> Segments:
    """The (text, is_response) segments of one record under data.format and data.template (resolved)."""
    if d.format == "text":
        return _text_segments(d, tok, row, where)
    if d.format == "prompt_completion":
        return _prompt_completion_segments(d, tok, row, where)
    system, turns = to_conversation(d, row, where)
    return TEMPLATES[d.template](tok, system, turns)


def prompt_text(d: DictConfig, tok, user: str | list[dict], input_text: str = "") -> str:
    """A prompt written out as the run's (resolved) format and template write prompts, for generation:
    a user message (with an optional separate input, as the instruction format has), or a list of
    {role, content} messages ending with a user turn."""
    if d.format in ("text", "prompt_completion"):
        return user if isinstance(user, str) else user[-1]["content"]
    if isinstance(user, str):
        system, turns = d.system_prompt, [{"role": "user", "content": user, "input": input_text}]
    else:
        system = next((m["content"] for m in user if m.get("role") == "system"), d.system_prompt)
        turns = [{"role": m["role"], "content": m["content"]} for m in user if m.get("role") != "system"]
    segs = TEMPLATES[d.template](tok, system, [*turns, {"role": "assistant", "content": ""}])
    return "".join(text for text, _ in segs[:-1])
