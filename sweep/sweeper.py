"""`lora-launch -m ...`: run a sweep's trials, as many at once as sweep.parallel and the devices allow.

Each trial is a `lora-launch` process of its own (the trial's overrides and `run.dir=SWEEP/TRIAL`),
started in its own session with its slot's GPUs and threads (sweep/slots.py) and
its output appended to TRIAL/lora-launch.log (shown live when one trial runs at a time). This process
schedules and records: it starts trials into free slots, passes stop signals on, answers the trials'
eval reports when a pruner judges them (run/pruning.py, sweep/study.py), records each trial as it
ends (sweep/trials.py) and rebuilds the summaries then, in whatever order trials finish.

Ctrl-C, SIGTERM and SIGHUP reach every running trial, which stops after its step with a checkpoint;
no trial starts after them, and the same command continues the sweep. The trials of a sweep that is
killed get SIGTERM from the kernel (they die with their parent's signal) and stop the same way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lora_launch.catalog.terminal import terminal_width
from lora_launch.conf.errors import UserError, reports_user_errors
from lora_launch.conf.schema import ConfigError
from lora_launch.run import pruning
from lora_launch.run.lock import RunLock, lock_holders, lock_path, ranks_lock_path
from lora_launch.run.process import ChildFate, StopSignals, run_to_end, spawn
from lora_launch.run.rundir import fault_message
from lora_launch.sweep.slots import Slot, plan_slots, usable_cores, visible_gpu_ids
from lora_launch.sweep.space import SweepRequest, read_request, search_space, value_text
from lora_launch.sweep.study import StudyTrial, check_study_config, needs_study, open_study
from lora_launch.sweep.trials import (
    INTERRUPTED,
    LOG_FILE,
    finish_trial,
    last_error,
    read_trial,
    start_trial,
    summarize,
    summary_text,
    trial_name,
    trial_row,
    write_trial,
)

POLL_S = 0.2
# a trial of a killed sweep checkpoints and ends on its own (run/process.py's ORPHAN_GRACE_S at most)
EARLIER_LAUNCH_WAIT_S = 150.0
SWEEP_LOCK = ".sweep.lock"


@dataclass
class Candidate:
    """A trial to run: its dir name, its overrides and, in a search, the study trial that drew them."""

    name: str
    overrides: list[str]
    study_trial: StudyTrial | None = None


@dataclass
class Running:
    """A trial's launch in progress."""

    name: str
    run_dir: Path
    record: dict
    slot: Slot
    proc: subprocess.Popen
    log_offset: int  # where this launch's output starts in the trial's log
    study_trial: StudyTrial | None
    judged: bool  # the pruner judges this launch's eval reports
    tail: BinaryIO | None = None  # the log, shown live when trials run one at a time
    judged_step: int = 0
    pruned: bool = False
    stopped: bool = False  # the sweep passed it a stop signal


def _say(message: str, error: bool = False) -> None:
    try:
        print(message, file=sys.stderr if error else sys.stdout, flush=True)
    except OSError:  # the terminal is gone (SIGHUP)
        pass


def _held_by(run_dir: Path) -> list[int]:
    """Processes of an earlier launch still holding a trial's run dir (a killed sweep's trial, checkpointing)."""
    return lock_holders(lock_path(run_dir)) + lock_holders(ranks_lock_path(run_dir))


def _quoted(path: Path) -> str:
    """A path as a quoted override value: trial dirs hold `=` and `,`, which Hydra would read as syntax."""
    return "'" + str(path).replace("'", "\\'") + "'"


def _short(text: str) -> str:
    """A drawn float, to 4 significant digits, for a dir name (the exact value is in trial.json)."""
    try:
        return f"{float(text):.4g}" if "." in text or "e" in text else text
    except ValueError:
        return text


class GridTrials:
    """Every combination of the listed values, in order."""

    def __init__(self, request: SweepRequest):
        keys = request.swept_keys
        self.pending = deque(
            Candidate(trial_name(job, keys=keys), request.trial_overrides(values))
            for job, values in zip(request.grid, request.grid_values())
        )

    def next(self) -> Candidate | None:
        return self.pending.popleft() if self.pending else None


