"""Launcher pieces without processes: hostfiles, topology, launch files, commands, checks, lock."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from lora_launch.conf.compose import compose
from lora_launch.conf.schema import ConfigError
from lora_launch.launcher import checks, hostfile
from lora_launch.launcher.launch import launch_command, node_env_vars, write_launch_files
from lora_launch.launcher.topology import Topology, run_plan, topology
from lora_launch.run.lock import RunLock
from support.cli import REPO

# ---- hostfile ---------------------------------------------------------------------------------------


def test_hostfile_parses_comments_blank_lines_and_slots():
    hosts = hostfile.parse_hostfile_text("# cluster\n\nnode-a slots=8  # head\n  node-b   slots = 4\n")
    assert hosts == [hostfile.Host("node-a", 8), hostfile.Host("node-b", 4)]


@pytest.mark.parametrize(
    "text,needle",
    [
        ("", "no hosts"),
        ("# only a comment\n\n", "no hosts"),
        ("a slots=2\nb slots=2\na slots=2\n", "listed twice"),
        ("a slots=two\n", "slots='two'"),
        ("a slots=0\n", "slots='0'"),
        ("a\n", "no 'slots=N'"),
        ("a b slots=2\n", "expected 'HOST slots=N'"),
    ],
)
def test_hostfile_errors_name_the_line(text, needle):
    with pytest.raises(ConfigError, match="hostfile") as e:
        hostfile.parse_hostfile_text(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_shipped_hostfiles_parse():
    files = sorted((REPO / "hostfiles").iterdir())
    assert files
    for f in files:
        assert hostfile.read_hostfile(str(f))


def test_node_rank_from_names_or_addresses():
    hosts = hostfile.parse_hostfile_text("10.9.0.1 slots=1\nworker-b slots=1\n")
    assert hostfile.find_node_rank(hosts, {"worker-b"}, {"127.0.0.1": "lo"}) == 1
    assert hostfile.find_node_rank(hosts, {"x"}, {"10.9.0.1": "eth1"}) == 0
    with pytest.raises(ConfigError, match="launcher.node_rank"):
        hostfile.find_node_rank(hosts, {"x"}, {"10.9.9.9": "eth0"})
    with pytest.raises(ConfigError, match="several lines"):
        hostfile.find_node_rank(hosts, {"worker-b"}, {"10.9.0.1": "eth1"})


def test_interface_of_the_rendezvous_host_is_the_one_holding_its_address():
    # not `lo`, which is what routing to one's own address says
    assert hostfile.interface_for("10.9.0.1", {"10.9.0.1": "eth1", "127.0.0.1": "lo"}) == "eth1"
    assert hostfile.interface_for("127.0.0.1") == "lo"


# ---- topology ----------------------------------------------------------------------------------------


def _hostfile_cfg(tmp_path, text: str, *extra: str):
    path = tmp_path / "hosts"
    path.write_text(text)
    return compose(["launcher=hostfile", f"launcher.hostfile={path}", f"run.dir={tmp_path / 'run'}", *extra])


def test_hostfile_topology_auto_takes_slots(tmp_path):
    cfg = _hostfile_cfg(tmp_path, "127.0.0.1 slots=2\n10.255.0.9 slots=2\n")
    topo = topology(cfg)
    assert (topo.num_machines, topo.procs_per_node, topo.world_size, topo.node_rank) == (2, 2, 4, 0)
    assert topo.main_ip == "127.0.0.1"


def test_more_processes_than_slots_is_refused(tmp_path):
    cfg = _hostfile_cfg(tmp_path, "127.0.0.1 slots=2\n10.255.0.9 slots=1\n", "launcher.num_processes=2")
    with pytest.raises(ConfigError, match="more than the 1 slots of 10.255.0.9"):
        topology(cfg)


def test_unequal_slots_need_an_explicit_count(tmp_path):
    cfg = _hostfile_cfg(tmp_path, "127.0.0.1 slots=2\n10.255.0.9 slots=1\n")
    with pytest.raises(ConfigError, match="different slots"):
        topology(cfg)
    cfg = _hostfile_cfg(tmp_path, "127.0.0.1 slots=2\n10.255.0.9 slots=1\n", "launcher.num_processes=1")
    assert topology(cfg).world_size == 2


def test_node_rank_override_and_range(tmp_path):
    cfg = _hostfile_cfg(tmp_path, "127.0.0.1 slots=1\n10.255.0.9 slots=1\n", "launcher.node_rank=1")
    assert topology(cfg).node_rank == 1
    cfg = _hostfile_cfg(tmp_path, "127.0.0.1 slots=1\n", "launcher.node_rank=3")
    with pytest.raises(ConfigError, match="lists 1 hosts"):
        topology(cfg)


# ---- launch files and commands ----------------------------------------------------------------------


@pytest.mark.parametrize("option,stage,offload", [("zero2", 2, False), ("zero3", 3, False), ("zero3_offload", 3, True)])
def test_deepspeed_json_agrees_with_the_config(tmp_path, option, stage, offload):
    cfg = compose(
        [
            f"distributed={option}",
            "train.micro_batch_size=3",
            "train.grad_accum=5",
            "optim.max_grad_norm=0.7",
            "train.precision=float16",
            "launcher.num_processes=2",
            f"run.dir={tmp_path}",
        ]
    )
    topo = topology(cfg)
    files = write_launch_files(cfg, tmp_path, topo, run_plan(cfg, topo))
    ds = json.loads(files["deepspeed"].read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 5 * 2
    assert ds["gradient_clipping"] == 0.7
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == stage
    assert ("offload_optimizer" in ds["zero_optimization"]) is offload
    assert ("offload_param" in ds["zero_optimization"]) is offload
    acc = yaml.safe_load(files["accelerate"].read_text())
    assert acc["distributed_type"] == "DEEPSPEED" and acc["num_processes"] == 2
    assert acc["deepspeed_config"]["deepspeed_config_file"] == str(files["deepspeed"])
    written = yaml.safe_load(files["config"].read_text())
    assert written["train"]["micro_batch_size"] == 3 and written["distributed"]["zero_stage"] == stage


def test_ddp_accelerate_config_and_auto_processes_on_cpu(tmp_path):
    cfg = compose([f"run.dir={tmp_path}"])
    topo = topology(cfg)
    files = write_launch_files(cfg, tmp_path, topo, run_plan(cfg, topo))
    acc = yaml.safe_load(files["accelerate"].read_text())
    assert cfg.launcher.num_processes == "auto" and acc["num_processes"] == 1  # no GPU here
    assert acc["distributed_type"] == "NO" and "deepspeed" not in files


def test_every_node_writes_the_same_files(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 slots=2\n10.255.0.9 slots=2\n")
    written = []
    run = tmp_path / "run"
    for rank in (0, 1):
        cfg = compose(
            [
                "launcher=hostfile",
                f"launcher.hostfile={hosts}",
                f"launcher.node_rank={rank}",
                f"run.dir={run}",
                "distributed=zero2",
            ]
        )
        topo = topology(cfg)
        files = write_launch_files(cfg, run, topo, run_plan(cfg, topo))
        written.append({k: p.read_text() for k, p in files.items()})
    assert written[0] == written[1]
    acc = yaml.safe_load(written[0]["accelerate"])
    assert (acc["num_machines"], acc["num_processes"], acc["machine_rank"]) == (2, 4, 0)
    assert acc["main_process_ip"] == "127.0.0.1" and acc["main_process_port"] == 29500
    assert json.loads(written[0]["deepspeed"])["train_batch_size"] == 4 * 1 * 4


def test_launch_command_carries_the_node_rank():
    files = {"accelerate": Path("/r/accelerate.yaml"), "config": Path("/r/config.yaml")}
    cmd = launch_command(files, python="py", node_rank=1)
    assert cmd == [
        "py",
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "/r/accelerate.yaml",
        "--machine_rank",
        "1",
        "-m",
        "lora_launch.train",
        "--config",
        "/r/config.yaml",
    ]


def test_socket_interface_is_set_unless_the_user_did(tmp_path):
    cfg = compose([f"run.dir={tmp_path}", "launcher.network_interface=eth7"])
    two = Topology(2, 1, 1, "10.1.1.1", 29500)
    assert node_env_vars(cfg, two, {}) == {"GLOO_SOCKET_IFNAME": "eth7", "NCCL_SOCKET_IFNAME": "eth7"}
    assert node_env_vars(cfg, two, {"NCCL_SOCKET_IFNAME": "ib0"}) == {"GLOO_SOCKET_IFNAME": "eth7"}
    assert node_env_vars(cfg, Topology(1, 2, 0, "127.0.0.1", 29500), {}) == {}


# ---- pre-launch checks ----------------------------------------------------------------------------


def _cfg(tmp_path, *overrides):
    return compose([f"run.dir={tmp_path / 'run'}", *overrides])


def test_global_batch_mismatch(tmp_path):
    topo = Topology(2, 4, 0, "127.0.0.1", 29500)
    ok = _cfg(tmp_path, "train.global_batch_size=64", "train.micro_batch_size=4", "train.grad_accum=2")
    checks.check_global_batch(ok, run_plan(ok, topo))
    bad = _cfg(tmp_path, "train.global_batch_size=64", "train.micro_batch_size=4", "train.grad_accum=1")
    with pytest.raises(ConfigError, match=r"= 32; set train.grad_accum=2"):
        checks.check_global_batch(bad, run_plan(bad, topo))
    odd = _cfg(tmp_path, "train.global_batch_size=20", "train.micro_batch_size=4")
    with pytest.raises(ConfigError, match="multiple of micro_batch_size x world = 32"):
        checks.check_global_batch(odd, run_plan(odd, topo))


@pytest.mark.parametrize("option", ["zero3", "fsdp2"])
def test_qlora_sharded_needs_matching_storage_dtype(tmp_path, option):
    def check(*overrides):
        cfg = _cfg(tmp_path, "quant=nf4", *overrides)
        checks.check_qlora_sharded(cfg, run_plan(cfg, topology(cfg)))

    with pytest.raises(ConfigError, match="set quant.storage_dtype=bfloat16"):
        check(f"distributed={option}")
    check(f"distributed={option}", "quant.storage_dtype=bfloat16")
    check("distributed=zero2")


def test_nf4_runs_on_cpu(tmp_path):
    checks.check_nf4(_cfg(tmp_path, "quant=nf4"))  # bitsandbytes quantises on the CPU: no GPU needed


@pytest.mark.parametrize(
    "overrides, module, line",
    [
        (["quant=nf4"], "bitsandbytes", "quant=nf4 needs bitsandbytes: `pip install 'lora-launch[qlora]'`"),
        (["optim.name=adamw_bnb_8bit"], "bitsandbytes", "optim.name=adamw_bnb_8bit needs bitsandbytes"),
        (
            ["distributed=zero2"],
            "deepspeed",
            "distributed=zero2 needs deepspeed: `pip install 'lora-launch[deepspeed]'`",
        ),
        (["logging.wandb.mode=offline"], "wandb", "logging.wandb.mode=offline needs wandb"),
        (["logging.mlflow.enabled=true"], "mlflow", "logging.mlflow.enabled=true needs mlflow"),
    ],
)
def test_a_missing_extra_is_named(tmp_path, monkeypatch, overrides, module, line):
    cfg = _cfg(tmp_path, *overrides)
    checks.check_extras(cfg)  # all installed here (the dev extra)
    real = checks.importlib.util.find_spec
    monkeypatch.setattr(checks.importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(ConfigError, match=re.escape(line)):
        checks.check_extras(cfg)
    checks.check_extras(_cfg(tmp_path))  # the default job needs none of them


def test_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=f"run.dir={blocker}/run is not writable"):
        checks.check_run_dir_writable(blocker / "run")


def test_a_peer_removing_its_probe_dir_is_not_a_refusal(tmp_path, monkeypatch):
    # two nodes on a shared filesystem check the same new run.dir at once: the peer's check removes the folder it
    # made between this check's mkdir and its test file
    run_dir = tmp_path / "runs" / "shared"
    real = checks.tempfile.NamedTemporaryFile
    removals = []

    def peer_removes_first(*args, **kwargs):
        if not removals:
            removals.append(run_dir)
            run_dir.rmdir()
            run_dir.parent.rmdir()
        return real(*args, **kwargs)

    monkeypatch.setattr(checks.tempfile, "NamedTemporaryFile", peer_removes_first)
    checks.check_run_dir_writable(run_dir)
    assert removals and not (tmp_path / "runs").exists()  # looked again, and left nothing behind

    def always_gone(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(checks.tempfile, "NamedTemporaryFile", always_gone)
    with pytest.raises(ConfigError, match="is not writable \\(No such file or directory\\)"):
        checks.check_run_dir_writable(run_dir)  # vanishing at every look is still refused
    assert not (tmp_path / "runs").exists()


def test_multinode_needs_an_explicit_run_dir(tmp_path):
    cfg = _cfg(tmp_path)
    two = Topology(2, 1, 0, "127.0.0.1", 29500)
    with pytest.raises(ConfigError, match="give run.dir=PATH"):
        checks.check_multinode_run_dir(cfg, two, run_dir_given=False)
    checks.check_multinode_run_dir(cfg, two, run_dir_given=True)
    assert checks.run_dir_given(["lora.r=8", "run.dir=/x"]) and not checks.run_dir_given(["lora.r=8"])


# ---- the run-dir lock ---------------------------------------------------------------------------------


def test_second_launch_into_a_live_run_is_refused(tmp_path):
    path = tmp_path / ".launch.lock"
    with RunLock(path):
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=f"in use by a live launch \\(pid {os.getpid()}"):
            RunLock(path).acquire()
    with RunLock(path):  # released: free again
        pass


# ---- the model, read from its config before anything starts ----------------------------------------


@pytest.mark.parametrize(
    "path,needle",
    [
        ("/no/such/model", "no such directory, and not a hub id"),
        ("a/b/c", "no such directory, and not a hub id"),
        ("nobody/no-such-model-xyz", "must already be in the local cache"),
    ],
)
def test_model_path_refused_in_one_line(tmp_path, monkeypatch, path, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=needle):
        checks.check_model(_cfg(tmp_path, f"model.path={path}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json there"):
        checks.check_model(_cfg(tmp_path, f"model.path={tmp_path / 'empty'}"))


def test_lora_targets_are_checked_against_the_models_modules(tmp_path):
    checks.check_model(_cfg(tmp_path))  # the shipped tiny model with q_proj, v_proj
    checks.check_model(_cfg(tmp_path, "model=llama2_7b_random", "lora=all_linear"))
    with pytest.raises(ConfigError, match=r"\['qkv'\] not in this llama model; its linear layers are \['down_proj'"):
        checks.check_model(_cfg(tmp_path, "lora.target_modules=[q_proj,qkv]"))
