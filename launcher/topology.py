"""Where the processes of a launch go: nodes, processes per node, this node's rank, the rendezvous.

`launcher=local` is one node (or several described by hand with num_machines / machine_rank /
main_process_ip); `launcher=hostfile` reads them from a hostfile; `launcher=slurm` asks for
`launcher.slurm.nodes` nodes and learns the hosts inside the job.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from lora_launch.conf.schema import ConfigError
from lora_launch.launcher import hostfile
from lora_launch.run.plan import RunPlan


@dataclass(frozen=True)
class Topology:
    num_machines: int
    procs_per_node: int
    node_rank: int
    main_ip: str
    main_port: int
    hosts: tuple[str, ...] = ()  # the hostfile's hosts, in node-rank order

    @property
    def world_size(self) -> int:
        return self.num_machines * self.procs_per_node


def visible_gpus() -> int:
    """CUDA devices this process can see (0 on CPU)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _auto_procs(cfg: DictConfig, default: int) -> int:
    n = cfg.launcher.num_processes
    return default if n == "auto" else int(n)


def _from_hostfile(cfg: DictConfig, strict: bool) -> Topology:
    launcher = cfg.launcher
    if not launcher.hostfile:
        raise ConfigError("launcher=hostfile needs launcher.hostfile=PATH (lines of 'HOST slots=N')")
    hosts = hostfile.read_hostfile(launcher.hostfile)
    slots = {h.slots for h in hosts}
    if launcher.num_processes == "auto":
        if len(slots) > 1:
            raise ConfigError(
                f"launcher.hostfile={launcher.hostfile}: hosts have different slots {sorted(slots)}; "
                "every node runs the same number of processes: set launcher.num_processes="
            )
        procs = slots.pop()
    else:
        procs = int(launcher.num_processes)
        short = [h for h in hosts if h.slots < procs]
        if short:
            raise ConfigError(
                f"launcher.num_processes={procs} is more than the {short[0].slots} slots of "
                f"{short[0].name} in {launcher.hostfile}"
            )
    if launcher.node_rank is not None:
        rank = launcher.node_rank
    else:
        rank = hostfile.find_node_rank(hosts) if strict else _rank_or_zero(hosts)
    if rank >= len(hosts):
        raise ConfigError(f"launcher.node_rank={rank} but {launcher.hostfile} lists {len(hosts)} hosts")
    main_ip = hostfile.resolve(hosts[0].name) if strict else _address_or_name(hosts[0].name)
    return Topology(len(hosts), procs, rank, main_ip, launcher.main_process_port, tuple(h.name for h in hosts))


def _rank_or_zero(hosts: list[hostfile.Host]) -> int:
    try:
        return hostfile.find_node_rank(hosts)
    except ConfigError:
        return 0


def _address_or_name(host: str) -> str:
    try:
        return hostfile.resolve(host)
    except ConfigError:
        return host


def topology(cfg: DictConfig, strict: bool = True) -> Topology:
    """The launch's shape from the resolved config, on this node.

    strict=False (previews from any machine) takes node 0 when this host is not in the hostfile and
    keeps host names that do not resolve here.
    """
    launcher = cfg.launcher
    if launcher.name == "hostfile":
        return _from_hostfile(cfg, strict)
    if launcher.name == "slurm":
        gpus = launcher.slurm.gpus_per_node
        # the rendezvous host is only known inside the job; the sbatch script passes it on
        return Topology(
            launcher.slurm.nodes,
            _auto_procs(cfg, max(gpus, 1)),
            0,
            launcher.main_process_ip,
            launcher.main_process_port,
        )
    rank = launcher.node_rank if launcher.node_rank is not None else launcher.machine_rank
    if rank >= launcher.num_machines:
        raise ConfigError(f"launcher.machine_rank={rank} must be < launcher.num_machines={launcher.num_machines}")
    return Topology(
        launcher.num_machines,
        _auto_procs(cfg, max(visible_gpus(), 1)),
        rank,
        launcher.main_process_ip,
        launcher.main_process_port,
    )


def run_plan(cfg: DictConfig, topo: Topology) -> RunPlan:
    """The run plan for this launch: a Slurm job plans for the GPUs it asks for, others for this host's."""
    if cfg.launcher.name == "slurm":
        return RunPlan.from_config(
            cfg, topo.num_machines, topo.procs_per_node, on_gpu=cfg.launcher.slurm.gpus_per_node > 0
        )
    return RunPlan.from_config(cfg, topo.num_machines, topo.procs_per_node, on_gpu=visible_gpus() > 0)
