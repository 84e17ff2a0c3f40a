"""Entry of every rank: `python -m lora_launch.train --config RUN_DIR/config.yaml` (what `lora-launch`
starts), or `accelerate launch -m lora_launch.train [overrides]`, where rank 0 composes the config once,
takes the run dir's lock and every rank reads the file it writes."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from lora_launch.conf.errors import UserError, reports_user_errors
from lora_launch.conf.schema import ConfigError, load
from lora_launch.run import lock
from lora_launch.run.plan import shape_from_env
from lora_launch.run.process import (
    ATTEMPT_ENV,
    NODE_RANK_ENV,
    SUPERVISOR_ENV,
    die_with_parent,
    end_at_once_on_stop_signals,
    guard_output,
)
from lora_launch.run.quiet import quiet_third_party
from lora_launch.run.rundir import fault_message, finished_step, read_status, write_attempt_record, write_status
from lora_launch.run.teardown import end_process_group, skip_final_collections

_held: list = []  # the locks this process holds for its whole life


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lora_launch.train", description=__doc__)
    parser.add_argument("--config", help="resolved config file written by lora-launch")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, when no --config is given")
    return parser.parse_args(argv)


def _env_int(*names: str, default: int = 0) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def _node() -> tuple[int, int]:
    """(this node's rank, number of nodes), as the launch set them."""
    return _env_int(NODE_RANK_ENV, "GROUP_RANK"), shape_from_env()[0]


def _supervised(run_dir: Path, node_rank: int, num_machines: int) -> bool:
    """Whether the lora-launch that holds this node's launch lock started this process."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    return bool(supervisor) and str(lock.holder(run_dir, node_rank, num_machines).get("pid")) == supervisor


def _take_launch_lock(run_dir: Path) -> None:
    """Started without lora-launch: this node's local rank 0 holds the launch lock, as lora-launch would,
    and refuses while training processes of another launch still run here."""
    node_rank, machines = _node()
    if _env_int("LOCAL_RANK") != 0 or _supervised(run_dir, node_rank, machines):
        return
    _held.append(lock.RunLock(lock.lock_path(run_dir, node_rank, machines)).acquire())
    ranks = lock.ranks_lock_path(run_dir, node_rank, machines)
    foreign = [pid for pid in lock.lock_holders(ranks) if not _sibling(pid)]
    if foreign:
        raise ConfigError(
            f"run.dir {run_dir} is in use: training processes of an earlier launch are still running "
            f"(pids {', '.join(map(str, foreign))}, lock {ranks}); wait for them to checkpoint and end"
        )


def _sibling(pid: int) -> bool:
    """A rank of this same launch (same parent: torchrun's agent or accelerate)."""
    import psutil

    try:
        return pid == os.getpid() or psutil.Process(pid).ppid() == os.getppid()
    except psutil.Error:
        return True  # gone already


def _hold_ranks_lock(run_dir: Path) -> None:
    node_rank, machines = _node()
    _held.append(lock.RanksLock(lock.ranks_lock_path(run_dir, node_rank, machines)).acquire())


def _compose_on_rank0(overrides: list[str]) -> Path:
    """Rank 0 composes the config, takes the run dir's lock and writes config.yaml; every rank gets its
    path (one run dir, not one per rank) or the error that stopped rank 0."""
    world = _env_int("WORLD_SIZE", default=1)
    box = [None, None]
    if _env_int("RANK") == 0:
        try:
            from lora_launch.conf.compose import compose
            from lora_launch.run.rundir import write_config

            cfg = compose(overrides)
            _take_launch_lock(Path(cfg.run.dir))
            box = [str(write_config(cfg, Path(cfg.run.dir))), None]
        except ConfigError as e:
            box = [None, str(e)]
    if world > 1:
        import torch
        import torch.distributed as dist

        # the process group accelerate will reuse; nothing else crosses ranks before it exists
        if torch.cuda.is_available():
            torch.cuda.set_device(_env_int("LOCAL_RANK"))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise ConfigError(box[1])
    return Path(box[0])


def _quiet_third_party() -> None:
    """The libraries' notices out of the log (run/quiet.py), and those only a rank meets."""
    quiet_third_party()
    if os.environ.get("LORA_LAUNCH_VERBOSE"):
        return
    import torch

    if not torch.cuda.is_available():  # DeepSpeed's "Setting accelerator to CPU. If you have GPU ..."
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights: 100%|..." for a model of a few MB


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    skip_final_collections()
    # until training runs there is nothing to save: a stop signal ends this process at once, quietly
    end_at_once_on_stop_signals()
    guard_output()  # the launcher reading our stderr may go away; training goes on
    # if whatever started this rank dies (lora-launch SIGKILLed, accelerate gone), stop with a checkpoint
    die_with_parent(signal.SIGTERM)
    if os.getppid() == 1:  # it died before the line above
        return 1
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        config_path = Path(args.config) if args.config else _compose_on_rank0(args.overrides)
        cfg = load(str(config_path))
        run_dir = Path(cfg.run.dir)
        guard_output(str(run_dir / f"rank{_env_int('RANK')}.log"))
        done = finished_step(run_dir, cfg.resume.mode)
        if done is not None:
            if _env_int("RANK") == 0:
                print(
                    f"{run_dir}: this run already finished at step {done}; nothing to do "
                    "(resume.mode=never starts it over)",
                    flush=True,
                )
            return 0
        if args.config:
            _take_launch_lock(run_dir)
        _hold_ranks_lock(run_dir)
    except OSError as e:  # the run dir cannot take the rank's log or lock
        message = fault_message(e)
        if message is None:
            raise
        raise UserError(message) from None
    _quiet_third_party()
    from lora_launch.train.loop import Trainer

    trainer, failed = None, True
    try:
        trainer = Trainer(cfg)
        trainer.fit()  # loads the checkpoint first: a refused or damaged one is one line too
        failed = False
    except UserError:  # bad data, checkpoint or run dir: one line, nothing lost
        raise
    except OSError as e:  # disk full, read-only, permissions: committed checkpoints stay as they were
        message = fault_message(e, where=run_dir)
        if message is None:
            _record_failure(run_dir, trainer, e)
            raise
        _write_failed(run_dir, trainer.step if trainer else 0, message)
        raise UserError(message) from None
    except Exception as e:  # a crash, not the user's input: the launcher may restart the run
        _record_failure(run_dir, trainer, e)
        raise
    finally:
        if trainer is not None:
            try:
                trainer.close()
            except Exception:
                if not failed:
                    raise
                # closing after a failure fails alike (the disk is still full): the failure said is the story
    return 0


def _write_failed(run_dir: Path, step: int, reason: str) -> None:
    """Rank 0: status.json of a run that was training says it failed and why (the disk may refuse that too)."""
    status = read_status(run_dir)
    if _env_int("RANK") != 0 or status.get("state") != "running":
        return
    try:
        write_status(run_dir, "failed", step, error=reason)
    except OSError:
        pass


def _record_failure(run_dir: Path, trainer, e: Exception) -> None:
    """Tell the launcher how this rank failed, before its peers see it gone: the step and the error in one
    line, from which it tells a flaky host from a bug that repeats (launcher/restart.py)."""
    attempt = os.environ.get(ATTEMPT_ENV)
    if attempt is None:  # not started by lora-launch: nobody restarts it
        return
    lines = str(e).strip().splitlines()
    error = f"{type(e).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")[:300]
    try:
        write_attempt_record(
            run_dir,
            int(attempt),
            f"rank{_env_int('RANK')}",
            {"rank": _env_int("RANK"), "step": trainer.step if trainer else None, "error": error},
        )
    except OSError:  # the run dir is what failed: the launcher falls back to metrics.jsonl
        pass


if __name__ == "__main__":
    status = main()
    if _env_int("WORLD_SIZE", default=1) > 1:  # ranks that ended together, refusing or done
        end_process_group()
    sys.exit(status)