class SearchTrials:
    """Trials drawn from the study: first those a stopped sweep left running, then new ones up to sweep.trials."""

    def __init__(self, request: SweepRequest, study):
        self.request, self.study = request, study
        self.space = search_space(request)
        self.total = request.cfg.sweep.trials  # trials in the study, whichever run drew them
        self.pending = deque(self._candidate(t) for t in StudyTrial.running(study))
        if request.cfg.sweep.resume_pruned:
            import optuna

            pruned = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))
            self.pending += [Candidate(self._name(t.number, t.params), self._overrides(t.params)) for t in pruned]

    def _overrides(self, params: dict) -> list[str]:
        return self.request.trial_overrides({k: value_text(v) for k, v in params.items()})

    def _name(self, number: int, params: dict) -> str:
        shown = [f"{k}={_short(value_text(v))}" for k, v in params.items()]
        return f"{number:03d}-" + trial_name(shown, keys={k.lstrip("+~") for k in params})

    def _candidate(self, trial: StudyTrial) -> Candidate:
        return Candidate(self._name(trial.number, trial.params), self._overrides(trial.params), trial)

    def next(self) -> Candidate | None:
        if self.pending:
            return self.pending.popleft()
        if len(self.study.trials) >= self.total:
            return None
        return self._candidate(StudyTrial.ask(self.study, self.space))


