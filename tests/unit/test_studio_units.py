"""The studio's pieces without a server: the form read from the schema, the override gate and its errors
(the command line's own), path confinement, and the argv of the processes it starts."""

from __future__ import annotations

import sys
from dataclasses import fields, is_dataclass
from enum import Enum
from typing import get_type_hints

import pytest
from omegaconf import OmegaConf

from lora_launch.conf.compose import compose, composition_error
from lora_launch.conf.groups import config_groups
from lora_launch.conf.schema import Config, ConfigError, describe
from lora_launch.studio import form as forms
from lora_launch.studio.jobs import cli_argv, command_line, last_error
from lora_launch.studio.paths import Places, confine


def _leaves(schema=Config, prefix=""):
    hints = get_type_hints(schema)
    for f in fields(schema):
        if is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], prefix + f.name + ".")
        else:
            yield prefix + f.name, hints[f.name]


def test_every_group_is_a_choice_with_config_yaml_default():
    groups = {g["name"]: g for g in forms.form()["groups"]}
    assert set(groups) == {"model", "data", "lora", "quant", "optim", "distributed", "launcher", "logging", "preset"}
    assert set(groups) == set(config_groups()) - {"model_recipe"}
    for name, g in groups.items():
        assert g["choices"] == config_groups()[name]
    assert {n: g["default"] for n, g in groups.items()} == {
        "model": "tiny",
        "data": "demo",
        "lora": "default",
        "quant": "none",
        "optim": "adamw",
        "distributed": "ddp",
        "launcher": "local",
        "logging": "default",
        "preset": "none",
    }


def test_every_schema_key_is_a_field_with_the_schemas_type_range_default():
    specs = forms.field_map()
    leaves = dict(_leaves())
    assert set(specs) == set(leaves) - {"preview"}
    for key, spec in specs.items():
        info = describe(key)
        assert (spec["type_text"], spec["range"]) == (info.type, info.range), key
        default = info.default.value if isinstance(info.default, Enum) else info.default
        assert spec["default"] == (None if default == "???" else default), key
        hint = leaves[key]
        members = [h for h in getattr(hint, "__args__", (hint,)) if isinstance(h, type) and issubclass(h, Enum)]
        if members:
            assert spec["type"] == "choice" and spec["choices"] == list(members[0].__members__), key
    assert specs["lora.r"]["lo"] == 1 and specs["optim.lr"]["lo_open"] and specs["lora.dropout"]["hi"] == 0.99
    assert specs["distributed.strategy"]["choices"] == ["ddp", "deepspeed", "fsdp2"]
    assert specs["model.path"]["nullable"] and specs["model.name"]["set_by_group"]


def test_every_data_format_belongs_to_a_task():
    from lora_launch.data.templates import FORMAT_FIELDS

    tasks = forms.form()["tasks"]
    assert sorted(f for t in tasks for f in t["formats"]) == sorted(FORMAT_FIELDS)
    assert {t["name"] for t in tasks} >= {"instruction", "chat", "text", "completion"}


