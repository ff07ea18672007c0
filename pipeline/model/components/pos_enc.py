"""Positional encodings: learned, sinusoidal, RoPE, ALiBi, none.

Each encoding acts where its paper puts it, through three hooks the model calls once per
forward pass (never per layer):
  embed(x, offset)            additive absolute positions on the token embeddings
  rotary(T, offset, ...)      (cos, sin) tables that attention applies to q and k
  bias(T, S, offset, ...)     additive (H, T, S) attention-score bias
An encoding that does not use a hook returns its input / None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from pipeline.model.components.base import ComponentConfig, ConfigError, Cost, Dims, positive
from pipeline.model.components.registry import Registry


@dataclass
class PosEncConfig(ComponentConfig):
    family: ClassVar[str] = "pos_enc"
    name: str = "nope"
    limit_key: ClassVar[str | None] = None  # the setting that bounds max_positions(), if any

    def max_positions(self) -> int | None:
        """The longest sequence this encoding can take; None = no limit."""
        return None

    def fit(self, longest: int) -> None:
        """Size anything the user left unset for sequences of up to `longest` tokens (override)."""


class PositionalEncoding(nn.Module):
    Config = PosEncConfig

    def _apply(self, fn, recurse: bool = True):
        """Device moves apply to the frequency/slope buffers; dtype casts do not: they stay fp32
        under `model.to(torch.bfloat16)`. A bf16 angle pos * inv_freq keeps 8 bits, so RoPE's
        cos/sin at 8x a 256 context are off by up to ~0.4 (measured; tests/test_precision.py)."""
        fp32 = {n: b for n, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, b in fp32.items():
            if self._buffers[name].dtype != torch.float32:
                self._buffers[name] = b.to(self._buffers[name].device)
        return self

    def embed(self, x: Tensor, offset: int) -> Tensor:  # (B, T, D) -> (B, T, D)
        return x

    def rotary(self, T: int, offset: int, device: torch.device) -> tuple[Tensor, Tensor] | None:
        return None

    def bias(self, T: int, S: int, offset: int, device: torch.device) -> Tensor | None:
        return None

    def init_tokens(self, weight: Tensor) -> None:
        """Re-initialize the token embedding table if the encoding needs a scale (sinusoidal)."""


POS_ENC: Registry[PositionalEncoding] = Registry("pos_enc")


@POS_ENC.register("nope")
class NoPE(PositionalEncoding):
    """No positional information; causal masking alone leaks order (Kazemnejad et al. 2023)."""

    def __init__(self, cfg: PosEncConfig, dims: Dims, layer: int) -> None:
        super().__init__()


@dataclass
class LearnedConfig(PosEncConfig):
    name: str = "learned"
    # Table rows; None = the model's reach (max(eval.factors)) x context_length, so evaluation
    # past the training length scores rows that training never touched (that is what "does
    # not extrapolate" means, measured). See ModelConfig.reach.
    max_len: int | None = None
    limit_key: ClassVar[str | None] = "max_len"

    def max_positions(self) -> int | None:
        return self.max_len

    def fit(self, longest: int) -> None:
        if self.max_len is None:
            self.max_len = longest

    def check(self, dims: Dims) -> None:
        positive(self.key("max_len"), self.max_len)
        if self.max_len < dims.context_length:
            raise ConfigError(
                f"{self.key('max_len')}={self.max_len} < model.context_length={dims.context_length}; "
                "the learned table needs at least one row per position"
            )

    def cost(self, dims: Dims, context_length: int) -> Cost:
        # The whole table, rows never trained included: the model holds them.
        return Cost(params=self.max_len * dims.d_model)


@POS_ENC.register("learned")
class Learned(PositionalEncoding):
    """Learned absolute position embeddings (GPT-1, Radford et al. 2018; GPT-2)."""

    Config = LearnedConfig

    def __init__(self, cfg: LearnedConfig, dims: Dims, layer: int) -> None:
        super().__init__()
        assert cfg.max_len is not None, "ModelConfig fits max_len"
        self.table = nn.Embedding(cfg.max_len, dims.d_model)

    def rows(self, offset: int, T: int) -> Tensor:
        """The table's rows for positions offset .. offset + T - 1 (a subclass reuses them)."""
        if offset + T > self.table.num_embeddings:
            raise ValueError(
                f"position {offset + T - 1} is past the learned table "
                f"(pos_enc.max_len={self.table.num_embeddings}); raise model.pos_enc.max_len"
            )
        return self.table.weight[offset : offset + T]

    def embed(self, x: Tensor, offset: int) -> Tensor:
        return x + self.rows(offset, x.shape[1])


@dataclass
class SinusoidalConfig(PosEncConfig):
    name: str = "sinusoidal"
    base: float = 10000.0
    # RMS of the token embeddings (times sqrt(d_model)) at init, against the encoding's 1/sqrt(2)
    # = 0.71. 1.0: the paper's setting, N(0, 1/d_model) embeddings scaled by sqrt(d_model)
    # (Vaswani et al. 2017, sec. 3.4), so token and position enter at the same scale.
    token_rms: float = 1.0

    def check(self, dims: Dims) -> None:
        if not (isinstance(self.token_rms, int | float) and self.token_rms > 0):
            raise ConfigError(f"{self.key('token_rms')}={self.token_rms!r} must be > 0 (1.0: unit-RMS tokens)")


