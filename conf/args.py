"""Typed arguments of the subcommands: `lora-launch generate|merge|eval|serve|studio|sweep-summary key=value ...`.

Arguments are read with Hydra's override grammar, as training overrides are, and merged into one
dataclass per subcommand, so an unknown key or a wrong type fails in one line naming the key. A
`str` key takes the argument's text as typed when the grammar reads it as something else (a list,
a sweep) or not at all: prompts and paths are free text (`prompt=[INST] Where is Italy? [/INST]`).
"""

from __future__ import annotations

import inspect
from dataclasses import MISSING as NO_FACTORY
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, get_args

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lora_launch.conf.schema import Choice, ConfigError, Dtype, Template, is_union, type_hints, type_name


def arg(default: Any = MISSING, help: str = "", default_factory: Any = None):
    """A subcommand argument with its one-line help."""
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunDir:
    dir: str = arg(help="a finished run directory (its config.yaml and adapter/)")


@dataclass
class GenerateArgs:
    """Print base + adapter's completion of a prompt."""

    run: RunDir = arg(default_factory=RunDir)
    prompt: str | None = arg(
        None,
        "a user message, written out with the run's template (raw with template=false); null: the run's sample.prompt",
    )
    instruction: str | None = arg(None, "instead of prompt: an instruction, with `input` as its input field")
    input: str = arg("", "the input field that goes with `instruction`")
    messages: str | None = arg(None, "instead of prompt: a JSON file of [{role, content}, ...] ending with a user turn")
    sample: bool = arg(False, "sample with temperature and top_p instead of greedy decoding")
    max_new_tokens: int | None = arg(None, "tokens to generate; null: the run's sample.max_new_tokens")
    temperature: float = arg(0.7, "sampling temperature")
    top_p: float = arg(0.9, "nucleus sampling mass")
    seed: int = arg(0, "seed of the sampling")
    template: bool = arg(True, "write the prompt out as the run's format and template did in training")


@dataclass
class MergeArgs:
    """Write base + adapter as one safetensors model (QLoRA: into the dequantized base)."""

    run: RunDir = arg(default_factory=RunDir)
    out: str | None = arg(None, "output directory; null: RUN/merged")
    dtype: Dtype = arg(Dtype.bfloat16, "dtype of the merged weights")


class Split(Choice):
    val = "val"
    train = "train"


@dataclass
class EvalArgs:
    """Eval loss and perplexity of base + adapter (also written to RUN/eval.json)."""

    run: RunDir = arg(default_factory=RunDir)
    split: Split = arg(Split.val, "which of the run's splits")
    max_batches: int = arg(-1, "evaluate at most this many batches; -1: all")


@dataclass
class SweepSummaryArgs:
    """Rebuild a sweep's summary.csv, summary.md and sweep.png from its trial dirs."""

    dir: str = arg(help="the sweep directory (sweeps/sweep-...)")


class ServeEngine(Choice):
    transformers = "transformers"
    vllm = "vllm"


@dataclass
class ServeRunDir:
    dir: str | None = arg(None, "a finished run directory to serve (its config.yaml and adapter/)")


