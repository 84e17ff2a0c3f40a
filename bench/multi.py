"""Multi-GPU measurements on one host: `python -m bench.multi [--out DIR] [--phases ...] [--budget S] [--dry]`.

It adapts to the host's GPUs (2, 4 or 8: `torch.cuda.device_count()`). Phases, in priority order; each
runs only while the wall-clock budget lasts (less what the call's later phases need, at most half), and every
row goes to OUT/results.jsonl (and OUT/table.txt is rewritten) as soon as it is known, with the card,
the date and the package versions, so a call killed at its limit still brings back what ran:

1. `lora`: per-GPU tokens/s of bf16 LoRA on the Llama-2-7B shape at 1, 2, 4 (and 8) GPUs for
   distributed = ddp, zero2, zero3 and fsdp2 (bench.case under torchrun: the project's Trainer), each
   as a ratio against the 1-GPU figure of the same option, and the peer (TRL SFTTrainer with
   use_liger_kernel=True, `accelerate launch --multi_gpu`) at the same counts. Cases share the host
   in waves on disjoint GPUs (`--serial`: one at a time).
2. `qlora`: the same with QLoRA (nf4 + gradient checkpointing); the random 7B is saved for it first.
3. `hostfile`: two "nodes" x half the GPUs each from a hostfile on this host (each node restricted to
   its own GPUs, explicit node ranks, rendezvous on the host's non-loopback address): trains with
   checkpoints, both nodes SIGKILLed mid-run, resumed with the same command; two uninterrupted runs
   of the same command give the run-to-run spread the resumed run's losses are held to.
4. `correct`: every `distributed` option x {LoRA, QLoRA} through the real `lora-launch` on 2 GPUs
   with the tiny model: the losses of a few steps, or the one-line refusal before launch.

One device call (at most 600 s) does not hold them all: `--phases lora hostfile`, then
`--phases qlora correct` (bench/README.md). `--plan` prints the cases and waves without running.
`--dry` runs the same plumbing on CPU with the tiny model (2 processes instead of N).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.case import WORK
from bench.multi_plan import QUANTS, dry_case, judge, loss_spread, node_devices, scaling_cases, target_cell, waves
from bench.run import card, case, run_case, versions

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTED = ("ddp", "zero2", "zero3", "zero3_offload", "fsdp2", "fsdp2_offload")
PHASES = ("lora", "qlora", "hostfile", "correct")
# seconds a phase needs to bring back its first rows on the GPUs: what the phases before it leave it
NEEDS = {"lora": 100.0, "qlora": 160.0, "hostfile": 220.0, "correct": 150.0}


class Budget:
    """Seconds left of the whole call."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class Recorder:
    """results.jsonl, log.txt and table.txt under OUT, written as rows arrive."""

    def __init__(self, out: Path, meta: dict):
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.meta, self.rows = out, meta, []
        self.log = open(out / "log.txt", "a")
        self._results = open(out / "results.jsonl", "a")

    def add(self, row: dict) -> dict:
        row = judge({**row, **self.meta}, self.rows)
        self.rows.append(row)
        self._results.write(json.dumps(row) + "\n")
        self._results.flush()
        print(f"[{row['phase']}] {row['name']}: {summary(row)}", flush=True)
        (self.out / "table.txt").write_text(table(self.rows) + "\n")
        return row

    def skip(self, phase: str, specs: list[dict], why: str) -> None:
        for s in specs:
            self.add({"phase": phase, "name": s["name"], "spec": s, "error": f"not run: {why}"})

    def note(self, text: str) -> None:
        self.log.write(text + "\n")
        self.log.flush()


# ---- 1, 2. scaling, LoRA and QLoRA --------------------------------------------------------------


def peer_missing() -> str | None:
    """Why the peer cannot run here, or None."""
    missing = [
        pkg
        for module, pkg in (("trl", "trl"), ("liger_kernel", "liger-kernel"))
        if importlib.util.find_spec(module) is None
    ]
    return ", ".join(f"{pkg} missing" for pkg in missing) or None


def phase_cases(quant: str, n: int, dry: bool, tiny: dict, counts: list[int] | None) -> list[dict]:
    """The phase's cases in priority order (the tiny model's form under --dry)."""
    specs = scaling_cases(quant, n, counts)
    return [dry_case(s, tiny["model"]) if dry and s["kind"] == "project" else s for s in specs]


