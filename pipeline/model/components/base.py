"""What every component shares: its config's base class, the model dimensions it is built from,
its analytic cost, and the error a bad value raises. This module imports no torch.

A component is one nn.Module class and one config dataclass, registered under a name:

    @dataclass
    class ToyConfig(PosEncConfig):          # the family's base config sets `family`
        name: str = "toy"
        mode: Literal["a", "b"] = "a"      # string choices are typed; checked by validate()
        def check(self, dims): ...          # cross-field checks against the model
        def cost(self, dims, context_length): ...   # parameters and MACs per token

    @POS_ENC.register("toy")
    class Toy(PositionalEncoding):
        Config = ToyConfig
        def __init__(self, cfg: ToyConfig, dims: Dims, layer: int) -> None: ...

Every family's modules take the same three arguments (see docs/components.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pipeline.checks import check_choices


class ConfigError(ValueError):
    """An invalid model configuration; the message names the field, the value and the fix."""


def positive(key: str, value: Any) -> None:
    """Refuse anything but a positive int (bools and floats included)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}={value!r} must be a positive integer")


@dataclass(frozen=True)
class Dims:
    """What a component may know of the model it is part of (ModelConfig.dims)."""

    d_model: int
    n_layers: int
    n_heads: int
    context_length: int
    bias: bool  # biases in linear layers and LayerNorm
    dropout: float

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class Cost:
    """Analytic cost of one instance of a component; conventions in pipeline/evaluate/cost.py.

    params: parameters it holds. active: those one token uses (MoE: top_k experts); None = all.
    macs: multiply-accumulates per token in matrix products, at the given context length.
    """

    params: int = 0
    macs: int = 0
    active: int | None = None

    @property
    def active_params(self) -> int:
        return self.params if self.active is None else self.active


@dataclass
class ComponentConfig:
    """Base of every component config: it owns its choices, its checks and its cost counts."""

    family: ClassVar[str] = ""  # set by each family's base config: pos_enc | norm | attention | ffn
    name: str = ""

    def key(self, field: str) -> str:
        """The dotted config key of one of its fields, as errors and overrides spell it."""
        return f"model.{self.family}.{field}"

    def validate(self, dims: Dims) -> None:
        """Literal-typed choices first, then the component's own cross-field checks."""
        check_choices(f"model.{self.family}", self, ConfigError)
        self.check(dims)

    def check(self, dims: Dims) -> None:
        """Checks against the model (override); raise ConfigError naming field, value and fix."""

    def cost(self, dims: Dims, context_length: int) -> Cost:
        """Parameters and matmul MACs per token of one instance (override if not zero)."""
        return Cost()
