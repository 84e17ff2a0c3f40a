"""Entry of every rank: `python -m lora_launch.train --config RUN_DIR/config.yaml` (what `lora-launch` starts),
or `accelerate launch -m lora_launch.train [overrides]`, where rank 0 composes the config once and every
rank reads the file it writes."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lora_launch.conf.schema import ConfigError, load


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lora_launch.train", description=__doc__)
    parser.add_argument("--config", help="resolved config file written by lora-launch")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, when no --config is given")
    return parser.parse_args(argv)


def _compose_on_rank0(overrides: list[str]) -> Path:
    """Rank 0 composes and writes config.yaml; every rank gets its path (one run dir, not one per rank)."""
    from lora_launch.launcher.compose import compose, write_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    path = None
    if rank == 0:
        cfg = compose(overrides)
        path = str(write_config(cfg, Path(cfg.run.dir)))
    if world > 1:
        import torch
        import torch.distributed as dist

        # the process group accelerate will reuse; nothing else crosses ranks before it exists
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        box = [path]
        dist.broadcast_object_list(box, src=0)
        path = box[0]
    return Path(path)


def _die_with_launcher() -> None:
    """Under torchrun each rank has its own session: make it die when the launcher does (Linux).

    Otherwise a launcher killed with SIGKILL leaves ranks training on, writing checkpoints.
    """
    if not os.environ.get("TORCHELASTIC_RUN_ID") or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() == 1:  # the launcher died before the line above
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        config_path = Path(args.config) if args.config else _compose_on_rank0(args.overrides)
        cfg = load(str(config_path))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from lora_launch.train.checkpoint import CheckpointError, finished_step
    from lora_launch.train.data import DataError
    from lora_launch.train.loop import Trainer

    done = finished_step(cfg)
    if done is not None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{cfg.run.dir}: this run already finished at step {done}; nothing to do "
                  "(resume.mode=never starts it over)", flush=True)
        return 0
    _die_with_launcher()
    try:
        trainer = Trainer(cfg)
    except (CheckpointError, DataError) as e:  # bad data: one line, before anything is written
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        trainer.fit()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
