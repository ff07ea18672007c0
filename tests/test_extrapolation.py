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
from pipeline.evaluate.extrapolation import eval_span, extrapolation, perplexity, rope_scaled, window_nll, windows
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


@pytest.mark.parametrize("factors", [[1, 2, 4, 8], [1, 2, 3, 6]])
def test_every_factor_scores_the_same_tokens_in_non_overlapping_windows(factors: list[int]) -> None:
    toks = tokens()
    span = eval_span(toks, CTX, factors, max_windows=3)
    assert span.numel() == 3 * max(factors) * CTX + 1
    assert torch.equal(span, toks[: span.numel()])  # the first tokens of the held-out text
    for f in factors:
        inputs, targets = windows(span, f * CTX)
        assert inputs.shape == (3 * max(factors) // f, f * CTX)
        # Every input token read once, every target scored once, one shift apart: no overlap.
        assert torch.equal(inputs.flatten(), span[:-1])
        assert torch.equal(targets.flatten(), span[1:])


def test_span_is_capped_by_max_windows_and_by_the_text() -> None:
    assert eval_span(tokens(3000), CTX, [1, 8], max_windows=100).numel() == (2999 // 128) * 128 + 1
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_span(tokens(100), CTX, [1, 8], max_windows=4)


@pytest.mark.parametrize("pos_enc", POS_ENC.names())
def test_chunking_gives_the_same_perplexity_as_one_batch(pos_enc: str) -> None:
    m, span = model(pos_enc), eval_span(tokens(), CTX, [4], max_windows=6)
    W = 4 * CTX
    one_batch = perplexity(m, span, W, batch_tokens=10**9)
    shapes: list[tuple[int, ...]] = []
    handle = m.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
    chunked = perplexity(m, span, W, batch_tokens=2 * W)
    handle.remove()
    assert chunked == pytest.approx(one_batch, rel=1e-5)
    assert shapes == [(2, W)] * 3  # 6 windows, at most batch_tokens per forward pass


def test_sliding_windows_score_each_target_once() -> None:
    m, span = model("alibi"), eval_span(tokens(), CTX, [4], max_windows=3)
    W = 4 * CTX
    inputs, targets = windows(span, W, stride=CTX)
    score_from = torch.full((inputs.shape[0],), W - CTX)
    score_from[0] = 0
    _, count = window_nll(m, inputs, targets, 10**6, score_from)
    assert count == span.numel() - 1
    # With the stride equal to the window, sliding is the non-overlapping protocol.
    assert perplexity(m, span, W, 10**6, stride=W) == perplexity(m, span, W, 10**6)
    # Sliding gives every later token at least W - L context; the result differs from windows.
    assert perplexity(m, span, W, 10**6, stride=CTX) != perplexity(m, span, W, 10**6)


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
    assert json.loads(record.read_text())["metrics"] == metrics


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
        out[pos_enc] = extrapolation(train_tiny(pos_enc, train), test, [1, 2, 4, 8], max_windows=8, batch_tokens=8192)
        print(pos_enc, {k: round(v, 2) for k, v in out[pos_enc].items()})
    return out


def ratio(ppl: dict[str, float]) -> float:
    return ppl["ppl_x4"] / ppl["ppl_x1"]


@pytest.mark.slow
def test_alibi_extrapolates_on_real_text(real_text_ppl: dict[str, dict[str, float]]) -> None:
    alibi = real_text_ppl["alibi"]
    assert alibi["ppl_x1"] < 8  # it learned something (unigram byte perplexity is ~24)
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
    assert ppl["ppl_x1"] < 8
    assert ratio(ppl) > 2 * ratio(real_text_ppl["alibi"])
    assert ppl["ppl_x1"] < ppl["ppl_x2"] < ppl["ppl_x4"]
