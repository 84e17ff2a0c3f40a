"""Saves that do not stall training: a background save's states are the save step's, bit for bit, however long
the copy off the device and the writer take and whatever training does meanwhile. On the CPU the writer is
held back from the test side; on a GPU (tests skipped without one) the copy stream is, so the next optimizer
step is queued before the copies have read the weights it updates."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lora_launch.run.checkpoints import verify
from lora_launch.train import checkpoint as module
from lora_launch.train.host_copy import HostBuffers, _managed_on_device
from lora_launch.train.state import Progress, RngState, SchedulerState, TrainableState
from support.ckpt import OneProcess, Training, checkpointer

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def held_writer(monkeypatch) -> threading.Event:
    """Every checkpoint's file writing waits until the returned event is set."""
    gate, write = threading.Event(), module._write_rank_files

    def held(*args, **kwargs):
        assert gate.wait(timeout=60)
        return write(*args, **kwargs)

    monkeypatch.setattr(module, "_write_rank_files", held)
    return gate


def saved_tensors(path) -> dict:
    return load_file(str(path / "trainable.safetensors"))


def assert_same(saved: dict, expected: dict) -> None:
    assert sorted(saved) == sorted(expected)
    for k in expected:
        assert saved[k].dtype == expected[k].dtype and torch.equal(saved[k], expected[k].cpu()), k


def test_training_goes_on_while_a_slow_writer_writes_the_step_it_was_given(tmp_path, monkeypatch):
    t = Training()
    t.steps(2)
    at_once = checkpointer(tmp_path / "at_once", t).save(2)
    expected = t.states["trainable"].state_dict()["tensors"]  # copies on the CPU, taken now
    gate = held_writer(monkeypatch)
    ck = checkpointer(tmp_path / "bg", t, every=2, background_min_mib=0)
    assert ck.maybe_save(2) is None and ck.pending is not None
    t.steps(3)
    assert ck.maybe_save(3) is None and ck.pending.thread.is_alive()  # still writing: not committed, not waited for
    assert not all(torch.equal(p, expected[f"param/{n}"]) for n, p in t.model.named_parameters() if p.requires_grad)
    gate.set()
    path = ck.finish()
    verify(path)
    assert_same(saved_tensors(path), expected)
    for name in ("trainable.safetensors", "state.json", "rng-rank0.safetensors", "rng-rank0.json"):
        assert (path / name).read_bytes() == (at_once / name).read_bytes(), name


def test_a_stop_while_a_save_is_in_flight_commits_it_then_saves_its_own_step(tmp_path, monkeypatch):
    t = Training()
    t.steps(2)
    at_2 = t.states["trainable"].state_dict()["tensors"]
    gate = held_writer(monkeypatch)
    ck = checkpointer(tmp_path, t, every=2, background_min_mib=0)
    ck.maybe_save(2)
    t.steps(1)
    at_3 = t.states["trainable"].state_dict()["tensors"]
    threading.Timer(0.3, gate.set).start()  # the writer finishes while the stop waits for it
    assert ck.maybe_save(3, force=True) == tmp_path / "checkpoints" / "step-3"
    assert [c["step"] for c in ck.take_commits()] == [2, 3] and ck.pending is None
    assert_same(saved_tensors(tmp_path / "checkpoints" / "step-2"), at_2)
    assert_same(saved_tensors(tmp_path / "checkpoints" / "step-3"), at_3)


def test_a_copy_on_the_cpu_is_taken_at_once_and_names_each_state_once():
    copy = HostBuffers().begin()
    live = torch.arange(4.0)
    taken = copy.take("param/w", live)
    live.add_(1)
    assert torch.equal(taken, torch.arange(4.0)) and taken.data_ptr() != live.data_ptr()
    with pytest.raises(ValueError, match="twice"):
        copy.take("param/w", live)
    copy.close()
    copy.hold(torch.optim.SGD([torch.nn.Parameter(live)], lr=0.1))  # nothing to wait for on the CPU
    copy.wait()
    copy.release()


def test_a_background_commit_leaves_deleting_what_retention_drops_to_the_next_save(tmp_path):
    t = Training()
    ck = checkpointer(tmp_path, t, every=1, background_min_mib=0)
    ckpt = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        t.steps(1)
        ck.maybe_save(step)
        ck.finish()
    assert [s for s, _ in ck.committed()] == [2, 3] and [p.name for p in ckpt.glob(".trash-*")] == [".trash-step-1"]
    t.steps(1)
    ck.maybe_save(4)
    ck.pending.thread.join()  # the writer deleted the last commit's trash
    assert not list(ckpt.glob(".trash-*"))
    ck.finish()
    t.steps(1)
    ck.maybe_save(5, force=True)  # a save at once deletes what it drops at once
    assert [s for s, _ in ck.committed()] == [4, 5] and not list(ckpt.glob(".trash-*"))
    assert (ckpt / "latest").read_text().strip() == "step-5"


