"""`lora-launch`: the front door. The first word picks a subcommand (cli/commands.py, cli/runs.py), the project's
help, a sweep (`-m`, sweeps/sweeper.py) or, with none of them, a training launch (cli/train.py)."""

from __future__ import annotations

import difflib
import sys

from lora_launch.conf.errors import UserError, reports_user_errors
from lora_launch.run.process import exit_on_closed_stdout
from lora_launch.run.quiet import quiet_third_party
from lora_launch.run.teardown import skip_final_collections

# `lora-launch COMMAND key=value ...`: arguments typed in conf/args.py, run by cli/commands.py
# (generate, merge, eval and serve read RUN/config.yaml and RUN/adapter in their own process)
SUBCOMMANDS = {
    "generate": "print base + adapter's completion of a prompt",
    "merge": "write base + adapter as one safetensors model",
    "eval": "eval loss and perplexity of base + adapter",
    "serve": "an OpenAI-compatible HTTP endpoint for base + adapters (runs, sweeps)",
    "studio": "a local web app to compose, preview, launch and watch runs",
    "sweep-summary": "rebuild a sweep's summary files",
    # read run dirs only; flags, not key=value (cli/runs.py)
    "runs": "list runs and sweep trials; `runs diff A B` compares two",
    "report": "write the runs as one self-contained HTML page",
}


@reports_user_errors
def main() -> None:
    """`lora-launch`: the project's help, a subcommand, or a launch composed by Hydra; a UserError is one line,
    exit 2."""
    skip_final_collections()
    quiet_third_party()
    try:
        try:
            _main()
        finally:
            sys.stdout.flush()  # a closed pipe fails here, not in the interpreter's flush at exit (a traceback)
    except KeyboardInterrupt:  # Ctrl-C before training started (while composing, checking): nothing to save
        print("interrupted before training started", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `lora-launch --help | head -1`
        exit_on_closed_stdout()


def did_you_mean(word: str) -> str | None:
    """A one-line error for a first word that is no override and close to a command's name, else None."""
    if "=" in word or word.startswith(("-", "+", "~")):
        return None
    close = difflib.get_close_matches(word, SUBCOMMANDS, n=1)
    return f"unknown command {word!r}; did you mean {close[0]}?" if close else None


def _main() -> None:
    unknown = did_you_mean(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] not in SUBCOMMANDS else None
    if unknown:
        raise UserError(f"{unknown} (lora-launch --help lists the commands)")
    if len(sys.argv) > 1 and sys.argv[1] in ("runs", "report"):
        from lora_launch.cli.runs import main as runs_main

        sys.exit(runs_main(sys.argv[1], sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        from lora_launch.cli.commands import run_command

        sys.exit(run_command(sys.argv[1], sys.argv[2:]))
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        from lora_launch.cli.commands import help_text

        print(help_text())
        sys.exit(0)
    if {"-m", "--multirun"} & set(sys.argv[1:]):  # a sweep: each trial a `lora-launch` of its own
        from lora_launch.sweep.sweeper import run_sweep

        sys.exit(run_sweep([a for a in sys.argv[1:] if a not in ("-m", "--multirun")]))
    from lora_launch.cli.train import launch

    launch()


if __name__ == "__main__":
    main()
