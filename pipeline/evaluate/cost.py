"""Inference cost of a model: analytic (from the config alone) and measured (on a built model).

Analytic counting conventions (the numbers `python -m pipeline.cost` prints and runs log):

- params_total equals `sum(p.numel() for p in DecoderLM(cfg).parameters())` exactly: a tied
  output head is counted once (it *is* the embedding matrix), and the learned position table
  is counted at its full size (`pos_enc.max_len`: max(eval.factors) x context in a training
  run, 8 x context by default), rows never trained included, because the model holds them.
- params_active is params_total minus the experts a token does not visit: an MoE layer with
  n_experts experts and top_k routing counts top_k experts (and its router). Embedding tables
  are counted whole in both, as is the convention (Mixtral's "13B active of 47B").
- flops_per_token is the forward pass at `context_length`, 2 FLOPs per multiply-accumulate, over
  matrix products only: q/k/v/output projections, the FFN (top_k experts and the router for MoE),
  the LM head, and attention's QK^T and AV over the *full* T x T score matrix, i.e. 4 * T * d
  per token and layer. That is what dense kernels compute and what
  `torch.utils.flop_counter.FlopCounterMode` counts; a causal kernel that skips the masked half
  (FlashAttention) does about half of the attention term. Embedding lookups, norms, softmax,
  activations and the built-in positional encodings count 0 (they are O(d) per token, not
  O(d^2)); a component that does matrix products declares them in its config's `cost`.
- kv_bytes_per_token = 2 (K and V) * n_layers * n_kv_heads * head_dim * bytes_per_element;
  the cache of a batch at a context holds batch * context times that.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from pipeline.model import DecoderLM, ModelConfig
from pipeline.tracking import schema


def analytic_cost(
    cfg: ModelConfig, context_length: int | None = None, batch: int = 1, bytes_per_element: int = 2
) -> dict[str, float]:
    """Parameters, forward FLOPs per token and KV-cache size of `cfg`, without building it.

    Each component's config counts itself (`ComponentConfig.cost`); this adds them up with the
    embeddings, the final norm and the LM head. context_length: where attention FLOPs and the
    KV cache are evaluated (default: the training context). bytes_per_element: 2 for bf16/fp16
    serving, 4 for fp32.
    """
    T = context_length or cfg.context_length
    dims, d, L, V = cfg.dims, cfg.d_model, cfg.n_layers, cfg.vocab_size
    pos, norm, attn, ffn = (c.cost(dims, T) for c in (cfg.pos_enc, cfg.norm, cfg.attention, cfg.ffn))
    layer_params = attn.params + ffn.params + 2 * norm.params
    layer_active = attn.active_params + ffn.active_params + 2 * norm.active_params
    final_norm = norm.params if cfg.placement == "pre" else 0
    head = 0 if cfg.tie_embeddings else V * d
    outer = V * d + pos.params + final_norm + head  # token embedding, positions, final norm, head

    macs = L * (attn.macs + ffn.macs + 2 * norm.macs) + pos.macs + V * d  # + LM head
    attn_scores_macs = cfg.attention.score_macs(dims, T)
    kv_per_token = 2 * L * cfg.n_kv_heads * cfg.head_dim * bytes_per_element
    return {
        "params_total": float(outer + L * layer_params),
        "params_active": float(outer + L * layer_active),
        "flops_per_token": float(2 * macs),
        "attn_flops_per_token": float(2 * L * attn_scores_macs),
        "kv_bytes_per_token": float(kv_per_token),
        "kv_bytes": float(kv_per_token * T * batch),
        "context_length": float(T),
        "batch": float(batch),
        "bytes_per_element": float(bytes_per_element),
    }


# -- measured --------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_generation(model: DecoderLM, prompt: Tensor, new_tokens: int, use_cache: bool = True) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of greedy generation of `new_tokens` after `prompt`.

    With use_cache the prompt fills a KV cache and each new token is one forward pass of
    length 1; without it every step reruns the whole prefix (what the cache exists to avoid).
    The cache is allocated before the clock starts: prefill times the prompt's forward pass.
    """
    device = prompt.device
    B, T = prompt.shape
    cache = model.new_cache(B, T + new_tokens) if use_cache else None
    _sync(device)
    start = time.perf_counter()
    logits = model(prompt, cache=cache)[:, -1]
    _sync(device)
    prefilled = time.perf_counter()
    seq = prompt
    for _ in range(new_tokens):
        nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        if use_cache:
            logits = model(nxt, cache=cache)[:, -1]
        else:
            seq = torch.cat((seq, nxt), dim=1)
            logits = model(seq)[:, -1]
    _sync(device)
    return prefilled - start, time.perf_counter() - prefilled


