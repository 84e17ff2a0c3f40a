"""Multi-GPU measurements in one device call: `python -m bench.multi [--out DIR] [--budget S] [--dry]`.

Phases, in priority order; each starts only while the wall-clock budget lasts, and every row goes
to OUT/results.jsonl (and OUT/table.txt is rewritten) as soon as it is known, so a call killed at
its limit still brings back what ran:

1. `scaling`: per-GPU tokens/s of 4 processes (ddp, zero2, zero3) against 1 process, bf16 LoRA on
   the Llama-2-7B shape (bench.case under torchrun: the project's Trainer, its default fast path).
2. `correct`: every `distributed` option x {LoRA, QLoRA} through the real `lora-launch` on 2 GPUs
   with the tiny model: the losses of a few steps, or the one-line refusal before launch.
3. `hostfile`: two "nodes" x 2 GPUs on this host from a hostfile (each node restricted to its own
   GPUs, explicit node ranks, rendezvous on the host's non-loopback address): trains with
   checkpoints, both nodes SIGKILLed mid-run, resumed with the same command, and compared with an
   uninterrupted run of the same command.
4. `two_gpu`: 2-GPU rows (two at a time on GPUs 0,1 and 2,3), a 1-GPU baseline with ZeRO-3's kernels.
5. `qlora`: QLoRA (nf4 + gradient checkpointing) on 1 and 4 GPUs with ddp.

`--dry` runs the same plumbing on CPU with the tiny model (2 processes instead of 4).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.case import WORK
from bench.run import case, card, run_case

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTED = ("ddp", "zero2", "zero3", "zero3_offload", "fsdp2", "fsdp2_offload")


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
        row = {**row, **self.meta}
        self.rows.append(row)
        self._results.write(json.dumps(row) + "\n")
        self._results.flush()
        print(f"[{row['phase']}] {row['name']}: {summary(row)}", flush=True)
        (self.out / "table.txt").write_text(table(self.rows) + "\n")
        return row

    def note(self, text: str) -> None:
        self.log.write(text + "\n")
        self.log.flush()


# ---- 1. scaling ---------------------------------------------------------------------------------

def tiny_case_overrides(tiny: dict) -> list[str]:
    """bench.case overrides that swap the 7B for the tiny model (dry runs)."""
    return [f"model.path={tiny['model']}", "model.random_init=false", "train.seq_len=64"]


def scaling_spec(name: str, nproc: int, distributed: str, dry: bool, tiny: dict, quant: str = "none",
                 **extra) -> dict:
    """A bench.case `project` spec: the article's LoRA, seq 512, micro batch 4, 3 warm-up + 8 timed steps."""
    spec = case(name, "project", nproc=nproc, distributed=distributed, warmup=3, steps=8, **extra)
    if quant == "nf4":
        spec.update(quant="nf4", ckpt=True)
    if dry:
        spec.update(model="tiny", warmup=1, steps=2, optim="adamw",
                    extra=tiny_case_overrides(tiny) + list(extra.get("extra", [])))
    return spec


def run_scaling(specs: list[tuple[dict, str | None]], rec: Recorder, budget: Budget, phase: str,
                reserve: float, case_timeout: float) -> None:
    """Run (spec, devices) pairs one after another; rows carry tokens/s per GPU against their base."""
    for spec, devices in specs:
        left = budget.left() - reserve
        if left < 45:
            rec.add({"phase": phase, "name": spec["name"], "spec": spec, "error": "not run: time budget spent"})
            continue
        row = run_case(spec, min(case_timeout, left), rec.log, devices)
        rec.add(with_ratio({**row, "phase": phase, "spec": spec, "devices": devices}, rec.rows))


