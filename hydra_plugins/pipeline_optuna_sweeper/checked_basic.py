"""Hydra's basic sweeper (`a,b` lists, the cartesian product), checking every point before any
job launches: `pipeline.train -m model.n_heads=3,4` refuses the sweep in one line instead of
training the valid points and failing on the invalid one. Selected in pipeline/conf/train.yaml
as `hydra/sweeper=checked_basic`; `hydra/sweeper=optuna` replaces it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore
from hydra.utils import get_method

from ._errors import InvalidSweepError


@dataclass
class CheckedBasicSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.pipeline_optuna_sweeper.checked_basic.CheckedBasicSweeper"
    # Dotted path to `fn(cfg) -> None` that raises for a config that cannot run (as for optuna).
    validate: str | None = "pipeline.run.spec.validate_config"


ConfigStore.instance().store(
    group="hydra/sweeper", name="checked_basic", node=CheckedBasicSweeperConf, provider="pipeline_optuna_sweeper"
)


class CheckedBasicSweeper(BasicSweeper):
    def __init__(
        self, max_batch_size: int | None, params: dict[str, str] | None = None, validate: str | None = None
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.validate = get_method(validate) if validate else None

    def sweep(self, arguments: list[str]) -> Any:
        from .sweeper import check_point

        assert self.config is not None and self.hydra_context is not None
        # Every point, not only the first batch: a later batch's bad point would fail after compute.
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        points = self.split_arguments(parser.parse_overrides(self._parse_config() + list(arguments)), None)
        for overrides in (p for batch in points for p in batch):
            reason = check_point(self.hydra_context.config_loader, self.config, overrides, self.validate)
            if reason is not None:
                raise InvalidSweepError(f"sweep point {' '.join(overrides)} is invalid, nothing was launched: {reason}")
        return super().sweep(arguments)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        pass  # done above, for every batch, before the first launch
