"""How long a background checkpoint stops training: per save, on the product's own Trainer and Checkpointer.

`python -m bench.save_pause --out DIR [--steps 40] [--every 5] [--arms pinned blocking] [--profile-saves N] [--tiny]
[--device cpu]`

Builds the Llama-2-7B shape with random weights on the GPU (QLoRA nf4, drawn and quantised layer by layer,
where bitsandbytes is installed; else bf16), LoRA r=64 alpha 16 on q_proj/v_proj, grad ckpt, seq 512 x micro
batch 4, bitsandbytes' paged AdamW (the QLoRA recipe's; `--optim adamw`: torch's), and trains
`--steps` steps per arm with a background save every `--every` steps (checkpoint.background_min_mib=0):

- `pinned`:   the product's path: the states copied into pinned host buffers on a copy stream of their own,
              the writer thread waiting for the copies (train/host_copy.py).
- `blocking`: the copy as it was before: every tensor copied to pageable host memory in turn, training
              waiting for each (swapped in from here; the writer thread and the commit are the product's).
- `at_once`:  checkpoint.background=false: the whole save in the training thread (not run by default).

Per save it records the pause at the save step (the host time of `maybe_save`: taking the states and
queueing their copies), the wait for the previous save's writer if it was still busy then, the commit at the
step where every rank's writer is done, and the time of the step after the save against the median step
(the device-side wait of the optimizer's next step for the copies shows there). Then it checks that a
background save equals a synchronous save of the same step byte for byte while training goes on during it;
on a GPU once more with the copy stream held back 0.5 s, so that the next optimizer update is queued before
the copies have read what it overwrites (and, with the paged optimizer, that its states were copied on the GPU).
Writes OUT/results.jsonl (a row per save, a summary per arm, the check) and prints the summaries.

`--profile-saves N` then takes N more saves on the pinned path under cProfile (the Python functions the save
call spends its host time in, by cumulative time) and torch's profiler (the CUDA runtime calls made during it,
those that wait on the device among them), and the step after each: where a pause the copies do not explain goes.

`--tiny --device cpu` runs the same on a two-layer model on the CPU in seconds (for the code, not a timing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

TINY_ARCH = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="save-pause-out")
    ap.add_argument("--steps", type=int, default=40, help="training steps per arm")
    ap.add_argument("--every", type=int, default=5, help="checkpoint.every_steps")
    ap.add_argument("--warmup", type=int, default=5, help="steps before the first arm, without saves (compiling)")
    ap.add_argument("--arms", nargs="+", default=["pinned", "blocking"], choices=["pinned", "blocking", "at_once"])
    ap.add_argument("--quant", choices=["auto", "nf4", "none"], default="auto", help="auto: nf4 where bitsandbytes is")
    ap.add_argument("--optim", default="paged_adamw_32bit", help="the optim group: paged_adamw_32bit or adamw")
    ap.add_argument("--compile", default="auto", help="train.compile (none: eager, no compile time)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a two-layer model, seq 64 x micro batch 2")
    ap.add_argument("--profile-saves", type=int, default=0, help="saves profiled after the arms (0: none)")
    return ap.parse_args(argv)


def overrides(args, run_dir: Path) -> list[str]:
    """The bench's usual 7B case (bench.case.project_overrides) with this check's checkpoint settings."""
    from bench.case import project_overrides

    quant = args.quant
    if quant == "auto":
        quant = "nf4" if args.device == "cuda" and _has_bitsandbytes() else "none"
    spec = {
        "name": "save_pause",
        "quant": quant,
        "random_nf4": True,
        "ckpt": True,
        "compile": args.compile,
        "optim": args.optim,
        "seq": 64 if args.tiny else 512,
        "micro": 2 if args.tiny else 4,
    }
    extra = [
        f"checkpoint.every_steps={args.every}",
        "checkpoint.background=true",
        "checkpoint.background_min_mib=0",
        "checkpoint.keep_last=2",
    ]
    if args.tiny:
        extra += [f"model.arch.{k}={v}" for k, v in TINY_ARCH.items()]
    if args.device == "cpu":
        extra += ["train.precision=float32"]
    return project_overrides({**spec, "extra": extra}, str(run_dir))


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


class BlockingBuffers:
    """The copy as it was before pinned buffers: each tensor to pageable host memory at once, in turn."""

    def begin(self):
        return self

    def take(self, key, tensor):
        return tensor.detach().cpu().clone()

    def close(self):
        pass

    def hold(self, optimizer):
        pass

    def wait(self):
        pass

    def release(self):
        pass


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_arm(trainer, arm: str, steps: int) -> list[dict]:
    """`steps` training steps with the checkpointer's periodic saves, then a wait for the last one; a row per
    save: `pause_ms` (the call that took it), `commit_ms` (the call that committed it, `committed_by_next_save`
    where the next due save did), `writer_wait_ms` (how long that next save waited for its writer still busy:
    the disk, not the copy), `next_step_extra_ms` (the step after it against the median of steps with no save
    near them) and the checkpointer's own `product_paused_ms`."""
    from lora_launch.train.host_copy import HostBuffers

    ck = trainer.checkpointer
    ck.host = BlockingBuffers() if arm == "blocking" else HostBuffers()
    ck.background = arm != "at_once"
    ck.take_commits()
    step_ms, busy, saves = {}, set(), {}

    def record(commits, step: int, seconds: float, by_next_save: bool, writer_s: float = 0.0, at_end: bool = False):
        for c in commits:
            s = saves.setdefault(c["step"], {"save_step": c["step"]})
            s.update(product_paused_ms=c["seconds"] * 1e3, write_s=c["write_seconds"], bytes=c["bytes"])
            s.update(
                commit_ms=0.0 if c["step"] == step else seconds * 1e3,
                writer_wait_ms=writer_s * 1e3,
                committed_by_next_save=by_next_save,
                at_end=at_end,
            )
            busy.add(step)

    for _ in range(steps):
        step_s = trainer.train_step()["step_time"]
        step = trainer.step
        step_ms[step] = step_s * 1e3
        due = ck.every > 0 and step % ck.every == 0
        t0 = time.perf_counter()
        if due and ck.pending is not None:  # what maybe_save does first at a due step: wait for the previous
            ck.pending.thread.join()  # save's writer, then commit it
        t_written = time.perf_counter()
        if due:
            ck.finish()
        t1 = time.perf_counter()
        record(ck.take_commits(), step, t1 - t_written, by_next_save=True, writer_s=t_written - t0)
        ck.maybe_save(step)
        t2 = time.perf_counter()
        record(ck.take_commits(), step, t2 - t1, by_next_save=False)
        if due:
            saves.setdefault(step, {"save_step": step})["pause_ms"] = (t2 - t1) * 1e3
            busy.add(step)
    t0 = time.perf_counter()
    if ck.pending is not None:
        ck.pending.thread.join()
    t_written = time.perf_counter()
    ck.finish()
    record(ck.take_commits(), -1, time.perf_counter() - t_written, True, writer_s=t_written - t0, at_end=True)
    quiet = [ms for s, ms in step_ms.items() if s not in busy and s - 1 not in busy]
    median = statistics.median(quiet or step_ms.values())
    rows = []
    for i, (step, s) in enumerate(sorted(saves.items())):
        after = step_ms.get(step + 1)
        extra = None if after is None else after - median
        # training time the save took, the disk's share (a writer still busy at the next save) apart
        total = s.get("pause_ms", 0.0) + s.get("commit_ms", 0.0) + max(extra or 0.0, 0.0)
        rows.append(
            {
                "arm": arm,
                **s,
                "first": i == 0,
                "next_step_extra_ms": extra,
                "pause_total_ms": total,
                "step_median_ms": median,
            }
        )
    return rows


