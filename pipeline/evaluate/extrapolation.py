"""Context extrapolation: perplexity at multiples of the training context (Press et al. 2022).

Protocol (the ALiBi paper's, sec. 4): a model trained at context L is scored on held-out text
cut into non-overlapping windows of length W = f * L for each factor f; every position of a
window is scored, so a window's first token is predicted from nothing and its last from W - 1
tokens.

The same targets for every factor and every training context (issue 10, item 4). The scored
text is a set of *blocks*: up to `max_windows` blocks of B = `block_tokens` targets each
(default B = max(factors) * L), placed evenly from the start to the end of the test split.
The block positions depend on the split's length, B and the block count only, never on the
run's own L or f, so a study that fixes B (e.g. max(factors) * its largest context; see
pipeline/conf/ablation/extrapolation.yaml) scores the same tokens in every run. At window
length W a block is read as windows [0, W), [W, 2W), ... and a last, shorter window for the
B mod W remaining targets, so each block target is scored exactly once at every W <= B.

Intervals: ppl_x{f}_lo / ppl_x{f}_hi are a 95% percentile bootstrap over blocks (Efron &
Tibshirani 1993): blocks resampled with replacement, the same resamples for every factor.
Blocks, not documents: the embedded corpus's test split holds only a few documents, too few
to resample. Neighbouring blocks of one document are correlated, so the interval describes
this test text and is narrower than one over documents drawn afresh would be.

Sliding variant (optional, `sliding: true`): windows of length W advance by L and score only
their last L tokens (the first window of a block scores all of its tokens), so every target
after the first window sees at least W - L tokens of context. Same targets, f times the compute.

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
CONFIDENCE = 0.95


def block_length(cfg: ModelConfig, factors: list[int], block_tokens: int | None) -> int:
    """Targets per block: `block_tokens`, or max(factors) x context_length when it is None."""
    longest = max(factors) * cfg.context_length
    if block_tokens is None:
        return longest
    if block_tokens < longest:
        raise ValueError(
            f"eval.block_tokens={block_tokens} is shorter than the longest window, max(eval.factors) x "
            f"model.context_length = {longest}; set eval.block_tokens >= {longest} (a study that varies the "
            f"context sets it to max(factors) x its largest context)"
        )
    return block_tokens


def block_starts(n_tokens: int, block: int, max_blocks: int | None) -> Tensor:
    """Offsets of the scored blocks: up to `max_blocks` (None: as many as fit) non-overlapping
    blocks of block + 1 tokens, from the first to the last token of the split, evenly spaced.

    Block i reads tokens[s_i : s_i + block] and predicts tokens[s_i + 1 : s_i + block + 1].
    """
    available = (n_tokens - 1) // block
    if available < 1:
        raise ValueError(
            f"held-out text has {n_tokens} tokens, fewer than one block of {block + 1} "
            f"(eval.block_tokens or max(eval.factors) x context_length, + 1); lower eval.factors or "
            f"provide more held-out text"
        )
    n = available if max_blocks is None else min(max_blocks, available)
    # Spacing (n_tokens - 1 - block) / (n - 1) >= block because n * block <= n_tokens - 1, and
    # rounding two values at least `block` apart keeps them at least `block` apart.
    return torch.linspace(0, n_tokens - 1 - block, n, dtype=torch.float64).round().long()


def window_plan(block: int, length: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """How a block of `block` targets is read at window `length`: (start, length, score_from)
    per window, covering every target of the block exactly once.

    Non-overlapping (stride None): windows [0, W), [W, 2W), ... and a shorter last one for the
    rest. Sliding (stride s < W): the first window scores all of [0, W); each next one ends s
    later and scores its last s targets; a last window ending at the block scores the rest.
    """
    if length > block:
        raise ValueError(f"window {length} is longer than the block {block}")
    if stride is None or stride >= length:
        return [(s, min(length, block - s), 0) for s in range(0, block, length)]
    plan = [(0, length, 0)]
    end = length
    while end < block:
        step = min(stride, block - end)
        end += step
        plan.append((end - length, length, length - step))
    return plan


@torch.no_grad()
def window_nll(
    model: DecoderLM, inputs: Tensor, targets: Tensor, batch_tokens: int, score_from: Tensor | None = None
) -> Tensor:
    """Summed NLL of each window, (n_windows,) float64, batched to ~batch_tokens per forward.

    score_from: (n_windows,) first scored position of each window (default 0: all positions).
    Chunking bounds activation memory at long windows; it does not change the result.
    """
    device = next(model.parameters()).device
    n, W = inputs.shape
    per_batch = max(1, batch_tokens // W)
    pos = torch.arange(W, device=device)
    sums = []
    for start in range(0, n, per_batch):
        x = inputs[start : start + per_batch].to(device)
        y = targets[start : start + per_batch].to(device)
        logits = model(x)  # (b, W, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        if score_from is not None:
            nll = nll * (pos[None, :] >= score_from[start : start + per_batch, None].to(device))
        sums.append(nll.double().sum(dim=1).cpu())
    return torch.cat(sums)


def block_nll(model: DecoderLM, blocks: Tensor, length: int, batch_tokens: int, stride: int | None = None) -> Tensor:
    """Summed NLL of every block, (n_blocks,) float64: each block's targets scored once, in
    windows of `length` (see window_plan). blocks: (n_blocks, block + 1) tokens."""
    n, block = blocks.shape[0], blocks.shape[1] - 1
    total = torch.zeros(n, dtype=torch.float64)
    plan = window_plan(block, length, stride)
    for W in sorted({w for _, w, _ in plan}):  # windows of one length batch together
        group = [(s, f) for s, w, f in plan if w == W]
        idx = torch.tensor([s for s, _ in group])[:, None] + torch.arange(W)  # (m, W)
        inputs, targets = blocks[:, idx], blocks[:, idx + 1]  # (n, m, W)
        score_from = torch.tensor([f for _, f in group]).repeat(n)
        sums = window_nll(model, inputs.flatten(0, 1), targets.flatten(0, 1), batch_tokens, score_from)
        total += sums.view(n, len(group)).sum(dim=1)
    return total


def ppl_of(mean_nll: float) -> float:
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


def bootstrap_ppl(nll: dict[str, Tensor], block: int, resamples: int, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% percentile-bootstrap interval of exp(mean NLL) for each entry of `nll` ((n_blocks,)
    summed NLL per block); every entry uses the same resampled blocks."""
    n = next(iter(nll.values())).numel()
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(n, (resamples, n), generator=g)  # (R, n) block indices
    q = torch.tensor([(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2], dtype=torch.float64)
    out = {}
    for key, sums in nll.items():
        means = sums[picks].mean(dim=1) / block  # (R,) mean NLL per target
        lo, hi = torch.quantile(means, q).tolist()
        out[key] = (ppl_of(lo), ppl_of(hi))
    return out


def rope_scaled(model: DecoderLM, scaling: str, scale: float) -> DecoderLM:
    """A copy of a RoPE model whose positions are rescaled at evaluation time (same weights)."""
    cfg = model.cfg.to_dict()
    cfg["pos_enc"] = {**cfg["pos_enc"], "scaling": scaling, "scale": float(scale)}
    scaled = DecoderLM(ModelConfig.from_dict(cfg))
    scaled.load_state_dict(model.state_dict())
    p = next(model.parameters())
    return scaled.to(device=p.device, dtype=p.dtype).eval()


def check_factors(cfg: ModelConfig, factors: list[int], block_tokens: int | None = None) -> list[int]:
    """The sorted factors, after checking them (and eval.block_tokens) against the model."""
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
    block_length(cfg, factors, block_tokens)
    return factors


def extrapolation(
    model: DecoderLM,
    tokens: Tensor,
    factors: list[int],
    max_windows: int | None,
    batch_tokens: int,
    sliding: bool = False,
    rope_scaling: list[str] = (),
    block_tokens: int | None = None,
    resamples: int = 1000,
) -> dict[str, float]:
    """Perplexities keyed ppl_x{f} with their 95% interval ppl_x{f}_lo / _hi (plus
    ppl_sliding_x{f}, ppl_x{f}_rope_{method} if asked), and the protocol's numbers:
    eval_tokens (targets per factor), eval_blocks, block_tokens, first_target and last_target
    (offsets into `tokens`)."""
    L = model.cfg.context_length
    factors = check_factors(model.cfg, factors, block_tokens)
    for method in rope_scaling:
        if method not in ROPE_SCALINGS:
            raise ValueError(f"eval.rope_scaling entry '{method}' is not valid; valid: {', '.join(ROPE_SCALINGS)}")
    block = block_length(model.cfg, factors, block_tokens)
    starts = block_starts(tokens.numel(), block, max_windows)
    blocks = tokens[starts[:, None] + torch.arange(block + 1)]  # (n, block + 1)
    was_training = model.training
    model.eval()
    nll: dict[str, Tensor] = {}
    for f in factors:
        nll[f"ppl_x{f}"] = block_nll(model, blocks, f * L, batch_tokens)
    if sliding:
        for f in factors:
            nll[f"ppl_sliding_x{f}"] = block_nll(model, blocks, f * L, batch_tokens, stride=L)
    if isinstance(model.cfg.pos_enc, RopeConfig):
        for method in rope_scaling:
            for f in (f for f in factors if f > 1):
                scaled = rope_scaled(model, method, f)
                nll[f"ppl_x{f}_rope_{method}"] = block_nll(scaled, blocks, f * L, batch_tokens)
    model.train(was_training)
    n_targets = blocks.shape[0] * block
    out = {key: ppl_of(sums.sum().item() / n_targets) for key, sums in nll.items()}
    if resamples > 0:
        main = {f"ppl_x{f}": nll[f"ppl_x{f}"] for f in factors}
        for key, (lo, hi) in bootstrap_ppl(main, block, resamples).items():
            out[f"{key}_lo"], out[f"{key}_hi"] = lo, hi
    out.update(
        eval_tokens=float(n_targets),
        eval_blocks=float(blocks.shape[0]),
        block_tokens=float(block),
        first_target=float(starts[0] + 1),
        last_target=float(starts[-1] + block),
    )
    return out


def plot_extrapolation(
    ppl: dict[str, float], factors: list[int], context_length: int, path: Path, title: str = ""
) -> Path:
    """Perplexity against evaluation length (log2 x axis), one line per protocol variant; the
    non-overlapping protocol with its 95% interval as a band when it was computed."""
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
    band = [(f * context_length, ppl[f"ppl_x{f}_lo"], ppl[f"ppl_x{f}_hi"]) for f in factors if f"ppl_x{f}_lo" in ppl]
    if band:
        xs, lo, hi = zip(*band)
        ax.fill_between(xs, lo, hi, alpha=0.2, label="95% interval (bootstrap over blocks)")
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
