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
from pathlib import Path

from omegaconf import DictConfig

from lora_launch.conf.schema import ConfigError, load
from lora_launch.launcher.hostfile import resolve
from lora_launch.launcher.launch import launch_command, launch_env, node_env_vars, printable, run, write_launch_files
from lora_launch.launcher.lock import RunLock, lock_path
from lora_launch.launcher.topology import Topology


def node_command(cfg: DictConfig, topo: Topology, files: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
    """This node's `accelerate launch` command and the environment variables it needs."""
    rank = topo.node_rank if topo.num_machines > 1 else None
    return launch_command(files, node_rank=rank), node_env_vars(cfg, topo)


def run_node(cfg: DictConfig, topo: Topology, lock_wait_s: float = 0.0) -> tuple[int, bool]:
    """Launch this node's processes and wait; returns (exit code, whether stopped by SIGTERM)."""
    run_dir = Path(cfg.run.dir)
    with RunLock(lock_path(run_dir, topo.node_rank, topo.num_machines), wait_s=lock_wait_s):
        files = write_launch_files(cfg, run_dir, topo)
        cmd, env_vars = node_command(cfg, topo, files)
        digest = hashlib.sha256(files["config"].read_bytes()).hexdigest()[:16]
        print(f"run dir: {run_dir}\nnode {topo.node_rank} of {topo.num_machines}, {topo.procs_per_node} "
              f"processes, world size {topo.world_size}, config sha256 {digest}\n"
              f"launch:  {printable(cmd, env_vars)}", flush=True)
        received: list[int] = []
        rc = run(cmd, launch_env(env_vars), received)
    return rc, signal.SIGTERM in received


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
        # a requeued attempt can start while the last attempt's processes on this node are still exiting
        rc, stopped = run_node(cfg, slurm_topology(cfg), lock_wait_s=REQUEUE_LOCK_WAIT_S)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if stopped:
        print(f"node stopped by SIGTERM (training exit code {rc}); the job script decides on requeue", flush=True)
        return 0
    return rc


if __name__ == "__main__":
    sys.exit(main())