class TensorBytes(TorchDispatchMode):
    """Bytes held by live tensor storages, and their peak, while the mode is active.

    The storages of `existing` (the weights, the input) count from the start, once each. Every
    other storage an operator returns is counted once (views share it) until Python frees it
    (a weak reference's callback); views of `existing` tensors add nothing. The CPU analogue
    of torch.cuda.max_memory_allocated: tensor bytes, not the allocator's pages or the
    process's RSS, so it neither includes training's leftovers nor depends on what malloc kept.
    """

    def __init__(self, existing: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self.current = self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: set[weakref.ref] = set()
        for t in existing:
            self._track(t.untyped_storage())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type != "meta":
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        if storage in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[storage] = nbytes
        self._refs.add(weakref.ref(storage, lambda ref, n=nbytes: self._free(ref, n)))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def _free(self, ref: weakref.ref, nbytes: int) -> None:
        self._refs.discard(ref)
        self.current -= nbytes


# What measure_inference returns beside metrics: how the numbers were taken (evaluation.json).
MEASURE_PROTOCOL = ("threads", "peak_mem_method")


@torch.no_grad()
def peak_inference_bytes(model: DecoderLM, prompt: Tensor, new_tokens: int) -> tuple[float, str]:
    """(peak bytes, method) of cached generation: the weights plus everything inference
    allocates (KV cache, activations, logits). CUDA: the allocator's peak after a reset, so
    only what is alive now counts (the caller frees the optimizer first). CPU: TensorBytes.

    It runs the prefill and the first decode step, with the cache sized for all `new_tokens`:
    later steps allocate the same, up to new_tokens more attention scores per head and row.
    """
    device = prompt.device

    def generate() -> None:
        cache = model.new_cache(prompt.shape[0], prompt.shape[1] + new_tokens)
        logits = model(prompt, cache=cache)[:, -1]
        model(logits.argmax(dim=-1, keepdim=True), cache=cache)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        generate()
        return float(torch.cuda.max_memory_allocated(device)), "cuda.max_memory_allocated"
    with TensorBytes(existing=[*model.parameters(), *model.buffers(), prompt]) as mem:
        generate()
    return float(mem.peak), "live tensor bytes (TorchDispatchMode)"


@contextmanager
def pinned_threads(n: int | None) -> Iterator[int]:
    """Run with `n` intra-op CPU threads (None: the current count); yields the count in use."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def measure_inference(
    model: DecoderLM,
    device: torch.device,
    batch_sizes: Sequence[int] = (1, 8),
    prompt_tokens: int | None = None,
    new_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, float]:
    """Prefill and cached-decode throughput, median over `repeats` after `warmup` untimed runs.

    Keys: prefill_tokens_per_s / decode_tokens_per_s for the first batch size, with a `_b{B}`
    suffix for the others; peak_mem_bytes, peak_inference_bytes at the largest batch size
    (in its own untimed run); threads, the CPU threads the timing ran with
    (pinned to `threads`, default the current count); peak_mem_method, how memory was measured.
    """
    if repeats < 1:
        raise ValueError(f"eval.decode.repeats={repeats} must be >= 1")
    was_training = model.training
    model.eval()  # also: MoE serves every token (no capacity limit at evaluation)
    T = prompt_tokens or model.cfg.context_length
    pos = model.cfg.pos_enc
    limit = pos.max_positions()
    if limit is not None and T + new_tokens > limit:
        if prompt_tokens is not None or limit <= new_tokens:
            raise ValueError(
                f"eval.decode.prompt_tokens + new_tokens = {T + new_tokens} exceeds what pos_enc "
                f"'{pos.name}' can encode (model.pos_enc.{pos.limit_key}={limit}); shorten them"
            )
        T = limit - new_tokens  # default prompt: as much of the training context as fits
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    with pinned_threads(threads) as n_threads:
        for i, B in enumerate(batch_sizes):
            prompt = torch.randint(model.cfg.vocab_size, (B, T), generator=gen).to(device)
            for _ in range(warmup):
                time_generation(model, prompt, new_tokens)
            runs = [time_generation(model, prompt, new_tokens) for _ in range(repeats)]
            suffix = "" if i == 0 else f"_b{B}"
            out[f"prefill_tokens_per_s{suffix}"] = B * T / statistics.median(r[0] for r in runs)
            out[f"decode_tokens_per_s{suffix}"] = B * new_tokens / statistics.median(r[1] for r in runs)
    # Memory in its own untimed run, at the largest batch (the largest peak).
    prompt = torch.randint(model.cfg.vocab_size, (max(batch_sizes), T), generator=gen).to(device)
    out["peak_mem_bytes"], out["peak_mem_method"] = peak_inference_bytes(model, prompt, new_tokens)
    out["threads"] = n_threads
    model.train(was_training)
    return out


def format_table(cost: dict[str, float], title: str = "") -> str:
    """A human-readable table of analytic_cost's output."""

    def human(x: float, unit: str = "") -> str:
        for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(x) >= scale:
                return f"{x / scale:.2f} {prefix}{unit}"
        return f"{x:.0f} {unit}".rstrip()

    def binary(x: float) -> str:
        for scale, prefix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if x >= scale:
                return f"{x / scale:.2f} {prefix}"
        return f"{x:.0f} B"

    T, B = int(cost["context_length"]), int(cost["batch"])
    rows = [
        ("params total", human(cost["params_total"]), f"{cost['params_total']:.0f}"),
        ("params active / token", human(cost["params_active"]), f"{cost['params_active']:.0f}"),
        (f"forward FLOPs / token @ {T}", human(cost["flops_per_token"], "FLOP"), f"{cost['flops_per_token']:.4g}"),
        (
            "  of which attention QK^T, AV",
            human(cost["attn_flops_per_token"], "FLOP"),
            f"{cost['attn_flops_per_token'] / cost['flops_per_token']:.1%}",
        ),
        (
            f"KV cache / token ({int(cost['bytes_per_element'])} B/elem)",
            binary(cost["kv_bytes_per_token"]),
            f"{cost['kv_bytes_per_token']:.0f}",
        ),
        (f"KV cache @ context {T} x batch {B}", binary(cost["kv_bytes"]), f"{cost['kv_bytes']:.0f}"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [title] if title else []
    lines += [f"{name:<{width}}  {value:>14}  {exact:>18}" for name, value, exact in rows]
    return "\n".join(lines)


def cost_metrics(analytic: dict[str, float], measured: dict[str, Any]) -> dict[str, float]:
    """The `cost/*` MLflow metrics of one run (names: pipeline.tracking.schema)."""
    keys = ("params_total", "params_active", "flops_per_token", "kv_bytes_per_token")
    out = {schema.cost(k): float(analytic[k]) for k in keys}
    out.update({schema.cost(k): float(v) for k, v in measured.items()})
    return out
