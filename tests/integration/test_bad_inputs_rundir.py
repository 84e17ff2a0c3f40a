"""Nothing of the user's is moved, and every refusal or failure ends in one `error:` line: resume.mode=never
in a folder holding the user's files, a full disk during a save and at launch, a resume every rank refuses."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest

import lora_launch.conf as conf_package
from lora_launch.run.checkpoints import choose
from support import faults
from support.cli import CLI, lora_launch, subprocess_env

DEMO_DATA = Path(conf_package.__file__).parent / "assets" / "demo" / "train.jsonl"


def _files(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(d.rglob("*"))
    }


def _one_error_line(stderr: str) -> str:
    """The refusal's line, asserting it is the only thing on stderr."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


@contextlib.contextmanager
def _another_job_on(port: int):
    """`port` held, as another launch on this machine would hold it (unless something here holds it already)."""
    with socket.socket() as s:
        with contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            s.listen()
        yield


def _run(tmp: Path, run: Path, *overrides: str, **kw):
    return lora_launch(f"run.dir={run}", f"data.cache_dir={tmp / 'cache'}", *overrides, cwd=tmp, **kw)


def test_resume_never_leaves_the_users_files_where_they_are(tmp_path):
    folder = tmp_path / "v"
    (folder / "photos").mkdir(parents=True)
    (folder / "photos" / "cat.jpg").write_bytes(bytes(range(256)))
    (folder / "todo.txt").write_text("x\n")
    before = _files(folder)
    refused = _run(tmp_path, folder, "resume.mode=never", "train.max_steps=1")
    assert refused.returncode == 2
    assert str(folder / "photos") in _one_error_line(refused.stderr)
    assert _files(folder) == before


def test_resume_never_starts_over_in_an_empty_dir_and_in_its_own_run_dir_only(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    first = _run(tmp_path, run, "resume.mode=never", "train.max_steps=1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (run / ".lora-launch-run").is_file() and not list(run.glob("previous-*"))

    (run / ".lora-launch-run").unlink()  # a run dir made before the marker: its status.json says it is a run
    again = _run(tmp_path, run, "resume.mode=never", "train.max_steps=1")
    assert again.returncode == 0, again.stderr[-3000:]
    (previous,) = run.glob("previous-*")
    assert (previous / "status.json").is_file() and (run / "status.json").is_file()

    (run / "notes.md").write_text("mine\n")  # the user's file in a run dir that is otherwise lora-launch's
    before = _files(run)
    refused = _run(tmp_path, run, "resume.mode=never", "train.max_steps=1")
    assert refused.returncode == 2
    assert str(run / "notes.md") in _one_error_line(refused.stderr)
    locks = (".launch.lock", ".ranks.lock")
    assert {k: v for k, v in _files(run).items() if not k.startswith(locks)} == {
        k: v for k, v in before.items() if not k.startswith(locks)
    }


@pytest.mark.parametrize("background_min_mib", [64, 0], ids=["save-at-once", "save-in-background"])
def test_a_full_disk_during_a_save_is_one_line_and_a_failed_status(tmp_path, background_min_mib):
    disk, after = tmp_path / "disk", tmp_path / "disk-after"
    # a LoRA on q/v alone: checkpoints of ~200 kB, so a few are complete before the 900k disk fills
    argv = [
        CLI,
        f"run.dir={disk / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.max_steps=40",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=40",
        f"checkpoint.background_min_mib={background_min_mib}",
        "lora.target_modules=[q_proj,v_proj]",
    ]
    result = faults.full_disk(disk, "900k", after, argv, subprocess_env(), cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:]
    line = _one_error_line(result.stderr)
    assert "No space left on device" in line and str(disk / "run") in line
    status = json.loads((after / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "No space left on device" in status["error"]
    found = choose(after / "run", "auto")  # verifies every file against its manifest, newest first
    assert found is not None and int(found[0].name.split("-")[1]) < status["step"], status


def test_a_launch_refused_on_a_full_disk_leaves_no_new_dir(tmp_path):
    disk, after = tmp_path / "disk", tmp_path / "disk-after"
    argv = [CLI, f"run.dir={disk / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=1"]
    result = faults.full_disk(disk, "4k", after, argv, subprocess_env(), cwd=tmp_path)
    assert result.returncode == 2
    assert "No space left on device" in _one_error_line(result.stderr)
    assert list(after.iterdir()) == []


@pytest.mark.two_ranks
def test_a_resume_every_rank_refuses_is_one_line(tmp_path):
    data = Path(shutil.copy(DEMO_DATA, tmp_path / "data.jsonl"))
    run = tmp_path / "run"
    command = [
        "data.source=local",
        f"data.path={data}",
        "launcher.num_processes=2",
        "train.max_steps=2",
        "checkpoint.every_steps=2",
    ]
    with _another_job_on(29500):  # the default rendezvous port, taken: the ranks meet elsewhere, quietly
        done = _run(tmp_path, run, *command)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = data.read_text().splitlines()
        data.write_text("\n".join([json.dumps({"instruction": "changed", "output": "row"}), *rows[1:]]) + "\n")
        # the config is the same, so the launcher lets it through; both ranks find the data hash changed
        refused = _run(tmp_path, run, *command, f"resume.mode={run}/checkpoints/step-2")
    assert refused.returncode == 2
    assert "tokenised dataset" in _one_error_line(refused.stderr)
