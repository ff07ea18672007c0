"""GPU checks (`make gpu-check`): the same model on CUDA, bf16 autocast and a real GPU run.

Marked `gpu`, so `make test` leaves them out; they skip where CUDA is absent.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch

from pipeline.model import DecoderLM, ModelConfig
from tests.helpers.cli import TINY, cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PRESETS = ["gpt2", "llama", "mixtral"]
SMALL = {"d_model": 128, "n_layers": 2, "n_heads": 4, "context_length": 64}


@pytest.mark.parametrize("preset,pos_enc", list(itertools.product(PRESETS, ["rope", "alibi", "learned"])))
def test_cuda_backends_and_cache_agree(preset: str, pos_enc: str) -> None:
    """On CUDA, sdpa (flash / memory-efficient kernels) equals the math backend, and KV-cache
    decoding equals a full forward pass (fp32)."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, **SMALL, pos_enc={"name": pos_enc})
    sdpa = DecoderLM(cfg).cuda().eval()
    attn = {**cfg.to_dict()["attention"], "backend": "math"}
    math_model = (
        DecoderLM(ModelConfig.from_preset(preset, **SMALL, pos_enc={"name": pos_enc}, attention=attn)).cuda().eval()
    )
    math_model.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, 48), device="cuda")
    with torch.no_grad():
        full = sdpa(x)
        torch.testing.assert_close(math_model(x), full, atol=1e-4, rtol=1e-4)
        cache = sdpa.new_cache(2, 48)
        steps = [sdpa(x[:, :16], cache=cache)] + [sdpa(x[:, i : i + 1], cache=cache) for i in range(16, 48)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_autocast_close_to_fp32(preset: str) -> None:
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_preset(preset, **SMALL)).cuda().eval()
    x = torch.randint(0, 256, (4, 64), device="cuda")
    with torch.no_grad():
        ref = model(x).float().log_softmax(-1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(x).float().log_softmax(-1)
    assert (low - ref).abs().mean() < 0.05


def test_gpu_run_end_to_end(tmp_path: Path) -> None:
    """One short run on the GPU budget through the real CLI: bf16-mixed, CUDA peak memory."""
    proc = cli(
        "pipeline.train", [*TINY, "budget=gpu", "model=mixtral", "model.d_model=64", "model.n_heads=4"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.precision"] == "bf16-mixed"
    assert 0 < run.data.metrics["cost/peak_mem_bytes"] < torch.cuda.get_device_properties(0).total_memory
    out = os.environ.get("OUT")
    if out:  # `make gpu-check` on a lent GPU machine brings these numbers back
        Path(out, "gpu_run_metrics.txt").write_text(
            "\n".join(f"{k} {v}" for k, v in sorted(run.data.metrics.items())) + "\n"
        )


def test_cuda_runs_get_page_locked_batches(tmp_path: Path) -> None:
    """The runner asks for pinned batches on CUDA, so host-to-device copies run asynchronously."""
    from pipeline.data import LMDataModule
    from pipeline.data.config import DataConfig

    cfg = DataConfig.from_dict({"cache_dir": str(tmp_path)})
    dm = LMDataModule(cfg, context_length=64, batch_size=4, pin_memory=True)
    x, y = next(iter(dm.train_dataloader()))
    assert x.is_pinned() and y.is_pinned()
    vx, _ = next(iter(dm.val_dataloader()))
    assert vx.is_pinned()
