"""Periodic checkpoints and resume: the one place that decides when a save is due, when a save counts,
and what may be loaded. The checkpointer is built with the Stateful parts it saves (train/state.py) and
loads a checkpoint back into those same parts.

run.dir/checkpoints/ holds:
  step-N/                   a complete checkpoint; the rename from its staging name is the commit
    adapter_config.json, adapter_model.safetensors
                            the LoRA weights as a PEFT adapter, loadable as is (PeftModel.from_pretrained,
                            evaluation harnesses); not read on resume
    trainable.safetensors   "trainable": full (unsharded) LoRA weights and optimizer state, by name
    state.json              "progress" (step, data position, tokens, epoch), the world size, "trainable"'s
                            optimizer step count, "scheduler", "scaler"
    rng-rank{R}.safetensors, rng-rank{R}.json   "rng" of rank R
    manifest.json           written last: config, versions, fingerprints, sha256 of every file
  .staging-step-N/          a save in progress: never loaded, removed by the next save
  .trash-step-N/            a checkpoint dropped by a background save's commit: deleted by the next save
  latest                    name of the newest committed checkpoint (for people and tools)

Commit rule: every rank writes into the staging dir, a barrier, then rank 0 hashes every file,
writes the manifest, renames staging -> step-N, and only then updates `latest` and prunes. A crash
at any point leaves the previous step-N untouched.

Periodic saves write in the background (checkpoint.background): at step N every rank takes its states,
the device tensors copied into pinned host buffers on a stream of their own (train/host_copy.py: the
training thread does not wait for the copies; the optimizer's next step waits for them on the device
only), and a thread waits for those copies, then writes and hashes the files while training goes on.
Each later step asks whether every rank's thread is done (one tiny all-reduce while a save is pending);
the first step where all are runs the same barrier-and-commit as above, whose retention renames what it
drops to .trash-step-N for the next save's thread to delete. A stop, the last step, and the next due save
first finish a pending one, so at most one save is in flight and the last one is always committed.

A checkpoint is loadable only if its manifest lists every file the loader reads, each checksummed;
loading falls back to an older checkpoint when one fails, and refuses (rather than start over) when
every one does.

Every rank writes into the same directory: with several nodes, run.dir must be shared storage.
The stored form does not depend on the world size or the ZeRO stage, so a run saved with 2
processes resumes with 1 (and back): the data position is a global sample index, and a rank the
saved run did not have takes the RNG of rank (R mod the saved world size).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig

from lora_launch.conf.schema import plain
from lora_launch.run.checkpoints import FORMAT, CheckpointError, choose, loaded_files, sha256_file
from lora_launch.run.compat import config_changes, resume_refusal
from lora_launch.run.process import run_to_end
from lora_launch.run.rundir import committed_checkpoints, fsync_path, write_atomic, write_json
from lora_launch.train.host_copy import HostBuffers, HostCopy
from lora_launch.train.zero import full_shape, trainable

# ---- files --------------------------------------------------------------------------------------


def _save_tensors(path: Path, tensors: dict) -> None:
    """safetensors file, fsynced. A write error (a full disk) is an OSError naming the file: safetensors'
    own error names neither the file nor anything a caller can test."""
    import errno
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path))
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        number = int(code.group(1)) if code else errno.EIO
        raise OSError(number, os.strerror(number), str(path)) from None
    fsync_path(path)


def _load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---- what identifies a run: config, data, tokenizer, model ----------------------------------------


def fingerprints(splits, tokenizer, model) -> dict:
    """Hashes of the tokenised dataset and tokenizer, and the base model's and adapters' shapes."""
    from lora_launch.data.samples import dataset_fingerprint

    vocab = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens])
    base = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    arch = {
        k: getattr(base, k, None)
        for k in (
            "model_type",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        )
    }
    lora = {name: list(full_shape(p)) for name, p in trainable(model)}
    return {
        "data": dataset_fingerprint(splits),
        "tokenizer": hashlib.sha256(vocab.encode()).hexdigest(),
        "model": arch,
        "lora_shapes": lora,
    }


@functools.cache  # what this process imported: read once, not at every commit
def _versions() -> dict:
    out = {}
    for pkg in ("lora-launch", "torch", "transformers", "peft", "accelerate", "deepspeed", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


@functools.cache  # the code this process runs: read once (a subprocess), not at every commit
def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = run_to_end(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def changes(saved: dict, now: dict, allow: list[str]) -> list[str]:
    """What differs between a checkpoint's manifest and this run, beyond what may change."""
    out = config_changes(saved["config"], now["config"], allow)
    fs, fn = saved["fingerprints"], now["fingerprints"]
    if fs["lora_shapes"] != fn["lora_shapes"]:
        out.append("LoRA shape (adapter parameter names or shapes differ)")
    if fs["model"] != fn["model"]:
        out.append(f"model architecture: {fs['model']} -> {fn['model']}")
    for what in ("tokenizer", "data"):
        if fs[what] != fn[what] and what not in allow:
            out.append(f"{what} (the {'vocabulary' if what == 'tokenizer' else 'tokenised dataset'} hash differs)")
    return out