def profile_saves(trainer, saves: int, top: int = 15) -> dict:
    """`saves` background saves on the pinned path, each at the step that makes it due, with the save call under
    cProfile and torch's profiler, and the step after it under torch's profiler: the Python functions by
    cumulative time per save, and per save and per next step the CUDA runtime calls with their host time."""
    import cProfile
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile

    from lora_launch.train.host_copy import HostBuffers

    ck = trainer.checkpointer
    ck.host, ck.background = HostBuffers(), True
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    python = cProfile.Profile()
    runtime = {"save": {}, "next_step": {}}
    call_ms, next_ms = [], []

    def count(prof, into: dict) -> None:
        for e in prof.key_averages():
            if e.key.startswith("cuda") or e.key.startswith("aten::copy_") or e.key.startswith("aten::to"):
                n, us = into.get(e.key, (0, 0.0))
                into[e.key] = (n + e.count, us + e.self_cpu_time_total)

    for _ in range(saves):
        trainer.train_step()
        while ck.every and trainer.step % ck.every:
            trainer.train_step()
        ck.finish()  # the previous save committed, as a due step's save waits for it first
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            python.enable()
            ck.maybe_save(trainer.step)
            python.disable()
            call_ms.append((time.perf_counter() - t0) * 1e3)
        count(prof, runtime["save"])
        with profile(activities=activities) as prof:
            next_ms.append(trainer.train_step()["step_time"] * 1e3)
        count(prof, runtime["next_step"])
    ck.finish()
    stats = pstats.Stats(python)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)[:top]  # (cc, nc, tt, ct, callers)
    functions = [
        {"function": f"{Path(f).name}:{line}({name})", "calls": nc / saves, "cumulative_ms": ct * 1e3 / saves}
        for (f, line, name), (_, nc, _, ct, _) in rows
    ]

    def per_save(calls: dict) -> list[dict]:
        ranked = sorted(calls.items(), key=lambda kv: kv[1][1], reverse=True)[:top]
        return [{"call": k, "calls": n / saves, "host_ms": us / 1e3 / saves} for k, (n, us) in ranked]

    return {
        "profiled_saves": saves,
        "save_call_ms": call_ms,
        "next_step_ms": next_ms,
        "save_functions": functions,
        "save_runtime_calls": per_save(runtime["save"]),
        "next_step_runtime_calls": per_save(runtime["next_step"]),
    }


