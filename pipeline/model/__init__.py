"""The model: pure PyTorch (no Hydra, Lightning, MLflow or Optuna).

from pipeline.model import ModelConfig, DecoderLM
cfg = ModelConfig.from_preset("llama", d_model=128, attention={"name": "gqa", "n_kv_heads": 2})
model = DecoderLM(cfg)
logits = model(tokens)                                   # (B, T) -> (B, T, vocab)
logits, aux = model(tokens, return_aux=True)             # aux: MoE losses, see DecoderLM
out = model.generate(tokens, max_new_tokens=32, temperature=0.0)   # greedy, KV cache
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.model.config import ConfigError, ModelConfig, merge
    from pipeline.model.decoder import DecoderLM

__all__ = ["ConfigError", "DecoderLM", "ModelConfig", "merge"]
_HOME = {"ConfigError": "config", "ModelConfig": "config", "merge": "config", "DecoderLM": "decoder"}


def __getattr__(name: str) -> Any:
    # Lazy, so that torch-free submodules (presets, families) load without torch: the report uses them.
    if name in _HOME:
        return getattr(import_module(f"pipeline.model.{_HOME[name]}"), name)
    raise AttributeError(f"module 'pipeline.model' has no attribute {name!r}")
