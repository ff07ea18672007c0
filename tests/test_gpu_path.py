"""The GPU path, tested on the CPU (issue 15): fp32 position tables under bf16, the ALiBi mask
built once in the compute dtype, sync-free MoE routing against the loop, no host reads in
training steps between logging steps, torch.compile with fullgraph, and the run levers."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.gpu_check import count_host_reads
from pipeline.model import DecoderLM, ModelConfig
from pipeline.model.components.ffn import MoE
from pipeline.run.callbacks import Throughput, peak_flops
from tests.helpers.cli import REPO

SMALL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "context_length": 32, "vocab_size": 256}


def test_rope_table_stays_fp32_in_a_bf16_model_at_8x_context() -> None:
    """Cast to bf16, the model still builds cos/sin in fp32: at 8x a 256 context they match a
    float64 reference to fp32 precision, where a bf16 table is off by more than 0.1."""
    model = DecoderLM(ModelConfig.from_preset("llama", d_model=128, n_heads=2, context_length=256)).to(torch.bfloat16)
    assert model.pos.inv_freq.dtype == torch.float32
    assert model.tok_emb.weight.dtype == torch.bfloat16
    T = 8 * 256
    cos, sin = model.pos.rotary(T, 0, torch.device("cpu"))
    hd = 64
    inv = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv
    ref = torch.cat((angle, angle), -1).cos()
    assert (cos.double() - ref).abs().max() < 1e-3
    bf16_angle = torch.arange(T).to(torch.bfloat16)[:, None] * inv.to(torch.bfloat16)
    assert (torch.cat((bf16_angle, bf16_angle), -1).cos().double() - ref).abs().max() > 0.1  # what fp32 avoids


@pytest.mark.parametrize("pos", ["sinusoidal", "alibi"])
def test_other_position_buffers_stay_fp32(pos: str) -> None:
    model = DecoderLM(ModelConfig.from_preset("llama", **SMALL, pos_enc={"name": pos})).to(torch.bfloat16)
    assert all(b.dtype == torch.float32 for b in model.pos.buffers())
    x = torch.randint(0, 256, (2, 16))
    assert model(x).dtype == torch.bfloat16  # and the model still runs end to end in bf16


def test_alibi_mask_built_once_in_the_compute_dtype_and_4d() -> None:
    model = DecoderLM(ModelConfig.from_preset("llama", **SMALL, pos_enc={"name": "alibi"}))
    mask = model._mask(16, 16, 0, torch.device("cpu"))
    assert mask.shape == (1, 4, 16, 16) and mask.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model._mask(16, 16, 0, torch.device("cpu")).dtype == torch.bfloat16
    assert model.to(torch.bfloat16)._mask(16, 16, 0, torch.device("cpu")).dtype == torch.bfloat16


def _moe_model(capacity: float | None = None) -> DecoderLM:
    torch.manual_seed(0)
    ffn = {"name": "moe", "n_experts": 4, "top_k": 2, "capacity_factor": capacity}
    return DecoderLM(ModelConfig.from_preset("mixtral", **SMALL, ffn=ffn))


@pytest.mark.parametrize("capacity", [None, 0.5])
def test_moe_grouped_matmul_matches_the_loop(capacity: float | None) -> None:
    """bf16 grouped matmul against the per-expert loop (the reference): outputs, dropped
    counts and the gradients of every expert weight."""
    model = _moe_model(capacity)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    x = torch.randint(0, 256, (4, 32))
    results = []
    for dispatch in ("auto", "loop"):
        for m in moes:
            m.dispatch = dispatch
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert moes[0]._grouped(torch.zeros(1, 64)) == (dispatch == "auto")
            logits, aux = model(x, return_aux=True)
        F.cross_entropy(logits.flatten(0, 1).float(), x.flatten()).backward()
        results.append((logits.float(), aux["moe_dropped"], moes[0].w_in.grad.clone(), moes[0].w_out.grad.clone()))
    (out_g, drop_g, win_g, wout_g), (out_l, drop_l, win_l, wout_l) = results
    assert drop_g.item() == drop_l.item() and (capacity is None) == (drop_l.item() == 0)
    torch.testing.assert_close(out_g, out_l, atol=2e-2, rtol=2e-2)
    for a, b in ((win_g, win_l), (wout_g, wout_l)):
        assert (a - b).norm() / b.norm() < 2e-2


def test_moe_grouped_routing_reads_nothing_back_to_the_host() -> None:
    model = _moe_model(capacity=1.0)
    x = torch.randint(0, 256, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16), count_host_reads(torch.device("cpu")) as reads:
        model(x)
    assert reads == []
    for m in model.modules():
        if isinstance(m, MoE):
            m.dispatch = "loop"
    with count_host_reads(torch.device("cpu")) as reads:
        model(x)
    assert "tolist" in reads  # the counter sees the loop's read: the check above can fail


@pytest.mark.parametrize("preset,pos,bf16", [("gpt2", "alibi", False), ("mixtral", "rope", True)])
def test_forward_compiles_with_fullgraph(preset: str, pos: str, bf16: bool) -> None:
    """fullgraph=True fails on any graph break, which a host read (.item(), .tolist(), data-
    dependent shapes) causes: the training forward pass is free of them (MoE: in bf16, where
    the grouped matmul applies)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_preset(preset, **SMALL, pos_enc={"name": pos}))
    x = torch.randint(0, 256, (2, 32))
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ref = model(x, return_aux=True)[0]
        out = compiled(x, return_aux=True)[0]
    tol = 3e-2 if bf16 else 1e-4
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_peak_flops_stated_wins_and_cpu_has_none() -> None:
    cpu = torch.device("cpu")
    assert peak_flops(cpu, "bf16-mixed") is None
    assert peak_flops(cpu, "32-true", stated=1e12) == 1e12
    t = Throughput()
    t.tokens, t.seconds = 1000, 2.0
    assert t.mfu(1e6, 1e10) == pytest.approx(500 * 3e6 / 1e10)
    assert t.mfu(1e6, None) is None


def test_gpu_check_target_fails_without_cuda() -> None:
    """`make gpu-check` on a machine without CUDA exits non-zero with one clear line (here:
    the test venv's CPU torch stands in for the GPU machine's python3)."""
    proc = subprocess.run(
        ["make", "-s", "gpu-check", f"GPU_PY={Path(__import__('sys').executable)}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "gpu-check: CUDA is not available" in proc.stderr


@pytest.mark.parametrize(
    "override,needle",
    [("trainer.compile=maybe", "trainer.compile='maybe'"), ("trainer.peak_flops=-1", "trainer.peak_flops=-1")],
)
def test_gpu_levers_are_checked_at_the_boundary(override: str, needle: str) -> None:
    from pipeline.run.spec import RunConfigError, validate_config
    from tests.test_conf import compose_train

    with pytest.raises(RunConfigError, match=re.escape(needle)):
        validate_config(compose_train(["budget=cpu", override]))
    spec = validate_config(compose_train(["budget=cpu", "trainer.compile=true", "trainer.peak_flops=1e12"]))
    assert spec.compile is True and spec.peak_flops == 1e12
