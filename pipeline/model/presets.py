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
        # Experts as wide as the dense SwiGLU (granularity 1): 2x its active FFN parameters.
        "ffn": {"name": "moe", "n_experts": 8, "top_k": 2, "expert": "swiglu", "granularity": 1},
        "bias": False,
        "tie_embeddings": False,
    },
}
# GPT-3 (Brown et al. 2020) is GPT-2's architecture at larger scale and 2048 context; its
# alternating locally banded sparse attention layers are not modelled.
ARCHITECTURES["gpt3"] = dict(ARCHITECTURES["gpt2"])

# GPT-3 Small (Brown et al. 2020, Table 2.1): the gpt3 preset's default size, context 2048.
GPT3_SMALL = {"d_model": 768, "n_layers": 12, "n_heads": 12, "context_length": 2048}

# Preset name -> (architecture, default size).
PRESETS: dict[str, dict[str, Any]] = {
    "gpt1": {**ARCHITECTURES["gpt1"], **_SMALL},
    "gpt2": {**ARCHITECTURES["gpt2"], **_SMALL},
    "gpt3": {**ARCHITECTURES["gpt3"], **GPT3_SMALL},
    "llama": {**ARCHITECTURES["llama"], **_SMALL},
    "mixtral": {**ARCHITECTURES["mixtral"], **_SMALL},
}
