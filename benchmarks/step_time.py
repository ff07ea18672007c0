"""Training step time (forward + backward + AdamW) of our presets against reference models.

    make bench                       # or: python -m benchmarks.step_time --steps 60 --threads 2

Shape (the speed targets of issue 2): d_model 64, 2 layers, 4 heads, context 64, batch 16,
vocab 256, CPU. Compared in one run, interleaved round by round so that a busy machine slows
every model alike: our gpt2 preset; a minimal hand-written GPT (below, nanoGPT-style); HF
GPT2LMHeadModel; our llama preset; HF LlamaForCausalLM. Warm-up steps are excluded; the
reported numbers are the median wall time and the median process CPU time of a step (the latter
is robust to other processes sharing the cores; with --threads 1 it is the cleanest comparison).
Targets: gpt2 within 10% of the minimal GPT, llama at least as fast as HF Llama.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.timing import time_steps
from pipeline.model import DecoderLM, ModelConfig
from pipeline.model.components.ffn import swiglu_hidden

D, L, H, CTX, BATCH, VOCAB = 64, 2, 4, 64, 16, 256


# -- a minimal GPT: the floor for per-step overhead --------------------------------------------
class MiniBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc, self.fc_out = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class MiniGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, D), nn.Embedding(CTX, D)
        self.blocks = nn.ModuleList(MiniBlock() for _ in range(L))
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos.weight[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# -- the contestants: name -> (model, logits function) ------------------------------------------
def contestants() -> dict[str, tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor]]]:
    import transformers

    sizes = dict(d_model=D, n_layers=L, n_heads=H, context_length=CTX, vocab_size=VOCAB)
    ours = lambda m, x: m(x)
    hf = lambda m, x: m(input_ids=x).logits
    none = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    gpt2_hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=VOCAB,
            n_positions=CTX,
            n_embd=D,
            n_layer=L,
            n_head=H,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **none,
        )
    )
    llama_hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=D,
            intermediate_size=swiglu_hidden(D),
            num_hidden_layers=L,
            num_attention_heads=H,
            num_key_value_heads=2,
            max_position_embeddings=CTX,
            tie_word_embeddings=False,
            **none,
        )
    )
    models = {
        "ours gpt2": (DecoderLM(ModelConfig.from_preset("gpt2", **sizes)), ours),
        "minimal GPT": (MiniGPT(), ours),
        "HF GPT2LMHeadModel": (gpt2_hf, hf),
        "ours llama": (DecoderLM(ModelConfig.from_preset("llama", **sizes)), ours),
        "HF LlamaForCausalLM": (llama_hf, hf),
    }
    try:  # optional peer: `pip install x-transformers`
        from x_transformers import Decoder, TransformerWrapper
    except ImportError:
        return models
    # LLaMA-shaped: RoPE, RMSNorm, 2 kv heads, SwiGLU with our default hidden width (8d/3), no biases.
    models["x-transformers llama"] = (
        TransformerWrapper(
            num_tokens=VOCAB,
            max_seq_len=CTX,
            use_abs_pos_emb=False,
            attn_layers=Decoder(
                dim=D,
                depth=L,
                heads=H,
                attn_kv_heads=2,
                rotary_pos_emb=True,
                use_rmsnorm=True,
                ff_glu=True,
                ff_swish=True,
                ff_mult=swiglu_hidden(D) / D,
                ff_no_bias=True,
            ),
        ),
        ours,
    )
    return models


def make_step(model: nn.Module, logits_of: Callable, x: Tensor, y: Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model.train()

    def step() -> None:
        logits = logits_of(model, x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per model (median reported)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps per model first")
    ap.add_argument("--rounds", type=int, default=6, help="steps are taken in this many interleaved rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randint(0, VOCAB, (BATCH, CTX))
    y = torch.randint(0, VOCAB, (BATCH, CTX))
    models = contestants()
    steps = {name: make_step(m, f, x, y) for name, (m, f) in models.items()}
    for step in steps.values():
        time_steps(step, 1, warmup=args.warmup)  # warm-up, before any model is timed; discarded
    # Wall time is what the targets are about; CPU time (all threads of this process) is also
    # recorded because it barely moves when other processes share the cores, unlike wall time.
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    per_round = max(1, args.steps // args.rounds)
    for _ in range(args.rounds):
        for name, step in steps.items():
            for _ in range(per_round):  # one step at a time: the median is over steps
                t = time_steps(step, 1)
                wall[name].append(t.wall_s)
                cpu[name].append(t.cpu_s)
    ms = {name: 1e3 * statistics.median(t) for name, t in wall.items()}
    cpu_ms = {name: 1e3 * statistics.median(t) for name, t in cpu.items()}

    print(
        f"fwd+bwd+AdamW, d_model {D}, {L} layers, {H} heads, context {CTX}, batch {BATCH}, "
        f"vocab {VOCAB}, CPU, {torch.get_num_threads()} threads; median of {per_round * args.rounds} "
        f"steps; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    ref = {"ours gpt2": "minimal GPT", "HF GPT2LMHeadModel": "minimal GPT", "ours llama": "HF LlamaForCausalLM"}
    print(f"{'model':<22}{'wall ms':>9}{'cpu ms':>9}  ratio wall (cpu)")
    for name in steps:
        r = ref.get(name)
        ratio = f"{ms[name] / ms[r]:.2f}x ({cpu_ms[name] / cpu_ms[r]:.2f}x) {r}" if r else ""
        print(f"{name:<22}{ms[name]:>9.2f}{cpu_ms[name]:>9.2f}  {ratio}")
    targets = [
        ("gpt2 <= 1.10x minimal GPT", "ours gpt2", "minimal GPT", 1.10),
        ("llama <= 1.00x HF Llama  ", "ours llama", "HF LlamaForCausalLM", 1.00),
    ]
    if "x-transformers llama" in ms:
        targets.append(("llama <= 0.67x x-transf. ", "ours llama", "x-transformers llama", 1 / 1.5))
    for label, num, den, bound in targets:
        w, c = ms[num] / ms[den], cpu_ms[num] / cpu_ms[den]
        print(
            f"target {label}: wall {w:.2f}x {'met' if w <= bound else 'MISSED'}, "
            f"cpu {c:.2f}x {'met' if c <= bound else 'MISSED'}"
        )
    return ms


if __name__ == "__main__":
    main()
