"""Where metrics go, on the main process only: metrics.jsonl, a progress bar, tensorboard, wandb, loss.png."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from lora_launch.conf.schema import plain


class MetricsLogger:
    """Writes each row to every configured sink. Construct it on the main process only."""

    def __init__(self, cfg: DictConfig, run_dir: Path, total_steps: int, start_step: int = 0):
        self.run_dir = run_dir
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._bar = self._tb = self._wandb = None
        self._lines = None  # without a terminal: a plain progress line every this many steps
        self._total, self._start, self._t0 = total_steps, start_step, time.monotonic()
        if cfg.logging.progress_bar and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        elif cfg.logging.progress_bar:  # a file (Slurm, CI, nohup): lines, not \r-joined bar fragments
            self._lines = max(1, total_steps // 20)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops the killed attempt's events past its checkpoint
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                     purge_step=start_step + 1 if start_step else None)
        if cfg.logging.wandb.mode != "disabled":
            import wandb

            config = plain(cfg)
            self._wandb = wandb.init(project=cfg.logging.wandb.project, entity=cfg.logging.wandb.entity,
                                     mode=str(cfg.logging.wandb.mode), dir=str(run_dir), config=config,
                                     name=run_dir.name, id=_wandb_id(run_dir), resume="allow")

    def log(self, row: dict) -> None:
        """Record one row (a training step or an eval) everywhere."""
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        step = row["step"]
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._bar is not None and "loss" in row:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                  tok_s=f"{row.get('tokens_per_s', 0):.0f}", refresh=False)
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
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
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
    return (f"step {step}/{total} ({100 * step // max(total, 1)}%) loss {row['loss']:.4f} lr {row['lr']:.2e} "
            f"{row.get('tokens_per_s', 0):.0f} tok/s eta {int(eta // 60)}m{int(eta % 60):02d}s")


def _wandb_id(run_dir: Path) -> str:
    # one wandb run per run directory, so a resumed run continues the same wandb run
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
