"""The training loop: build everything from the resolved config, then step, log, evaluate, save."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from lora_launch.conf.schema import BNB_OPTIMIZERS, quant_kernel
from lora_launch.data.samples import IGNORE, as_trained, build_splits
from lora_launch.data.templates import prompt_text
from lora_launch.data.tokenizer import load_tokenizer
from lora_launch.run.plan import RunPlan
from lora_launch.run.process import ORPHAN_GRACE_S, SUPERVISOR_ENV, StopSignals
from lora_launch.run.pruning import report_eval
from lora_launch.run.rundir import (
    LAUNCH_FILES,
    atomic_dir,
    rewind_metrics,
    set_aside_previous,
    write_atomic,
    write_status,
)
from lora_launch.strategies import strategy_for
from lora_launch.train import fast, fsdp, fused
from lora_launch.train.activations import checkpointed_layers
from lora_launch.train.checkpoint import Checkpointer, fingerprints
from lora_launch.train.chunked_loss import ChunkedLoss
from lora_launch.train.data import collate, micro_batch_positions, train_stream
from lora_launch.train.distributed import (
    adapter_state_dict,
    all_sum,
    device_sum,
    make_accelerator,
    prepare,
    unwrapped,
    what_runs,
)
from lora_launch.train.evaluate import complete, forward_loss_sum, loss_sum
from lora_launch.train.metrics import MetricsLogger, NoLog, plot_loss
from lora_launch.train.model import apply_lora, load_base_model
from lora_launch.train.state import Progress, RngState, SchedulerState, TrainableState, scaler_state
from lora_launch.train.zero import gather_whole_layers


def make_optimizer(cfg: DictConfig, params: list) -> torch.optim.Optimizer:
    """optim.name's AdamW over the trainable parameters."""
    kwargs = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    name = str(cfg.optim.name)
    if name in BNB_OPTIMIZERS:
        import bitsandbytes as bnb

        return getattr(bnb.optim, BNB_OPTIMIZERS[name])(params, **kwargs)
    return torch.optim.AdamW(params, fused=name == "adamw_torch_fused" or None, **kwargs)


def make_scheduler(cfg: DictConfig, optimizer, steps: int):
    from transformers import get_scheduler

    warmup = cfg.optim.warmup_steps or math.ceil(cfg.optim.warmup_ratio * steps)
    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[cfg.optim.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)


def _progress_field(name: str) -> property:
    """A Trainer attribute that is self.progress's field `name` (what checkpoints save)."""
    return property(lambda self: getattr(self.progress, name), lambda self, value: setattr(self.progress, name, value))


