"""DecoderLM: a decoder-only language model assembled from its components (pure PyTorch)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pipeline.model.components import build
from pipeline.model.components.attention import KVCache, causal_bias
from pipeline.model.components.ffn import MoE
from pipeline.model.config import ModelConfig


class Block(nn.Module):
    """Pre-norm block (GPT-2 on; Xiong et al. 2020): the residual stream is never normalized."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        dims = cfg.dims
        self.norm1 = build(cfg.norm, dims, layer)
        self.attn = build(cfg.attention, dims, layer)
        self.norm2 = build(cfg.norm, dims, layer)
        self.ffn = build(cfg.ffn, dims, layer)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope, mask, cache))
        x = x + self.drop(self.ffn(self.norm2(x)))
        return x


class PostNormBlock(Block):
    """Post-norm block (Vaswani et al. 2017; GPT-1): normalize after each residual addition."""

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
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
        block = PostNormBlock if cfg.placement == "post" else Block
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = build(cfg.pos_enc, cfg.dims)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(block(cfg, i) for i in range(cfg.n_layers))
        # Pre-norm stacks end with a norm (GPT-2); post-norm output is already normalized.
        self.final_norm = build(cfg.norm, cfg.dims, cfg.n_layers) if cfg.placement == "pre" else nn.Identity()
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.moe_layers = [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) weights; residual output projections scaled by 1/sqrt(2L) (GPT-2); token
        embeddings as the positional encoding asks (sinusoidal: unit RMS after its sqrt(d) scale)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                residual = name.endswith(("out.weight", "down.weight", "w_out"))
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers) if residual else std)
            elif name.endswith("weight"):
                nn.init.ones_(p)  # norm gains
            else:
                nn.init.zeros_(p)  # biases
        self.pos.init_tokens(self.tok_emb.weight)  # an encoding may set the token scale (sinusoidal)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(
            self.cfg.n_layers, batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim, p.device, dtype or p.dtype
        )

    def _mask(self, T: int, S: int, offset: int, device: torch.device) -> Tensor | None:
        """None when attention can use its built-in causal mask; else an additive (1, H|1, T, S)
        bias, built once per forward pass in the compute dtype (autocast's, else the weights'):
        the fused sdpa kernels take a 4-d mask of q's dtype, so no layer casts or expands it."""
        bias = self.pos.bias(T, S, offset, device)  # ALiBi's (H, T, S) slopes; None for others
        if bias is None and (offset == 0 or T == 1):
            return None
        mask = causal_bias(T, S, offset, device)
        mask = mask if bias is None else bias + mask
        on = torch.is_autocast_enabled(device.type)
        return mask.to(torch.get_autocast_dtype(device.type) if on else self.tok_emb.weight.dtype)[None]

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
    def generate(
        self,
        tokens: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
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


def sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None = None) -> Tensor:
    """(B, V) logits -> (B, 1) next tokens."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
