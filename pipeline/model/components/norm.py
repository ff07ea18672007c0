"""Normalization layers: LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019).

Placement (pre / post) is a property of the block, set on the model (`model.placement`), so
swapping the norm never changes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from pipeline.model.components.registry import Registry


@dataclass
class NormConfig:
    name: str = "layernorm"
    eps: float = 1e-5


NORM: Registry[nn.Module] = Registry("norm")


@NORM.register("layernorm")
class LayerNorm(nn.LayerNorm):
    """(x - mean) / std * gain + bias; bias only when the model uses biases."""

    Config = NormConfig

    def __init__(self, d_model: int, eps: float, bias: bool) -> None:
        super().__init__(d_model, eps=eps, bias=bias)


@NORM.register("rmsnorm")
class RMSNorm(nn.RMSNorm):
    """x / rms(x) * gain: no centering, no bias (LLaMA). Computed in fp32 like LLaMA."""

    Config = NormConfig

    def __init__(self, d_model: int, eps: float, bias: bool) -> None:
        super().__init__(d_model, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type_as(x)


def build_norm(cfg: NormConfig, d_model: int, bias: bool) -> nn.Module:
    return NORM.get(cfg.name)(d_model, cfg.eps, bias)