class Trainer:
    """One LoRA SFT run on every rank; `fit()` then `close()`."""

    step = _progress_field("step")
    position = _progress_field("position")  # global sample index the data stream continues at
    tokens_seen = _progress_field("tokens_seen")

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.deterministic:  # before any kernel runs
            fast.deterministic_kernels()
        self.plan = plan = RunPlan.for_this_process(cfg)
        self.accelerator = acc = make_accelerator(cfg, plan)
        self.world, self.rank = acc.num_processes, acc.process_index
        self.main = acc.is_main_process  # the one rank that writes the run dir's files and logs
        torch.manual_seed(cfg.seed)  # same LoRA init on every rank

        self.tokenizer = load_tokenizer(cfg)
        with acc.main_process_first():
            self.splits = build_splits(cfg, self.tokenizer, main_process=self.main)
        model = apply_lora(
            cfg, load_base_model(cfg, fsdp.build_device(cfg, plan, acc.device, self.main), plan, draw=acc.device)
        )
        if cfg.train.fused_projections:  # before compiling: the compiled layers trace the joined products
            joined = fused.install(model)
            if self.main:
                print(joined, flush=True)
        self.loss_fn = fast.apply(cfg, model, plan.compile)  # compiled layers and loss on GPUs
        if isinstance(self.loss_fn, ChunkedLoss) and self.main:
            chunks = self.loss_fn.chunks
            print(f"loss in {chunks} chunks of tokens (train.chunked_loss={cfg.train.chunked_loss})", flush=True)
        if cfg.quant.mode == "nf4" and self.main:
            print(
                f"QLoRA: the 4-bit layers' matmul through {quant_kernel(cfg)} (quant.kernel={cfg.quant.kernel})",
                flush=True,
            )
        if strategy_for(cfg).shards_model_itself:  # sharded before the optimizer sees the parameters
            model = fsdp.shard(cfg, plan, model, self.main)
        self.checkpointed_layers = checkpointed_layers(cfg, plan, model, acc.device, self.main)
        plugin = acc.state.deepspeed_plugin  # the merged DeepSpeed config, the user's own JSON under the run's
        whole_layers = gather_whole_layers(
            cfg, model, plugin.deepspeed_config if plugin else {}, self.checkpointed_layers
        )
        if whole_layers and self.main:
            print(
                f"ZeRO-3: each {', '.join(whole_layers)} gathered whole (DeepSpeed leaf modules: the layers that "
                "grad ckpt recomputes)",
                flush=True,
            )
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg, params)
        self.total_steps = plan.total_steps(len(self.splits.train))
        # stepped by hand once per optimizer step: accelerate's wrapper would step it once per process
        self.scheduler = make_scheduler(cfg, optimizer, self.total_steps)
        self.model, self.optimizer = prepare(acc, cfg, model, optimizer)
        fused.check_joined(cfg, unwrapped(acc, self.model))
        self.host_peak_at_start_mib = _host_peak_mib()  # the model built, sharded and placed; nothing trained
        self.stream = train_stream(cfg, self.splits)  # length-grouped with data.group_by_length
        self.global_batch = plan.global_batch

        self.progress = Progress(train_size=len(self.splits.train))
        self._prefetched = None  # (stream position, host batches) collated ahead by _prefetch
        self._gathers_undecided = strategy_for(cfg).decides_gathers_after_first_step(cfg)  # keep_gathered=auto
        self.kept_gathered = None  # then (shard groups kept gathered, shard groups), after the first step
        # what a restart needs; the checkpointer saves and loads exactly these
        self.states = {
            "trainable": TrainableState(self.model, self.optimizer),
            "scheduler": SchedulerState(self.scheduler),
            "rng": RngState(),
            "progress": self.progress,
        }
        scaler = scaler_state(acc, self.optimizer)
        if scaler is not None:
            self.states["scaler"] = scaler
        identity = fingerprints(self.splits, self.tokenizer, unwrapped(acc, self.model))
        self.checkpointer = Checkpointer(
            cfg, self.run_dir, acc, states=self.states, fingerprints=identity, adapter_of=unwrapped(acc, self.model)
        )
        # SIGTERM (preemption), SIGINT (Ctrl-C), SIGHUP: stop after the current step, with a checkpoint; held from
        # fit() on until the rank exits. After a hangup output goes to the rank's log; orphaned, it ends in time
        self.stop = StopSignals(hangup_output=str(self.run_dir / f"rank{self.rank}.log"), orphan_grace_s=ORPHAN_GRACE_S)
        self._stop = False
        self.log = NoLog()  # the real one is opened by restore(), once earlier files are set aside or rewound

    def restore(self) -> bool:
        """Where training starts: set an earlier run aside (resume.mode=never), else load the checkpoint
        resume.mode picks into self.states; metrics keep only rows up to it. True when it resumed."""
        acc = self.accelerator
        if self.cfg.resume.mode == "never" and self.main:
            moved = set_aside_previous(self.run_dir, keep=LAUNCH_FILES)  # lora-launch moved the rest already
            if moved is not None:
                print(f"resume.mode=never: moved the earlier run's files to {moved}", flush=True)
        acc.wait_for_everyone()
        resumed = self.checkpointer.load() is not None
        if self.main:
            rewind_metrics(self.run_dir, self.step if resumed else -1, self.total_steps)
            write_status(self.run_dir, "running", self.step)
            self.log = MetricsLogger(self.cfg, self.run_dir, self.total_steps, self.step)
        return resumed

    def _stop_requested(self) -> bool:
        """Whether any rank got a stop signal by the end of the last step: every rank agrees, so all stop after it."""
        return self._stop

    def _save_checkpoint(self, force: bool) -> None:
        """A checkpoint if one is due after this step (or `force`: a stop); what each save it committed cost
        in the log (a stop first commits a background save still in flight, then saves its own step)."""
        self.checkpointer.maybe_save(self.step, force)
        for cost in self.checkpointer.take_commits():
            if cost["background"]:
                self.log.write(
                    f"step {self.step}: checkpoint of step {cost['step']} committed "
                    f"({cost['bytes'] / 2**20:.2f} MiB written in {cost['write_seconds']:.2f} s "
                    f"in the background; training paused {cost['seconds']:.2f} s)"
                )
            else:
                self.log.write(
                    f"step {self.step}: checkpoint saved in {cost['seconds']:.2f} s ({cost['bytes'] / 2**20:.2f} MiB)"
                )

    # ---- one optimizer step ------------------------------------------------------------------

    def _host_batches(self, position: int) -> tuple[list[dict], list[int]]:
        """This rank's micro-batches (CPU tensors) of the optimizer step starting at stream `position`."""
        t = self.cfg.train
        batches, indices = [], []
        for k in range(t.grad_accum):
            positions = micro_batch_positions(position, t.micro_batch_size, t.grad_accum, self.world, self.rank, k)
            step_indices = [self.stream.index(p) for p in positions]
            indices += step_indices
            batches.append(collate([self.splits.train[i] for i in step_indices], self.tokenizer.pad_token_id))
        return batches, indices

    def _micro_batches(self) -> tuple[list[dict], torch.Tensor]:
        """The step's micro-batches on the device and this rank's [target, token] counts (float64).

        The counts come from the CPU tensors, and the batches were collated while the GPU ran
        the previous step (`_prefetch`): nothing here waits for the device.
        """
        ready, self._prefetched = self._prefetched, None
        host, self.last_indices = ready[1] if ready and ready[0] == self.position else self._host_batches(self.position)
        counts = torch.tensor(
            [
                sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in host),
                sum(int(b["attention_mask"].sum()) for b in host),
            ],
            dtype=torch.float64,
        )
        device = self.accelerator.device
        pin = device.type == "cuda"
        move = lambda t: (t.pin_memory() if pin else t).to(device, non_blocking=pin)  # noqa: E731
        on_device = lambda b: {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in b.items()}  # noqa: E731
        return [on_device(b) for b in host], move(counts)

    def _prefetch(self, position: int) -> None:
        """Collate the next step's micro-batches now, while the device still runs this one."""
        if position < self.total_steps * self.global_batch:
            self._prefetched = (position, self._host_batches(position))

    def train_step(self) -> dict:
        """One optimizer step over micro * accum * world samples; returns its metrics row.

        The step waits for the device once, at its end, to read the loss: the global token
        counts are summed over ranks on the device and scale the loss there.
        """
        acc, cfg = self.accelerator, self.cfg
        t0 = time.perf_counter()
        self.model.train()
        batches, counts = self._micro_batches()
        counts = device_sum(acc, counts)  # [targets, tokens] of the global batch
        # what the device held before the first step, for keep_gathered=auto (read once)
        first = self._gathers_undecided and acc.device.type == "cuda"
        start_bytes = torch.cuda.memory_reserved(acc.device) if first else 0
        # the step's loss is the mean over every target token of the global batch; accelerate
        # (or DeepSpeed) divides by grad_accum and the gradient all-reduce averages over ranks
        scale = (self.world * cfg.train.grad_accum / counts[0].clamp(min=1.0)).float()
        loss_sum, grad_norm = torch.zeros((), dtype=torch.float64, device=acc.device), None
        hits_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        for batch in batches:
            with acc.accumulate(self.model):
                loss, hits = forward_loss_sum(self.model, batch, self.loss_fn, hits=True)
                acc.backward(loss * scale)
                loss_sum += loss.detach()
                hits_sum += hits
                if acc.sync_gradients and cfg.optim.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        # the stop flag rides on the step's one reduction: every rank learns if any rank got a stop signal
        flag = torch.tensor(float(self.stop.requested), dtype=torch.float64).to(acc.device, non_blocking=True)
        totals = device_sum(acc, torch.stack([loss_sum, hits_sum, flag]))
        self._prefetch(self.position + self.global_batch)
        global_loss, global_hits, sigterm, global_targets, global_tokens = torch.cat([totals, counts]).tolist()
        self._stop = sigterm > 0
        self.step += 1
        self.position += self.global_batch
        self.tokens_seen += int(global_tokens)
        elapsed = time.perf_counter() - t0
        row = {
            "step": self.step,
            "loss": global_loss / max(global_targets, 1.0),
            "lr": lr,
            "tokens": int(global_tokens),
            "tokens_total": self.tokens_seen,
            "tokens_per_s": global_tokens / elapsed,
            "step_time": elapsed,
            "epoch": self.position / len(self.splits.train),
        }
        row["token_accuracy"] = global_hits / max(global_targets, 1.0)
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        if acc.device.type == "cuda":  # this rank's peak since the start (the others' are alike)
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        if self._gathers_undecided:
            self._gathers_undecided = False
            self._keep_gathered(start_bytes, batches)
        return row

    def _keep_gathered(self, start_bytes: int, batches: list[dict]) -> None:
        """distributed=fsdp2 keep_gathered=auto, after this process's first step: how many shard groups stay
        gathered from forward to backward, from the memory that step took (see fsdp.keep_gathered_after_first_step)."""
        cfg = self.cfg
        fill = max(b["input_ids"].numel() for b in batches) / (cfg.train.micro_batch_size * cfg.train.seq_len)
        decided = fsdp.keep_gathered_after_first_step(
            cfg, unwrapped(self.accelerator, self.model), self.accelerator.device, start_bytes, fill
        )
        if decided:
            kept, groups, spare = decided
            self.kept_gathered = (kept, groups)
            why = (
                f"{spare:.1f} GiB to spare after step {self.step}"
                if self.accelerator.device.type == "cuda"
                else "no GPU memory to hold them"
            )
            self.log.write(
                f"FSDP2: the last {kept} of {groups} shard groups stay gathered from forward to backward "
                f"(distributed.keep_gathered=auto: {why})"
            )

    # ---- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss on the validation split, the same whatever the world size."""
        if not self.splits.val:
            return float("nan")
        self.model.eval()
        mine = loss_sum(
            self.model,
            self.splits.val,
            self.cfg.train.micro_batch_size,
            self.tokenizer.pad_token_id,
            self.accelerator.device,
            self.rank,
            self.world,
            self.cfg.eval.max_batches,
            self.loss_fn,
        )
        total, n = all_sum(self.accelerator, *mine)
        return total / max(n, 1.0)

    def _log_eval(self) -> float:
        if not self.splits.val:  # data.val_split=0: nothing to report (NaN would not be JSON in metrics.jsonl)
            return float("nan")
        eval_loss = self.evaluate()
        self.log.log({"step": self.step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50))})
        self.log.write(f"step {self.step}: eval loss {eval_loss:.4f}")
        return eval_loss

    # ---- the run --------------------------------------------------------------------------------

    def fit(self) -> dict:
        """Resume (restore()), then train to total_steps; returns a summary (first/last eval loss, wall time)."""
        self.restore()
        cfg, t_start = self.cfg, time.perf_counter()
        self.log.write(
            f"training {self.total_steps} steps, global batch {self.global_batch} "
            f"({cfg.train.micro_batch_size} x {cfg.train.grad_accum} accum x {self.world} processes), "
            f"{len(self.splits.train)} train / {len(self.splits.val)} val samples, "
            f"{what_runs(self.accelerator, self.plan)}"
        )
        self.stop.install()
        evals = []
        if cfg.eval.at_start and self.step == 0:
            evals.append(self._log_eval())
        while self.step < self.total_steps:
            row = self.train_step()
            if self.step % cfg.logging.every_steps == 0 or self.step == self.total_steps:
                self.log.log(row)
            if cfg.logging.rank_audit:
                self._audit()
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and self.step < self.total_steps:
                evals.append(self._log_eval())
                if self.main:  # under a pruning sweep: go on, or its pruner's SIGTERM stops us after the next step
                    report_eval(self.run_dir, self.step, evals[-1], stopped=lambda: self.stop.requested)
            stop = self._stop_requested()
            # with periodic checkpoints on, the last step is saved too: its adapter is a checkpoint's like the rest
            last = self.step == self.total_steps and self.checkpointer.every > 0
            self._save_checkpoint(force=stop or last)
            if stop and self.step < self.total_steps:
                self._record_stop()
                return {"preempted_at": self.step, "seconds": time.perf_counter() - t_start}
        evals.append(self._log_eval())
        self.save_adapter()
        prompt, sample = self.generate_sample()
        self.log.write(f"sample: {cfg.sample.prompt!r} -> {sample!r}")
        if self.main:
            bos = self.tokenizer.bos_token or ""
            shown = prompt[len(bos) :] if bos and prompt.startswith(bos) else prompt
            write_atomic(self.run_dir / "sample.txt", f"{shown} {sample}\n")
            plot_loss(self.run_dir)
            write_status(self.run_dir, "finished", self.step)
        self.accelerator.wait_for_everyone()  # no rank exits (and lets a launcher read status.json) before it
        return {"first_eval_loss": evals[0], "final_eval_loss": evals[-1], "seconds": time.perf_counter() - t_start}

    def _record_stop(self) -> None:
        """status.json says preempted (with the signal) before any rank exits; a direct launch says how to go on."""
        if self.main:
            name = self.stop.name or "SIGTERM"  # another rank got the signal
            write_status(self.run_dir, "preempted", self.step, signal=name)
            if SUPERVISOR_ENV not in os.environ:  # lora-launch says it itself
                self.log.write(
                    f"{name}: stopped after step {self.step} with a checkpoint; run the same command to continue"
                )
        self.accelerator.wait_for_everyone()

    def _audit(self) -> None:
        """ranks/rank{R}.jsonl: the samples this rank trained on, a digest of its trainable weights, and its peak
        host memory, so far and before training started.

        Ranks whose digests differ after the same step are out of sync (DDP/ZeRO-2 keep every
        trainable weight on every rank; under ZeRO-3 and FSDP2 each rank digests only its own shard).
        """
        import hashlib
        import json

        digest = hashlib.sha256()
        for name, p in sorted(unwrapped(self.accelerator, self.model).named_parameters()):
            if p.requires_grad:
                digest.update(name.encode())
                digest.update(fsdp.local_shard(p.detach()).float().cpu().numpy().tobytes())
        out = self.run_dir / "ranks"
        out.mkdir(exist_ok=True)
        with open(out / f"rank{self.rank}.jsonl", "a") as f:
            f.write(
                json.dumps(
                    {
                        "step": self.step,
                        "samples": self.last_indices,
                        "trainable_sha256": digest.hexdigest(),
                        "host_peak_mib": _host_peak_mib(),
                        "host_peak_at_start_mib": self.host_peak_at_start_mib,
                    }
                )
                + "\n"
            )

    def save_adapter(self) -> Path:
        """adapter/: the PEFT adapter and tokenizer, written to a temporary name then renamed."""
        acc = self.accelerator
        state = adapter_state_dict(acc, self.model)  # collective under ZeRO-3 and FSDP2
        out = self.run_dir / "adapter"
        if self.main:
            with atomic_dir(out) as tmp:
                unwrapped(acc, self.model).save_pretrained(tmp, state_dict=state, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
        acc.wait_for_everyone()
        return out

    @torch.no_grad()
    def generate_sample(self) -> tuple[str, str]:
        """(prompt, greedy completion) of sample.prompt, written out with the run's template, by the trained
        model (every rank runs it, for ZeRO-3)."""
        cfg = self.cfg
        prompt = prompt_text(as_trained(cfg.data, self.splits.report), self.tokenizer, cfg.sample.prompt)
        if cfg.sample.max_new_tokens == 0:
            return prompt, ""
        model = unwrapped(self.accelerator, self.model)
        model.eval()
        # compiled decoder layers would recompile for every cache length (and warn): generate eagerly
        with torch.compiler.set_stance("force_eager"):
            text = complete(
                model,
                self.tokenizer,
                prompt,
                cfg.sample.max_new_tokens,
                synced_gpus=self.plan.shards_params and self.world > 1,
                device=self.accelerator.device,
            )
        # without the spaces a template puts around the answer (llama2: " answer </s>"), which a
        # byte-level tokenizer writes out
        return prompt, text.strip()

    def close(self) -> None:
        self.log.close()
        self.accelerator.end_training()


def _host_peak_mib() -> float:
    """This process's peak resident host memory so far, in MiB (Linux counts ru_maxrss in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