class Sweep:
    """The trials of one sweep dir, scheduled into slots until none is left or the sweep is stopped."""

    def __init__(self, request: SweepRequest, slots: list[Slot]):
        self.request, self.cfg, self.dir = request, request.cfg, request.sweep_dir
        self.slots = slots
        self.study = open_study(self.dir, self.cfg) if needs_study(self.cfg) else None
        self.source = GridTrials(request) if self.cfg.sweep.search == "grid" else SearchTrials(request, self.study)
        self.running: list[Running] = []
        self.waiting: deque[tuple[Candidate, float]] = deque()  # dirs an earlier launch still holds
        self.exhausted = False
        # the first stop signal halts the sweep; a second Ctrl-C ends every trial at once, without a checkpoint
        self.stops = StopSignals(self._halt, self._interrupt_all)
        self.halted = False  # no trial starts any more
        self.failure_rc: int | None = None  # a failed trial stopped the sweep (sweep.continue_on_failure=false)
        self.outcomes: dict[str, str] = {}  # trial name -> status, for the trials this run launched

    # ---- the loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        """Run the sweep; returns its exit code."""
        with self.stops:
            while True:
                if not self.halted:
                    self._fill_slots()
                if not self.running and (self.halted or (self.exhausted and not self.waiting)):
                    break
                for trial in list(self.running):
                    self._poll(trial)
                time.sleep(POLL_S)
        rows = summarize(self.dir)
        rc = self._exit_code()
        _say(summary_text(self.dir, rows, terminal_width(fallback=None)))  # the sweep ends with its results
        return rc

    def _free_slot(self) -> Slot | None:
        used = {t.slot.index for t in self.running}
        return next((s for s in self.slots if s.index not in used), None)

    def _next_candidate(self) -> Candidate | None:
        """A waiting trial whose dir is free again (or that has waited long enough), else the source's next
        whose dir is free; a dir an earlier launch still holds makes its trial wait."""
        for _ in range(len(self.waiting)):
            cand, since = self.waiting.popleft()
            if not _held_by(self.dir / cand.name) or time.monotonic() - since > EARLIER_LAUNCH_WAIT_S:
                return cand
            self.waiting.append((cand, since))
        while not self.exhausted:
            cand = self.source.next()
            if cand is None:
                self.exhausted = True
                break
            held = _held_by(self.dir / cand.name)
            if not held:
                return cand
            _say(
                f"sweep: {cand.name}: waiting for the processes of its earlier launch (pids "
                f"{', '.join(map(str, held))}) to checkpoint and end"
            )
            self.waiting.append((cand, time.monotonic()))
        return None

    def _fill_slots(self) -> None:
        while not self.halted and (slot := self._free_slot()) is not None:
            cand = self._next_candidate()
            if cand is None:
                return
            self._start(cand, slot)

    # ---- one trial ----------------------------------------------------------------------------------

    def _start(self, cand: Candidate, slot: Slot) -> None:
        """Record a launch of the trial and start it in `slot`, unless it is done (skipped)."""
        run_dir = self.dir / cand.name
        earlier = read_trial(run_dir).get("status")
        record = start_trial(run_dir, cand.overrides, resume_pruned=self.cfg.sweep.resume_pruned)
        if record is None:
            self._skip(cand, run_dir, earlier)
            return
        trial = cand.study_trial or self._grid_study_trial(record, earlier)
        judged = trial is not None and self.cfg.sweep.prune != "none" and earlier != "pruned"
        if trial is not None:
            record["study_trial"] = trial.number
            write_trial(run_dir, record)
        pruning.clear(run_dir)
        proc, log_offset = self._spawn(cand, run_dir, slot, judged, launch=len(record["launches"]))
        running = Running(cand.name, run_dir, record, slot, proc, log_offset, trial, judged)
        if len(self.slots) == 1:
            running.tail = open(run_dir / LOG_FILE, "rb")
            running.tail.seek(log_offset)
        self.running.append(running)
        if self.halted:  # a stop signal came while it started: it stops with the others
            self._halt(self.stops.signum or signal.SIGTERM)
        _say(
            f"sweep: {cand.name}: started ({slot.describe()}{', pruned if behind' if judged else ''}); "
            f"log {run_dir / LOG_FILE}"
        )

    def _spawn(self, cand: Candidate, run_dir: Path, slot: Slot, judged: bool, launch: int):
        """Start the trial's `lora-launch` in its own session, output appended to its log; returns the
        process and where its output starts in the log. It gets SIGTERM if this process dies."""
        args = list(cand.overrides) + [f"run.dir={_quoted(run_dir)}"]
        env = {**os.environ, **slot.env()}
        env.pop(pruning.PRUNING_ENV, None)
        if judged:
            env[pruning.PRUNING_ENV] = "1"
        with open(run_dir / LOG_FILE, "ab") as log:
            offset = log.tell()
            log.write(f"==== launch {launch}, {time.strftime('%Y-%m-%d %H:%M:%S')}, {slot.describe()}\n".encode())
            log.flush()
            proc = spawn(
                [sys.executable, "-m", "lora_launch.cli", *args],
                fate=ChildFate.STOPS_WITH_PARENT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return proc, offset

    def _grid_study_trial(self, record: dict, earlier: str | None) -> StudyTrial | None:
        """A grid trial's place in the pruner's study: the one its stopped launch had, else a new one."""
        if self.study is None or self.cfg.sweep.search != "grid" or earlier == "pruned":
            return None
        number = record.get("study_trial")
        return (StudyTrial.continued(self.study, number) if number is not None else None) or StudyTrial.ask(self.study)

    def _skip(self, cand: Candidate, run_dir: Path, status: str | None) -> None:
        _say(f"sweep: {cand.name}: {status} earlier, skipped")
        if cand.study_trial is not None:  # the sweep was stopped before it told the study
            cand.study_trial.finish(status, trial_row(run_dir)["best_eval_loss"])

    def _poll(self, trial: Running) -> None:
        self._show_output(trial)
        if trial.judged and not trial.pruned:
            self._judge(trial)
        rc = trial.proc.poll()
        if rc is not None:
            self._finish(trial, rc if rc >= 0 else 128 - rc)

    def _show_output(self, trial: Running) -> None:
        if trial.tail is None:
            return
        data = trial.tail.read()
        if data:
            try:
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
            except OSError:
                pass

    def _judge(self, trial: Running) -> None:
        """The pruner's answer to the trial's newest eval report: go on, or SIGTERM (stop with a checkpoint)."""
        report = pruning.read_report(trial.run_dir)
        if report is None or report["step"] <= trial.judged_step:
            return
        step, loss = report["step"], float(report["eval_loss"])
        trial.judged_step = step
        if trial.study_trial.judge(step, loss):
            trial.pruned = True
            _say(f"sweep: {trial.name}: pruned at step {step} (eval loss {loss:.4g}); it stops with a checkpoint")
            self._signal(trial, signal.SIGTERM)
        else:
            pruning.go_on(trial.run_dir, step)

    def _finish(self, trial: Running, rc: int) -> None:
        self.running.remove(trial)
        self._show_output(trial)
        if trial.tail is not None:
            trial.tail.close()
        error = last_error(trial.run_dir / LOG_FILE, trial.log_offset)
        status = finish_trial(
            trial.run_dir, trial.record, rc, error, pruned=trial.pruned, stopped_by_sweep=trial.stopped
        )
        row = trial_row(trial.run_dir)
        if trial.study_trial is not None:
            trial.study_trial.finish(status, row["best_eval_loss"])
        self.outcomes[trial.name] = status
        summarize(self.dir)
        detail = f": {row['error']}" if status == "failed" else f", best eval loss {row['best_eval_loss']:.4g}"
        _say(
            f"sweep: {trial.name}: {status} at step {row['steps']} after {row['wall_time_s']:.0f} s{detail}",
            error=status == "failed",
        )
        if status == "failed" and not self.cfg.sweep.continue_on_failure:
            self.failure_rc = rc or 1
            self._halt(signal.SIGTERM)
        elif status in ("interrupted", "preempted") and not trial.stopped:
            # stopped from outside (its ranks got the signal): the sweep stops too, as it always has
            self._halt(signal.SIGINT if status == "interrupted" else signal.SIGTERM)

    # ---- stopping -----------------------------------------------------------------------------------

    def _signal(self, trial: Running, signum: int) -> None:
        try:
            os.kill(trial.proc.pid, signum)
        except ProcessLookupError:
            pass

    def _halt(self, signum: int) -> None:
        """Start no more trials; the running ones get `signum` and stop with a checkpoint."""
        self.halted = True
        for trial in self.running:
            if not trial.pruned and not trial.stopped:
                trial.stopped = True
                self._signal(trial, signum)

    def _interrupt_all(self) -> None:
        for trial in self.running:
            self._signal(trial, signal.SIGINT)

    def _exit_code(self) -> int:
        statuses = set(self.outcomes.values())
        failed = sorted(n for n, s in self.outcomes.items() if s == "failed")
        if failed:
            _say(f"sweep: {len(failed)} trial(s) failed: {', '.join(failed)} (see {self.dir}/summary.md)", error=True)
        if self.stops.signum == signal.SIGINT or "interrupted" in statuses:
            _say("sweep: stopped by Ctrl-C; run the same command to continue", error=True)
            return INTERRUPTED
        if self.failure_rc is not None:
            return self.failure_rc
        if self.stops.requested or "preempted" in statuses:
            _say("sweep: stopped; run the same command to continue", error=True)
            return 0
        return 1 if failed else 0


# ---- entry ----------------------------------------------------------------------------------------


def _check(request: SweepRequest) -> list[Slot]:
    """Refuse a sweep that cannot run here, in one line, before anything is written; returns its slots."""
    cfg = request.cfg
    if cfg.launcher.name == "slurm":  # each trial would be an sbatch that returns at once
        raise ConfigError(
            "a sweep (-m) cannot use launcher=slurm: sweeps run their trials locally; use "
            "launcher=local (e.g. inside one Slurm job), or submit one job per trial"
        )
    if needs_study(cfg):
        check_study_config(cfg)
    if cfg.sweep.search != "grid" and not request.swept:
        raise ConfigError(
            f"sweep.search={cfg.sweep.search} has nothing to search: give a key a range, "
            "e.g. 'optim.lr=tag(log,interval(1e-5,1e-3))' or 'lora.r=choice(8,16,32)'"
        )
    parallel = cfg.sweep.parallel
    one_at_a_time = None
    if cfg.launcher.name != "local" or cfg.launcher.num_machines > 1:
        one_at_a_time = f"trials over several nodes (launcher={cfg.launcher.name}) run one at a time"
    elif "launcher.num_processes" in request.swept_keys:
        one_at_a_time = "launcher.num_processes is swept: trials of different sizes run one at a time"
    if one_at_a_time:
        if parallel != "auto" and parallel > 1:
            raise ConfigError(f"sweep.parallel={parallel}: {one_at_a_time}; set sweep.parallel=1")
        parallel = 1
    gpus = visible_gpu_ids()
    return plan_slots(parallel, cfg.launcher.num_processes, gpus, usable_cores())


def _preview(request: SweepRequest) -> int:
    """Print each trial's plan (a search's: the shared config's); records nothing, leaves no dir behind."""
    values = request.grid_values() if request.grid is not None else [None]
    rc = 0
    for job, chosen in zip(request.grid or [[]], values):
        name = trial_name(job, keys=request.swept_keys) if chosen is not None else "search"
        overrides = (
            request.trial_overrides(chosen)
            if chosen is not None
            else [o.input_line for o in request.overrides if not o.is_sweep_override()]
        )
        run_dir = request.sweep_dir / name
        rc = (
            run_to_end([sys.executable, "-m", "lora_launch.cli", *overrides, f"run.dir={_quoted(run_dir)}"]).returncode
            or rc
        )
    for d in (request.sweep_dir, request.sweep_dir.parent):
        try:
            d.rmdir()  # only when the previews left them empty
        except OSError:
            pass
    return rc


@reports_user_errors
def run_sweep(args: list[str]) -> int:
    """`lora-launch -m OVERRIDES`: the sweep's exit code (2: refused before anything ran)."""
    try:
        flags = [a for a in args if a.startswith("-")]
        if flags:
            raise ConfigError(f"{flags[0]}: a sweep (-m) takes key=value overrides only")
        request = read_request(args)
        slots = _check(request)
        if request.cfg.preview:
            return _preview(request)
        request.sweep_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(request.sweep_dir / SWEEP_LOCK)
        try:
            lock.acquire()
        except ConfigError:
            raise ConfigError(
                f"sweep dir {request.sweep_dir} is in use by another sweep (pid "
                f"{_lock_pid(request.sweep_dir)}); "
                "wait for it to end"
            ) from None
        try:
            _say(
                f"sweep: {request.sweep_dir}: {len(slots)} trial(s) at once ({'; '.join(s.describe() for s in slots)})"
            )
            return Sweep(request, slots).run()
        finally:
            lock.release()
    except OSError as e:  # the sweep dir cannot be written: one line, as for a run dir
        message = fault_message(e)
        if message is None:
            raise
        raise UserError(message) from None


def _lock_pid(sweep_dir: Path):
    """The pid the sweep lock's holder wrote into it."""
    import json

    try:
        return json.loads((sweep_dir / SWEEP_LOCK).read_text() or "{}").get("pid", "?")
    except (OSError, ValueError):
        return "?"
