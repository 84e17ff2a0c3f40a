"""Two nodes on separate network stacks: `lora-launch launcher=hostfile` run once in each.

As root with `ip`, two network namespaces joined by a veth pair stand in for two hosts (private
10.x addresses that exist only inside the namespaces, deleted afterwards). Each node finds its own
rank from its address and picks the veth interface for gloo. Without namespaces the test falls back
to two "nodes" on loopback (explicit node ranks) and says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pytest

from support.cli import CLI, read_jsonl, subprocess_env
from support.ports import free_port

pytestmark = pytest.mark.slow


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _make_namespaces(tag: str, subnet: str) -> list[str]:
    a, b = f"ll{tag}a", f"ll{tag}b"
    _ip("netns", "add", a)
    _ip("netns", "add", b)
    _ip("link", "add", f"v{tag}a", "type", "veth", "peer", "name", f"v{tag}b")
    for ns, dev, host in ((a, f"v{tag}a", 1), (b, f"v{tag}b", 2)):
        _ip("link", "set", dev, "netns", ns)
        _ip("-n", ns, "addr", "add", f"{subnet}.{host}/24", "dev", dev)
        _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
    return [a, b]


def _delete_namespaces(names: list[str]) -> None:
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def two_hosts():
    """{"mode", "prefixes": per-node command prefix, "hosts": hostfile lines, "ranks": explicit ranks or None}."""
    tag = str(os.getpid() % 10000)
    subnet = f"10.{77 + os.getpid() % 100}.{os.getpid() % 250}"
    names: list[str] = []
    try:
        if os.geteuid() != 0 or shutil.which("ip") is None or os.environ.get("LORA_TEST_LOOPBACK_NODES"):
            raise PermissionError("not root, no `ip`, or LORA_TEST_LOOPBACK_NODES set")
        names = _make_namespaces(tag, subnet)
    except (PermissionError, subprocess.CalledProcessError) as e:
        _delete_namespaces(names)
        reason = getattr(e, "stderr", None) or str(e)
        warnings.warn(f"network namespaces unavailable ({reason.strip()}): two nodes on loopback instead", stacklevel=2)
        print("FALLBACK: two nodes on loopback, not separate network stacks")
        yield {"mode": "loopback", "prefixes": [[], []], "hosts": ["127.0.0.1", "localhost"], "ranks": [0, 1]}
        return
    try:
        yield {
            "mode": "netns",
            "prefixes": [["ip", "netns", "exec", ns] for ns in names],
            "hosts": [f"{subnet}.1", f"{subnet}.2"],
            "ranks": [None, None],
            "devices": [f"v{tag}a", f"v{tag}b"],
        }
    finally:
        _delete_namespaces(names)


def _outputs(procs: list[subprocess.Popen], timeout_s: float, grace_s: float = 60.0) -> list[str]:
    """Each node's whole output, read side by side. A node that fails leaves its peer waiting at the rendezvous:
    the peer gets `grace_s` to end too; at the deadline (a run of about a minute here) every node still running
    is killed and the test fails with both outputs, so a hang names its node and leaves no process behind."""
    outs: list[list[str]] = [[] for _ in procs]
    readers = [
        threading.Thread(target=lambda p=p, out=out: out.append(p.communicate()[0]), daemon=True)
        for p, out in zip(procs, outs)
    ]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.returncode not in (None, 0) for p in procs):
            deadline = min(deadline, time.monotonic() + grace_s)
        time.sleep(0.5)
    hung = [node for node, p in enumerate(procs) if p.poll() is None]
    for node in hung:
        procs[node].kill()
    for reader in readers:
        reader.join(timeout=30)
    texts = ["".join(out) for out in outs]
    if hung:
        pytest.fail(
            f"node(s) {hung} still running {timeout_s:.0f} s after the start (or {grace_s:.0f} s after a peer "
            "failed), killed:\n"
            + "\n".join(
                f"--- node {n} (exit {p.returncode}):\n{t[-3000:]}" for n, (p, t) in enumerate(zip(procs, texts))
            )
        )
    return texts


@pytest.mark.parametrize("distributed", ["ddp", "zero2"])
def test_two_nodes_train_one_run(tiny, tmp_path, two_hosts, distributed):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two single-process nodes\n" + "".join(f"{h} slots=1\n" for h in two_hosts["hosts"]))
    run = tmp_path / "run"
    common = [
        *tiny["overrides"],
        f"run.dir={run}",
        "launcher=hostfile",
        f"launcher.hostfile={hostfile}",
        f"launcher.main_process_port={free_port()}",
        "train.max_steps=3",
        "train.micro_batch_size=2",
        "eval.at_start=false",
        "logging.rank_audit=true",
        "logging.tensorboard=false",
        "sample.max_new_tokens=0",
        f"distributed={distributed}",
    ]
    procs = []
    for prefix, rank in zip(two_hosts["prefixes"], two_hosts["ranks"]):
        extra = [] if rank is None else [f"launcher.node_rank={rank}"]
        cmd = [*prefix, CLI, *common, *extra]
        procs.append(
            subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outs = _outputs(procs, timeout_s=400)
    for node, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {node} failed:\n{out[-3000:]}"
        assert f"node {node} of 2, 1 processes, world size 2" in out
        assert f"--machine_rank {node}" in out
        if two_hosts["mode"] == "netns":
            # each node found its rank by itself and bound gloo to its veth, not to 127.0.0.1
            assert f"GLOO_SOCKET_IFNAME={two_hosts['devices'][node]}" in out

    # both nodes wrote identical launch files into the one run dir
    digests = {
        line.split("config sha256 ")[1].split()[0]
        for out in outs
        for line in out.splitlines()
        if "config sha256" in line
    }
    assert len(digests) == 1

    rows = read_jsonl(run / "metrics.jsonl")
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3]
    assert "x 2 processes" in outs[0]
    # what accelerate set up, in words: DeepSpeed must not silently fall back to DDP (or to one process)
    assert (
        "2 processes on the CPU across 2 nodes, " + ("DeepSpeed ZeRO-2" if distributed == "zero2" else "DDP")
    ) in outs[0]

    # both ranks trained: disjoint samples making up the global batch of 2 x 1 x 2, and the same
    # trainable weights after every step (their gradients were averaged across the two nodes)
    audit = [read_jsonl(run / "ranks" / f"rank{r}.jsonl") for r in (0, 1)]
    assert [a["step"] for a in audit[0]] == [a["step"] for a in audit[1]] == [1, 2, 3]
    for a0, a1 in zip(*audit):
        assert len(a0["samples"]) == len(a1["samples"]) == 2
        assert not set(a0["samples"]) & set(a1["samples"])
        assert a0["trainable_sha256"] == a1["trainable_sha256"]
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert Path(run / "config.yaml").read_text().count("node_rank: null") == 1
