"""This node's share of a launch: take the run dir's lock, write the launch files, run `accelerate launch`,
and after a failure relaunch it from the last checkpoint, in step with the other nodes (launcher/restart.py).

Used by `lora-launch` on each node (local and hostfile launches) and, inside a Slurm job, by
`python -m lora_launch.launcher.node --run-dir RUN` on every node of the allocation (see launcher/slurm.py).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import os
import signal
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from lora_launch.conf.errors import reports_user_errors, say_error
from lora_launch.conf.schema import load
from lora_launch.launcher.hostfile import resolve
from lora_launch.launcher.launch import launch_command, launch_env, node_env_vars, printable, write_launch_files
from lora_launch.launcher.restart import (
    Attempts,
    Failure,
    killed_rank,
    not_retried,
    rendezvous_port,
    restart_config,
    resume_point,
    why_not_restart,
)
from lora_launch.launcher.supervise import Outcome, supervise
from lora_launch.launcher.topology import Topology, run_plan
from lora_launch.run.lock import RunLock, check_no_ranks, lock_path, ranks_lock_path
from lora_launch.run.plan import RunPlan
from lora_launch.run.process import ATTEMPT_ENV, StopSignals, run_to_end, signal_name
from lora_launch.run.rundir import read_status, record_restart, set_aside_previous, write_atomic, write_status


def node_command(
    cfg: DictConfig, topo: Topology, files: dict[str, Path], attempt: int = 0
) -> tuple[list[str], dict[str, str]]:
    """This node's `accelerate launch` command and the environment variables it needs; the ranks of each
    attempt (0, then a restart's 1, 2, ...) meet at a rendezvous port of its own (`rendezvous_port`)."""
    rank = topo.node_rank if topo.num_machines > 1 else None
    port = rendezvous_port(cfg, attempt, topo.num_machines) if topo.world_size > 1 else None
    return launch_command(files, node_rank=rank, main_port=port), node_env_vars(cfg, topo)


def run_node(cfg: DictConfig, topo: Topology, plan: RunPlan, lock_wait_s: float = 0.0) -> int:
    """Launch this node's processes under supervision, relaunch them after a failure (launcher.max_restarts),
    and wait; returns the exit code status.json calls for.

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
        # a stop between two supervised launches (while a restart is prepared) is recorded: nothing more starts
        with StopSignals() as held:
            return _attempts(cfg, topo, plan, held)


def _launch(cfg: DictConfig, topo: Topology, plan: RunPlan, attempt: int, abort) -> Outcome:
    """One attempt: write the launch files (a restart's resume from the last checkpoint) and run it."""
    run_dir = Path(cfg.run.dir)
    files = write_launch_files(restart_config(cfg, run_dir) if attempt else cfg, run_dir, topo, plan)
    cmd, env_vars = node_command(cfg, topo, files, attempt)
    if attempt == 0:
        digest = hashlib.sha256(files["config"].read_bytes()).hexdigest()[:16]
        print(
            f"run dir: {run_dir}\nnode {topo.node_rank} of {topo.num_machines}, {topo.procs_per_node} "
            f"processes, world size {topo.world_size}, config sha256 {digest}\n"
            f"launch:  {printable(cmd, env_vars)}",
            flush=True,
        )
    env = launch_env(env_vars, topo.node_rank)
    env[ATTEMPT_ENV] = str(attempt)
    return supervise(cmd, env, abort)


def _attempts(cfg: DictConfig, topo: Topology, plan: RunPlan, held: StopSignals) -> int:
    """Attempt 0, and after each failure that a restart may cure, the next one, on every node alike."""
    run_dir, max_restarts = Path(cfg.run.dir), int(cfg.launcher.max_restarts)
    attempts = Attempts(run_dir, topo.node_rank, topo.num_machines, since=time.time())
    failures: list[Failure] = []
    for attempt in itertools.count():
        if held.signum is not None:  # it came while the restart was prepared
            return _stopped_between_attempts(run_dir, held.signum)
        started = time.time()
        abort = functools.partial(attempts.peer_failed, attempt) if topo.num_machines > 1 else None
        outcome = _launch(cfg, topo, plan, attempt, abort)
        why_ended = not_retried(run_dir, outcome, started)
        attempts.report(attempt, why_ended, killed_rank(outcome, topo.node_rank, topo.procs_per_node))
        if why_ended is not None or max_restarts == 0:
            return exit_code(run_dir, outcome, started)
        rc = _unless_every_node_failed(run_dir, attempts, attempt, held)
        if rc is not None:
            return rc
        failures.append(attempts.failure(attempt))
        why_not = why_not_restart(failures, max_restarts)
        if why_not is not None:
            return _give_up(run_dir, topo, failures[-1], why_not)
        if topo.node_rank == 0:
            f = failures[-1]
            record_restart(
                run_dir, {"attempt": attempt + 1, "step": f.step, "rank": f.rank, "error": f.error, "time": time.time()}
            )
        _say(
            f"restart {attempt + 1} of {max_restarts}: {failures[-1]}; relaunching"
            f"{' every node' if topo.num_machines > 1 else ''} from {resume_point(run_dir)}"
        )


def _unless_every_node_failed(run_dir: Path, attempts: Attempts, attempt: int, held: StopSignals) -> int | None:
    """Wait for every node's report of this attempt: None when all failed (then every node restarts),
    else the exit code, having said why not."""
    nodes = attempts.wait_for_nodes(attempt, stopped=lambda: held.signum is not None)
    if held.signum is not None:
        return _stopped_between_attempts(run_dir, held.signum)
    if nodes is None:
        say_error(
            f"not restarting: node(s) {', '.join(map(str, attempts.missing(attempt)))} did not report "
            "how their part of the run ended; see their output"
        )
        return 1
    ended = [(n, r["why"]) for n, r in sorted(nodes.items()) if not r.get("failed")]
    if ended:
        say_error(f"not restarting: on node {ended[0][0]}, {ended[0][1]}; see its output")
        return 1
    return None


def _give_up(run_dir: Path, topo: Topology, failure: Failure, why_not: str) -> int:
    if topo.node_rank == 0:
        step = failure.step if failure.step is not None else read_status(run_dir).get("step", 0)
        write_status(run_dir, "failed", step, error=str(failure))
    say_error(f"{failure}; not restarting: {why_not}")
    return 1


def _stopped_between_attempts(run_dir: Path, signum: int) -> int:
    name = "Ctrl-C" if signum == signal.SIGINT else signal_name(signum)
    _say(
        f"stopped by {name} before a restart; run the same command to continue from the last checkpoint in "
        f"{run_dir}/checkpoints",
        error=True,
    )
    return 130 if signum == signal.SIGINT else 128 + signum


def write_command(run_dir: Path) -> None:
    """RUN/.hydra/overrides.yaml: the command line of this launch, written only once every check passed
    (Hydra's own .hydra/ is off: a refused command must not rewrite an existing run's record)."""
    import yaml

    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / ".hydra" / "overrides.yaml", yaml.safe_dump(_command_overrides(), sort_keys=False))


def _command_overrides() -> list[str]:
    from lora_launch.conf.compose import task_overrides

    try:
        return task_overrides()
    except ValueError:  # nothing composed here (the Slurm node entry): the overrides are in config.yaml already
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
        _say(
            f"stopped at once by a second Ctrl-C, without a checkpoint; run the same command to continue from "
            f"the last one in {run_dir}/checkpoints",
            error=True,
        )
        return 130
    if outcome.signum is not None:
        _say(
            f"stopped by {'Ctrl-C' if interrupted else signal_name(outcome.signum)} before training had anything "
            "to save",
            error=True,
        )
        return 130 if interrupted else 128 + outcome.signum
    if outcome.errors:  # a rank refused its input and said why in one line: that is the whole story
        return 2
    rc = outcome.returncode if outcome.returncode != 0 else 1
    if outcome.returncode == 0:
        say_error(
            f"training exited without finishing (status.json: {state or 'not written by this launch'}); see {run_dir}"
        )
    elif outcome.returncode != 2:  # 2: the rank already said what was wrong, in one line
        local, code = outcome.first_exit or (0, 0)
        killed = f" (local rank {local} was killed by {signal_name(-code)})" if code < 0 else ""
        say_error(f"training exited with code {outcome.returncode}{killed}; see {run_dir}")
    return rc


REQUEUE_LOCK_WAIT_S = 120.0


def slurm_hosts(nodelist: str) -> list[str]:
    """The job's host names in node-rank order (`scontrol show hostnames`)."""
    out = run_to_end(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def slurm_topology(cfg: DictConfig, environ: dict[str, str] | None = None) -> Topology:
    """This node's place in the Slurm job, from the variables srun sets."""
    env = os.environ if environ is None else environ
    hosts = slurm_hosts(env["SLURM_JOB_NODELIST"])
    return Topology(
        len(hosts),
        int(cfg.launcher.num_processes),
        int(env["SLURM_NODEID"]),
        resolve(hosts[0]),
        cfg.launcher.main_process_port,
        tuple(hosts),
    )


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    """Entry of each node inside a Slurm job. Exit 0 on a SIGTERM stop, so the job script can requeue."""
    parser = argparse.ArgumentParser(prog="python -m lora_launch.launcher.node", description=__doc__)
    parser.add_argument("--run-dir", required=True, help="run dir written by `lora-launch launcher=slurm`")
    args = parser.parse_args(argv)
    cfg = load(str(Path(args.run_dir) / "config.yaml"))
    topo = slurm_topology(cfg)
    # a requeued attempt can start while the last attempt's processes on this node are still exiting
    return run_node(cfg, topo, run_plan(cfg, topo), lock_wait_s=REQUEUE_LOCK_WAIT_S)


if __name__ == "__main__":
    sys.exit(main())
