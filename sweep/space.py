"""What a sweep's command line asks for: the config its trials share, the swept keys, and the trials.

Overrides are read by Hydra's own parser, so the syntax is Hydra's: `lora.r=8,16` and `choice(8,16)`
list values, `range(1,5)` counts, `glob(*)` picks group options, `interval(1e-5,1e-3)` is a range to
draw from (`tag(log,interval(...))` on a log scale). A grid (sweep.search=grid) runs every combination
of the listed values, in the order Hydra's basic sweeper ran them; a search draws each trial's values
from an Optuna study (sweep/study.py); `tag(int,interval(1,64))` draws integers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lora_launch.conf.schema import ConfigError
from lora_launch.sweep.trials import sweep_name

# sweep.* keys say how to run the trials; the trials themselves never see them
_SWEEP_KEYS = "sweep."
# Hydra's own sweep settings: this sweeper reads hydra.sweep.dir and gives each trial its run.dir
_NOT_FOR_TRIALS = ("hydra.sweep.", "hydra.run.", "run.dir")


@dataclass
class SweepRequest:
    """A parsed `lora-launch -m ...`."""

    cfg: DictConfig  # the config with every non-swept override (swept keys at their defaults), validated
    sweep_dir: Path
    overrides: list  # Hydra's parsed overrides, in command-line order (hydra.* ones included)
    grid: list[list[str]] | None  # each grid trial's overrides as Hydra's basic sweeper formed them

    @property
    def swept(self) -> list:
        return [o for o in self.overrides if o.is_sweep_override()]

    @property
    def swept_keys(self) -> set[str]:
        return {o.key_or_group for o in self.swept}

    def trial_overrides(self, values: dict[str, str]) -> list[str]:
        """The overrides a trial runs with: the command line's, each swept key given its value
        (`values`: key element -> value text); sweep.*, run.dir and Hydra's sweep settings left out."""
        out = []
        for o in self.overrides:
            key = o.get_key_element()
            if o.is_sweep_override():
                out.append(f"{key}={values[key]}")
            elif not o.key_or_group.startswith(_SWEEP_KEYS) and not o.key_or_group.startswith(_NOT_FOR_TRIALS):
                out.append(o.input_line)
        return out

    def grid_values(self) -> list[dict[str, str]]:
        """Each grid trial's swept values (key element -> value text)."""
        keys = [o.get_key_element() for o in self.swept]
        return [
            dict(zip(keys, (j.partition("=")[2] for j in job if j.partition("=")[0] in keys)))
            for job in self.grid or []
        ]


def _refuse_foreign_sweepers(args: list[str]) -> None:
    for a in args:
        if a.startswith(("hydra/sweeper=", "hydra.sweeper.", "hydra/launcher=", "hydra.launcher.")):
            raise ConfigError(
                f"{a}: lora-launch runs sweeps itself; search with sweep.search=tpe|random "
                "sweep.trials=N, run trials at once with sweep.parallel=N (docs/sweeps.md)"
            )


def _grid(overrides: list) -> list[list[str]]:
    """Every combination, as Hydra's basic sweeper lists it (one value per key, the last one given wins)."""
    lists: dict[str, list[str]] = {}
    for o in overrides:
        if o.is_hydra_override():
            continue
        key = o.get_key_element()
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                raise ConfigError(
                    f"{o.input_line}: a grid lists values, it cannot draw from an interval; "
                    "search it with sweep.search=tpe (or random) sweep.trials=N"
                )
            lists[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            lists[key] = [f"{key}={o.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*lists.values())]


def read_request(args: list[str]) -> SweepRequest:
    """Parse a sweep's overrides and compose the config its trials share; ConfigError says what is wrong."""
    from lora_launch.conf.compose import compose_checked, parse_overrides, sweep_dir

    _refuse_foreign_sweepers(args)
    # hydra.sweep.dir is `sweeps/${sweep_name:}`: named from these overrides
    OmegaConf.register_new_resolver("sweep_name", lambda: sweep_name(args), replace=True)
    overrides = parse_overrides(args)
    for o in overrides:
        if o.is_sweep_override() and (o.is_hydra_override() or o.key_or_group.startswith(_SWEEP_KEYS)):
            raise ConfigError(f"{o.input_line}: {o.key_or_group} says how the sweep runs; give it one value")
    cfg = compose_checked([o.input_line for o in overrides if not o.is_sweep_override()])
    grid = _grid(overrides) if cfg.sweep.search == "grid" else None
    return SweepRequest(cfg, Path(sweep_dir()), overrides, grid)


def value_text(value) -> str:
    """A value drawn by a search, written as an override's value (Hydra's own formatting)."""
    from hydra.core.override_parser.types import Override

    return Override._get_value_element_as_str(value)


def search_space(request: SweepRequest) -> dict:
    """Optuna distributions of the swept keys, by key element: interval() -> a float range (`tag(int, ...)`
    integers, `tag(log, ...)` on a log scale), choice() and lists -> categories, an integer range() ->
    integers with its step."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space = {}
    for o in request.swept:
        sweep, key = o.value(), o.get_key_element()
        if isinstance(sweep, IntervalSweep):
            log = "log" in sweep.tags
            space[key] = (
                IntDistribution(int(sweep.start), int(sweep.end), log=log)
                if "int" in sweep.tags
                else FloatDistribution(float(sweep.start), float(sweep.end), log=log)
            )
        elif isinstance(sweep, RangeSweep) and all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)):
            last = sweep.start + (len(range(sweep.start, sweep.stop, sweep.step)) - 1) * sweep.step
            space[key] = IntDistribution(min(sweep.start, last), max(sweep.start, last), step=abs(sweep.step))
        elif isinstance(sweep, ChoiceSweep):
            if any(isinstance(v, (list, dict)) for v in sweep.list):
                raise ConfigError(f"{o.input_line}: a search chooses among single values, not lists")
            space[key] = CategoricalDistribution(list(sweep.list))
        elif isinstance(sweep, RangeSweep):  # a float range: the values it lists
            space[key] = CategoricalDistribution([float(v) for v in o.sweep_string_iterator()])
        else:
            raise ConfigError(
                f"{o.input_line}: a search draws from interval(), choice() or range(); "
                "list group options with choice(a,b)"
            )
    return space
