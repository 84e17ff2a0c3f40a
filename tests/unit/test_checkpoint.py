"""The checkpointer on one process: round trip, retention, the commit rule, corruption, crashes in a save,
the config comparison and metrics rewinding. No launcher; the crash tests run a save in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from support.ckpt import FINGERPRINTS, OneProcess, checkpointer, make_cfg, make_training, save, train_steps
from lora_launch.run.rundir import rewind_metrics, set_aside_previous
from lora_launch.train.checkpoint import CRASH_ENV, Checkpointer, CheckpointError, changes





def test_resumed_training_continues_bitwise(tmp_path):
    model, opt, sched = make_training()
    train_steps(model, opt, sched, 3)
    save(checkpointer(tmp_path), 3, model, opt, sched)
    expected = train_steps(model, opt, sched, 4)  # dropout and data draw from the restored RNG

    model2, opt2, sched2 = make_training()  # the same frozen part, as a base model reloads
    with torch.no_grad():  # trainable weights, optimizer state and RNG must all come from the file
        for p in opt2.param_groups[0]["params"]:
            p.add_(1.0)
    train_steps(model2, opt2, sched2, 1)
    loaded = checkpointer(tmp_path).load_latest()
    state = checkpointer(tmp_path).restore(loaded, model2, opt2, sched2)
    assert (state["step"], state["position"], state["tokens_seen"], state["epoch"]) == (3, 24, 300, 1)
    assert train_steps(model2, opt2, sched2, 4) == expected
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_allowed_lr_change_rescales_the_schedule(tmp_path):
    model, opt, sched = make_training()
    train_steps(model, opt, sched, 3)
    save(checkpointer(tmp_path), 3, model, opt, sched)
    model2, opt2, sched2 = make_training(lr=0.5)
    ck = checkpointer(tmp_path)
    ck.restore(ck.load_latest(), model2, opt2, sched2)
    assert sched2.get_last_lr()[0] == pytest.approx(5 * sched.get_last_lr()[0])
    assert opt2.param_groups[0]["lr"] == sched2.get_last_lr()[0]


def test_keep_last_and_latest(tmp_path):
    model, opt, sched = make_training()
    ck = checkpointer(tmp_path)
    for step in range(1, 6):
        train_steps(model, opt, sched, 1)
        save(ck, step, model, opt, sched)
    assert [s for s, _ in ck.committed()] == [4, 5]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-5"
    assert not list((tmp_path / "checkpoints").glob(".staging-*"))


def test_uncommitted_and_corrupt_checkpoints_are_never_loaded(tmp_path, capsys):
    model, opt, sched = make_training()
    ck = checkpointer(tmp_path)
    for step in (1, 2):
        train_steps(model, opt, sched, 1)
        save(ck, step, model, opt, sched)
    ckpt = tmp_path / "checkpoints"
    # a later save that never committed: staging dir, and a step dir without its manifest
    (ckpt / ".staging-step-4").mkdir()
    (ckpt / "step-3").mkdir()
    (ckpt / "step-3" / "trainable.safetensors").write_bytes(b"partial")
    assert checkpointer(tmp_path).load_latest()["state"]["step"] == 2

    weights = ckpt / "step-2" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern inside the tensor bytes: same size, wrong content
    weights.write_bytes(bytes(data))
    assert checkpointer(tmp_path).load_latest()["state"]["step"] == 1
    assert "step-2: trainable.safetensors is missing or does not match its checksum" in capsys.readouterr().out

    with pytest.raises(CheckpointError, match="trainable.safetensors"):
        checkpointer(tmp_path, mode=str(ckpt / "step-2")).load_latest()


def test_mismatch_is_refused_naming_the_key_unless_allowed(tmp_path):
    model, opt, sched = make_training()
    train_steps(model, opt, sched, 1)
    save(checkpointer(tmp_path), 1, model, opt, sched)
    with pytest.raises(CheckpointError, match=r"lora\.r: 4 -> 8"):
        checkpointer(tmp_path, r=8).load_latest()
    with pytest.raises(CheckpointError, match=r"optim\.lr: 0\.1 -> 0\.2"):
        checkpointer(tmp_path, lr=0.2).load_latest()
    assert checkpointer(tmp_path, lr=0.2, allow=["optim.lr"]).load_latest()["state"]["step"] == 1
    ck = checkpointer(tmp_path)
    ck.fingerprints = {**FINGERPRINTS, "data": "other"}
    with pytest.raises(CheckpointError, match="data .the tokenised dataset hash differs"):
        ck.load_latest()


def test_changes_ignores_free_keys_and_schema_additions():
    saved = {"config": {"optim": {"lr": 1}, "logging": {"every_steps": 1}, "run": {"dir": "a"}},
             "fingerprints": FINGERPRINTS}
    now = {"config": {"optim": {"lr": 1}, "logging": {"every_steps": 5}, "run": {"dir": "b"}, "new_key": 3},
           "fingerprints": FINGERPRINTS}
    assert changes(saved, now, []) == []
    now["fingerprints"] = {**FINGERPRINTS, "lora_shapes": {"a": [1]}, "tokenizer": "x"}
    out = changes(saved, now, [])
    assert any("LoRA shape" in c for c in out) and any("tokenizer" in c for c in out)
    assert not any("tokenizer" in c for c in changes(saved, now, ["tokenizer"]))
    now["fingerprints"] = {**FINGERPRINTS, "model": {"hidden_size": 8}}
    assert changes(saved, now, []) == ["model architecture: {'hidden_size': 4} -> {'hidden_size': 8}"]


def test_resume_path_is_checked_when_the_config_is_composed(tmp_path):
    from lora_launch.conf.schema import ConfigError
    from lora_launch.conf.compose import compose

    with pytest.raises(ConfigError, match="resume.mode=.*not auto, never or a checkpoint directory"):
        compose([f"run.dir={tmp_path}", f"resume.mode={tmp_path / 'nope'}"])


def test_resume_never_sets_the_earlier_run_aside(tmp_path):
    model, opt, sched = make_training()
    train_steps(model, opt, sched, 1)
    save(checkpointer(tmp_path), 1, model, opt, sched)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert checkpointer(tmp_path, mode="never").load_latest() is None  # never: nothing loaded, nothing moved
    assert checkpointer(tmp_path).load_latest()["state"]["step"] == 1
    set_aside_previous(tmp_path)  # what training does first under resume.mode=never
    previous = list(tmp_path.glob("previous-*"))
    assert len(previous) == 1 and (previous[0] / "checkpoints" / "step-1" / "manifest.json").exists()
    assert not (tmp_path / "metrics.jsonl").exists() and checkpointer(tmp_path).load_latest() is None


def test_rewind_metrics_keeps_one_row_per_step(tmp_path):
    rows = [{"step": 0, "eval_loss": 1}, {"step": 1, "loss": 1}, {"step": 2, "loss": 2}, {"step": 2, "eval_loss": 2},
            {"step": 3, "loss": 3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    (tmp_path / "ranks").mkdir()
    (tmp_path / "ranks" / "rank1.jsonl").write_text('{"step": 2, "samples": [1]}\n{"step": 3, "samples": [2]}\n')
    assert rewind_metrics(tmp_path, 2, total_steps=5) == 3  # step 3 twice and the cut line
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows[:4]
    assert (tmp_path / "ranks" / "rank1.jsonl").read_text() == '{"step": 2, "samples": [1]}\n'
    rewind_metrics(tmp_path, 2, total_steps=2)  # the final eval of a finished step is written again
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows[:3]


