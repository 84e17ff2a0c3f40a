"""Data errors as a user meets them: through the real entry points, in fresh processes."""

from __future__ import annotations

import json
import subprocess
import sys

from support.cli import lora_launch, subprocess_env


def test_hub_dataset_offline_fails_fast_with_a_clear_error(tiny, tmp_path):
    code = (
        "from lora_launch.conf.compose import compose; from lora_launch.data.samples import build_splits, DataError\n"
        f"cfg = compose(['model.path={tiny['model']}', 'data=hub', 'data.name=nobody/no-such-dataset-xyz',"
        f" 'run.dir={tmp_path}/run', 'data.cache_dir={tmp_path}/c'])\n"
        "from lora_launch.data.tokenizer import load_tokenizer\n"
        "try:\n    build_splits(cfg, load_tokenizer(cfg))\nexcept DataError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert "ERR data.name=nobody/no-such-dataset-xyz" in out.stdout, out.stderr[-2000:]
    assert "HF_HUB_OFFLINE" in out.stdout


def test_data_error_leaves_the_run_dir_alone(tiny, tmp_path):
    """A launch with bad data exits non-zero with one line, and earlier outputs survive."""

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "keep.txt").write_text("earlier result")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    result = lora_launch(
        *tiny["overrides"],
        f"data.path={bad}",
        f"run.dir={run}",
        "train.max_steps=1",
        f"data.cache_dir={tmp_path / 'c'}",
        timeout=300,
    )
    assert result.returncode != 0
    assert "error: " in result.stderr and "bad.jsonl:2: not valid JSON" in result.stderr
    assert (run / "adapter" / "keep.txt").read_text() == "earlier result"
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip()


def test_data_errors_come_before_any_process_starts(tiny, tmp_path):
    """The launcher reads and tokenises the data itself: a bad field is one line naming the file and what to
    set, exit 2, with no training process started and no run dir made."""

    text_only = tmp_path / "notes.jsonl"
    text_only.write_text('{"text": "a line of prose"}\n' * 20)
    run = tmp_path / "run"
    result = lora_launch(
        *tiny["overrides"],
        f"data.path={text_only}",
        f"run.dir={run}",
        f"data.cache_dir={tmp_path / 'c'}",
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "notes.jsonl" in lines[0] and lines[0].endswith("set data.format=text"), lines
    assert "launch:" not in result.stdout  # run_node never ran: no accelerate, no rank
    assert not run.exists()


def test_the_ranks_read_what_the_launcher_tokenised(tiny, tmp_path):
    """With an empty cache, the launcher fills it before launch and rank 0 reads it (never tokenises)."""

    run, cache = tmp_path / "run", tmp_path / "cache"
    result = lora_launch(
        *tiny["overrides"], f"run.dir={run}", f"data.cache_dir={cache}", "train.max_steps=1", cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sources = json.loads((run / "data_report.json").read_text())["sources"]
    assert [s["cache"] for s in sources.values()] == ["hit"], sources
    assert "tokenised before launch, read from the cache" in result.stdout


def test_a_run_without_a_validation_split_reports_no_eval_loss(tiny, tmp_path):
    """data.val_split=0 trains on everything: no eval line and no NaN in metrics.jsonl, which stays strict JSON
    (NaN is not JSON: jq and the browser's JSON.parse refuse it)."""

    def no_constants(name):
        raise ValueError(f"metrics.jsonl holds {name}")

    run = tmp_path / "run"
    result = lora_launch(
        *tiny["overrides"], f"run.dir={run}", "data.val_split=0", "train.max_steps=2", "sample.max_new_tokens=0"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "eval loss" not in result.stdout
    rows = [json.loads(line, parse_constant=no_constants) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and not [r for r in rows if "eval_loss" in r]
