"""Inference cost: analytic counts against the built model, the flop counter and the KV cache."""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from pipeline.cost import main as cost_main
from pipeline.evaluate.cost import (
    TensorBytes,
    analytic_cost,
    measure_inference,
    peak_inference_bytes,
    time_generation,
)
from pipeline.model import DecoderLM, ModelConfig
from pipeline.model.components import ATTENTION, FFN, POS_ENC
from pipeline.model.presets import PRESETS

SMALL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "context_length": 32}


def attention(name: str, backend: str = "sdpa") -> dict:
    return {"name": name, "backend": backend, **({"n_kv_heads": 2} if name == "gqa" else {})}


def small(preset: str, **overrides) -> ModelConfig:
    return ModelConfig.from_preset(preset, **{**SMALL, **overrides})


def numel(cfg: ModelConfig) -> int:
    return sum(p.numel() for p in DecoderLM(cfg).parameters())


# On CPU, causal sdpa dispatches to a kernel FlopCounterMode has no formula for; give it the
# same formula torch uses for the CUDA kernels (full T x S score matrix).
def _cpu_sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def counted_flops_per_token(cfg: ModelConfig, T: int, batch: int = 2) -> float:
    model = DecoderLM(cfg).eval()
    tokens = torch.randint(cfg.vocab_size, (batch, T))
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter, torch.no_grad():
        model(tokens)
    return counter.get_total_flops() / (batch * T)


GRID = list(itertools.product(PRESETS, ATTENTION.names(), FFN.names()))


@pytest.mark.parametrize("preset,attn,ffn", GRID)
def test_params_total_is_the_built_models_numel(preset: str, attn: str, ffn: str) -> None:
    cfg = small(preset, attention=attention(attn), ffn={"name": ffn})
    assert analytic_cost(cfg)["params_total"] == numel(cfg)


@pytest.mark.parametrize("pos_enc", POS_ENC.names())
@pytest.mark.parametrize("tie", [True, False])
def test_params_total_counts_position_table_and_tied_head_as_built(pos_enc: str, tie: bool) -> None:
    cfg = small("gpt2", pos_enc={"name": pos_enc}, tie_embeddings=tie)
    assert analytic_cost(cfg)["params_total"] == numel(cfg)


@pytest.mark.parametrize("preset,attn,ffn", GRID)
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_flops_match_flop_counter(preset: str, attn: str, ffn: str, backend: str) -> None:
    cfg = small(preset, attention=attention(attn, backend), ffn={"name": ffn})
    analytic = analytic_cost(cfg)["flops_per_token"]
    assert counted_flops_per_token(cfg, cfg.context_length) == pytest.approx(analytic, rel=0.05)


@pytest.mark.parametrize("pos_enc", POS_ENC.names())
def test_flops_match_flop_counter_at_another_context(pos_enc: str) -> None:
    cfg = small("llama", pos_enc={"name": pos_enc})
    T = 3 * cfg.context_length  # the attention term grows with T; the rest does not
    analytic = analytic_cost(cfg, context_length=T)
    assert counted_flops_per_token(cfg, T, batch=1) == pytest.approx(analytic["flops_per_token"], rel=0.05)
    assert analytic["attn_flops_per_token"] == pytest.approx(3 * analytic_cost(cfg)["attn_flops_per_token"])


def test_gqa_with_a_quarter_of_the_heads_has_a_quarter_of_the_kv_bytes() -> None:
    mha = small("llama", n_heads=8, attention={"name": "mha"})
    gqa = small("llama", n_heads=8, attention={"name": "gqa", "n_kv_heads": 2})
    assert analytic_cost(gqa)["kv_bytes_per_token"] * 4 == analytic_cost(mha)["kv_bytes_per_token"]
    assert (
        analytic_cost(gqa, batch=3, context_length=100)["kv_bytes"] * 4
        == analytic_cost(mha, batch=3, context_length=100)["kv_bytes"]
    )


