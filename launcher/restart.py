"""Restarting a run after a failure (`launcher.max_restarts`): which endings are retried, and how the
nodes of a multi-node launch reach the same decision.

A rank that dies with an exception first records the step it had completed and its error, in one line,
in RUN/attempts/<A>/rank<R>.json; a rank killed outright (SIGKILL, the OOM killer, a lost host) records
nothing, and its peers record the collective that failed after it. When its part of attempt A has
ended, each node's launcher writes RUN/attempts/<A>/node<N>.json (failed, or ended for a reason that is
not retried), waits until every node has, and decides from those same files, so every node decides alike:

- retried: a failure on every node, up to launcher.max_restarts times, each attempt from the last
  committed checkpoint (resume.mode=auto: exact data position and RNG);
- never retried: a finished or preempted run, a stop signal, a rank's refusal of its input (exit 2);
- a failure of the same rank, after the same step, with the same error as the attempt before stops at
  once: a deterministic bug does not go away by retrying.

While an attempt runs, a node that sees another node's failure stops its own ranks at once: over NCCL,
ranks whose peer died can hang in a collective until its timeout. Each attempt meets at a rendezvous
port of its own (`rendezvous_port`), so no node reaches a store of the attempt before that is still
shutting down.
"""

from __future__ import annotations

import copy
import re
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from lora_launch.launcher.supervise import Outcome
from lora_launch.run.process import signal_name
from lora_launch.run.rundir import (
    attempt_records,
    committed_checkpoints,
    newest_logged_step,
    read_status,
    write_attempt_record,
)

NODES_WAIT_S = 300.0  # after its own part failed, how long a node waits to hear from the others
UNRECORDED = "no rank recorded an error (killed by a signal, the OOM killer, or its host went away)"


@dataclass(frozen=True)
class Failure:
    """How one attempt failed: the rank that failed first, the optimizer steps completed, its error."""

    step: int | None  # None: before training started
    rank: int | None  # None: no rank recorded an error
    error: str

    def __str__(self) -> str:
        who = "a rank" if self.rank is None else f"rank {self.rank}"
        when = "before training started" if self.step is None else f"after step {self.step}"
        return f"{who} failed {when} ({self.error})"

    def same_as(self, other: Failure) -> bool:
        """The same rank after the same step with the same error, ports, pids and addresses aside."""
        shape = lambda f: (f.step, f.rank, re.sub(r"0x[0-9a-fA-F]+|\d+", "N", f.error))  # noqa: E731
        return shape(self) == shape(other)


def first_failure(records: list[dict], killed: list[dict], last_step: int | None) -> Failure:
    """The attempt's failure: a rank killed by a signal (it could record nothing; its peers' records are
    the collectives that failed after it, and give the step), else the earliest rank record (later ones
    are peers seeing it fail), else the last step metrics.jsonl shows."""
    steps = [r["step"] for r in records if r.get("step") is not None]
    if killed:
        first = min(killed, key=lambda k: k["rank"])
        return Failure(min(steps) if steps else last_step, first["rank"], f"killed by {first['signal']}")
    if not records:
        return Failure(last_step, None, UNRECORDED)
    first = min(records, key=lambda r: r.get("time", 0))
    return Failure(first.get("step"), first.get("rank"), str(first.get("error", "no message")))


def killed_rank(outcome: Outcome, node_rank: int, procs_per_node: int) -> dict | None:
    """{"rank", "signal"} when the first rank of this node that failed was killed by a signal (and not by
    this launcher, after another node's failure)."""
    if outcome.aborted or outcome.first_exit is None or outcome.first_exit[1] >= 0:
        return None
    local, code = outcome.first_exit
    return {"rank": node_rank * procs_per_node + local, "signal": signal_name(-code)}


def why_not_restart(failures: list[Failure], max_restarts: int) -> str | None:
    """Why not to restart after the last of `failures` (one per attempt so far), or None to restart."""
    if len(failures) >= 2 and failures[-1].same_as(failures[-2]):
        return "the attempt before failed the same way after the same step (a bug to fix, not a flaky host)"
    if len(failures) > max_restarts:
        return f"all {max_restarts} restarts (launcher.max_restarts) are used"
    return None