def run_pairs(pairs: list[tuple[dict, dict]], rec: Recorder, budget: Budget, phase: str, reserve: float,
              case_timeout: float) -> None:
    """Two 2-GPU cases at once, on GPUs 0,1 and 2,3 (separate GPUs, shared host)."""
    for a, b in pairs:
        left = budget.left() - reserve
        if left < 60:
            for s in (a, b):
                rec.add({"phase": phase, "name": s["name"], "spec": s, "error": "not run: time budget spent"})
            continue
        with ThreadPoolExecutor(2) as pool:
            jobs = [pool.submit(run_case, s, min(case_timeout, left), rec.log, d) for s, d in ((a, "0,1"), (b, "2,3"))]
            rows = [j.result() for j in jobs]
        for s, d, row in zip((a, b), ("0,1", "2,3"), rows):
            rec.add(with_ratio({**row, "phase": phase, "spec": s, "devices": d,
                                "concurrent_with": (b if s is a else a)["name"]}, rec.rows))


def with_ratio(row: dict, earlier: list[dict]) -> dict:
    """Add per-GPU tokens/s relative to the spec's `base` row (the 1-GPU run of the same model)."""
    base = next((r for r in earlier if r["name"] == row["spec"].get("base") and "tokens_per_s" in r), None)
    if base and "tokens_per_s" in row:
        row["vs_1gpu"] = row["tokens_per_s"] / base["tokens_per_s"]
    return row


# ---- 2. correctness on GPUs ---------------------------------------------------------------------

def tiny_overrides(tiny: dict) -> list[str]:
    """`lora-launch` overrides for the tiny model (the tests' fixture) and a short, quiet run."""
    return [f"model.path={tiny['model']}", f"data.path={tiny['data']}", "data.source=local", "train.seq_len=64",
            "logging.progress_bar=false", "logging.tensorboard=false", "sample.max_new_tokens=0",
            "eval.at_start=false"]


def lora_launch(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "lora_launch.launcher.cli", *overrides]


def tiny_env(devices: str | None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               NCCL_NVLS_ENABLE="0", TORCHINDUCTOR_COMPILE_THREADS="2")  # many runs share the host's cores
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    return env


def run_group(cmds: list[tuple[list[str], dict]], logs: list[Path], timeout: float) -> list[int | str]:
    """Start every command (own session each), wait for all; exit codes, 'timeout' for those killed."""
    procs = []
    for (cmd, env), log in zip(cmds, logs):
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=WORK,
                                          start_new_session=True))
    end, codes = time.monotonic() + timeout, []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, end - time.monotonic())))
        except subprocess.TimeoutExpired:
            kill_trees([p])
            p.wait()
            codes.append("timeout")
    return codes


def correctness_runs(tiny: dict, dry: bool) -> list[dict]:
    """Every distributed option x {LoRA, QLoRA}, plus QLoRA under ZeRO-3 and FSDP2 in the form they allow."""
    runs = []
    for d in DISTRIBUTED:
        runs.append({"name": f"lora_{d}", "overrides": [f"distributed={d}"]})
        runs.append({"name": f"qlora_{d}", "overrides": [f"distributed={d}", "quant=nf4"]})
        if d.startswith(("zero3", "fsdp2")):
            runs.append({"name": f"qlora_{d}_bf16_storage",
                         "overrides": [f"distributed={d}", "quant=nf4", "quant.storage_dtype=bfloat16"]})
    return runs


def correctness_row(run: dict, rc, seconds: float, log: Path, run_dir: Path) -> dict:
    """trained (losses, world, backend) / refused (the error line) / failed (the last error)."""
    out = log.read_text(errors="replace") if log.exists() else ""
    row = {"name": run["name"], "overrides": run["overrides"], "rc": rc, "seconds": round(seconds, 1)}
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    started = [l for l in out.splitlines() if l.startswith("training ") and "global batch" in l]
    errors = [l for l in out.splitlines() if l.startswith("error:")]
    if rc == 0 and losses:
        row.update(outcome="trained", losses=losses, launch=started[-1] if started else None)
    elif errors and not any(l.startswith("launch:") for l in out.splitlines()):
        row.update(outcome="refused before launch", message=errors[0])
    else:
        row.update(outcome="failed", message=last_error(out), losses=losses)
    return row