@pytest.mark.parametrize("attn", ATTENTION.names())
@pytest.mark.parametrize("dtype,nbytes", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_kv_bytes_per_token_equals_the_cache_tensors(attn: str, dtype: torch.dtype, nbytes: int) -> None:
    cfg = small("llama", n_heads=8, attention=attention(attn))
    batch, max_len = 3, 40
    cache = DecoderLM(cfg).new_cache(batch, max_len, dtype=dtype)
    cost = analytic_cost(cfg, context_length=max_len, batch=batch, bytes_per_element=nbytes)
    assert cost["kv_bytes_per_token"] == cache.nbytes() / (batch * max_len)
    assert cost["kv_bytes"] == cache.nbytes()


def test_moe_counts_only_top_k_experts_as_active() -> None:
    moe = small("mixtral", ffn={"name": "moe", "n_experts": 8, "top_k": 2})
    cost = analytic_cost(moe)
    assert cost["params_active"] < cost["params_total"] == numel(moe)
    # Each routed expert is one SwiGLU MLP per layer: top_k 2 -> 3 adds exactly one of them.
    dense = small("mixtral", ffn={"name": "swiglu"})
    attn_only = small("mixtral", ffn={"name": "swiglu", "hidden": 1})
    one_mlp_per_layer = numel(dense) - numel(attn_only) + moe.n_layers * 3 * moe.d_model * 1
    k3 = analytic_cost(small("mixtral", ffn={"name": "moe", "n_experts": 8, "top_k": 3}))
    assert k3["params_active"] - cost["params_active"] == one_mlp_per_layer


def test_single_expert_moe_is_the_dense_swiglu_plus_its_router() -> None:
    moe = small("mixtral", ffn={"name": "moe", "n_experts": 1, "top_k": 1})
    dense = small("mixtral", ffn={"name": "swiglu"})
    router = moe.n_layers * moe.d_model  # d -> 1 router logits per layer
    cost, dense_cost = analytic_cost(moe), analytic_cost(dense)
    assert cost["params_active"] == cost["params_total"] == numel(moe)
    assert cost["params_active"] == numel(dense) + router
    assert cost["flops_per_token"] == dense_cost["flops_per_token"] + 2 * router


def test_published_parameter_counts() -> None:
    """LLaMA-7B (6.74B) and Mixtral 8x7B (46.7B total, 12.9B active) from their shapes."""
    shape = {"d_model": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": 32000, "context_length": 2048}
    llama = ModelConfig.from_preset(
        "llama", **shape, attention={"name": "mha"}, ffn={"name": "swiglu", "multiple_of": 256}
    )
    assert analytic_cost(llama)["params_total"] == 6_738_415_616
    mixtral = ModelConfig.from_preset(
        "mixtral", **shape, attention={"name": "gqa", "n_kv_heads": 8}, ffn={"name": "moe", "hidden": 14336}
    )
    cost = analytic_cost(mixtral)
    assert round(cost["params_total"] / 1e9, 1) == 46.7
    assert round(cost["params_active"] / 1e9, 1) == 12.9


@pytest.fixture
def one_thread():
    """Timing on one intra-op thread: on a busy shared machine, spinning OpenMP threads make
    small ops' timings noise rather than measurements."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cached_decode_is_faster_than_recomputing_the_prefix(one_thread: None) -> None:
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_preset("llama", d_model=128, n_layers=2, n_heads=4)).eval()
    prompt = torch.randint(256, (1, 16))
    new = 256
    cached = time_generation(model, prompt, new, use_cache=True)[1]
    uncached = time_generation(model, prompt, new, use_cache=False)[1]
    assert cached < uncached, f"cached {cached:.3f}s vs uncached {uncached:.3f}s for {new} tokens"


def test_cached_and_uncached_decode_generate_the_same_tokens() -> None:
    torch.manual_seed(0)
    model = DecoderLM(small("gpt2")).eval()
    prompt = torch.randint(256, (2, 8))
    cached = model.generate(prompt, 20, temperature=0.0)
    seq = prompt
    for _ in range(20):
        seq = torch.cat((seq, model(seq)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(cached, seq)


def test_measure_inference_batches_amortize_decode_steps() -> None:
    model = DecoderLM(small("gpt2"))
    threads = torch.get_num_threads()
    out = measure_inference(
        model, torch.device("cpu"), [1, 8], prompt_tokens=16, new_tokens=8, repeats=3, warmup=1, threads=1
    )
    assert set(out) == {
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "prefill_tokens_per_s_b8",
        "decode_tokens_per_s_b8",
        "peak_mem_bytes",
        "peak_mem_method",
        "threads",
    }
    # Timing on one intra-op thread (pinned, recorded, then restored): on a busy shared machine,
    # spinning OpenMP threads make small ops' timings noise rather than measurements.
    assert out["threads"] == 1 and torch.get_num_threads() == threads
    # A tiny model's decode step costs about the same for 1 or 8 sequences.
    assert out["decode_tokens_per_s_b8"] > out["decode_tokens_per_s"]
    assert out["peak_mem_bytes"] > 0
    assert model.training  # mode restored


def test_cache_allocation_is_outside_prefill_time(monkeypatch: pytest.MonkeyPatch) -> None:
    model = DecoderLM(small("gpt2")).eval()
    allocate = model.new_cache

    def slow_new_cache(*args, **kwargs):
        time.sleep(0.5)
        return allocate(*args, **kwargs)

    monkeypatch.setattr(model, "new_cache", slow_new_cache)
    prefill, _ = time_generation(model, torch.randint(256, (1, 16)), 2)
    assert prefill < 0.5


def test_tensor_bytes_counts_live_storages_once() -> None:
    weight = torch.empty(100, dtype=torch.uint8)
    with TensorBytes(existing=[weight, weight[:10]]) as mem:
        assert mem.current == 100
        row = weight[50:]  # a view of an existing tensor (an expert's slice of w_in) adds nothing
        a = torch.empty(1000, dtype=torch.uint8)
        b = torch.empty(2000, dtype=torch.uint8)
        view = b[10:]  # shares b's storage: not counted again
        del a
        c = torch.empty(500, dtype=torch.uint8)
        assert (mem.current, mem.peak) == (100 + 2000 + 500, 100 + 1000 + 2000)
        del b, view, c, row
        assert mem.current == 100


def test_peak_mem_is_inference_only_and_per_run() -> None:
    """The peak covers weights, KV cache and activations of the run itself: neither tensors
    alive before it (training state, other runs) nor an earlier, larger run count."""
    torch.manual_seed(0)
    model = DecoderLM(small("mixtral")).eval()  # MoE: experts are views of stacked weights
    prompt = torch.randint(256, (4, 32))
    new = 8
    peak, method = peak_inference_bytes(model, prompt, new)
    weights = sum(p.numel() * 4 for p in model.parameters())
    cache = model.new_cache(4, 32 + new).nbytes()
    logits = 4 * 32 * 256 * 4  # the prefill's (B, T, V) fp32 logits
    assert method == "live tensor bytes (TorchDispatchMode)"
    assert weights + cache + logits < peak < 1.5 * (weights + cache + logits)
    held = torch.ones(10_000_000)  # 40 MB alive, as an optimizer's state would be
    larger = DecoderLM(small("mixtral", d_model=128)).eval()
    assert peak_inference_bytes(larger, prompt, new)[0] > peak
    assert peak_inference_bytes(model, prompt, new)[0] == peak
    del held


def test_measure_inference_rejects_a_prompt_past_the_learned_table() -> None:
    model = DecoderLM(small("gpt2"))  # 8 x 32 = 256 table rows
    with pytest.raises(ValueError, match="max_len=256"):
        measure_inference(model, torch.device("cpu"), prompt_tokens=250, new_tokens=10)
    # A table of exactly the training context (eval.factors=[1]): the default prompt shrinks.
    exact = DecoderLM(small("gpt2", pos_enc={"name": "learned", "max_len": 32}))
    calls: list[int] = []
    exact.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[1]))
    measure_inference(exact, torch.device("cpu"), batch_sizes=[1], new_tokens=8, repeats=1, warmup=0)
    assert calls[0] + 8 == 32 and calls[1:9] == [1] * 8  # prompt + 8 new tokens fill the 32 rows


def test_cost_cli_prints_the_table_for_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "model=llama",
        "model.n_layers=4",
        "model.d_model=256",
        "model.n_heads=8",
        "model.attention.n_kv_heads=2",
        "cost.context=4096",
        "cost.batch=3",
        "cost.bytes=4",
    ]
    assert cost_main(argv) == 0
    out = capsys.readouterr().out
    cfg = ModelConfig.from_preset(
        "llama", n_layers=4, d_model=256, n_heads=8, attention={"name": "gqa", "n_kv_heads": 2}
    )
    expected = analytic_cost(cfg, context_length=4096, batch=3, bytes_per_element=4)
    assert f"{expected['params_total']:.0f}" in out
    assert f"{expected['kv_bytes']:.0f}" in out  # 2*4*2*32*4 B * 4096 * 3
    assert "KV cache @ context 4096 x batch 3" in out


def test_cost_cli_keeps_the_presets_size_and_rejects_bad_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    assert cost_main(["model=gpt3"]) == 0
    assert "d_model 768, 12 layers" in capsys.readouterr().out  # no CPU budget shrinking it
    assert cost_main(["model.n_heads=5"]) == 2
    assert "model.n_heads=5" in capsys.readouterr().err


@pytest.mark.parametrize("bias,smallest", [(False, 13), (True, 48)])
def test_swiglu_default_width_matches_the_gelu_mlp_within_one_percent(bias: bool, smallest: int) -> None:
    """SwiGLU's default width 8d/3 gives its three matrices the 4d GELU MLP's parameters: within
    1% at every d_model from 13 up (rounding costs at most 1 / (8d)). Biases add h more to
    SwiGLU (2h + d against h + d), 1 / (3d) more: within 1% from d_model 48 up."""
    from pipeline.model.components.base import Dims
    from pipeline.model.components.ffn import GeluConfig, SwiGLUConfig

    for d in range(smallest, 4097):
        dims = Dims(d_model=d, n_layers=1, n_heads=1, context_length=8, bias=bias, dropout=0.0)
        gelu, swiglu = GeluConfig().cost(dims, 8).params, SwiGLUConfig().cost(dims, 8).params
        assert abs(swiglu / gelu - 1) < 0.01, (d, swiglu, gelu)
