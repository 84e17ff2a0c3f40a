"""`lora-launch --help` and the subcommands' one argument grammar (Hydra's overrides, typed dataclasses)."""

from __future__ import annotations

import json
import sys

import pytest

from lora_launch.cli import main as cli
from lora_launch.cli.commands import MOST_USED, help_text, run_command
from lora_launch.conf.args import COMMANDS, keys, parse_args
from lora_launch.conf.groups import config_groups
from lora_launch.conf.schema import ConfigError
from support.cli import REPO


def _conf_groups() -> dict[str, list[str]]:
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted((REPO / "conf").iterdir())
        if d.is_dir() and any(d.glob("*.yaml"))
    }


# ---- --help -------------------------------------------------------------------------------------


def test_help_groups_are_the_installed_conf_directories():
    assert config_groups() == _conf_groups()


def test_help_names_commands_groups_options_and_keys():
    text = help_text(width=1000)  # one line per entry
    assert text.startswith("usage: lora-launch")
    for name in COMMANDS:
        assert f"\n  {name} " in text, name
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    for group, options in _conf_groups().items():
        assert all(option in lines[group] for option in options), group
    assert "automatically" in lines["model_recipe"] and "tiny*" in lines["model"]
    for key in MOST_USED:
        assert key in lines, key
    assert lines["lora.r"].split() == ["lora.r", "int;", "default", "8;", ">=", "1"]
    assert lines["train.precision"].split() == [
        "train.precision",
        *"auto | bfloat16 | float16 | float32;".split(),
        "default",
        "auto",
    ]
    assert "runs/${now:" in lines["run.dir"]
    assert "--hydra-help" in text and "--cfg job" in text


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_cli_help_is_the_projects_not_hydras(monkeypatch, capsys, flag):
    monkeypatch.setattr(sys, "argv", ["lora-launch", flag])
    with pytest.raises(SystemExit) as done:
        cli.main()
    out = capsys.readouterr().out
    assert done.value.code == 0 and out == help_text() + "\n" and "Hydra" not in out.splitlines()[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_has_its_own_help(capsys, command):
    assert run_command(command, ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lora-launch {command} ")
    assert all(f"  {key}=" in out for key in keys(COMMANDS[command]))


# ---- one grammar: Hydra's override parser into typed arguments ----------------------------------


def test_arguments_are_typed():
    args = parse_args("generate", ["run.dir=/r", "max_new_tokens=4", "sample=true", "temperature=1", "seed=3"])
    assert args.run.dir == "/r" and args.max_new_tokens == 4 and args.sample is True
    assert args.temperature == 1.0 and isinstance(args.temperature, float) and args.seed == 3
    assert args.prompt is None and args.template is True  # written out as in training, by default
    merge = parse_args("merge", ["run.dir=/r", "dtype=float16"])
    assert merge.dtype == "float16" and merge.out is None


@pytest.mark.parametrize(
    "prompt,want",
    [
        ("[INST] Where is Italy? [/INST]", "[INST] Where is Italy? [/INST]"),  # what the shell passes unquoted
        ('"[INST] a, b [/INST]"', "[INST] a, b [/INST]"),  # Hydra's quoting
        ("What's up, doc?", "What's up, doc?"),
        ("null", None),
    ],
)
def test_prompts_and_paths_are_free_text(prompt, want):
    assert parse_args("generate", ["run.dir=/r", f"prompt={prompt}"]).prompt == want
    assert parse_args("sweep-summary", ["dir=sweeps/a,b [x]"]).dir == "sweeps/a,b [x]"


@pytest.mark.parametrize(
    "command,argv,message",
    [
        ("merge", ["run.dir=x", "colour=red"], "merge: unknown argument 'colour=red'; known: run.dir= out= dtype="),
        (
            "merge",
            ["run.dir=x", "dtype=fp16"],
            "merge: dtype=fp16: Invalid value 'fp16', expected one of [bfloat16, float16, float32]",
        ),
        ("generate", ["run.dir=x", "max_new_tokens=abc"], "generate: max_new_tokens=abc: Value 'abc'"),
        ("generate", ["run.dir=x", "max_new_tokens=4,8"], "generate: max_new_tokens=4,8: not one value"),
        ("generate", ["run.dir=x", "sample=maybe"], "generate: sample=maybe: "),
        ("eval", ["run.dir=x", "split=test"], "eval: split=test: Invalid value 'test'"),
        ("eval", ["split=val"], "eval: run.dir= is required"),
        ("eval", ["x"], "eval: unknown argument 'x'"),
        ("eval", ["run=x"], "eval: unknown argument 'run=x'"),
    ],
)
def test_a_bad_argument_names_its_key(command, argv, message):
    with pytest.raises(ConfigError) as failed:
        parse_args(command, argv)
    assert str(failed.value).startswith(message) and "\n" not in str(failed.value)


def test_a_bad_argument_is_one_line_and_exit_2(capsys):
    assert run_command("merge", ["run.dir=x", "colour=red"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: merge: unknown argument 'colour=red'") and err.count("\n") == 1


def test_posttrain_refuses_a_bad_argument_before_loading_anything(tmp_path, capsys):
    from lora_launch.train import posttrain

    assert posttrain.main(["merge", f"run.dir={tmp_path}", "dtype=fp16"]) == 2
    assert capsys.readouterr().err.startswith("error: merge: dtype=fp16: Invalid value 'fp16'")


# ---- sweep-summary ------------------------------------------------------------------------------


def _sweep(tmp_path):
    trial = tmp_path / "sweep" / "lora.r=8"
    trial.mkdir(parents=True)
    (trial / "trial.json").write_text(json.dumps({"status": "completed", "overrides": ["lora.r=8"]}))
    (trial / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "eval_loss": 1.5}) + "\n")
    return trial.parent


@pytest.mark.parametrize("form", ["dir=", ""])  # `dir=SWEEP_DIR`, and the earlier bare path
def test_sweep_summary_takes_dir_or_a_bare_path(tmp_path, capsys, form):
    sweep = _sweep(tmp_path)
    assert run_command("sweep-summary", [f"{form}{sweep}"]) == 0
    assert "lora.r=8" in capsys.readouterr().out and (sweep / "summary.csv").is_file()


def test_sweep_summary_of_no_directory_is_one_line(tmp_path, capsys):
    assert run_command("sweep-summary", [f"dir={tmp_path / 'none'}"]) == 2
    assert capsys.readouterr().err == f"error: sweep-summary: dir={tmp_path / 'none'} is not a directory\n"
