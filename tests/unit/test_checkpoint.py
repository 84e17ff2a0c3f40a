"""The checkpointer on one process with a tiny model: round trip into its states, when a save is due,
retention, the commit rule, corruption, the config comparison, reading and rewinding metrics. No launcher;
the crash tests (tests/integration) run a save in a subprocess."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from lora_launch.run.checkpoints import verify
from lora_launch.run.rundir import RUN_MARKER, committed_checkpoints, read_metrics, rewind_metrics, set_aside_previous
from lora_launch.train.checkpoint import Checkpointer, CheckpointError, _read_states, changes
from lora_launch.train.state import ScalerState
from support.ckpt import FINGERPRINTS, OneProcess, Training, checkpointer, edit_manifest, make_cfg, saved_steps


def test_resumed_training_continues_bitwise(tmp_path):
    t = Training()
    t.steps(3)
    checkpointer(tmp_path, t).save(3)
    expected = t.steps(4)  # dropout and data draw from the restored RNG

    t2 = Training()  # the same frozen part, as a base model reloads
    with torch.no_grad():  # trainable weights, optimizer state, schedule, RNG and progress must come from the file
        for p in t2.optimizer.param_groups[0]["params"]:
            p.add_(1.0)
    t2.steps(1)
    assert checkpointer(tmp_path, t2).load() == 3
    assert t2.progress.state_dict() == {"step": 3, "position": 24, "tokens_seen": 300, "epoch": 1}
    assert t2.steps(4) == expected
    assert t2.scheduler.get_last_lr() == t.scheduler.get_last_lr()
    assert all(torch.equal(a, b) for a, b in zip(t.model.parameters(), t2.model.parameters()))


def test_the_checkpointer_decides_when_a_save_is_due(tmp_path):
    t = Training()
    ck = checkpointer(tmp_path, t, every=2)
    assert ck.maybe_save(1) is None and ck.last_save == {}
    assert ck.maybe_save(2) == tmp_path / "checkpoints" / "step-2"
    assert ck.last_save["step"] == 2 and ck.last_save["bytes"] > 0 and ck.last_save["seconds"] >= 0
    assert ck.maybe_save(3, force=True) == tmp_path / "checkpoints" / "step-3"  # a stop saves off the schedule
    never = checkpointer(tmp_path / "other", t, every=0)
    assert never.maybe_save(4) is None and never.maybe_save(4, force=True) is not None


def test_a_background_save_writes_what_the_step_held_while_training_goes_on(tmp_path):
    t = Training()
    t.steps(2)
    at_once = checkpointer(tmp_path / "at_once", t).save(2)
    ck = checkpointer(tmp_path / "bg", t, every=2, background_min_mib=0)
    assert ck.maybe_save(2) is None and ck.pending is not None  # written by a thread, not committed yet
    t.steps(3)  # training changes the weights while (or after) the thread writes
    path = ck.finish()
    assert path == tmp_path / "bg" / "checkpoints" / "step-2" and ck.pending is None
    assert ck.last_save["background"] and ck.last_save["step"] == 2 and ck.last_save["write_seconds"] > 0
    verify(path)
    for name in ("trainable.safetensors", "rng-rank0.safetensors", "state.json", "rng-rank0.json"):
        assert (path / name).read_bytes() == (at_once / name).read_bytes(), name
    # the next due step commits a finished save first; a stop (force) writes at once
    assert ck.maybe_save(4) is None and ck.maybe_save(5, force=True) == tmp_path / "bg" / "checkpoints" / "step-5"
    assert [s for s, _ in committed_checkpoints(tmp_path / "bg")] == [4, 5]


def test_a_failed_background_write_is_raised_at_the_commit_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import errno

    from lora_launch.train import checkpoint as module

    t = Training()
    ck = checkpointer(tmp_path, t, every=2, background_min_mib=0)
    t.steps(2)
    ck.maybe_save(2)
    ck.finish()

    def full(path, tensors):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(module, "_save_tensors", full)
    t.steps(2)
    assert ck.maybe_save(4) is None
    with pytest.raises(OSError, match="No space left"):
        ck.finish()
    assert [s for s, _ in committed_checkpoints(tmp_path)] == [2] and not list(
        (tmp_path / "checkpoints").glob(".staging-*")
    )
    verify(tmp_path / "checkpoints" / "step-2")


def test_the_files_keep_format_1(tmp_path):
    t = Training()
    t.steps(2)
    path = checkpointer(tmp_path, t).save(2)
    assert {f.name for f in path.iterdir()} == {
        "trainable.safetensors",
        "state.json",
        "rng-rank0.safetensors",
        "rng-rank0.json",
        "manifest.json",
    }
    state = json.loads((path / "state.json").read_text())
    assert {k: state[k] for k in ("step", "position", "tokens_seen", "epoch", "world_size")} == {
        "step": 2,
        "position": 16,
        "tokens_seen": 200,
        "epoch": 0,
        "world_size": 1,
    }
    assert state["optimizer"] == {"keys": ["exp_avg", "exp_avg_sq"], "step": 2.0}
    assert state["scheduler"]["last_epoch"] == 2 and state["scaler"] is None
    assert sorted(load_file(str(path / "trainable.safetensors"))) == [
        f"{kind}/{name}"
        for kind in ("optim/exp_avg", "optim/exp_avg_sq", "param")
        for name in ("0.bias", "2.bias", "2.weight")
    ]
    assert set(json.loads((path / "rng-rank0.json").read_text())) == {"python", "numpy"}
    assert json.loads((path / "manifest.json").read_text())["format"] == 1


def test_a_rank_the_saved_run_did_not_have_takes_a_saved_ranks_rng(tmp_path):
    t = Training()
    t.steps(1)
    path = checkpointer(tmp_path, t).save(1)
    saved, state = _read_states(path, rank=3)  # resumed with 4 processes from a 1-process checkpoint
    assert state["world_size"] == 1
    assert torch.equal(saved["rng"]["tensors"]["torch"], load_file(str(path / "rng-rank0.safetensors"))["torch"])


def test_the_grad_scaler_survives_a_resume(tmp_path):
    t = Training()
    t.states["scaler"] = ScalerState("torch", torch.amp.GradScaler("cpu", init_scale=1024.0))
    t.states["scaler"].scaler.scale(torch.ones(1))  # the scale exists from the first scaled loss
    t.states["scaler"].scaler.update(new_scale=96.0)
    t.steps(1)
    checkpointer(tmp_path, t).save(1)
    t2 = Training()
    t2.states["scaler"] = ScalerState("torch", torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert checkpointer(tmp_path, t2).load() == 1
    assert t2.states["scaler"].scaler.get_scale() == 96.0
    assert checkpointer(tmp_path).load() == 1  # a run without a scaler ignores the saved one


def test_the_checkpointer_is_built_with_the_states_a_checkpoint_holds(tmp_path):
    states = {name: part for name, part in Training().states.items() if name != "rng"}
    with pytest.raises(ValueError, match="rng"):
        Checkpointer(make_cfg(tmp_path), tmp_path, OneProcess(), states=states, fingerprints=FINGERPRINTS)


def test_allowed_lr_change_rescales_the_schedule(tmp_path):
    t = Training()
    t.steps(3)
    checkpointer(tmp_path, t).save(3)
    t2 = Training(lr=0.5)
    with pytest.raises(CheckpointError, match=r"optim\.lr: 0\.1 -> 0\.5"):
        checkpointer(tmp_path, t2, lr=0.5).load()
    assert checkpointer(tmp_path, t2, lr=0.5, allow=["optim.lr"]).load() == 3
    assert t2.scheduler.get_last_lr()[0] == pytest.approx(5 * t.scheduler.get_last_lr()[0])
    assert t2.optimizer.param_groups[0]["lr"] == t2.scheduler.get_last_lr()[0]


def test_keep_last_and_latest(tmp_path):
    t = Training()
    ck = checkpointer(tmp_path, t)
    for step in range(1, 6):
        t.steps(1)
        ck.maybe_save(step)
    assert [s for s, _ in ck.committed()] == [4, 5]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-5"
    assert not list((tmp_path / "checkpoints").glob(".staging-*"))


def test_uncommitted_and_corrupt_checkpoints_are_never_loaded(tmp_path, capsys):
    t = Training()
    ck = checkpointer(tmp_path, t)
    for step in (1, 2):
        t.steps(1)
        ck.save(step)
    ckpt = tmp_path / "checkpoints"
    # a later save that never committed: staging dir, and a step dir without its manifest
    (ckpt / ".staging-step-4").mkdir()
    (ckpt / "step-3").mkdir()
    (ckpt / "step-3" / "trainable.safetensors").write_bytes(b"partial")
    assert checkpointer(tmp_path).load() == 2

    weights = ckpt / "step-2" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern inside the tensor bytes: same size, wrong content
    weights.write_bytes(bytes(data))
    assert checkpointer(tmp_path).load() == 1
    assert "step-2: trainable.safetensors is missing or does not match its checksum" in capsys.readouterr().out

    with pytest.raises(CheckpointError, match="trainable.safetensors"):
        checkpointer(tmp_path, mode=str(ckpt / "step-2")).load()


def test_a_manifest_must_checksum_every_file_the_loader_reads(tmp_path, capsys):
    old, new = saved_steps(tmp_path, (1, 2))
    # a stale trainable.safetensors copied in, and the manifest no longer lists it: still loadable before
    (new / "trainable.safetensors").write_bytes((old / "trainable.safetensors").read_bytes())
    edit_manifest(new, lambda m: m["files"].pop("trainable.safetensors"))
    assert checkpointer(tmp_path).load() == 1  # the older good one
    assert (
        "step-2: manifest.json does not list trainable.safetensors with its size and sha256" in capsys.readouterr().out
    )
    with pytest.raises(CheckpointError, match="step-2: manifest.json does not list trainable.safetensors"):
        checkpointer(tmp_path, mode=str(new)).load()


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda m: m.update(files={}), "lists no files"),
        (lambda m: m.pop("files"), "lists no files"),
        (lambda m: m.update(files=[]), "lists no files"),
        (lambda m: m["files"]["state.json"].pop("sha256"), "does not list state.json with its size and sha256"),
        (lambda m: m.update(world_size=2), r"does not list rng-rank1\.safetensors"),  # rank 1's RNG never listed
        (lambda m: m["files"].pop("rng-rank0.json"), r"does not list rng-rank0\.json"),
        (lambda m: m.pop("world_size"), "has no usable world_size .None."),
        (lambda m: m.update(world_size=0), "has no usable world_size .0."),
        (lambda m: m.update(world_size="1"), "has no usable world_size ..1.."),
        (lambda m: m.pop("config"), "has no config"),
        (lambda m: m.pop("fingerprints"), "has no fingerprints"),
        (lambda m: m.update(step="2"), "has no step"),
    ],
    ids=[
        "empty",
        "no-files",
        "files-a-list",
        "no-sha256",
        "rank-1-unlisted",
        "rng-json-unlisted",
        "no-world-size",
        "world-size-0",
        "world-size-str",
        "no-config",
        "no-fingerprints",
        "step-a-string",
    ],
)
def test_an_incomplete_manifest_is_rejected_naming_the_file(tmp_path, edit, reason):
    (path,) = saved_steps(tmp_path, (1,))
    verify(path)
    edit_manifest(path, edit)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: manifest.json {reason}"):
        verify(path)


def test_a_missing_rng_file_of_a_rank_is_rejected(tmp_path):
    (path,) = saved_steps(tmp_path, (1,))
    (path / "rng-rank0.safetensors").unlink()
    with pytest.raises(CheckpointError, match="step-1: rng-rank0.safetensors is missing or does not match"):
        verify(path)


def test_when_every_checkpoint_is_rejected_auto_refuses_to_start_over(tmp_path):
    paths = saved_steps(tmp_path, (1, 2))
    edit_manifest(paths[0], lambda m: m.update(files={}))
    (paths[1] / "state.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        checkpointer(tmp_path).load()
    message = str(e.value)
    assert "\n" not in message and "every checkpoint in" in message and "resume.mode=never" in message
    assert f"{paths[1]}: state.json is missing or does not match its checksum" in message
    assert f"{paths[0]}: manifest.json lists no files" in message
    assert checkpointer(tmp_path, mode="never").load() is None  # the way to start over


def test_mismatch_is_refused_naming_the_key_unless_allowed(tmp_path):
    t = Training()
    t.steps(1)
    checkpointer(tmp_path, t).save(1)
    with pytest.raises(CheckpointError, match=r"lora\.r: 4 -> 8"):
        checkpointer(tmp_path, r=8).load()
    with pytest.raises(CheckpointError, match=r"optim\.lr: 0\.1 -> 0\.2"):
        checkpointer(tmp_path, lr=0.2).load()
    assert checkpointer(tmp_path, lr=0.2, allow=["optim.lr"]).load() == 1
    with pytest.raises(CheckpointError, match="data .the tokenised dataset hash differs"):
        checkpointer(tmp_path, fingerprints={**FINGERPRINTS, "data": "other"}).load()


def test_changes_ignores_free_keys_and_schema_additions():
    saved = {
        "config": {"optim": {"lr": 1}, "logging": {"every_steps": 1}, "run": {"dir": "a"}},
        "fingerprints": FINGERPRINTS,
    }
    now = {
        "config": {"optim": {"lr": 1}, "logging": {"every_steps": 5}, "run": {"dir": "b"}, "new_key": 3},
        "fingerprints": FINGERPRINTS,
    }
    assert changes(saved, now, []) == []
    now["fingerprints"] = {**FINGERPRINTS, "lora_shapes": {"a": [1]}, "tokenizer": "x"}
    out = changes(saved, now, [])
    assert any("LoRA shape" in c for c in out) and any("tokenizer" in c for c in out)
    assert not any("tokenizer" in c for c in changes(saved, now, ["tokenizer"]))
    now["fingerprints"] = {**FINGERPRINTS, "model": {"hidden_size": 8}}
    assert changes(saved, now, []) == ["model architecture: {'hidden_size': 4} -> {'hidden_size': 8}"]


def test_resume_path_is_checked_when_the_config_is_composed(tmp_path):
    from lora_launch.conf.compose import compose
    from lora_launch.conf.schema import ConfigError

    with pytest.raises(ConfigError, match="resume.mode=.*not auto, never or a checkpoint directory"):
        compose([f"run.dir={tmp_path}", f"resume.mode={tmp_path / 'nope'}"])


def test_resume_never_sets_the_earlier_run_aside(tmp_path):
    t = Training()
    t.steps(1)
    checkpointer(tmp_path, t).save(1)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    fresh = Training(seed=5)
    before = [p.clone() for p in fresh.model.parameters()]
    assert checkpointer(tmp_path, fresh, mode="never").load() is None  # never: nothing loaded, nothing moved
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.model.parameters())) and fresh.progress.step == 0
    assert checkpointer(tmp_path).load() == 1
    (tmp_path / RUN_MARKER).write_text("")  # as the launch that made the run dir left it
    set_aside_previous(tmp_path)  # what training does first under resume.mode=never (Trainer.restore)
    previous = list(tmp_path.glob("previous-*"))
    assert len(previous) == 1 and (previous[0] / "checkpoints" / "step-1" / "manifest.json").exists()
    assert not (tmp_path / "metrics.jsonl").exists() and checkpointer(tmp_path).load() is None


def test_resume_never_moves_nothing_where_a_file_is_not_lora_launchs(tmp_path):
    from lora_launch.conf.schema import ConfigError

    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="no .lora-launch-run or status.json"):
        set_aside_previous(tmp_path)  # names lora-launch uses, but nothing says lora-launch made the dir
    (tmp_path / RUN_MARKER).write_text("")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(
        ConfigError, match=re.escape(f"{tmp_path / 'notes.txt'} aside, and lora-launch did not write it")
    ):
        set_aside_previous(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUN_MARKER, "checkpoints", "notes.txt"]
    (tmp_path / "notes.txt").unlink()
    assert (set_aside_previous(tmp_path) / "checkpoints").is_dir()


def test_rewind_metrics_keeps_one_row_per_step(tmp_path):
    rows = [
        {"step": 0, "eval_loss": 1},
        {"step": 1, "loss": 1},
        {"step": 2, "loss": 2},
        {"step": 2, "eval_loss": 2},
        {"step": 3, "loss": 3},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    (tmp_path / "ranks").mkdir()
    (tmp_path / "ranks" / "rank1.jsonl").write_text('{"step": 2, "samples": [1]}\n{"step": 3, "samples": [2]}\n')
    assert rewind_metrics(tmp_path, 2, total_steps=5) == 3  # step 3 twice and the cut line
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows[:4]
    assert (tmp_path / "ranks" / "rank1.jsonl").read_text() == '{"step": 2, "samples": [1]}\n'
    rewind_metrics(tmp_path, 2, total_steps=2)  # the final eval of a finished step is written again
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows[:3]


def test_read_metrics_leaves_out_a_line_cut_short_by_a_kill(tmp_path):
    assert read_metrics(tmp_path) == []  # no metrics.jsonl yet
    rows = [{"step": 1, "loss": 2.5}, {"step": 1, "eval_loss": 2.0}, {"step": 2, "loss": 2.25}]
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "metrics.jsonl").write_bytes(text + b'\n[1, 2]\n{"step": 3, "x": "\xff"}\n{"step": 4, "lo')
    got = read_metrics(tmp_path)  # not UTF-8 still reads; a blank line, a list and the cut line are left out
    assert got[:3] == rows and [r["step"] for r in got] == [1, 1, 2, 3]
