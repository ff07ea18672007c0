"""ModelConfig (typed, validated) and DecoderLM (pure PyTorch: no Hydra, Lightning or MLflow).

    from pipeline.model import ModelConfig, DecoderLM
    cfg = ModelConfig.from_preset("llama", d_model=128, attention={"name": "gqa", "n_kv_heads": 2})
    model = DecoderLM(cfg)
    logits = model(tokens)                                   # (B, T) -> (B, T, vocab)
    logits, aux = model(tokens, return_aux=True)             # aux: MoE losses, see DecoderLM
    out = model.generate(tokens, max_new_tokens=32, temperature=0.0)   # greedy, KV cache
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.components import REGISTRIES, build_attention, build_ffn, build_norm, build_pos_enc
from pipeline.components.attention import AttentionConfig, GQAConfig, KVCache, causal_bias, kv_heads
from pipeline.components.ffn import FFNConfig, GeluConfig, MoE, MoEConfig
from pipeline.components.norm import NormConfig
from pipeline.components.pos_enc import LearnedConfig, PosEncConfig
from pipeline.presets import PRESETS

# Allowed values of string settings, checked at the boundary.
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("norm", "placement"): ("pre", "post"),
    ("attention", "backend"): ("sdpa", "math"),
    ("ffn", "approximate"): ("none", "tanh"),
    ("ffn", "expert"): ("swiglu", "gelu"),
    ("pos_enc", "scaling"): ("none", "linear", "ntk"),
}


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
        raise ConfigError(
            f"model.{family}.name='{name}' is not a known {family}; valid: {', '.join(registry.names())}"
        )
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


class Block(nn.Module):
    """Pre-norm block (GPT-2 on; Xiong et al. 2020): the residual stream is never normalized."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.norm1 = build_norm(cfg.norm, cfg.d_model, cfg.bias)
        self.attn = build_attention(cfg.attention, cfg.d_model, cfg.n_heads, cfg.bias, layer, cfg.dropout)
        self.norm2 = build_norm(cfg.norm, cfg.d_model, cfg.bias)
        self.ffn = build_ffn(cfg.ffn, cfg.d_model, cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None,
                cache: KVCache | None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope, mask, cache))
        x = x + self.drop(self.ffn(self.norm2(x)))
        return x


class PostNormBlock(Block):
    """Post-norm block (Vaswani et al. 2017; GPT-1): normalize after each residual addition."""

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None,
                cache: KVCache | None) -> Tensor:
        x = self.norm1(x + self.drop(self.attn(x, rope, mask, cache)))
        x = self.norm2(x + self.drop(self.ffn(x)))
        return x


class DecoderLM(nn.Module):
    """Decoder-only language model assembled from the configured components.

    forward(tokens) -> logits (B, T, vocab). With return_aux=True it returns (logits, aux),
    aux a dict that is empty for dense models and for MoE models holds:
      moe_loss      sum over MoE layers of aux_loss_coef * balance + z_loss_coef * z (add to loss)
      moe_balance   mean Switch load-balancing loss over layers (1.0 = perfectly balanced)
      moe_z         mean router z-loss over layers
      moe_dropped   (token, expert) assignments dropped by the capacity limit, all layers
      expert_load   (n_moe_layers, n_experts) fraction of assignments per expert
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        block = PostNormBlock if cfg.norm.placement == "post" else Block
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = build_pos_enc(cfg.pos_enc, cfg.d_model, cfg.n_heads, cfg.head_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(block(cfg, i) for i in range(cfg.n_layers))
        # Pre-norm stacks end with a norm (GPT-2); post-norm output is already normalized.
        self.final_norm = build_norm(cfg.norm, cfg.d_model, cfg.bias) if cfg.norm.placement == "pre" else nn.Identity()
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.moe_layers = [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) weights; residual output projections scaled by 1/sqrt(2L) (GPT-2)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                residual = name.endswith(("out.weight", "down.weight", "w_out"))
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers) if residual else std)
            elif name.endswith("weight"):
                nn.init.ones_(p)  # norm gains
            else:
                nn.init.zeros_(p)  # biases

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.cfg.n_layers, batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim,
                       p.device, dtype or p.dtype)

    def _mask(self, T: int, S: int, offset: int, device: torch.device) -> Tensor | None:
        """None when attention can use its built-in causal mask; else an additive (H|1, T, S) bias."""
        bias = self.pos.bias(T, S, offset, device)  # ALiBi's (H, T, S) slopes; None for others
        if bias is None and (offset == 0 or T == 1):
            return None
        mask = causal_bias(T, S, offset, device)
        return mask if bias is None else bias + mask

    def forward(self, tokens: Tensor, cache: KVCache | None = None, return_aux: bool = False):
        B, T = tokens.shape
        offset = cache.length if cache is not None else 0
        x = self.drop(self.pos.embed(self.tok_emb(tokens), offset))  # (B, T, D)
        rope = self.pos.rotary(T, offset, tokens.device)
        mask = self._mask(T, offset + T, offset, tokens.device)
        for block in self.blocks:
            x = block(x, rope, mask, cache)
        if cache is not None:
            cache.length = offset + T
        logits = self.head(self.final_norm(x))  # (B, T, V)
        return (logits, self.aux()) if return_aux else logits

    def aux(self) -> dict[str, Tensor]:
        """MoE statistics of the last forward pass (empty for a dense model)."""
        stats = [m.stats for m in self.moe_layers if m.stats is not None]
        if not stats:
            return {}
        return {
            "moe_loss": torch.stack([s.loss for s in stats]).sum(),
            "moe_balance": torch.stack([s.balance for s in stats]).mean(),
            "moe_z": torch.stack([s.z for s in stats]).mean(),
            "moe_dropped": torch.stack([s.dropped for s in stats]).sum(),
            "expert_load": torch.stack([s.load for s in stats]),
        }

    @torch.no_grad()
    def generate(self, tokens: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Continue `tokens` (B, T) by max_new_tokens with the KV cache; temperature 0 = greedy."""
        was_training = self.training
        self.eval()
        cache = self.new_cache(tokens.shape[0], tokens.shape[1] + max_new_tokens)
        logits = self(tokens, cache=cache)[:, -1]
        out = [tokens]
        for i in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k, generator)  # (B, 1)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits = self(nxt, cache=cache)[:, -1]
        self.train(was_training)
        return torch.cat(out, dim=1)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embeddings else n


def sample(logits: Tensor, temperature: float, top_k: int | None,
           generator: torch.Generator | None = None) -> Tensor:
    """(B, V) logits -> (B, 1) next tokens."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
