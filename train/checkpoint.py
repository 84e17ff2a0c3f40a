"""Periodic checkpoints and resume: the one place that decides what is saved, when a save counts,
and what may be loaded.

run.dir/checkpoints/ holds:
  step-N/                   a complete checkpoint; the rename from its staging name is the commit
    trainable.safetensors   full (unsharded) LoRA weights and per-parameter optimizer state, by name
    state.json              step, data position, scheduler, optimizer step count, grad scaler
    rng-rank{R}.safetensors, rng-rank{R}.json   RNG states of rank R
    manifest.json           written last: config, versions, fingerprints, sha256 of every file
  .staging-step-N/          a save in progress: never loaded, removed by the next save
  latest                    name of the newest committed checkpoint (for people and tools)

Commit rule: every rank writes into the staging dir, a barrier, then rank 0 hashes every file,
writes the manifest, renames staging -> step-N, and only then updates `latest` and prunes. A crash
at any point leaves the previous step-N untouched; loading checks the manifest's checksums and
falls back to an older checkpoint when one fails.

Every rank writes into the same directory: with several nodes, run.dir must be shared storage.
The stored form does not depend on the world size or the ZeRO stage, so a run saved with 2
processes resumes with 1 (and back), and the data position is a global sample index.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lora_launch.conf.schema import redact
from lora_launch.run.compat import config_changes, resume_refusal
from lora_launch.run.rundir import committed_checkpoints, fsync_path, write_atomic, write_json

FORMAT = 1
CRASH_ENV = "LORA_LAUNCH_CRASH_IN_SAVE"  # tests: `phase` or `phase@step`, see _crash_point


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and what to do."""


# ---- files --------------------------------------------------------------------------------------

def _save_tensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    fsync_path(path)


def _load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _crash_point(phase: str, step: int, rank: int) -> None:
    """Die here if CRASH_ENV names this phase (and step): a test hook for crashes inside a save.

    Rank 0 kills its launcher parent and itself with SIGKILL, like a lost node: under torchrun the
    other ranks die with their parent (train/__main__.py arms PR_SET_PDEATHSIG).
    """
    spec = os.environ.get(CRASH_ENV, "")
    name, _, at = spec.partition("@")
    if name != phase or rank != 0 or (at and int(at) != step):
        return
    print(f"checkpoint: {CRASH_ENV}={spec}: crashing at step {step}", flush=True)
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


# ---- what identifies a run: config, data, tokenizer, model ----------------------------------------