def run_scaling(quant: str, ctx: dict, rec: Recorder, reserve: float) -> None:
    """Prepare the inputs, then the phase's waves; each row is judged against the rows before it."""
    budget, dry, n = ctx["budget"], ctx["dry"], ctx["n"]
    specs = phase_cases(quant, n, dry, ctx["tiny"], ctx["counts"])
    if budget.left() - reserve < 60:
        rec.skip(quant, specs, "time budget spent")
        return
    save_7b = quant == "qlora" and not dry  # QLoRA (project and peer) loads the random 7B through bitsandbytes
    prep = run_case(case("prepare", "prepare", save_7b=save_7b), min(180.0, budget.left() - reserve), rec.log)
    rec.add({**prep, "phase": quant, "name": f"prepare_{quant}"})
    why = peer_missing() or ("the peer needs GPUs (--dry)" if dry else None)
    if why:
        rec.skip(quant, [s for s in specs if s["kind"] == "peer"], why)
        specs = [s for s in specs if s["kind"] != "peer"]
    for wave in waves(specs, n, ctx["serial"]):
        left = budget.left() - reserve
        if left < 45:
            rec.skip(quant, [s for s, _ in wave], "time budget spent")
            continue
        with ThreadPoolExecutor(len(wave)) as pool:
            timeout = min(ctx["case_timeout"], left)
            jobs = [pool.submit(run_case, s, timeout, rec.log, None if dry else d) for s, d in wave]
            rows = [j.result() for j in jobs]
        for (s, d), row in zip(wave, rows):
            alongside = [o["name"] for o, _ in wave if o is not s]
            rec.add({**row, "phase": quant, "spec": s, "devices": None if dry else d, "alongside": alongside})


# ---- 3. two "nodes" from a hostfile, killed and resumed -----------------------------------------


def host_address() -> tuple[str, str]:
    """A non-loopback IPv4 address of this host that is up, and its interface; else loopback."""
    import psutil

    stats = psutil.net_if_stats()
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if (
                a.family == socket.AF_INET
                and not a.address.startswith("127.")
                and stats.get(name, None)
                and stats[name].isup
            ):
                return a.address, name
    return "127.0.0.1", "lo"


class TwoNodes:
    """The same `lora-launch launcher=hostfile` command on two "nodes" of this host, half the GPUs each."""

    def __init__(self, tiny: dict, dry: bool, n: int, steps: int, tag: str, port: int):
        self.addr, self.iface = host_address()
        self.per_node = 1 if dry else n // 2
        self.devices = [None, None] if dry else node_devices(n)
        self.root = WORK / "hostfile"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tag, self.run_dir = tag, self.root / tag
        shutil.rmtree(self.run_dir, ignore_errors=True)  # an earlier call's run here would be resumed
        self.hostfile = self.root / f"hosts-{tag}"
        second = "localhost" if self.addr != "127.0.0.1" else "127.0.0.2"
        # two lines for one host: the node ranks must be given, the first line is the rendezvous
        self.hostfile.write_text(f"{self.addr} slots={self.per_node}\n{second} slots={self.per_node}\n")
        self.common = [
            *tiny_overrides(tiny),
            "launcher=hostfile",
            f"launcher.hostfile={self.hostfile}",
            f"launcher.main_process_port={port}",
            f"train.max_steps={steps}",
            "checkpoint.every_steps=2",
            "train.micro_batch_size=2",
            f"run.dir={self.run_dir}",
        ]

    def commands(self) -> list[tuple[list[str], dict]]:
        return [(lora_launch([*self.common, f"launcher.node_rank={r}"]), tiny_env(self.devices[r])) for r in (0, 1)]

    def logs(self, part: str = "") -> list[Path]:
        return [self.root / f"{self.tag}{part}-node{r}.log" for r in (0, 1)]

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_jsonl(self.run_dir / "metrics.jsonl") if "loss" in r}


def kill_trees(procs) -> list[int]:
    """SIGKILL the process groups of every process under `procs` (launcher, accelerate, ranks)."""
    import psutil

    groups = set()
    for p in procs:
        try:
            top = psutil.Process(p.pid)
            tree = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for q in tree:
            try:
                groups.add(os.getpgid(q.pid))
            except ProcessLookupError:
                pass
    groups.discard(os.getpgrp())
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return sorted(groups)


