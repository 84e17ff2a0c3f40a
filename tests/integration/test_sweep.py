"""Sweeps: every trial a full launch; killed and re-run, nothing trains twice; summaries match metrics; trials
side by side on their own devices; bad trials pruned; a search's study continued after a kill."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lora_launch.sweep.trials import read_trial, sweep_name, swept_keys, trial_name, trial_row
from support.cli import CLI, lora_launch, read_jsonl, subprocess_env


def test_names_are_deterministic_and_readable():
    argv = ["-m", "lora.r=8,16", "optim.lr=1e-4,2e-4", "train.max_steps=10"]
    assert swept_keys(argv) == {"lora.r", "optim.lr"}
    assert sweep_name(argv) == sweep_name(["train.max_steps=10", "optim.lr=1e-4,2e-4", "lora.r=8,16", "-m"])
    assert sweep_name(argv) != sweep_name(argv + ["seed=1"])
    job = ["lora.r=16", "optim.lr=2e-4", "train.max_steps=10"]
    assert trial_name(job, argv) == "lora.r=16,optim.lr=2e-4"
    assert trial_name(job, ["train.max_steps=10"]).startswith("trial-")


SWEEP = [
    "lora.r=2,4",
    "optim.lr=1e-3,3e-3",
    "train.max_steps=6",
    "checkpoint.every_steps=1",
    "eval.every_steps=3",
    "train.micro_batch_size=2",
]


def _kill_sweep(proc: subprocess.Popen, sweep_dir: Path) -> None:
    """SIGKILL the sweep and everything it started, as a preempted node would lose them."""
    os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-KILL", "-f", str(sweep_dir)], check=False)
    proc.wait()


@pytest.mark.slow
def test_sweep_killed_midway_resumes_without_training_any_trial_twice(tiny, tmp_path):
    args = ["-m", *SWEEP, *tiny["overrides"], f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    sweep_dir = tmp_path / "sweep"
    cmd = [CLI, *args]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=subprocess_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 400
    # wait until one trial has finished and the next has a checkpoint, then kill everything
    while time.time() < deadline:
        trials = [read_trial(d) for d in sweep_dir.glob("*") if (d / "trial.json").exists()]
        done = sum(t.get("status") == "completed" for t in trials)
        mid = [
            d
            for d in sweep_dir.glob("*")
            if read_trial(d).get("status") == "running" and list((d / "checkpoints").glob("step-*"))
        ]
        if done >= 1 and mid:
            break
        assert proc.poll() is None, "sweep ended before it could be interrupted"
        time.sleep(0.5)
    else:
        pytest.fail("sweep never reached the middle")
    _kill_sweep(proc, sweep_dir)
    finished_before = {d.name for d in sweep_dir.iterdir() if read_trial(d).get("status") == "completed"}

    result = lora_launch(*args, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    # one trial at a time: each one's output is shown as it runs
    assert result.stdout.count("run dir: ") == 4 - len(finished_before), result.stdout[-3000:]
    trials = sorted(d for d in sweep_dir.iterdir() if (d / "trial.json").exists())
    assert len(trials) == 4
    for d in trials:
        record = read_trial(d)
        assert record["status"] == "completed", (d.name, record)
        if d.name in finished_before:
            assert len(record["launches"]) == 1, f"{d.name} was launched again after it finished"
        steps = [r["step"] for r in read_jsonl(d / "metrics.jsonl") if "loss" in r]
        assert steps == list(range(1, 7)), f"{d.name}: steps {steps}"

    rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    assert len(rows) == 4 and (sweep_dir / "summary.md").exists() and (sweep_dir / "sweep.png").exists()
    best = [float(r["best_eval_loss"]) for r in rows]
    assert best == sorted(best)
    for row in rows:
        metrics = read_jsonl(sweep_dir / row["trial"] / "metrics.jsonl")
        assert float(row["best_eval_loss"]) == pytest.approx(min(r["eval_loss"] for r in metrics if "eval_loss" in r))
        assert float(row["final_train_loss"]) == pytest.approx([r for r in metrics if "loss" in r][-1]["loss"])
        assert int(row["steps"]) == 6


@pytest.mark.slow
def test_failed_trial_is_recorded_and_the_sweep_goes_on(tiny, tmp_path):
    result = lora_launch(
        "-m",
        "lora.r=0,2",
        "train.max_steps=1",
        "sample.max_new_tokens=0",
        *tiny["overrides"],
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        timeout=600,
        env=subprocess_env(COLUMNS="80"),
    )
    # every trial ran (the failure did not stop the sweep), and the sweep's exit status says one failed
    assert result.returncode == 1, result.stderr[-3000:]
    assert "1 trial(s) failed: lora.r=0" in result.stderr
    # the sweep ends with its table, completed trials first, fitted to the terminal, and where summary.md is
    out = result.stdout.splitlines()
    header = max(i for i, line in enumerate(out) if line.split()[:2] == ["trial", "status"])
    assert [line.split()[:2] for line in out[header + 1 : header + 3]] == [
        ["lora.r=2", "completed"],
        ["lora.r=0", "failed"],
    ]
    assert out[-1] == f"summary: {tmp_path / 'sweep' / 'summary.md'}"
    assert max(map(len, out[header:-1])) <= 80
    rows = {r["trial"]: r for r in csv.DictReader(open(tmp_path / "sweep" / "summary.csv"))}
    assert rows["lora.r=0"]["status"] == "failed" and "lora.r" in rows["lora.r=0"]["error"]
    assert rows["lora.r=2"]["status"] == "completed" and math.isfinite(float(rows["lora.r=2"]["best_eval_loss"]))

    rebuilt = lora_launch("sweep-summary", str(tmp_path / "sweep"), timeout=120)
    assert rebuilt.returncode == 0 and "lora.r=2" in rebuilt.stdout


def test_sweep_with_the_slurm_launcher_is_refused_before_anything_is_submitted(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = lora_launch(
        "-m", "lora.r=2,4", "launcher=slurm", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, timeout=120
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "launcher=slurm" in errors[0], result.stderr
    assert "locally" in errors[0] and "launcher=local" in errors[0]
    assert not sweep_dir.exists() and not list(tmp_path.glob("**/*.sbatch"))


def _trials(sweep_dir: Path) -> dict[str, dict]:
    return {d.name: read_trial(d) for d in sorted(sweep_dir.iterdir()) if (d / "trial.json").exists()}


def _train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def _check_summary(sweep_dir: Path, count: int) -> list[dict]:
    """The summary files agree with every trial's own files, best completed trial first."""
    rows = json.loads((sweep_dir / "summary.json").read_text())
    assert len(rows) == count and (sweep_dir / "sweep.png").stat().st_size > 0
    assert [r["trial"] for r in csv.DictReader(open(sweep_dir / "summary.csv"))] == [r["trial"] for r in rows]
    for row in rows:
        own = trial_row(sweep_dir / row["trial"])
        assert row == {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in own.items()}
        metrics = read_jsonl(sweep_dir / row["trial"] / "metrics.jsonl")
        assert row["best_eval_loss"] == min(r["eval_loss"] for r in metrics if "eval_loss" in r)
    done = [r["best_eval_loss"] for r in rows if r["status"] == "completed"]
    assert done == sorted(done) and [r["status"] == "completed" for r in rows] == sorted(
        (r["status"] == "completed" for r in rows), reverse=True
    )
    md = (sweep_dir / "summary.md").read_text().splitlines()
    assert len(md) == count + 2 and all(f"| {r['trial']} | {r['status']} |" in "\n".join(md) for r in rows)
    return rows


