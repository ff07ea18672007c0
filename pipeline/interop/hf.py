"""Weight conversion between DecoderLM and Hugging Face transformers models.

    from pipeline.interop.hf import from_hf, to_hf
    ours = from_hf(GPT2LMHeadModel(GPT2Config(...)))     # any of the three classes below
    theirs = to_hf(ours)                                 # the class follows from ours' components

Supported: GPT2LMHeadModel (learned + layernorm pre + mha + gelu, biases), LlamaForCausalLM
(rope + rmsnorm pre + mha/gqa/mqa + swiglu) and MixtralForCausalLM (the same with a SwiGLU
MoE). Layout differences handled here:
  - GPT-2 stores its projections as Conv1D, i.e. the transpose of nn.Linear, and fuses q, k, v
    into `c_attn`; ours is one Linear over [q; k; v] as well.
  - LLaMA/Mixtral keep q, k, v and gate, up as separate Linears; ours fuses them. Their RoPE
    uses the rotate-half layout, as ours does, so no permutation of q/k rows is needed.
  - Mixtral's experts are stacked `gate_up_proj (E, 2h, d)` / `down_proj (E, d, h)`, exactly our
    MoE's `w_in` / `w_out`; its router `mlp.gate` is our `router`.
Nothing is downloaded: models are built from configs; weights come from the given model.
transformers is imported lazily (it is a test/interop extra, not a dependency of the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.model import DecoderLM, ModelConfig
from pipeline.model.components.ffn import ffn_hidden

SUPPORTED = ("GPT2LMHeadModel", "LlamaForCausalLM", "MixtralForCausalLM")
_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # HF name -> approximate


class UnsupportedModelError(ValueError):
    """A model or configuration that has no counterpart on the other side."""


# -- entry points ------------------------------------------------------------------------------
def from_hf(model: nn.Module) -> DecoderLM:
    """A DecoderLM with the architecture and weights of a transformers causal LM."""
    kind = type(model).__name__
    if kind not in SUPPORTED:
        raise UnsupportedModelError(f"from_hf: {kind} is not supported; supported classes: {', '.join(SUPPORTED)}")
    hf_cfg = model.config
    cfg = _gpt2_config(hf_cfg) if kind == "GPT2LMHeadModel" else _llama_config(hf_cfg, moe=kind == "MixtralForCausalLM")
    sd = model.state_dict()
    weights = _from_theirs(sd, _weight_keys(cfg))
    dtype = next(model.parameters()).dtype
    ours = DecoderLM(cfg).to(device=next(model.parameters()).device, dtype=dtype)
    ours.load_state_dict(weights, strict=True)
    return ours.train(model.training)


def to_hf(model: DecoderLM) -> nn.Module:
    """The transformers model (GPT-2, LLaMA or Mixtral) with the weights of `model`."""
    import transformers

    cfg = model.cfg
    kind = hf_class_name(cfg)
    sd = model.state_dict()
    if kind == "GPT2LMHeadModel":
        hf = transformers.GPT2LMHeadModel(_gpt2_hf_config(cfg))
    else:
        hf_cfg = _llama_hf_config(cfg, moe=kind == "MixtralForCausalLM")
        cls = transformers.MixtralForCausalLM if kind == "MixtralForCausalLM" else transformers.LlamaForCausalLM
        hf = cls(hf_cfg)
    weights = _to_theirs(sd, _weight_keys(cfg))
    p = next(model.parameters())
    hf = hf.to(device=p.device, dtype=p.dtype)
    hf.load_state_dict(weights, strict=True)
    return hf.train(model.training)


def hf_class_name(cfg: ModelConfig) -> str:
    """Which transformers class can hold this architecture; raises with the reason if none."""
    pos, norm, attn, ffn = cfg.pos_enc.name, cfg.norm.name, cfg.attention.name, cfg.ffn.name
    if cfg.placement != "pre":
        raise UnsupportedModelError("to_hf: placement='post' has no transformers counterpart here; use pre")
    if (pos, norm, attn, ffn) == ("learned", "layernorm", "mha", "gelu"):
        if not cfg.bias:
            raise UnsupportedModelError("to_hf: GPT-2 has biases everywhere; set model.bias=true")
        return "GPT2LMHeadModel"
    if (pos, norm) == ("rope", "rmsnorm") and ffn in ("swiglu", "moe"):
        if cfg.pos_enc.scaling == "ntk":
            raise UnsupportedModelError("to_hf: pos_enc.scaling='ntk' is not mapped; use none or linear")
        if ffn == "swiglu":
            return "LlamaForCausalLM"
        if cfg.ffn.expert != "swiglu" or cfg.ffn.capacity_factor is not None:
            raise UnsupportedModelError(
                "to_hf: Mixtral experts are SwiGLU with no capacity limit; "
                "set ffn.expert=swiglu and ffn.capacity_factor=null"
            )
        if cfg.bias:
            raise UnsupportedModelError("to_hf: Mixtral has no biases; set model.bias=false")
        return "MixtralForCausalLM"
    raise UnsupportedModelError(
        f"to_hf: no transformers class for pos_enc={pos}, norm={norm}, attention={attn}, ffn={ffn}; "
        "supported: learned+layernorm+mha+gelu (GPT-2), rope+rmsnorm+any attention+swiglu (LLaMA), "
        "rope+rmsnorm+any attention+moe (Mixtral)"
    )


# -- configs -----------------------------------------------------------------------------------
def _gpt2_config(c: Any) -> ModelConfig:
    if c.activation_function not in _GELU:
        raise UnsupportedModelError(
            f"from_hf: GPT-2 activation_function='{c.activation_function}' is not supported; valid: {', '.join(_GELU)}"
        )
    for flag, want in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("reorder_and_upcast_attn", False),
        ("add_cross_attention", False),
    ):
        if getattr(c, flag, want) != want:
            raise UnsupportedModelError(f"from_hf: GPT-2 {flag}={getattr(c, flag)} is not supported; only {want}")
    return ModelConfig(
        d_model=c.n_embd,
        n_layers=c.n_layer,
        n_heads=c.n_head,
        context_length=c.n_positions,
        vocab_size=c.vocab_size,
        pos_enc={"name": "learned", "max_len": c.n_positions},
        placement="pre",
        norm={"name": "layernorm", "eps": c.layer_norm_epsilon},
        attention={"name": "mha"},
        ffn={"name": "gelu", "hidden": c.n_inner or 4 * c.n_embd, "approximate": _GELU[c.activation_function]},
        bias=True,
        tie_embeddings=c.tie_word_embeddings,
        dropout=float(c.resid_pdrop),
        init_std=c.initializer_range,
    )


def _gpt2_hf_config(cfg: ModelConfig) -> Any:
    import transformers

    p = float(cfg.dropout)
    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.pos_enc.max_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=ffn_hidden(cfg.ffn, cfg.d_model),
        activation_function="gelu_new" if cfg.ffn.approximate == "tanh" else "gelu",
        resid_pdrop=p,
        embd_pdrop=p,
        attn_pdrop=p,
        layer_norm_epsilon=cfg.norm.eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,  # ours has no special tokens
    )


def _llama_config(c: Any, moe: bool) -> ModelConfig:
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        raise UnsupportedModelError(
            f"from_hf: head_dim={head_dim} x num_attention_heads={c.num_attention_heads} != hidden_size="
            f"{c.hidden_size}; DecoderLM needs head_dim = hidden_size / num_attention_heads"
        )
    if c.hidden_act != "silu":
        raise UnsupportedModelError(f"from_hf: hidden_act='{c.hidden_act}' is not supported; only silu (SwiGLU)")
    if getattr(c, "pretraining_tp", 1) not in (None, 1):
        raise UnsupportedModelError(f"from_hf: pretraining_tp={c.pretraining_tp} is not supported; only 1")
    if getattr(c, "sliding_window", None) is not None:
        raise UnsupportedModelError(f"from_hf: sliding_window={c.sliding_window} is not supported; only null")
    if getattr(c, "router_jitter_noise", 0.0):
        raise UnsupportedModelError(f"from_hf: router_jitter_noise={c.router_jitter_noise} is not supported; only 0")
    rope = dict(c.rope_parameters or {"rope_theta": getattr(c, "rope_theta", 10000.0)})
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        pos_enc = {"name": "rope", "theta": float(rope["rope_theta"])}
    elif rope_type == "linear":  # position interpolation (Chen et al. 2023)
        pos_enc = {
            "name": "rope",
            "theta": float(rope["rope_theta"]),
            "scaling": "linear",
            "scale": float(rope["factor"]),
        }
    else:
        raise UnsupportedModelError(f"from_hf: rope_type='{rope_type}' is not supported; valid: default, linear")
    attn_bias, mlp_bias = getattr(c, "attention_bias", False), getattr(c, "mlp_bias", False)
    if attn_bias != mlp_bias:
        raise UnsupportedModelError(
            f"from_hf: attention_bias={attn_bias} with mlp_bias={mlp_bias}; DecoderLM has one `bias` for both"
        )
    kv = c.num_key_value_heads or c.num_attention_heads
    attention = {"name": "mha"} if kv == c.num_attention_heads else {"name": "gqa", "n_kv_heads": kv}
    if moe:
        ffn = {
            "name": "moe",
            "hidden": c.intermediate_size,
            "n_experts": c.num_local_experts,
            "top_k": c.num_experts_per_tok,
            "aux_loss_coef": c.router_aux_loss_coef,
            "expert": "swiglu",
            "capacity_factor": None,
        }
    else:
        ffn = {"name": "swiglu", "hidden": c.intermediate_size}
    return ModelConfig(
        d_model=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        context_length=c.max_position_embeddings,
        vocab_size=c.vocab_size,
        pos_enc=pos_enc,
        placement="pre",
        norm={"name": "rmsnorm", "eps": c.rms_norm_eps},
        attention=attention,
        ffn=ffn,
        bias=bool(attn_bias),
        tie_embeddings=c.tie_word_embeddings,
        dropout=float(c.attention_dropout or 0.0),
        init_std=c.initializer_range,
    )


def _llama_hf_config(cfg: ModelConfig, moe: bool) -> Any:
    import transformers

    ffn = cfg.ffn
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.pos_enc.theta}
    if cfg.pos_enc.scaling == "linear":
        rope = {"rope_type": "linear", "rope_theta": cfg.pos_enc.theta, "factor": cfg.pos_enc.scale}
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=ffn_hidden(ffn, cfg.d_model),
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.context_length,
        rms_norm_eps=cfg.norm.eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=rope,
        attention_dropout=float(cfg.dropout),
        initializer_range=cfg.init_std,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if moe:
        return transformers.MixtralConfig(
            **common,
            num_local_experts=ffn.n_experts,
            num_experts_per_tok=ffn.top_k,
            router_aux_loss_coef=ffn.aux_loss_coef,
            router_jitter_noise=0.0,
            sliding_window=None,
        )
    return transformers.LlamaConfig(**common, attention_bias=cfg.bias, mlp_bias=cfg.bias)


# -- weights -----------------------------------------------------------------------------------
# One map per architecture, ours -> theirs; both directions are derived from it.
@dataclass(frozen=True)
class _Key:
    ours: str
    theirs: tuple[str, ...]  # several: fused on our side, concatenated along dim 0 in this order
    sizes: tuple[int, ...] = ()  # rows of each of several parts
    transpose: bool = False  # GPT-2's Conv1D stores (in, out), the transpose of nn.Linear


def _weight_keys(cfg: ModelConfig) -> list[_Key]:
    """Every weight of `cfg`'s DecoderLM and where transformers keeps it (GPT-2 or LLaMA/Mixtral)."""
    if hf_class_name(cfg) == "GPT2LMHeadModel":
        t = "transformer."
        keys = [
            _Key("tok_emb.weight", (t + "wte.weight",)),
            _Key("pos.table.weight", (t + "wpe.weight",)),
            _Key("final_norm.weight", (t + "ln_f.weight",)),
            _Key("final_norm.bias", (t + "ln_f.bias",)),
            _Key("head.weight", ("lm_head.weight",)),
        ]
        layer = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv": "attn.c_attn", "attn.out": "attn.c_proj"}
        layer |= {"ffn.up": "mlp.c_fc", "ffn.down": "mlp.c_proj"}
        for i in range(cfg.n_layers):
            for ours, theirs in layer.items():
                o, h = f"blocks.{i}.{ours}", f"{t}h.{i}.{theirs}"
                keys.append(_Key(o + ".weight", (h + ".weight",), transpose=not ours.startswith("norm")))
                keys.append(_Key(o + ".bias", (h + ".bias",)))
        return keys

    keys = [
        _Key("tok_emb.weight", ("model.embed_tokens.weight",)),
        _Key("final_norm.weight", ("model.norm.weight",)),
        _Key("head.weight", ("lm_head.weight",)),
    ]
    q, kv, hidden = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, ffn_hidden(cfg.ffn, cfg.d_model)
    for i in range(cfg.n_layers):
        o, h = f"blocks.{i}.", f"model.layers.{i}."
        keys.append(_Key(o + "norm1.weight", (h + "input_layernorm.weight",)))
        keys.append(_Key(o + "norm2.weight", (h + "post_attention_layernorm.weight",)))
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            qkv = tuple(h + f"self_attn.{p}_proj.{kind}" for p in "qkv")
            keys.append(_Key(o + f"attn.qkv.{kind}", qkv, (q, kv, kv)))
            keys.append(_Key(o + f"attn.out.{kind}", (h + f"self_attn.o_proj.{kind}",)))
            if cfg.ffn.name == "swiglu":
                gate_up = (h + f"mlp.gate_proj.{kind}", h + f"mlp.up_proj.{kind}")
                keys.append(_Key(o + f"ffn.gate_up.{kind}", gate_up, (hidden, hidden)))
                keys.append(_Key(o + f"ffn.down.{kind}", (h + f"mlp.down_proj.{kind}",)))
        if cfg.ffn.name == "moe":  # Mixtral's stacked experts are exactly our w_in / w_out
            keys.append(_Key(o + "ffn.router.weight", (h + "mlp.gate.weight",)))
            keys.append(_Key(o + "ffn.w_in", (h + "mlp.experts.gate_up_proj",)))  # (E, [gate; up], d)
            keys.append(_Key(o + "ffn.w_out", (h + "mlp.experts.down_proj",)))  # (E, d, hidden)
    return keys


def _from_theirs(sd: dict[str, Tensor], keys: list[_Key]) -> dict[str, Tensor]:
    out = {}
    for k in keys:
        if k.ours == "head.weight" and k.theirs[0] not in sd:
            out[k.ours] = out["tok_emb.weight"]  # a tied head may be left out of a state dict
            continue
        parts = [sd[t].T if k.transpose else sd[t] for t in k.theirs]
        out[k.ours] = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out


def _to_theirs(sd: dict[str, Tensor], keys: list[_Key]) -> dict[str, Tensor]:
    out = {}
    for k in keys:
        w = sd[k.ours]
        parts = w.split(k.sizes) if len(k.theirs) > 1 else (w,)
        for theirs, part in zip(k.theirs, parts, strict=True):
            out[theirs] = (part.T if k.transpose else part).contiguous()
    return out
