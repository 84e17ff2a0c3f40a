"""`launcher=slurm` through a real Slurm: the sbatch script; a single-node job requeued after
`scancel --signal=TERM` that resumes from the checkpoint; and a two-node job (each node a network
namespace of its own) that restarts itself on both nodes after one node loses its rank, then is
preempted, requeued and resumed on both.

The fixtures start their own munged, slurmctld and slurmd (support/slurm.py; Debian's packages, installed
by .ci/setup-system.sh) with every file in a temporary directory and a private munge socket, and stop
them by PID afterwards, deleting the namespaces.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from lora_launch.conf.compose import compose
from lora_launch.launcher.slurm import sbatch_script
from lora_launch.launcher.topology import topology
from lora_launch.train.data import SampleStream
from support.cli import CLI, read_jsonl
from support.ports import free_port
from support.restart import RESTART_BASE, train_ranks
from support.resume import eval_losses, reference, status, train_losses, train_size
from support.slurm import TERMINAL, Cluster, missing_reason, slurm_cluster, wait_for


def test_sbatch_script_shape(tmp_path):
    cfg = compose(
        [
            "launcher=slurm",
            "launcher.slurm.nodes=4",
            "launcher.slurm.gpus_per_node=8",
            "launcher.slurm.partition=gpu",
            "launcher.slurm.time=04:00:00",
            "launcher.slurm.extra=[--exclusive]",
            f"run.dir={tmp_path}",
        ]
    )
    topo = topology(cfg)
    assert (topo.num_machines, topo.procs_per_node, topo.world_size) == (4, 8, 32)
    text = sbatch_script(cfg, topo, tmp_path, python="/venv/bin/python")
    for line in [
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --requeue",
        "#SBATCH --signal=TERM@120",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=04:00:00",
        "#SBATCH --exclusive",
        f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 /venv/bin/python -m lora_launch.launcher.node --run-dir {tmp_path}",
        'scontrol requeue "$SLURM_JOB_ID"',
    ]:
        assert line in text.splitlines() or line in text, line
    result = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def slurm(tmp_path_factory):
    """A running single-node Slurm (support/slurm.py)."""
    reason = missing_reason(1)
    if reason:
        pytest.skip(reason)
    with slurm_cluster(tmp_path_factory.mktemp("slurm"), nodes=1) as cluster:
        yield cluster


@pytest.fixture
def slurm2(tmp_path_factory):
    """A running Slurm of two nodes, each in its own network namespace (support/slurm.py)."""
    reason = missing_reason(2)
    if reason:
        pytest.skip(reason)
    try:
        cm = slurm_cluster(tmp_path_factory.mktemp("slurm2"), nodes=2)
        cluster = cm.__enter__()
    except subprocess.CalledProcessError as e:  # `ip netns add` refused: no namespaces in this container
        pytest.skip(f"network namespaces unavailable: {(e.stderr or str(e)).strip()}")
    try:
        yield cluster
    finally:
        cm.__exit__(None, None, None)


def _submit(cluster: Cluster, args: list[str], cwd: Path) -> str:
    result = subprocess.run(
        cluster.on([CLI, *args]), env=cluster.env, cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return re.search(r"submitted Slurm job (\d+)", result.stdout).group(1)


def _newest_step(run: Path) -> int:
    rows = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
    return max((r["step"] for r in rows if "loss" in r), default=0)


def _wait_in_job(cluster: Cluster, job: str, log: Path, predicate, timeout: float, what: str, step: float = 0.1):
    """wait_for(predicate), failing at once, with the job's story, if the job ends first."""

    def check():
        if cluster.job_state(job)[0] in TERMINAL:
            raise AssertionError(f"the job ended before {what}:\n{cluster.diagnosis(job, log)}")
        return predicate()

    try:
        return wait_for(check, timeout, what, step)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{cluster.diagnosis(job, log)}") from None


def _requeue_and_finish(cluster: Cluster, job: str, log: Path) -> None:
    """SIGTERM every task of the job (preemption), then wait for the requeued job to complete."""
    subprocess.run(cluster.on(["scancel", "--signal=TERM", job]), env=cluster.env, check=True)
    try:
        wait_for(lambda: cluster.job_state(job)[1] >= 1, 120, "the job to be requeued")

        def ended():
            cluster.release_if_held(job)
            return cluster.job_state(job)[0] in TERMINAL

        wait_for(ended, 400, "the requeued job to end", step=1)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{cluster.diagnosis(job, log)}") from None
    assert cluster.job_state(job)[0] == "COMPLETED", cluster.diagnosis(job, log)