def run_correctness(tiny: dict, rec: Recorder, budget: Budget, dry: bool, reserve: float,
                    extra_groups: list | None = None) -> list:
    """The correctness runs, several at once (tiny model: the GPUs have room), each on a GPU pair."""
    runs = correctness_runs(tiny, dry)
    base = WORK / "correct"
    base.mkdir(parents=True, exist_ok=True)
    timeout = min(240.0, budget.left() - reserve)
    if timeout < 60:
        for r in runs:
            rec.add({"phase": "correct", "name": r["name"], "error": "not run: time budget spent"})
        return []

    def one(i_run):
        i, run = i_run
        run_dir, log = base / run["name"], base / f"{run['name']}.log"
        port = 29600 + i
        overrides = [*tiny_overrides(tiny), f"run.dir={run_dir}", "train.max_steps=4", "train.micro_batch_size=2",
                     "launcher.num_processes=2", f"launcher.main_process_port={port}", *run["overrides"]]
        t0 = time.monotonic()
        (rc,) = run_group([(lora_launch(overrides), tiny_env(None if dry else ("0,1", "2,3")[i % 2]))], [log], timeout)
        return correctness_row(run, rc, time.monotonic() - t0, log, run_dir)

    jobs = list(enumerate(runs))
    with ThreadPoolExecutor(2 if dry else 6) as pool:
        side = [pool.submit(g) for g in extra_groups or []]
        for row in pool.map(one, jobs):
            rec.add({"phase": "correct", **row})
            rec.note(f"===== correct {row['name']}\n" + tail(base / f"{row['name']}.log", 3000))
        return [s.result() for s in side]


# ---- 3. two "nodes" from a hostfile, killed and resumed -----------------------------------------

def host_address() -> tuple[str, str]:
    """A non-loopback IPv4 address of this host that is up, and its interface; else loopback."""
    import psutil

    stats = psutil.net_if_stats()
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127.") and stats.get(name, None) \
                    and stats[name].isup:
                return a.address, name
    return "127.0.0.1", "lo"


class TwoNodes:
    """The same `lora-launch launcher=hostfile` command on two "nodes" of this host."""

    def __init__(self, tiny: dict, dry: bool, steps: int, port: int):
        self.addr, self.iface = host_address()
        self.per_node = 1 if dry else 2
        self.devices = [None, None] if dry else ["0,1", "2,3"]
        root = WORK / "hostfile"
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.hostfile = root / "hosts"
        second = "localhost" if self.addr != "127.0.0.1" else "127.0.0.2"
        # two lines for one host: the node ranks must be given, the first line is the rendezvous
        self.hostfile.write_text(f"{self.addr} slots={self.per_node}\n{second} slots={self.per_node}\n")
        self.common = [*tiny_overrides(tiny), "launcher=hostfile", f"launcher.hostfile={self.hostfile}",
                       f"launcher.main_process_port={port}", f"train.max_steps={steps}", "checkpoint.every_steps=2",
                       "train.micro_batch_size=2"]

    def commands(self, run_dir: Path) -> list[tuple[list[str], dict]]:
        return [(lora_launch([*self.common, f"run.dir={run_dir}", f"launcher.node_rank={r}"]), tiny_env(self.devices[r]))
                for r in (0, 1)]

    def logs(self, tag: str) -> list[Path]:
        return [self.root / f"{tag}-node{r}.log" for r in (0, 1)]


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
        bus = dict(l.split(", ")[::-1] for l in smi("--query-gpu=index,pci.bus_id"))
        apps = [l.split(", ") for l in smi("--query-compute-apps=pid,gpu_bus_id")]
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
    return [l.strip() for l in res.stdout.splitlines() if l.strip()]