def not_retried(run_dir: Path, outcome: Outcome, started: float) -> str | None:
    """Why this node's part of an attempt ended in a way no restart should follow, or None: it failed."""
    status = read_status(run_dir)
    state = status.get("state") if status.get("time", 0) >= started else None
    if state in ("finished", "preempted"):
        return f"training {state}"
    if outcome.killed or outcome.signum is not None:
        return f"stopped by {signal_name(outcome.signum or signal.SIGINT)}"
    if outcome.errors or outcome.returncode == 2:
        return "a rank refused its input"
    if outcome.returncode == 0 and not outcome.aborted:
        return "training exited without an error and without finishing"
    return None


def restart_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The config a restart launches with: resume.mode=auto, so it continues from the last committed
    checkpoint (a run started with `never` must not set its own progress aside), unless none was committed
    yet and the run started from a checkpoint the user named."""
    if cfg.resume.mode == "auto" or (cfg.resume.mode != "never" and not committed_checkpoints(run_dir)):
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.resume.mode = "auto"
    return cfg


def rendezvous_port(cfg: DictConfig, attempt: int, num_machines: int) -> int:
    """Where the ranks of an attempt meet. Across nodes, which must agree without talking:
    main_process_port + attempt, so a restart never reaches the store of the attempt before while it
    shuts down. On one node, any free port: a fixed one may be another launch's on the same machine (two
    jobs on one box, a parallel sweep's next trial), and the port matters to nobody else."""
    if num_machines > 1:
        return int(cfg.launcher.main_process_port) + attempt
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resume_point(run_dir: Path) -> str:
    found = committed_checkpoints(run_dir)
    return f"the checkpoint at step {found[-1][0]}" if found else "the start (no checkpoint was committed yet)"


class Attempts:
    """This node's view of a launch's attempts: its own part's end, the other nodes', the ranks' records."""

    def __init__(self, run_dir: Path, node_rank: int, num_machines: int, since: float):
        self.run_dir, self.node_rank, self.num_machines, self.since = run_dir, node_rank, num_machines, since

    def _nodes(self, attempt: int) -> dict[int, dict]:
        found = attempt_records(self.run_dir, attempt, "node", self.since)
        return {int(name[len("node") :]): record for name, record in found.items()}

    def peer_failed(self, attempt: int) -> bool:
        """Whether another node's part of this attempt failed (then this node's ranks cannot go on)."""
        return any(r.get("failed") and n != self.node_rank for n, r in self._nodes(attempt).items())

    def report(self, attempt: int, why_ended: str | None, killed: dict | None = None) -> None:
        """Tell the other nodes how this node's part ended: failed (why_ended None; `killed`: the rank a
        signal ended first) or not to be retried (a run of one node records only failures)."""
        if self.num_machines > 1 or why_ended is None:
            write_attempt_record(
                self.run_dir,
                attempt,
                f"node{self.node_rank}",
                {"node": self.node_rank, "failed": why_ended is None, "why": why_ended, "killed": killed},
            )

    def wait_for_nodes(
        self, attempt: int, stopped: Callable[[], bool], timeout_s: float = NODES_WAIT_S
    ) -> dict[int, dict] | None:
        """Every node's report of this attempt, once all are in; None when `stopped()` or at the timeout."""
        end = time.monotonic() + timeout_s
        while not stopped():
            nodes = self._nodes(attempt)
            if len(nodes) >= self.num_machines or time.monotonic() > end:
                return nodes if len(nodes) >= self.num_machines else None
            time.sleep(0.5)
        return None

    def missing(self, attempt: int) -> list[int]:
        return sorted(set(range(self.num_machines)) - set(self._nodes(attempt)))

    def failure(self, attempt: int) -> Failure:
        """What failed in this attempt, read from the same files on every node."""
        records = attempt_records(self.run_dir, attempt, "rank", self.since)
        killed = [n["killed"] for n in self._nodes(attempt).values() if n.get("killed")]
        return first_failure(list(records.values()), killed, newest_logged_step(self.run_dir))
