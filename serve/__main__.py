"""`lora-launch serve key=value ...` runs `python -m lora_launch.serve key=value ...` as its own process."""

from __future__ import annotations

import importlib.util
import sys

from lora_launch.conf.errors import reports_user_errors


@reports_user_errors
def main(argv: list[str]) -> int:
    """Check the arguments and directories, then exec `vllm serve` or serve here; errors are one line, exit 2."""
    from lora_launch.conf.args import parse_args
    from lora_launch.run.quiet import quiet_third_party
    from lora_launch.serve.adapters import api_key, exec_vllm, resolve

    quiet_third_party()
    try:
        args = parse_args("serve", argv)
        if args.engine == "transformers":
            require_extra()
        served = resolve(args)
        if args.engine == "vllm":
            return exec_vllm(served, args)
        from lora_launch.serve.app import serve

        return serve(served, args, api_key(args))
    except KeyboardInterrupt:
        print("stopped (Ctrl-C)", file=sys.stderr)
        return 130


def require_extra() -> None:
    """FastAPI and uvicorn come with the `serve` extra: one line naming it when they are missing."""
    from lora_launch.conf.schema import ConfigError

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"serve needs {' and '.join(missing)}: `pip install 'lora-launch[serve]'`, or serve with engine=vllm"
        )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
