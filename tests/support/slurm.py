"""A private Slurm cluster for the tests: munged, slurmctld and one or two slurmd (Debian's packages, installed
by .ci/setup-system.sh), every file in a temporary directory and a private munge socket. Everything it
started is stopped by PID when the test ends, also when it fails, and its namespaces are deleted.

One node: the daemons run in this host's network stack, as a login node and its only compute node.
Two nodes: each node is a network namespace of its own, joined by a veth pair with 10.x addresses that
exist only inside them, with its own host name (a UTS namespace) and an /etc/hosts naming both nodes (a
bind mount in a private mount namespace, inherited by everything slurmd starts). slurmctld runs in the
first node's namespace, munge is shared through its socket file, and clients (`sbatch`, `scontrol`, a
`lora-launch` that submits) run on the first node through `Cluster.on()`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from support.cli import subprocess_env
from support.ports import free_port

DAEMONS = ["munged", "slurmctld", "slurmd"]
CLIENTS = ["sbatch", "scontrol", "scancel", "sinfo", "squeue"]
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


def wait_for(predicate, timeout: float, what: str, step: float = 0.5):
    """Poll `predicate` until it returns something true; AssertionError naming `what` at the timeout."""
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def missing_reason(nodes: int) -> str | None:
    """Why a cluster of `nodes` cannot be set up here, or None."""
    missing = [b for b in DAEMONS + CLIENTS if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        return f"Slurm binaries missing ({', '.join(missing)}): run .ci/setup-system.sh as root"
    if os.geteuid() != 0:
        return "a private Slurm needs root (slurmd runs jobs as their user)"
    if nodes > 1:
        tools = [t for t in ("ip", "nsenter", "unshare") if shutil.which(t) is None]
        if tools:
            return f"two Slurm nodes need network namespaces; missing {', '.join(tools)} (iproute2, util-linux)"
    return None


@dataclass
class Node:
    name: str
    address: str | None = None  # None: what its name resolves to
    namespace: str | None = None  # None: this host's own network stack
    device: str | None = None  # its veth, where gloo must bind


@dataclass
class Cluster:
    dir: Path
    nodes: list[Node]
    env: dict
    procs: list[subprocess.Popen] = field(default_factory=list)
    held_since: dict[str, float] = field(default_factory=dict)

    def on(self, argv: list[str], node: int = 0) -> list[str]:
        """`argv` as a command run on node `node` (its network, host name and /etc/hosts)."""
        n = self.nodes[node]
        if n.namespace is None:
            return list(argv)
        script = f'mount --bind {self.dir}/hosts /etc/hosts && hostname {n.name} && exec "$@"'
        return [
            "nsenter",
            f"--net=/run/netns/{n.namespace}",
            "unshare",
            "--mount",
            "--uts",
            "sh",
            "-c",
            script,
            "sh",
            *argv,
        ]

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """A Slurm client command on the first node, its output captured."""
        return subprocess.run(self.on(argv), env=self.env, capture_output=True, text=True, **kwargs)

    def pids(self, node: int) -> list[int]:
        """Every process in node `node`'s network namespace (nodes in namespaces only)."""
        out = subprocess.run(["ip", "netns", "pids", self.nodes[node].namespace], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def job_state(self, job: str) -> tuple[str, int]:
        """(JobState, Restarts) of a job."""
        out = self.run(["scontrol", "show", "job", job]).stdout
        state = re.search(r"JobState=(\S+)", out)
        restarts = re.search(r"Restarts=(\d+)", out)
        return (state.group(1) if state else "UNKNOWN"), int(restarts.group(1)) if restarts else 0

    def release_if_held(self, job: str, settle_s: float = 5.0) -> None:
        """Slurm holds a requeued job back by about two minutes (Reason=BeginTime); a test need not wait for
        that. The update only takes once the attempt before has finished completing and the job is pending,
        and only `settle_s` after that: the nodes revoke the previous attempt's credential with a time stamp
        in whole seconds, and a launch whose credential is stamped in that same second is killed ("Job
        credential revoked")."""
        show = self.run(["scontrol", "show", "job", job]).stdout
        if not ("JobState=PENDING" in show and "Reason=BeginTime" in show):
            self.held_since.pop(job, None)
            return
        since = self.held_since.setdefault(job, time.monotonic())
        if time.monotonic() - since >= settle_s:
            self.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])

    def diagnosis(self, job: str, log: Path) -> str:
        """What to look at when a job did not do what a test expected."""
        show = self.run(["scontrol", "show", "job", job]).stdout
        ctld = self.dir / "slurmctld.log"
        tail = ctld.read_text()[-2000:] if ctld.exists() else ""
        text = log.read_text()[-4000:] if log.exists() else "(no job log)"
        return f"{show}\n--- slurmctld.log (tail)\n{tail}\n--- job log (tail)\n{text}"


