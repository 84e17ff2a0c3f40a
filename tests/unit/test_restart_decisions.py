"""Restarts (launcher.max_restarts) without processes: which endings are retried, how an attempt's failure
is read from the run dir on every node alike, when a repeating failure stops them, and the commands."""

from __future__ import annotations

import io
import signal
import socket
import time

import pytest

from lora_launch.conf.compose import compose
from lora_launch.launcher.node import exit_code, node_command
from lora_launch.launcher.relay import StderrRelay
from lora_launch.launcher.restart import (
    UNRECORDED,
    Attempts,
    Failure,
    first_failure,
    killed_rank,
    not_retried,
    restart_config,
    why_not_restart,
)
from lora_launch.launcher.supervise import Outcome
from lora_launch.launcher.topology import Topology
from lora_launch.run.rundir import read_status, record_restart, write_attempt_record, write_json, write_status

GLOO = "RuntimeError: [pair.cc:{line}] Connection closed by peer [10.0.0.{host}]:{port}"


def test_the_same_failure_ignores_ports_and_addresses_but_not_the_step_the_rank_or_the_error():
    a = Failure(7, 0, GLOO.format(line=553, host=2, port=41234))
    assert a.same_as(Failure(7, 0, GLOO.format(line=553, host=2, port=50001)))
    assert not a.same_as(Failure(8, 0, GLOO.format(line=553, host=2, port=41234)))
    assert not a.same_as(Failure(7, 1, GLOO.format(line=553, host=2, port=41234)))
    assert not a.same_as(Failure(7, 0, "ValueError: nan loss"))
    at = "RuntimeError: bad tensor at {}".format
    assert Failure(3, 0, at("0x7f3a9c")).same_as(Failure(3, 0, at("0x55e1")))
    assert str(Failure(7, 1, "killed by SIGKILL")) == "rank 1 failed after step 7 (killed by SIGKILL)"
    assert str(Failure(None, None, UNRECORDED)).startswith("a rank failed before training started (no rank")


def test_the_first_failure_is_a_killed_rank_else_the_earliest_record():
    crash = {"rank": 3, "step": 7, "error": "RuntimeError: boom", "time": 100.0}
    peer = {"rank": 0, "step": 7, "error": GLOO.format(line=1, host=1, port=2), "time": 100.5}
    assert first_failure([peer, crash], [], 9) == Failure(7, 3, "RuntimeError: boom")
    # a rank killed by a signal wrote nothing; its peers' records give the step
    assert first_failure([peer], [{"rank": 1, "signal": "SIGKILL"}], 9) == Failure(7, 1, "killed by SIGKILL")
    assert first_failure([], [], 9) == Failure(9, None, UNRECORDED)


def test_restarts_stop_at_a_repeat_or_when_used_up():
    flaky = [Failure(3, 1, "killed by SIGKILL"), Failure(9, 0, "RuntimeError: x")]
    assert why_not_restart(flaky[:1], 2) is None
    assert why_not_restart(flaky, 2) is None
    assert "all 2 restarts" in why_not_restart([*flaky, Failure(11, 0, "RuntimeError: y")], 2)
    repeat = [Failure(5, 0, "RuntimeError: bad row 12"), Failure(5, 0, "RuntimeError: bad row 12")]
    assert "failed the same way after the same step" in why_not_restart(repeat, 5)


@pytest.mark.parametrize(
    "state,outcome,retried",
    [
        ("finished", Outcome(1), False),  # a rank failed after the run finished: nothing to redo
        ("preempted", Outcome(0, signal.SIGTERM), False),
        ("running", Outcome(1, signal.SIGTERM), False),  # the user or the scheduler stops it
        ("running", Outcome(-9, signal.SIGINT, killed=True), False),
        ("running", Outcome(1, errors=("error: bad data",)), False),  # a refusal is never retried
        ("running", Outcome(2), False),
        ("running", Outcome(0), False),
        ("running", Outcome(1), True),
        ("running", Outcome(-9, aborted=True), True),  # stopped because another node's ranks failed
        (None, Outcome(1), True),
    ],
)
def test_which_endings_are_retried(tmp_path, state, outcome, retried):
    started = time.time()
    if state is not None:
        write_status(tmp_path, state, 4)
    assert (not_retried(tmp_path, outcome, started) is None) == retried


def test_a_status_of_an_earlier_launch_does_not_stop_a_retry(tmp_path):
    write_status(tmp_path, "finished", 4)
    assert not_retried(tmp_path, Outcome(1), started=time.time() + 5) is None


def test_the_rank_a_signal_killed_first_is_named_by_its_global_rank():
    assert killed_rank(Outcome(1, first_exit=(1, -9)), node_rank=2, procs_per_node=4) == {
        "rank": 9,
        "signal": "SIGKILL",
    }
    assert killed_rank(Outcome(1, first_exit=(0, 1)), 0, 1) is None
    assert killed_rank(Outcome(-9, aborted=True, first_exit=(0, -9)), 0, 1) is None  # this launcher killed it
    assert killed_rank(Outcome(1), 0, 1) is None


def test_without_a_restart_the_error_names_the_rank_a_signal_killed(tmp_path, capsys):
    assert exit_code(tmp_path, Outcome(1, first_exit=(1, -9)), time.time()) == 1
    assert "training exited with code 1 (local rank 1 was killed by SIGKILL)" in capsys.readouterr().err


