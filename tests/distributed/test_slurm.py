"""`launcher=slurm` through a real single-node Slurm: the sbatch script, a training job, and a
requeue after `scancel --signal=TERM` that resumes from the checkpoint.

The fixture starts its own munged, slurmctld and slurmd (Debian's packages, installed by
.ci/setup-system.sh) with every file in a temporary directory and a private munge socket, and
stops them by PID afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.cli import CLI, read_jsonl, subprocess_env
from lora_launch.conf.compose import compose
from lora_launch.launcher.slurm import sbatch_script
from lora_launch.launcher.topology import topology

BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo"]


def test_sbatch_script_shape(tmp_path):
    cfg = compose(["launcher=slurm", "launcher.slurm.nodes=4", "launcher.slurm.gpus_per_node=8",
                   "launcher.slurm.partition=gpu", "launcher.slurm.time=04:00:00",
                   "launcher.slurm.extra=[--exclusive]", f"run.dir={tmp_path}"])
    topo = topology(cfg)
    assert (topo.num_machines, topo.procs_per_node, topo.world_size) == (4, 8, 32)
    text = sbatch_script(cfg, topo, tmp_path, python="/venv/bin/python")
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --requeue", "#SBATCH --signal=TERM@120", "#SBATCH --partition=gpu",
                 "#SBATCH --time=04:00:00", "#SBATCH --exclusive",
                 f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 /venv/bin/python -m lora_launch.launcher.node --run-dir {tmp_path}",
                 'scontrol requeue "$SLURM_JOB_ID"']:
        assert line in text.splitlines() or line in text, line
    result = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert result.returncode == 0, result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(d: Path, host: str) -> str:
    return f"""ClusterName=loratest
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobRequeue=1
NodeName={host} CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _wait(predicate, timeout: float, what: str, step: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def slurm(tmp_path_factory):
    """A running single-node Slurm; yields the environment that points clients at it."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        pytest.skip(f"Slurm binaries missing ({', '.join(missing)}): run .ci/setup-system.sh as root")
    if os.geteuid() != 0:
        pytest.skip("a private Slurm needs root (slurmd runs jobs as their user)")
    d = tmp_path_factory.mktemp("slurm")
    os.chmod(d, 0o755)  # munged wants its socket's directory reachable by all
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    (d / "munge.key").write_bytes(os.urandom(1024))
    os.chmod(d / "munge.key", 0o400)
    host = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text(_slurm_conf(d, host))
    env = dict(subprocess_env(), SLURM_CONF=str(conf))
    sbin = lambda b: shutil.which(b) or f"/usr/sbin/{b}"  # noqa: E731
    procs = [subprocess.Popen([sbin("munged"), "-F", "--force", f"--key-file={d}/munge.key",
                               f"--socket={d}/munge.sock", f"--pid-file={d}/munged.pid",
                               f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        _wait(lambda: (d / "munge.sock").exists(), 20, "munged")
        for daemon in ("slurmctld", "slurmd"):
            procs.append(subprocess.Popen([sbin(daemon), "-D", "-f", str(conf)], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                               text=True).stdout, 60, "the Slurm node to be idle")
        yield {"env": env, "dir": d}
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


def _diagnosis(job: str, env: dict, slurm_dir: Path, log: str) -> str:
    show = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    ctld = (slurm_dir / "slurmctld.log").read_text()[-2000:] if (slurm_dir / "slurmctld.log").exists() else ""
    return f"{show}\n--- slurmctld.log (tail)\n{ctld}\n--- job log (tail)\n{log[-3000:]}"


def _job_state(job: str, env: dict) -> tuple[str, int]:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    state = re.search(r"JobState=(\S+)", out)
    restarts = re.search(r"Restarts=(\d+)", out)
    return (state.group(1) if state else "UNKNOWN"), int(restarts.group(1)) if restarts else 0


@pytest.mark.slow
def test_slurm_job_requeued_after_sigterm_resumes(slurm, tiny, tmp_path):
    env, run = slurm["env"], tmp_path / "run"
    steps = 60
    cmd = [*tiny["overrides"], "launcher=slurm", f"run.dir={run}", f"train.max_steps={steps}",
           "train.micro_batch_size=2", "checkpoint.every_steps=5", "eval.at_start=false",
           "logging.tensorboard=false", "sample.max_new_tokens=0", "launcher.num_processes=1"]
    result = subprocess.run([CLI, *cmd], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    job = re.search(r"submitted Slurm job (\d+)", result.stdout).group(1)
    log = run / f"slurm-{job}.out"

    # preempt it mid-run: once a few steps are logged, SIGTERM every task of the job
    def trained_some():
        rows = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
        if _job_state(job, env)[0] in TERMINAL:  # ended before it could be preempted: say why
            raise AssertionError(_diagnosis(job, env, slurm["dir"], log.read_text() if log.exists() else ""))
        return len([r for r in rows if "loss" in r]) >= 3
    try:
        _wait(trained_some, 240, "the job to train a few steps", step=0.1)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{_diagnosis(job, env, slurm['dir'], log.read_text() if log.exists() else '')}") from None
    subprocess.run(["scancel", "--signal=TERM", job], env=env, check=True)

    _wait(lambda: _job_state(job, env)[1] >= 1, 120, "the job to be requeued")
    # Slurm holds a requeued job back by about two minutes (Reason=BeginTime); a test need not wait for
    # that. The update only takes once the first attempt has finished completing and the job is pending.
    def ended():
        show = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
        if "JobState=PENDING" in show and "Reason=BeginTime" in show:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, capture_output=True)
        return _job_state(job, env)[0] in TERMINAL
    try:
        _wait(ended, 400, "the requeued job to end", step=1)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{_diagnosis(job, env, slurm['dir'], log.read_text())}") from None

    text = log.read_text()
    assert _job_state(job, env)[0] == "COMPLETED", _diagnosis(job, env, slurm["dir"], text)
    assert "requeueing job" in text and "stopped by SIGTERM with a checkpoint at step" in text
    stopped = int(re.search(r"stopped by SIGTERM with a checkpoint at step (\d+)", text).group(1))
    assert 3 <= stopped < steps
    assert re.search(rf"resumed from \S+ \(step {stopped // 5 * 5}|resumed from \S+ \(step {stopped}", text), text[-3000:]
    rows = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert rows == list(range(1, steps + 1))  # every step exactly once across the two attempts
    assert '"state": "finished"' in (run / "status.json").read_text()
    assert (run / "adapter" / "adapter_config.json").is_file()
