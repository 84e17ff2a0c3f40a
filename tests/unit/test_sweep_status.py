"""A sweep trial's status follows its launch's exit code and RUN/status.json, as the launch's own exit code does."""

from __future__ import annotations

import csv
import time

import pytest

from lora_launch.launcher import sweep
from lora_launch.launcher.sweep import read_trial, run_trial, summarize, trial_row
from lora_launch.run.rundir import read_status, write_json, write_status


@pytest.fixture(autouse=True)
def failed_trials(monkeypatch) -> list[str]:
    """This test's own list of failed trials (the module's list lives as long as the process)."""
    failed: list[str] = []
    monkeypatch.setattr(sweep, "FAILED_TRIALS", failed)
    return failed


def _launch(run_dir, rc: int, state: str | None = None, **extra):
    """A fake launch: writes status.json (when given a state) into the trial dir, returns `rc`."""
    calls = []

    def launch() -> int:
        calls.append(time.time())
        if state is not None:
            write_status(run_dir, state, 3, **extra)
        return rc

    launch.calls = calls
    return launch


def test_finished_launch_is_completed_and_skipped_on_rerun(tmp_path, failed_trials):
    trial = tmp_path / "lora.r=8"
    run_trial(trial, ["lora.r=8"], _launch(trial, 0, "finished"))
    assert read_trial(trial)["status"] == "completed" and "error" not in read_trial(trial)
    again = _launch(trial, 0, "finished")
    run_trial(trial, ["lora.r=8"], again)
    assert again.calls == [] and len(read_trial(trial)["launches"]) == 1
    assert failed_trials == []


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGHUP"])
def test_preempted_trial_stops_the_sweep_with_exit_0_and_resumes_on_rerun(tmp_path, failed_trials, signal_name):
    trial = tmp_path / "lora.r=8"
    with pytest.raises(SystemExit) as stop:
        run_trial(trial, ["lora.r=8"], _launch(trial, 0, "preempted", signal=signal_name))
    assert stop.value.code == 0  # a scheduler's requeue re-runs the same command
    assert read_trial(trial)["status"] == "preempted" and trial_row(trial)["status"] == "preempted"
    assert failed_trials == []

    resumed = _launch(trial, 0, "finished")
    run_trial(trial, ["lora.r=8"], resumed)
    assert len(resumed.calls) == 1, "a preempted trial must be resumed, not skipped"
    record = read_trial(trial)
    assert record["status"] == "completed" and [l["returncode"] for l in record["launches"]] == [0, 0]


def test_ctrl_c_is_interrupted_and_stops_the_sweep_with_130(tmp_path, failed_trials):
    trial = tmp_path / "lora.r=8"
    with pytest.raises(SystemExit) as stop:
        run_trial(trial, ["lora.r=8"], _launch(trial, 130, "preempted", signal="SIGINT"))
    assert stop.value.code == 130
    assert read_trial(trial)["status"] == "interrupted" and failed_trials == []


@pytest.mark.parametrize("rc,state", [(0, None), (0, "running"), (1, "finished"), (2, None)])
def test_a_launch_that_did_not_finish_is_failed_and_the_sweep_goes_on(tmp_path, failed_trials, rc, state):
    trial = tmp_path / "lora.r=8"
    run_trial(trial, ["lora.r=8"], _launch(trial, rc, state))  # continue_on_failure: returns
    record = read_trial(trial)
    assert record["status"] == "failed" and record["error"]
    assert failed_trials == ["lora.r=8"]


def test_exit_0_with_a_stale_status_is_failed(tmp_path, failed_trials):
    # e.g. a launch that only submitted a job (returns at once) in a dir an earlier run finished or was preempted in
    for state in ("finished", "preempted"):
        trial = tmp_path / state
        trial.mkdir()
        write_json(trial / "status.json", {"state": state, "step": 3, "time": time.time() - 60, "signal": "SIGTERM"})
        run_trial(trial, [], _launch(trial, 0))
        record = read_trial(trial)
        assert record["status"] == "failed", state
        assert "not written by this launch" in record["error"]
    assert failed_trials == ["finished", "preempted"]


def test_a_preempted_status_from_an_earlier_launch_does_not_make_this_one_preempted(tmp_path, failed_trials):
    trial = tmp_path / "lora.r=8"
    with pytest.raises(SystemExit):
        run_trial(trial, ["lora.r=8"], _launch(trial, 0, "preempted", signal="SIGTERM"))
    run_trial(trial, ["lora.r=8"], _launch(trial, 0))  # exits 0, writes nothing
    assert read_trial(trial)["status"] == "failed" and failed_trials == ["lora.r=8"]


def test_finished_in_an_earlier_launch_of_the_trial_is_completed(tmp_path, failed_trials):
    # the sweep was killed after training wrote `finished` but before trial.json said so;
    # the re-run's launch finds the run finished, does nothing and exits 0
    trial = tmp_path / "lora.r=8"
    trial.mkdir()
    write_json(trial / "trial.json", {"overrides": ["lora.r=8"], "status": "running",
                                      "launches": [{"started": time.time() - 60}]})
    write_json(trial / "status.json", {"state": "finished", "step": 3, "time": time.time() - 30})
    run_trial(trial, ["lora.r=8"], _launch(trial, 0))
    assert read_trial(trial)["status"] == "completed" and read_status(trial)["state"] == "finished"
    assert failed_trials == []


def test_stop_on_first_failure_exits_non_zero_also_when_the_launch_said_0(tmp_path):
    trial = tmp_path / "lora.r=8"
    with pytest.raises(SystemExit) as stop:
        run_trial(trial, ["lora.r=8"], _launch(trial, 0, "running"), continue_on_failure=False)
    assert stop.value.code == 1 and read_trial(trial)["status"] == "failed"


def test_summary_shows_each_trials_status(tmp_path):
    trials = [("a", 0, "finished", {}), ("b", 0, "preempted", {"signal": "SIGTERM"}), ("c", 2, None, {}),
              ("d", 130, "preempted", {"signal": "SIGINT"})]
    for name, rc, state, extra in trials:
        try:
            run_trial(tmp_path / name, [f"x={name}"], _launch(tmp_path / name, rc, state, **extra))
        except SystemExit:  # preempted and interrupted trials stop the sweep
            pass
    summarize(tmp_path)
    rows = {r["trial"]: r["status"] for r in csv.DictReader(open(tmp_path / "summary.csv"))}
    assert rows == {"a": "completed", "b": "preempted", "c": "failed", "d": "interrupted"}
    md = (tmp_path / "summary.md").read_text()
    assert all(f"| {name} | {status} |" in md for name, status in rows.items())