def _cli_error(overrides: list[str]) -> str:
    """The line the command line prints for these overrides (conf/compose.py, as cli/train.py uses it)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        compose(overrides)
    except ConfigError as e:
        return str(e)
    except (HydraException, OmegaConfBaseException) as e:
        return composition_error(e)
    finally:
        GlobalHydra.instance().clear()
    raise AssertionError(f"{overrides} composed")


@pytest.mark.parametrize(
    "groups,values",
    [
        ({}, {"lora.r": "0"}),
        ({}, {"optim.lr": "-1"}),
        ({}, {"lora.r": "abc"}),
        ({"distributed": "ddp"}, {"quant.mode": "nf5"}),
        ({}, {"data.packing": "true", "data.group_by_length": "true"}),
    ],
)
def test_a_bad_value_is_the_command_lines_one_line_error(groups, values):
    overrides = forms.build_overrides(groups, values)
    with pytest.raises(ConfigError) as e:
        forms.compose_checked(overrides)
    assert str(e.value) == _cli_error(overrides) and "\n" not in str(e.value)
    assert next(iter(values)) in str(e.value)


def test_a_good_form_composes_to_its_overrides():
    overrides = forms.build_overrides(
        {"lora": "all_linear", "model": "tiny"},
        {
            "lora.r": "16",
            "data.system_prompt": "Be 'brief'.",
            "sample.prompt": "a b",
            "resume.allow_changes": '["optim.lr"]',
            "optim.name": "",
        },
    )
    assert overrides == [
        "lora=all_linear",
        "lora.r=16",
        "data.system_prompt=\"Be 'brief'.\"",
        "sample.prompt='a b'",
        "resume.allow_changes=[optim.lr]",
    ]
    cfg = forms.compose_checked(overrides)
    assert (cfg.lora.r, cfg.data.system_prompt, cfg.sample.prompt) == (16, "Be 'brief'.", "a b")
    assert OmegaConf.to_container(cfg.resume.allow_changes) == ["optim.lr"] and cfg.lora.target_modules == "all-linear"


def test_unknown_groups_choices_and_keys_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^distributed=zero5 is not a choice of distributed; choose one of: ddp"):
        forms.build_overrides({"distributed": "zero5"}, {})
    with pytest.raises(ConfigError, match=r"^lora\.rank is not a key of the config \(lora has: r, alpha"):
        forms.build_overrides({}, {"lora.rank": "8"})
    with pytest.raises(ConfigError, match="not a int value"):
        forms.build_overrides({}, {"lora.r": "8,16"})


@pytest.mark.parametrize(
    "override,why",
    [
        ("lora.r=8,16", "a sweep"),
        ("+lora.extra=1", "only key=value"),
        ("~lora.r", "only key=value"),
        ("hydra.run.dir=/tmp", "not a key"),
        ("sample.prompt='${oc.env:HOME}'", "interpolations"),
        ("lora.r=range(1,3)", "a sweep"),
        ("lora.r", "cannot read"),
    ],
)
def test_only_plain_values_of_schema_keys_pass_the_gate(override, why):
    with pytest.raises(ConfigError, match=why.replace("(", r"\(")):
        forms.check_override(override)


@pytest.mark.parametrize(
    "text",
    [
        "plain",
        "a b",
        "it's",
        'say "hi"',
        "ends\\",
        "/abs/path.jsonl",
        "123",
        "true",
        "null",
        "a,b",
        "x=y",
        "[INST] q [/INST]",
    ],
)
def test_strings_come_back_exactly_as_typed(text):
    override = forms.override_for("sample.prompt", text, forms.field_map()["sample.prompt"])
    assert forms._parsed_value(override) == text or (text == "null")  # null clears a nullable key only


def test_paths_stay_inside_the_root(tmp_path):
    root, other = tmp_path / "root", tmp_path / "other"
    (root / "data").mkdir(parents=True)
    other.mkdir()
    (root / "data" / "d.jsonl").write_text("{}\n")
    (root / "escape").symlink_to(other)
    places = Places(root)
    ok = forms.compose_checked(["data=local", "data.path=data/d.jsonl", "run.dir=runs/x"])
    confine(ok, places)  # inside; the default model (the bundled tiny one) may be read
    bad = [
        (["data=local", f"data.path={other}/d.jsonl", "run.dir=runs/x"], "data.path"),
        (["run.dir=../elsewhere"], "run.dir"),
        (["run.dir=escape/run"], "run.dir"),
        ([f"data.cache_dir={other}", "run.dir=runs/x"], "data.cache_dir"),
        (["model.path=/opt/models/m", "run.dir=runs/x"], "model.path"),
        ([f"run.dir={forms.compose_checked([]).data.path}/../run"], "run.dir"),
    ]  # assets: read only
    for overrides, key in bad:
        with pytest.raises(ConfigError, match=rf"^{key}=.*outside the folders this studio may use .*--allow-path"):
            confine(forms.compose_checked(overrides), places)
    confine(
        forms.compose_checked(["data=local", f"data.path={other}/d.jsonl", "run.dir=runs/x"]), Places(root, [other])
    )
    confine(forms.compose_checked(["model.path=OWNER/NAME", "run.dir=runs/x"]), places)  # a hub id is no path


def test_argv_is_a_list_of_checked_overrides_never_a_shell_string():
    overrides = forms.build_overrides({}, {"sample.prompt": "x; rm -rf / $(id)", "lora.r": "4"})
    argv = cli_argv(overrides)
    assert argv == [sys.executable, "-m", "lora_launch.cli", "sample.prompt='x; rm -rf / $(id)'", "lora.r=4"]
    assert command_line(overrides) == "lora-launch 'sample.prompt='\"'\"'x; rm -rf / $(id)'\"'\"'' lora.r=4"
    assert (
        last_error("loading\nerror: run.dir x is in use by a live launch\n") == "run.dir x is in use by a live launch"
    )
    assert last_error("") == "it exited without a message"


def test_each_field_carries_the_comment_beside_or_above_it_in_the_schema_or_the_yaml():
    specs = forms.field_map()
    assert specs["lora.target_modules"]["help"].startswith("module names (PEFT matches a name's last parts)")
    assert specs["data.val_split"]["help"] == "share of records held out, drawn by `seed`"  # beside the field
    assert specs["train.compile"]["help"].startswith("torch.compile: `layers`")  # a block of lines above it
    assert specs["checkpoint.keep_last"]["help"] == "newest complete checkpoints kept"  # conf/config.yaml's
    assert specs["launcher.max_restarts"]["help"].startswith("after a rank dies")
    assert not specs["lora.r"]["help"]  # no comment anywhere: no words made up
    groups = {g["name"]: g for g in forms.form()["groups"]}
    assert groups["distributed"]["help"]["zero2"].startswith("DeepSpeed ZeRO-2")
    assert groups["model"]["help"]["tiny"].startswith("A tiny Llama-architecture model")


def test_an_upload_lands_under_root_data_checked_and_never_over_another_file(tmp_path):
    from lora_launch.studio.uploads import data_files, save_upload

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / ".studio").mkdir()
    (tmp_path / ".studio" / "x.json").write_text("{}")
    body = b'{"text": "hello"}\n'
    assert save_upload(tmp_path, "../../etc/my data.jsonl", body) == "data/my-data.jsonl"
    assert (tmp_path / "data" / "my-data.jsonl").read_bytes() == body
    assert save_upload(tmp_path, "my-data.jsonl", body) == "data/my-data.jsonl"  # the same bytes: the same file
    assert save_upload(tmp_path, "my-data.jsonl", b'{"text": "other"}\n') == "data/my-data-2.jsonl"
    assert data_files(tmp_path) == ["data/my-data-2.jsonl", "data/my-data.jsonl", "mine/a.jsonl"]
    for name, content, why in [
        ("a.exe", body, "give a data file named like"),
        ("a.jsonl", b"", "empty"),
        ("b.jsonl", b"[1]\n", "^upload: b.jsonl:1: expected a JSON object per line"),
        ("c.jsonl", b'{"a": \n', "^upload: c.jsonl:1: not valid JSON"),
    ]:
        with pytest.raises(ConfigError, match=why):
            save_upload(tmp_path, name, content)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["my-data-2.jsonl", "my-data.jsonl"]


def test_each_group_choice_has_help_from_its_file_without_hydras_directives():
    helps = forms.choice_help()
    assert helps["preset"]["llama2_guanaco"].startswith("The Llama-2 guanaco recipe")
    for group, options in helps.items():
        for option, text in options.items():
            assert "@package" not in text, (group, option, text)
