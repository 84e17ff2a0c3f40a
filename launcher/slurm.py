"""`launcher=slurm`: write RUN/slurm.sbatch and submit it with `sbatch`.

The script is plain sbatch (no submitit dependency), readable and re-submittable by hand. It runs
one task per node (`srun --ntasks-per-node=1`); each task is `python -m lora_launch.launcher.node --run-dir RUN`,
which finds its node rank and the rendezvous host from Slurm's variables and starts that node's
`accelerate launch`. Preemption: SIGTERM (from Slurm before a time limit with --signal, on
preemption, or `scancel --signal=TERM`) reaches training through srun; training checkpoints after
its current step and records `preempted` in RUN/status.json. The script then requeues the job,
and the requeued job resumes from RUN/checkpoints. run.dir must be on a filesystem every node sees.

A rank that dies (launcher.max_restarts) is restarted inside the job, by each node's launcher.node
loop in step with the others, not by failing the step and requeueing: the job keeps its allocation
(a requeue goes back to the queue, is held about two minutes, and on a busy cluster may wait hours for
nodes), and the restart is the same code on Slurm, hostfile and local launches. A node that gives up
exits non-zero, and `--kill-on-bad-exit` ends the step on the others.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig

from lora_launch.conf.schema import ConfigError, check_text
from lora_launch.launcher.launch import write_launch_files
from lora_launch.launcher.topology import Topology
from lora_launch.run.plan import RunPlan
from lora_launch.run.process import run_to_end
from lora_launch.run.rundir import write_atomic


def _directives(cfg: DictConfig, topo: Topology, run_dir: Path) -> list[str]:
    """The `#SBATCH` lines: one option each, quoted as sbatch reads them (an unquoted `#` starts a comment)."""
    s = cfg.launcher.slurm
    for i, option in enumerate(s.extra):
        check_text(f"launcher.slurm.extra[{i}]", option)  # composition refused these; a hand-written file too
        if not str(option).startswith("-"):
            raise ConfigError(
                f"launcher.slurm.extra[{i}]={option!r}: each entry is one sbatch option, e.g. --exclusive or --mem=0"
            )
    check_text("the working directory", os.getcwd())
    opts = [
        f"--job-name=lora-{run_dir.name}",
        f"--nodes={topo.num_machines}",
        "--ntasks-per-node=1",
        f"--output={run_dir}/slurm-%j.out",
        "--open-mode=append",
        "--requeue",
        f"--chdir={os.getcwd()}",
    ]
    if s.signal_before_s:
        opts.append(f"--signal=TERM@{s.signal_before_s}")
    if s.gpus_per_node:
        opts.append(f"--gpus-per-node={s.gpus_per_node}")
    if s.cpus_per_task:
        opts.append(f"--cpus-per-task={s.cpus_per_task}")
    for key in ("partition", "account", "time"):
        if s[key]:
            check_text(f"launcher.slurm.{key}", s[key])
            opts.append(f"--{key}={s[key]}")
    return [f"#SBATCH {shlex.quote(str(o))}" for o in [*opts, *s.extra]]


def sbatch_script(cfg: DictConfig, topo: Topology, run_dir: Path, python: str = sys.executable) -> str:
    """The job script: one launcher.node task per node, requeue when training stopped for SIGTERM."""
    check_text("run.dir", str(run_dir))  # it is written unquoted in a comment line too
    run = shlex.quote(str(run_dir))
    node = f"{shlex.quote(python)} -m lora_launch.launcher.node --run-dir {run}"
    return "\n".join(
        [
            "#!/bin/bash",
            *_directives(cfg, topo, run_dir),
            f"# Written by lora-launch from {run_dir}/config.yaml; resubmit by hand with: sbatch {run}/slurm.sbatch",
            "",
            "# SIGTERM to this shell (preemption) must not end it before training has checkpointed",
            "trap 'echo \"slurm.sbatch: SIGTERM; waiting for training to checkpoint\"' TERM",
            f"attempt={run}/.slurm-attempt",
            'touch "$attempt"',
            'echo "job $SLURM_JOB_ID attempt ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST"',
            f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 {node}",
            "rc=$?",
            "# preempted in this attempt (status written after it began): requeue, the next attempt resumes",
            f'if [ {run}/status.json -nt "$attempt" ] && grep -q \'"state": "preempted"\' {run}/status.json; then',
            '  echo "slurm.sbatch: training stopped with a checkpoint; requeueing job $SLURM_JOB_ID"',
            '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
            "fi",
            "exit $rc",
            "",
        ]
    )


def submit(cfg: DictConfig, topo: Topology, plan: RunPlan) -> int:
    """Write the run dir's launch files and slurm.sbatch, then `sbatch` it (unless slurm.submit=false)."""
    run_dir = Path(cfg.run.dir)
    # written now for inspection; each node rewrites the same files inside the job (GPU-dependent values)
    write_launch_files(cfg, run_dir, topo, plan)
    script = write_atomic(run_dir / "slurm.sbatch", sbatch_script(cfg, topo, run_dir))
    print(f"run dir: {run_dir}\nsbatch script: {script}", flush=True)
    if not cfg.launcher.slurm.submit:
        print(f"submit with: sbatch {shlex.quote(str(script))}", flush=True)
        return 0
    if shutil.which("sbatch") is None:
        raise ConfigError(
            "launcher=slurm: `sbatch` not found on PATH; run on a Slurm login node or set launcher.slurm.submit=false"
        )
    result = run_to_end(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise ConfigError(f"launcher=slurm: sbatch refused {script}: {first}")
    job = result.stdout.strip().split(";")[0]
    print(f"submitted Slurm job {job}; log: {run_dir}/slurm-{job}.out", flush=True)
    return 0
