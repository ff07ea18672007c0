"""Normalization layers: LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019).

Placement (pre / post) is a property of the block, set on the model (`model.placement`), so
swapping the norm never changes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from pipeline.model.components.base import ComponentConfig, ConfigError, Cost, Dims
from pipeline.model.components.registry import Registry


@dataclass
class NormConfig(ComponentConfig):
    family: ClassVar[str] = "norm"
    name: str = "layernorm"
    eps: float = 1e-5

    def check(self, dims: Dims) -> None:
        if not self.eps > 0:
            raise ConfigError(f"{self.key('eps')}={self.eps!r} must be > 0 (1e-5 is usual)")


@dataclass
class LayerNormConfig(NormConfig):
    name: str = "layernorm"

    def cost(self, dims: Dims, context_length: int) -> Cost:
        return Cost(params=dims.d_model * (2 if dims.bias else 1))  # gain (+ bias)


@dataclass
class RMSNormConfig(NormConfig):
    name: str = "rmsnorm"

    def cost(self, dims: Dims, context_length: int) -> Cost:
        return Cost(params=dims.d_model)  # gain only


NORM: Registry[nn.Module] = Registry("norm")


@NORM.register("layernorm")
class LayerNorm(nn.LayerNorm):
    """(x - mean) / std * gain + bias; bias only when the model uses biases."""

    Config = LayerNormConfig

    def __init__(self, cfg: LayerNormConfig, dims: Dims, layer: int) -> None:
        super().__init__(dims.d_model, eps=cfg.eps, bias=dims.bias)


@NORM.register("rmsnorm")
class RMSNorm(nn.RMSNorm):
    """x / rms(x) * gain: no centering, no bias (LLaMA). Computed in fp32 like LLaMA."""

    Config = RMSNormConfig

    def __init__(self, cfg: RMSNormConfig, dims: Dims, layer: int) -> None:
        super().__init__(dims.d_model, eps=cfg.eps)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type_as(x)
