"""Sweeps: every trial a full launch; killed and re-run, nothing trains twice; summaries match metrics."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.cli import CLI, lora_launch, read_jsonl, subprocess_env
from lora_launch.launcher.sweep import read_trial, swept_keys, sweep_name, trial_name


def test_names_are_deterministic_and_readable():
    argv = ["-m", "lora.r=8,16", "optim.lr=1e-4,2e-4", "train.max_steps=10"]
    assert swept_keys(argv) == {"lora.r", "optim.lr"}
    assert sweep_name(argv) == sweep_name(["train.max_steps=10", "optim.lr=1e-4,2e-4", "lora.r=8,16", "-m"])
    assert sweep_name(argv) != sweep_name(argv + ["seed=1"])
    job = ["lora.r=16", "optim.lr=2e-4", "train.max_steps=10"]
    assert trial_name(job, argv) == "lora.r=16,optim.lr=2e-4"
    assert trial_name(job, ["train.max_steps=10"]).startswith("trial-")


SWEEP = ["lora.r=2,4", "optim.lr=1e-3,3e-3", "train.max_steps=6", "checkpoint.every_steps=1",
         "eval.every_steps=3", "train.micro_batch_size=2"]


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
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    # wait until one trial has finished and the next has a checkpoint, then kill everything
    while time.time() < deadline:
        trials = [read_trial(d) for d in sweep_dir.glob("*") if (d / "trial.json").exists()]
        done = sum(t.get("status") == "completed" for t in trials)
        mid = [d for d in sweep_dir.glob("*") if read_trial(d).get("status") == "running"
               and list((d / "checkpoints").glob("step-*"))]
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
    result = lora_launch("-m", "lora.r=0,2", "train.max_steps=1", "sample.max_new_tokens=0", *tiny["overrides"],
                         f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, timeout=600)
    # every trial ran (the failure did not stop the sweep), and the sweep's exit status says one failed
    assert result.returncode == 1, result.stderr[-3000:]
    assert "1 trial(s) failed: lora.r=0" in result.stderr
    rows = {r["trial"]: r for r in csv.DictReader(open(tmp_path / "sweep" / "summary.csv"))}
    assert rows["lora.r=0"]["status"] == "failed" and "lora.r" in rows["lora.r=0"]["error"]
    assert rows["lora.r=2"]["status"] == "completed" and math.isfinite(float(rows["lora.r=2"]["best_eval_loss"]))

    rebuilt = lora_launch("sweep-summary", str(tmp_path / "sweep"), timeout=120)
    assert rebuilt.returncode == 0 and "lora.r=2" in rebuilt.stdout


def test_sweep_with_the_slurm_launcher_is_refused_before_anything_is_submitted(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = lora_launch("-m", "lora.r=2,4", "launcher=slurm", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path,
                         timeout=120)
    assert result.returncode == 2
    errors = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "launcher=slurm" in errors[0], result.stderr
    assert "locally" in errors[0] and "launcher=local" in errors[0]
    assert not sweep_dir.exists() and not list(tmp_path.glob("**/*.sbatch"))


@pytest.mark.slow
def test_optuna_sweeper_minimises_the_trials_best_eval_loss(tiny, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    import yaml

    sweep_dir = tmp_path / "optuna"
    result = lora_launch("-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=0",
                         "optim.lr=interval(0.0001,0.003)", "train.max_steps=2", "sample.max_new_tokens=0",
                         *tiny["overrides"], f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
    assert all(r["trial"].startswith("optim.lr=") for r in rows)
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())["best_value"]
    assert best == pytest.approx(float(rows[0]["best_eval_loss"]))
