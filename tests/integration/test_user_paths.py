"""The run contract as users meet it: the installed console script run from their own project directory,
Ctrl-C from a terminal, the launcher killed on its own, a second terminal running the same command, and
training started directly with `accelerate launch -m lora_launch.train`."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.cli import lora_launch, read_jsonl, subprocess_env
from support.resume import BASE, reference, status, train_losses, wait_for_step
from support.terminal import ctrl_c, gone_within, start_job, wait_for_ranks

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


@pytest.fixture
def user_dir(tmp_path) -> Path:
    """A directory like any ML project's: its own train.py, launcher/ and conf/, which must not be imported."""
    d = tmp_path / "project"
    (d / "launcher").mkdir(parents=True)
    (d / "conf").mkdir()
    (d / "train.py").write_text("open('USER_TRAIN_RAN', 'w').close()\n")
    (d / "launcher" / "__init__.py").write_text("open('USER_LAUNCHER_RAN', 'w').close()\n")
    (d / "conf" / "config.yaml").write_text("defaults: []\nmine: true\n")
    return d


def _user_files_untouched(d: Path) -> None:
    assert not (d / "USER_TRAIN_RAN").exists() and not (d / "USER_LAUNCHER_RAN").exists()


def _trained(run: Path, steps: int) -> None:
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))
    assert status(run) | {"time": 0} == {"state": "finished", "step": steps, "time": 0}
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_installed_script_trains_from_a_directory_with_its_own_train_py_launcher_and_conf(tiny, user_dir):
    run = user_dir / "run"
    result = lora_launch(*tiny["overrides"], f"run.dir={run}", "train.max_steps=3", cwd=user_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "-m lora_launch.train" in result.stdout
    _trained(run, 3)
    _user_files_untouched(user_dir)


def test_accelerate_launch_of_the_module_trains_from_any_directory(tiny, user_dir):
    """The README's hand-run command: rank 0 composes the config (the package's, not ./conf) once."""
    run = user_dir / "direct"
    result = subprocess.run(
        [
            ACCELERATE,
            "launch",
            "--num_processes",
            "1",
            "-m",
            "lora_launch.train",
            *tiny["overrides"],
            f"run.dir={run}",
            "train.max_steps=3",
        ],
        cwd=user_dir,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _trained(run, 3)
    _user_files_untouched(user_dir)


def test_ctrl_c_checkpoints_and_the_rerun_continues_bit_for_bit(tiny, tmp_path_factory, tmp_path):
    ref = reference(tiny, tmp_path_factory.getbasetemp(), BASE)["train"]  # the same command, uninterrupted
    run, log = tmp_path / "run", tmp_path / "run.log"
    args = [*tiny["overrides"], *BASE, f"run.dir={run}"]
    job = start_job(args, tmp_path, log)
    wait_for_step(run, job, 4)
    ctrl_c(job)
    assert job.wait(timeout=120) == 130
    out = log.read_text()
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    st = status(run)
    assert st["state"] == "preempted" and st["signal"] == "SIGINT" and st["step"] < 12
    assert f"stopped by Ctrl-C with a checkpoint at step {st['step']}; run the same command to continue" in out
    assert (run / "checkpoints" / f"step-{st['step']}" / "manifest.json").is_file()

    result = lora_launch(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert train_losses(run) == ref  # every step once, each loss bitwise equal to the uninterrupted run's


def test_second_ctrl_c_stops_at_once_without_a_traceback(tiny, tmp_path):
    run, log = tmp_path / "run", tmp_path / "run.log"
    job = start_job([*tiny["overrides"], *BASE, "train.max_steps=5000", f"run.dir={run}"], tmp_path, log)
    wait_for_step(run, job, 2)
    rank = wait_for_ranks(job, 1)[0]
    rank.suspend()  # a rank that cannot finish its checkpoint (a long save on a big model)
    ctrl_c(job)
    time.sleep(0.5)
    t0 = time.monotonic()
    ctrl_c(job)
    assert job.wait(timeout=30) == 130
    assert time.monotonic() - t0 < 10
    assert gone_within([rank], 10)
    out = log.read_text()
    assert "Traceback" not in out and "stopped at once by a second Ctrl-C, without a checkpoint" in out, out[-3000:]


def test_launcher_killed_alone_its_rank_checkpoints_and_holds_the_run_dir_until_it_ends(
    tiny, tmp_path_factory, tmp_path
):
    ref = reference(tiny, tmp_path_factory.getbasetemp(), BASE)["train"]
    run, log = tmp_path / "run", tmp_path / "run.log"
    args = [*tiny["overrides"], *BASE, f"run.dir={run}"]
    job = start_job(args, tmp_path, log)
    wait_for_step(run, job, 3)
    rank = wait_for_ranks(job, 1)[0]
    rank.suspend()  # keep it alive (it would checkpoint and exit within a second) to look at the lock
    job.send_signal(signal.SIGKILL)  # the launcher alone, not its group
    job.wait(timeout=30)

    # a second terminal running the same command is refused while the rank lives, naming it
    second = lora_launch(*args, cwd=tmp_path, timeout=300)
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"training processes of an earlier launch are still running (pids {rank.pid}" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1

    rank.resume()  # it finds its parent gone: stops after its step with a checkpoint, then ends
    assert gone_within([rank], 60)
    st = status(run)
    assert st["state"] == "preempted" and st["signal"] == "SIGTERM"

    result = lora_launch(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert train_losses(run) == ref


def test_closed_terminal_sighup_checkpoints_and_exits_0(tiny, tmp_path):
    run, log = tmp_path / "run", tmp_path / "run.log"
    job = start_job([*tiny["overrides"], *BASE, "train.max_steps=5000", f"run.dir={run}"], tmp_path, log)
    wait_for_step(run, job, 3)
    rank = wait_for_ranks(job, 1)[0]
    job.send_signal(signal.SIGHUP)
    assert job.wait(timeout=120) == 0
    assert gone_within([rank], 10)
    st = status(run)
    assert st["state"] == "preempted" and st["signal"] == "SIGHUP"
    # after the hangup the rank wrote to its log file instead of the terminal
    assert f"step {st['step']}: checkpoint saved" in (run / "rank0.log").read_text()
    assert (run / "checkpoints" / f"step-{st['step']}" / "manifest.json").is_file()


def test_direct_accelerate_launch_and_lora_launch_exclude_each_other(tiny, tmp_path):
    run = tmp_path / "run"
    args = [*tiny["overrides"], *BASE, "train.max_steps=5000", f"run.dir={run}"]
    direct = start_job(
        [],
        tmp_path,
        tmp_path / "direct.log",
        cmd=[ACCELERATE, "launch", "--num_processes", "1", "-m", "lora_launch.train", *args],
    )
    wait_for_step(run, direct, 2)
    refused = lora_launch(*args, cwd=tmp_path, timeout=300)
    assert refused.returncode == 2 and "in use by a live launch" in refused.stderr, refused.stderr[-2000:]
    assert len(refused.stderr.strip().splitlines()) == 1
    ctrl_c(direct)
    direct.wait(timeout=120)
    assert status(run)["state"] == "preempted"

    job = start_job(args, tmp_path, tmp_path / "launch.log")
    wait_for_step(run, job, status(run)["step"] + 2)
    again = subprocess.run(
        [ACCELERATE, "launch", "--num_processes", "1", "-m", "lora_launch.train", *args],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode != 0 and "in use by a live launch" in again.stderr, again.stderr[-2000:]
    ctrl_c(job)
    assert job.wait(timeout=120) == 130