def summary(arm: str, saves: list[dict], every_for_cost: int = 25) -> dict:
    """Medians and maxima over the saves after the first (which pins its buffers), and what a save every
    `every_for_cost` steps costs as a share of training time. The last save's commit (the end of the arm
    waiting for its writer) is left out of the commit figures."""
    later = [s for s in saves if not s["first"]] or saves
    committed = [s for s in later if not s.get("at_end")] or later

    def stat(rows, key, how=statistics.median):
        values = [s[key] for s in rows if s.get(key) is not None]
        return how(values) if values else None

    step = saves[0]["step_median_ms"] if saves else None
    total = stat(later, "pause_total_ms")
    return {
        "arm": arm,
        "saves": len(saves),
        "step_median_ms": step,
        "first_save_pause_ms": saves[0].get("pause_ms") if saves else None,
        "pause_ms_median": stat(later, "pause_ms"),
        "pause_ms_max": stat(later, "pause_ms", max),
        "commit_ms_median": stat(committed, "commit_ms"),
        "commit_ms_max": stat(committed, "commit_ms", max),
        "commits_by_the_next_save": sum(1 for s in committed if s.get("committed_by_next_save")),
        "writer_wait_ms_max": stat(committed, "writer_wait_ms", max),
        "next_step_extra_ms_median": stat(later, "next_step_extra_ms"),
        "pause_total_ms_median": total,
        "pause_total_ms_max": stat(later, "pause_total_ms", max),
        "write_s_median": stat(later, "write_s"),
        "mib": (later[0].get("bytes") or 0) / 2**20 if later else None,
        f"cost_every_{every_for_cost}_steps": total / (every_for_cost * step) if total is not None and step else None,
    }


def line(s: dict) -> str:
    """One arm's summary in words."""

    def ms(key: str) -> str:
        return "-" if s.get(key) is None else f"{s[key]:.1f}"

    cost = s.get("cost_every_25_steps")
    return (
        f"{s['arm']:>9}: step {ms('step_median_ms')} ms; pause at the save {ms('pause_ms_median')} ms (max "
        f"{ms('pause_ms_max')}; first save {ms('first_save_pause_ms')}), commit {ms('commit_ms_median')} ms (max "
        f"{ms('commit_ms_max')}), next step {ms('next_step_extra_ms_median')} ms over the median; in all "
        f"{ms('pause_total_ms_median')} ms (max {ms('pause_total_ms_max')}) = "
        f"{'-' if cost is None else f'{100 * cost:.2f}%'} of training at a save every 25 steps; "
        f"{ms('mib')} MiB written in {ms('write_s_median')} s; the next save waited for the writer up to "
        f"{ms('writer_wait_ms_max')} ms"
    )


class HeldBackCopies:
    """The product's HostBuffers whose copy stream first sleeps `seconds` on the GPU at every save: the next
    step's optimizer update is then reached before the copies have read what it overwrites, and must wait."""

    def __init__(self, seconds: float):
        from lora_launch.train.host_copy import HostBuffers

        self.buffers, self.seconds = HostBuffers(), seconds
        stream = self.buffers.stream

        def held_back(device):
            import torch

            s = stream(device)
            with torch.cuda.stream(s):
                torch.cuda._sleep(int(self.seconds * 2e9))  # clock cycles: about `seconds` at 2 GHz
            return s

        self.buffers.stream = held_back

    def begin(self):
        return self.buffers.begin()


