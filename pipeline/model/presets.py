"""Presets as data: architectures (which components) and sizes (how big).

A preset is a partial model config; `ModelConfig.from_preset` merges overrides into it.
Behaviour never depends on a preset's name: `llama` with `pos_enc=alibi` is just a model.
"""

from __future__ import annotations

from typing import Any

# Small default sizes: every preset trains on a CPU out of the box; pick a size for more.
_SMALL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "context_length": 64}

ARCHITECTURES: dict[str, dict[str, Any]] = {
    # GPT-1 (Radford et al. 2018): learned positions, post-norm LayerNorm, GELU MLP.
    "gpt1": {
        "pos_enc": {"name": "learned"},
        "norm": {"name": "layernorm", "eps": 1e-5},
        "attention": {"name": "mha"},
        "ffn": {"name": "gelu", "approximate": "tanh"},
        "placement": "post",
        "bias": True,
        "tie_embeddings": True,
    },
    # GPT-2 (Radford et al. 2019): LayerNorm moved to the block input, plus a final norm.
    "gpt2": {
        "pos_enc": {"name": "learned"},
        "norm": {"name": "layernorm", "eps": 1e-5},
        "attention": {"name": "mha"},
        "ffn": {"name": "gelu", "approximate": "tanh"},
        "bias": True,
        "tie_embeddings": True,
    },
    # LLaMA (Touvron et al. 2023; GQA as in LLaMA 2 70B): RoPE, RMSNorm, SwiGLU, no biases.
    "llama": {
        "pos_enc": {"name": "rope", "theta": 10000.0},
        "norm": {"name": "rmsnorm", "eps": 1e-5},
        "attention": {"name": "gqa", "n_kv_heads": 2},
        "ffn": {"name": "swiglu"},
        "bias": False,
        "tie_embeddings": False,
    },
    # Mixtral (Jiang et al. 2024): LLaMA with 8 SwiGLU experts, top-2 routing.
    "mixtral": {
        "pos_enc": {"name": "rope", "theta": 10000.0},  # 8x7B: 1e6 at 32k context
        "norm": {"name": "rmsnorm", "eps": 1e-5},
        "attention": {"name": "gqa", "n_kv_heads": 2},
        "ffn": {"name": "moe", "n_experts": 8, "top_k": 2, "expert": "swiglu"},
        "bias": False,
        "tie_embeddings": False,
    },
}
# GPT-3 (Brown et al. 2020) is GPT-2's architecture at larger scale and 2048 context; its
# alternating locally banded sparse attention layers are not modelled.
ARCHITECTURES["gpt3"] = dict(ARCHITECTURES["gpt2"])

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 32, "n_layers": 1, "n_heads": 2, "context_length": 32},
    "small": dict(_SMALL),
    "medium": {"d_model": 128, "n_layers": 4, "n_heads": 4, "context_length": 128},
    "large": {"d_model": 256, "n_layers": 6, "n_heads": 8, "context_length": 256},
    # GPT-2 paper sizes (context 1024).
    "gpt2-124m": {"d_model": 768, "n_layers": 12, "n_heads": 12, "context_length": 1024},
    "gpt2-355m": {"d_model": 1024, "n_layers": 24, "n_heads": 16, "context_length": 1024},
    "gpt2-774m": {"d_model": 1280, "n_layers": 36, "n_heads": 20, "context_length": 1024},
    "gpt2-1.5b": {"d_model": 1600, "n_layers": 48, "n_heads": 25, "context_length": 1024},
    # GPT-3 paper, Table 2.1 (context 2048).
    "gpt3-small": {"d_model": 768, "n_layers": 12, "n_heads": 12, "context_length": 2048},
    "gpt3-medium": {"d_model": 1024, "n_layers": 24, "n_heads": 16, "context_length": 2048},
    "gpt3-large": {"d_model": 1536, "n_layers": 24, "n_heads": 16, "context_length": 2048},
    "gpt3-xl": {"d_model": 2048, "n_layers": 24, "n_heads": 24, "context_length": 2048},
    "gpt3-2.7b": {"d_model": 2560, "n_layers": 32, "n_heads": 32, "context_length": 2048},
    "gpt3-6.7b": {"d_model": 4096, "n_layers": 32, "n_heads": 32, "context_length": 2048},
    # The table prints d_model 5140 for 13B; 40 heads x 128 = 5120 is the consistent width.
    "gpt3-13b": {"d_model": 5120, "n_layers": 40, "n_heads": 40, "context_length": 2048},
    "gpt3-175b": {"d_model": 12288, "n_layers": 96, "n_heads": 96, "context_length": 2048},
    # LLaMA-7B and Mixtral 8x7B shapes.
    "llama-7b": {"d_model": 4096, "n_layers": 32, "n_heads": 32, "context_length": 2048},
    "mixtral-8x7b": {"d_model": 4096, "n_layers": 32, "n_heads": 32, "context_length": 32768},
}

# Preset name -> (architecture, default size).
PRESETS: dict[str, dict[str, Any]] = {
    "gpt1": {**ARCHITECTURES["gpt1"], **_SMALL},
    "gpt2": {**ARCHITECTURES["gpt2"], **_SMALL},
    "gpt3": {**ARCHITECTURES["gpt3"], **SIZES["gpt3-small"]},
    "llama": {**ARCHITECTURES["llama"], **_SMALL},
    "mixtral": {**ARCHITECTURES["mixtral"], **_SMALL},
}