def gpus_by_node(procs) -> dict:
    """Which physical GPUs each node's processes hold (nvidia-smi compute apps, by process tree)."""
    import psutil

    try:
        bus = dict(line.split(", ")[::-1] for line in smi("--query-gpu=index,pci.bus_id"))
        apps = [line.split(", ") for line in smi("--query-compute-apps=pid,gpu_bus_id")]
    except (OSError, subprocess.SubprocessError, ValueError):
        return {"error": "nvidia-smi unavailable"}
    out = {}
    for node, p in enumerate(procs):
        try:
            pids = {q.pid for q in psutil.Process(p.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pids = set()
        out[f"node{node}"] = sorted({int(bus.get(b, -1)) for pid, b in apps if int(pid) in pids})
    return out


def smi(query: str) -> list[str]:
    res = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    return [line.strip() for line in res.stdout.splitlines() if line.strip()]


def kill_midrun(nodes: TwoNodes, kill_at: int, timeout: float) -> dict:
    """Start both nodes, SIGKILL both once metrics show step >= kill_at; what was there at the kill."""
    procs = []
    for (cmd, env), log in zip(nodes.commands(), nodes.logs("-killed")):
        with open(log, "w") as f:
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=WORK, start_new_session=True)
            )
    end, placement, seen = time.monotonic() + timeout, None, 0
    while time.monotonic() < end and all(p.poll() is None for p in procs):
        seen = max(nodes.losses(), default=0)
        if seen >= 1 and placement is None:
            placement = gpus_by_node(procs)
        if seen >= kill_at:
            break
        time.sleep(0.02)
    exited = [p.poll() for p in procs]
    groups = kill_trees(procs)
    for p in procs:
        p.wait()
    time.sleep(1.0)  # ranks die with their launcher (PDEATHSIG); let them go before the resume
    return {
        "killed_at_step_seen": seen,
        "exited_before_kill": exited,
        "killed_groups": len(groups),
        "gpus_by_node": placement,
        "rows_at_kill": len(nodes.losses()),
        "checkpoints_at_kill": sorted(p.name for p in (nodes.run_dir / "checkpoints").glob("step-*")),
    }


def run_hostfile(ctx: dict, rec: Recorder, reserve: float) -> None:
    """Two uninterrupted runs and one killed and resumed, all at once; the checks as one row."""
    budget, dry, n, steps = ctx["budget"], ctx["dry"], ctx["n"], 60
    if budget.left() - reserve < 120:
        rec.add({"phase": "hostfile", "name": "two_nodes_kill_resume", "error": "not run: time budget spent"})
        return
    refs = [TwoNodes(ctx["tiny"], dry, n, steps, f"reference_{x}", port) for x, port in (("a", 29700), ("b", 29750))]
    nodes = TwoNodes(ctx["tiny"], dry, n, steps, "kill_resume", 29800)
    row = {
        "name": "two_nodes_kill_resume",
        "address": nodes.addr,
        "interface": nodes.iface,
        "hostfile": nodes.hostfile.read_text(),
        "per_node": nodes.per_node,
        "devices": nodes.devices,
    }
    timeout = budget.left() - reserve - 5
    with ThreadPoolExecutor(2) as pool:
        ref_jobs = [pool.submit(run_group, r.commands(), r.logs(), timeout) for r in refs]
        row["kill"] = kill_midrun(nodes, 6, min(240.0, timeout / 2))
        t0 = time.monotonic()
        row["resume_rc"] = run_group(nodes.commands(), nodes.logs("-resumed"), budget.left() - reserve - 5)
        row["resume_seconds"] = round(time.monotonic() - t0, 1)
        row["reference_rc"] = [j.result() for j in ref_jobs]
    if not dry:
        asked = [[int(g) for g in d.split(",")] for d in nodes.devices]
        row["placement_as_asked"] = row["kill"]["gpus_by_node"] == {"node0": asked[0], "node1": asked[1]}
    row.update(check_resume(nodes.run_dir, nodes.logs("-resumed")[0], steps))
    row.update(loss_spread(refs[0].losses(), refs[1].losses(), nodes.losses(), row.get("resumed_at")))
    for log in nodes.logs("-killed") + nodes.logs("-resumed") + refs[0].logs() + refs[1].logs():
        rec.note(f"===== {log.name}\n" + tail(log, 2500))
    rec.add({"phase": "hostfile", **row})


def check_resume(run_dir: Path, node0_log: Path, steps: int) -> dict:
    """Each step's metrics row exactly once, and the resume line of the log."""
    got = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    text = node0_log.read_text(errors="replace") if node0_log.exists() else ""
    resumed = [line for line in text.splitlines() if "resumed from" in line]
    at = re.search(r"\(step (\d+)", resumed[0]) if resumed else None
    node_lines = [line for line in text.splitlines() if line.startswith("node ") or line.startswith("launch:")]
    return {
        "steps_once_each": got == list(range(1, steps + 1)),
        "metric_steps": len(got),
        "resume_line": resumed[0] if resumed else None,
        "resumed_at": int(at.group(1)) if at else None,
        "node0_launch": node_lines,
    }


