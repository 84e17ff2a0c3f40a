"""The studio's form, read from the config schema, and the one gate every override passes.

Each leaf key of `conf/schema.py`'s `Config` becomes a field with its type, choices, range and default
(`describe`, as `lora-launch --help` shows them); each config group of the installed conf directory becomes
a choice. What the page sends back is turned into `key=value` overrides in Hydra's grammar, each checked by
`check_override` (a plain value for a known key: no sweep, no `+`/`~`, no interpolation), then composed
with the project's own `compose`, whose refusals are the command line's one-line errors.
"""

from __future__ import annotations

import ast
import functools
import importlib.resources
import inspect
import io
import json
import re
import tokenize
from dataclasses import fields, is_dataclass
from enum import Enum
from typing import Any, get_args, get_origin

from omegaconf import MISSING, DictConfig

from lora_launch.conf.compose import compose_checked  # noqa: F401 (the app composes as the command line does)
from lora_launch.conf.groups import config_groups, default_choices, primary_config
from lora_launch.conf.schema import Config, ConfigError, describe, is_union, plain, type_hints, unknown_key
from lora_launch.data.templates import AUTO_ORDER, FORMAT_FIELDS

AUTOMATIC_GROUPS = ("model_recipe",)  # picked by the model, never by hand
NOT_IN_FORM = ("preview",)  # the studio's Preview button sets it
# task types, each with the data formats (data/templates.py) that write it out
TASKS = {
    "instruction": ["instruction"],
    "chat": ["messages", "sharegpt"],
    "completion": ["prompt_completion"],
    "text": ["text"],
    "classification": ["classification"],
    "summary": ["summary"],
    "qa": ["qa"],
}
_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_PLAIN = re.compile(r"^[\w.+-]+$")  # a number, a word, a bool: typed as it is, as on the command line
_BARE = re.compile(r"^[\w./@+-]+$")  # a string that needs no quotes (a path, a name)
# Hydra's parser and the composition cost CPU with a value's size (a 20,000-entry list took two minutes):
# the studio refuses what no form needs before parsing it
MAX_ENTRIES = 256  # list/mapping entries in one value, nested ones counted
MAX_TEXT = 16_384  # characters of one value as typed
MAX_FORM_TEXT = 65_536  # characters of all values together: composing one such form takes about a second
MAX_OVERRIDES = 256  # more than the schema's keys and groups together


# ---- the form -----------------------------------------------------------------------------------


def _kind(hint: Any) -> tuple[str, list[str] | None, bool]:
    """(type, choices, nullable) of a schema type hint, in the form's words."""
    nullable = False
    if is_union(hint):
        args = [h for h in get_args(hint) if h is not type(None)]
        nullable, hint = type(None) in get_args(hint), args[0] if len(args) == 1 else Any
    if isinstance(hint, type) and issubclass(hint, Enum):
        return "choice", list(hint.__members__), nullable
    if hint in (bool, int, float, str):
        return hint.__name__, None, nullable
    if hint is list or get_origin(hint) is list:
        return "list", None, nullable
    if hint is dict or get_origin(hint) is dict:
        return "dict", None, nullable
    return "any", None, nullable


def _json_safe(value: Any) -> Any:
    if value is MISSING or value == MISSING:
        return None
    if isinstance(value, Enum):
        return value.value
    return value if isinstance(value, (type(None), bool, int, float, str, list, dict)) else str(value)


def schema_fields(schema: type = Config, prefix: str = "") -> list[dict]:
    """Every leaf key of the schema with its type, choices, range and default."""
    out = []
    hints = type_hints(schema)
    for f in fields(schema):
        key = prefix + f.name
        if is_dataclass(hints[f.name]):
            out += schema_fields(hints[f.name], key + ".")
            continue
        if key in NOT_IN_FORM:
            continue
        info, (kind, choices, nullable) = describe(key), _kind(hints[f.name])
        meta = dict(f.metadata)
        out.append(
            {
                "key": key,
                "section": key.split(".")[0],
                "help": field_help().get((schema.__name__, f.name)) or yaml_help().get(key, ""),
                "type": kind,
                "choices": choices,
                "nullable": nullable,
                "type_text": info.type,
                "default": _json_safe(info.default),
                "range": info.range,
                "lo": meta.get("lo"),
                "hi": meta.get("hi"),
                "lo_open": bool(meta.get("lo_open")),
                "set_by_group": info.default == MISSING,
            }
        )
    return out