def kill_midrun(nodes: TwoNodes, run_dir: Path, kill_at: int, timeout: float) -> dict:
    """Start both nodes, SIGKILL both once metrics show step >= kill_at; what was there at the kill."""
    procs = []
    for (cmd, env), log in zip(nodes.commands(run_dir), nodes.logs("killed")):
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=WORK,
                                          start_new_session=True))
    end, placement, seen = time.monotonic() + timeout, None, 0
    while time.monotonic() < end and all(p.poll() is None for p in procs):
        steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
        seen = max(steps, default=0)
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
    return {"killed_at_step_seen": seen, "exited_before_kill": exited, "killed_groups": len(groups),
            "gpus_by_node": placement, "rows_at_kill": len([r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]),
            "checkpoints_at_kill": sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))}


def run_hostfile(tiny: dict, rec: Recorder, budget: Budget, dry: bool, reference: dict | None) -> None:
    """Killed and resumed two-node run against an uninterrupted one; the checks as one row."""
    steps = 60
    if budget.left() < 70:
        rec.add({"phase": "hostfile", "name": "two_nodes_kill_resume", "error": "not run: time budget spent"})
        return
    nodes = TwoNodes(tiny, dry, steps, 29700)
    run_dir = nodes.root / "killed"
    row = {"name": "two_nodes_kill_resume", "address": nodes.addr, "interface": nodes.iface,
           "hostfile": nodes.hostfile.read_text(), "per_node": nodes.per_node, "devices": nodes.devices}
    row["kill"] = kill_midrun(nodes, run_dir, 6, min(200.0, budget.left() - 30))
    t0 = time.monotonic()
    codes = run_group(nodes.commands(run_dir), nodes.logs("resumed"), min(200.0, budget.left() - 10))
    row.update(resume_rc=codes, resume_seconds=round(time.monotonic() - t0, 1))
    row.update(check_resume(run_dir, nodes.logs("resumed")[0], steps))
    if reference:
        row["reference_rc"] = reference["rc"]
        row.update(compare_losses(read_jsonl(reference["run_dir"] / "metrics.jsonl"),
                                  read_jsonl(run_dir / "metrics.jsonl")))
    for log in nodes.logs("killed") + nodes.logs("resumed") + (reference or {}).get("logs", []):
        rec.note(f"===== {log.name}\n" + tail(log, 2500))
    rec.add({"phase": "hostfile", **row})


def reference_group(tiny: dict, dry: bool):
    """The uninterrupted two-node run, as a job for the correctness pool (it needs no GPU of its own)."""
    def go() -> dict:
        nodes = TwoNodes(tiny, dry, 60, 29800)
        run_dir = nodes.root / "reference"
        codes = run_group(nodes.commands(run_dir), nodes.logs("reference"), 240.0)
        return {"rc": codes, "run_dir": run_dir, "logs": nodes.logs("reference")}
    return go


def check_resume(run_dir: Path, node0_log: Path, steps: int) -> dict:
    """Each step's metrics row exactly once, and the resume line of the log."""
    got = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    text = node0_log.read_text(errors="replace") if node0_log.exists() else ""
    resumed = [l for l in text.splitlines() if "resumed from" in l]
    node_lines = [l for l in text.splitlines() if l.startswith("node ") or l.startswith("launch:")]
    return {"steps_once_each": got == list(range(1, steps + 1)), "metric_steps": len(got),
            "resume_line": resumed[0] if resumed else None, "node0_launch": node_lines}


def compare_losses(ref_rows: list[dict], rows: list[dict]) -> dict:
    """The resumed run's losses against the uninterrupted run's, step by step."""
    ref = {r["step"]: r["loss"] for r in ref_rows if "loss" in r}
    got = {r["step"]: r["loss"] for r in rows if "loss" in r}
    common = sorted(set(ref) & set(got))
    diffs = [abs(ref[s] - got[s]) for s in common]
    unequal = [s for s in common if ref[s] != got[s]]
    return {"compared_steps": len(common), "bitwise_equal_steps": len(common) - len(unequal),
            "first_unequal_step": unequal[0] if unequal else None,
            "max_abs_loss_diff": max(diffs, default=None),
            "first_losses": {"reference": [ref[s] for s in common[:4]], "resumed": [got[s] for s in common[:4]]}}