def test_the_optimizer_step_after_a_save_waits_for_its_copies_once_before_it_updates(monkeypatch):
    """The hold's life on the CPU, with a stand-in for the CUDA event and stream."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    seen = []

    class Event:
        def wait(self, stream):
            seen.append(weight.detach().clone())  # what the copies read: not updated yet

        def synchronize(self):
            pass

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "training stream")
    copy = HostBuffers().begin()
    copy.event, copy.stream = Event(), SimpleNamespace(device=torch.device("cpu"))
    copy.hold(optimizer)
    for _ in range(2):
        weight.grad = torch.ones(3)
        optimizer.step()
    assert len(seen) == 1 and torch.equal(seen[0], torch.ones(3)) and torch.equal(weight.detach(), torch.zeros(3))
    copy.wait()
    copy.release()
    assert not optimizer._optimizer_step_pre_hooks


class SecondRank(OneProcess):
    process_index, num_processes, is_main_process = 1, 2, False


def test_a_rank_that_does_not_write_the_trainable_tensors_keeps_no_copy_of_them(tmp_path):
    t = Training()
    t.steps(1)
    ck = checkpointer(tmp_path, t)
    ck.accelerator, ck.rank, ck.world, ck.main = SecondRank(), 1, 2, False
    states = ck._take_states(ck.host.begin())
    assert states["trainable"]["tensors"] and all(v is None for v in states["trainable"]["tensors"].values())
    assert states["trainable"]["optimizer"] == {"keys": ["exp_avg", "exp_avg_sq"], "step": 1.0}
    assert set(states["rng"]["tensors"]) >= {"torch", "numpy"}


# ---- on a GPU ------------------------------------------------------------------------------------


class OnGpu:
    """A model on the GPU whose steps queue work without waiting for it (no host sync), with the states a
    checkpoint holds; `optim`: torch's AdamW or bitsandbytes' paged AdamW (states in managed memory)."""

    def __init__(self, optim: str = "adamw"):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1)).cuda()
        self.model[0].bias.requires_grad_(False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if optim == "paged":
            import bitsandbytes as bnb

            self.optimizer = bnb.optim.PagedAdamW32bit(params, lr=1e-3)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=1e-3)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
        self.progress = Progress(train_size=1000)
        self.states = {
            "trainable": TrainableState(self.model, self.optimizer),
            "scheduler": SchedulerState(self.scheduler),
            "rng": RngState(),
            "progress": self.progress,
        }

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.model(torch.randn(256, 1024, device="cuda")).pow(2).mean().backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.progress.step += 1


def slow_copy_stream(monkeypatch, seconds: float = 0.5) -> None:
    """The checkpointer's copy stream is busy for about `seconds` before each save's copies."""
    stream = HostBuffers.stream
    cycles = int(seconds * 2e9)  # clock cycles: about `seconds` at 2 GHz, longer at lower clocks

    def slow(self, device):
        s = stream(self, device)
        with torch.cuda.stream(s):
            torch.cuda._sleep(cycles)
        return s

    monkeypatch.setattr(HostBuffers, "stream", slow)


@GPU
@pytest.mark.parametrize("optim", ["adamw", "paged"])
def test_the_copy_takes_the_save_step_though_the_next_steps_are_queued_first(tmp_path, monkeypatch, optim):
    if optim == "paged":
        pytest.importorskip("bitsandbytes")
    t = OnGpu(optim)
    t.steps(3)
    expected = t.states["trainable"].state_dict()["tensors"]  # blocking copies: the step-3 values
    slow_copy_stream(monkeypatch)
    ck = checkpointer(tmp_path, t, every=3, background_min_mib=0)
    assert ck.maybe_save(3) is None
    assert not ck.pending.copy.event.query()  # the copies have not run yet, and the host did not wait for them
    if optim == "paged":  # its states are copied on the GPU too, not through the CPU
        assert any(getattr(s, "is_paged", False) for s in ck.pending.copy.sources)
    t.steps(2)  # its optimizer steps are queued behind the copies on the device, not run before them
    path = ck.finish()
    verify(path)
    assert_same(saved_tensors(path), expected)
    after = t.states["trainable"].state_dict()["tensors"]
    assert not any(torch.equal(after[k], expected[k]) for k in expected if k.startswith("param/"))


@GPU
def test_the_pinned_buffers_are_made_once_and_kept_across_saves(tmp_path):
    t = OnGpu()
    t.steps(1)
    ck = checkpointer(tmp_path, t, every=1, background_min_mib=0)
    ck.maybe_save(1)
    ck.finish()
    first = {k: b.data_ptr() for k, b in ck.host.buffers.items()}
    assert first and all(b.is_pinned() for b in ck.host.buffers.values())
    t.steps(1)
    ck.maybe_save(2)
    ck.finish()
    assert {k: b.data_ptr() for k, b in ck.host.buffers.items()} == first
    assert not t.optimizer._optimizer_step_pre_hooks  # the hold on the optimizer is gone once committed


@GPU
def test_paged_optimizer_states_are_read_on_the_gpu():
    bnb = pytest.importorskip("bitsandbytes")
    t = OnGpu("paged")
    t.steps(1)
    paged = [v for st in t.optimizer.state.values() for v in st.values() if getattr(v, "is_paged", False)]
    assert paged
    view = _managed_on_device(paged[0])
    assert view.is_cuda and view.data_ptr() == paged[0].data_ptr() and torch.equal(view.cpu(), paged[0])
    buffers = HostBuffers()  # a save makes the view once and finds it again at the next
    assert buffers.on_device("state", paged[0]) is buffers.on_device("state", paged[0])
    assert bnb is not None