# ---- 4. correctness on GPUs ---------------------------------------------------------------------


def tiny_overrides(tiny: dict) -> list[str]:
    """`lora-launch` overrides for the tiny model (the tests' fixture) and a short, quiet run."""
    return [
        f"model.path={tiny['model']}",
        f"data.path={tiny['data']}",
        "data.source=local",
        "train.seq_len=64",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "sample.max_new_tokens=0",
        "eval.at_start=false",
    ]


def lora_launch(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "lora_launch.cli", *overrides]


def tiny_env(devices: str | None) -> dict:
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        NCCL_NVLS_ENABLE="0",
        TORCHINDUCTOR_COMPILE_THREADS="2",
    )  # many runs share the host's cores
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    return env


def run_group(cmds: list[tuple[list[str], dict]], logs: list[Path], timeout: float) -> list[int | str]:
    """Start every command (own session each), wait for all; exit codes, 'timeout' for those killed."""
    procs = []
    for (cmd, env), log in zip(cmds, logs):
        with open(log, "w") as f:
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=WORK, start_new_session=True)
            )
    end, codes = time.monotonic() + timeout, []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, end - time.monotonic())))
        except subprocess.TimeoutExpired:
            kill_trees([p])
            p.wait()
            codes.append("timeout")
    return codes


def correctness_runs() -> list[dict]:
    """Every distributed option x {LoRA, QLoRA}, plus QLoRA under ZeRO-3 and FSDP2 in the form they allow."""
    runs = []
    for d in DISTRIBUTED:
        runs.append({"name": f"lora_{d}", "overrides": [f"distributed={d}"]})
        runs.append({"name": f"qlora_{d}", "overrides": [f"distributed={d}", "quant=nf4"]})
        if d.startswith(("zero3", "fsdp2")):
            runs.append(
                {
                    "name": f"qlora_{d}_bf16_storage",
                    "overrides": [f"distributed={d}", "quant=nf4", "quant.storage_dtype=bfloat16"],
                }
            )
    return runs


def correctness_row(run: dict, rc, seconds: float, log: Path, run_dir: Path) -> dict:
    """trained (losses, world, backend) / refused (the error line) / failed (the last error)."""
    out = log.read_text(errors="replace") if log.exists() else ""
    row = {"name": run["name"], "overrides": run["overrides"], "rc": rc, "seconds": round(seconds, 1)}
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    started = [line for line in out.splitlines() if line.startswith("training ") and "global batch" in line]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    if rc == 0 and losses:
        row.update(outcome="trained", losses=losses, launch=started[-1] if started else None)
    elif errors and not any(line.startswith("launch:") for line in out.splitlines()):
        row.update(outcome="refused before launch", message=errors[0])
    else:
        row.update(outcome="failed", message=last_error(out), losses=losses)
    return row


def run_correctness(ctx: dict, rec: Recorder, reserve: float) -> None:
    """The correctness runs, several at once (tiny model: the GPUs have room), each on a GPU pair."""
    budget, dry, n = ctx["budget"], ctx["dry"], ctx["n"]
    runs = correctness_runs()
    base = fresh(WORK / "correct")
    timeout = min(240.0, budget.left() - reserve)
    if timeout < 60:
        for r in runs:
            rec.add({"phase": "correct", "name": r["name"], "error": "not run: time budget spent"})
        return
    pairs = [f"{g},{g + 1}" for g in range(0, n - 1, 2)]

    def one(i_run):
        i, run = i_run
        run_dir, log = base / run["name"], base / f"{run['name']}.log"
        overrides = [
            *tiny_overrides(ctx["tiny"]),
            f"run.dir={run_dir}",
            "train.max_steps=4",
            "train.micro_batch_size=2",
            "launcher.num_processes=2",
            f"launcher.main_process_port={29600 + 5 * i}",
            *run["overrides"],
        ]
        t0 = time.monotonic()
        (rc,) = run_group([(lora_launch(overrides), tiny_env(None if dry else pairs[i % len(pairs)]))], [log], timeout)
        return correctness_row(run, rc, time.monotonic() - t0, log, run_dir)

    with ThreadPoolExecutor(2 if dry else 6) as pool:
        for row in pool.map(one, enumerate(runs)):
            rec.add({"phase": "correct", **row})
            rec.note(f"===== correct {row['name']}\n" + tail(base / f"{row['name']}.log", 3000))


