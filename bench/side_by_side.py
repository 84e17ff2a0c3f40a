"""Start one config several times at once on one GPU and group the runs by equal losses.

`python -m bench.side_by_side [--out DIR] [--runs 6] [--steps 40] [--deterministic-algorithms] [-- OVERRIDES...]`

Runs that differ from each other without any kill cannot be held to a bitwise resume: this is the
check that tells a resume's error from the computation's own run-to-run spread. The overrides are
bench.kill_resume's (background saves every 5 steps, losses logged every step); the environment is
passed on, so a compiler setting can be compared by running this twice.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
from pathlib import Path

from bench.kill_resume import base_overrides, losses, start
from bench.run import card, versions


def groups(runs: dict[str, dict[int, float]]) -> list[list[str]]:
    """Run names grouped by identical loss sequences."""
    by_losses: dict[tuple, list[str]] = {}
    for name, got in runs.items():
        by_losses.setdefault(tuple(sorted(got.items())), []).append(name)
    return sorted(by_losses.values(), key=len, reverse=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="side-by-side-out")
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument(
        "--deterministic-algorithms",
        action="store_true",
        help="every process of the runs starts with torch.use_deterministic_algorithms (bench/deterministic_site)",
    )
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out).absolute()
    work = out / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    overrides = base_overrides(args.steps) + list(args.overrides)
    if args.deterministic_algorithms:
        site = str(Path(__file__).parent / "deterministic_site")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
    inductor_env = {k: v for k, v in os.environ.items() if k.startswith("TORCHINDUCTOR")}
    procs = {f"run-{n}": start(work / f"run-{n}", overrides) for n in range(args.runs)}
    codes = {name: p.wait(timeout=900) for name, p in procs.items()}
    runs = {name: losses(work / name) for name in procs}
    reference = runs["run-0"]
    first_diff = {
        name: next((s for s in sorted(reference) if got.get(s) != reference[s]), None) for name, got in runs.items()
    }
    row = {
        "card": card(),
        "date": datetime.date.today().isoformat(),
        "versions": versions(),
        "overrides": overrides,
        "env": inductor_env,
        "deterministic_algorithms": args.deterministic_algorithms,
        "exit_codes": codes,
        "steps_logged": {n: len(g) for n, g in runs.items()},
        "first_diff_from_run_0": first_diff,
        "groups": groups(runs),
    }
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return 0 if len(row["groups"]) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