def fingerprints(splits, tokenizer, model) -> dict:
    """Hashes of the tokenised dataset and tokenizer, and the base model's and adapters' shapes."""
    from lora_launch.train.data import dataset_fingerprint

    vocab = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens])
    base = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    arch = {k: getattr(base, k, None) for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads")}
    lora = {name: list(_full_shape(p)) for name, p in trainable(model)}
    return {"data": dataset_fingerprint(splits), "tokenizer": hashlib.sha256(vocab.encode()).hexdigest(),
            "model": arch, "lora_shapes": lora}


def _versions() -> dict:
    out = {}
    for pkg in ("lora-launch", "torch", "transformers", "peft", "accelerate", "deepspeed", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
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


# ---- trainable state, in a world-size-independent form ---------------------------------------------

def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every trainable parameter of the unwrapped model, in a fixed order."""
    while hasattr(model, "module"):  # DDP / DeepSpeed engine
        model = model.module
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _full_shape(p) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def _is_zero(p) -> bool:
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _torch_optimizer(optimizer):
    # accelerate's wrapper -> (DeepSpeed's ZeRO optimizer ->) the torch optimizer that holds the state
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _state_keys_of(optimizer) -> list[torch.Tensor]:
    """The tensors the torch optimizer's state is keyed by: the parameters, or ZeRO's fp32 partitions."""
    while hasattr(optimizer, "optimizer"):
        if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3 (its param_groups are empty between steps)
            return list(optimizer.fp32_partitioned_groups_flat)
        if hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2
            return list(optimizer.single_partition_of_fp32_groups)
        optimizer = optimizer.optimizer
    return [q for group in optimizer.param_groups for q in group["params"]]


def _optimizer_layout(torch_opt) -> tuple[list[str], float]:
    state = next(iter(torch_opt.state.values()), None)
    if state is None:
        return [], 0.0
    keys = sorted(k for k, v in state.items() if k != "step" and torch.is_tensor(v) and v.dim() > 0)
    return keys, float(state["step"]) if "step" in state else 0.0


def gather_trainable(model, optimizer) -> tuple[dict, dict]:
    """Full LoRA weights and optimizer state by parameter name (a collective under ZeRO)."""
    torch_opt = _torch_optimizer(optimizer)
    keys, opt_step = _optimizer_layout(torch_opt)
    out = {}
    for name, p in trainable(model):
        if _is_zero(p):
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            out[f"param/{name}"] = safe_get_full_fp32_param(p)
            for k in keys:
                out[f"optim/{k}/{name}"] = safe_get_full_optimizer_state(p, k)
        else:
            out[f"param/{name}"] = p.detach()
            for k in keys:
                out[f"optim/{k}/{name}"] = torch_opt.state[p][k]
        for key in [f"param/{name}"] + [f"optim/{k}/{name}" for k in keys]:
            out[key] = out[key].detach().reshape(_full_shape(p)).cpu().clone()
    return out, {"keys": keys, "step": opt_step}


def _init_optimizer_state(optimizer, keys: list[str], step: float) -> None:
    # torch optimizers create their state lazily at the first step; resume needs it now
    torch_opt = _torch_optimizer(optimizer)
    for q in _state_keys_of(optimizer):
        st = torch_opt.state[q]
        old = st.get("step")
        st["step"] = torch.full_like(old, step) if torch.is_tensor(old) else torch.tensor(step, dtype=torch.float32)
        for k in keys:
            if k not in st:
                st[k] = torch.zeros_like(q, memory_format=torch.preserve_format)
    zero = optimizer
    while hasattr(zero, "optimizer") and not hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero = zero.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 maps parameters into the new state
        zero._lazy_init_hp_params_optimizer_state()


def _set_zero_weight(p, value: torch.Tensor) -> None:
    # the working copy the forward pass uses; DeepSpeed only refreshes it from fp32 after a step
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            p.data.copy_(value.reshape(p.shape).to(p.dtype))
    else:
        with torch.no_grad():
            p.data.copy_(value.reshape(p.shape).to(p.dtype))


def restore_trainable(model, optimizer, tensors: dict, opt_meta: dict) -> None:
    """Load full LoRA weights and optimizer state into the (maybe sharded) model and optimizer."""
    torch_opt = _torch_optimizer(optimizer)
    keys = opt_meta["keys"]
    _init_optimizer_state(optimizer, keys, opt_meta["step"])
    for name, p in trainable(model):
        value = tensors[f"param/{name}"]
        if tuple(value.shape) != tuple(_full_shape(p)):
            raise CheckpointError(f"LoRA shape of {name}: checkpoint {tuple(value.shape)}, "
                                  f"model {tuple(_full_shape(p))}")
        device = p.device
        if _is_zero(p):
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            safe_set_full_fp32_param(p, value.to(device))
            for k in keys:
                safe_set_full_optimizer_state(p, tensors[f"optim/{k}/{name}"].to(device), k)
            _set_zero_weight(p, value.to(device))
        else:
            with torch.no_grad():
                p.copy_(value.to(device))
                for k in keys:
                    torch_opt.state[p][k].copy_(tensors[f"optim/{k}/{name}"].to(device))


def restore_scheduler(scheduler, saved: dict) -> None:
    """Continue the saved schedule, from this run's base learning rates (optim.lr may be allowed to change)."""
    base = list(scheduler.base_lrs)
    scheduler.load_state_dict(saved)
    scheduler.base_lrs = base
    lrs = [b * f(scheduler.last_epoch) for b, f in zip(base, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _scaler_state(accelerator, optimizer) -> dict | None:
    if getattr(accelerator, "scaler", None) is not None:
        return {"torch": accelerator.scaler.state_dict()}
    ds_scaler = getattr(getattr(optimizer, "optimizer", None), "loss_scaler", None)
    if ds_scaler is not None and hasattr(ds_scaler, "cur_scale"):
        names = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
        return {"deepspeed": {n: float(getattr(ds_scaler, n)) for n in names if hasattr(ds_scaler, n)}}
    return None


def _restore_scaler(accelerator, optimizer, saved: dict | None) -> None:
    if not saved:
        return
    if "torch" in saved and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(saved["torch"])
    ds_scaler = getattr(getattr(optimizer, "optimizer", None), "loss_scaler", None)
    if "deepspeed" in saved and ds_scaler is not None:
        for n, v in saved["deepspeed"].items():
            old = getattr(ds_scaler, n)
            setattr(ds_scaler, n, type(old)(v) if not torch.is_tensor(old) else torch.full_like(old, v))


# ---- RNG ----------------------------------------------------------------------------------------

def rng_state() -> tuple[dict, dict]:
    """This process's RNG states: tensors (torch CPU, CUDA, numpy) and JSON (python, numpy)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, state, py_gauss = random.getstate()
    meta = {"python": [version, list(state), py_gauss], "numpy": [kind, pos, has_gauss, gauss]}
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    """Restore what rng_state() returned."""
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, py_gauss = meta["python"]
    random.setstate((version, tuple(state), py_gauss))


# ---- the checkpointer ----------------------------------------------------------------------------

class Checkpointer:
    """Saves and loads checkpoints of one run directory; every rank holds one and calls it together."""

    def __init__(self, cfg: DictConfig, run_dir: Path, accelerator):
        self.cfg = cfg
        self.every = cfg.checkpoint.every_steps
        self.keep_last = cfg.checkpoint.keep_last
        self.run_dir = run_dir
        self.dir = run_dir / "checkpoints"
        self.accelerator = accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.main = accelerator.is_main_process
        self.fingerprints: dict = {}
        self.last_save: dict = {}

    def _say(self, message: str) -> None:
        if self.main:
            print(f"checkpoint: {message}", flush=True)

    def due(self, step: int) -> bool:
        """Whether a checkpoint is due after optimizer step `step`."""
        return self.every > 0 and step % self.every == 0

    def manifest(self, step: int) -> dict:
        """What identifies this run: resolved config, versions, git commit, fingerprints."""
        return {"format": FORMAT, "step": step, "world_size": self.world, "time": time.time(),
                "config": redact(OmegaConf.to_container(self.cfg, resolve=True)),
                "versions": _versions(), "git_commit": _git_commit(), "fingerprints": self.fingerprints}

    # ---- save ----

    def save(self, step: int, state: dict) -> Path:
        """Write checkpoint step-`step` from every rank and commit it; returns its directory."""
        acc, t0 = self.accelerator, time.perf_counter()
        tensors, opt_meta = gather_trainable(state["model"], state["optimizer"])
        staging = self.dir / f".staging-step-{step}"
        if self.main:
            shutil.rmtree(staging, ignore_errors=True)  # left by a crash during an earlier save
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        rng_tensors, rng_meta = rng_state()
        _save_tensors(staging / f"rng-rank{self.rank}.safetensors", rng_tensors)
        write_json(staging / f"rng-rank{self.rank}.json", rng_meta, fsync=True)
        if self.main:
            _save_tensors(staging / "trainable.safetensors", tensors)
            write_json(staging / "state.json", {
                "step": step, "position": state["position"], "tokens_seen": state["tokens_seen"],
                "epoch": state["position"] // state["train_size"], "world_size": self.world,
                "optimizer": opt_meta, "scheduler": state["scheduler"].state_dict(),
                "scaler": _scaler_state(acc, state["optimizer"])}, fsync=True)
        _crash_point("after_rank_write", step, self.rank)
        acc.wait_for_everyone()
        final = self._commit(staging, step) if self.main else self.dir / f"step-{step}"
        acc.wait_for_everyone()
        self.last_save = {"step": step, "seconds": time.perf_counter() - t0,
                          "bytes": sum(f.stat().st_size for f in final.iterdir()) if self.main else 0}
        return final

    def _commit(self, staging: Path, step: int) -> Path:
        expected = {"trainable.safetensors", "state.json"} | {
            f"rng-rank{r}.{ext}" for r in range(self.world) for ext in ("safetensors", "json")}
        present = {f.name for f in staging.iterdir()}
        if expected - present:
            raise CheckpointError(f"{staging}: ranks did not write {sorted(expected - present)}; "
                                  "run.dir must be on a filesystem every node shares")
        manifest = self.manifest(step)
        manifest["files"] = {name: {"sha256": _sha256(staging / name), "bytes": (staging / name).stat().st_size}
                             for name in sorted(present)}
        write_json(staging / "manifest.json", manifest, fsync=True)
        fsync_path(staging)
        _crash_point("before_commit", step, self.rank)
        final = self.dir / f"step-{step}"
        old = None
        if final.exists():  # from an abandoned later part of this run (see _prune)
            old = final.rename(self.dir / f".trash-step-{step}")
        staging.rename(final)
        fsync_path(self.dir)
        _crash_point("after_commit", step, self.rank)
        write_atomic(self.dir / "latest", final.name + "\n")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._prune(step)
        return final

    def _prune(self, step: int) -> None:
        """Keep the keep_last newest complete checkpoints up to `step`; drop later ones and leftovers.

        Checkpoints after `step` exist only when this run resumed from an older one (a corrupt
        newest, or resume.mode=PATH); the run has now replaced that future.
        """
        done = self.committed()
        later = [p for s, p in done if s > step]
        older = [p for s, p in done if s <= step][:-self.keep_last]
        for path in later + older:
            shutil.rmtree(path, ignore_errors=True)
        for path in self.dir.glob(".staging-step-*"):
            shutil.rmtree(path, ignore_errors=True)
        for path in self.dir.glob(".trash-step-*"):
            shutil.rmtree(path, ignore_errors=True)
        if later:
            self._say(f"removed checkpoints after step {step} of an abandoned continuation: "
                      f"{[p.name for p in later]}")

    # ---- load ----

    def committed(self) -> list[tuple[int, Path]]:
        """(step, dir) of every committed checkpoint (has its manifest), oldest first."""
        return committed_checkpoints(self.run_dir)

    def verify(self, path: Path) -> dict:
        """The manifest of checkpoint `path` if every file matches its recorded checksum."""
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: no readable manifest.json ({e}); not a complete checkpoint") from None
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{path}: checkpoint format {manifest.get('format')}, this version reads {FORMAT}")
        for name, meta in manifest["files"].items():
            f = path / name
            if not f.is_file() or f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
                raise CheckpointError(f"{path}: {name} is missing or does not match its checksum")
        return manifest

    def _choose(self) -> Path | None:
        mode = self.cfg.resume.mode
        if mode == "never":
            return None
        if mode != "auto":
            path = Path(mode)
            self.verify(path)
            return path
        for step, path in reversed(self.committed()):
            try:
                self.verify(path)
                return path
            except CheckpointError as e:
                self._say(f"skipping {e}; trying an older checkpoint")
        return None

    def load_latest(self) -> dict | None:
        """The chosen checkpoint (resume.mode) as {manifest, state, tensors, rng}, or None to start fresh.

        Rank 0 chooses and checks compatibility; every rank reads the same checkpoint.
        """
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
        return None if path is None else self._read(Path(path))

    def _check_compatible(self, path: Path) -> None:
        saved = json.loads((path / "manifest.json").read_text())
        now = self.manifest(saved["step"])
        diff = changes(saved, now, list(self.cfg.resume.allow_changes))
        if diff:
            raise CheckpointError(resume_refusal(path, diff))

    def _read(self, path: Path) -> dict:
        manifest = json.loads((path / "manifest.json").read_text())
        state = json.loads((path / "state.json").read_text())
        saved_world = state["world_size"]
        r = self.rank if self.rank < saved_world else self.rank % saved_world
        return {"path": path, "manifest": manifest, "state": state,
                "tensors": _load_tensors(path / "trainable.safetensors"),
                "rng": (_load_tensors(path / f"rng-rank{r}.safetensors"),
                        json.loads((path / f"rng-rank{r}.json").read_text()))}

    def restore(self, loaded: dict, model, optimizer, scheduler) -> dict:
        """Put a loaded checkpoint into model, optimizer, scheduler and RNGs; returns its state.json."""
        state = loaded["state"]
        restore_trainable(model, optimizer, loaded["tensors"], state["optimizer"])
        restore_scheduler(scheduler, state["scheduler"])
        _restore_scaler(self.accelerator, optimizer, state.get("scaler"))
        set_rng_state(*loaded["rng"])
        if state["world_size"] != self.world:
            self._say(f"world size changed: checkpoint written with world size {state['world_size']}, resuming "
                      f"with {self.world}; the data continues at global sample {state['position']}, "
                      "losses will not match a run at the old size bit for bit")
        self._say(f"resumed from {loaded['path']} (step {state['step']}, epoch {state['epoch']}, "
                  f"sample {state['position']})")
        return state