@pytest.mark.slow
def test_slurm_job_requeued_after_sigterm_resumes(slurm, tiny, tmp_path):
    run = tmp_path / "run"
    steps = 60
    job = _submit(
        slurm,
        [
            *tiny["overrides"],
            "launcher=slurm",
            f"run.dir={run}",
            f"train.max_steps={steps}",
            "train.micro_batch_size=2",
            "checkpoint.every_steps=5",
            "eval.at_start=false",
            "logging.tensorboard=false",
            "sample.max_new_tokens=0",
            "launcher.num_processes=1",
        ],
        tmp_path,
    )
    log = run / f"slurm-{job}.out"
    # preempt it mid-run: once a few steps are logged, SIGTERM every task of the job
    _wait_in_job(slurm, job, log, lambda: _newest_step(run) >= 3, 240, "the job to train a few steps")
    _requeue_and_finish(slurm, job, log)

    text = log.read_text()
    assert "requeueing job" in text and "stopped by SIGTERM with a checkpoint at step" in text
    stopped = int(re.search(r"stopped by SIGTERM with a checkpoint at step (\d+)", text).group(1))
    assert 3 <= stopped < steps
    assert re.search(rf"resumed from \S+ \(step {stopped // 5 * 5}|resumed from \S+ \(step {stopped}", text), text[
        -3000:
    ]
    rows = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert rows == list(range(1, steps + 1))  # every step exactly once across the two attempts
    assert '"state": "finished"' in (run / "status.json").read_text()
    assert (run / "adapter" / "adapter_config.json").is_file()


TWO_NODE_STEPS = 30


@pytest.mark.slow
def test_two_node_job_restarts_after_a_lost_rank_and_resumes_after_a_requeue(slurm2, tiny, tmp_path, tmp_path_factory):
    """One task per node, ranks meeting across the namespaces; node 2's rank SIGKILLed (restart on both
    nodes), then the job preempted (requeue, resume on both): every step once, each rank its own samples,
    the same weights on both after every step, and the losses of one node with two processes, bit for bit."""
    common = [*RESTART_BASE, f"train.max_steps={TWO_NODE_STEPS}"]
    ref = reference(tiny, tmp_path_factory.getbasetemp(), [*common, "launcher.num_processes=2"])
    run = tmp_path / "run"
    job = _submit(
        slurm2,
        [
            *tiny["overrides"],
            *common,
            "launcher=slurm",
            "launcher.slurm.nodes=2",
            "launcher.num_processes=1",
            f"launcher.main_process_port={free_port(span=4)}",
            f"run.dir={run}",
        ],
        tmp_path,
    )
    log = run / f"slurm-{job}.out"

    _wait_in_job(slurm2, job, log, lambda: _newest_step(run) >= 4, 300, "both nodes to train past step 3")
    node2_ranks = train_ranks(slurm2.pids(1))
    assert len(node2_ranks) == 1, node2_ranks
    node2_ranks[0].send_signal(signal.SIGKILL)  # node 2 loses its rank, as to the OOM killer

    restarted = lambda: log.read_text().count("restart 1 of 2: ") == 2  # noqa: E731 - one line per node
    _wait_in_job(slurm2, job, log, restarted, 300, "both nodes to restart")
    resumed_at = int(re.search(r"from the checkpoint at step (\d+)", log.read_text()).group(1))
    _wait_in_job(slurm2, job, log, lambda: _newest_step(run) >= resumed_at + 4, 300, "training to go on")
    _requeue_and_finish(slurm2, job, log)

    text = log.read_text()
    for node, dev in enumerate(n.device for n in slurm2.nodes):
        assert f"node {node} of 2, 1 processes, world size 2" in text
        assert f"GLOO_SOCKET_IFNAME={dev}" in text  # each node bound gloo to its own veth
    lines = re.findall(r"^restart \d+ of 2: .*$", text, re.M)
    assert len(lines) == 2 and lines[0] == lines[1], lines
    assert re.fullmatch(
        rf"restart 1 of 2: rank 1 failed after step \d+ \(killed by SIGKILL\); relaunching every "
        rf"node from the checkpoint at step {resumed_at}",
        lines[0],
    ), lines[0]
    assert text.count("stopped by SIGTERM with a checkpoint at step") == 2 and "requeueing job" in text
    stopped = int(re.search(r"stopped by SIGTERM with a checkpoint at step (\d+)", text).group(1))
    assert resumed_at < stopped < TWO_NODE_STEPS
    assert f"step-{stopped} (step {stopped}" in text.split("requeueing job")[1]  # the requeued job resumed there

    assert train_losses(run) == ref["train"] and eval_losses(run) == ref["eval"]  # every step once, bit for bit
    # each step's global batch is the stream's next 8 samples, split between the nodes' ranks, and both
    # ranks hold the same weights after every step (their gradients were averaged across the namespaces)
    audit = [read_jsonl(run / "ranks" / f"rank{r}.jsonl") for r in (0, 1)]
    assert [a["step"] for a in audit[0]] == [a["step"] for a in audit[1]] == list(range(1, TWO_NODE_STEPS + 1))
    stream = SampleStream(train_size(text), seed=0)
    for a0, a1 in zip(*audit):
        batch = [stream.index(p) for p in range(8 * (a0["step"] - 1), 8 * a0["step"])]
        assert len(a0["samples"]) == len(a1["samples"]) == 4
        assert Counter(a0["samples"] + a1["samples"]) == Counter(batch), f"samples of step {a0['step']}"
        assert a0["trainable_sha256"] == a1["trainable_sha256"], f"the nodes' weights differ after step {a0['step']}"
    st = status(run)
    assert st["state"] == "finished" and [r["attempt"] for r in st["restarts"]] == [1]
