"""One user-error base with one handler: every error class the product defines is a UserError, each process the
CLI runs ends one in `reports_user_errors` (one `error:` line, exit 2, no traceback), and no other module writes
that line's prefix."""

from __future__ import annotations

import ast
import builtins
import importlib

import pytest

from lora_launch.conf.errors import EXIT_STATUS, PREFIX, UserError, reports_user_errors, say_error
from lora_launch.conf.schema import ConfigError
from support.cli import REPO

PACKAGES = ("strategies", "conf", "run", "data", "launcher", "train", "serve", "catalog", "sweep", "studio", "cli")
HANDLER = REPO / "conf" / "errors.py"
# the main function of every process `lora-launch` is or starts: the front door and its subcommands, a sweep,
# the ranks, generate/merge/eval, serve, the studio, a Slurm node
ENTRIES = [
    "cli.main:main",
    "cli.commands:run_command",
    "cli.runs:main",
    "sweep.sweeper:run_sweep",
    "train.__main__:main",
    "train.posttrain:main",
    "serve.__main__:main",
    "studio.app:main",
    "launcher.node:main",
]


def _product_modules():
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            yield path, ast.parse(path.read_text())


def _is_builtin_exception(name: str) -> bool:
    found = getattr(builtins, name, None)
    return isinstance(found, type) and issubclass(found, BaseException)


def test_every_error_class_of_the_product_is_a_user_error():
    """A class that derives from a built-in exception derives from UserError too (UserError itself aside)."""
    wrong, found = [], []
    for path, tree in _product_modules():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
            if any(_is_builtin_exception(b) or b == "UserError" for b in bases):
                found.append(node.name)
                if "UserError" not in bases and path != HANDLER:
                    wrong.append(f"{path.relative_to(REPO)}: {node.name}")
    assert wrong == []
    assert {"ConfigError", "DataError", "CheckpointError", "ApiError", "Refused"} <= set(found)


def test_the_error_classes_are_user_errors_at_run_time():
    from lora_launch.data.templates import DataError
    from lora_launch.run.checkpoints import CheckpointError

    assert all(issubclass(c, UserError) for c in (ConfigError, DataError, CheckpointError))
    # still what code that catches a bad value expects
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)
    pytest.importorskip("fastapi")
    from lora_launch.serve.app import ApiError
    from lora_launch.studio.app import Refused

    assert issubclass(ApiError, UserError) and issubclass(Refused, UserError)


def test_a_user_error_is_one_line_and_exit_2(capsys):
    @reports_user_errors
    def main() -> int:
        try:
            raise OSError("the cause")
        except OSError as e:
            raise ConfigError("train.lr=-1: must be > 0") from e

    assert main() == EXIT_STATUS == 2
    assert capsys.readouterr().err == "error: train.lr=-1: must be > 0\n"


def test_other_exceptions_pass_through_the_handler():
    @reports_user_errors
    def main() -> int:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        main()


@pytest.mark.parametrize("entry", ENTRIES)
def test_each_process_entry_ends_user_errors_in_the_one_handler(entry):
    module, name = entry.split(":")
    function = getattr(importlib.import_module(f"lora_launch.{module}"), name)
    assert getattr(function, "__wrapped__", None) is not None and function.__module__ == f"lora_launch.{module}"
    assert function.__code__ is reports_user_errors(lambda: 0).__code__


def _starts_with_prefix(node: ast.AST) -> bool:
    if isinstance(node, ast.JoinedStr) and node.values:
        node = node.values[0]
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(PREFIX.strip())


def test_only_the_handler_spells_the_error_line():
    """`error: ...` is written by say_error alone; a module that reads such lines takes PREFIX from it."""
    wrong = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path, tree in _product_modules()
        if path != HANDLER
        for node in ast.walk(tree)
        if _starts_with_prefix(node)
    ]
    assert wrong == []


def test_say_error_survives_a_closed_terminal(monkeypatch):
    class Gone:
        def write(self, text):
            raise OSError("the terminal is gone")

        def flush(self):
            raise OSError("the terminal is gone")

    monkeypatch.setattr("sys.stderr", Gone())
    say_error("nobody reads this")
