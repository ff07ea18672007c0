"""ModelConfig: the typed, validated shape of a decoder; one node per component family."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.model.components import REGISTRIES
from pipeline.model.components.attention import AttentionConfig, GQAConfig, kv_heads
from pipeline.model.components.ffn import FFNConfig, GeluConfig, MoEConfig
from pipeline.model.components.norm import NormConfig
from pipeline.model.components.pos_enc import LearnedConfig, PosEncConfig
from pipeline.model.presets import PRESETS

# Allowed values of string settings, checked at the boundary.
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("attention", "backend"): ("sdpa", "math"),
    ("ffn", "approximate"): ("none", "tanh"),
    ("ffn", "expert"): ("swiglu", "gelu"),
    ("pos_enc", "scaling"): ("none", "linear", "ntk"),
}


PLACEMENTS = ("pre", "post")  # where a block normalizes: its sublayer inputs, or after each residual add


class ConfigError(ValueError):
    """An invalid model configuration; the message names the field, the value and the fix."""


def _component(family: str, value: Any) -> Any:
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
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ConfigError(
            f"model.{family}.{unknown[0]} is not a setting of {family} '{name}'; "
            f"its settings: {', '.join(sorted(fields))}"
        )
    return config_cls(**value)


@dataclass
class ModelConfig:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    context_length: int = 64  # training context; evaluation may run past it
    vocab_size: int = 256
    pos_enc: PosEncConfig = field(default_factory=LearnedConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    placement: str = "pre"  # norm placement in the block: pre (GPT-2 on) | post (GPT-1)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    ffn: FFNConfig = field(default_factory=GeluConfig)
    bias: bool = True  # biases in linear layers and LayerNorm (GPT) or none (LLaMA)
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for family in REGISTRIES:
            setattr(self, family, _component(family, getattr(self, family)))
        if isinstance(self.pos_enc, LearnedConfig) and self.pos_enc.max_len is None:
            self.pos_enc.max_len = 8 * self.context_length
        self.validate()

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"model.{unknown[0]} is not a model setting; valid: {', '.join(sorted(names))}")
        return cls(**copy.deepcopy(d))

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
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        return kv_heads(self.attention, self.n_heads)

    # -- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        for key in ("d_model", "n_layers", "n_heads", "context_length", "vocab_size"):
            _positive(f"model.{key}", getattr(self, key))
        for family in REGISTRIES:
            node = getattr(self, family)
            for f in dataclasses.fields(node):
                allowed = _CHOICES.get((family, f.name))
                value = getattr(node, f.name)
                if allowed and value not in allowed:
                    raise ConfigError(f"model.{family}.{f.name}='{value}' is not valid; valid: {', '.join(allowed)}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"model.placement='{self.placement}' is not valid; valid: {', '.join(PLACEMENTS)}")
        if self.d_model % self.n_heads:
            divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0 and h <= 64]
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                f"choose n_heads from {divisors} or change d_model"
            )
        if isinstance(self.attention, GQAConfig):
            kv = self.attention.n_kv_heads
            _positive("model.attention.n_kv_heads", kv)
            if self.n_heads % kv:
                divisors = [h for h in range(1, self.n_heads + 1) if self.n_heads % h == 0]
                raise ConfigError(
                    f"model.attention.n_kv_heads={kv} does not divide model.n_heads={self.n_heads}; "
                    f"choose n_kv_heads from {divisors}"
                )
        if self.pos_enc.name == "rope" and self.head_dim % 2:
            raise ConfigError(
                f"rope needs an even head_dim, but model.d_model={self.d_model} / model.n_heads="
                f"{self.n_heads} = {self.head_dim}; change d_model or n_heads"
            )
        if isinstance(self.pos_enc, LearnedConfig) and self.pos_enc.max_len < self.context_length:
            raise ConfigError(
                f"model.pos_enc.max_len={self.pos_enc.max_len} < model.context_length="
                f"{self.context_length}; the learned table needs at least one row per position"
            )
        if self.ffn.hidden is not None:
            _positive("model.ffn.hidden", self.ffn.hidden)
        if isinstance(self.ffn, MoEConfig):
            _positive("model.ffn.n_experts", self.ffn.n_experts)
            _positive("model.ffn.top_k", self.ffn.top_k)
            if self.ffn.top_k > self.ffn.n_experts:
                raise ConfigError(
                    f"model.ffn.top_k={self.ffn.top_k} > model.ffn.n_experts={self.ffn.n_experts}; "
                    f"top_k must be between 1 and n_experts"
                )
            if self.ffn.capacity_factor is not None and self.ffn.capacity_factor <= 0:
                raise ConfigError(
                    f"model.ffn.capacity_factor={self.ffn.capacity_factor} must be > 0, or null for no limit"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")


def _positive(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}={value!r} must be a positive integer")


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