# ---- the states in the files of format 1 ---------------------------------------------------------

STATES = ("trainable", "scheduler", "rng", "progress")  # and "scaler" where the run has a loss scaler
PROGRESS = ("step", "position", "tokens_seen", "epoch")


def _shared_files(states: dict, world: int) -> tuple[dict, dict]:
    """trainable.safetensors and state.json, from the state dicts every rank holds alike."""
    state = {
        **states["progress"],
        "world_size": world,
        "optimizer": states["trainable"]["optimizer"],
        "scheduler": states["scheduler"],
        "scaler": states.get("scaler"),
    }
    return states["trainable"]["tensors"], state


def _adapter_tensors(peft_model, tensors: dict) -> dict:
    """The saved LoRA weights named as PEFT names them in adapter_model.safetensors."""
    from peft import get_peft_model_state_dict

    params = {name[len("param/") :]: t for name, t in tensors.items() if name.startswith("param/")}
    adapter = get_peft_model_state_dict(peft_model, state_dict=params)
    return {k: v.contiguous() for k, v in adapter.items()}


def _read_states(path: Path, rank: int) -> tuple[dict, dict]:
    """The state dicts checkpoint `path` holds for `rank`, and its state.json."""
    state = json.loads((path / "state.json").read_text())
    r = rank % state["world_size"]  # a rank the saved run did not have takes a saved rank's RNG
    rng = {
        "tensors": _load_tensors(path / f"rng-rank{r}.safetensors"),
        **json.loads((path / f"rng-rank{r}.json").read_text()),
    }
    states = {
        "trainable": {"tensors": _load_tensors(path / "trainable.safetensors"), "optimizer": state["optimizer"]},
        "scheduler": state["scheduler"],
        "scaler": state.get("scaler"),
        "rng": rng,
        "progress": {k: state[k] for k in PROGRESS},
    }
    return states, state


def _write_rank_files(staging: Path, states: dict, rank: int, world: int, adapter: dict | None, adapter_config) -> dict:
    """This rank's files of one checkpoint (rank 0 also the shared ones and the adapter); returns
    {file: sha256} of what it wrote. Reads only the host copies in `states`: safe in a thread while training goes on."""
    written = []
    rng = states["rng"]
    _save_tensors(staging / f"rng-rank{rank}.safetensors", rng["tensors"])
    write_json(staging / f"rng-rank{rank}.json", {k: v for k, v in rng.items() if k != "tensors"}, fsync=True)
    written += [f"rng-rank{rank}.safetensors", f"rng-rank{rank}.json"]
    if rank == 0:
        tensors, state = _shared_files(states, world)
        _save_tensors(staging / "trainable.safetensors", tensors)
        write_json(staging / "state.json", state, fsync=True)
        written += ["trainable.safetensors", "state.json"]
        if adapter is not None:
            _save_tensors(staging / "adapter_model.safetensors", adapter)
            adapter_config.save_pretrained(str(staging))
            written += ["adapter_model.safetensors", "adapter_config.json"]
    return {name: sha256_file(staging / name) for name in written}


def _estimated_bytes(fingerprints: dict) -> int:
    """What a save writes, near enough: fp32 LoRA weights and two optimizer states each. From the adapter's
    full shapes, so every rank (whatever ZeRO gave it) comes to the same figure and takes the same path."""
    numel = sum(math.prod(shape) for shape in fingerprints["lora_shapes"].values())
    return 3 * 4 * numel