def test_a_restart_resumes_from_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    never = compose([f"run.dir={run}", "resume.mode=never"])
    assert restart_config(never, run).resume.mode == "auto"  # never sets its own progress aside
    assert never.resume.mode == "never"
    other = tmp_path / "other" / "checkpoints" / "step-4"
    other.mkdir(parents=True)
    write_json(other / "manifest.json", {})
    named = compose([f"run.dir={run}", f"resume.mode={other}"])
    assert restart_config(named, run).resume.mode == named.resume.mode  # nothing of this run saved yet
    (run / "checkpoints" / "step-3").mkdir(parents=True)
    write_json(run / "checkpoints" / "step-3" / "manifest.json", {})
    assert restart_config(named, run).resume.mode == "auto"


def test_each_attempt_of_a_multi_process_launch_has_its_own_rendezvous_port(tmp_path):
    cfg = compose([f"run.dir={tmp_path}", "launcher.main_process_port=29600"])
    files = {"accelerate": tmp_path / "accelerate.yaml", "config": tmp_path / "config.yaml"}

    def port(topo: Topology, attempt: int) -> int | None:
        cmd = node_command(cfg, topo, files, attempt)[0]
        return int(cmd[cmd.index("--main_process_port") + 1]) if "--main_process_port" in cmd else None

    two_nodes = Topology(2, 1, 1, "10.0.0.1", 29600)
    assert [port(two_nodes, a) for a in (0, 1, 2)] == [29600, 29601, 29602]  # every node computes the same
    assert port(Topology(1, 1, 0, "127.0.0.1", 29600), 2) is None  # one process: no rendezvous
    # one node with several processes: a free port each attempt, not the configured one, which another
    # launch on this machine may hold
    one_node = Topology(1, 2, 0, "127.0.0.1", 29600)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 29600))
        held.listen()
        ports = [port(one_node, a) for a in (0, 0, 1)]
    assert all(p != 29600 and 1024 <= p < 65536 for p in ports), ports


def test_every_node_reads_the_same_failure_and_ignores_an_earlier_launch(tmp_path):
    write_attempt_record(tmp_path, 0, "rank1", {"rank": 1, "step": 2, "error": "RuntimeError: old launch"})
    since = time.time() + 0.01
    time.sleep(0.02)
    nodes = [Attempts(tmp_path, n, 2, since) for n in (0, 1)]
    assert not nodes[0].peer_failed(0)
    write_attempt_record(tmp_path, 0, "rank0", {"rank": 0, "step": 5, "error": GLOO.format(line=1, host=2, port=3)})
    nodes[1].report(0, None, {"rank": 1, "signal": "SIGKILL"})
    assert nodes[0].peer_failed(0) and not nodes[1].peer_failed(0)
    assert nodes[0].wait_for_nodes(0, stopped=lambda: False, timeout_s=0.2) is None  # node 0 has not reported
    assert nodes[0].missing(0) == [0]
    nodes[0].report(0, None)
    for node in nodes:
        assert set(node.wait_for_nodes(0, stopped=lambda: False, timeout_s=5)) == {0, 1}
        assert node.failure(0) == Failure(5, 1, "killed by SIGKILL")


def test_a_node_whose_part_ended_otherwise_says_why(tmp_path):
    since = time.time()
    Attempts(tmp_path, 1, 2, since).report(3, "a rank refused its input")
    assert Attempts(tmp_path, 0, 2, since).wait_for_nodes(3, lambda: False, 0.1) is None
    Attempts(tmp_path, 0, 2, since).report(3, None)
    nodes = Attempts(tmp_path, 0, 2, since).wait_for_nodes(3, lambda: False, 5)
    assert nodes[1]["failed"] is False and nodes[1]["why"] == "a rank refused its input"
    assert not Attempts(tmp_path, 0, 2, since).peer_failed(3)  # a refusal is no reason to kill one's ranks


def test_status_keeps_its_record_of_restarts(tmp_path):
    write_status(tmp_path, "running", 0)
    record_restart(tmp_path, {"attempt": 1, "step": 4, "rank": 1, "error": "killed by SIGKILL"})
    write_status(tmp_path, "running", 3)  # the relaunched rank 0 starts from the checkpoint
    write_status(tmp_path, "finished", 12)
    status = read_status(tmp_path)
    assert status["state"] == "finished" and [r["attempt"] for r in status["restarts"]] == [1]


@pytest.mark.parametrize(
    "text,first",
    [
        (
            "E1129 05:50:24.251000 20001 .venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/"
            "api.py:1002] failed (exitcode: -9) local_rank: 1 (pid: 20009) of binary: /venv/bin/python\n",
            (1, -9),
        ),
        (
            "E1129 05:50:24.251000 20001 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) "
            "local_rank: 0 (pid: 20009) of binary: /venv/bin/python\n",
            (0, 1),
        ),
        (
            "subprocess.CalledProcessError: Command '['python', '-m', 'lora_launch.train']' died with "
            "<Signals.SIGKILL: 9>.\n",
            (0, -9),
        ),
        ("step 3: checkpoint saved\n", None),
    ],
)
def test_the_relay_notes_which_rank_failed_first(text, first):
    out = io.StringIO()
    relay = StderrRelay(io.BytesIO(text.encode()), out).start()
    relay.join()
    assert relay.first_exit == first
    assert ("checkpoint" in out.getvalue()) == (first is None)  # torchrun's own log lines are not shown
