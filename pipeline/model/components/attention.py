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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model.components.pos_enc import apply_rotary
from pipeline.model.components.registry import Registry


@dataclass
class AttentionConfig:
    name: str = "mha"
    backend: str = "sdpa"  # sdpa | math


@dataclass
class GQAConfig(AttentionConfig):
    name: str = "gqa"
    n_kv_heads: int = 2


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

    def __init__(
        self, d_model: int, n_heads: int, n_kv_heads: int, bias: bool, backend: str, layer: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.layer = layer
        self.dropout = dropout
        # One fused projection for q, k, v: one matmul instead of three.
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.out = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.attend = self._sdpa if backend == "sdpa" else self._math  # resolved once

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
            attn_mask=None if mask is None else mask.to(q.dtype),
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

    @staticmethod
    def kv_heads(cfg: AttentionConfig, n_heads: int) -> int:
        return n_heads


@ATTENTION.register("gqa")
class GQA(CausalSelfAttention):
    """n_kv_heads key/value heads, each shared by a group of query heads."""

    Config = GQAConfig

    @staticmethod
    def kv_heads(cfg: GQAConfig, n_heads: int) -> int:
        return cfg.n_kv_heads


@ATTENTION.register("mqa")
class MQA(CausalSelfAttention):
    """One key/value head shared by all query heads."""

    Config = AttentionConfig

    @staticmethod
    def kv_heads(cfg: AttentionConfig, n_heads: int) -> int:
        return 1


def kv_heads(cfg: AttentionConfig, n_heads: int) -> int:
    """Number of key/value heads the configured attention keeps (and caches)."""
    return ATTENTION.get(cfg.name).kv_heads(cfg, n_heads)


def build_attention(
    cfg: AttentionConfig, d_model: int, n_heads: int, bias: bool, layer: int, dropout: float = 0.0
) -> nn.Module:
    cls = ATTENTION.get(cfg.name)
    return cls(d_model, n_heads, kv_heads(cfg, n_heads), bias, cfg.backend, layer, dropout)
