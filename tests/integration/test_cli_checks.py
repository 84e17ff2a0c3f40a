"""The real `lora-launch` refusing bad input before anything starts, and the run-dir lock across processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_launch.conf.compose import compose
from lora_launch.conf.schema import ConfigError
from lora_launch.launcher import checks
from lora_launch.run.lock import RunLock
from support.cli import lora_launch


@pytest.mark.parametrize(
    "override,key", [("lora.r=0", "lora.r"), ("lora.r=abc", "lora.r"), ("lora.rank=8", "lora.rank")]
)
def test_cli_rejects_before_any_process_starts(override, key, tmp_path):
    run_dir = tmp_path / "run"
    result = lora_launch(override, f"run.dir={run_dir}", timeout=120)
    assert result.returncode != 0
    assert key in result.stderr
    assert "accelerate launch" not in result.stdout  # nothing was launched
    assert not (run_dir / "config.yaml").exists()


def test_cli_refuses_an_unwritable_run_dir_in_one_line():
    result = lora_launch("run.dir=/proc/no-such-dir/run", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: run.dir=/proc/no-such-dir/run is not writable (No such file or directory); choose another run.dir"
    ]


def _lock_held_by_child(path: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the lock at `path` for `seconds`, once it says so."""
    code = (
        f"from lora_launch.run.lock import RunLock; from pathlib import Path; import time; "
        f"RunLock(Path({str(path)!r})).acquire(); print('held', flush=True); time.sleep({seconds})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=path.parent)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_of_a_killed_launcher_is_stale(tmp_path):
    path = tmp_path / ".launch.lock"
    proc = _lock_held_by_child(path, 60)
    with pytest.raises(ConfigError, match=f"pid {proc.pid}"):
        RunLock(path).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with RunLock(path):  # the dead holder's lock is gone; its pid is still written in the file
        pass


def test_lock_waits_for_an_ending_holder_when_asked(tmp_path):
    """A Slurm requeue's node waits for the last attempt's launcher to let go (launcher.node)."""
    path = tmp_path / ".launch.lock"
    proc = _lock_held_by_child(path, 3)
    with pytest.raises(ConfigError, match=f"pid {proc.pid}"):
        RunLock(path, wait_s=0.5).acquire()
    start = time.monotonic()
    with RunLock(path, wait_s=60):
        assert time.monotonic() - start > 1.5  # taken only once the holder (3 s) had ended
    proc.wait()


def test_cli_refuses_a_held_run_dir_before_starting_anything(tmp_path):
    from support.cli import lora_launch

    run = tmp_path / "run"
    with RunLock(run / ".launch.lock"):
        result = lora_launch(f"run.dir={run}", "train.max_steps=1", timeout=180)
    assert result.returncode == 2
    assert "in use by a live launch" in result.stderr and "accelerate launch" not in result.stdout
    assert not (run / "accelerate.yaml").exists()


def test_cli_check_failures_are_one_line(tmp_path):
    from support.cli import lora_launch

    result = lora_launch(f"run.dir={tmp_path / 'run'}", "train.global_batch_size=3", timeout=180)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: train.global_batch_size=3")
    assert len(result.stderr.strip().splitlines()) == 1


def _fake_checkpoint(run: Path, overrides: list[str], step: int = 5) -> None:
    """checkpoints/step-N/: a complete checkpoint as far as the launcher's check reads it (the manifest with
    the config `overrides` compose to, every file the loader reads listed and checksummed)."""
    from omegaconf import OmegaConf

    from lora_launch.conf.schema import redact
    from lora_launch.run.checkpoints import FORMAT, loaded_files, sha256_file

    cfg = compose([*overrides, f"run.dir={run}"])
    ckpt = run / "checkpoints" / f"step-{step}"
    ckpt.mkdir(parents=True)
    for name in loaded_files(1):
        (ckpt / name).write_bytes(f"contents of {name}".encode())
    files = {
        name: {"sha256": sha256_file(ckpt / name), "bytes": (ckpt / name).stat().st_size} for name in loaded_files(1)
    }
    (ckpt / "manifest.json").write_text(
        json.dumps(
            {
                "format": FORMAT,
                "step": step,
                "world_size": 1,
                "files": files,
                "fingerprints": {},
                "config": redact(OmegaConf.to_container(cfg, resolve=True)),
            }
        )
    )


def test_resume_under_a_changed_config_is_refused_before_anything_is_written(tmp_path):
    from support.cli import lora_launch

    run = tmp_path / "run"
    _fake_checkpoint(run, ["lora.r=8"])
    (run / "config.yaml").write_text("the earlier run's config\n")
    checks.check_resume_config(
        compose(
            ["lora.r=8", "optim.lr=1e-3", f"run.dir={run}", "resume.allow_changes=[optim.lr]", "logging.every_steps=3"]
        )
    )
    result = lora_launch(f"run.dir={run}", "lora.r=4", "train.max_steps=1", timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot resume from") and "lora.r: 8 -> 4" in lines[0]
    assert "resume.allow_changes" in lines[0] and "accelerate launch" not in result.stdout
    assert (run / "config.yaml").read_text() == "the earlier run's config\n"
    assert not (run / "accelerate.yaml").exists()
    # starting over is allowed, and so is naming the change safe
    checks.check_resume_config(compose(["lora.r=4", f"run.dir={run}", "resume.mode=never"]))
    checks.check_resume_config(compose(["lora.r=4", f"run.dir={run}", "resume.allow_changes=[lora.r]"]))


def test_finished_run_under_another_config_is_refused_not_skipped(tmp_path):
    from omegaconf import OmegaConf

    from lora_launch.run.rundir import write_status
    from support.cli import lora_launch

    run = tmp_path / "run"
    run.mkdir()
    OmegaConf.save(compose(["lora.r=8", "train.max_steps=3", f"run.dir={run}"]), run / "config.yaml")
    write_status(run, "finished", 3)
    result = lora_launch(f"run.dir={run}", "lora.r=4", "train.max_steps=3", timeout=180)
    assert result.returncode == 2 and "finished run with another config (lora.r: 8 -> 4)" in result.stderr
    result = lora_launch(f"run.dir={run}", "lora.r=8", "train.max_steps=3", "logging.every_steps=2", timeout=180)
    assert result.returncode == 0 and "already finished at step 3" in result.stdout, result.stderr[-2000:]


def test_preview_starts_nothing(tmp_path, tiny):
    from support.cli import lora_launch

    run = tmp_path / "run"
    result = lora_launch(*tiny["overrides"], f"run.dir={run}", "preview=true", "train.max_steps=7", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "# resolved config" in result.stdout and "steps per epoch" in result.stdout
    assert "accelerate launch --config_file" in result.stdout
    assert not (run / "config.yaml").exists() and not (run / "accelerate.yaml").exists()
    assert not (run / "metrics.jsonl").exists()
    assert not run.exists(), sorted(p.name for p in run.iterdir())  # not even Hydra's .hydra/ or cli.log

    # a used run dir keeps exactly what it had
    run.mkdir()
    (run / "config.yaml").write_text("earlier: run\n")
    result = lora_launch(*tiny["overrides"], f"run.dir={run}", "preview=true", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
    assert (run / "config.yaml").read_text() == "earlier: run\n"


@pytest.mark.parametrize(
    "override,line",
    [
        (
            "distributed=zero5",
            "error: distributed=zero5 is not a choice of distributed; choose one of: ddp, fsdp2, fsdp2_offload, zero2, zero3, zero3_offload",
        ),
        (
            "model=nosuch",
            "error: model=nosuch is not a choice of model; choose one of: llama2_7b, llama2_7b_random, tiny",
        ),
        ("lora.rank=16", "error: lora.rank is not a key of the config (lora has: r, alpha"),
        ("+lora.rank=16", "error: lora.rank is not a key of the config (lora has: r, alpha"),
        ("lora.r=abc", "error: lora.r=abc: Value 'abc' of type 'str' could not be converted to Integer"),
        ("train.precision=bf16", "error: train.precision=bf16: Invalid value 'bf16', expected one of [auto, bfloat16"),
        ("bogus", "error: cannot read the override 'bogus': write key=value"),
    ],
)
def test_composition_errors_are_one_line_naming_the_choice_or_key(tmp_path, override, line):
    run = tmp_path / "run"
    result = lora_launch(override, f"run.dir={run}", cwd=tmp_path, timeout=180)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith(line), (
        result.stderr[-2000:]
    )
    assert not run.exists()
