"""Resume with real processes: 2-rank runs on CPU killed with SIGKILL, stopped with SIGTERM or crashed inside a
checkpoint save, then re-run with the same command; their loss sequences must equal an uninterrupted run's
bit for bit. Each strategy gets different interruptions so the suite stays short on 2 cores."""

from __future__ import annotations

import json
import shutil
import signal
from collections import Counter

import pytest

from lora_launch.train.data import SampleStream
from support import inject
from support.cli import read_jsonl
from support.resume import (
    committed_steps,
    consumed_samples,
    eval_losses,
    kill_tree,
    launch,
    reference,
    sigterm_at,
    start,
    status,
    train_losses,
    train_size,
    under,
    wait_for_step,
)

pytestmark = pytest.mark.slow


def overrides(tiny, strategy: str, processes: int = 2) -> list[str]:
    return [*tiny["overrides"], *under(strategy, processes)]


def uninterrupted(tiny, tmp_path_factory, strategy: str) -> dict:
    """The losses of the same command run uninterrupted (one run per strategy, shared with test_signals)."""
    ref = reference(tiny, tmp_path_factory.getbasetemp(), under(strategy))
    assert [s for s, _ in ref["train"]] == list(range(1, 13))
    return ref


def assert_same_as(run, ref: dict) -> None:
    """Bitwise equal losses, one row per step (a resumed run must not leave the killed run's rows)."""
    assert train_losses(run) == ref["train"]
    assert eval_losses(run) == ref["eval"]
    assert status(run)["state"] == "finished"


def sigkill_at(run, args, step: int, env: dict | None = None) -> int:
    proc = start(run, args, env)
    seen = wait_for_step(run, proc, step)
    kill_tree(proc, signal.SIGKILL)
    assert status(run).get("state") == "running", "the kill came too late to interrupt the run"
    return seen


def test_ddp_sigkill_corrupt_checkpoint_and_crash_after_commit(tiny, tmp_path_factory, tmp_path):
    ref = uninterrupted(tiny, tmp_path_factory, "ddp")
    run, args = tmp_path / "run", overrides(tiny, "ddp")
    sigkill_at(run, args, 7)
    steps = committed_steps(run)
    assert len(steps) == 2
    # the newest checkpoint is damaged on disk: resume must notice and use the one before
    weights = run / "checkpoints" / f"step-{steps[-1]}" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x55
    weights.write_bytes(bytes(data))
    rc, log = launch(run, args, env=inject.env(CRASH_IN_SAVE="after_commit@9"))
    assert rc != 0 and "crashing at step 9" in log, log[-3000:]
    assert f"step-{steps[-1]}: trainable.safetensors is missing or does not match its checksum" in log
    assert committed_steps(run)[-1] == 9  # committed before the crash, `latest` not yet updated
    rc, log = launch(run, args)
    assert rc == 0, log[-3000:]
    assert "resumed from" in log and "step-9" in log
    assert_same_as(run, ref)

    rc, log = launch(run, args)  # the same command once more: finished, nothing to do
    assert rc == 0 and "already finished at step 12" in log, log[-2000:]
    assert_same_as(run, ref)

    # an explicit checkpoint with a different LoRA shape (one process: the world size may change)
    rc, log = launch(
        run, overrides(tiny, "ddp", processes=1) + [f"resume.mode={run / 'checkpoints' / 'step-9'}", "lora.r=16"]
    )
    assert rc != 0 and "lora.r: 8 -> 16" in log, log[-2000:]


def test_zero2_crash_while_ranks_write_then_sigterm_preemption(tiny, tmp_path_factory, tmp_path):
    ref = uninterrupted(tiny, tmp_path_factory, "zero2")
    # periodic saves written by a thread while training goes on (the reference saved at once)
    run, args = tmp_path / "run", overrides(tiny, "zero2") + ["checkpoint.background_min_mib=0"]
    rc, log = launch(run, args, env=inject.env(CRASH_IN_SAVE="after_rank_write@6"))
    assert rc != 0 and "crashing at step 6" in log, log[-3000:]
    assert "checkpoint of step 3 committed" in log and "in the background" in log, log[-3000:]
    assert committed_steps(run) == [3]  # step 6 was written, its commit never came

    rc, seconds = sigterm_at(run, args, 7)
    assert rc == 0 and seconds < 45  # the step, the save and torchrun's 30 s shutdown window at most
    st = status(run)
    assert st["state"] == "preempted" and committed_steps(run)[-1] == st["step"] >= 7

    rc, log = launch(run, args)
    assert rc == 0 and f"step-{st['step']}" in log, log[-3000:]
    assert_same_as(run, ref)


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_sigkill_and_world_size_changes(tiny, tmp_path_factory, tmp_path, strategy):
    ref = uninterrupted(tiny, tmp_path_factory, strategy)
    run, args = tmp_path / "run", overrides(tiny, strategy)
    sigkill_at(run, args, 5)
    other = tmp_path / "resized"
    shutil.copytree(run, other)

    rc, log = launch(run, args)
    assert rc == 0, log[-3000:]
    assert_same_as(run, ref)

    # 2 -> 1 process, preempted, then 1 -> 2: no sample repeated or skipped
    rc, _ = sigterm_at(other, overrides(tiny, strategy, processes=1), committed_steps(other)[-1] + 1)
    assert rc == 0 and status(other)["state"] == "preempted"
    log1 = (tmp_path / "resized.log").read_text()
    assert "world size changed: checkpoint written with world size 2, resuming with 1" in log1
    rc, log2 = launch(other, args)
    assert rc == 0, log2[-3000:]
    assert "world size changed: checkpoint written with world size 1, resuming with 2" in log2
    steps = consumed_samples(other)
    assert sorted(steps) == list(range(1, 13))
    stream = SampleStream(train_size(log2), seed=0)
    consumed = [i for s in sorted(steps) for i in steps[s]]
    assert Counter(consumed) == Counter(stream.index(p) for p in range(len(consumed)))