@functools.cache
def field_help() -> dict[tuple[str, str], str]:
    """The comment written beside or above each field of conf/schema.py, by (dataclass name, field name): the
    schema's own words, read once from its source."""
    from lora_launch.conf import schema

    source = inspect.getsource(schema)
    comments = {
        tok.start[0]: (tok.string.lstrip("#").strip(), tok.line.strip().startswith("#"))
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    out = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above, line = [], stmt.lineno - 1
            while line in comments and comments[line][1]:  # a block of whole-line comments right above
                above.insert(0, comments[line][0])
                line -= 1
            beside = comments.get(stmt.lineno, ("", True))
            text = " ".join(above + ([beside[0]] if not beside[1] else []))
            if text:
                out[(node.name, stmt.target.id)] = text
    return out


_YAML_KEY = re.compile(r"^(\s*)([A-Za-z_]\w*):[^#]*?(?:#\s*(.*))?$")


@functools.cache
def yaml_help() -> dict[str, str]:
    """The comment beside each key in conf/config.yaml and the group options' YAML files, by dotted key: what the
    defaults say where the schema has no comment of its own."""
    conf = importlib.resources.files("lora_launch.conf")
    files = [("", conf.joinpath("config.yaml"))]
    files += [
        (group + ".", conf.joinpath(group, f"{option}.yaml"))
        for group, options in config_groups().items()
        for option in options
    ]
    out: dict[str, str] = {}
    for prefix, path in files:
        parents: list[tuple[int, str]] = []
        for line in path.read_text().splitlines():
            found = _YAML_KEY.match(line)
            if not found:
                continue
            indent, name, comment = len(found.group(1)), found.group(2), found.group(3)
            parents = [(i, n) for i, n in parents if i < indent]
            key = prefix + ".".join([n for _, n in parents] + [name])
            parents.append((indent, name))
            if comment and key not in out:
                out[key] = comment.strip()
    return out


@functools.cache
def choice_help() -> dict[str, dict[str, str]]:
    """The opening comment of each group option's YAML file (conf/GROUP/CHOICE.yaml), by group and choice."""
    conf = importlib.resources.files("lora_launch.conf")
    out: dict[str, dict[str, str]] = {}
    for group, options in config_groups().items():
        for option in options:
            lines = []
            for line in conf.joinpath(group, f"{option}.yaml").read_text().splitlines():
                if not line.startswith("#"):
                    break
                if not line.startswith("# @package"):  # Hydra's directive, not help
                    lines.append(line.lstrip("#").strip())
            out.setdefault(group, {})[option] = " ".join(lines)
    return out


def form() -> dict:
    """What the page builds its form from: groups with choices, defaults and what each choice is, fields, task
    types."""
    chosen = default_choices(primary_config())
    groups = [
        {"name": g, "choices": options, "default": chosen.get(g, options[0]), "help": choice_help()[g]}
        for g, options in config_groups().items()
        if g not in AUTOMATIC_GROUPS
    ]
    tasks = [
        {"name": t, "formats": formats, "fields": {f: [k for k, _ in FORMAT_FIELDS[f]] for f in formats}}
        for t, formats in TASKS.items()
    ]
    return {"groups": groups, "fields": schema_fields(), "tasks": tasks, "auto_formats": list(AUTO_ORDER)}


def field_map() -> dict[str, dict]:
    return {f["key"]: f for f in schema_fields()}


# ---- from the page's values to overrides -------------------------------------------------------------


def hydra_value(value: Any) -> str:
    """A JSON value written in Hydra's override grammar (strings quoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _quoted(value)
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_word(k)}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"{value!r}: not a value a config key takes")


def _word(key: str) -> str:
    if not re.match(r"^[A-Za-z_]\w*$", str(key)):
        raise ConfigError(f"{key!r}: not a config key name")
    return str(key)


def _quoted(text: str) -> str:
    """A string value as Hydra reads back exactly that string: bare when it is a plain path or word, else quoted."""
    if _BARE.match(text) and _parsed_value(f"k={text}") == text:
        return text
    quote = "'" if "'" not in text else '"'
    if quote in text:
        raise ConfigError(f"{text!r}: a value may hold ' or \" but not both")
    trailing = len(text) - len(text.rstrip("\\"))
    written = quote + text + "\\" * trailing + quote  # backslashes before a closing quote are doubled
    if _parsed_value(f"k={written}") != text:
        raise ConfigError(f"{text!r}: cannot be written as one override value")
    return written


def _parsed_value(override: str) -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides([override])[0].value()
    except HydraException:
        return None


def override_for(key: str, text: str, spec: dict | None) -> str:
    """`key=value` for what the page sent for one field (text as typed; JSON for lists and mappings)."""
    if spec is None:
        raise ConfigError(unknown_key(key) if _KEY.match(key) else f"{key!r}: not a config key")
    text = text.strip()
    if spec["type"] in ("list", "dict", "any"):
        try:
            value = json.loads(text)
        except ValueError:
            if spec["type"] != "any":
                raise ConfigError(f'{key}={text}: write a JSON {spec["type"]} (e.g. ["q_proj", "v_proj"])') from None
            value = text  # a word (lora.target_modules=all-linear)
        except RecursionError:
            raise ConfigError(f"{key}: nested too deep; a value holds at most {MAX_ENTRIES} entries") from None
        _count_entries(key, value)
        return f"{key}={hydra_value(value)}"
    if spec["type"] == "str" and not (spec["nullable"] and text == "null"):
        return f"{key}={_quoted(text)}"
    if not _PLAIN.match(text):
        raise ConfigError(f"{key}={text}: not a {spec['type_text']} value")
    return f"{key}={text}"  # typed by the schema when composed: a bad one is the command line's error


def _count_entries(key: str, value: Any, seen: int = 0) -> int:
    """Entries in a list/mapping value, nested ones counted; ConfigError naming `key` past MAX_ENTRIES."""
    if isinstance(value, (list, dict)):
        for item in value.values() if isinstance(value, dict) else value:
            seen = _count_entries(key, item, seen + 1)
            if seen > MAX_ENTRIES:
                raise ConfigError(
                    f"{key}: more than {MAX_ENTRIES} entries; a list or mapping value holds at most {MAX_ENTRIES}"
                )
    return seen


def build_overrides(groups: dict, values: dict) -> list[str]:
    """The overrides for a form: the groups that differ from config.yaml's, then each field the page sent."""
    if len(groups) + len(values) > MAX_OVERRIDES:
        raise ConfigError(f"{len(groups) + len(values)} groups and values; a form sends at most {MAX_OVERRIDES}")
    for key, text in values.items():
        if len(str(text)) > MAX_TEXT:
            raise ConfigError(f"{key}: {len(str(text))} characters; a value takes at most {MAX_TEXT}")
    total = sum(len(str(text)) for text in values.values())
    if total > MAX_FORM_TEXT:
        raise ConfigError(f"the form's values hold {total} characters; a form sends at most {MAX_FORM_TEXT}")
    known = {g["name"]: g for g in form()["groups"]}
    out = []
    for group, choice in groups.items():
        if group not in known:
            raise ConfigError(f"{group} is not a config group; groups: {', '.join(known)}")
        if choice not in known[group]["choices"]:
            raise ConfigError(
                f"{group}={choice} is not a choice of {group}; choose one of: {', '.join(known[group]['choices'])}"
            )
        if choice != known[group]["default"]:
            out.append(f"{group}={choice}")
    specs = field_map()
    for key, text in values.items():
        if str(text).strip() != "":
            out.append(override_for(key, str(text), specs.get(key)))
    for o in out:
        check_override(o)
    return out


def check_override(override: str) -> str:
    """The override as Hydra reads it is a plain value for a schema key or a config group; returns the key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if len(override) > MAX_TEXT + 256:  # a key and a value at its limit, quoted
        raise ConfigError(
            f"{override.partition('=')[0]}: the override is {len(override)} characters; a value takes "
            f"at most {MAX_TEXT}"
        )
    try:
        parsed = OverridesParser.create().parse_overrides([override])[0]
    except HydraException:
        raise ConfigError(f"cannot read the override {override!r}: write key=value (e.g. lora.r=16)") from None
    key = parsed.key_or_group
    if parsed.is_add() or parsed.is_force_add() or parsed.is_delete() or parsed.package is not None:
        raise ConfigError(f"{override}: only key=value overrides of the config's own keys are taken here")
    if parsed.is_sweep_override():
        raise ConfigError(f"{override}: a sweep; the studio launches one run (sweeps: lora-launch -m)")
    if "${" in override:
        raise ConfigError(f"{override}: interpolations (${{...}}) are not taken here; write the value")
    groups = {g["name"] for g in form()["groups"]}
    if key not in groups and key not in field_map() and key not in NOT_IN_FORM:
        raise ConfigError(unknown_key(key) if _KEY.match(key) else f"{key!r}: not a config key")
    return key


# ---- composing: the command line's checks and messages (conf/compose.py: compose_checked) --------------------


def flat_values(cfg: DictConfig) -> dict:
    """The composed config's leaf values by dotted key, as the page shows them."""
    from lora_launch.catalog.runs import flatten

    return flatten(plain(cfg))
