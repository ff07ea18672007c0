"""Hydra override grammar -> Optuna distributions, and back to overrides for a trial.

model/pos_enc=choice(rope,alibi)   -> categorical (a config-group choice)
seed=0,1                           -> categorical (comma list)
n_layers=range(2,8,2)              -> int with step  (grid: 2, 4, 6)
optimizer.lr=tag(log, interval(1e-4, 1e-2))  -> float, log scale (not for grid)
trainer.max_steps=300              -> fixed: passed to every trial unchanged
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
)
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import Trial

from ._errors import InvalidSweepError, SearchSpaceError

__all__ = ["InvalidSweepError", "SearchSpaceError", "SearchSpace", "Dimension", "parse"]

Value = Any  # str | int | float | bool | None


@dataclass
class Dimension:
    name: str  # the override key, e.g. "model/pos_enc" or "optimizer.lr"
    distribution: BaseDistribution
    grid: list[Value] | None  # every value, when the dimension is discrete

    def suggest(self, trial: Trial) -> Value:
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return trial.suggest_categorical(self.name, d.choices)
        if isinstance(d, IntDistribution):
            return trial.suggest_int(self.name, d.low, d.high, step=d.step, log=d.log)
        assert isinstance(d, FloatDistribution)
        return trial.suggest_float(self.name, d.low, d.high, step=d.step, log=d.log)


@dataclass
class SearchSpace:
    dimensions: list[Dimension] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)  # overrides every trial gets

    @property
    def is_discrete(self) -> bool:
        return all(d.grid is not None for d in self.dimensions)

    def grid(self) -> dict[str, list[Value]]:
        """The grid for optuna's GridSampler; errors name the continuous dimensions."""
        continuous = [d.name for d in self.dimensions if d.grid is None]
        if continuous:
            raise SearchSpaceError(
                f"sampler 'grid' needs discrete dimensions (choice, comma list, range), but "
                f"{continuous} are intervals; use hydra.sweeper.sampler=tpe (or random)"
            )
        return {d.name: list(d.grid) for d in self.dimensions}

    def grid_size(self) -> int:
        n = 1
        for values in self.grid().values():
            n *= len(values)
        return n

    def suggest(self, trial: Trial) -> dict[str, Value]:
        return {d.name: d.suggest(trial) for d in self.dimensions}

    def overrides(self, params: dict[str, Value]) -> list[str]:
        """Hydra overrides for one trial: its sampled values, then the fixed overrides."""
        sampled = [f"{name}={Override._get_value_element_as_str(v)}" for name, v in params.items()]
        return sampled + list(self.fixed)


def parse(overrides: list[str], parser: OverridesParser) -> SearchSpace:
    """Parse `key=value` strings; a key given twice keeps its last value (command line wins)."""
    by_key: dict[str, Override] = {}
    for override in parser.parse_overrides(overrides):
        by_key[override.get_key_element()] = override
    space = SearchSpace()
    for key, override in by_key.items():
        if not override.is_sweep_override():
            space.fixed.append(f"{key}={override.get_value_element_as_str()}")
        else:
            space.dimensions.append(_dimension(key, override))
    return space


def _dimension(key: str, override: Override) -> Dimension:
    value = override.value()
    if override.is_choice_sweep():  # choice(a,b), `a,b`, or a glob over a group's options
        if isinstance(value, ChoiceSweep):
            _no_tags(key, value.tags)
        choices = list(override.sweep_iterator(transformer=Override._convert_value))
        bad = [c for c in choices if not (c is None or isinstance(c, (str, int, float, bool)))]
        if bad:
            raise SearchSpaceError(f"{key}: choices must be scalars (str, int, float, bool, null), got {bad}")
        return Dimension(key, CategoricalDistribution(choices), choices)
    if isinstance(value, RangeSweep):
        _no_tags(key, value.tags)
        values = list(override.sweep_iterator())
        if not values:
            raise SearchSpaceError(f"{key}: {override.get_value_string()} is empty")
        if all(isinstance(v, int) for v in values) and isinstance(value.step, int):
            dist: BaseDistribution = IntDistribution(min(values), max(values), step=abs(value.step))
        else:
            dist = FloatDistribution(min(values), max(values), step=abs(float(value.step)))
        return Dimension(key, dist, values)
    if isinstance(value, IntervalSweep):
        _no_tags(key, value.tags - {"log", "int"})
        log = "log" in value.tags
        if "int" in value.tags:
            return Dimension(key, IntDistribution(int(value.start), int(value.end), log=log), None)
        return Dimension(key, FloatDistribution(float(value.start), float(value.end), log=log), None)
    raise SearchSpaceError(f"{key}: unsupported sweep {override.get_value_string()!r}")


def _no_tags(key: str, tags: set[str]) -> None:
    if tags:
        raise SearchSpaceError(
            f"{key}: unsupported tags {sorted(tags)}; valid: tag(log, ...) and tag(int, ...) on interval"
        )