def test_a_checkpoint_moves_between_ddp_and_fsdp2(tiny, tmp_path_factory, tmp_path):
    """One run stopped and continued under ddp, fsdp2 (which crashes inside a save), fsdp2_offload and ddp
    again: every option saves and loads the same format, so the run trains on as an uninterrupted ddp run
    does (to float rounding: FSDP2 sums the gradient norm from its shards, in another order)."""
    ref = uninterrupted(tiny, tmp_path_factory, "ddp")
    run = tmp_path / "run"
    rc, _ = sigterm_at(run, overrides(tiny, "ddp"), 2)
    assert rc == 0 and status(run)["state"] == "preempted"
    rc, log = launch(run, overrides(tiny, "fsdp2"), env=inject.env(CRASH_IN_SAVE="after_rank_write@6"))
    assert rc != 0 and "crashing at step 6" in log, log[-3000:]
    assert 3 <= committed_steps(run)[-1] < 6  # step 6 was half written: never committed
    rc, _ = sigterm_at(run, overrides(tiny, "fsdp2_offload"), 8)
    assert rc == 0 and status(run)["state"] == "preempted"
    rc, log = launch(run, overrides(tiny, "ddp"))
    assert rc == 0, log[-3000:]
    whole = (tmp_path / "run.log").read_text()
    assert whole.count("checkpoint: resumed from") == 3, whole[-3000:]
    assert [s for s, _ in train_losses(run)] == [s for s, _ in ref["train"]]
    assert [loss for _, loss in train_losses(run)] == pytest.approx([loss for _, loss in ref["train"]], rel=1e-5)
    assert [loss for _, loss in eval_losses(run)] == pytest.approx([loss for _, loss in ref["eval"]], rel=1e-5)
    assert status(run)["state"] == "finished"


def test_fsdp2_hybrid_sharding_keeps_a_copy_per_group_and_resumes_flat(tiny, tmp_path):
    """4 processes as 2 copies of the model, each sharded over 2 (distributed.replicate=2, what several nodes
    get by default): ranks 0 and 2 hold the same shard, as do 1 and 3. Stopped, the run continues sharded over
    all 4 and trains as an uninterrupted 4-process ddp run does (to float rounding, as fsdp2 does)."""
    ref = tmp_path / "reference"
    rc, log = launch(ref, overrides(tiny, "ddp", processes=4))
    assert rc == 0, log[-3000:]
    run = tmp_path / "run"
    rc, _ = sigterm_at(run, overrides(tiny, "fsdp2", processes=4) + ["distributed.replicate=2"], 4)
    assert rc == 0 and status(run)["state"] == "preempted"
    assert json.loads((run / "fsdp2.json").read_text())["mesh"]["shape"] == [2, 2]
    audits = [read_jsonl(run / "ranks" / f"rank{r}.jsonl") for r in range(4)]
    for rows in zip(*audits):
        digests = [row["trainable_sha256"] for row in rows]
        assert digests[0] == digests[2] and digests[1] == digests[3], f"copies differ at step {rows[0]['step']}"
        assert digests[0] != digests[1], f"not sharded within a copy at step {rows[0]['step']}"
    steps_before = len(audits[0])
    rc, log = launch(run, overrides(tiny, "fsdp2", processes=4) + ["distributed.replicate=1"])
    assert rc == 0, log[-3000:]
    assert json.loads((run / "fsdp2.json").read_text())["mesh"]["shape"] == [4]
    digests = [read_jsonl(run / "ranks" / f"rank{r}.jsonl")[-1]["trainable_sha256"] for r in range(4)]
    assert len(set(digests)) == 4 and steps_before < 12  # flat: four different shards
    assert [s for s, _ in train_losses(run)] == [s for s, _ in train_losses(ref)]
    assert [v for _, v in train_losses(run)] == pytest.approx([v for _, v in train_losses(ref)], rel=1e-5)
    assert [v for _, v in eval_losses(run)] == pytest.approx([v for _, v in eval_losses(ref)], rel=1e-5)
    assert status(run)["state"] == "finished"
