"""The repository of runs on fabricated run dirs: reading every kind of run (broken ones too), sorting,
filtering, diffing, the text table, and the report page's pieces (charts, sweep keys, the table)."""

from __future__ import annotations

import errno
import json
import time
from pathlib import Path

import pytest
import yaml

from lora_launch.catalog import charts, report
from lora_launch.catalog import table as runs_table
from lora_launch.catalog.runs import find_runs, read_run
from lora_launch.cli import runs as runs_cli
from lora_launch.conf.compose import compose, plain
from lora_launch.conf.schema import ConfigError
from lora_launch.run.lock import RunLock, lock_path
from lora_launch.run.rundir import write_config


def config(r=8, lr=1e-3, data="demo", **more) -> dict:
    """The keys a run's config.yaml has that the table reads."""
    cfg = {
        "model": {"name": "tiny", "path": "/models/tiny-llama"},
        "lora": {"r": r, "alpha": 16.0, "dropout": 0.05},
        "optim": {"lr": lr},
        "data": {"name": data, "source": "demo", "path": "/d/train.jsonl"},
        "distributed": {"name": "ddp"},
        "launcher": {"num_processes": 1, "num_machines": 1},
        "quant": {"mode": "none"},
        "train": {"max_steps": 10},
        "run": {"dir": "x"},
    }
    for key, value in more.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def make_run(
    root,
    name,
    cfg=None,
    state="finished",
    step=10,
    evals=(3.0, 2.0),
    when=None,
    adapter=True,
    trial=None,
    raw_config=None,
    metrics_tail="",
):
    """A run dir as training leaves it: config.yaml, status.json, metrics.jsonl (and adapter/, trial.json)."""
    run = root / name
    run.mkdir(parents=True)
    if raw_config is not None:
        (run / "config.yaml").write_text(raw_config)
    elif cfg is not None:
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    if state:
        (run / "status.json").write_text(json.dumps({"state": state, "step": step, "time": when or time.time()}))
    rows = [{"step": s, "loss": 4.0 - 0.1 * s, "tokens_per_s": 100.0 + s} for s in range(1, step + 1)]
    rows += [{"step": i * step // max(len(evals) - 1, 1), "eval_loss": e} for i, e in enumerate(evals)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + metrics_tail)
    if adapter:
        (run / "adapter").mkdir()
        (run / "adapter" / "adapter_config.json").write_text("{}")
    if trial is not None:
        (run / "trial.json").write_text(json.dumps(trial))
    return run


@pytest.fixture
def three(tmp_path):
    """Three finished runs of different r and lr, made a minute apart."""
    now = time.time()
    make_run(tmp_path / "runs", "a", config(r=8, lr=1e-3), evals=(3.0, 2.5), when=now - 120)
    make_run(tmp_path / "runs", "b", config(r=16, lr=2e-4), evals=(3.0, 1.5, 1.8), when=now - 60)
    make_run(tmp_path / "runs", "c", config(r=4, lr=1e-3), evals=(), when=now)
    return find_runs([tmp_path / "runs"])


def names(found):
    return [r.name.split("/")[-1] for r in found]


# ---- reading -------------------------------------------------------------------------------------


def test_a_real_configs_columns(tmp_path):
    cfg = compose([f"run.dir={tmp_path / 'r'}", "lora.r=16", "optim.lr=1e-4", "launcher.num_processes=2"])
    write_config(cfg, tmp_path / "r")
    row = read_run(tmp_path / "r").row()
    assert (row["model"], row["r"], row["alpha"], row["lr"], row["data"]) == ("tiny-llama", 16, 16.0, 1e-4, "demo")
    assert (row["distributed"], row["processes"], row["quant"]) == ("ddp", 2, "none")
    assert row["status"] == "not started" and row["adapter"] is None and row["best_eval_loss"] is None
    assert plain(cfg)["lora"]["r"] == read_run(tmp_path / "r").setting("lora.r")


def test_every_kind_of_run_is_listed_with_its_status(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "ok", config(), metrics_tail='{"step": 11, "loss": 1.')  # a line cut short by a kill
    make_run(root, "half", raw_config="model:\n  name: [tiny\n")
    make_run(root, "list", raw_config="- not a mapping\n")
    make_run(root, "noconfig", None)
    make_run(root, "killed", config(), state="running", step=4, adapter=False)
    make_run(root, "failed", config(), state="failed", step=3, adapter=False)
    (root / "failed" / "status.json").write_text(json.dumps({"state": "failed", "step": 3, "error": "rank 1 died"}))
    make_run(root, "pruned", config(), state="preempted", step=5, trial={"status": "pruned", "overrides": ["lora.r=4"]})
    make_run(root, "garbage", config(), state=None, adapter=False)
    (root / "garbage" / "status.json").write_text("[1, 2")  # half written
    (root / "garbage" / "metrics.jsonl").write_bytes(b"\xff\xfe not json\n")
    (root / "empty").mkdir()  # no run files: not a run
    (root / ".hidden" / "x").mkdir(parents=True)
    make_run(root / ".hidden", "y", config())
    make_run(root, "ok/previous-20260101-000000", config())  # inside a run: an earlier run's files, not listed
    live = make_run(root, "live", config(), state="running", step=2, adapter=False)
    with RunLock(lock_path(live)):
        found = {r.path.name: r for r in find_runs([root])}
    status = {name: r.status for name, r in found.items()}
    assert status == {
        "ok": "finished",
        "half": "broken",
        "list": "broken",
        "noconfig": "broken",
        "killed": "killed",
        "failed": "failed",
        "pruned": "pruned",
        "garbage": "not started",
        "live": "running",
    }
    assert "not valid YAML (line 3)" in found["half"].note and "no config.yaml" in found["noconfig"].note
    assert found["failed"].note == "rank 1 died" and "no process holds" in found["killed"].note
    assert found["ok"].steps == 10 and found["ok"].final_train_loss == pytest.approx(3.0)
    assert found["garbage"].train == [] and found["pruned"].overrides == ["lora.r=4"]
    assert found["pruned"].sweep == root
    text = runs_table.table(sorted(found.values(), key=lambda r: r.name))
    assert "note" in text.splitlines()[0] and "rank 1 died" in text


def test_a_run_this_user_may_not_read_is_listed_as_broken(tmp_path, monkeypatch):
    make_run(tmp_path, "a", config())
    is_file = Path.is_file

    def denied(path):  # as root nothing is denied: what chmod 000 adapter/ does for everyone else
        if path.parent.name == "adapter":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return is_file(path)

    monkeypatch.setattr(Path, "is_file", denied)
    (run,) = find_runs([tmp_path])
    assert run.status == "broken" and run.note.endswith("adapter_config.json: Permission denied")


def test_sweep_trials_are_found_below_the_sweep(tmp_path):
    make_run(tmp_path / "sweeps" / "sweep-1", "lora.r=4", config(r=4), trial={"status": "completed"})
    make_run(
        tmp_path / "sweeps" / "sweep-1",
        "lora.r=8",
        config(r=8),
        state=None,  # its launch was refused
        trial={"status": "failed", "error": "boom"},
    )
    (tmp_path / "sweeps" / "sweep-1" / "summary.md").write_text("| trial |\n")
    found = find_runs([tmp_path / "sweeps"])
    assert [r.name for r in found] == [
        str(tmp_path / "sweeps" / "sweep-1" / "lora.r=4"),
        str(tmp_path / "sweeps" / "sweep-1" / "lora.r=8"),
    ]
    assert [r.status for r in found] == ["finished", "failed"] and found[1].note == "boom"


# ---- sorting and filtering -------------------------------------------------------------------------


def test_sort_by_columns_aliases_and_config_keys(three):
    assert names(runs_table.sort_runs(three, "eval_loss")) == ["b", "a", "c"]  # best eval; none last
    assert names(runs_table.sort_runs(three, "-eval_loss")) == ["a", "b", "c"]  # none last either way
    assert names(runs_table.sort_runs(three, "-date")) == ["c", "b", "a"]
    assert names(runs_table.sort_runs(three, "lora.r")) == ["c", "a", "b"]
    assert names(runs_table.sort_runs(three, "final_eval_loss")) == ["b", "a", "c"]
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        runs_table.sort_runs(three, "colour")


def test_where_conditions_combine(three):
    assert names(runs_table.filter_runs(three, ["lr=0.001"])) == ["a", "c"]
    assert names(runs_table.filter_runs(three, ["lr=1e-3", "lora.r>4"])) == ["a"]
    assert names(runs_table.filter_runs(three, ["r!=16", "name=*/c"])) == ["c"]
    assert names(runs_table.filter_runs(three, ["eval_loss<2"])) == ["b"]
    assert names(runs_table.filter_runs(three, ["status=fin*", "model=tiny-llama"])) == ["a", "b", "c"]
    assert runs_table.filter_runs(three, ["status=failed"]) == []
    assert names(runs_table.filter_runs(three, ["eval_loss="])) == ["c"]  # `key=`: runs without the value
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        runs_table.filter_runs(three, ["status"])
    with pytest.raises(ConfigError, match="unknown key 'stat'"):
        runs_table.filter_runs(three, ["stat=finished"])


def test_table_cells(three):
    text = runs_table.table(runs_table.sort_runs(three, "name"))
    header, *lines = text.splitlines()
    assert header.split()[:3] == ["name", "status", "steps"] and "note" not in header
    assert len(lines) == 3 and "2.5" in lines[0] and "1.5" in lines[1] and lines[2].count(" - ") >= 2
    assert runs_table.cell("steps", {"steps": 3, "max_steps": 10}) == "3/10"
    assert runs_table.cell("distributed", {"distributed": "zero3", "processes": 8}) == "zero3×8"
    assert runs_table.cell("lr", {"lr": 0.0002}) == "0.0002"


# ---- diff ------------------------------------------------------------------------------------------


def test_diff_shows_only_what_differs(tmp_path):
    a = read_run(make_run(tmp_path, "a", config(r=8, lr=1e-3, lora__dropout=0.1), evals=(3.0, 2.0)))
    b = read_run(make_run(tmp_path, "b", config(r=16, lr=1e-3, lora__target_modules=["q_proj"]), evals=(3.0, 2.2)))
    b.config["run"]["dir"] = "elsewhere"
    assert sorted(runs_table.config_diff(a, b)) == [
        ("lora.dropout", 0.1, 0.05),
        ("lora.r", 8, 16),
        ("lora.target_modules", None, ["q_proj"]),
    ]
    metrics = {m: (va, vb) for m, va, vb in runs_table.metric_diff(a, b)}
    assert metrics["final_eval_loss"] == (2.0, 2.2) and metrics["steps"] == (10, 10)
    assert set(metrics) == {
        "final_eval_loss",
        "best_eval_loss",
        "final_train_loss",
        "tokens_per_s",
        "steps",
        "peak_memory_gib",
    }
    text = runs_table.diff_text(a, b)
    assert "run.dir" not in text and "lora.target_modules (absent) [q_proj]" in " ".join(text.split())
    assert "+0.2 (+10.00%)" in text
    assert runs_table.diff_json(a, b)["config"]["lora.r"] == {"a": 8, "b": 16}


def test_commands_in_process(tmp_path, monkeypatch, capsys):
    from lora_launch.cli.commands import help_text

    assert all(f"\n  {name} " in help_text() for name in ("runs", "runs diff", "report"))
    monkeypatch.chdir(tmp_path)
    assert runs_cli.main("runs", []) == 0
    assert capsys.readouterr().out.startswith("no runs under runs/ or sweeps/ in ")
    make_run(tmp_path / "runs", "a", config(r=8))
    make_run(tmp_path / "sweeps" / "s", "lora.r=4", config(r=4), trial={"status": "completed"})
    make_run(tmp_path / "sweeps" / "t", "lora.r=4", config(r=4), trial={"status": "completed"})
    assert runs_cli.main("runs", ["--json", "--where", "r=8"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["runs/a"]
    assert runs_cli.main("runs", ["diff", "a", "s/lora.r=4"]) == 0
    assert "lora.r" in capsys.readouterr().out
    assert runs_cli.main("runs", ["diff", "a", "lora.r=4"]) == 2
    assert "2 runs have that name" in capsys.readouterr().err
    assert runs_cli.main("runs", ["nowhere"]) == 2
    assert runs_cli.main("runs", ["--sort"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("error: runs: nowhere: no such directory")
    assert err[1].startswith("error: runs: argument --sort: expected one argument")
    (tmp_path / "empty").mkdir()
    assert runs_cli.main("runs", ["empty"]) == 0 and capsys.readouterr().out.startswith("no runs under empty")


# ---- the report's pieces ---------------------------------------------------------------------------


def test_ticks_and_charts():
    assert charts.nice_ticks(0, 10) == [0, 2, 4, 6, 8, 10]
    assert charts.nice_ticks(2.8795, 2.8812) == [2.8795, 2.88, 2.8805, 2.881]
    svg = charts.chart(
        [charts.Series("s", [(1e-4, 2.0), (1e-3, 1.5), (1e-2, 1.7)], "#000", markers=True)],
        "optim.lr",
        "loss",
        log_x=True,
    )
    assert svg.startswith("<svg") and svg.count("<circle") == 3 and ">0.001<" in svg
    svg = charts.chart(
        [charts.Series("s", [("zero2", 2.0), ("ddp", 1.5)], "#000", line=False, markers=True)], "distributed", "loss"
    )
    assert ">zero2<" in svg and ">ddp<" in svg and "<polyline" not in svg
    long = charts.chart([charts.Series("train", [(s, 1.0 / s) for s in range(1, 5001)], "#000")], "step", "loss")
    assert long.count(",") < 2 * charts.MAX_POINTS + 50
    assert charts.chart([charts.Series("none", [], "#000")], "x", "y") == '<p class="empty">nothing to plot</p>'


def test_report_page(tmp_path):
    sweep = tmp_path / "sweeps" / "s"
    make_run(sweep, "a", config(r=4), evals=(3.0, 2.0), trial={"overrides": ["lora.r=4", "optim.lr=1e-3"]})
    make_run(sweep, "b", config(r=8), evals=(3.0, 1.0), trial={"overrides": ["lora.r=8", "optim.lr=1e-3"]})
    make_run(sweep, "c", None, trial={"status": "failed", "overrides": ["lora.r=16", "optim.lr=1e-3", "run.dir=x"]})
    found = find_runs([tmp_path / "sweeps"])
    assert report.swept_values(found) == {"lora.r": [4.0, 8.0, 16.0]}
    out = report.write_report(found, tmp_path / "site" / "report.html", ["sweeps/"])
    page = out.read_text()
    assert page.count("<tr data-name=") == 3 and "best eval loss against lora.r" in page
    assert 'href="../sweeps/s/a/adapter"' in page and "<script>" in page
    assert "http" not in page.replace("http-equiv", "") and "<link" not in page and " src=" not in page
