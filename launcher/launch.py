"""From a resolved config to the files of a run directory and the `accelerate launch` that runs it."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from lora_launch.launcher.accelerate_config import accelerate_config, deepspeed_config
from lora_launch.launcher.compose import plain
from lora_launch.launcher.hostfile import interface_for
from lora_launch.launcher.topology import Topology, topology


def processes_per_node(cfg: DictConfig) -> int:
    """launcher.num_processes, with `auto` = every visible GPU (1 process on CPU), or the hostfile's slots."""
    return topology(cfg).procs_per_node


def node_neutral(cfg: DictConfig, topo: Topology) -> DictConfig:
    """The config as written to the run dir: the launch's shape filled in, nothing node-specific.

    Every node of a multi-node launch writes the same files into the same run dir, so this node's
    rank stays out of them (it goes on the command line as `--machine_rank`).
    """
    shared = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(shared):
        shared.launcher.num_processes = topo.procs_per_node
        shared.launcher.num_machines = topo.num_machines
        shared.launcher.main_process_ip = topo.main_ip
        shared.launcher.machine_rank = 0
        shared.launcher.node_rank = None
    return shared


def write_text_atomic(path: Path, text: str) -> Path:
    """Write through a temporary name unique to this process, then rename (nodes may race on a shared dir)."""
    tmp = path.with_name(f"{path.name}.tmp.{socket.gethostname()}.{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_launch_files(cfg: DictConfig, run_dir: Path, topo: Topology | None = None) -> dict[str, Path]:
    """config.yaml, accelerate.yaml and (for DeepSpeed) ds_config.json in the run dir, the same on every node."""
    topo = topo or topology(cfg)
    shared = node_neutral(cfg, topo)
    run_dir.mkdir(parents=True, exist_ok=True)
    files = {"config": write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(plain(shared), sort_keys=False))}
    ds_path = None
    if cfg.distributed.strategy == "deepspeed":
        ds_path = write_text_atomic(run_dir / "ds_config.json",
                                    json.dumps(deepspeed_config(shared, topo.world_size), indent=2))
        files["deepspeed"] = ds_path
    acc = accelerate_config(shared, topo.world_size, str(ds_path) if ds_path else None)
    files["accelerate"] = write_text_atomic(run_dir / "accelerate.yaml", yaml.safe_dump(acc, sort_keys=False))
    return files


def launch_command(files: dict[str, Path], python: str = sys.executable, node_rank: int | None = None,
                   main_ip: str | None = None) -> list[str]:
    """`accelerate launch --config_file … [--machine_rank N] -m lora_launch.train --config …`, run with this interpreter."""
    node = []
    if node_rank is not None:
        node += ["--machine_rank", str(node_rank)]
    if main_ip is not None:
        node += ["--main_process_ip", main_ip]
    return [python, "-m", "accelerate.commands.launch", "--config_file", str(files["accelerate"]), *node,
            "-m", "lora_launch.train", "--config", str(files["config"])]


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


def launch_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, quietened for training, plus `extra`."""
    env = dict(os.environ, **(extra or {}))
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _die_with_parent() -> None:
    """In the child: be SIGKILLed if the launcher dies (its own session would otherwise outlive it,
    training on after the run-dir lock is gone). Ranks do the same with their parent."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))


def run(cmd: list[str], env: dict[str, str] | None = None, received: list[int] | None = None) -> int:
    """Run the launch in its own process group, forwarding SIGTERM/SIGINT to all of it.

    Signals forwarded are appended to `received`, for callers that treat a SIGTERM stop as preemption.
    """
    proc = subprocess.Popen(cmd, env=env or launch_env(), start_new_session=True, preexec_fn=_die_with_parent)

    def forward(signum, _frame):
        if received is not None:
            received.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()
        if received:
            # the launcher itself may die of the signal while training is still checkpointing
            wait_for_group(proc.pid)
        return rc
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def wait_for_group(pgid: int, timeout_s: float = 900.0) -> None:
    """Wait until no live (non-zombie) process is left in process group `pgid`."""
    import time

    import psutil

    def alive() -> bool:
        for p in psutil.process_iter(["status"]):
            try:
                if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    return True
            except (ProcessLookupError, psutil.Error):
                continue
        return False

    end = time.monotonic() + timeout_s
    while alive() and time.monotonic() < end:
        time.sleep(0.2)
