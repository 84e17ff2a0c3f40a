"""Metrics the ecosystem reads: metrics.jsonl keeps its flat keys; accelerate's trackers (tensorboard,
mlflow, wandb) get Hugging Face-style names (train/loss, eval/loss, ...) so charts overlay with TRL runs.
Each is read back from what the tracker itself wrote."""

from __future__ import annotations

import pytest

from support.cli import lora_launch, read_jsonl, subprocess_env


def _tensorboard_tags(run) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_trackers_get_hugging_face_keys_and_jsonl_keeps_its_own(tiny, tmp_path, monkeypatch):
    import mlflow  # in the dev extra: `pip install -e .[dev]`

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this test's own client
    run = tmp_path / "run"
    done = lora_launch(
        *tiny["overrides"], f"run.dir={run}", "train.max_steps=3", "logging.mlflow.enabled=true", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]

    rows = read_jsonl(run / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(0.0 <= r["token_accuracy"] <= 1.0 and r["lr"] >= 0 for r in steps)
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 3]

    tags = _tensorboard_tags(run)
    for tag in (
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "train/mean_token_accuracy",
        "train/tokens_per_second",
        "train/num_tokens",
    ):
        assert tags.get(tag) == [1, 2, 3], (tag, sorted(tags))
    assert tags.get("eval/loss") == [0, 3] and "loss" not in tags

    client = mlflow.tracking.MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    run_id = (run / "mlflow_run_id").read_text().strip()
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in steps])
    assert "lora.r" in client.get_run(run_id).data.params  # the (flattened) config


def test_wandb_gets_hugging_face_keys_and_never_the_api_key(tiny, tmp_path):
    from support.wandb_records import config_keys, history

    run, secret = tmp_path / "run", "test-api-key-0123456789abcdef"
    done = lora_launch(
        *tiny["overrides"],
        f"run.dir={run}",
        "train.max_steps=3",
        "logging.wandb.mode=offline",
        cwd=tmp_path,
        env={**subprocess_env(), "WANDB_API_KEY": secret, "WANDB_SILENT": "true"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    rows = history(run)
    train = [r for r in rows if "train/loss" in r]
    assert [r["_step"] for r in train] == [1, 2, 3]
    assert [r["train/loss"] for r in train] == pytest.approx([r["loss"] for r in steps])
    for key in (
        "train/learning_rate",
        "train/grad_norm",
        "train/mean_token_accuracy",
        "train/tokens_per_second",
        "train/num_tokens",
    ):
        assert all(key in r for r in train), (key, sorted(train[0]))
    assert [r["_step"] for r in rows if "eval/loss" in r] == [0, 3]
    assert not any("loss" in r for r in rows)  # the flat name is metrics.jsonl's alone
    assert {"lora", "optim", "train"} <= set(config_keys(run))
    leaked = [str(f) for f in run.rglob("*") if f.is_file() and secret.encode() in f.read_bytes()]
    assert leaked == [] and secret not in done.stdout + done.stderr


def test_a_resumed_run_logs_into_the_same_mlflow_run(tiny, tmp_path, monkeypatch):
    """The MLflow run id is kept in the run dir: the trackers of a resumed run continue that run."""
    import mlflow

    from lora_launch.conf.compose import compose
    from lora_launch.train.metrics import make_trackers, tracker_row

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = compose([*tiny["overrides"], f"run.dir={run}", "logging.mlflow.enabled=true", "logging.tensorboard=false"])
    for step in (1, 2):  # two launches of the same run dir
        (tracker,) = make_trackers(cfg, run, start_step=step - 1)
        tracker.log(tracker_row({"step": step, "loss": 1.0 / step}), step=step)
        tracker.finish()
    client = mlflow.tracking.MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("lora-launch").experiment_id])
    assert len(runs) == 1
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == [1, 2]
