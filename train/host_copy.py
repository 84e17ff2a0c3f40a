"""A save's copy of the states off the device, without stopping training for it.

On CUDA each device tensor is copied into a pinned host buffer kept for it across saves (pinning hundreds of
MiB takes longer than copying them), on a CUDA stream of the checkpointer's own that first waits for the work
already queued on the training stream; an event marks the end of the copies. The thread that writes the
files waits on that event; the training thread does not wait at all. Because the copies read the live
weights and optimizer state, the optimizer's next step waits for the event on the device (`hold`: a stream
wait, no host sync), so what is copied is the state of the save's step; forward and backward of the next
step, which only read them, overlap the copies. The source tensors stay referenced until the copies are
done, so the caching allocator cannot hand their memory to the training stream while the copy stream reads it.

bitsandbytes' paged optimizer states are CPU tensors over CUDA managed memory that lives on the GPU while it
trains: they are read there, through a CUDA view of the same memory, like any device tensor (reading them
through the CPU would move their pages to the host and back). Other tensors off CUDA (CPU training, the
CPU-offloaded gathers of FSDP2, RNG states) are cloned at once.
"""

from __future__ import annotations

import torch


class HostBuffers:
    """Pinned host buffers by state name (a new one only when a name's shape or dtype changes) and the copy
    stream of each device; one per checkpointer, used by one save at a time."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.views: dict[str, torch.Tensor] = {}  # CUDA views of paged states by name: each takes ~40 us to make

    def begin(self) -> HostCopy:
        """A new save's copies; the previous save's must be done (waited on) before this one takes a name again."""
        return HostCopy(self)

    def buffer(self, key: str, like: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = self.buffers[key] = torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
        return buf

    def on_device(self, key: str, paged: torch.Tensor) -> torch.Tensor:
        """`paged`'s memory as a CUDA tensor (`_managed_on_device`), the one made at an earlier save while the
        state is where it was."""
        view = self.views.get(key)
        if view is None or (view.data_ptr(), view.shape, view.dtype) != (paged.data_ptr(), paged.shape, paged.dtype):
            view = _managed_on_device(paged)
            if view.is_cuda:
                self.views[key] = view
        return view

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device=device)
        return self.streams[device]


class HostCopy:
    """One save's copies: `take` each tensor, `close`, `hold` the optimizer; then `wait` (in any thread) before
    reading what `take` returned, and `release` (in the training thread) once the save is committed."""

    def __init__(self, buffers: HostBuffers):
        self.buffers = buffers
        self.stream: torch.cuda.Stream | None = None
        self.event: torch.cuda.Event | None = None
        self.sources: list[torch.Tensor] = []  # read by the copy stream: kept alive until the copies are done
        self.taken: set[str] = set()
        self._hold = None

    def take(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`'s values in host memory: a clone now for a CPU tensor; for a CUDA tensor, `key`'s pinned
        buffer, filled by the copy stream (read it after `wait`)."""
        if key in self.taken:  # each name has one buffer
            raise ValueError(f"state {key!r} taken twice in one save")
        self.taken.add(key)
        source = tensor
        if getattr(tensor, "is_paged", False):  # an attribute of the tensor object itself: before any detach()
            tensor = self.buffers.on_device(key, tensor)
        tensor = tensor.detach()
        if tensor.device.type != "cuda":
            return tensor.clone()
        if self.stream is None:
            self.stream = self.buffers.stream(tensor.device)
            self.stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the step's last writes first
        buf = self.buffers.buffer(key, tensor)
        with torch.cuda.stream(self.stream):
            buf.copy_(tensor, non_blocking=True)
        self.sources += [source, tensor]
        return buf

    def close(self) -> None:
        """Mark the end of the copies (after the last `take`)."""
        if self.stream is not None:
            self.event = torch.cuda.Event(blocking=True)  # a waiting writer thread sleeps rather than spins
            self.event.record(self.stream)

    def hold(self, optimizer: torch.optim.Optimizer) -> None:
        """Make `optimizer`'s next step wait, on the device, until the copies are done: they read the weights and
        states that step updates in place."""
        if self.event is None:
            return
        event, device, waited = self.event, self.stream.device, []

        def wait_for_copies(*_):
            if not waited:
                event.wait(torch.cuda.current_stream(device))  # the training stream waits; the host goes on
                waited.append(True)

        self._hold = optimizer.register_step_pre_hook(wait_for_copies)

    def wait(self) -> None:
        """Block until the copies are done (any thread); then what `take` returned holds the save's states."""
        if self.event is not None:
            self.event.synchronize()
        self.sources.clear()

    def release(self) -> None:
        """Drop the optimizer hook (the training thread, not inside a step: hooks are not removed while torch
        runs them). Call after `wait`."""
        if self._hold is not None:
            self._hold.remove()
            self._hold = None


# the __cuda_array_interface__ names of the dtypes bitsandbytes keeps paged states in
_TYPESTR = {torch.float32: "<f4", torch.float16: "<f2", torch.uint8: "|u1", torch.int8: "|i1"}


def _managed_on_device(tensor: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor over the managed memory of a bitsandbytes paged tensor (a CPU tensor by torch's reckoning,
    marked `is_paged`, on GPU `page_deviceid`); the tensor itself where no such view can be made."""
    typestr = _TYPESTR.get(tensor.dtype)
    if typestr is None or not tensor.is_contiguous() or not torch.cuda.is_available():
        return tensor

    class Interface:
        __cuda_array_interface__ = {
            "shape": tuple(tensor.shape),
            "typestr": typestr,
            "data": (tensor.data_ptr(), False),
            "version": 2,
        }

    try:
        view = torch.as_tensor(Interface(), device=torch.device("cuda", getattr(tensor, "page_deviceid", None) or 0))
    except (RuntimeError, TypeError, ValueError):  # memory this torch does not take for CUDA memory: read on the CPU
        return tensor
    return view if view.data_ptr() == tensor.data_ptr() else tensor
