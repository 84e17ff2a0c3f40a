"""Values never become code: composition refuses any string holding a control character, naming its key; the
sbatch writer quotes what it writes and refuses a line break in what reaches it by hand; hostfile hosts are
names or addresses."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
from omegaconf import OmegaConf, open_dict

from lora_launch.conf.compose import compose, plain
from lora_launch.conf.schema import ConfigError, load
from lora_launch.launcher import hostfile
from lora_launch.launcher.preview import node_commands
from lora_launch.launcher.slurm import sbatch_script
from lora_launch.launcher.topology import topology

SLURM = ["launcher=slurm", "launcher.slurm.submit=false", "run.dir=runs/sl"]


@pytest.mark.parametrize(
    "override,key,char",
    [
        ('launcher.slurm.extra=["--exclusive\ntouch pwned"]', "launcher.slurm.extra[0]", r"'\n'"),
        ('launcher.slurm.partition="gpu\ntouch pwned"', "launcher.slurm.partition", r"'\n'"),
        ('launcher.slurm.account="a\rb"', "launcher.slurm.account", r"'\r'"),
        ('launcher.network_interface="eth0\x00"', "launcher.network_interface", r"'\x00'"),  # an env value
        ('launcher.main_process_ip="10.0.0.1\u2028x"', "launcher.main_process_ip", r"'\u2028'"),
        ('data.sources=[{path:a.jsonl,fields:{output:"out\x1b[2J"}}]', "data.sources[0].fields.output", r"'\x1b'"),
        ('data.sources=[{path:"a.jsonl\nb",weight:1}]', "data.sources[0].path", r"'\n'"),  # a list of mappings
        ('sample.prompt="beep\x07"', "sample.prompt", r"'\x07'"),  # prose spans lines, but no other control
    ],
)
def test_composition_refuses_control_characters_naming_the_key(override, key, char):
    with pytest.raises(ConfigError) as e:
        compose([*SLURM, override])
    message = str(e.value)
    assert message.startswith(f"{key}=") and f"holds the control character {char}" in message
    assert "\n" not in message and "\u2028" not in message and "\x1b" not in message


def test_prompts_may_span_lines():
    cfg = compose(
        [
            *SLURM,
            'data.system_prompt="Be brief.\nAnswer in English."',
            'sample.prompt="a\tb\nc"',
            'data.sources=[{path:a.jsonl,system_prompt:"x\ny"}]',
        ]
    )
    assert cfg.data.system_prompt == "Be brief.\nAnswer in English." and cfg.sample.prompt == "a\tb\nc"


def test_a_config_file_written_by_hand_is_refused_too(tmp_path):
    tree = plain(compose(SLURM))
    tree["launcher"]["slurm"]["time"] = "04:00:00\nrm -rf ~"
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(tree))
    with pytest.raises(ConfigError, match=r"^launcher\.slurm\.time='04:00:00\\nrm -rf ~' holds"):
        load(str(tmp_path / "config.yaml"))


def _sbatch(tmp_path, **slurm) -> str:
    cfg = compose(SLURM)
    with open_dict(cfg):
        for k, v in slurm.items():
            cfg.launcher.slurm[k] = v  # past composition, as a hand-edited config.yaml would be
    return sbatch_script(cfg, topology(cfg), tmp_path / "run dir #1", python="/venv/bin/python")


def test_sbatch_writer_quotes_each_option(tmp_path):
    text = _sbatch(
        tmp_path,
        partition="gpu # a100",
        account="$(id)",
        time="04:00:00",
        extra=["--comment=it's; touch pwned", "--exclusive"],
    )
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    # sbatch reads each #SBATCH line's option as the shell would read the quoted word: quotes, `#` and `$` kept
    options = [shlex.split(line[len("#SBATCH ") :]) for line in directives]
    assert all(len(o) == 1 for o in options), directives
    options = [o[0] for o in options]
    assert {
        "--partition=gpu # a100",
        "--account=$(id)",
        "--time=04:00:00",
        "--comment=it's; touch pwned",
        "--exclusive",
        f"--output={tmp_path}/run dir #1/slurm-%j.out",
    } <= set(options)
    run = shlex.quote(str(tmp_path / "run dir #1"))
    assert (
        f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 /venv/bin/python -m lora_launch.launcher.node "
        f"--run-dir {run}" in text.splitlines()
    )
    assert subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True).returncode == 0
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "slurm,key",
    [
        ({"extra": ["--exclusive\ntouch pwned"]}, "launcher.slurm.extra[0]"),
        ({"partition": "gpu\ntouch pwned"}, "launcher.slurm.partition"),
        ({"time": "1:00\u2029x"}, "launcher.slurm.time"),
        ({"extra": ["touch pwned"]}, "launcher.slurm.extra[0]"),  # not an option: sbatch would ignore it silently
    ],
)
def test_sbatch_writer_refuses_what_would_end_a_line(tmp_path, slurm, key):
    with pytest.raises(ConfigError, match="^" + re.escape(f"{key}=")):
        _sbatch(tmp_path, **slurm)


@pytest.mark.parametrize("host", ["node1;touch", "$(id)", "`id`", "node\x00a", "node\x1bx", "nöde", "'a'", "a\\b"])
def test_hostfile_hosts_are_names_or_addresses(host):
    with pytest.raises(ConfigError, match=r"^hostfile:1: expected 'HOST slots=N'") as e:
        hostfile.parse_hostfile_text(f"{host} slots=2\n")
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value) and "\x00" not in str(e.value)


def test_hostfile_takes_names_and_addresses():
    text = "node-1.cluster.local slots=8\n10.0.0.2 slots=8\nfe80::1%eth0 slots=8\ngpu_03 slots=8\n"
    assert [h.name for h in hostfile.parse_hostfile_text(text)] == [
        "node-1.cluster.local",
        "10.0.0.2",
        "fe80::1%eth0",
        "gpu_03",
    ]


def test_hostfile_line_separators_split_lines_so_each_part_is_checked():
    with pytest.raises(ConfigError, match="no 'slots=N'"):  # `\x1c` and U+2028 end a line for splitlines
        hostfile.parse_hostfile_text("a\x1cb slots=2\n")
    with pytest.raises(ConfigError, match="slots='²'"):
        hostfile.parse_hostfile_text("a slots=²\n")


def test_preview_commands_are_quoted_as_a_shell_reads_them():
    overrides = ["sample.prompt='x; touch pwned $(id)'", "run.dir=runs/a b"]
    cfg = compose(overrides)
    line = node_commands(cfg, topology(cfg), overrides)[0]
    assert shlex.split(line.split(": lora-launch ", 1)[1]) == overrides
