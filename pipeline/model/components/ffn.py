"""Feed-forward layers: GELU MLP (GPT), SwiGLU (Shazeer 2020; LLaMA), mixture of experts.

The MoE layer follows Switch Transformer / Mixtral: an fp32 router picks the top-k of
n_experts per token, the k gate weights are renormalized to sum to one (Mixtral), tokens are
grouped by expert and each expert runs once on its whole group. Its auxiliary losses are kept
on the layer after each forward (`layer.stats`) and gathered by the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model.components.base import ComponentConfig, ConfigError, Cost, Dims, positive
from pipeline.model.components.registry import Registry


@dataclass
class FFNConfig(ComponentConfig):
    family: ClassVar[str] = "ffn"
    name: str = "gelu"
    hidden: int | None = None  # None: the family's default width (see each class)

    def check(self, dims: Dims) -> None:
        if self.hidden is not None:
            positive(self.key("hidden"), self.hidden)


def _mlp_cost(d_model: int, hidden: int, gated: bool, bias: bool) -> Cost:
    """One MLP: gated (SwiGLU) has three d x h matrices and 2h + d biases, GELU two and h + d."""
    weights = (3 if gated else 2) * d_model * hidden
    biases = ((2 if gated else 1) * hidden + d_model) if bias else 0
    return Cost(params=weights + biases, macs=weights)


@dataclass
class GeluConfig(FFNConfig):
    name: str = "gelu"
    approximate: Literal["tanh", "none"] = "tanh"  # tanh (GPT-2's gelu_new) | none (exact erf GELU)

    def cost(self, dims: Dims, context_length: int) -> Cost:
        return _mlp_cost(dims.d_model, ffn_hidden(self, dims.d_model), gated=False, bias=dims.bias)


@dataclass
class SwiGLUConfig(FFNConfig):
    name: str = "swiglu"
    # Default width 8d/3 (Shazeer 2020; LLaMA), so its three matrices hold a 4d GELU MLP's
    # parameters, rounded up to a multiple of `multiple_of`. 1 keeps them within 1% of the
    # GELU MLP at every d_model >= 13 (tested); LLaMA uses 256, which at d_model 64 would add 12.5%.
    multiple_of: int = 1

    def check(self, dims: Dims) -> None:
        super().check(dims)
        positive(self.key("multiple_of"), self.multiple_of)

    def cost(self, dims: Dims, context_length: int) -> Cost:
        return _mlp_cost(dims.d_model, ffn_hidden(self, dims.d_model), gated=True, bias=dims.bias)


@dataclass
class MoEConfig(FFNConfig):
    name: str = "moe"
    n_experts: int = 8
    top_k: int = 2
    aux_loss_coef: float = 0.01  # Switch load-balancing loss weight (Fedus et al. 2021)
    z_loss_coef: float = 0.001  # router z-loss weight (Zoph et al. 2022, ST-MoE)
    # Training only: each expert serves at most ceil(capacity_factor * T * top_k / n_experts)
    # assignments per sequence of T tokens, first choices before second ones; None: no limit.
    # Evaluation (model.eval()) never drops a token.
    capacity_factor: float | None = None
    expert: Literal["swiglu", "gelu"] = "swiglu"  # the MLP each expert is
    # Expert width when `hidden` is None: the dense MLP's default width / granularity
    # (Krajewski et al. 2024). None = top_k: a token's active FFN parameters equal the dense
    # MLP's, so MoE against dense compares routing, not size; 1 = Mixtral's full-width experts.
    granularity: int | None = None
    multiple_of: int = 1
    approximate: Literal["tanh", "none"] = "tanh"

    def check(self, dims: Dims) -> None:
        super().check(dims)
        positive(self.key("n_experts"), self.n_experts)
        positive(self.key("top_k"), self.top_k)
        positive(self.key("multiple_of"), self.multiple_of)
        if self.granularity is not None:
            positive(self.key("granularity"), self.granularity)
        if self.top_k > self.n_experts:
            raise ConfigError(
                f"{self.key('top_k')}={self.top_k} > {self.key('n_experts')}={self.n_experts}; "
                "top_k must be between 1 and n_experts"
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"{self.key('capacity_factor')}={self.capacity_factor} must be > 0, or null for no limit")
        for coef in ("aux_loss_coef", "z_loss_coef"):
            if not getattr(self, coef) >= 0:
                raise ConfigError(f"{self.key(coef)}={getattr(self, coef)!r} must be >= 0 (0 switches the loss off)")

    def cost(self, dims: Dims, context_length: int) -> Cost:
        # Experts have no biases; the router (d -> n_experts, no bias) runs for every token.
        expert = _mlp_cost(dims.d_model, ffn_hidden(self, dims.d_model), self.expert == "swiglu", bias=False)
        router = dims.d_model * self.n_experts
        active = self.top_k * expert.params + router
        return Cost(params=self.n_experts * expert.params + router, macs=active, active=active)


def swiglu_hidden(d_model: int, multiple_of: int = 1, granularity: int = 1) -> int:
    """8d/3 / granularity, rounded to the nearest integer, then up to a multiple of
    `multiple_of` (LLaMA-7B: d 4096, multiple_of 256 -> 11008)."""
    return multiple_of * math.ceil(round(8 * d_model / (3 * granularity)) / multiple_of)


def ffn_hidden(cfg: FFNConfig, d_model: int) -> int:
    """Hidden width of one MLP (of one expert for MoE): `hidden` if set, else 4d for a GELU MLP
    and 8d/3 for a SwiGLU one (the same parameters), an MoE expert divided by its granularity."""
    if cfg.hidden is not None:
        return cfg.hidden
    if isinstance(cfg, MoEConfig):
        g = cfg.granularity or cfg.top_k
        if cfg.expert == "swiglu":
            return swiglu_hidden(d_model, cfg.multiple_of, g)
        return cfg.multiple_of * math.ceil(round(4 * d_model / g) / cfg.multiple_of)
    return swiglu_hidden(d_model, cfg.multiple_of) if isinstance(cfg, SwiGLUConfig) else 4 * d_model


FFN: Registry[nn.Module] = Registry("ffn")


@FFN.register("gelu")
class GeluMLP(nn.Module):
    """W2 GELU(W1 x + b1) + b2, hidden = 4d (Radford et al. 2018; Hendrycks & Gimpel 2016)."""

    Config = GeluConfig

    def __init__(self, cfg: GeluConfig, dims: Dims, layer: int) -> None:
        super().__init__()
        d_model, bias = dims.d_model, dims.bias
        hidden = ffn_hidden(cfg, d_model)
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)
        self.approximate = cfg.approximate

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x), approximate=self.approximate))


@FFN.register("swiglu")
class SwiGLU(nn.Module):
    """W2 (SiLU(W_gate x) * W_up x) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    Config = SwiGLUConfig

    def __init__(self, cfg: SwiGLUConfig, dims: Dims, layer: int) -> None:
        super().__init__()
        d_model, bias = dims.d_model, dims.bias
        hidden = ffn_hidden(cfg, d_model)
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=bias)  # [gate; up] fused
        self.down = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        # Two matmuls on the row halves of the fused weight: unlike the halves of one
        # (..., 2 * hidden) output, their outputs are contiguous, which makes silu and the
        # product (and their backward) cheaper; measured ~6% faster fwd+bwd at d_model 64.
        w_gate, w_up = self.gate_up.weight.chunk(2)
        b_gate, b_up = self.gate_up.bias.chunk(2) if self.gate_up.bias is not None else (None, None)
        return self.down(F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up))