@POS_ENC.register("sinusoidal")
class Sinusoidal(PositionalEncoding):
    """Fixed sin/cos absolute positions (Vaswani et al. 2017, sec. 3.5).

    Token embeddings are drawn N(0, (token_rms / sqrt(d))^2) and multiplied by sqrt(d) (sec. 3.4),
    so they enter at RMS `token_rms` beside sinusoids of RMS 0.71. The GPT init (std 0.02) would
    give 0.16 x sqrt(d / 64): the position signal would dominate, and the arm's result flips
    with that choice (issue 10).
    """

    Config = SinusoidalConfig

    def __init__(self, cfg: SinusoidalConfig, dims: Dims, layer: int) -> None:
        super().__init__()
        d_model = dims.d_model
        inv_freq = cfg.base ** (-torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scale = math.sqrt(d_model)
        self.token_std = cfg.token_rms / self.scale

    def init_tokens(self, weight: Tensor) -> None:
        nn.init.normal_(weight, 0.0, self.token_std)

    def embed(self, x: Tensor, offset: int) -> Tensor:
        pos = torch.arange(offset, offset + x.shape[1], device=x.device, dtype=torch.float32)
        angle = pos[:, None] * self.inv_freq[None, :]  # (T, D/2)
        pe = torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(1)  # sin, cos interleaved
        return x * self.scale + pe[:, : x.shape[-1]].to(x.dtype)


@dataclass
class RopeConfig(PosEncConfig):
    name: str = "rope"
    theta: float = 10000.0
    # Evaluation-time context scaling: position interpolation (Chen et al. 2023) divides
    # positions by `scale`; NTK-aware scaling raises theta by scale^(d/(d-2)) instead.
    scaling: Literal["none", "linear", "ntk"] = "none"
    scale: float = 1.0

    def check(self, dims: Dims) -> None:
        if dims.head_dim % 2:
            raise ConfigError(
                f"rope needs an even head_dim, but model.d_model={dims.d_model} / model.n_heads="
                f"{dims.n_heads} = {dims.head_dim}; change d_model or n_heads"
            )
        if not self.scale > 0:
            raise ConfigError(f"{self.key('scale')}={self.scale!r} must be > 0 (1.0: no scaling)")
        if self.scaling == "ntk" and dims.head_dim <= 2:
            raise ConfigError(
                f"{self.key('scaling')}='ntk' needs head_dim > 2 (it raises theta by scale^(d/(d-2))), "
                f"but head_dim is {dims.head_dim}; use scaling=linear or fewer heads"
            )


@POS_ENC.register("rope")
class Rotary(PositionalEncoding):
    """Rotary position embedding (Su et al. 2021), rotate-half layout as in LLaMA / HF."""

    Config = RopeConfig

    def __init__(self, cfg: RopeConfig, dims: Dims, layer: int) -> None:
        super().__init__()
        head_dim = dims.head_dim
        theta = cfg.theta
        if cfg.scaling == "ntk":
            theta = theta * cfg.scale ** (head_dim / (head_dim - 2))
        self.pos_scale = cfg.scale if cfg.scaling == "linear" else 1.0
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotary(self, T: int, offset: int, device: torch.device) -> tuple[Tensor, Tensor]:
        pos = torch.arange(offset, offset + T, device=device, dtype=torch.float32) / self.pos_scale
        angle = pos[:, None] * self.inv_freq[None, :]  # (T, hd/2)
        angle = torch.cat((angle, angle), dim=-1)  # (T, hd)
        return angle.cos(), angle.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, hd); rotate pairs (i, i + hd/2) by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def alibi_slopes(n_heads: int) -> Tensor:
    """Head slopes of Press et al. 2022: a geometric sequence starting at 2^(-8/n).

    For a head count that is not a power of two, take the slopes of the closest smaller power
    of two and fill up with every other slope of the next power (the paper's recipe).
    """

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(power_of_two(closest) + extra)


@dataclass
class AlibiConfig(PosEncConfig):
    name: str = "alibi"


@POS_ENC.register("alibi")
class ALiBi(PositionalEncoding):
    """Attention with linear biases (Press et al. 2022): score -= slope_h * (i - j)."""

    Config = AlibiConfig

    def __init__(self, cfg: AlibiConfig, dims: Dims, layer: int) -> None:
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(dims.n_heads), persistent=False)

    def bias(self, T: int, S: int, offset: int, device: torch.device) -> Tensor:
        q_pos = torch.arange(offset, offset + T, device=device)
        k_pos = torch.arange(S, device=device)
        distance = (q_pos[:, None] - k_pos[None, :]).clamp(min=0).float()  # (T, S)
        return -self.slopes[:, None, None] * distance  # (H, T, S), fp32
