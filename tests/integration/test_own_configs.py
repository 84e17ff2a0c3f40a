"""Bring your own: a YAML of one's own through Hydra's --config-dir, an accelerate config and a DeepSpeed JSON
merged into the run dir's files and honoured by the training processes; conflicts refused before launch in
one line."""

from __future__ import annotations

import json

import yaml

from support.cli import lora_launch


def test_own_yaml_from_a_config_dir(tiny, tmp_path):
    (tmp_path / "myconf").mkdir()
    (tmp_path / "myconf" / "my.yaml").write_text(
        yaml.safe_dump({"defaults": ["config", "_self_"], "train": {"max_steps": 2}, "lora": {"r": 4}})
    )
    run = tmp_path / "run"
    done = lora_launch(
        "--config-dir",
        str(tmp_path / "myconf"),
        "--config-name",
        "my",
        *tiny["overrides"],
        f"run.dir={run}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lora"]["r"] == 4 and saved["train"]["max_steps"] == 2
    (tmp_path / "myconf" / "bad.yaml").write_text(yaml.safe_dump({"defaults": ["config", "_self_"], "lora": {"r": 0}}))
    refused = lora_launch(
        "--config-dir",
        str(tmp_path / "myconf"),
        "--config-name",
        "bad",
        *tiny["overrides"],
        f"run.dir={tmp_path / 'bad'}",
        cwd=tmp_path,
    )
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith("error: lora.r"), (
        refused.stderr[-2000:]
    )


def test_own_deepspeed_json_and_accelerate_config_are_merged(tiny, tmp_path):
    ds, acc = tmp_path / "ds.json", tmp_path / "acc.yaml"
    # DeepSpeed's CSV monitor: files that only a rank whose engine got this JSON writes
    ds.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": "auto",
                "zero_optimization": {"stage": 2, "reduce_bucket_size": 123456},
                "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "monitor"), "job_name": "mine"},
            }
        )
    )
    acc.write_text(yaml.safe_dump({"enable_cpu_affinity": False, "num_machines": 1}))
    run = tmp_path / "run"
    args = [
        *tiny["overrides"],
        "distributed=zero2",
        "launcher.num_processes=1",
        "train.max_steps=1",
        f"distributed.deepspeed_config={ds}",
        f"launcher.accelerate_config={acc}",
    ]
    done = lora_launch(*args, f"run.dir={run}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads((run / "ds_config.json").read_text())
    assert written["zero_optimization"]["reduce_bucket_size"] == 123456
    assert (
        written["train_micro_batch_size_per_gpu"]
        == yaml.safe_load((run / "config.yaml").read_text())["train"]["micro_batch_size"]
    )
    assert yaml.safe_load((run / "accelerate.yaml").read_text())["enable_cpu_affinity"] is False
    # honoured by the training process, not only written: DeepSpeed logged the one step's lr
    lr = (tmp_path / "monitor" / "mine" / "Train_Samples_lr.csv").read_text().splitlines()
    assert lr[0] == "step,lr" and len(lr) == 2, lr

    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    refused = lora_launch(*args, f"run.dir={tmp_path / 'fresh'}", cwd=tmp_path)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-2000:]
    assert "ds.json: zero_optimization.stage is 3 but this run has 2 (from distributed.zero_stage)" in lines[0]
    assert not (tmp_path / "fresh").exists()
    # DeepSpeed's DeepCompile needs CUDA: refused on this CPU machine, naming the file, before anything starts
    ds.write_text(json.dumps({"compile": {"deepcompile": True}}))
    refused = lora_launch(*args, f"run.dir={tmp_path / 'fresh'}", cwd=tmp_path)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-2000:]
    assert f"compile.deepcompile in distributed.deepspeed_config={ds}: " in lines[0] and "CUDA" in lines[0]
    assert not (tmp_path / "fresh").exists()
