"""Multi-node launches from a DeepSpeed-style hostfile.

Design: the same command runs on every node, e.g. through pdsh or a cluster shell,

    pdsh -w ^hosts lora-launch launcher=hostfile launcher.hostfile=hosts run.dir=/shared/run1 ...

Each node reads the hostfile, finds its own line by comparing the hosts with its names and
addresses (or takes `launcher.node_rank=`), and starts its share of the processes with
`accelerate launch --machine_rank <its rank>`. The first host is the rendezvous: its address and
`launcher.main_process_port`. Nothing fans out over ssh, so there are no keys to set up and a
node's errors appear on that node; the preview prints the command for every node.

Hostfile format, one host per line: `hostname-or-address slots=N` (slots = processes that host
may run, usually its GPU count); `#` starts a comment; blank lines are ignored.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lora_launch.conf.schema import ConfigError
from lora_launch.run.process import run_to_end

# a host is a name or an address: it reaches command lines and the rendezvous, so nothing else may pass
_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.:%-]+)(?:\s+slots\s*=\s*(?P<slots>\S+))?\s*$")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


def parse_hostfile_text(text: str, source: str = "hostfile") -> list[Host]:
    """Hosts in file order; ConfigError naming the line for anything malformed, empty or duplicated."""
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if m is None:
            raise ConfigError(
                f"{source}:{lineno}: expected 'HOST slots=N' (HOST: a name or address of letters, "
                f"digits and . _ - : %), got {raw.strip()!r}"
            )
        slots_text = m.group("slots")
        if slots_text is None:
            raise ConfigError(f"{source}:{lineno}: {m.group('host')} has no 'slots=N' (processes it may run)")
        if not re.fullmatch("[0-9]+", slots_text) or int(slots_text) < 1:
            raise ConfigError(f"{source}:{lineno}: slots={slots_text!r} must be a positive integer")
        name = m.group("host")
        if name in seen:
            raise ConfigError(f"{source}:{lineno}: host {name} is listed twice (first on line {seen[name]})")
        seen[name] = lineno
        hosts.append(Host(name, int(slots_text)))
    if not hosts:
        raise ConfigError(f"{source}: no hosts (each line: 'HOST slots=N')")
    return hosts


def read_hostfile(path: str) -> list[Host]:
    """Parse the hostfile at `path` (see the module docstring for the format)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"launcher.hostfile={path}: file not found")
    return parse_hostfile_text(p.read_text(), str(path))


def resolve(host: str) -> str:
    """IPv4 address of a host name (or the address itself)."""
    try:
        return socket.gethostbyname(host)
    except OSError:
        raise ConfigError(f"hostfile: cannot resolve host {host!r}; use its address instead") from None


def local_addresses() -> dict[str, str]:
    """Every IPv4 address of this host (this network namespace) -> its interface."""
    import psutil

    return {
        a.address: name for name, addrs in psutil.net_if_addrs().items() for a in addrs if a.family == socket.AF_INET
    }


def local_names() -> set[str]:
    """This host's names: hostname, short name, fully qualified name."""
    name = socket.gethostname()
    return {name, name.split(".")[0], socket.getfqdn()}


def _is_me(host: str, names: set[str], addresses: dict[str, str]) -> bool:
    if host in names or host in addresses:
        return True
    try:
        return socket.gethostbyname(host) in addresses
    except OSError:
        return False


def find_node_rank(hosts: list[Host], names: set[str] | None = None, addresses: dict[str, str] | None = None) -> int:
    """This node's index in the hostfile, found by its names and addresses; exactly one must match."""
    names = local_names() if names is None else names
    addresses = local_addresses() if addresses is None else addresses
    mine = [i for i, h in enumerate(hosts) if _is_me(h.name, names, addresses)]
    listed = ", ".join(h.name for h in hosts)
    if not mine:
        raise ConfigError(
            f"launcher.hostfile: this host ({sorted(names)[0]}, {sorted(addresses)}) is not among "
            f"[{listed}]; set launcher.node_rank="
        )
    if len(mine) > 1:
        raise ConfigError(
            f"launcher.hostfile: this host matches several lines ({[hosts[i].name for i in mine]}); "
            "set launcher.node_rank="
        )
    return mine[0]


def interface_for(address: str, addresses: dict[str, str] | None = None) -> str | None:
    """The network interface this host reaches `address` through (the one holding it, if local)."""
    addresses = local_addresses() if addresses is None else addresses
    if address in addresses:
        # the rendezvous host itself: `ip route get` would say `lo`, where the other nodes can't reach
        return addresses[address]
    try:
        out = run_to_end(["ip", "-o", "route", "get", address], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    m = re.search(r"\bdev\s+(\S+)", out)
    return m.group(1) if m else _interface_by_subnet(address)


def _interface_by_subnet(address: str) -> str | None:
    """Fallback without `ip`: the interface whose subnet contains `address`."""
    import psutil

    target = ipaddress.ip_address(address)
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET and a.netmask:
                if target in ipaddress.ip_network(f"{a.address}/{a.netmask}", strict=False):
                    return name
    return None