def _wait_for(condition, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        assert proc.poll() is None, f"the sweep ended before {what}"
        time.sleep(0.3)
    pytest.fail(f"the sweep never reached {what}")


def _has_checkpoint(run_dir: Path) -> bool:
    return read_trial(run_dir).get("status") == "running" and bool(list((run_dir / "checkpoints").glob("step-*")))


GRID = [
    "lora.r=2,4",
    "optim.lr=1e-3,3e-3",
    "train.max_steps=6",
    "train.micro_batch_size=2",
    "eval.every_steps=3",
    "launcher.num_processes=1",
]


@pytest.mark.slow
def test_trials_run_side_by_side_with_the_same_results(tiny, tmp_path):
    common = [o for o in GRID if not o.startswith(("lora.r=", "optim.lr="))]
    sweep_dir = tmp_path / "sweep"
    result = lora_launch(
        "-m",
        "lora.r=2,4,8",
        *common,
        *tiny["overrides"],
        "sweep.parallel=2",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _trials(sweep_dir)
    assert len(trials) == 3 and all(t["status"] == "completed" and len(t["launches"]) == 1 for t in trials.values())
    spans = sorted((t["launches"][0]["started"], t["launches"][0]["finished"], name) for name, t in trials.items())
    at_once = max(sum(s <= start < f for s, f, _ in spans) for start, _, _ in spans)
    assert at_once == 2, f"never more than sweep.parallel trials, and that many: {spans}"
    for row in _check_summary(sweep_dir, 3):
        assert _train_steps(sweep_dir / row["trial"]) == list(range(1, 7))

    # the first trial ran beside another from start to end (its cores shared out); alone it computes the same
    alone = tmp_path / "alone"
    result = lora_launch("lora.r=2", *common, *tiny["overrides"], f"run.dir={alone}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    side = read_jsonl(sweep_dir / "lora.r=2" / "metrics.jsonl")
    own = read_jsonl(alone / "metrics.jsonl")
    for key in ("loss", "eval_loss"):
        expected = [r[key] for r in own if key in r]
        assert expected and [r[key] for r in side if key in r] == pytest.approx(expected, rel=1e-4), key


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_parallel_sweep_checkpoints_its_trials_and_the_rerun_finishes_each_once(tiny, tmp_path, signum):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM: each running trial stops with a checkpoint and none starts.
    After Ctrl-C the same command finishes each trial once; after SIGTERM the rerun is left to
    test_sweep_status.py (a preempted trial resumes), as it takes the same path from the same records."""
    sweep_dir = tmp_path / "sweep"
    # long enough that neither first trial can finish before both have a checkpoint, even when one of them
    # starts late on a loaded machine (at 100 steps one did, once)
    args = [
        "-m",
        "lora.r=2,4,8",
        "train.max_steps=300",
        "checkpoint.every_steps=10",
        "train.micro_batch_size=2",
        "sweep.parallel=2",
        *tiny["overrides"],
        f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = subprocess.Popen(
        [CLI, *args],
        cwd=tmp_path,
        env=subprocess_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = [sweep_dir / "lora.r=2", sweep_dir / "lora.r=4"]
    _wait_for(lambda: all(_has_checkpoint(d) for d in first), proc, 600, "two trials with a checkpoint")
    os.killpg(proc.pid, signum)  # a terminal's Ctrl-C reaches the foreground group: the sweep alone
    rc = proc.wait(timeout=300)
    assert rc == (130 if signum == signal.SIGINT else 0), proc.stderr.read()[-3000:]
    stopped = _trials(sweep_dir)
    assert set(stopped) == {"lora.r=2", "lora.r=4"}, "no trial starts once the sweep is stopped"
    for name, record in stopped.items():
        assert record["status"] == ("interrupted" if signum == signal.SIGINT else "preempted"), (name, record)
        status = json.loads((sweep_dir / name / "status.json").read_text())
        assert status["state"] == "preempted" and status["signal"] == signal.Signals(signum).name
        assert (sweep_dir / name / "checkpoints" / f"step-{status['step']}").is_dir()
        assert status["step"] < 300
    if signum == signal.SIGTERM:
        return

    result = lora_launch(*args, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _trials(sweep_dir)
    assert {n: len(t["launches"]) for n, t in trials.items()} == {"lora.r=2": 2, "lora.r=4": 2, "lora.r=8": 1}
    for name, record in trials.items():
        assert record["status"] == "completed" and _train_steps(sweep_dir / name) == list(range(1, 301))
    for name in stopped:
        assert "resumed from" in (sweep_dir / name / "lora-launch.log").read_text().split("==== launch 2")[1]
    _check_summary(sweep_dir, 3)


@pytest.mark.slow
def test_a_bad_trial_is_pruned_with_a_checkpoint_skipped_on_rerun_and_continued_on_request(tmp_path):
    pytest.importorskip("optuna", reason="pruning needs the sweep extra (pip install 'lora-launch[sweep]')")
    # the shipped tiny model knows the demo data: lr 10 wrecks it at once, 1e-3 and 2e-3 teach it
    sweep_dir = tmp_path / "sweep"
    args = [
        "-m",
        "optim.lr=2e-3,1e-3,10",
        "train.max_steps=10",
        "eval.every_steps=2",
        "sweep.prune=median",
        "sweep.prune_startup_trials=2",
        "sweep.parallel=1",
        "sample.max_new_tokens=0",
        "logging.progress_bar=false",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    result = lora_launch(*args, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optim.lr=10: pruned at step 2" in result.stdout
    trials = _trials(sweep_dir)
    assert {n: t["status"] for n, t in trials.items()} == {
        "optim.lr=0.001": "completed",
        "optim.lr=0.002": "completed",
        "optim.lr=10": "pruned",
    }
    bad = sweep_dir / "optim.lr=10"
    status = json.loads((bad / "status.json").read_text())
    # the pruner's SIGTERM arrives while rank 0 waits at the eval of step 2: it stops after step 3
    assert status["state"] == "preempted" and status["signal"] == "SIGTERM" and status["step"] == 3
    assert _train_steps(bad) == [1, 2, 3] and (bad / "checkpoints" / "step-3").is_dir()
    rows = _check_summary(sweep_dir, 3)
    assert rows[-1]["trial"] == "optim.lr=10" and rows[-1]["status"] == "pruned" and rows[-1]["steps"] == 3
    before = read_jsonl(bad / "metrics.jsonl")

    again = lora_launch(*args, cwd=tmp_path, timeout=600)
    assert again.returncode == 0 and "optim.lr=10: pruned earlier, skipped" in again.stdout, again.stderr[-3000:]
    assert {n: len(t["launches"]) for n, t in _trials(sweep_dir).items()} == {
        "optim.lr=0.001": 1,
        "optim.lr=0.002": 1,
        "optim.lr=10": 1,
    }

    resumed = lora_launch(*args, "sweep.resume_pruned=true", cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = read_trial(bad)
    assert record["status"] == "completed" and len(record["launches"]) == 2
    assert _train_steps(bad) == list(range(1, 11))
    assert read_jsonl(bad / "metrics.jsonl")[: len(before)] == before  # continued from step 3, not restarted
    _check_summary(sweep_dir, 3)


@pytest.mark.slow
def test_a_search_continues_its_study_after_the_sweep_is_killed(tiny, tmp_path):
    optuna = pytest.importorskip("optuna", reason="a search needs the sweep extra (pip install 'lora-launch[sweep]')")

    sweep_dir = tmp_path / "search"
    args = [
        "-m",
        "sweep.search=tpe",
        "sweep.trials=3",
        "optim.lr=tag(log,interval(1e-4,1e-2))",
        "train.max_steps=30",
        "checkpoint.every_steps=5",
        "eval.every_steps=10",
        "train.micro_batch_size=2",
        *tiny["overrides"],
        f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = subprocess.Popen(
        [CLI, *args],
        cwd=tmp_path,
        env=subprocess_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def one_done_one_midway() -> bool:
        dirs = sorted(d for d in sweep_dir.glob("0*") if (d / "trial.json").exists())
        return len(dirs) == 2 and read_trial(dirs[0]).get("status") == "completed" and _has_checkpoint(dirs[1])

    _wait_for(one_done_one_midway, proc, 600, "one trial done and the next midway")
    proc.kill()  # the sweep alone: its trial gets SIGTERM from the kernel and checkpoints on its own
    proc.wait()

    result = lora_launch(*args, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _trials(sweep_dir)
    assert [n[:4] for n in trials] == ["000-", "001-", "002-"], list(trials)
    assert [len(t["launches"]) for t in trials.values()] == [1, 2, 1]
    midway = sweep_dir / list(trials)[1]
    assert "resumed from" in (midway / "lora-launch.log").read_text().split("==== launch 2")[1]
    for name, record in trials.items():
        assert record["status"] == "completed" and _train_steps(sweep_dir / name) == list(range(1, 31)), name

    study = optuna.load_study(study_name="lora-launch", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    for t, record in zip(study.trials, trials.values()):
        assert record["study_trial"] == t.number and f"optim.lr={t.params['optim.lr']!r}" in record["overrides"]
        assert t.value == trial_row(next(sweep_dir.glob(f"{t.number:03d}-*")))["best_eval_loss"]
    rows = _check_summary(sweep_dir, 3)
    assert study.best_value == rows[0]["best_eval_loss"]