def same_as_synchronous(trainer, out: Path, hold_copies_s: float = 0.0) -> dict:
    """A background save of a step (the product's path) against a synchronous save of the same step by the
    old blocking copy, with two training steps run while the background one is copied and written: every file
    but the manifest byte for byte. `hold_copies_s` > 0 (GPU only) holds its copies back that long."""
    import torch

    from lora_launch.run.checkpoints import verify
    from lora_launch.train.checkpoint import Checkpointer
    from lora_launch.train.host_copy import HostBuffers

    ck = trainer.checkpointer
    ck.finish()
    trainer.train_step()  # a step no arm saved
    name = f"sync-reference-held-{hold_copies_s:g}s" if hold_copies_s else "sync-reference"
    sync_dir = out / name
    shutil.rmtree(sync_dir, ignore_errors=True)
    reference = Checkpointer(
        trainer.cfg, sync_dir, trainer.accelerator, trainer.states, ck.fingerprints, adapter_of=ck.adapter_of
    )
    reference.host = BlockingBuffers()
    step = trainer.step
    at_once = reference.save(step)
    held = hold_copies_s > 0 and torch.cuda.is_available()
    ck.host = HeldBackCopies(hold_copies_s) if held else HostBuffers()
    assert ck.save(step, background=True) is None, "the background save committed at once"
    copy = ck.pending.copy
    pending_after_save = copy.event is not None and not copy.event.query()
    paged_on_gpu = sum(1 for t in list(copy.sources) if getattr(t, "is_paged", False))
    for _ in range(2):
        trainer.train_step()
    background = ck.finish()
    ck.host = HostBuffers()
    verify(at_once)
    verify(background)
    names = sorted(f.name for f in at_once.iterdir() if f.name != "manifest.json")
    differ = [n for n in names if (at_once / n).read_bytes() != (background / n).read_bytes()]
    return {
        "check": "background_equals_synchronous",
        "copies_held_back_s": hold_copies_s if held else 0.0,
        "copies_still_running_after_the_save_call": pending_after_save,
        "paged_states_copied_on_gpu": paged_on_gpu,
        "step": step,
        "files": names,
        "differ": differ,
        "ok": not differ,
    }


def main(argv=None) -> int:
    args = parse(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported
    out = Path(args.out).absolute()
    os.environ.setdefault("BENCH_WORK", str(out / "work"))
    import torch

    from bench.case import TOKENIZER, make_tokenizer
    from bench.run import card, versions
    from lora_launch.conf.compose import compose
    from lora_launch.train.loop import Trainer

    t_start = time.perf_counter()
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    if not (TOKENIZER / "tokenizer.json").exists():
        make_tokenizer()
    cfg = compose(overrides(args, run_dir))
    trainer = Trainer(cfg)
    built_s = time.perf_counter() - t_start
    head = {
        "card": card(),
        "date": datetime.date.today().isoformat(),
        "versions": versions(),
        "quant": cfg.quant.mode,
        "optim": cfg.optim.name,
        "compile": cfg.train.compile,
        "tiny": args.tiny,
        "every": args.every,
        "steps": args.steps,
    }
    rows = []
    try:
        for _ in range(args.warmup):
            trainer.train_step()
        sync()
        summaries = []
        for arm in args.arms:
            saves = run_arm(trainer, arm, args.steps)
            rows += saves
            summaries.append(summary(arm, saves))
        checks = [same_as_synchronous(trainer, out)]
        if torch.cuda.is_available():  # and once with the next optimizer update sure to come before the copies end
            checks.append(same_as_synchronous(trainer, out, hold_copies_s=0.5))
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        profiles = [profile_saves(trainer, args.profile_saves)] if args.profile_saves else []
    finally:
        trainer.close()
    wall = {"build_s": built_s, "wall_s": time.perf_counter() - t_start, "peak_gib": peak}
    with (out / "results.jsonl").open("a") as f:
        for row in rows + summaries + checks + profiles + [wall]:
            f.write(json.dumps({**head, **row}) + "\n")
    print(f"{head['card']}  quant={head['quant']} optim={head['optim']} compile={head['compile']}  {json.dumps(wall)}")
    for row in rows:
        print(
            f"{row['arm']:>9} save of step {row['save_step']}: pause {row.get('pause_ms', 0):.1f} ms, commit "
            f"{row.get('commit_ms', 0):.1f} ms{' (at the end)' if row.get('at_end') else ''}, next step "
            f"{row['next_step_extra_ms'] or 0:+.1f} ms; waited for the writer {row.get('writer_wait_ms', 0):.0f} ms"
        )
    for s in summaries:
        print(line(s))
    for check in checks:
        print(
            f"background save == synchronous save of step {check['step']}: {check['ok']} (differ: {check['differ']}; "
            f"copies held back {check['copies_held_back_s']} s, still running after the save call: "
            f"{check['copies_still_running_after_the_save_call']}; paged states copied on the GPU: "
            f"{check['paged_states_copied_on_gpu']})"
        )
    for p in profiles:
        print(
            f"profiled saves: the call {', '.join(f'{ms:.1f}' for ms in p['save_call_ms'])} ms, the next step "
            f"{', '.join(f'{ms:.1f}' for ms in p['next_step_ms'])} ms (profilers on)"
        )
        for f in p["save_functions"]:
            print(f"  {f['cumulative_ms']:8.2f} ms  {f['calls']:6.1f} calls  {f['function']}")
        for where in ("save_runtime_calls", "next_step_runtime_calls"):
            print(f"  {where}: " + "; ".join(f"{c['call']} x{c['calls']:.0f} {c['host_ms']:.2f} ms" for c in p[where]))
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