# ---- helpers ------------------------------------------------------------------------------------

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
    lines = [l for l in out.splitlines() if l.strip()]
    raised = [l for l in lines if re.search(r"\w+(Error|Exception): ", l)]
    errs = raised or [l for l in lines if l.lower().startswith("error")]
    return (errs[-1] if errs else (lines[-1] if lines else "no output"))[:300]


def summary(row: dict) -> str:
    if "tokens_per_s" in row:
        ratio = f", {row['vs_1gpu']:.1%} of 1 GPU" if "vs_1gpu" in row else ""
        return f"{row['tokens_per_s']:.0f} tok/s/GPU{ratio}, peak {row.get('peak_gib', 0):.1f} GiB"
    if row.get("outcome") == "trained":
        m = re.search(r"x (\d+) processes\).*, (\S+) on (\S+)$", row.get("launch") or "")
        how = f" ({m.group(1)} processes, {m.group(2)} on {m.group(3)})" if m else ""
        return f"trained{how}, losses {[round(x, 4) for x in row['losses']]}"
    if "outcome" in row:
        return f"{row['outcome']}: {row.get('message', '')}"
    keys = ("steps_once_each", "resume_line", "bitwise_equal_steps", "compared_steps", "max_abs_loss_diff")
    return row.get("error") or str({k: row[k] for k in keys if k in row})


def table(rows: list[dict]) -> str:
    meta = rows[0] if rows else {}
    lines = [f"{meta.get('card')}, {meta.get('date')}",
             f"{'phase':9} {'case':30} {'GPUs':>4} {'tok/s/GPU':>10} {'vs 1 GPU':>9} {'peak GiB':>9} {'cv':>6}"]
    for r in rows:
        if "tokens_per_s" in r:
            vs = f"{r['vs_1gpu']:.1%}" if "vs_1gpu" in r else "-"
            lines.append(f"{r['phase']:9} {r['name']:30} {r.get('world', '?'):>4} {r['tokens_per_s']:10.0f} {vs:>9} "
                         f"{r.get('peak_gib', 0):9.1f} {r.get('step_time_cv', 0):6.3f}")
        else:
            lines.append(f"{r['phase']:9} {r['name']:30} {summary(r)[:200]}")
    return "\n".join(lines)


def environment(rec: Recorder) -> None:
    """What the host is: GPUs and their links, addresses (in the log)."""
    for cmd in (["nvidia-smi", "-L"], ["nvidia-smi", "topo", "-m"], ["ip", "-4", "-o", "addr"]):
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            rec.note(f"$ {' '.join(cmd)}\n{res.stdout}{res.stderr}")
        except (OSError, subprocess.SubprocessError) as e:
            rec.note(f"$ {' '.join(cmd)}: {e}")