@dataclass
class MoEStats:
    """What one MoE layer reports after a forward pass."""

    loss: Tensor  # aux_loss_coef * balance + z_loss_coef * z: add this to the training loss
    balance: Tensor  # Switch load-balancing loss, N * sum_i f_i * P_i (1.0 when balanced)
    z: Tensor  # router z-loss, mean over tokens of logsumexp(router logits)^2
    load: Tensor  # (n_experts,) fraction f_i of routing assignments sent to expert i
    dropped: Tensor  # number of (token, expert) assignments dropped by the capacity limit


@FFN.register("moe")
class MoE(nn.Module):
    """Sparse mixture of experts: y = sum_{e in topk(x)} g_e(x) * Expert_e(x) (Shazeer et al. 2017)."""

    Config = MoEConfig

    def __init__(self, cfg: MoEConfig, dims: Dims, layer: int) -> None:
        super().__init__()
        d_model = dims.d_model
        self.cfg = cfg
        self.gated = cfg.expert == "swiglu"
        hidden = ffn_hidden(cfg, d_model)
        E = cfg.n_experts
        self.router = nn.Linear(d_model, E, bias=False)
        # Experts stacked: w_in (E, [gate; up] or up, d), w_out (E, d, hidden).
        self.w_in = nn.Parameter(torch.empty(E, (2 if self.gated else 1) * hidden, d_model))
        self.w_out = nn.Parameter(torch.empty(E, d_model, hidden))
        nn.init.normal_(self.w_in, std=0.02)  # for the layer on its own; DecoderLM.reset_parameters
        nn.init.normal_(self.w_out, std=0.02)  # re-draws both with model.init_std
        self.stats: MoEStats | None = None

    def expert(self, e: int, x: Tensor) -> Tensor:
        h = x @ self.w_in[e].T
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate=self.cfg.approximate)
        return h @ self.w_out[e].T

    # "auto": grouped matmul where it applies (bf16 compute, d_model a multiple of 8), else the
    # loop; "loop" forces the reference (tests compare the two).
    dispatch: Literal["auto", "loop"] = "auto"

    def _grouped(self, flat: Tensor) -> bool:
        dtype = (
            torch.get_autocast_dtype(flat.device.type) if torch.is_autocast_enabled(flat.device.type) else flat.dtype
        )
        aligned = self.w_in.shape[-1] % 8 == 0  # d_model; the hidden width is padded below
        return self.dispatch == "auto" and dtype == torch.bfloat16 and aligned and hasattr(torch, "_grouped_mm")

    def _padded(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The expert weights in `dtype`, the hidden width zero-padded to a multiple of 8, as
        grouped matmuls need 16-byte aligned rows. A padded unit computes act(0) * 0 = 0 and
        its zero output weights add nothing, so outputs and gradients are unchanged; the cast
        copies the weights anyway, so the padding costs no extra pass."""
        E, d, hidden = self.w_out.shape
        pad = -hidden % 8
        w_in = self.w_in.to(dtype).view(E, -1, hidden, d)  # (E, [gate, up] or up, h, d)
        w_in = F.pad(w_in, (0, 0, 0, pad)).view(E, -1, d)
        return w_in, F.pad(self.w_out.to(dtype), (0, pad))

    def _experts_grouped(self, flat: Tensor, token: Tensor, gate: Tensor, counts: Tensor) -> Tensor:
        """All experts in two grouped matmuls over the expert-sorted assignments: one kernel
        per matrix for all experts, no per-expert sizes read back to the host (the loop reads
        them). torch._grouped_mm takes bf16 (what its CUDA kernel, Hopper and later, runs)."""
        bf16 = torch.bfloat16
        offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's group
        w_in, w_out = self._padded(bf16)
        h = torch._grouped_mm(flat[token].to(bf16), w_in.transpose(1, 2), offs=offs)  # (N*k, [2]h)
        if self.gated:
            g, up = h.chunk(2, dim=-1)
            h = F.silu(g) * up
        else:
            h = F.gelu(h, approximate=self.cfg.approximate)
        y = torch._grouped_mm(h.contiguous(), w_out.transpose(1, 2), offs=offs)  # (N*k, d)
        # Gate and sum of the top-k outputs in the stream's dtype (fp32 under autocast), as the
        # loop does: summed in bf16 they drifted 2.4% from fp32 (the loop 0.7%) at init 0.079.
        y = y.to(flat.dtype) * gate[:, None].to(flat.dtype)
        return torch.zeros_like(flat).index_add_(0, token, y)

    def _experts_loop(self, flat: Tensor, token: Tensor, gate: Tensor, counts: Tensor) -> Tensor:
        """The reference: one expert at a time on its group (reads the group sizes on the host)."""
        out = torch.zeros_like(flat)
        start = 0
        for e, n in enumerate(counts.tolist()):  # a loop over experts, never over tokens
            if n:
                idx = token[start : start + n]
                y = self.expert(e, flat[idx]) * gate[start : start + n, None].to(flat.dtype)
                out.index_add_(0, idx, y)
                start += n
        return out

    def _within_capacity(self, assign: Tensor, T: int) -> tuple[Tensor, Tensor]:
        """The assignments grouped by expert, and which of them the capacity limit serves.

        Capacity is per sequence (GShard's groups; Lepikhin et al. 2021): each expert takes at
        most ceil(capacity_factor * T * top_k / n_experts) assignments from each sequence of T
        tokens, so a sequence's output never depends on the others in its batch. Within a
        sequence, every first choice is served before any second choice (Switch's priority by
        rank; Fedus et al. 2021), then earlier tokens before later ones.
        """
        E, k = self.cfg.n_experts, self.cfg.top_k
        capacity = math.ceil(self.cfg.capacity_factor * T * k / E)
        a = torch.arange(assign.numel(), device=assign.device)
        token, choice = a // k, a % k
        n_seq, seq, pos = assign.numel() // (T * k), token // T, token % T
        group = assign * n_seq + seq  # (expert, sequence), expert-major: sorting keeps experts contiguous
        order = ((group * k + choice) * T + pos).argsort()  # distinct keys: group, choice, position
        sizes = torch.zeros(E * n_seq, dtype=torch.long, device=assign.device).index_add_(
            0, group, torch.ones_like(group)
        )
        rank = a - (sizes.cumsum(0) - sizes)[group[order]]  # place within its (expert, sequence)
        return order, rank < capacity

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, d)
        N, E, k = flat.shape[0], self.cfg.n_experts, self.cfg.top_k
        # Router in fp32: bf16 logits make routing unstable (Fedus et al. 2021, sec. 2.4);
        # autocast would cast the matmul back to bf16, so it is switched off here.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(flat.float(), self.router.weight.float())  # (N, E)
        probs = logits.softmax(dim=-1)
        gates, experts = probs.topk(k, dim=-1)  # (N, k)
        gates = gates / gates.sum(dim=-1, keepdim=True)

        # Everything below has static shapes: no host read, so no CUDA sync (bincount would
        # size its output from the data; boolean indexing too). Dropped assignments keep their
        # rows with a zero gate: their output is multiplied away.
        assign = experts.flatten()  # (N * k,): assignment a is token a // k's choice a % k
        counts = torch.zeros(E, dtype=torch.long, device=x.device).index_add_(0, assign, torch.ones_like(assign))
        if self.cfg.capacity_factor is None or not self.training:  # evaluation never drops
            order = assign.argsort(stable=True)  # grouped by expert, token order within each
            keep = None
        else:
            order, keep = self._within_capacity(assign, shape[-2] if x.dim() == 3 else N)
        token = order // k
        gate = gates.flatten()[order]
        dropped = torch.zeros((), dtype=torch.long, device=x.device)
        if keep is not None:
            gate = gate * keep
            dropped = (~keep).sum()

        if self._grouped(flat):
            out = self._experts_grouped(flat, token, gate, counts)
        else:
            out = self._experts_loop(flat, token, gate, counts)

        load = counts.float() / (N * k)  # f_i: fraction of assignments (sums to 1)
        balance = E * (load * probs.mean(dim=0)).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        self.stats = MoEStats(
            loss=self.cfg.aux_loss_coef * balance + self.cfg.z_loss_coef * z,
            balance=balance,
            z=z,
            load=load.detach(),
            dropped=dropped,
        )
        return out.view(shape)
