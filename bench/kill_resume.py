"""Kill a run at random steps and resume it; every resumed run must match an uninterrupted one bit for bit.

`python -m bench.kill_resume [--out DIR] [--kills 12] [--parallel 6] [--steps 120] [--slow-write S] [-- OVERRIDES...]`

The tiny model with a background save every 5 steps (checkpoint.background_min_mib=0, so every periodic
save goes through the writer thread) runs once uninterrupted. Then each kill starts the same command in a
run directory of its own, waits until metrics.jsonl reaches a drawn step, and ends it one of three ways:

- `group`:   SIGKILL to the launcher's process group (the ranks see their parent die and stop with a
             checkpoint); the same command is run again.
- `rank`:    SIGKILL to one rank under launcher.max_restarts=2; the launcher restarts it by itself.
- `sigterm`: SIGTERM to the launcher, as a scheduler preempts; the same command is run again.

Each row of OUT/results.jsonl says where it was killed, which checkpoint the run resumed from, whether a
background save was in flight at the kill, and how many of the losses equal the uninterrupted run's (the
floats as metrics.jsonl writes them). Runs share the GPU a few at a time (`--parallel`). Extra overrides
after `--` go to every run (e.g. `train.compile=none`); the runs have `train.deterministic=true` unless one says
otherwise. `--slow-write S` makes every checkpoint's file writing sleep S seconds first (the tests' fault
injection, tests/support/inject), so that most stops come while a background save is in flight.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.run import card, versions
from lora_launch.launcher.supervise import ranks_of

KINDS = ("group", "rank", "sigterm")


def base_overrides(steps: int) -> list[str]:
    return [
        f"train.max_steps={steps}",
        "checkpoint.every_steps=5",
        "checkpoint.background_min_mib=0",
        "checkpoint.keep_last=3",
        "logging.every_steps=1",
        "eval.at_start=false",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "sample.max_new_tokens=0",
    ]


def cli(run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "lora_launch.cli", f"run.dir={run_dir}", *overrides]


INJECT = Path(__file__).resolve().parents[1] / "tests" / "support" / "inject"
ENV = dict(os.environ)


def slow_writes(seconds: float) -> None:
    """Every process started from here on loads the tests' sitecustomize, which delays each checkpoint's writing."""
    ENV["PYTHONPATH"] = os.pathsep.join(p for p in (str(INJECT), ENV.get("PYTHONPATH")) if p)
    ENV["SLOW_CHECKPOINT_WRITE_S"] = str(seconds)


def start(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    """The launcher in a session of its own (its group is what `group` kills), output appended to RUN.log."""
    log = open(f"{run_dir}.log", "a")
    return subprocess.Popen(
        cli(run_dir, overrides), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=ENV
    )


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def last_step(run_dir: Path) -> int:
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except OSError:
        return 0
    steps = [int(m) for m in re.findall(r'"step": (\d+), "loss"', text)]
    return max(steps, default=0)


def wait_gone(procs, timeout: float) -> None:
    import psutil

    psutil.wait_procs(procs, timeout=timeout)


def in_flight(run_dir: Path) -> list[int]:
    """The steps whose save is in flight now: their staging directory is there, not yet renamed at its commit."""
    found = (run_dir / "checkpoints").glob(".staging-step-*")
    return sorted(int(p.name.rsplit("-", 1)[1]) for p in found)


def one_kill(work: Path, n: int, kind: str, at: int, overrides: list[str]) -> dict:
    """Start a run, kill it `kind`'s way once metrics.jsonl reaches step `at`, and see it to the end."""
    run_dir = work / f"kill-{n:02d}-{kind}-{at}"
    shutil.rmtree(run_dir, ignore_errors=True)
    extra = ["launcher.max_restarts=2"] if kind == "rank" else ["launcher.max_restarts=0"]
    proc = start(run_dir, overrides + extra)
    t0 = time.monotonic()
    while last_step(run_dir) < at and proc.poll() is None and time.monotonic() - t0 < 400:
        time.sleep(0.02)
    seen = last_step(run_dir)
    below = ranks_of(proc.pid)
    saving = in_flight(run_dir)  # looked at just before the kill: a save may still commit in between
    if kind == "group":
        os.killpg(proc.pid, signal.SIGKILL)
        wait_gone(below, 180)
    elif kind == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        below[0].send_signal(signal.SIGKILL)
    rc_first = proc.wait(timeout=400)
    rc = rc_first
    if kind != "rank":
        rc = start(run_dir, overrides + extra).wait(timeout=400)
    log = Path(f"{run_dir}.log").read_text()
    return {
        "kill": n,
        "kind": kind,
        "asked_step": at,
        "seen_step": seen,
        "resumed_from": re.findall(r"resumed from \S*?(step-\d+)", log),
        "save_in_flight": saving,
        "rc_first": rc_first,
        "rc": rc,
        "dir": run_dir,
    }


def compare(row: dict, reference: dict) -> dict:
    """The row with how many of its losses equal the uninterrupted run's."""
    got = losses(row.pop("dir"))
    diff = [s for s in sorted(reference) if got.get(s) != reference[s]]
    return {
        **row,
        "equal": len(reference) - len(diff),
        "of": len(reference),
        "first_diff": diff[0] if diff else None,
        "bitwise": not diff and bool(reference),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="kill-resume-out")
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--parallel", type=int, default=12)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slow-write", type=float, default=0.0, help="seconds each checkpoint's writing sleeps first")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.slow_write:
        slow_writes(args.slow_write)
    out = Path(args.out).absolute()
    work = out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    # a resume repeats an uninterrupted run's bits only where two uninterrupted runs repeat each other's: on GPUs,
    # with deterministic kernels (bench/README.md; `-- train.deterministic=false` shows the spread without them)
    overrides = base_overrides(args.steps) + ["train.deterministic=true", *args.overrides]
    head = {
        "card": card(),
        "date": datetime.date.today().isoformat(),
        "versions": versions(),
        "overrides": overrides,
        "slow_write_s": args.slow_write,
    }
    results = out / "results.jsonl"
    with results.open("a") as f:
        f.write(json.dumps(head) + "\n")
    print(json.dumps(head), flush=True)

    reference_dir = work / "uninterrupted"
    shutil.rmtree(reference_dir, ignore_errors=True)
    draw = random.Random(args.seed)
    plan = [(n, KINDS[n % len(KINDS)], draw.randint(3, args.steps - 3)) for n in range(args.kills)]
    with ThreadPoolExecutor(args.parallel + 1) as pool:  # the uninterrupted run alongside the kills
        uninterrupted = pool.submit(lambda: start(reference_dir, overrides).wait(timeout=900))
        killed = [pool.submit(one_kill, work, *p, overrides) for p in plan]
        print(f"uninterrupted: rc={uninterrupted.result()}", flush=True)
        reference = losses(reference_dir)
        rows = []
        for future in killed:
            rows.append(compare(future.result(), reference))
            with results.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
            print(json.dumps(rows[-1]), flush=True)
    bitwise = sum(r["bitwise"] for r in rows)
    overlap = [r for r in rows if r["save_in_flight"]]
    print(
        f"{bitwise} of {len(rows)} kills resumed bitwise; {len(overlap)} came while a background save was in "
        f"flight (its staging directory there just before the kill), {sum(r['bitwise'] for r in overlap)} of them "
        "bitwise",
        flush=True,
    )
    return 0 if bitwise == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
