"""Where metrics go, on the main process only: metrics.jsonl, a progress bar, loss.png, and accelerate's
trackers (tensorboard, wandb, mlflow) under the keys Hugging Face's Trainer and TRL write."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from lora_launch.conf.schema import plain, redact
from lora_launch.run.rundir import read_metrics

# metrics.jsonl keys -> the names trackers get, as transformers' Trainer / TRL name them, so charts
# overlay with runs made by those tools
TRACKER_KEYS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "tokens_total": "train/num_tokens",
    "tokens_per_s": "train/tokens_per_second",
    "step_time": "train/step_time",
    "token_accuracy": "train/mean_token_accuracy",
    "peak_memory_gib": "train/peak_memory_gib",
    "eval_loss": "eval/loss",
    "eval_ppl": "eval/perplexity",
    "eval_token_accuracy": "eval/mean_token_accuracy",
}


def tracker_row(row: dict) -> dict:
    """A metrics row under the trackers' names (numbers only; `step` is the tracker's x axis)."""
    return {
        TRACKER_KEYS.get(k, f"train/{k}"): v
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def make_trackers(cfg: DictConfig, run_dir: Path, start_step: int) -> list:
    """accelerate's trackers for logging.tensorboard / wandb / mlflow, started, with the (redacted) config."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    lg, trackers = cfg.logging, []
    if lg.tensorboard:
        # a resumed run drops the killed attempt's events past its checkpoint
        trackers.append(
            TensorBoardTracker("tensorboard", str(run_dir), purge_step=start_step + 1 if start_step else None)
        )
    if lg.wandb.mode != "disabled":
        # one wandb run per run directory, so a resumed run continues the same wandb run
        trackers.append(
            WandBTracker(
                lg.wandb.project,
                entity=lg.wandb.entity,
                mode=str(lg.wandb.mode),
                dir=str(run_dir),
                name=run_dir.name,
                id=_run_id(run_dir),
                resume="allow",
            )
        )
    if lg.mlflow.enabled:
        trackers.append(_mlflow(cfg, run_dir, MLflowTracker))
    config = redact(plain(cfg))
    for tracker in trackers:
        tracker.start()
        if not getattr(tracker, "resumed", False):  # MLflow refuses a param logged again with another value
            tracker.store_init_configuration(config if tracker.name == "wandb" else _flat(config))
    return trackers


def _mlflow(cfg: DictConfig, run_dir: Path, tracker_class):
    """An MLflow run per run directory (a resume continues it): its id is kept in RUN/mlflow_run_id."""
    import os

    if cfg.logging.mlflow.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = cfg.logging.mlflow.tracking_uri
    else:  # a plain file store needs no server or database; MLflow keeps it working when told so
        os.environ.setdefault("MLFLOW_TRACKING_URI", (run_dir / "mlruns").resolve().as_uri())
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    id_file = run_dir / "mlflow_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else None
    tracker = tracker_class(experiment_name=cfg.logging.mlflow.experiment, run_id=run_id, run_name=run_dir.name)
    return _RememberRunId(tracker, id_file)


class _RememberRunId:
    """MLflowTracker, writing its run id once started (so a resumed run logs into the same MLflow run)."""

    def __init__(self, tracker, id_file: Path):
        self.tracker, self.id_file, self.name = tracker, id_file, tracker.name
        self.resumed = tracker.run_id is not None

    def start(self) -> None:
        self.tracker.start()
        self.id_file.write_text(self.tracker.active_run.info.run_id + "\n")

    def __getattr__(self, name):
        return getattr(self.tracker, name)


def _flat(tree: dict, prefix: str = "") -> dict:
    """A nested config as flat `a.b.c` keys of plain values (tensorboard's hparams take nothing else)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


class MetricsLogger:
    """Writes each row to every configured sink. Construct it on the main process only."""

    def __init__(self, cfg: DictConfig, run_dir: Path, total_steps: int, start_step: int = 0):
        self.run_dir = run_dir
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._bar = None
        self._lines = None  # without a terminal: a plain progress line every this many steps
        self._total, self._start, self._t0 = total_steps, start_step, time.monotonic()
        if cfg.logging.progress_bar and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        elif cfg.logging.progress_bar:  # a file (Slurm, CI, nohup): lines, not \r-joined bar fragments
            self._lines = max(1, total_steps // 20)
        self._trackers = make_trackers(cfg, run_dir, start_step)

    def log(self, row: dict) -> None:
        """Record one row (a training step or an eval) everywhere."""
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        step = row["step"]
        if self._trackers:
            values = tracker_row(row)
            for tracker in self._trackers:
                tracker.log(values, step=step)
        if self._bar is not None and "loss" in row:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(
                loss=f"{row['loss']:.4f}",
                lr=f"{row['lr']:.2e}",
                tok_s=f"{row.get('tokens_per_s', 0):.0f}",
                refresh=False,
            )
        elif self._lines and "loss" in row and (step % self._lines == 0 or step == self._total):
            print(progress_line(row, self._total, self._start, time.monotonic() - self._t0), flush=True)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        for tracker in self._trackers:
            tracker.finish()
        self._jsonl.close()


class NoLog:
    """The logger of every rank but the main one: accepts everything, writes nothing."""

    def log(self, row: dict) -> None:
        pass

    def write(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_line(row: dict, total: int, start_step: int, elapsed: float) -> str:
    """`step 40/535 (7%) loss 1.2345 lr 2.00e-03 1234 tok/s eta 1m05s`: one plain progress line."""
    step = row["step"]
    done = max(step - start_step, 1)
    eta = elapsed / done * (total - step)
    return (
        f"step {step}/{total} ({100 * step // max(total, 1)}%) loss {row['loss']:.4f} lr {row['lr']:.2e} "
        f"{row.get('tokens_per_s', 0):.0f} tok/s eta {int(eta // 60)}m{int(eta % 60):02d}s"
    )


def _run_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


def plot_loss(run_dir: Path) -> Path:
    """loss.png: training loss per step, eval loss at its steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = run_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
