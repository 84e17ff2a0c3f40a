"""A sweep's plan without running it: the slots trials run in, the trials a command line makes, the study
that draws and prunes them, and the file contract through which a trial's rank 0 hears the pruner."""

from __future__ import annotations

import math
import threading
import time

import pytest

from lora_launch.conf.schema import ConfigError
from lora_launch.run import pruning
from lora_launch.sweep.slots import Slot, plan_slots, visible_gpu_ids
from lora_launch.sweep.space import read_request, search_space, value_text
from lora_launch.sweep.trials import sweep_name, trial_name

GPUS = [str(i) for i in range(8)]


# ---- slots ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parallel,procs,count,per",
    [("auto", "auto", 1, 8), ("auto", 1, 8, 1), ("auto", 2, 4, 2), ("auto", 3, 2, 3), (4, "auto", 4, 2), (2, 4, 2, 4)],
)
def test_gpu_slots_are_disjoint_and_fill_the_node(parallel, procs, count, per):
    slots = plan_slots(parallel, procs, GPUS, cores=64)
    assert len(slots) == count and all(len(s.gpus) == per for s in slots)
    used = [g for s in slots for g in s.gpus]
    assert len(used) == len(set(used)) == count * per
    assert slots[1 % count].env({})["CUDA_VISIBLE_DEVICES"] == ",".join(slots[1 % count].gpus)
    assert "OMP_NUM_THREADS" not in slots[0].env({})


@pytest.mark.parametrize("parallel,procs", [(3, 3), (9, "auto"), (16, 1)])
def test_more_trials_than_the_gpus_hold_is_refused_naming_the_keys(parallel, procs):
    with pytest.raises(ConfigError, match=r"sweep.parallel=.*launcher.num_processes=.*8 are visible"):
        plan_slots(parallel, procs, GPUS, cores=64)


def test_cpu_trials_side_by_side_share_the_cores_and_a_lone_trial_is_left_alone():
    slots = plan_slots(2, 1, [], cores=8)
    assert [s.threads for s in slots] == [4, 4]
    assert slots[0].env({}) == {"OMP_NUM_THREADS": "4"}
    assert slots[0].env({"OMP_NUM_THREADS": "3"}) == {}  # the user's setting wins
    assert [s.threads for s in plan_slots(3, 2, [], cores=8)] == [1, 1, 1]
    alone = plan_slots("auto", "auto", [], cores=8)
    assert len(alone) == 1 and alone[0].env({}) == {}


