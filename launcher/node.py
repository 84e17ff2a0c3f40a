"""This node's share of a launch: take the run dir's lock, write the launch files, run `accelerate launch`.

Used by `lora-launch` on each node (local and hostfile launches) and, inside a Slurm job, by
`python -m lora_launch.launcher.node --run-dir RUN` on every node of the allocation (see launcher/slurm.py).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from lora_launch.conf.schema import ConfigError, load
from lora_launch.launcher.hostfile import resolve
from lora_launch.launcher.launch import launch_command, launch_env, node_env_vars, printable, write_launch_files
from lora_launch.launcher.supervise import Outcome, supervise
from lora_launch.launcher.topology import Topology, run_plan
from lora_launch.run.lock import RunLock, check_no_ranks, lock_path, ranks_lock_path
from lora_launch.run.plan import RunPlan
from lora_launch.run.process import signal_name
from lora_launch.run.rundir import read_status, set_aside_previous, write_atomic


def node_command(cfg: DictConfig, topo: Topology, files: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
    """This node's `accelerate launch` command and the environment variables it needs."""
    rank = topo.node_rank if topo.num_machines > 1 else None
    return launch_command(files, node_rank=rank), node_env_vars(cfg, topo)


def run_node(cfg: DictConfig, topo: Topology, plan: RunPlan, lock_wait_s: float = 0.0) -> int:
    """Launch this node's processes under supervision and wait; returns the exit code status.json calls for.

    The run dir's locks are checked first: no other launch on this node, and no training process of
    an earlier one still alive (its launcher killed, it is checkpointing on its own).
    """
    run_dir = Path(cfg.run.dir)
    with RunLock(lock_path(run_dir, topo.node_rank, topo.num_machines), wait_s=lock_wait_s):
        check_no_ranks(ranks_lock_path(run_dir, topo.node_rank, topo.num_machines), wait_s=lock_wait_s)
        if cfg.resume.mode == "never" and topo.node_rank == 0 and cfg.launcher.name != "slurm":
            moved = set_aside_previous(run_dir)  # every file of the earlier run, before this one writes any
            if moved is not None:
                print(f"resume.mode=never: moved the earlier run's files to {moved}", flush=True)
        write_command(run_dir)
        files = write_launch_files(cfg, run_dir, topo, plan)
        cmd, env_vars = node_command(cfg, topo, files)
        digest = hashlib.sha256(files["config"].read_bytes()).hexdigest()[:16]
        print(f"run dir: {run_dir}\nnode {topo.node_rank} of {topo.num_machines}, {topo.procs_per_node} "
              f"processes, world size {topo.world_size}, config sha256 {digest}\n"
              f"launch:  {printable(cmd, env_vars)}", flush=True)
        started = time.time()
        outcome = supervise(cmd, launch_env(env_vars, topo.node_rank))
    return exit_code(run_dir, outcome, started)


def write_command(run_dir: Path) -> None:
    """RUN/.hydra/overrides.yaml: the command line of this launch, written only once every check passed
    (Hydra's own .hydra/ is off: a refused command must not rewrite an existing run's record)."""
    import yaml

    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / ".hydra" / "overrides.yaml", yaml.safe_dump(_command_overrides(), sort_keys=False))


def _command_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra (the Slurm node entry): the overrides are in config.yaml already
        return []


def _say(message: str, error: bool = False) -> None:
    try:
        print(message, file=sys.stderr if error else sys.stdout, flush=True)
    except OSError:  # the terminal is gone (SIGHUP)
        pass


def exit_code(run_dir: Path, outcome: Outcome, started: float) -> int:
    """0 only for a run this launch finished or stopped with a checkpoint (130 for Ctrl-C); else non-zero.

    The exit code of `accelerate launch` alone says nothing: it is 0 after a rank that returned early.
    """
    status = read_status(run_dir)
    state = status.get("state") if status.get("time", 0) >= started else None
    interrupted = outcome.signum == signal.SIGINT or outcome.killed
    if state == "finished":
        return 0
    if state == "preempted":
        by = "Ctrl-C" if interrupted else signal_name(outcome.signum) or status.get("signal", "a stop signal")
        _say(f"stopped by {by} with a checkpoint at step {status['step']}; run the same command to continue")
        return 130 if interrupted else 0
    if outcome.killed:
        _say(f"stopped at once by a second Ctrl-C, without a checkpoint; run the same command to continue from "
             f"the last one in {run_dir}/checkpoints", error=True)
        return 130
    if outcome.signum is not None:
        _say(f"stopped by {'Ctrl-C' if interrupted else signal_name(outcome.signum)} before training had anything "
             "to save", error=True)
        return 130 if interrupted else 128 + outcome.signum
    if outcome.errors:  # a rank refused its input and said why in one line: that is the whole story
        return 2
    rc = outcome.returncode if outcome.returncode != 0 else 1
    if outcome.returncode == 0:
        _say(f"error: training exited without finishing (status.json: {state or 'not written by this launch'}); "
             f"see {run_dir}", error=True)
    elif outcome.returncode != 2:  # 2: the rank already said what was wrong, in one line
        _say(f"error: training exited with code {outcome.returncode}; see {run_dir}", error=True)
    return rc


REQUEUE_LOCK_WAIT_S = 120.0


def slurm_hosts(nodelist: str) -> list[str]:
    """The job's host names in node-rank order (`scontrol show hostnames`)."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def slurm_topology(cfg: DictConfig, environ: dict[str, str] | None = None) -> Topology:
    """This node's place in the Slurm job, from the variables srun sets."""
    env = os.environ if environ is None else environ
    hosts = slurm_hosts(env["SLURM_JOB_NODELIST"])
    return Topology(len(hosts), int(cfg.launcher.num_processes), int(env["SLURM_NODEID"]), resolve(hosts[0]),
                    cfg.launcher.main_process_port, tuple(hosts))


def main(argv: list[str] | None = None) -> int:
    """Entry of each node inside a Slurm job. Exit 0 on a SIGTERM stop, so the job script can requeue."""
    parser = argparse.ArgumentParser(prog="python -m lora_launch.launcher.node", description=__doc__)
    parser.add_argument("--run-dir", required=True, help="run dir written by `lora-launch launcher=slurm`")
    args = parser.parse_args(argv)
    try:
        cfg = load(str(Path(args.run_dir) / "config.yaml"))
        topo = slurm_topology(cfg)
        # a requeued attempt can start while the last attempt's processes on this node are still exiting
        return run_node(cfg, topo, run_plan(cfg, topo), lock_wait_s=REQUEUE_LOCK_WAIT_S)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