# ---- helpers ------------------------------------------------------------------------------------


def fresh(path: Path) -> Path:
    """An empty scratch dir (run dirs left in it by an earlier call on the same machine would be resumed)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line cut by the kill
    return rows


def tail(path: Path, n: int) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def last_error(out: str) -> str:
    """The exception line of a failed run (the ranks' own, before the launcher's summary)."""
    lines = [line for line in out.splitlines() if line.strip()]
    raised = [line for line in lines if re.search(r"\w+(Error|Exception): ", line)]
    errs = raised or [line for line in lines if line.lower().startswith("error")]
    return (errs[-1] if errs else (lines[-1] if lines else "no output"))[:300]


def summary(row: dict) -> str:
    if "tokens_per_s" in row:
        parts = [f"{row['tokens_per_s']:.0f} tok/s/GPU"]
        for key, text in (
            ("vs_1gpu", "{:.1%} of 1 GPU"),
            ("vs_1gpu_ddp", "{:.1%} of 1-GPU ddp"),
            ("vs_peer", "{:.2f}x the peer"),
        ):
            if key in row:
                target = target_cell(row, key) if key != "vs_1gpu_ddp" else "-"
                parts.append(text.format(row[key]) + (f" ({target})" if target != "-" else ""))
        return ", ".join(parts) + f", peak {row.get('peak_gib', 0):.1f} GiB"
    if row.get("outcome") == "trained":
        m = re.search(r"x (\d+) processes\).*, (\S+) on (\S+)$", row.get("launch") or "")
        how = f" ({m.group(1)} processes, {m.group(2)} on {m.group(3)})" if m else ""
        return f"trained{how}, losses {[round(x, 4) for x in row['losses']]}"
    if "outcome" in row:
        return f"{row['outcome']}: {row.get('message', '')}"
    if row.get("name") == "two_nodes_kill_resume" and "error" not in row:
        return hostfile_summary(row)
    if "error" in row:
        return row["error"]
    return f"done in {row.get('seconds', 0):.1f} s ({row.get('wall_s', 0):.1f} s with the process start)"


def hostfile_summary(row: dict) -> str:
    spread = row.get("reference_spread")
    worst = row.get("resumed_max_diff")
    return (
        f"rc killed->resumed {row.get('resume_rc')}, references {row.get('reference_rc')}; "
        f"killed at step {row['kill']['killed_at_step_seen']}, resumed at {row.get('resumed_at')}; "
        f"steps once each: {row.get('steps_once_each')}; {row.get('compared_steps')} steps compared: "
        f"references differ by <= {spread if spread is None else f'{spread:.3g}'}, resumed by <= "
        f"{worst if worst is None else f'{worst:.3g}'} ({row.get('tolerance')}): "
        f"{'within' if row.get('within_spread') else 'NOT within'} the spread"
        + (
            f"; GPUs by node {row['kill']['gpus_by_node']} as asked: {row['placement_as_asked']}"
            if "placement_as_asked" in row
            else ""
        )
    )


def table(rows: list[dict]) -> str:
    """The figures with their ratios and targets, then the other phases' rows, one line each."""
    meta = rows[0] if rows else {}
    head = (
        f"{'phase':8} {'case':22} {'GPUs':>4} {'tok/s/GPU':>9} {'vs 1 GPU':>8} {'target':>11} "
        f"{'vs ddp 1':>8} {'vs peer':>7} {'target':>11} {'peak GiB':>8} {'cv':>5}"
    )
    lines = [
        f"{meta.get('card')}, {meta.get('date')}",
        " ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items() if v),
        head,
    ]
    for r in rows:
        r = judge(r, rows)
        if "tokens_per_s" in r:
            vs_1, vs_ddp = (f"{r[k]:.1%}" if k in r else "-" for k in ("vs_1gpu", "vs_1gpu_ddp"))
            peer = f"{r['vs_peer']:.2f}x" if "vs_peer" in r else "-"
            lines.append(
                f"{r['phase']:8} {r['name']:22} {r.get('world', '?'):>4} {r['tokens_per_s']:9.0f} "
                f"{vs_1:>8} {target_cell(r, 'vs_1gpu'):>11} {vs_ddp:>8} {peer:>7} "
                f"{target_cell(r, 'vs_peer'):>11} {r.get('peak_gib', 0):8.1f} {r.get('step_time_cv', 0):5.3f}"
            )
        else:
            lines.append(f"{r['phase']:8} {r['name']:22} {summary(r)[:400]}")
    return "\n".join(lines)