def test_visible_gpus_follow_cuda_visible_devices():
    assert visible_gpu_ids({"CUDA_VISIBLE_DEVICES": "3,5"}) == ["3", "5"]
    assert visible_gpu_ids({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpu_ids({}, count=2) == ["0", "1"]
    assert Slot(0, ("3", "5"), None).env({})["CUDA_VISIBLE_DEVICES"] == "3,5"


# ---- the command line -------------------------------------------------------------------------------


def test_a_grid_runs_every_combination_in_hydras_order_named_as_before(tmp_path):
    request = read_request(
        ["lora.r=8,16", "optim.lr=1e-4,2e-4", "train.max_steps=10", "sweep.parallel=2", f"hydra.sweep.dir={tmp_path}"]
    )
    assert request.sweep_dir == tmp_path and request.cfg.sweep.parallel == 2
    names = [trial_name(job, keys=request.swept_keys) for job in request.grid]
    assert names == [
        "lora.r=8,optim.lr=0.0001",
        "lora.r=8,optim.lr=0.0002",
        "lora.r=16,optim.lr=0.0001",
        "lora.r=16,optim.lr=0.0002",
    ]
    # the names the regex over the command line gave before: re-running an old sweep finds its dirs
    argv = ["-m", "lora.r=8,16", "optim.lr=1e-4,2e-4", "train.max_steps=10"]
    assert names == [trial_name(job, argv) for job in request.grid]
    first = request.trial_overrides(request.grid_values()[0])
    # how to run the sweep and where is not the trials' business: no sweep.*, no hydra.sweep.dir
    assert first == ["lora.r=8", "optim.lr=0.0001", "train.max_steps=10"]


def test_run_shape_keys_do_not_rename_the_sweep():
    base = ["-m", "lora.r=8,16", "train.max_steps=10"]
    assert sweep_name(base) == sweep_name(base + ["sweep.parallel=4", "sweep.trials=40", "sweep.resume_pruned=true"])
    assert sweep_name(base) != sweep_name(base + ["sweep.prune=median"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["optim.lr=interval(1e-5,1e-3)"], "cannot draw from an interval"),
        (["hydra/sweeper=optuna", "lora.r=8,16"], "sweep.search=tpe"),
        (["sweep.parallel=1,2"], "give it one value"),
        (["lora.r=0,8", "train.max_steps=-5"], "train.max_steps=-5"),  # a shared value is refused once, up front
        (["lora.rank=8,16", "distributed=zero5"], "distributed=zero5 is not a choice"),
    ],
)
def test_a_sweep_that_cannot_run_is_refused_in_one_line(tmp_path, args, message):
    with pytest.raises(ConfigError, match=message):
        read_request(args + [f"hydra.sweep.dir={tmp_path}"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["lora.r=2,4", "launcher=hostfile", "sweep.parallel=2"], "trials over several nodes"),
        (["launcher.num_processes=1,2", "sweep.parallel=2"], "launcher.num_processes is swept"),
        (["sweep.search=tpe", "train.max_steps=5"], "has nothing to search"),
        (["lora.r=2,4", "launcher=slurm"], "cannot use launcher=slurm"),
        (["lora.r=2,4", "--cfg", "job"], "takes key=value overrides only"),
    ],
)
def test_a_sweep_that_cannot_run_here_is_refused_before_anything_is_written(tmp_path, capsys, args, message):
    from lora_launch.sweep.sweeper import run_sweep

    sweep_dir = tmp_path / "sweep"
    assert run_sweep(args + [f"hydra.sweep.dir={sweep_dir}"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], errors
    assert not sweep_dir.exists()


def test_a_search_space_is_read_from_hydras_syntax(tmp_path):
    request = read_request(
        [
            "optim.lr=tag(log,interval(1e-5,1e-3))",
            "lora.r=choice(8,16,32)",
            "lora.alpha=8,16",
            "train.max_steps=range(10,40,10)",
            "lora.dropout=interval(0,0.1)",
            "seed=tag(int,interval(0,3))",
            "sweep.search=tpe",
            f"hydra.sweep.dir={tmp_path}",
        ]
    )
    assert request.grid is None
    space = search_space(request)
    lr, dropout, seed = space["optim.lr"], space["lora.dropout"], space["seed"]
    assert lr.log and (lr.low, lr.high) == (1e-5, 1e-3) and not dropout.log and dropout.high == 0.1
    assert type(seed).__name__ == "IntDistribution" and (seed.low, seed.high) == (0, 3)
    assert space["lora.r"].choices == (8, 16, 32) and space["lora.alpha"].choices == (8, 16)
    steps = space["train.max_steps"]
    assert (steps.low, steps.high, steps.step) == (10, 30, 10)
    overrides = request.trial_overrides(
        {
            "optim.lr": value_text(1.5e-4),
            "lora.r": value_text(16),
            "lora.alpha": "8",
            "train.max_steps": "20",
            "lora.dropout": "0.05",
            "seed": "1",
        }
    )
    assert overrides[:2] == ["optim.lr=0.00015", "lora.r=16"]


# ---- the study ---------------------------------------------------------------------------------------


@pytest.fixture
def study_cfg(tmp_path):
    from lora_launch.conf.compose import compose

    return compose(["sweep.search=tpe", "sweep.prune=median", "sweep.prune_startup_trials=1", "eval.every_steps=2"])


def test_a_trial_far_behind_the_finished_ones_is_pruned_and_a_stopped_study_continues(tmp_path, study_cfg):
    from optuna.distributions import FloatDistribution

    from lora_launch.sweep.study import StudyTrial, open_study

    space = {"optim.lr": FloatDistribution(1e-5, 1e-3, log=True)}
    study = open_study(tmp_path, study_cfg)
    good = StudyTrial.ask(study, space)
    assert not good.judge(2, 2.0) and not good.judge(4, 1.5)
    good.finish("completed", 1.5)
    bad, slow = StudyTrial.ask(study, space), StudyTrial.ask(study, space)
    assert bad.judge(2, 6.4), "a trial far behind the finished one at the same step is pruned"
    bad.finish("pruned", 6.4)
    assert not slow.judge(2, 1.9)  # still running when the sweep is killed

    again = open_study(tmp_path, study_cfg)  # the re-run, in a new process as far as the study knows
    left = StudyTrial.running(again)
    assert [t.number for t in left] == [slow.number] and left[0].params == slow.params
    assert StudyTrial.continued(again, bad.number) is None  # pruned: not continued
    left[0].judge(4, 1.2)
    left[0].finish("completed", 1.2)
    states = [t.state.name for t in again.trials]
    assert states == ["COMPLETE", "PRUNED", "COMPLETE"] and again.best_value == 1.2
    # a re-run draws new points, not the ones the first run's seed drew
    fresh = StudyTrial.ask(again, space)
    assert fresh.params["optim.lr"] not in {good.params["optim.lr"], bad.params["optim.lr"], slow.params["optim.lr"]}


def test_a_trial_without_a_finite_eval_loss_fails_in_the_study(tmp_path, study_cfg):
    from lora_launch.sweep.study import StudyTrial, open_study

    study = open_study(tmp_path, study_cfg)
    trial = StudyTrial.ask(study)
    trial.finish("completed", math.nan)
    stopped = StudyTrial.ask(study)
    stopped.finish("preempted", 1.0)  # stays running: the re-run continues it
    assert [t.state.name for t in study.trials] == ["FAIL", "RUNNING"]


# ---- the rank side -----------------------------------------------------------------------------------


def test_rank_0_reports_and_waits_for_the_sweep_only_under_a_pruning_sweep(tmp_path, monkeypatch):
    monkeypatch.delenv(pruning.PRUNING_ENV, raising=False)
    pruning.report_eval(tmp_path, 4, 2.5, stopped=lambda: False, timeout_s=60)  # no sweep: returns at once
    assert pruning.read_report(tmp_path) is None

    monkeypatch.setenv(pruning.PRUNING_ENV, "1")
    answered = threading.Timer(0.3, pruning.go_on, args=(tmp_path, 4))
    answered.start()
    t0 = time.monotonic()
    pruning.report_eval(tmp_path, 4, 2.5, stopped=lambda: False, timeout_s=60)
    assert 0.25 < time.monotonic() - t0 < 30
    assert pruning.read_report(tmp_path) == {"step": 4, "eval_loss": 2.5}

    # the pruner's answer is SIGTERM: the wait ends as soon as the stop request is seen
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    pruning.report_eval(tmp_path, 6, 9.0, stopped=stop.is_set, timeout_s=60)
    assert stop.is_set() and time.monotonic() - t0 < 30
    pruning.clear(tmp_path)
    assert pruning.read_report(tmp_path) is None and not (tmp_path / pruning.VERDICT).exists()


def test_hyperband_stops_most_trials_far_behind_by_the_finished_ones_last_step(tmp_path):
    from lora_launch.conf.compose import compose
    from lora_launch.sweep.study import StudyTrial, open_study

    study = open_study(tmp_path, compose(["sweep.prune=hyperband", "eval.every_steps=2"]))
    for k in range(4):
        good = StudyTrial.ask(study)
        assert not any(good.judge(step, 3.0 - 0.1 * step - 0.01 * k) for step in range(2, 22, 2))
        good.finish("completed", 0.9 - 0.01 * k)
    stopped_at = []
    for _ in range(6):
        bad = StudyTrial.ask(study)
        stopped_at.append(next((step for step in range(2, 22, 2) if bad.judge(step, 100.0)), None))
        bad.finish("pruned" if stopped_at[-1] else "completed", 100.0)
    # each trial's bracket (from its number) sets its first rung; no rung lies before eval.every_steps
    assert sum(s is not None for s in stopped_at) >= 4 and all(s is None or s >= 2 for s in stopped_at)


def test_pruning_or_search_without_optuna_names_the_extra(monkeypatch):
    import importlib.util

    from lora_launch.conf.compose import compose
    from lora_launch.sweep.study import check_study_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    with pytest.raises(ConfigError, match=r"sweep.prune=median needs optuna: .*lora-launch\[sweep\].*sweep.prune=none"):
        check_study_config(compose(["sweep.prune=median", "eval.every_steps=5"]))
    with pytest.raises(ConfigError, match=r"sweep.search=tpe needs optuna: .*sweep.search=grid"):
        check_study_config(compose(["sweep.search=tpe"]))
