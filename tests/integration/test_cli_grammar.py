"""One grammar, as a user meets it: the installed `lora-launch` run from an empty directory in an 80-column
terminal (COLUMNS=80). Every subcommand takes key=value, Hydra's flags go anywhere, a misspelled command gets
"did you mean", help and tables fit the width, a preview leaves nothing on disk, a warm-up that outlasts the
run is warned once."""

from __future__ import annotations

import re
import signal
import subprocess
import urllib.request

import pytest

from support.cli import CLI, lora_launch, subprocess_env

WIDTH = 80


def run(*args: str, cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    return lora_launch(*args, cwd=cwd, timeout=timeout, env=subprocess_env(COLUMNS=str(WIDTH)))


def test_studio_takes_key_value(tmp_path):
    proc = subprocess.Popen(
        [CLI, "studio", "port=0", f"allow_path=[{tmp_path}]"],
        cwd=tmp_path,
        env=subprocess_env(COLUMNS=str(WIDTH)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline()  # the studio prints its address once it listens
        url = re.search(r"open (http://127\.0\.0\.1:(\d+)/\?token=\S+)", first)
        assert url and int(url.group(2)) != 0, first + proc.stderr.read()  # port=0 took a free port
        with urllib.request.urlopen(url.group(1), timeout=60) as page:  # serving, its stop handlers set
            assert page.status == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "studio stopped" in out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_bad_studio_key_is_one_line(tmp_path):
    result = run("studio", "prot=8001", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: studio: unknown argument 'prot=8001'; known: host= port=")


@pytest.mark.parametrize(
    "args",
    [
        ["preset=llama2_guanaco", "--cfg", "job"],
        ["--cfg", "job", "preset=llama2_guanaco"],
        ["preset=llama2_guanaco", "--cfg", "job", "lora.r=32"],
    ],
)
def test_hydra_flags_work_in_any_position(tmp_path, args):
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "name: llama2_7b" in result.stdout and "unrecognized arguments" not in result.stderr
    assert ("r: 32" in result.stdout) == ("lora.r=32" in args)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["lora.r=4", "--info"], ["--info", "lora.r=4"], ["lora.r=4", "--info", "config"]])
def test_info_works_in_any_position(tmp_path, args):
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 0 and "r: 4" in result.stdout, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_misspelled_command_gets_did_you_mean(tmp_path):
    result = run("serv", "port=8001", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: unknown command 'serv'; did you mean serve? (lora-launch --help lists the commands)"
    ]


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["studio", "--help"], ["runs", "--help"]])
def test_help_fits_80_columns(tmp_path, args):
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.count("\n") > 5, result.stderr
    assert max(map(len, result.stdout.splitlines())) <= WIDTH


def test_a_preview_creates_nothing_on_disk(tmp_path):
    result = run("preview=true", cwd=tmp_path)
    assert result.returncode == 0 and "nothing was started" in result.stdout, result.stderr
    assert list(tmp_path.iterdir()) == []
    result = run("preview=true", "run.dir=a/b/c", cwd=tmp_path)
    assert result.returncode == 0 and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A two-rank run of 2 steps under the tiny recipe's 20 warm-up steps, in a fresh directory."""
    home = tmp_path_factory.mktemp("short")
    return home, run("train.max_steps=2", "launcher.num_processes=2", cwd=home, timeout=600)


@pytest.mark.two_ranks
def test_a_warmup_longer_than_the_run_is_warned_once(short_run):
    _, result = short_run
    assert result.returncode == 0, result.stderr[-3000:]
    said = (result.stdout + result.stderr).splitlines()
    warned = [line for line in said if "warmup" in line]
    assert len(warned) == 1, warned
    assert warned[0].startswith("warning: optim.warmup_steps=20 >= train.max_steps=2")
    assert "optim.warmup_ratio" in warned[0] and "optim.lr" in warned[0]


@pytest.mark.two_ranks
def test_runs_fits_80_columns(short_run):
    home, _ = short_run
    result = run("runs", cwd=home)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and lines[0].split()[:3] == ["name", "status", "steps"], result.stderr
    assert lines[1].startswith("runs/") and "finished" in lines[1]
    assert max(map(len, lines)) <= WIDTH and "left out to fit 80 columns" in result.stdout
    wide = lora_launch("runs", cwd=home, env=subprocess_env(COLUMNS="400")).stdout.splitlines()
    assert len(wide[0]) > WIDTH and "adapter" in wide[0]  # a wide terminal gets every column
