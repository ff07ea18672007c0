"""Causal self-attention: MHA (Vaswani et al. 2017), GQA (Ainslie et al. 2023), MQA (Shazeer 2019).

All three are one module: n_kv_heads = n_heads (MHA), 1 (MQA) or in between (GQA). Keys and
values are projected and cached at n_kv_heads only, which is the memory GQA/MQA exist to save;
each kv head serves n_heads / n_kv_heads query heads.

Backends compute the same function: `sdpa` calls F.scaled_dot_product_attention (FlashAttention
or memory-efficient kernels on a GPU where they apply); `math` writes softmax(QK^T/sqrt(d) + B)V out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model.components.base import ComponentConfig, ConfigError, Cost, Dims, positive
from pipeline.model.components.pos_enc import apply_rotary
from pipeline.model.components.registry import Registry


@dataclass
class AttentionConfig(ComponentConfig):
    """MHA's config and the family's base: every query head has its own key/value head."""

    family: ClassVar[str] = "attention"
    name: str = "mha"
    backend: Literal["sdpa", "math"] = "sdpa"

    def kv_heads(self, n_heads: int) -> int:
        """Number of key/value heads kept (and cached)."""
        return n_heads

    def score_macs(self, dims: Dims, context_length: int) -> int:
        """QK^T and AV per token: one query against T keys, per head, over the full T x T matrix."""
        return 2 * context_length * dims.n_heads * dims.head_dim

    def cost(self, dims: Dims, context_length: int) -> Cost:
        # Fused qkv projection d -> (H + 2 Hkv) hd, output H hd -> d.
        d, H, hd, Hkv = dims.d_model, dims.n_heads, dims.head_dim, self.kv_heads(dims.n_heads)
        weights = d * (H + 2 * Hkv) * hd + H * hd * d
        biases = ((H + 2 * Hkv) * hd + d) if dims.bias else 0
        return Cost(params=weights + biases, macs=weights + self.score_macs(dims, context_length))


@dataclass
class GQAConfig(AttentionConfig):
    name: str = "gqa"
    n_kv_heads: int = 2

    def kv_heads(self, n_heads: int) -> int:
        return self.n_kv_heads

    def check(self, dims: Dims) -> None:
        positive(self.key("n_kv_heads"), self.n_kv_heads)
        if dims.n_heads % self.n_kv_heads:
            divisors = [h for h in range(1, dims.n_heads + 1) if dims.n_heads % h == 0]
            raise ConfigError(
                f"{self.key('n_kv_heads')}={self.n_kv_heads} does not divide model.n_heads={dims.n_heads}; "
                f"choose n_kv_heads from {divisors}"
            )


@dataclass
class MQAConfig(AttentionConfig):
    name: str = "mqa"

    def kv_heads(self, n_heads: int) -> int:
        return 1


class KVCache:
    """Preallocated per-layer key/value buffers of shape (B, n_kv_heads, max_len, head_dim)."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0  # tokens already stored; advanced by the model after all layers ran

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store (B, Hkv, T, hd) at the current position; return everything cached so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def causal_bias(T: int, S: int, offset: int, device: torch.device) -> Tensor:
    """(T, S) additive mask: 0 where key j <= query offset + i, -inf after it."""
    q_pos = torch.arange(offset, offset + T, device=device)
    k_pos = torch.arange(S, device=device)
    return torch.zeros(T, S, device=device).masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))


ATTENTION: Registry[nn.Module] = Registry("attention")


class CausalSelfAttention(nn.Module):
    Config = AttentionConfig

    def __init__(self, cfg: AttentionConfig, dims: Dims, layer: int) -> None:
        super().__init__()
        d_model, bias = dims.d_model, dims.bias
        self.n_heads, self.n_kv_heads = dims.n_heads, cfg.kv_heads(dims.n_heads)
        self.head_dim = dims.head_dim
        self.layer = layer  # its slot in the KV cache
        self.dropout = dims.dropout
        # One fused projection for q, k, v: one matmul instead of three.
        self.qkv = nn.Linear(d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=bias)
        self.out = nn.Linear(self.n_heads * self.head_dim, d_model, bias=bias)
        self.attend = self._sdpa if cfg.backend == "sdpa" else self._math  # resolved once

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        B, T, _ = x.shape
        hd, H, Hkv = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = self.qkv(x).split((H * hd, Hkv * hd, Hkv * hd), dim=-1)
        q = q.view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, Hkv, hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, hd)
        y = self.attend(q, k, v, mask)  # (B, H, T, hd)
        return self.out(y.transpose(1, 2).reshape(B, T, H * hd))

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        # mask None means plain causal with T == S (or a single query, which sees everything).
        causal = mask is None and q.shape[2] > 1
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,  # (1, H|1, T, S) in q's dtype: DecoderLM._mask builds it once per forward
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )

    def _math(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        B, H, T, hd = q.shape
        group = H // self.n_kv_heads
        # (B, Hkv, group, T, hd): each kv head against its group of query heads, no copies of k/v.
        qg = q.view(B, self.n_kv_heads, group, T, hd)
        scores = qg @ k.unsqueeze(2).transpose(-2, -1) / math.sqrt(hd)  # (B, Hkv, g, T, S)
        scores = scores.view(B, H, T, -1).float()
        if mask is None:
            mask = causal_bias(T, k.shape[2], k.shape[2] - T, q.device)
        probs = (scores + mask).softmax(dim=-1).to(q.dtype)
        probs = F.dropout(probs, self.dropout, self.training)
        y = probs.view(B, self.n_kv_heads, group, T, -1) @ v.unsqueeze(2)
        return y.view(B, H, T, hd)


@ATTENTION.register("mha")
class MHA(CausalSelfAttention):
    """Every query head has its own key/value head."""

    Config = AttentionConfig


@ATTENTION.register("gqa")
class GQA(CausalSelfAttention):
    """n_kv_heads key/value heads, each shared by a group of query heads."""

    Config = GQAConfig


@ATTENTION.register("mqa")
class MQA(CausalSelfAttention):
    """One key/value head shared by all query heads."""

    Config = MQAConfig
