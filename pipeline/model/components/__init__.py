"""Component families: one module each, holding its configs, its nn.Modules and its registry.

Every component is built the same way, from its config and the model's dimensions:
`build(cfg, dims, layer)` looks the class up by `cfg.family` and `cfg.name` (docs/components.md).
"""

from torch import nn

from pipeline.model.components.attention import ATTENTION
from pipeline.model.components.base import ComponentConfig, ConfigError, Cost, Dims
from pipeline.model.components.ffn import FFN
from pipeline.model.components.norm import NORM
from pipeline.model.components.pos_enc import POS_ENC
from pipeline.model.components.registry import Registry
from pipeline.model.families import FAMILIES

REGISTRIES: dict[str, Registry] = dict(zip(FAMILIES, (POS_ENC, NORM, ATTENTION, FFN)))


def build(cfg: ComponentConfig, dims: Dims, layer: int = 0) -> nn.Module:
    """The module of a component config; `layer` is its block's index (0 for model-wide ones)."""
    return REGISTRIES[cfg.family].get(cfg.name)(cfg, dims, layer)


__all__ = [
    "ATTENTION",
    "FFN",
    "NORM",
    "POS_ENC",
    "REGISTRIES",
    "ComponentConfig",
    "ConfigError",
    "Cost",
    "Dims",
    "build",
]
