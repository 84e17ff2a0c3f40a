"""From a resolved config to the files of a run directory and the `accelerate launch` that runs it."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from launcher.accelerate_config import accelerate_config, deepspeed_config
from launcher.compose import write_config, write_yaml


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def processes_per_node(cfg: DictConfig) -> int:
    """launcher.num_processes, with `auto` = every visible GPU (1 process on CPU)."""
    n = cfg.launcher.num_processes
    return max(visible_gpus(), 1) if n == "auto" else int(n)


def write_launch_files(cfg: DictConfig, run_dir: Path) -> dict[str, Path]:
    """config.yaml, accelerate.yaml and (for DeepSpeed) ds_config.json in the run dir."""
    files = {"config": write_config(cfg, run_dir)}
    world = processes_per_node(cfg) * cfg.launcher.num_machines
    ds_path = None
    if cfg.distributed.strategy == "deepspeed":
        ds_path = run_dir / "ds_config.json"
        tmp = ds_path.with_name(ds_path.name + ".tmp")
        tmp.write_text(json.dumps(deepspeed_config(cfg, world), indent=2))
        tmp.replace(ds_path)
        files["deepspeed"] = ds_path
    files["accelerate"] = run_dir / "accelerate.yaml"
    write_yaml(files["accelerate"], accelerate_config(cfg, world, str(ds_path) if ds_path else None))
    return files


def launch_command(files: dict[str, Path], python: str = sys.executable) -> list[str]:
    """`accelerate launch --config_file … -m train --config …`, run with this interpreter."""
    return [python, "-m", "accelerate.commands.launch", "--config_file", str(files["accelerate"]),
            "-m", "train", "--config", str(files["config"])]


def printable(cmd: list[str]) -> str:
    """The command as a user would type it."""
    if cmd[1:3] == ["-m", "accelerate.commands.launch"]:
        cmd = ["accelerate", "launch"] + cmd[3:]
    return shlex.join(cmd)


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run the launch in its own process group, forwarding SIGTERM/SIGINT to all of it."""
    proc = subprocess.Popen(cmd, env=env or launch_env(), start_new_session=True)

    def forward(signum, _frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
