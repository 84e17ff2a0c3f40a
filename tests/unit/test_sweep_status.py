"""A sweep trial's status follows its launch's exit code and RUN/status.json, as the launch's own exit code does."""

from __future__ import annotations

import csv
import json
import time

import pytest

from lora_launch.run.rundir import read_status, write_json, write_status
from lora_launch.sweep.trials import finish_trial, read_trial, start_trial, summarize, trial_row


def run_trial(
    trial,
    overrides,
    rc: int,
    state: str | None = None,
    pruned: bool = False,
    stopped: bool = False,
    resume_pruned: bool = False,
    **extra,
) -> str | None:
    """One launch of a trial as the sweep records it, the launch faked: it writes status.json (when given a
    state) into the trial dir and exits `rc`. Returns the trial's status, None when the sweep skips it."""
    record = start_trial(trial, overrides, resume_pruned=resume_pruned)
    if record is None:
        return None
    if state is not None:
        write_status(trial, state, 3, **extra)
    return finish_trial(trial, record, rc, pruned=pruned, stopped_by_sweep=stopped)


def test_finished_launch_is_completed_and_skipped_on_rerun(tmp_path):
    trial = tmp_path / "lora.r=8"
    assert run_trial(trial, ["lora.r=8"], 0, "finished") == "completed"
    assert "error" not in read_trial(trial)
    assert run_trial(trial, ["lora.r=8"], 0, "finished") is None  # skipped: no launch recorded
    assert len(read_trial(trial)["launches"]) == 1


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGHUP"])
def test_preempted_trial_resumes_on_rerun(tmp_path, signal_name):
    trial = tmp_path / "lora.r=8"
    assert run_trial(trial, ["lora.r=8"], 0, "preempted", signal=signal_name) == "preempted"
    assert trial_row(trial)["status"] == "preempted"
    assert run_trial(trial, ["lora.r=8"], 0, "finished") == "completed", "a preempted trial must be resumed"
    assert [launch["returncode"] for launch in read_trial(trial)["launches"]] == [0, 0]


def test_ctrl_c_is_interrupted(tmp_path):
    trial = tmp_path / "lora.r=8"
    assert run_trial(trial, ["lora.r=8"], 130, "preempted", signal="SIGINT") == "interrupted"


@pytest.mark.parametrize("rc,state", [(0, None), (0, "running"), (1, "finished"), (2, None)])
def test_a_launch_that_did_not_finish_is_failed(tmp_path, rc, state):
    trial = tmp_path / "lora.r=8"
    assert run_trial(trial, ["lora.r=8"], rc, state) == "failed"
    assert read_trial(trial)["error"]


def test_exit_0_with_a_stale_status_is_failed(tmp_path):
    # e.g. a launch that only submitted a job (returns at once) in a dir an earlier run finished or was preempted in
    for state in ("finished", "preempted"):
        trial = tmp_path / state
        trial.mkdir()
        write_json(trial / "status.json", {"state": state, "step": 3, "time": time.time() - 60, "signal": "SIGTERM"})
        assert run_trial(trial, [], 0) == "failed", state
        assert "not written by this launch" in read_trial(trial)["error"]


def test_a_preempted_status_from_an_earlier_launch_does_not_make_this_one_preempted(tmp_path):
    trial = tmp_path / "lora.r=8"
    assert run_trial(trial, ["lora.r=8"], 0, "preempted", signal="SIGTERM") == "preempted"
    assert run_trial(trial, ["lora.r=8"], 0) == "failed"  # exits 0, writes nothing


def test_finished_in_an_earlier_launch_of_the_trial_is_completed(tmp_path):
    # the sweep was killed after training wrote `finished` but before trial.json said so;
    # the re-run's launch finds the run finished, does nothing and exits 0
    trial = tmp_path / "lora.r=8"
    trial.mkdir()
    write_json(
        trial / "trial.json",
        {"overrides": ["lora.r=8"], "status": "running", "launches": [{"started": time.time() - 60}]},
    )
    write_json(trial / "status.json", {"state": "finished", "step": 3, "time": time.time() - 30})
    assert run_trial(trial, ["lora.r=8"], 0) == "completed" and read_status(trial)["state"] == "finished"


def test_a_pruned_trial_is_skipped_unless_asked_to_continue(tmp_path):
    trial = tmp_path / "optim.lr=10"
    # the pruner's SIGTERM: the run stops as a preempted one does, and the sweep knows it pruned it
    assert run_trial(trial, ["optim.lr=10"], 0, "preempted", pruned=True, signal="SIGTERM") == "pruned"
    assert trial_row(trial)["status"] == "pruned"
    assert run_trial(trial, ["optim.lr=10"], 0, "finished") is None
    assert len(read_trial(trial)["launches"]) == 1
    assert run_trial(trial, ["optim.lr=10"], 0, "finished", resume_pruned=True) == "completed"
    assert len(read_trial(trial)["launches"]) == 2


def test_a_trial_pruned_too_late_to_stop_is_completed_and_one_that_crashed_failed(tmp_path):
    assert run_trial(tmp_path / "a", [], 0, "finished", pruned=True) == "completed"
    assert run_trial(tmp_path / "b", [], 1, None, pruned=True) == "failed"


@pytest.mark.parametrize("rc,status", [(130, "interrupted"), (143, "preempted"), (2, "preempted")])
def test_a_trial_the_sweep_stopped_before_it_could_checkpoint_is_stopped_not_failed(tmp_path, rc, status):
    # Ctrl-C or SIGTERM reached the trial's lora-launch before training started: a re-run starts it
    trial = tmp_path / "lora.r=8"
    assert run_trial(trial, ["lora.r=8"], rc, None, stopped=True) == status
    assert "error" not in read_trial(trial)
    assert run_trial(trial, ["lora.r=8"], 0, "finished") == "completed"


def test_summary_shows_each_trials_status_and_puts_completed_trials_first(tmp_path):
    trials = [
        ("a", 0, "finished", {}),
        ("b", 0, "preempted", {"signal": "SIGTERM"}),
        ("c", 2, None, {}),
        ("d", 130, "preempted", {"signal": "SIGINT"}),
        ("e", 0, "preempted", {"pruned": True}),
    ]
    for name, rc, state, extra in trials:
        run_trial(tmp_path / name, [f"x={name}"], rc, state, **extra)
    # e's early eval loss is the lowest of all, but it is no result: completed trials rank first
    for name, loss in (("a", 2.0), ("e", 1.0)):
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps({"step": 2, "eval_loss": loss}) + '\n{"step": 3,')
    rows = summarize(tmp_path)
    assert [r["trial"] for r in rows][:2] == ["a", "e"] and rows[1]["best_eval_loss"] == 1.0
    statuses = {r["trial"]: r["status"] for r in csv.DictReader(open(tmp_path / "summary.csv"))}
    assert statuses == {"a": "completed", "b": "preempted", "c": "failed", "d": "interrupted", "e": "pruned"}
    assert [r["trial"] for r in json.loads((tmp_path / "summary.json").read_text())] == [r["trial"] for r in rows]
    md = (tmp_path / "summary.md").read_text()
    assert all(f"| {name} | {status} |" in md for name, status in statuses.items())
