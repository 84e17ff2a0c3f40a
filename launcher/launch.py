"""From a resolved config to the files of a run directory and the `accelerate launch` that runs it."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from lora_launch.conf.schema import plain
from lora_launch.launcher.accelerate_config import accelerate_config
from lora_launch.launcher.hostfile import interface_for
from lora_launch.launcher.topology import Topology
from lora_launch.run.own_configs import merged_accelerate, merged_deepspeed
from lora_launch.run.plan import RunPlan
from lora_launch.run.process import NODE_RANK_ENV, SUPERVISOR_ENV
from lora_launch.run.rundir import write_atomic, write_config
from lora_launch.strategies import strategy_for


def node_neutral(cfg: DictConfig, topo: Topology) -> DictConfig:
    """The config as written to the run dir: the launch's shape filled in, nothing node-specific.

    Every node of a multi-node launch writes the same files into the same run dir, so this node's
    rank stays out of them (it goes on the command line as `--machine_rank`).
    """
    shared = OmegaConf.create(plain(cfg))
    with open_dict(shared):
        shared.launcher.num_processes = topo.procs_per_node
        shared.launcher.num_machines = topo.num_machines
        shared.launcher.main_process_ip = topo.main_ip
        shared.launcher.machine_rank = 0
        shared.launcher.node_rank = None
    return shared


def write_launch_files(cfg: DictConfig, run_dir: Path, topo: Topology, plan: RunPlan) -> dict[str, Path]:
    """config.yaml, accelerate.yaml and the strategy's files (DeepSpeed's ds_config.json, FSDP2's fsdp2.json) in the
    run dir, the same on every node."""
    shared = node_neutral(cfg, topo)
    files = {"config": write_config(shared, run_dir)}
    ds_path = None
    strategy = strategy_for(cfg)
    ds = strategy.deepspeed_config(shared, plan)
    if ds is not None:
        ds = merged_deepspeed(ds, cfg.distributed.deepspeed_config)
        ds_path = write_atomic(run_dir / "ds_config.json", json.dumps(ds, indent=2))
        files["deepspeed"] = ds_path
    for key, (name, content) in strategy.shown_files(shared, plan).items():  # what the ranks apply (from config.yaml)
        files[key] = write_atomic(run_dir / name, json.dumps(content, indent=2))
    acc = merged_accelerate(
        accelerate_config(shared, plan, str(ds_path) if ds_path else None), cfg.launcher.accelerate_config
    )
    files["accelerate"] = write_atomic(run_dir / "accelerate.yaml", yaml.safe_dump(acc, sort_keys=False))
    return files


def launch_command(
    files: dict[str, Path],
    python: str = sys.executable,
    node_rank: int | None = None,
    main_ip: str | None = None,
    main_port: int | None = None,
) -> list[str]:
    """`accelerate launch --config_file … [--machine_rank N] -m lora_launch.train --config …`, run with this interpreter."""
    node = []
    if node_rank is not None:
        node += ["--machine_rank", str(node_rank)]
    if main_ip is not None:
        node += ["--main_process_ip", main_ip]
    if main_port is not None:
        node += ["--main_process_port", str(main_port)]
    return [
        python,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(files["accelerate"]),
        *node,
        "-m",
        "lora_launch.train",
        "--config",
        str(files["config"]),
    ]


def node_env_vars(cfg: DictConfig, topo: Topology, environ: dict[str, str] | None = None) -> dict[str, str]:
    """GLOO/NCCL_SOCKET_IFNAME for a multi-node launch, unless the user set them.

    Without them gloo binds 127.0.0.1 and ranks on other hosts never connect.
    """
    environ = os.environ if environ is None else environ
    if topo.num_machines == 1:
        return {}
    iface = cfg.launcher.network_interface or interface_for(topo.main_ip)
    if iface is None:
        return {}
    return {k: iface for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if k not in environ}


def printable(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """The command as a user would type it (with the environment it needs in front)."""
    if cmd[1:3] == ["-m", "accelerate.commands.launch"]:
        cmd = ["accelerate", "launch"] + cmd[3:]
    prefix = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join(prefix + [shlex.join(cmd)])


def launch_env(extra: dict[str, str] | None = None, node_rank: int = 0) -> dict[str, str]:
    """This process's environment, quietened for training, plus `extra`; ranks learn who supervises them."""
    env = dict(os.environ, **(extra or {}))
    env[SUPERVISOR_ENV] = str(os.getpid())
    env[NODE_RANK_ENV] = str(node_rank)
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