def _slurm_conf(d: Path, nodes: list[Node], controller: str) -> str:
    # in namespaces the ports are the nodes' own; on this host's stack they must not collide with others'
    ctld_port, node_port = (6817, 6818) if nodes[0].namespace else (free_port(), free_port())
    node_lines = "".join(
        f"NodeName={n.name}{f' NodeAddr={n.address}' if n.address else ''} "
        f"CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN\n"
        for n in nodes
    )
    return f"""ClusterName=loratest
SlurmctldHost={controller}
SlurmctldPort={ctld_port}
SlurmdPort={node_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobRequeue=1
{node_lines}PartitionName=debug Nodes={",".join(n.name for n in nodes)} Default=YES MaxTime=INFINITE State=UP
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _two_nodes(tag: str) -> list[Node]:
    subnet = f"10.{120 + os.getpid() % 100}.{os.getpid() % 250}"
    return [Node(f"node{i}", f"{subnet}.{i}", f"ls{tag}n{i}", f"vs{tag}n{i}") for i in (1, 2)]


def _wire(nodes: list[Node], created: list[str]) -> None:
    """Each node's namespace, added to `created` as soon as it exists (for the cleanup), and the veth pair."""
    for n in nodes:
        _ip("netns", "add", n.namespace)
        created.append(n.namespace)
    _ip("link", "add", nodes[0].device, "type", "veth", "peer", "name", nodes[1].device)
    for n in nodes:
        _ip("link", "set", n.device, "netns", n.namespace)
        _ip("-n", n.namespace, "addr", "add", f"{n.address}/24", "dev", n.device)
        _ip("-n", n.namespace, "link", "set", n.device, "up")
        _ip("-n", n.namespace, "link", "set", "lo", "up")


def _start_daemons(cluster: Cluster) -> None:
    d, env = cluster.dir, cluster.env
    cluster.procs.append(
        subprocess.Popen(
            [
                _sbin("munged"),
                "-F",
                "--force",
                f"--key-file={d}/munge.key",
                f"--socket={d}/munge.sock",
                f"--pid-file={d}/munged.pid",
                f"--log-file={d}/munged.log",
                f"--seed-file={d}/munged.seed",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    wait_for(lambda: (d / "munge.sock").exists(), 20, "munged")
    conf = env["SLURM_CONF"]
    cluster.procs.append(
        subprocess.Popen(
            cluster.on([_sbin("slurmctld"), "-D", "-f", conf]),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    for i, n in enumerate(cluster.nodes):
        cluster.procs.append(
            subprocess.Popen(
                cluster.on([_sbin("slurmd"), "-D", "-N", n.name, "-f", conf], i),
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def all_idle():
        states = cluster.run(["sinfo", "-h", "-N", "-o", "%T"]).stdout.split()
        return len(states) == len(cluster.nodes) and all(s == "idle" for s in states)

    wait_for(all_idle, 60, f"{len(cluster.nodes)} Slurm node(s) to be idle")


def _stop(cluster: Cluster, namespaces: list[str]) -> None:
    """Cancel every job, stop the daemons by PID, then end whatever still runs in the namespaces."""
    if len(cluster.procs) > 1:  # slurmctld was started
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            for job in cluster.run(["squeue", "-h", "-o", "%i"], timeout=20).stdout.split():
                cluster.run(["scancel", job], timeout=20)
    for p in reversed(cluster.procs):
        p.terminate()
    for p in reversed(cluster.procs):
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for ns in namespaces:  # job steps and training processes left behind by a failed test
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        for pid in out.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextlib.contextmanager
def slurm_cluster(d: Path, nodes: int = 1) -> Iterator[Cluster]:
    """A running Slurm of `nodes` (1 or 2) compute nodes with every file under `d`; see the module docstring."""
    os.chmod(d, 0o755)  # munged wants its socket's directory reachable by all
    (d / "state").mkdir()
    (d / "munge.key").write_bytes(os.urandom(1024))
    os.chmod(d / "munge.key", 0o400)
    namespaces: list[str] = []
    cluster = Cluster(d, [], {})
    try:
        if nodes == 1:
            cluster.nodes = [Node(socket.gethostname().split(".")[0])]
            controller = cluster.nodes[0].name
        else:
            cluster.nodes = _two_nodes(str(os.getpid() % 10000))
            _wire(cluster.nodes, namespaces)
            (d / "hosts").write_text(
                "127.0.0.1 localhost\n" + "".join(f"{n.address} {n.name}\n" for n in cluster.nodes)
            )
            controller = f"{cluster.nodes[0].name}({cluster.nodes[0].address})"
        for n in cluster.nodes:
            (d / "spool" / n.name).mkdir(parents=True)
        conf = d / "slurm.conf"
        conf.write_text(_slurm_conf(d, cluster.nodes, controller))
        cluster.env = dict(subprocess_env(), SLURM_CONF=str(conf))
        _start_daemons(cluster)
        yield cluster
    finally:
        _stop(cluster, namespaces)