def environment(rec: Recorder) -> None:
    """What the host is: GPUs and their links, addresses (in the log)."""
    for cmd in (["nvidia-smi", "-L"], ["nvidia-smi", "topo", "-m"], ["ip", "-4", "-o", "addr"]):
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            rec.note(f"$ {' '.join(cmd)}\n{res.stdout}{res.stderr}")
        except (OSError, subprocess.SubprocessError) as e:
            rec.note(f"$ {' '.join(cmd)}: {e}")


def print_plan(n: int, phases: list[str], counts: list[int] | None, serial: bool) -> None:
    """The scaling phases' waves on an n-GPU host (what --plan shows)."""
    for quant in (q for q in QUANTS if q in phases):
        print(f"{quant} on {n} GPUs:")
        for i, wave in enumerate(waves(scaling_cases(quant, n, counts), n, serial), 1):
            print(f"  wave {i}: " + ", ".join(f"{s['name']} [{d}]" for s, d in wave))
    for phase in (p for p in phases if p not in QUANTS):
        print(
            f"{phase}: "
            + {
                "hostfile": f"2 nodes x {n // 2} GPUs ({' | '.join(node_devices(n))}), "
                "2 references + killed/resumed at once",
                "correct": f"{len(correctness_runs())} lora-launch runs on GPU pairs",
            }[phase]
        )


# ---- the phases ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.multi", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--budget", type=float, help="seconds for everything (default 540; 3600 with --dry)")
    parser.add_argument(
        "--phases",
        nargs="+",
        choices=PHASES,
        default=list(PHASES),
        help="which phases, run in the order lora, qlora, hostfile, correct (default: all)",
    )
    parser.add_argument("--counts", nargs="+", type=int, help="GPU counts of the scaling rows (1 always runs)")
    parser.add_argument("--serial", action="store_true", help="scaling cases one at a time, not in waves")
    parser.add_argument("--case-timeout", type=float, default=240.0)
    parser.add_argument("--plan", action="store_true", help="print the cases and waves, run nothing")
    parser.add_argument("--gpus", type=int, help="with --plan: plan for this many GPUs")
    parser.add_argument("--tiny-model", default=str(REPO / ".benchtiny/model"))
    parser.add_argument("--tiny-data", default=str(REPO / ".benchtiny/data.jsonl"))
    parser.add_argument("--dry", action="store_true", help="CPU plumbing check with the tiny model")
    args = parser.parse_args(argv)
    phases = [p for p in PHASES if p in args.phases]
    if args.plan:
        print_plan(args.gpus or gpu_count(args.dry), phases, args.counts, args.serial)
        return 0
    tiny = {"model": args.tiny_model, "data": args.tiny_data}
    for key, path in tiny.items():
        if not Path(path).exists():
            print(f"error: --tiny-{key} {path} not found (build it: see bench/README.md)", file=sys.stderr)
            return 2
    n = gpu_count(args.dry)
    if n < 2:
        print(f"error: {n} GPU(s) visible; bench.multi needs 2 or more (--dry runs on CPU)", file=sys.stderr)
        return 2
    seconds = args.budget or (3600.0 if args.dry else 540.0)
    budget = Budget(seconds)
    WORK.mkdir(parents=True, exist_ok=True)
    meta = {"card": card(), "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"), "versions": versions()}
    rec = Recorder(Path(args.out), meta)
    environment(rec)
    ctx = {
        "budget": budget,
        "dry": args.dry,
        "n": n,
        "tiny": tiny,
        "counts": args.counts,
        "serial": args.serial,
        "case_timeout": args.case_timeout,
    }
    for i, phase in enumerate(phases):
        # later phases keep what they need, at most half the call: the first phase is the most important
        reserve = 0.0 if args.dry else min(sum(NEEDS[p] for p in phases[i + 1 :]), seconds / 2)
        if phase in QUANTS:
            run_scaling(phase, ctx, rec, reserve)
        elif phase == "hostfile":
            run_hostfile(ctx, rec, reserve)
        else:
            run_correctness(ctx, rec, reserve)
    print(table(rec.rows))
    return 0


def gpu_count(dry: bool) -> int:
    """2 processes on CPU under --dry, else every visible GPU."""
    if dry:
        return 2
    import torch

    return torch.cuda.device_count()


if __name__ == "__main__":
    sys.exit(main())