def _to_trash(path: Path) -> None:
    """Rename checkpoint dir `path` (step-N) to .trash-step-N beside it, out of every listing, to be deleted later."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)  # an earlier one of the same step not deleted yet
    path.rename(trash)


def _remove_trash(directory: Path) -> None:
    for path in directory.glob(".trash-step-*"):
        shutil.rmtree(path, ignore_errors=True)


def _not_written(key: str, tensor):
    """The trainable tensors on a rank that does not write them: no copy is kept."""
    return None


class _Pending:
    """A save whose files a thread is writing: its step, staging dir, pause, copies off the device, and the
    thread's outcome."""

    def __init__(self, step: int, staging: Path, paused: float, work, copy: HostCopy):
        import threading

        self.step, self.staging, self.paused, self.copy = step, staging, paused, copy
        self.t0 = time.perf_counter()
        self.hashes: dict = {}
        self.error: BaseException | None = None
        self.seconds = 0.0

        def run():
            try:
                self.hashes = work()
            except BaseException as e:  # handed to the training thread at the commit
                self.error = e
            self.seconds = time.perf_counter() - self.t0

        self.thread = threading.Thread(target=run, name=f"checkpoint-step-{step}", daemon=True)
        self.thread.start()

    def done(self) -> bool:
        return not self.thread.is_alive()


# ---- the checkpointer ----------------------------------------------------------------------------


