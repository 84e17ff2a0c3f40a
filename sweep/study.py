"""A sweep's Optuna study, kept in the sweep dir (`study.db`, SQLite) so that a re-run continues it.

A search (sweep.search=tpe|random) draws each trial's values from it and tells it each trial's best
eval loss; a pruner (sweep.prune) judges every trial's eval losses in it, for a grid too (its trials
are study trials without parameters). A trial a killed sweep left running in the study continues
under its own number when the sweep is re-run: its run dir holds its checkpoint.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

from omegaconf import DictConfig

from lora_launch.conf.schema import ConfigError

STUDY_FILE = "study.db"
STUDY_NAME = "lora-launch"


def needs_study(cfg: DictConfig) -> bool:
    return cfg.sweep.search != "grid" or cfg.sweep.prune != "none"


def check_study_config(cfg: DictConfig) -> None:
    """Refuse, in one line, a pruner with nothing to judge or Optuna missing."""
    if cfg.sweep.prune != "none" and not cfg.eval.every_steps:
        raise ConfigError(
            f"sweep.prune={cfg.sweep.prune} judges trials by their eval loss during training: "
            "set eval.every_steps=N (it is 0: evaluate only at the start and the end)"
        )
    if importlib.util.find_spec("optuna") is None:  # an extra, named as launcher/checks.py names the others
        key, other = (
            (f"sweep.search={cfg.sweep.search}", "or use sweep.search=grid")
            if cfg.sweep.search != "grid"
            else (f"sweep.prune={cfg.sweep.prune}", "or use sweep.prune=none")
        )
        raise ConfigError(f"{key} needs optuna: `pip install 'lora-launch[sweep]'` (or optuna), {other}")


def _pruner(cfg: DictConfig):
    import optuna

    s = cfg.sweep
    if s.prune == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s.prune_startup_trials, n_warmup_steps=s.prune_warmup_steps)
    if s.prune == "hyperband":
        # the resource is the optimizer step; the first rung is the first eval a trial reports
        return optuna.pruners.HyperbandPruner(min_resource=max(cfg.eval.every_steps, s.prune_warmup_steps, 1))
    return optuna.pruners.NopPruner()


def _sampler(cfg: DictConfig, seed: int):
    import optuna

    if cfg.sweep.search == "tpe":
        with warnings.catch_warnings():  # constant_liar is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # constant_liar: trials drawn while others run avoid the points those explore
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=seed)


def open_study(sweep_dir: Path, cfg: DictConfig):
    """The sweep dir's study, created or continued, minimising the trials' best eval loss."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines
    storage = f"sqlite:///{(Path(sweep_dir) / STUDY_FILE).absolute()}"
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, load_if_exists=True, direction="minimize")
    # a re-run's sampler is seeded past the trials drawn so far: a fresh seed would draw those points again
    study.sampler = _sampler(cfg, cfg.seed + len(study.trials))
    study.pruner = _pruner(cfg)
    return study


class StudyTrial:
    """One trial of the study, as the sweep uses it: drawn values, eval reports, the outcome."""

    def __init__(self, study, trial):
        self.study, self.trial = study, trial

    @classmethod
    def ask(cls, study, space: dict | None = None) -> StudyTrial:
        return cls(study, study.ask(space or {}))

    @classmethod
    def running(cls, study) -> list[StudyTrial]:
        """The trials a killed sweep left running, oldest first."""
        import optuna

        return [
            cls.continued(study, t.number)
            for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.RUNNING
        ]

    @classmethod
    def continued(cls, study, number: int) -> StudyTrial | None:
        """Study trial `number` if it still runs (an earlier launch of its run dir was stopped), else None."""
        import optuna

        frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
        if frozen is None or frozen.state != optuna.trial.TrialState.RUNNING:
            return None
        # Optuna's Trial is built from the storage's id: the number alone does not name it
        return cls(study, optuna.trial.Trial(study, frozen._trial_id))

    @property
    def number(self) -> int:
        return self.trial.number

    @property
    def params(self) -> dict:
        return self.trial.params

    def judge(self, step: int, eval_loss: float) -> bool:
        """Record the eval loss of `step`; True when the pruner stops the trial there."""
        self.trial.report(eval_loss, step)
        return self.trial.should_prune()

    def finish(self, status: str, best_eval_loss: float) -> None:
        """Tell the study how the trial ended; a stopped one (interrupted, preempted) stays running."""
        import optuna

        State = optuna.trial.TrialState
        if status == "completed" and math.isfinite(best_eval_loss):
            self.study.tell(self.trial, best_eval_loss, skip_if_finished=True)
        elif status in ("completed", "failed"):  # no finite eval loss to minimise
            self.study.tell(self.trial, state=State.FAIL, skip_if_finished=True)
        elif status == "pruned":
            self.study.tell(self.trial, state=State.PRUNED, skip_if_finished=True)
