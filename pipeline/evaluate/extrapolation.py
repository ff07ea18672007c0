"""Context extrapolation: perplexity at multiples of the training context (Press et al. 2022).

Protocol (the ALiBi paper's, sec. 4): a model trained at context L is scored on held-out text
cut into non-overlapping windows of length W = f * L for each factor f; every position of a
window is scored, so a window's first token is predicted from nothing and its last from W - 1
tokens. All factors score the *same* tokens: the span is the first n * max(f) * L + 1 held-out
tokens (n = number of windows at the largest factor, capped by `max_windows`), and window i
of length W reads span[i W : (i+1) W] and predicts span[i W + 1 : (i+1) W + 1]. So every
target token in span[1:] is scored exactly once at every factor (for factors that divide the
largest one; others drop the incomplete tail window), and ppl_x1, ppl_x2 ... differ only in
how much context the model is given.

Sliding variant (optional, `sliding: true`): windows of length W advance by L and score only
their last L tokens (the first window scores all of its tokens), so every token after the
first window sees at least W - L tokens of context. Same targets, f times the compute.

RoPE scaling (optional, `rope_scaling: [linear, ntk]`, rope models only): at factor f the
model is rebuilt with position interpolation (positions / f; Chen et al. 2023) or NTK-aware
scaling (theta * f^(d/(d-2))) and scored at W = f * L, without fine-tuning.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.model import DecoderLM, ModelConfig
from pipeline.model.components.pos_enc import RopeConfig

ROPE_SCALINGS = ("linear", "ntk")


def eval_span(tokens: Tensor, context_length: int, factors: list[int], max_windows: int) -> Tensor:
    """The first n * max(factors) * L + 1 tokens: one span shared by every factor."""
    longest = max(factors) * context_length
    n = min(max_windows, (tokens.numel() - 1) // longest)
    if n < 1:
        raise ValueError(
            f"held-out text has {tokens.numel()} tokens, fewer than one window of "
            f"max(eval.factors) * context_length + 1 = {longest + 1}; lower eval.factors or "
            f"provide more held-out text"
        )
    return tokens[: n * longest + 1]


def windows(span: Tensor, length: int, stride: int | None = None) -> tuple[Tensor, Tensor]:
    """(inputs, targets), each (n_windows, length): windows of `span` starting every `stride`
    tokens (default: non-overlapping), targets shifted by one. Views, no copies."""
    stride = stride or length
    return span[:-1].unfold(0, length, stride), span[1:].unfold(0, length, stride)


@torch.no_grad()
def window_nll(
    model: DecoderLM, inputs: Tensor, targets: Tensor, batch_tokens: int, score_from: Tensor | None = None
) -> tuple[float, int]:
    """(summed NLL, number of scored tokens) over windows, batched to ~batch_tokens per forward.

    score_from: (n_windows,) first scored position of each window (default 0: all positions).
    Chunking bounds activation memory at long windows; it does not change the result.
    """
    device = next(model.parameters()).device
    n, W = inputs.shape
    per_batch = max(1, batch_tokens // W)
    pos = torch.arange(W, device=device)
    total, count = 0.0, 0
    for start in range(0, n, per_batch):
        x = inputs[start : start + per_batch].to(device)
        y = targets[start : start + per_batch].to(device)
        logits = model(x)  # (b, W, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        if score_from is not None:
            keep = pos[None, :] >= score_from[start : start + per_batch, None].to(device)
            nll = nll[keep]
        total += nll.double().sum().item()
        count += nll.numel()
    return total, count


def perplexity(model: DecoderLM, span: Tensor, length: int, batch_tokens: int, stride: int | None = None) -> float:
    """Perplexity of `span` in windows of `length`; with `stride` < length, sliding windows
    that score only their last `stride` tokens (the first window scores all)."""
    inputs, targets = windows(span, length, stride)
    score_from = None
    if stride is not None and stride < length:
        score_from = torch.full((inputs.shape[0],), length - stride)
        score_from[0] = 0
    total, count = window_nll(model, inputs, targets, batch_tokens, score_from)
    return math.exp(total / count) if total / count < 700 else math.inf


def rope_scaled(model: DecoderLM, scaling: str, scale: float) -> DecoderLM:
    """A copy of a RoPE model whose positions are rescaled at evaluation time (same weights)."""
    cfg = model.cfg.to_dict()
    cfg["pos_enc"] = {**cfg["pos_enc"], "scaling": scaling, "scale": float(scale)}
    scaled = DecoderLM(ModelConfig.from_dict(cfg))
    scaled.load_state_dict(model.state_dict())
    p = next(model.parameters())
    return scaled.to(device=p.device, dtype=p.dtype).eval()


def check_factors(cfg: ModelConfig, factors: list[int]) -> list[int]:
    if not factors or any(not isinstance(f, int) or isinstance(f, bool) or f < 1 for f in factors):
        raise ValueError(f"eval.factors={factors!r} must be a non-empty list of positive integers")
    factors = sorted(set(factors))
    limit, key = cfg.pos_enc.max_positions(), f"model.pos_enc.{cfg.pos_enc.limit_key}"
    if limit is not None and max(factors) * cfg.context_length > limit:
        raise ValueError(
            f"eval.factors reach {max(factors)} x context_length = {max(factors) * cfg.context_length} "
            f"positions, past what pos_enc '{cfg.pos_enc.name}' can encode ({key}={limit}); "
            f"raise {key} or lower eval.factors"
        )
    return factors


def extrapolation(
    model: DecoderLM,
    tokens: Tensor,
    factors: list[int],
    max_windows: int,
    batch_tokens: int,
    sliding: bool = False,
    rope_scaling: list[str] = (),
) -> dict[str, float]:
    """Perplexities keyed ppl_x{f} (plus ppl_sliding_x{f}, ppl_x{f}_rope_{method} if asked)."""
    L = model.cfg.context_length
    factors = check_factors(model.cfg, factors)
    for method in rope_scaling:
        if method not in ROPE_SCALINGS:
            raise ValueError(f"eval.rope_scaling entry '{method}' is not valid; valid: {', '.join(ROPE_SCALINGS)}")
    span = eval_span(tokens, L, factors, max_windows)
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    for f in factors:
        out[f"ppl_x{f}"] = perplexity(model, span, f * L, batch_tokens)
    if sliding:
        for f in factors:
            out[f"ppl_sliding_x{f}"] = perplexity(model, span, f * L, batch_tokens, stride=L)
    if isinstance(model.cfg.pos_enc, RopeConfig):
        for method in rope_scaling:
            for f in (f for f in factors if f > 1):
                out[f"ppl_x{f}_rope_{method}"] = perplexity(rope_scaled(model, method, f), span, f * L, batch_tokens)
    model.train(was_training)
    out["eval_tokens"] = float(span.numel() - 1)
    return out


def plot_extrapolation(
    ppl: dict[str, float], factors: list[int], context_length: int, path: Path, title: str = ""
) -> Path:
    """Perplexity against evaluation length (log2 x axis), one line per protocol variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factors = sorted(set(factors))
    variants = {"non-overlapping": "ppl_x{f}", "sliding (stride L)": "ppl_sliding_x{f}"}
    variants.update({f"RoPE {m} scaling": f"ppl_x{{f}}_rope_{m}" for m in ROPE_SCALINGS})
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, key in variants.items():
        points = [(f * context_length, ppl[key.format(f=f)]) for f in factors if key.format(f=f) in ppl]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=label, linestyle="-" if label == "non-overlapping" else "--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.axvline(context_length, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel(f"evaluation length (tokens; training context L = {context_length})")
    ax.set_ylabel("perplexity")
    ax.set_title(title or "context extrapolation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
