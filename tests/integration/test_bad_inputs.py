"""A catalogue of bad inputs, each run as a user runs it (the installed `lora-launch`, a fresh process, a temp
dir as cwd): every one exits with its code, prints no traceback, ends stderr with one `error: ` line naming
the key or file to change, and leaves the run dir it aimed at exactly as it was (a new one is not made)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support import faults, inject
from support.cli import CLI, lora_launch, subprocess_env

LOCKS = (".launch.lock", ".ranks.lock")
TRACEBACKS = ("Traceback (most recent call last)", "Error executing job")
ROW = {"instruction": "Reverse: cat dog sun", "output": "sun dog cat"}
BROKEN_LINE = json.dumps(ROW) + "\n\n{oops\n"  # line 3
NOT_AN_OBJECT = json.dumps(ROW) + "\n[1, 2]\n"  # line 2
LATIN1 = json.dumps(ROW).encode() + b'\n{"instruction": "caf\xe9", "output": "x"}\n'  # line 2
CSV_NO_OUTPUT = "instruction,answer\na,b\n"


def _snapshot(d: Path) -> dict[str, str]:
    """Every name under `d` (or the file `d`) with its sha256; the launch and rank locks left out."""
    if d.is_file():
        return {".": hashlib.sha256(d.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(d.rglob("*"))
        if not p.name.startswith(LOCKS)
    }


def _changes(before: dict, after: dict) -> str:
    added, removed = sorted(after.keys() - before.keys()), sorted(before.keys() - after.keys())
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    return f"added {added}, removed {removed}, changed {changed}"


def _committed(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def _intact(ckpt: Path) -> bool:
    """The checkpoint's files are those its manifest lists, with their sha256."""
    try:
        files = json.loads((ckpt / "manifest.json").read_text())["files"]
        return all(hashlib.sha256((ckpt / n).read_bytes()).hexdigest() == m["sha256"] for n, m in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _edit(command: list[str], changed: list[str], dropped: tuple[str, ...] = ()) -> list[str]:
    """The command with `changed` set (replacing the same keys) and the keys `dropped` left out, as a user edits it."""
    gone = {_key(o) for o in changed} | set(dropped)
    return [o for o in command if _key(o) not in gone] + changed


def _traceback_head(out: str) -> str:
    """The exception line of the last traceback and its innermost frame, for the failure message."""
    block = out[out.rfind(TRACEBACKS[0]) :] if TRACEBACKS[0] in out else out[out.find(TRACEBACKS[1]) :]
    frames = re.findall(r'File "([^"]+)", line (\d+)', block)
    exc = [line for line in block.splitlines() if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)]
    where = f" at {Path(frames[-1][0]).name}:{frames[-1][1]}" if frames else ""
    return (exc[-1] if exc else block.strip().splitlines()[0])[:300] + where


# ---- the runs the cases aim at -------------------------------------------------------------------