@dataclass
class ServeArgs:
    """Serve base + adapters over an OpenAI-compatible HTTP API (completions, chat, streaming)."""

    run: ServeRunDir = arg(default_factory=ServeRunDir)
    runs: list[str] = arg(help="more finished run directories: runs=[RUN1,RUN2]", default_factory=list)
    sweep: str | None = arg(None, "a sweep directory: every finished trial, named by its dir")
    adapters: list[str] = arg(help="PEFT adapter directories (a run's checkpoints/step-N, ...)", default_factory=list)
    base: str | None = arg(
        None,
        "base model dir or hub id; null: the runs' model.path (a merged model "
        "from `lora-launch merge` serves alone as a base)",
    )
    engine: ServeEngine = arg(
        ServeEngine.transformers,
        "transformers: this process, adapters mixed in one batch; vllm: run `vllm serve` with the same names",
    )
    host: str = arg("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = arg(8000, "port to listen on; 0: a free one (printed at start)")
    api_key: str | None = arg(
        None,
        "require `Authorization: Bearer KEY` on /v1; null: $LORA_LAUNCH_API_KEY "
        "if set (better: the key stays off the command line)",
    )
    allow_no_key: bool = arg(
        False, "serve without an API key on a non-loopback host (anyone who reaches the port can use the models)"
    )
    allowed_hosts: list[str] = arg(
        help="Host header names answered besides loopback and host= (others get 421, "
        "against DNS rebinding): allowed_hosts=[gpu-box.lan]; ['*']: any",
        default_factory=list,
    )
    shutdown_timeout_s: int = arg(120, "after SIGTERM, seconds to finish the requests taken; then they are cut")
    max_tokens: int = arg(512, "most tokens one request may generate")
    max_prompt_tokens: int | None = arg(None, "longest prompt in tokens; null: the model's context length")
    max_body_bytes: int = arg(1_048_576, "largest request body")
    max_concurrent: int = arg(64, "requests answered at once; one more gets 429")
    max_batch: int = arg(16, "requests generated together in one batch")
    template: Template = arg(
        Template.auto,
        "chat template of a model that has no run (a merged model, bare adapters); auto: the tokenizer's, else chatml",
    )


@dataclass
class StudioArgs:
    """A local web app to compose, preview, launch and watch runs.

    The flags --host, --port, --root and --allow-path DIR (repeatable) are the same keys."""

    host: str = arg("127.0.0.1", "address to listen on (127.0.0.1: this machine only)")
    port: int = arg(8765, "port to listen on; 0: a free one (printed at start)")
    root: str = arg(".", "folder of run dirs and data; paths outside it are refused")
    allow_path: list[str] = arg(
        help="more folders configs may name (data, models, run dirs): allow_path=[DIR1,DIR2]", default_factory=list
    )


COMMANDS: dict[str, type] = {
    "generate": GenerateArgs,
    "merge": MergeArgs,
    "eval": EvalArgs,
    "sweep-summary": SweepSummaryArgs,
    "serve": ServeArgs,
    "studio": StudioArgs,
}


def parse_args(command: str, argv: list[str]) -> Any:
    """The subcommand's typed arguments (a dataclass instance) from `key=value` strings.

    Raises ConfigError naming the key for an unknown key, a wrong type or a missing required key.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    schema = COMMANDS[command]
    cfg = OmegaConf.structured(schema)
    parser = OverridesParser.create()
    for text in argv:
        key, sep, raw = text.partition("=")
        hint = _key_type(schema, key) if sep else None
        if hint is None:
            raise ConfigError(f"{command}: unknown argument {text!r}; known: {' '.join(k + '=' for k in keys(schema))}")
        try:
            override = parser.parse_overrides([text])[0]
        except HydraException:
            override = None
        value = _value(override, raw, hint)
        if value is _NOT_ONE_VALUE:
            raise ConfigError(f"{command}: {key}={raw}: not one value in the override grammar (quote it: {key}='...')")
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{command}: {key}={raw}: {str(e).splitlines()[0]}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{command}: {missing[0]}= is required: {_help(schema, missing[0])}")
    return OmegaConf.to_object(cfg)


_NOT_ONE_VALUE = object()


def _value(override, raw: str, hint: Any) -> Any:
    """The override's value; for a `str` key, the text as typed unless the grammar read a string (or null)."""
    if override is not None and not override.is_sweep_override():
        value = override.value()
        if not _is_str(hint) or value is None or isinstance(value, str):
            return value
    return raw if _is_str(hint) else _NOT_ONE_VALUE


def _is_str(hint: Any) -> bool:
    if is_union(hint):
        return any(_is_str(h) for h in get_args(hint))
    return hint is str


def _key_type(schema: type, key: str) -> Any:
    """The type of dotted `key` in `schema`, or None when it has no such key."""
    head, _, rest = key.partition(".")
    hints = type_hints(schema)
    if head not in hints:
        return None
    if is_dataclass(hints[head]):
        return _key_type(hints[head], rest) if rest else None
    return None if rest else hints[head]


def keys(schema: type, prefix: str = "") -> list[str]:
    """Dotted keys of a subcommand's arguments, in declaration order."""
    out: list[str] = []
    hints = type_hints(schema)
    for f in fields(schema):
        if is_dataclass(hints[f.name]):
            out += keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _field(schema: type, key: str):
    head, _, rest = key.partition(".")
    f = next(f for f in fields(schema) if f.name == head)
    return _field(type_hints(schema)[head], rest) if rest else f


def _help(schema: type, key: str) -> str:
    return _field(schema, key).metadata.get("help", "")


def usage(command: str) -> str:
    """The subcommand's own help: what it does and each key with its type, default and meaning."""
    schema = COMMANDS[command]
    required = [k for k in keys(schema) if _field(schema, k).default is MISSING]
    lines = [
        " ".join(["usage: lora-launch", command, *(k + "=..." for k in required), "[key=value ...]"]),
        "",
        inspect.cleandoc(schema.__doc__),
        "",
    ]
    for key in keys(schema):
        f = _field(schema, key)
        value = f.default_factory() if f.default_factory is not NO_FACTORY else f.default  # a list's []
        default = "required" if value is MISSING else f"default {_shown(value)}"
        lines.append(f"  {key + '=' + type_name(_key_type(schema, key)):<32} {default}; {_help(schema, key)}")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
