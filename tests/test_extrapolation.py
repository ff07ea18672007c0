"""Context extrapolation: the protocol (windows, shared span, chunking) and evaluate_run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import CONF_DIR
from pipeline.evaluate import evaluate_run
from pipeline.evaluate.extrapolation import (
    block_length,
    block_nll,
    block_starts,
    bootstrap_ppl,
    extrapolation,
    rope_scaled,
    window_plan,
)
from pipeline.model import DecoderLM, ModelConfig
from pipeline.model.components import POS_ENC

CTX = 16
CONF = CONF_DIR / "eval" / "default.yaml"


def model(pos_enc: str = "alibi", preset: str = "gpt2", **kw) -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(
        preset, d_model=32, n_layers=1, n_heads=2, context_length=CTX, pos_enc={"name": pos_enc}, **kw
    )
    return DecoderLM(cfg).eval()


def tokens(n: int = 3000) -> torch.Tensor:
    return torch.randint(256, (n,), generator=torch.Generator().manual_seed(1))


def read_positions(m: DecoderLM, run, *args, **kwargs) -> list[torch.Tensor]:
    """The token values of every window the model reads while `run(*args, **kwargs)` executes."""
    seen: list[torch.Tensor] = []
    handle = m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    try:
        run(*args, **kwargs)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("factors", [[1, 2, 4, 8], [1, 2, 3, 6]])
def test_every_factor_and_context_scores_the_same_targets(factors: list[int]) -> None:
    """With the tokens numbered 0..N-1 (token = position), the positions each run reads show
    which targets it scores: every position of a non-overlapping window is a target."""
    N, block = 3000, max(factors) * 2 * CTX  # blocks sized for the larger of two contexts
    toks = torch.arange(N)
    targets = {}
    for ctx in (CTX, 2 * CTX):
        torch.manual_seed(0)
        cfg = ModelConfig.from_preset(
            "gpt2", d_model=32, n_layers=1, n_heads=2, context_length=ctx, vocab_size=N, pos_enc={"name": "alibi"}
        )
        m = DecoderLM(cfg).eval()
        for f in factors:
            seen = read_positions(m, extrapolation, m, toks, [f], 5, 10**6, block_tokens=block, resamples=0)
            windows = [row for x in seen for row in x]
            assert max(len(w) for w in windows) == f * ctx
            read = torch.cat(windows)
            assert read.unique().numel() == read.numel()  # no position read twice
            targets[(ctx, f)] = set((read + 1).tolist())
    first = next(iter(targets.values()))
    assert len(first) == 5 * block
    assert all(t == first for t in targets.values())


def test_blocks_spread_over_the_whole_split_without_overlap() -> None:
    starts = block_starts(10_001, 100, max_blocks=7)
    assert starts[0] == 0 and starts[-1] + 100 == 10_000  # the first and the last target of the split
    gaps = starts.diff()
    assert (gaps >= 100).all() and gaps.max() - gaps.min() <= 1  # disjoint, evenly spaced
    assert block_starts(10_001, 100, None).numel() == 100  # None: every block that fits
    assert block_starts(10_001, 100, 1000).numel() == 100
    with pytest.raises(ValueError, match="fewer than one block"):
        block_starts(100, 128, 4)


@pytest.mark.parametrize(
    "block,length,stride", [(64, 16, None), (64, 24, None), (64, 64, None), (96, 32, 16), (100, 32, 24)]
)
def test_window_plan_scores_every_block_target_once(block: int, length: int, stride: int | None) -> None:
    scored = torch.zeros(block, dtype=torch.long)
    for start, w, score_from in window_plan(block, length, stride):
        assert w <= length and start + w <= block
        scored[start + score_from : start + w] += 1
    assert (scored == 1).all()


def test_block_length_defaults_to_the_longest_window_and_refuses_a_shorter_one() -> None:
    cfg = model().cfg
    assert block_length(cfg, [1, 8], None) == 8 * CTX
    assert block_length(cfg, [1, 8], 1000) == 1000
    with pytest.raises(ValueError, match="eval.block_tokens=100 is shorter"):
        block_length(cfg, [1, 8], 100)


@pytest.mark.parametrize("pos_enc", POS_ENC.names())
def test_chunking_gives_the_same_nll_as_one_batch(pos_enc: str) -> None:
    m = model(pos_enc)
    toks = tokens()
    blocks = toks[block_starts(toks.numel(), 4 * CTX, 6)[:, None] + torch.arange(4 * CTX + 1)]
    W = 4 * CTX
    one_batch = block_nll(m, blocks, W, batch_tokens=10**9)
    seen = read_positions(m, block_nll, m, blocks, W, batch_tokens=2 * W)
    assert [tuple(x.shape) for x in seen] == [(2, W)] * 3  # 6 windows, at most batch_tokens per pass
    assert torch.allclose(block_nll(m, blocks, W, batch_tokens=2 * W), one_batch, rtol=1e-6)


def test_sliding_windows_differ_from_non_overlapping_ones() -> None:
    m, toks = model("alibi"), tokens()
    blocks = toks[block_starts(toks.numel(), 4 * CTX, 3)[:, None] + torch.arange(4 * CTX + 1)]
    W = 4 * CTX
    # With the stride equal to the window, sliding is the non-overlapping protocol.
    assert torch.equal(block_nll(m, blocks, W, 10**6, stride=W), block_nll(m, blocks, W, 10**6))
    assert torch.equal(block_nll(m, blocks, CTX, 10**6, stride=CTX), block_nll(m, blocks, CTX, 10**6))
    # Sliding gives every later token at least W - L context; the result differs from windows.
    assert not torch.allclose(block_nll(m, blocks, 2 * CTX, 10**6, stride=CTX), block_nll(m, blocks, 2 * CTX, 10**6))


def test_bootstrap_intervals_cover_the_true_perplexity() -> None:
    """Blocks with known mean NLL: the 95% interval holds the true perplexity in about 95% of
    200 independent test sets (a binomial 95% range at p = 0.95 and n = 200 is 0.92 to 0.98)."""
    g = torch.Generator().manual_seed(0)
    block, n_blocks, true_nll = 50, 40, 2.0
    hits = 0
    for _ in range(200):
        # Per-block mean NLL varies between blocks (texts differ): gamma-distributed, mean 2.
        per_block = torch._standard_gamma(torch.full((n_blocks,), 4.0, dtype=torch.float64), generator=g) / 2
        lo, hi = bootstrap_ppl({"x": per_block * block}, block, resamples=1000)["x"]
        hits += lo <= math.exp(true_nll) <= hi
    assert 0.88 <= hits / 200 <= 0.99


def test_interval_brackets_the_estimate_and_narrows_with_more_blocks() -> None:
    m = model("alibi")
    few = extrapolation(m, tokens(6000), [1, 2], 4, 10**6)
    many = extrapolation(m, tokens(6000), [1, 2], None, 10**6)
    for out in (few, many):
        for f in (1, 2):
            assert out[f"ppl_x{f}_lo"] <= out[f"ppl_x{f}"] <= out[f"ppl_x{f}_hi"]
    assert many["eval_blocks"] == 5999 // (2 * CTX) and few["eval_blocks"] == 4
    assert many["ppl_x1_hi"] - many["ppl_x1_lo"] < few["ppl_x1_hi"] - few["ppl_x1_lo"]
    assert many["first_target"] == 1 and many["last_target"] >= 5999 - 2 * CTX  # the whole split


@pytest.mark.parametrize("pos_enc", POS_ENC.names())
def test_every_pos_enc_gets_a_finite_number_at_every_factor(pos_enc: str) -> None:
    out = extrapolation(model(pos_enc), tokens(), [1, 2, 4, 8], max_windows=2, batch_tokens=512)
    for f in (1, 2, 4, 8):
        assert math.isfinite(out[f"ppl_x{f}"]) and out[f"ppl_x{f}"] > 1
    assert out["eval_tokens"] == 2 * 8 * CTX


def test_learned_positions_past_the_table_are_refused_by_name() -> None:
    cfg = ModelConfig.from_preset(
        "gpt2", d_model=32, n_layers=1, n_heads=2, context_length=CTX, pos_enc={"name": "learned", "max_len": 4 * CTX}
    )
    with pytest.raises(ValueError, match="model.pos_enc.max_len=64"):
        extrapolation(DecoderLM(cfg), tokens(), [1, 8], max_windows=1, batch_tokens=512)


def test_rope_scaling_rescales_positions_and_keeps_weights() -> None:
    m = model("rope", preset="llama", attention={"name": "mha"})
    linear = rope_scaled(m, "linear", 2)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), linear.state_dict().values()))
    cos, sin = m.pos.rotary(CTX, 0, torch.device("cpu"))
    cos2, sin2 = linear.pos.rotary(2 * CTX, 0, torch.device("cpu"))
    # Position interpolation: position 2p of the scaled model rotates like position p.
    assert torch.allclose(cos2[::2], cos) and torch.allclose(sin2[::2], sin)
    ntk = rope_scaled(m, "ntk", 2)
    assert torch.all(ntk.pos.inv_freq[1:] < m.pos.inv_freq[1:])  # larger base, slower rotation
    out = extrapolation(m, tokens(), [1, 2, 4], 1, 512, rope_scaling=["linear", "ntk"])
    assert {"ppl_x2_rope_linear", "ppl_x4_rope_ntk"} <= set(out) and "ppl_x1_rope_linear" not in out
    # Non-rope models have no RoPE-scaled metrics.
    assert not any(
        "rope" in k for k in extrapolation(model("alibi"), tokens(), [1, 2], 1, 512, rope_scaling=["linear"])
    )


def eval_cfg(**kw) -> dict:
    cfg = yaml.safe_load(CONF.read_text())
    cfg.update(max_windows=1, decode={**cfg["decode"], "new_tokens": 4, "repeats": 1, "warmup": 0}, **kw)
    return cfg


@pytest.mark.parametrize("preset", ["gpt2", "mixtral"])
def test_evaluate_run_returns_the_schema_metrics_and_artifacts(preset: str, tmp_path: Path) -> None:
    m = model("learned" if preset == "gpt2" else "rope", preset=preset)
    metrics, artifacts = evaluate_run(m, tokens(), eval_cfg(sliding=True), torch.device("cpu"), tmp_path)
    required = (
        {f"extrap/ppl_x{f}" for f in (1, 2, 4, 8)}
        | {f"extrap/ppl_sliding_x{f}" for f in (1, 2, 4, 8)}
        | {f"extrap/ppl_x{f}_{end}" for f in (1, 2, 4, 8) for end in ("lo", "hi")}
        | {
            "cost/params_total",
            "cost/params_active",
            "cost/flops_per_token",
            "cost/kv_bytes_per_token",
            "cost/prefill_tokens_per_s",
            "cost/decode_tokens_per_s",
            "cost/decode_tokens_per_s_b8",
            "cost/peak_mem_bytes",
        }
    )
    assert required <= set(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert metrics["cost/params_total"] == sum(p.numel() for p in m.parameters())
    assert (metrics["cost/params_active"] < metrics["cost/params_total"]) == (preset == "mixtral")
    png, record = artifacts
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recorded = json.loads(record.read_text())
    assert recorded["metrics"] == metrics
    assert recorded["protocol"]["threads"] == torch.get_num_threads()
    assert recorded["protocol"]["eval_tokens"] == 8 * CTX  # one block (max_windows=1) of 8 x L


def test_evaluate_run_disabled_or_misconfigured(tmp_path: Path) -> None:
    m = model()
    assert evaluate_run(m, tokens(), {"enabled": False}, torch.device("cpu"), tmp_path) == ({}, [])
    with pytest.raises(ValueError, match="eval.window"):
        evaluate_run(m, tokens(), {"window": 3}, torch.device("cpu"), tmp_path)
    with pytest.raises(ValueError, match="eval.factors"):
        evaluate_run(m, tokens(), {"factors": [0, 2]}, torch.device("cpu"), tmp_path)


# -- real text (slow): the ALiBi paper's ordering ---------------------------------------------

STEPS = 1000  # d64 / 2 layers / ctx 64 / batch 16; at 300 steps no model has learned position use


def train_tiny(pos_enc: str, train: torch.Tensor, steps: int = STEPS, lr: float = 3e-3) -> DecoderLM:
    """GPT-2 block (pre-LN, MHA, GELU) at the CPU budget's size; AdamW, warm-up then cosine."""
    import math as m_

    torch.manual_seed(0)
    lm = DecoderLM(ModelConfig.from_preset("gpt2", pos_enc={"name": pos_enc}))
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    T = lm.cfg.context_length
    for step in range(steps):
        starts = torch.randint(len(train) - T - 1, (16,), generator=g)
        chunk = train[starts[:, None] + torch.arange(T + 1)]
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + m_.cos(m_.pi * step / steps))
        logits = lm(chunk[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lm.eval()


@pytest.fixture(scope="module")
def real_text_ppl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, float]]:
    import numpy as np

    from pipeline.data import DataConfig, load_token_splits

    splits = load_token_splits(DataConfig(), cache_dir=tmp_path_factory.mktemp("tokens"))
    train = torch.from_numpy(splits.train.astype(np.int64))
    test = torch.from_numpy(splits.test.astype(np.int64))  # held-out documents
    out = {}
    for pos_enc in ("learned", "sinusoidal", "rope", "alibi"):
        # Every block of the test split (449 of 512 at L = 64): the numbers docs/evaluation.md shows.
        out[pos_enc] = extrapolation(train_tiny(pos_enc, train), test, [1, 2, 4, 8], None, batch_tokens=8192)
        print(pos_enc, {k: round(v, 2) for k, v in out[pos_enc].items()})
    return out


def ratio(ppl: dict[str, float]) -> float:
    return ppl["ppl_x4"] / ppl["ppl_x1"]


@pytest.mark.slow
def test_alibi_extrapolates_on_real_text(real_text_ppl: dict[str, dict[str, float]]) -> None:
    alibi = real_text_ppl["alibi"]
    assert alibi["ppl_x1"] < 10  # it learned something (unigram byte perplexity is ~24)
    assert 0.9 < ratio(alibi) < 1.1 and alibi["ppl_x8"] / alibi["ppl_x1"] < 1.1


@pytest.mark.slow
@pytest.mark.parametrize(
    "pos_enc",
    [
        "learned",
        "rope",
        "sinusoidal",
    ],
)
def test_other_positions_do_not_extrapolate_on_real_text(
    real_text_ppl: dict[str, dict[str, float]], pos_enc: str
) -> None:
    ppl = real_text_ppl[pos_enc]
    assert ppl["ppl_x1"] < 10
    assert ratio(ppl) > 2 * ratio(real_text_ppl["alibi"])
    assert ppl["ppl_x1"] < ppl["ppl_x2"] < ppl["ppl_x4"]