@dataclass
class Runs:
    """A finished and an unfinished tiny run; each case gets a fresh copy at the run's own path (the run dir
    is in its config), from a pristine copy that nothing writes to."""

    root: Path
    tiny: dict
    cache: Path
    commands: dict[str, list[str]] = field(default_factory=dict)
    dirs: dict[str, Path] = field(default_factory=dict)
    pristine: dict[str, Path] = field(default_factory=dict)

    def train(self, name: str, overrides: list[str], **env: str):
        run = self.root / name
        self.commands[name] = [*self.tiny["overrides"], f"run.dir={run}", f"data.cache_dir={self.cache}", *overrides]
        self.dirs[name] = run
        result = lora_launch(*self.commands[name], cwd=self.root, env=subprocess_env(**env))
        self.pristine[name] = self.root / "pristine" / name
        shutil.copytree(run, self.pristine[name], symlinks=True)
        return result

    def fresh(self, name: str) -> Path:
        shutil.rmtree(self.dirs[name], ignore_errors=True)
        return Path(shutil.copytree(self.pristine[name], self.dirs[name], symlinks=True))


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory) -> Runs:
    """`finished`: 4 steps, checkpoints at 2 and 4, adapter, metrics; `unfinished`: 8 steps planned, killed
    while saving step 6 (checkpoints 2 and 4 committed). Both commands say resume.mode=auto."""
    r = Runs(tmp_path_factory.mktemp("bad-inputs"), tiny, Path())
    r.cache = r.root / "cache"
    done = r.train(
        "finished", ["train.max_steps=4", "checkpoint.every_steps=2", "resume.mode=auto", "launcher.max_restarts=0"]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    finished = r.dirs["finished"]
    assert [p.name for p in _committed(finished)] == ["step-2", "step-4"], sorted(_snapshot(finished))
    assert (finished / "adapter").is_dir() and (finished / "metrics.jsonl").is_file()
    assert json.loads((finished / "status.json").read_text())["state"] == "finished"

    killed = r.train(
        "unfinished",
        ["train.max_steps=8", "checkpoint.every_steps=2", "resume.mode=auto", "launcher.max_restarts=0"],
        **inject.env(CRASH_IN_SAVE="after_rank_write@6"),
    )
    unfinished = r.dirs["unfinished"]
    assert killed.returncode != 0, killed.stdout[-2000:]
    assert [p.name for p in _committed(unfinished)] == ["step-2", "step-4"], sorted(_snapshot(unfinished))
    assert json.loads((unfinished / "status.json").read_text())["state"] != "finished"
    return r


# ---- what a case changes -------------------------------------------------------------------------


class Ctx:
    """What a case's lambdas see: its temp dir, the run it aims at, and helpers to write bad files."""

    def __init__(self, tmp: Path, runs: Runs, run: Path):
        self.tmp, self.runs, self.run = tmp, runs, run

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def jsonl(self, name: str, rows: list) -> Path:
        return self.write(name, "".join(json.dumps(r) + "\n" for r in rows))

    def model_without(self, name: str, *patterns: str) -> Path:
        """A copy of the tiny model dir without the files matching `patterns`."""
        dest = self.tmp / name
        shutil.copytree(self.runs.tiny["model"], dest, ignore=shutil.ignore_patterns(*patterns))
        return dest

    def every_checkpoint(self, edit: Callable[[Path], None]) -> None:
        for ckpt in _committed(self.run):
            edit(ckpt)


@dataclass(frozen=True)
class Case:
    args: Callable[[Ctx], list[str]]  # the overrides the user changed (or added)
    names: tuple[str, ...]  # what the last stderr line must contain; {run} and {tmp} are filled in
    target: str = "new"  # new | finished | unfinished (a fresh copy) | file | tmpfs
    code: int = 2
    setup: Callable[[Ctx], None] | None = None  # e.g. break the copy's checkpoints
    env: dict = field(default_factory=dict)  # None removes a variable; {tmp} is filled in
    dropped: tuple[str, ...] = ()  # keys the user left off the command
    fault: str | None = None  # read_only: the run dir mounted read-only


def bad(id: str, args, names, **kw):
    args = args if callable(args) else (lambda c, a=tuple(args): list(a))
    return pytest.param(Case(args, tuple([names] if isinstance(names, str) else names), **kw), id=id)


def _manifests(edit: Callable[[dict], None]) -> Callable[[Ctx], None]:
    def setup(c: Ctx) -> None:
        def one(ckpt: Path) -> None:
            manifest = json.loads((ckpt / "manifest.json").read_text())
            edit(manifest)
            (ckpt / "manifest.json").write_text(json.dumps(manifest))

        c.every_checkpoint(one)

    return setup


def _truncate_manifest(ckpt: Path) -> None:
    text = (ckpt / "manifest.json").read_text()
    (ckpt / "manifest.json").write_text(text[: len(text) // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _hosts(c: Ctx, name: str, text: str) -> list[str]:
    return ["launcher=hostfile", f"launcher.hostfile={c.write(name, text)}"]


EVERY_CKPT = ("checkpoints/step-2", "checkpoints/step-4", "resume.mode=never")

CASES = [
    # ---- config values (refused while composing or validating), mostly re-run in the finished run's dir
    bad("lora.r=0", ["lora.r=0"], "lora.r", target="finished"),
    bad("lora.r=abc", ["lora.r=abc"], "lora.r", target="finished"),
    bad("lora.r=1.5", ["lora.r=1.5"], "lora.r"),
    bad("lora.r=empty", ["lora.r="], "lora.r", target="finished"),
    bad("lora.alpha=-1", ["lora.alpha=-1"], "lora.alpha", target="finished"),
    bad("lora.dropout=1.5", ["lora.dropout=1.5"], "lora.dropout", target="finished"),
    bad("optim.lr=-1", ["optim.lr=-1"], "optim.lr", target="finished"),
    bad("optim.warmup_ratio=2", ["optim.warmup_ratio=2"], "optim.warmup_ratio"),
    bad("train.micro_batch_size=0", ["train.micro_batch_size=0"], "train.micro_batch_size", target="finished"),
    bad("train.seq_len=0", ["train.seq_len=0"], "train.seq_len", target="finished"),
    bad("train.epochs=0", ["train.epochs=0"], "train.epochs"),
    bad("train.global_batch_size=3", ["train.global_batch_size=3"], "train.global_batch_size"),
    bad("train.precision=fp8", ["train.precision=fp8"], ("train.precision", "bfloat16"), target="finished"),
    bad("train.grad_ckpt=maybe", ["train.grad_ckpt=maybe"], "train.grad_ckpt", target="finished"),
    bad("distributed=zero5", ["distributed=zero5"], ("distributed=zero5", "zero2"), target="finished"),
    bad("distributed.zero_stage=1", ["distributed=zero2", "distributed.zero_stage=1"], "distributed.zero_stage"),
    bad(
        "fsdp2-bitsandbytes-optimizer",
        ["distributed=fsdp2", "optim=paged_adamw_32bit"],
        ("optim.name=paged_adamw_32bit", "use optim.name=adamw_torch"),
    ),
    bad(
        "fsdp2-nf4-stored-as-uint8",
        ["distributed=fsdp2", "quant=nf4"],
        ("quant.storage_dtype=uint8", "set quant.storage_dtype=bfloat16"),
    ),
    bad("model=nosuchmodel", ["model=nosuchmodel"], ("model=nosuchmodel", "tiny")),
    bad("quant=int3", ["quant=int3"], ("quant=int3", "nf4"), target="finished"),
    bad("unknown-key", ["lora.rank=16"], "lora.rank", target="finished"),
    bad("unknown-key-appended", ["+lora.rank=16"], "lora.rank", target="finished"),
    bad("unknown-group-appended", ["+nosuch.key=1"], "nosuch", target="finished"),
    bad("deleted-key", ["~lora.r"], "lora.r", target="finished"),
    bad("list-key-given-a-word-betas", ["optim.betas=fast"], "optim.betas"),
    bad("lora.target_modules=[]", ["lora.target_modules=[]"], "lora.target_modules", target="finished"),
    bad("resume.mode=sometimes", ["resume.mode=sometimes"], "resume.mode", target="unfinished"),
    bad(
        "resume.allow_changes-not-a-list", ["resume.allow_changes=lora.r"], "resume.allow_changes", target="unfinished"
    ),
    bad("run.dir-is-a-file", lambda c: [f"run.dir={c.run}"], ("run.dir", "{run}"), target="file"),
    bad("launcher.num_processes=0", ["launcher.num_processes=0"], "launcher.num_processes", target="finished"),
    bad("launcher.main_process_port=70000", ["launcher.main_process_port=70000"], "launcher.main_process_port"),
    bad(
        "launcher.machine_rank-beyond",
        ["launcher.num_machines=2", "launcher.machine_rank=5"],
        "launcher.machine_rank",
        target="finished",
    ),
    bad("checkpoint.every_steps=-1", ["checkpoint.every_steps=-1"], "checkpoint.every_steps", target="finished"),
    bad("checkpoint.keep_last=0", ["checkpoint.keep_last=0"], "checkpoint.keep_last", target="finished"),
    bad("seed=-1", ["seed=-1"], "seed", target="finished"),
    bad(
        "packing-with-group_by_length",
        ["data.packing=true", "data.group_by_length=true"],
        ("data.packing", "data.group_by_length"),
        target="finished",
    ),
    bad("data.format=yaml", ["data.format=yaml"], "data.format"),
    bad("override-without-value", ["bogus"], "bogus", target="finished"),
    # ---- the model
    bad("model.path-missing-dir", lambda c: [f"model.path={c.tmp}/no-such-model"], ("model.path", "no-such-model")),
    bad(
        "model.path-without-config.json",
        lambda c: [f"model.path={c.model_without('bare-model', '*')}"],
        ("bare-model", "config.json"),
    ),
    bad(
        "model.path-config.json-broken",
        lambda c: [f"model.path={c.write('broken-model/config.json', '{').parent}"],
        ("broken-model", "config.json"),
    ),
    bad("model.path-not-a-hub-id", ["model.path=just-a-name"], ("model.path", "just-a-name")),
    bad(
        "model.path-offline-hub-id-not-cached",
        ["model.path=nobody/no-such-model"],
        ("model.path=nobody/no-such-model", "HF_HUB_OFFLINE"),
        env={"HF_HOME": "{tmp}/empty-hf-home"},
    ),
    bad(
        "model.path-without-tokenizer",
        lambda c: [f"model.path={c.model_without('no-tok-model', 'tokenizer*')}"],
        "no-tok-model",
    ),
    bad(
        "model.path-without-weights",
        lambda c: [f"model.path={c.model_without('no-weights', '*.safetensors')}"],
        "no-weights",
    ),
    bad("lora.target_modules-unknown", ["lora.target_modules=[no_such_proj]"], ("lora.target_modules", "no_such_proj")),
    # ---- the data (files written in the case's temp dir)
    bad("data.path-missing", lambda c: [f"data.path={c.tmp}/missing.jsonl"], ("data.path", "missing.jsonl")),
    bad("data.path=null", ["data.path=null"], "data.path"),
    bad("data-empty-file", lambda c: [f"data.path={c.write('empty.jsonl', '')}"], "empty.jsonl"),
    bad("data-broken-json-line", lambda c: [f"data.path={c.write('broken.jsonl', BROKEN_LINE)}"], "broken.jsonl:3"),
    bad("data-line-not-an-object", lambda c: [f"data.path={c.write('array.jsonl', NOT_AN_OBJECT)}"], "array.jsonl:2"),
    bad("data-not-utf8", lambda c: [f"data.path={c.write('latin1.jsonl', LATIN1)}"], "latin1.jsonl:2"),
    bad(
        "data-text-only-under-instruction",
        lambda c: [f"data.path={c.jsonl('notes.jsonl', [{'text': 'a line of prose'}] * 20)}"],
        ("notes.jsonl", "data.format=text"),
    ),
    # a number is fine (CSV columns of digits arrive as numbers) and is written as its text; a list or a
    # mapping where text belongs is not
    bad(
        "data-instruction-a-mapping",
        lambda c: [f"data.path={c.jsonl('maps.jsonl', [{**ROW, 'instruction': {'a': 1}}] * 20)}"],
        ("maps.jsonl", "instruction"),
    ),
    bad(
        "data-instruction-a-list",
        lambda c: [f"data.path={c.jsonl('lists.jsonl', [{**ROW, 'instruction': ['a', 'b']}] * 20)}"],
        ("lists.jsonl", "instruction"),
    ),
    bad(
        "data-output-null",
        lambda c: [f"data.path={c.jsonl('nulls.jsonl', [ROW] * 5 + [{**ROW, 'output': None}])}"],
        ("nulls.jsonl", "output"),
    ),
    bad(
        "data-every-sample-too-long", ["train.seq_len=8", "data.truncation=false"], ("train.seq_len", "data.truncation")
    ),
    bad("data.val_split-leaves-no-training-sample", ["data.max_samples=1", "data.val_split=0.9"], "data.val_split"),
    bad(
        "data-dir-without-data-files",
        lambda c: [f"data.path={c.write('no-data-dir/README.txt', 'notes').parent}"],
        ("data.path", "no-data-dir"),
    ),
    bad(
        "data-unsupported-file-type",
        lambda c: [f"data.path={c.write('rows.txt', 'a line')}"],
        ("data.path", "rows.txt"),
    ),
    bad(
        "data-csv-missing-column", lambda c: [f"data.path={c.write('rows.csv', CSV_NO_OUTPUT)}"], ("rows.csv", "output")
    ),
    bad("data-messages-format-on-instruction-data", ["data.format=messages"], ("data.jsonl", "messages")),
    bad(
        "data-val_split_name-without-its-file",
        lambda c: [
            f"data.path={c.jsonl('split-dir/train.jsonl', [ROW] * 20).parent}",
            "data.val_split_name=validation",
        ],
        ("split-dir", "validation"),
    ),
    # ---- hostfiles (preview=true where a launch would start processes)
    bad(
        "hostfile-missing",
        lambda c: ["launcher=hostfile", f"launcher.hostfile={c.tmp}/no_such_hostfile", "preview=true"],
        ("launcher.hostfile", "no_such_hostfile"),
    ),
    bad("hostfile-not-given", ["launcher=hostfile", "preview=true"], "launcher.hostfile"),
    bad(
        "hostfile-is-a-directory",
        lambda c: ["launcher=hostfile", f"launcher.hostfile={c.tmp}", "preview=true"],
        "launcher.hostfile",
    ),
    bad("hostfile-empty", lambda c: [*_hosts(c, "empty_hosts", "# nothing here\n"), "preview=true"], "empty_hosts"),
    bad(
        "hostfile-malformed-line",
        lambda c: [*_hosts(c, "malformed_hosts", "# two nodes\nnode-a slots=2 extra=1\n"), "preview=true"],
        "malformed_hosts:2",
    ),
    bad(
        "hostfile-no-slots", lambda c: [*_hosts(c, "no_slots", "localhost\n"), "preview=true"], ("no_slots:1", "slots")
    ),
    bad(
        "hostfile-slots=0",
        lambda c: [*_hosts(c, "zero_slots", "localhost slots=0\n"), "preview=true"],
        ("zero_slots:1", "slots"),
    ),
    bad(
        "hostfile-duplicate-host",
        lambda c: [*_hosts(c, "dup_hosts", "localhost slots=1\nlocalhost slots=1\n"), "preview=true"],
        ("dup_hosts:2", "localhost"),
    ),
    bad(
        "hostfile-host-does-not-resolve",
        lambda c: _hosts(c, "unresolvable_hosts", "no-such-host.invalid slots=1\nlocalhost slots=1\n"),
        "no-such-host.invalid",
    ),
    bad(
        "hostfile-this-host-not-listed",
        lambda c: _hosts(c, "other_hosts", "10.255.255.1 slots=1\n"),
        "launcher.node_rank",
    ),
    bad(
        "hostfile-this-host-listed-twice",
        lambda c: _hosts(c, "alias_hosts", "localhost slots=1\n127.0.0.1 slots=1\n"),
        "launcher.node_rank",
    ),
    bad(
        "hostfile-more-processes-than-slots",
        lambda c: [*_hosts(c, "small_hosts", "localhost slots=2\n"), "launcher.num_processes=8", "preview=true"],
        ("launcher.num_processes", "small_hosts"),
    ),
    bad(
        "hostfile-uneven-slots",
        lambda c: [*_hosts(c, "uneven_hosts", "localhost slots=2\nnode-b slots=4\n"), "preview=true"],
        ("uneven_hosts", "launcher.num_processes"),
    ),
    bad(
        "hostfile-node_rank-beyond",
        lambda c: [*_hosts(c, "one_host", "localhost slots=1\n"), "launcher.node_rank=3", "preview=true"],
        "launcher.node_rank",
    ),
    # ---- checkpoints: a copy of the unfinished run, broken, then the same command again (resume.mode=auto)
    bad(
        "ckpt-every-manifest-truncated",
        [],
        EVERY_CKPT,
        target="unfinished",
        setup=lambda c: c.every_checkpoint(_truncate_manifest),
    ),
    bad(
        "ckpt-every-manifest-lists-no-files",
        [],
        EVERY_CKPT,
        target="unfinished",
        setup=_manifests(lambda m: m.update(files={})),
    ),
    bad(
        "ckpt-every-manifest-without-config",
        [],
        EVERY_CKPT,
        target="unfinished",
        setup=_manifests(lambda m: m.pop("config")),
    ),
    bad(
        "ckpt-every-trainable-checksum-mismatch",
        [],
        (*EVERY_CKPT, "trainable.safetensors"),
        target="unfinished",
        setup=lambda c: c.every_checkpoint(lambda p: _flip_a_byte(p / "trainable.safetensors")),
    ),
    bad(
        "ckpt-resume.mode-path-corrupt",
        lambda c: [f"resume.mode={c.run}/checkpoints/step-2"],
        ("checkpoints/step-2", "trainable.safetensors"),
        target="unfinished",
        setup=lambda c: _flip_a_byte(c.run / "checkpoints/step-2/trainable.safetensors"),
    ),
    bad(
        "ckpt-resume.mode-no-such-path",
        ["resume.mode=/no/such/ckpt"],
        ("resume.mode", "/no/such/ckpt"),
        target="unfinished",
    ),
    bad(
        "ckpt-resume.mode-not-a-checkpoint",
        lambda c: [f"resume.mode={c.run}/checkpoints"],
        ("resume.mode", "{run}/checkpoints"),
        target="unfinished",
    ),
    bad(
        "ckpt-resume-under-changed-config",
        ["lora.r=4"],
        ("lora.r", "checkpoints/step-4", "resume.allow_changes"),
        target="unfinished",
    ),
    bad(
        "ckpt-resume.mode-another-runs-checkpoint",
        lambda c: [f"resume.mode={shutil.copytree(c.runs.pristine['finished'], c.tmp / 'other')}/checkpoints/step-2"],
        ("other/checkpoints/step-2", "train.max_steps"),
        target="unfinished",
    ),
    # ---- the environment
    bad("run.dir-4000-characters", lambda c: [f"run.dir={c.run}/{('d' * 200 + '/') * 20}run"], "run.dir"),
    bad("run.dir-component-over-255", lambda c: [f"run.dir={c.run}/{'x' * 300}/run"], "run.dir"),
    bad(
        "data.cache_dir-is-a-file",
        lambda c: [f"data.cache_dir={c.write('cache-file', 'not a dir')}"],
        ("data.cache_dir", "cache-file"),
    ),
    bad("data.cache_dir-unwritable", ["data.cache_dir=/proc/no-such-cache"], ("data.cache_dir", "/proc/no-such-cache")),
    bad(
        "HOME-unwritable-no-cache-set",
        [],
        ("/proc/no-such-home", "data.cache_dir", "LORA_LAUNCH_CACHE"),
        env={"HOME": "/proc/no-such-home", "LORA_LAUNCH_CACHE": None},
        dropped=("data.cache_dir",),
    ),
    bad("run.dir-read-only", [], ("{run}", "Read-only file system"), target="unfinished", fault="read_only"),
    # a LoRA on q/v alone: its small checkpoints fit on the 300k disk before it fills
    bad(
        "disk-full-during-a-save",
        ["train.max_steps=8", "checkpoint.every_steps=2", "lora.target_modules=[q_proj,v_proj]"],
        ("{tmp}/disk", "No space left on device"),
        target="tmpfs",
    ),
]


def _command(c: Ctx, runs: Runs, case: Case) -> list[str]:
    if case.target in ("finished", "unfinished"):
        base = runs.commands[case.target]
    else:
        base = [*runs.tiny["overrides"], f"run.dir={c.run}", f"data.cache_dir={runs.cache}", "train.max_steps=1"]
    return _edit(base, case.args(c), case.dropped)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_naming_it_and_changes_nothing(case: Case, runs: Runs, tmp_path: Path):
    """Exit code, no traceback, a last line `error: ...` naming what to change, the run dir as it was."""
    if case.target in ("finished", "unfinished"):
        run = runs.fresh(case.target)
    elif case.target == "file":
        run = tmp_path / "a-file"
        run.write_text("not a run dir\n")
    elif case.target == "tmpfs":
        run = tmp_path / "disk" / "run"
    else:
        run = tmp_path / "new-run"
    c = Ctx(tmp_path, runs, run)
    if case.setup:
        case.setup(c)
    overrides = _command(c, runs, case)
    env = subprocess_env()
    for k, v in case.env.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v.format(tmp=tmp_path)
    before = _snapshot(run) if run.exists() else None

    if case.fault == "read_only":
        result = faults.read_only(run, [CLI, *overrides], env, cwd=tmp_path)
    elif case.target == "tmpfs":  # data, model and cache outside: only the run dir is on the small disk
        result = faults.full_disk(run.parent, "300k", tmp_path / "disk-after", [CLI, *overrides], env, cwd=tmp_path)
    else:
        result = lora_launch(*overrides, cwd=tmp_path, env=env, timeout=300)

    out = result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    problems = []
    if result.returncode != case.code:
        problems.append(f"exit code {result.returncode}, expected {case.code}")
    if any(t in out for t in TRACEBACKS):
        problems.append(f"traceback: {_traceback_head(out)}")
    if not last.startswith("error: "):
        problems.append("the last stderr line does not start with 'error: '")
    names = [n.format(run=run, tmp=tmp_path) for n in case.names]
    missing = [n for n in names if n not in last]
    if missing:
        problems.append(f"the last stderr line does not name {missing}")
    if case.target == "tmpfs":
        kept = _committed(tmp_path / "disk-after" / "run")
        if not kept or not all(_intact(p) for p in kept):
            problems.append(f"checkpoints not intact after the failed save: {[(p.name, _intact(p)) for p in kept]}")
    elif before is not None:
        after = _snapshot(run)
        if after != before:
            problems.append(f"{run} changed: {_changes(before, after)}")
    elif os.path.lexists(run):
        problems.append(f"{run} was made: {sorted(_snapshot(run))[:10]}")
    assert not problems, (
        "; ".join(problems) + f"\n  last stderr line: {last[:600]!r}\n  stdout tail: {result.stdout[-400:]!r}"
    )