class Checkpointer:
    """Saves the states of one run directory and loads them back; every rank holds one and calls it together.

    `states` maps the names in STATES (and "scaler") to Stateful parts; loading puts them back in that order.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, accelerator, states: dict, fingerprints: dict, adapter_of=None):
        if set(STATES) - set(states) or set(states) - {*STATES, "scaler"}:
            raise ValueError(f"a checkpoint holds the states {STATES} (and scaler), not {sorted(states)}")
        self.cfg = cfg
        self.every = cfg.checkpoint.every_steps
        self.keep_last = cfg.checkpoint.keep_last
        self.run_dir = run_dir
        self.dir = run_dir / "checkpoints"
        self.accelerator = accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.main = accelerator.is_main_process
        self.states = states
        self.fingerprints = fingerprints
        self.adapter_of = adapter_of  # the PEFT model, for the adapter files of each checkpoint
        self.background = cfg.checkpoint.background
        self.background_min_bytes = cfg.checkpoint.background_min_mib * 2**20
        self.pending: _Pending | None = None  # a background save not committed yet
        self.host = HostBuffers()  # pinned buffers the states are copied into, kept from one save to the next
        # the last committed save: {"step", "seconds" (training paused), "bytes", "background" (whether a
        # thread wrote it), "write_seconds" (the thread's time)}; `commits` holds each one until the log takes it
        self.last_save: dict = {}
        self.commits: list[dict] = []

    def _say(self, message: str) -> None:
        if self.main:
            print(f"checkpoint: {message}", flush=True)

    def manifest(self, step: int) -> dict:
        """What identifies this run: resolved config, versions, git commit, fingerprints."""
        return {
            "format": FORMAT,
            "step": step,
            "world_size": self.world,
            "time": time.time(),
            "config": plain(self.cfg),
            "versions": _versions(),
            "git_commit": _git_commit(),
            "fingerprints": self.fingerprints,
        }

    # ---- save ----

    def maybe_save(self, step: int, force: bool = False) -> Path | None:
        """After optimizer step `step`: commit a background save every rank has finished writing; then
        save if checkpoint.every_steps makes one due (in the background when it is large enough) or `force`
        (a stop, the last step) asks (at once). Returns the directory of the checkpoint this call committed."""
        committed = self._commit_pending(wait=False)
        if force:
            return self.save(step)
        if self.every > 0 and step % self.every == 0:
            return self.save(step, background=self.background) or committed
        return committed

    def take_commits(self) -> list[dict]:
        """The saves committed since the last call, oldest first (their `last_save` records), for the log."""
        commits, self.commits = self.commits, []
        return commits

    def finish(self) -> Path | None:
        """Wait for a background save and commit it (every rank calls it); its directory, or None."""
        return self._commit_pending(wait=True)

    def save(self, step: int, background: bool = False) -> Path | None:
        """Checkpoint step-`step` of the states from every rank. Committed now (returns its directory), or,
        with `background` and states of at least checkpoint.background_min_mib, written by a thread and
        committed by a later call (returns None)."""
        self._commit_pending(wait=True)  # at most one save in flight: its host buffers are free again
        t0 = time.perf_counter()
        copy = self.host.begin()
        states = self._take_states(copy)
        staging = self.dir / f".staging-step-{step}"
        if self.main:
            shutil.rmtree(staging, ignore_errors=True)  # left by a crash during an earlier save
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        peft_model = self.adapter_of if self.main else None
        config = self.adapter_of.peft_config["default"] if self.adapter_of is not None else None

        def write() -> dict:
            copy.wait()  # the copies off the device are done: `states` holds the values of step `step`
            if self.main:
                _remove_trash(self.dir)  # what the last background commit dropped
            adapter = None if peft_model is None else _adapter_tensors(peft_model, states["trainable"]["tensors"])
            return _write_rank_files(staging, states, self.rank, self.world, adapter, config)

        if background and _estimated_bytes(self.fingerprints) >= self.background_min_bytes:
            self.pending = _Pending(step, staging, time.perf_counter() - t0, write, copy)
            return None
        try:
            hashes = write()
        except OSError:  # a full disk: give back what this save took; the committed checkpoints are untouched
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            copy.wait()
            copy.release()
        return self._finish_commit(
            staging, step, hashes, paused=time.perf_counter() - t0, background=False, write_seconds=0.0
        )

    def _take_states(self, copy: HostCopy) -> dict:
        """This rank's states at this step, the trainable tensors through `copy` (only on the rank that writes
        them); the optimizer's next step waits for the copies. A collective under ZeRO and FSDP2."""
        states = {}
        for name, part in self.states.items():
            if name == "trainable":
                states[name] = part.state_dict(to_host=copy.take if self.main else _not_written)
            else:
                states[name] = part.state_dict()
        copy.close()
        copy.hold(self.states["trainable"].updater)
        return states

    def _all_done(self) -> bool:
        """Whether every rank's thread has finished writing the pending save (a collective while one is pending)."""
        done = self.pending.done()
        if self.world == 1:
            return done
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if done else 0], device=self.accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _commit_pending(self, wait: bool) -> Path | None:
        """Commit the pending background save when every rank has written it (`wait`: block until then)."""
        pending = self.pending
        if pending is None or not (wait or self._all_done()):
            return None
        self.pending = None
        t0 = time.perf_counter()
        pending.thread.join()
        pending.copy.wait()  # done already, unless the thread failed before it waited
        pending.copy.release()
        if pending.error is not None:
            shutil.rmtree(pending.staging, ignore_errors=True)
            raise pending.error
        return self._finish_commit(
            pending.staging,
            pending.step,
            pending.hashes,
            paused=pending.paused + time.perf_counter() - t0,
            background=True,
            write_seconds=pending.seconds,
        )

    def _finish_commit(
        self, staging: Path, step: int, hashes: dict, paused: float, background: bool, write_seconds: float
    ) -> Path:
        """Barrier, rank 0 commits, barrier; records what the save cost."""
        t0 = time.perf_counter()
        acc = self.accelerator
        acc.wait_for_everyone()
        final = self._commit(staging, step, hashes, background) if self.main else self.dir / f"step-{step}"
        acc.wait_for_everyone()
        self.last_save = {
            "step": step,
            "seconds": paused + time.perf_counter() - t0,
            "background": background,
            "write_seconds": write_seconds,
            "bytes": sum(f.stat().st_size for f in final.iterdir()) if self.main else 0,
        }
        self.commits.append(self.last_save)
        return final

    def _commit(self, staging: Path, step: int, hashes: dict, background: bool = False) -> Path:
        """Rank 0: the manifest, the rename (the commit itself), then `latest` and retention (a `background`
        save's commit leaves deleting what it drops to the next save's writer: training waits for the commit)."""
        self._write_manifest(staging, step, hashes)
        final = self._rename_committed(staging, step)
        write_atomic(self.dir / "latest", final.name + "\n")
        self._prune(step, defer_delete=background)  # also removes a step-N this one replaced
        return final

    def _write_manifest(self, staging: Path, step: int, hashes: dict) -> None:
        """Rank 0: the manifest in the staging dir (hashes the writers computed, the rest read now), synced."""
        expected = set(loaded_files(self.world))
        present = {f.name for f in staging.iterdir()}
        if expected - present:
            raise CheckpointError(
                f"{staging}: ranks did not write {sorted(expected - present)}; "
                "run.dir must be on a filesystem every node shares"
            )
        manifest = self.manifest(step)
        manifest["files"] = {
            name: {"sha256": hashes.get(name) or sha256_file(staging / name), "bytes": (staging / name).stat().st_size}
            for name in sorted(present)
        }
        write_json(staging / "manifest.json", manifest, fsync=True)
        fsync_path(staging)

    def _rename_committed(self, staging: Path, step: int) -> Path:
        """Rank 0: staging -> step-N, synced: from here on the checkpoint counts."""
        final = self.dir / f"step-{step}"
        if final.exists():  # from an abandoned later part of this run (see _prune); _prune removes it
            _to_trash(final)
        staging.rename(final)
        fsync_path(self.dir)
        return final

    def _prune(self, step: int, defer_delete: bool = False) -> None:
        """Keep the keep_last newest complete checkpoints up to `step`; drop later ones and leftovers
        (`defer_delete`: a dropped checkpoint is renamed to .trash-step-N now and deleted by the next save).

        Checkpoints after `step` exist only when this run resumed from an older one (a corrupt
        newest, or resume.mode=PATH); the run has now replaced that future.
        """
        done = self.committed()
        later = [p for s, p in done if s > step]
        older = [p for s, p in done if s <= step][: -self.keep_last]
        for path in later + older:
            if defer_delete:
                _to_trash(path)
            else:
                shutil.rmtree(path, ignore_errors=True)
        for path in self.dir.glob(".staging-step-*"):
            shutil.rmtree(path, ignore_errors=True)
        if not defer_delete:
            _remove_trash(self.dir)
        if later:
            self._say(f"removed checkpoints after step {step} of an abandoned continuation: {[p.name for p in later]}")

    # ---- load ----

    def committed(self) -> list[tuple[int, Path]]:
        """(step, dir) of every committed checkpoint (has its manifest), oldest first."""
        return committed_checkpoints(self.run_dir)

    def _choose(self) -> Path | None:
        found = choose(self.run_dir, self.cfg.resume.mode, say=self._say)
        return None if found is None else found[0]

    def _agree_on_checkpoint(self) -> Path | None:
        """The checkpoint every rank loads: rank 0 chooses it (resume.mode) and checks it may be resumed."""
        from accelerate.utils import broadcast_object_list

        box = [None, None]
        if self.main:
            try:
                path = self._choose()
                if path is not None:
                    self._check_compatible(path)
                box = [str(path) if path else None, None]
            except CheckpointError as e:
                box = [None, str(e)]
        if self.world > 1:
            broadcast_object_list(box, from_process=0)
        path, error = box
        if error:
            raise CheckpointError(error)
        return None if path is None else Path(path)

    def _check_compatible(self, path: Path) -> None:
        saved = json.loads((path / "manifest.json").read_text())
        now = self.manifest(saved["step"])
        diff = changes(saved, now, list(self.cfg.resume.allow_changes))
        if diff:
            raise CheckpointError(resume_refusal(path, diff))

    def load(self) -> int | None:
        """Load the checkpoint resume.mode picks into the states; returns its step, or None to start fresh."""
        path = self._agree_on_checkpoint()
        if path is None:
            return None
        saved, state = _read_states(path, self.rank)
        for name, part in self.states.items():
            if saved[name] is not None:  # a checkpoint without a loss scaler leaves this run's as it is
                part.load_state_dict(saved[name])
        if state["world_size"] != self.world:
            self._say(
                f"world size changed: checkpoint written with world size {state['world_size']}, resuming "
                f"with {self.world}; the data continues at global sample {state['position']}, "
                "losses will not match a run at the old size bit for bit"
            )
        self._say(f"resumed from {path} (step {state['step']}, epoch {state['epoch']}, sample {state['position']})")
        return state["step"]
