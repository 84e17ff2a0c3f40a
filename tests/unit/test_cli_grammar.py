"""One grammar on the command line: Hydra's flags anywhere, studio's key=value as its flags, "did you mean",
text fitted to the terminal, the warm-up warning; each a pure function, run without a process."""

from __future__ import annotations

import json

import pytest

from lora_launch.catalog.terminal import fit_table, terminal_width, wrap
from lora_launch.cli.commands import help_text, studio_flags
from lora_launch.cli.main import did_you_mean
from lora_launch.cli.train import first_missing, hydra_argv
from lora_launch.conf.compose import compose
from lora_launch.conf.schema import ConfigError
from lora_launch.launcher.checks import warmup_warning
from lora_launch.sweep.trials import summarize, summary_text

# ---- Hydra's flags anywhere -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,want",
    [
        (["preset=llama2_guanaco", "--cfg", "job"], ["--cfg", "job", "preset=llama2_guanaco"]),
        (["lora.r=4", "--info", "lora.r=8"], ["lora.r=4", "lora.r=8", "--info"]),  # last: it would take lora.r=8
        (["--info"], ["--info"]),
        (["lora.r=4", "--info", "defaults", "seed=1"], ["--info", "defaults", "lora.r=4", "seed=1"]),
        (["-c", "all", "seed=1", "--resolve"], ["-c", "all", "--resolve", "seed=1"]),
        (["seed=1", "--config-name=config"], ["--config-name=config", "seed=1"]),
    ],
)
def test_hydra_flags_move_before_the_overrides(argv, want):
    assert hydra_argv(argv) == want


# ---- a misspelled command -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "word,command",
    [("serv", "serve"), ("stduio", "studio"), ("rnus", "runs"), ("merg", "merge"), ("sweep-sumary", "sweep-summary")],
)
def test_a_misspelled_command_gets_did_you_mean(word, command):
    assert did_you_mean(word) == f"unknown command {word!r}; did you mean {command}?"


@pytest.mark.parametrize("word", ["serve=1", "lora.r=8", "--cfg", "+extra=1", "bogus"])
def test_overrides_flags_and_unlike_words_are_not_commands(word):
    assert did_you_mean(word) is None


# ---- studio takes key=value ------------------------------------------------------------------------


def test_studio_keys_become_its_flags_and_flags_pass_through():
    argv = ["port=8001", "--root", "a=b", "allow_path=[/data,/models]", "host=0.0.0.0"]
    assert studio_flags(argv) == [
        "--root",
        "a=b",
        "--host",
        "0.0.0.0",
        "--port",
        "8001",
        "--allow-path",
        "/data",
        "--allow-path",
        "/models",
    ]
    assert studio_flags(["--port", "0"]) == ["--port", "0"]


@pytest.mark.parametrize(
    "arg,says",
    [("prot=1", "unknown argument 'prot=1'; known: host= port= root= allow_path="), ("port=abc", "port=abc")],
)
def test_studio_bad_keys_are_one_line(arg, says):
    with pytest.raises(ConfigError, match="^studio: ") as e:
        studio_flags([arg])
    assert says in str(e.value) and "\n" not in str(e.value)


# ---- fitted to the terminal ------------------------------------------------------------------------


def test_terminal_width_reads_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "73")
    assert terminal_width() == 73 and terminal_width(fallback=None) == 73


@pytest.mark.parametrize("width", [60, 80, 100])
def test_help_fits_the_width_and_loses_no_word(width):
    folded = help_text(width)
    assert max(map(len, folded.splitlines())) <= width
    assert folded.split() == help_text(10_000).split()
    assert max(map(len, help_text(10_000).splitlines())) > 100  # there was something to fold


def test_a_continuation_lines_up_under_its_second_column():
    lines = wrap("  data.format   " + " | ".join(["choice"] * 20), 60).splitlines()
    assert len(lines) > 1 and all(line.startswith(" " * 16) and line[16] != " " for line in lines[1:])


def test_a_table_drops_columns_in_order_then_cuts_the_long_ones():
    cells = [["name", "a", "b", "note"], ["runs/" + "x" * 40, "1" * 10, "2" * 10, "why " * 10]]
    assert fit_table(cells, None, [1, 2], [3, 0]) == (cells, [])
    cut, dropped = fit_table(cells, 60, [1, 2], [3, 0], keep_end=(0,))
    assert dropped == [1] and sum(map(len, cut[1])) + 2 * (len(cut[1]) - 1) <= 60
    assert cut[1][0].startswith("…") and cut[1][0].endswith("x") and cut[1][-1].endswith("…")


def test_a_sweep_summary_fits_and_ends_with_the_path_of_summary_md(tmp_path):
    for r, loss in ((8, 1.5), (16, 1.2)):
        trial = tmp_path / f"lora.r={r},optim.lr=0.0003,lora.dropout=0.1"
        trial.mkdir()
        (trial / "trial.json").write_text(
            json.dumps({"status": "completed", "overrides": [f"lora.r={r}"], "wall_time": 12.5})
        )
        (trial / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "eval_loss": loss}) + "\n")
    rows = summarize(tmp_path)
    text = summary_text(tmp_path, rows, 50).splitlines()
    assert max(map(len, text[:-1])) <= 50 and text[-1] == f"summary: {tmp_path / 'summary.md'}"  # a path whole
    assert [line.split()[0][-10:] for line in text[1:3]] == [r["trial"][-10:] for r in rows]  # best first
    whole = summary_text(tmp_path, rows, None).splitlines()
    assert whole[0].split() == [
        "trial",
        "status",
        "steps",
        "best",
        "eval",
        "final",
        "loss",
        "tok/s",
        "wall",
        "s",
        "error",
    ]


# ---- preview creates nothing: the folders the run dir needs ------------------------------------------


def test_first_missing_is_the_topmost_folder_a_run_dir_would_make(tmp_path):
    assert first_missing(tmp_path / "runs" / "a" / "b") == tmp_path / "runs"
    (tmp_path / "runs").mkdir()
    assert first_missing(tmp_path / "runs" / "a") == tmp_path / "runs" / "a"
    assert first_missing(tmp_path / "runs") is None


# ---- the warm-up that swallows the run --------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,named",
    [
        (["train.max_steps=10"], "optim.warmup_steps=20 >= train.max_steps=10"),  # the tiny recipe warms up 20
        (["train.max_steps=20"], "optim.warmup_steps=20 >= train.max_steps=20"),
        (
            ["train.max_steps=10", "optim.warmup_steps=0", "optim.warmup_ratio=1.0"],
            "optim.warmup_ratio=1.0 (10 steps) >= train.max_steps=10",
        ),
    ],
)
def test_a_warmup_as_long_as_the_run_is_named(overrides, named):
    line = warmup_warning(compose(overrides))
    assert line.startswith(named) and "optim.lr" in line and "\n" not in line


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.max_steps=21"],
        ["train.max_steps=-1"],
        ["train.max_steps=10", "optim.warmup_steps=0", "optim.warmup_ratio=0.5"],
    ],
)
def test_a_warmup_shorter_than_the_run_is_not(overrides):
    assert warmup_warning(compose(overrides)) is None
