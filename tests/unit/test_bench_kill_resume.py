"""How bench.kill_resume tells that a kill came while a background save was in flight: the save's staging
directory, not yet renamed at its commit, is there. Made-up directories, no training."""

from __future__ import annotations

from support.bench import bench_module

kill_resume = bench_module("kill_resume")


def test_a_save_is_in_flight_while_its_staging_directory_is_there(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step-5").mkdir(parents=True)
    assert kill_resume.in_flight(tmp_path) == []
    (checkpoints / ".staging-step-10").mkdir()
    assert kill_resume.in_flight(tmp_path) == [10]
    (checkpoints / ".staging-step-10").rename(checkpoints / "step-10")
    assert kill_resume.in_flight(tmp_path) == []


def test_slowed_writes_reach_every_process_started_from_the_bench(monkeypatch):
    monkeypatch.setattr(kill_resume, "ENV", {"PYTHONPATH": "/elsewhere"})
    kill_resume.slow_writes(0.5)
    assert kill_resume.ENV["SLOW_CHECKPOINT_WRITE_S"] == "0.5"
    first, rest = kill_resume.ENV["PYTHONPATH"].split(":", 1)
    assert (kill_resume.INJECT / "sitecustomize.py").is_file() and first == str(kill_resume.INJECT)
    assert rest == "/elsewhere"
