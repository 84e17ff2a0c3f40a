"""A refused command changes nothing in a run dir (Hydra's .hydra/ included) and leaves no new dir behind;
resume.mode=never moves every file of the earlier run aside before the new one writes any."""

from __future__ import annotations

import hashlib
from pathlib import Path

from support.cli import lora_launch
from support.resume import status


def _snapshot(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(d.rglob("*"))
    }


def test_refused_commands_change_nothing_and_leave_nothing(tiny, tmp_path):
    run = tmp_path / "run"
    done = lora_launch(*tiny["overrides"], f"run.dir={run}", "train.max_steps=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / ".hydra" / "overrides.yaml").is_file() and not (run / "cli.log").exists()
    before = _snapshot(run)
    for bad in (
        ["train.global_batch_size=3"],
        ["lora.r=4"],
        ["train.max_steps=2", "launcher.num_machines=2", "launcher.machine_rank=5"],
    ):
        refused = lora_launch(*tiny["overrides"], f"run.dir={run}", *bad, cwd=tmp_path)
        assert refused.returncode == 2, (bad, refused.stdout[-1000:], refused.stderr[-2000:])
        assert refused.stderr.startswith("error: ") and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert _snapshot(run) == before, bad

    fresh = tmp_path / "fresh"
    refused = lora_launch(*tiny["overrides"], f"run.dir={fresh}", "train.global_batch_size=3", cwd=tmp_path)
    assert refused.returncode == 2 and not fresh.exists()


def test_resume_never_moves_every_file_of_the_earlier_run_aside(tiny, tmp_path):
    run = tmp_path / "run"
    first = lora_launch(
        *tiny["overrides"], f"run.dir={run}", "train.max_steps=3", "checkpoint.every_steps=2", cwd=tmp_path
    )
    assert first.returncode == 0, first.stderr[-3000:]
    earlier = {p.name for p in run.iterdir()} - {".launch.lock", ".ranks.lock", ".lora-launch-run"}
    assert {"adapter", "loss.png", "sample.txt", "metrics.jsonl", "checkpoints", "config.yaml"} <= earlier

    again = lora_launch(*tiny["overrides"], f"run.dir={run}", "train.max_steps=2", "resume.mode=never", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    (previous,) = run.glob("previous-*")
    assert {p.name for p in previous.iterdir()} == earlier and (run / ".lora-launch-run").is_file()  # still a run dir
    assert status(previous)["step"] == 3 and status(run)["step"] == 2
    assert (previous / "adapter" / "adapter_config.json").is_file()  # the earlier trained adapter survives