# ---- the phases ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.multi", description=__doc__)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for everything")
    parser.add_argument("--phases", nargs="*", default=["scaling", "correct", "hostfile", "two_gpu", "qlora"])
    parser.add_argument("--tiny-model", default=str(REPO / ".benchtiny/model"))
    parser.add_argument("--tiny-data", default=str(REPO / ".benchtiny/data.jsonl"))
    parser.add_argument("--dry", action="store_true", help="CPU plumbing check with the tiny model")
    args = parser.parse_args(argv)
    tiny = {"model": args.tiny_model, "data": args.tiny_data}
    for key, path in tiny.items():
        if not Path(path).exists():
            print(f"error: --tiny-{key} {path} not found (build it: see bench/README.md)", file=sys.stderr)
            return 2
    budget, dry = Budget(args.budget), args.dry
    WORK.mkdir(parents=True, exist_ok=True)
    rec = Recorder(Path(args.out), {"card": card(), "date": datetime.datetime.now(datetime.timezone.utc)
                                    .strftime("%Y-%m-%d")})
    environment(rec)
    n = 2 if dry else 4
    if "scaling" in args.phases:
        prep = run_case(case("prepare", "prepare", save_7b=False), 120, rec.log)  # the 32000-id tokenizer
        rec.add({**prep, "phase": "scaling", "name": "prepare_tokenizer"})
        base = dict(base="lora_ddp_1gpu")
        specs = [(scaling_spec("lora_ddp_1gpu", 1, "ddp", dry, tiny), None)]
        specs += [(scaling_spec(f"lora_{d}_{n}gpu", n, d, dry, tiny, **base), None) for d in ("ddp", "zero2", "zero3")]
        # phases 2 and 3 keep 200 s for themselves
        run_scaling(specs, rec, budget, "scaling", 200.0, 150.0)
    reference = None
    if "correct" in args.phases:
        side = [reference_group(tiny, dry)] if "hostfile" in args.phases else []
        found = run_correctness(tiny, rec, budget, dry, 110.0, side)
        reference = found[0] if found else None
    if "hostfile" in args.phases:
        run_hostfile(tiny, rec, budget, dry, reference)
    if "two_gpu" in args.phases:
        run_two_gpu(tiny, rec, budget, dry)
    if "qlora" in args.phases:
        run_qlora(tiny, rec, budget, dry, n)
    print(table(rec.rows))
    return 0


def run_two_gpu(tiny: dict, rec: Recorder, budget: Budget, dry: bool) -> None:
    """2-GPU LoRA rows two at a time, with a 1-GPU baseline on ZeRO-3's kernels beside the zero3 row."""
    b = dict(base="lora_ddp_1gpu")
    if not any(r["name"] == "lora_ddp_1gpu" and "tokens_per_s" in r for r in rec.rows):
        run_scaling([(scaling_spec("lora_ddp_1gpu", 1, "ddp", dry, tiny), None)], rec, budget, "two_gpu", 0.0, 150.0)
    # ZeRO-3 runs eager decoder layers (train.compile=auto -> loss): its fair 1-GPU baseline
    eager = scaling_spec("lora_ddp_1gpu_compile_loss", 1, "ddp", dry, tiny, compile="loss", **b)
    two = [scaling_spec(f"lora_{d}_2gpu", 2, d, dry, tiny, **b) for d in ("ddp", "zero2", "zero3")]
    if dry:  # the CPU has no GPUs to split: one at a time
        run_scaling([(s, None) for s in (*two, eager)], rec, budget, "two_gpu", 0.0, 120.0)
        return
    run_pairs([(two[0], two[1]), (two[2], eager)], rec, budget, "two_gpu", 0.0, 150.0)


def run_qlora(tiny: dict, rec: Recorder, budget: Budget, dry: bool, n: int) -> None:
    """QLoRA (nf4 + gradient checkpointing) on 1 and n GPUs with ddp; the 7B is saved for it first."""
    specs = [scaling_spec("qlora_ddp_1gpu", 1, "ddp", dry, tiny, quant="nf4"),
             scaling_spec(f"qlora_ddp_{n}gpu", n, "ddp", dry, tiny, quant="nf4", base="qlora_ddp_1gpu")]
    if not dry:
        if budget.left() < 150:
            for s in specs:
                rec.add({"phase": "qlora", "name": s["name"], "spec": s, "error": "not run: time budget spent"})
            return
        prep = run_case(case("prepare", "prepare"), min(120.0, budget.left() - 90), rec.log)
        rec.add({**prep, "phase": "qlora", "name": "prepare_7b"})
    run_scaling([(s, None) for s in specs], rec, budget, "qlora", 0.0, 150.0)


if __name__ == "__main__":
    sys.exit(main())
