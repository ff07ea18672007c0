"""ModelConfig: the typed, validated shape of a decoder; one node per component family.

The model checks its own fields; each component config checks its choices and itself against
the model's dimensions (ComponentConfig.validate), so nothing here names a component.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import InitVar, dataclass, field
from typing import Any, Literal

from pipeline.checks import check_choices, check_keys, check_types
from pipeline.model.components import REGISTRIES
from pipeline.model.components.attention import AttentionConfig
from pipeline.model.components.base import ComponentConfig, ConfigError, Dims, positive
from pipeline.model.components.ffn import FFNConfig, GeluConfig
from pipeline.model.components.norm import LayerNormConfig, NormConfig
from pipeline.model.components.pos_enc import LearnedConfig, PosEncConfig
from pipeline.model.presets import PRESETS

__all__ = ["ConfigError", "ModelConfig", "merge"]

# Longest evaluation, in multiples of context_length, that a default model is sized for: the
# largest of the default eval.factors (1, 2, 4, 8). A run passes max(eval.factors) instead.
DEFAULT_REACH = 8


def _component(family: str, value: Any) -> ComponentConfig:
    """A component config from a dict (or an existing config), checked against its class."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"model.{family} must be a mapping with a 'name'; got {value!r}")
    registry = REGISTRIES[family]
    name = value["name"]
    if name not in registry:
        raise ConfigError(f"model.{family}.name='{name}' is not a known {family}; valid: {', '.join(registry.names())}")
    config_cls = registry.get(name).Config
    check_keys(f"model.{family}", value, config_cls, ConfigError, owner=f"{family} '{name}'")
    check_types(f"model.{family}", value, config_cls, ConfigError)
    return config_cls(**value)


SIZES = ("d_model", "n_layers", "n_heads", "context_length", "vocab_size")  # positive integers


def small_init_std(d_model: int) -> float:
    """sqrt(2 / (5 d_model)): the "small init" of Nguyen & Salazar (2019, "Transformers without
    Tears"), as in GPT-NeoX. 0.023 at GPT-2 small's width 768, where GPT-2 used 0.02; 0.079 at
    d_model 64, where 0.02 leaves a model at the CPU budget near the bigram floor (README)."""
    return math.sqrt(2.0 / (5.0 * d_model))


@dataclass
class ModelConfig:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    context_length: int = 64  # training context; evaluation may run past it
    vocab_size: int = 256
    pos_enc: PosEncConfig = field(default_factory=LearnedConfig)
    norm: NormConfig = field(default_factory=LayerNormConfig)
    placement: Literal["pre", "post"] = "pre"  # where a block normalizes: pre (GPT-2 on) | post (GPT-1)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    ffn: FFNConfig = field(default_factory=GeluConfig)
    bias: bool = True  # biases in linear layers and LayerNorm (GPT) or none (LLaMA)
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    dropout: float = 0.0
    # Std of the N(0, std) weights; None = small_init_std(d_model), so the init scales with width.
    # A fixed 0.02 is GPT-2's constant for widths 768-1600; at d_model 64 it made every arm
    # train slowly (issue 16). Set 0.02 to reproduce GPT-2's init exactly.
    init_std: float | None = None
    # Not a field (not logged, not in to_dict): the longest sequence the model must take, in
    # multiples of context_length. It sizes what the user left unset (a learned position
    # table's max_len), which then records it.
    reach: InitVar[int] = DEFAULT_REACH

    def __post_init__(self, reach: int) -> None:
        # A wrong type is one line here, not a TypeError later; sizes get `positive`'s wording.
        scalars = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        check_types(
            "model", {k: v for k, v in scalars.items() if k not in (*REGISTRIES, *SIZES)}, ModelConfig, ConfigError
        )
        for key in SIZES:
            positive(f"model.{key}", scalars[key])
        for family in REGISTRIES:
            setattr(self, family, _component(family, getattr(self, family)))
        self.pos_enc.fit(reach * self.context_length)
        if self.init_std is None:  # resolved here, so the run records the number it used
            self.init_std = small_init_std(self.d_model)
        self.validate()

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], reach: int = DEFAULT_REACH) -> ModelConfig:
        check_keys("model", d, cls, ConfigError)
        return cls(**copy.deepcopy(d), reach=reach)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A preset with overrides; a component override with another name replaces the node."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset '{name}'; valid: {', '.join(PRESETS)}")
        return cls.from_dict(merge(PRESETS[name], overrides))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- derived --------------------------------------------------------------------------
    @property
    def dims(self) -> Dims:
        """What each component is built from and checked against."""
        return Dims(self.d_model, self.n_layers, self.n_heads, self.context_length, self.bias, self.dropout)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.attention.kv_heads(self.n_heads)

    # -- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        for key in SIZES:
            positive(f"model.{key}", getattr(self, key))
        check_choices("model", self, ConfigError)
        if self.d_model % self.n_heads:
            divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0 and h <= 64]
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                f"choose n_heads from {divisors} or change d_model"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout!r} must be a number in [0, 1)")
        if not self.init_std > 0:
            raise ConfigError(
                f"model.init_std={self.init_std!r} must be a number > 0, or null for "
                f"sqrt(2 / (5 d_model)) = {small_init_std(self.d_model):.3g} (GPT-2: 0.02)"
            )
        dims = self.dims
        for family in REGISTRIES:
            getattr(self, family).validate(dims)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge overrides into a preset; a component node with a new `name` replaces the old."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and value.get("name", old.get("name")) == old.get("name"):
            out[key] = {**old, **value}
        else:
            out[key] = copy.deepcopy(value)
    return out
