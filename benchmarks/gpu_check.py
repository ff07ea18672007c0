"""The GPU check (`make gpu-check`): one command, JSON and junit XML under --out.

    python -m benchmarks.gpu_check --out DIR          # on the GPU machine (fails without CUDA)
    python -m benchmarks.gpu_check --out DIR --cpu    # tiny shapes on the CPU, CUDA-only steps skipped

Each step is timed and recorded pass / fail / skip with its numbers; a failing step does not
stop the others. The CPU mode runs in the default tests (tests/test_gpu_check.py), so the
script cannot rot while no GPU is around. Budget: <= 8 minutes on one H200.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import torch
import torch.nn.functional as F

from pipeline.model import DecoderLM, ModelConfig
from pipeline.model.components.ffn import MoE

POS_ENCS = ["learned", "sinusoidal", "rope", "alibi", "nope"]
ATTENTIONS = ["mha", "gqa", "mqa"]
SDPA_OPS = ("flash_attention", "efficient_attention", "cudnn_attention", "attention_math", "flash_attention_for_cpu")


@dataclass
class Shapes:
    """Sizes per mode: the GPU budget (conf/budget/gpu.yaml), a ~124M GPT-2, and tiny CPU ones."""

    budget: dict[str, int]
    big: dict[str, int]
    batch: int
    big_batch: int
    steps: int
    decode_batches: tuple[int, ...]
    new_tokens: int
    matmul_n: int
    copy_bytes: int


GPU = Shapes(
    budget={"d_model": 256, "n_layers": 4, "n_heads": 8, "context_length": 256, "vocab_size": 50304},
    big={"d_model": 768, "n_layers": 12, "n_heads": 12, "context_length": 1024, "vocab_size": 50304},
    batch=64,
    big_batch=16,
    steps=30,
    decode_batches=(1, 8, 64),
    new_tokens=64,
    matmul_n=8192,
    copy_bytes=1 << 30,
)
CPU = Shapes(
    budget={"d_model": 32, "n_layers": 1, "n_heads": 4, "context_length": 32, "vocab_size": 256},
    big={"d_model": 64, "n_layers": 2, "n_heads": 4, "context_length": 64, "vocab_size": 256},
    batch=4,
    big_batch=2,
    steps=2,
    decode_batches=(1, 8, 64),
    new_tokens=4,
    matmul_n=256,
    copy_bytes=1 << 22,
)


@dataclass
class Context:
    device: torch.device
    shapes: Shapes
    out: Path
    cpu_mode: bool
    results: dict[str, Any] = field(default_factory=dict)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def peak(self) -> float | None:
        from pipeline.run.callbacks import peak_flops

        return peak_flops(self.device, "bf16-mixed")


# -- host reads / syncs ----------------------------------------------------------------------


@contextlib.contextmanager
def count_host_reads(device: torch.device) -> Iterator[list[str]]:
    """Count what makes the host wait for the device. On CUDA: the syncs that
    torch.cuda.set_sync_debug_mode reports. On the CPU (nothing to wait for): the tensor reads
    that would be syncs on CUDA (.item(), .tolist(), bool/int/float of a tensor)."""
    events: list[str] = []
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield events
            finally:
                torch.cuda.set_sync_debug_mode(0)
        events.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message))
        return
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__int__", "__float__")}

    def wrap(name: str, fn: Callable) -> Callable:
        def counted(self, *a, **kw):
            # Adam's step counters are host tensors on CUDA too (capturable=False): no sync.
            if "torch/optim/" not in sys._getframe(1).f_code.co_filename:
                events.append(name)
            return fn(self, *a, **kw)

        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield events
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


# -- steps -----------------------------------------------------------------------------------


def environment(ctx: Context) -> dict[str, Any]:
    import lightning

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "device": str(ctx.device),
        "grouped_mm": hasattr(torch, "_grouped_mm"),
    }
    for mod in ("hydra", "omegaconf", "optuna", "mlflow", "sqlalchemy", "datasets"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # recorded, not fatal: the later steps say what breaks
            env[mod] = f"missing: {e}"
    if ctx.device.type == "cuda":
        p = torch.cuda.get_device_properties(ctx.device)
        env.update(
            gpu=p.name,
            capability=f"{p.major}.{p.minor}",
            memory_gib=round(p.total_memory / 2**30, 1),
            peak_bf16_flops=ctx.peak,
            flash_sdp=torch.backends.cuda.flash_sdp_enabled(),
        )
        with contextlib.suppress(Exception):
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
    return env


def _timed(ctx: Context, fn: Callable[[], Any], repeats: int) -> float:
    fn()
    ctx.sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    ctx.sync()
    return (time.perf_counter() - t0) / repeats


def ceilings(ctx: Context) -> dict[str, float]:
    """Measured matmul FLOP/s (bf16 on CUDA, fp32 on the CPU) and device copy bandwidth."""
    n = ctx.shapes.matmul_n
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    s = _timed(ctx, lambda: a @ b, 10)
    src = torch.empty(ctx.shapes.copy_bytes, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    c = _timed(ctx, lambda: dst.copy_(src), 10)
    out = {"matmul_flops": 2 * n**3 / s, "matmul_dtype": str(dtype), "copy_bytes_per_s": 2 * src.numel() / c}
    if ctx.peak:
        out["matmul_fraction_of_peak"] = out["matmul_flops"] / ctx.peak
    return out


def _model(preset: str, sizes: dict[str, int], **kw: Any) -> DecoderLM:
    return DecoderLM(ModelConfig.from_preset(preset, **sizes, **kw))


def attention_kernels(ctx: Context) -> dict[str, dict[str, str]]:
    """The sdpa kernel each pos_enc x attention runs, seen by the profiler, in the training
    shape (B, T), the evaluation shape (1, 4T) and decoding (one token against a cache)."""
    sizes = {**ctx.shapes.budget, "n_layers": 1}
    T = sizes["context_length"]
    out: dict[str, dict[str, str]] = {}
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16)
    attentions = ["gqa"] if ctx.cpu_mode else ATTENTIONS  # CPU mode: the code path, not the table
    for pos, attn in itertools.product(POS_ENCS, attentions):
        model = _model("llama", sizes, pos_enc={"name": pos}, attention={"name": attn}).to(ctx.device)
        cache = model.new_cache(1, 4 * T + 1)
        shapes = {
            "train": lambda m=model: m(torch.randint(0, 100, (ctx.shapes.batch, T), device=ctx.device)),
            "eval": lambda m=model, c=cache: m(torch.randint(0, 100, (1, 4 * T), device=ctx.device), cache=c),
            "decode": lambda m=model, c=cache: m(torch.randint(0, 100, (1, 1), device=ctx.device), cache=c),
        }
        row = {}
        for shape, fn in shapes.items():  # in this order: decode extends the cache eval filled
            with torch.no_grad(), autocast, torch.profiler.profile() as prof:
                fn()
            ops = sorted(
                {
                    e.key
                    for e in prof.key_averages()
                    if "scaled_dot_product" in e.key and e.key != "aten::scaled_dot_product_attention"
                }
            )
            row[shape] = ",".join(op.removeprefix("aten::_scaled_dot_product_") for op in ops) or "none"
        out[f"{pos}/{attn}"] = row
    return out


def bf16_error(ctx: Context) -> dict[str, dict[str, float]]:
    """Loss and gradient error of bf16 autocast against fp32, per attention backend, for each
    preset family (relative gradient error: ||g_bf16 - g_fp32|| / ||g_fp32||)."""
    sizes = ctx.shapes.budget
    out: dict[str, dict[str, float]] = {}
    x = torch.randint(0, sizes["vocab_size"], (ctx.shapes.batch, sizes["context_length"]), device=ctx.device)
    for preset, backend in itertools.product(["gpt2", "llama", "mixtral"], ["sdpa", "math"]):
        torch.manual_seed(0)
        cfg = ModelConfig.from_preset(preset, **sizes)
        attn = {**cfg.to_dict()["attention"], "backend": backend}
        model = DecoderLM(ModelConfig.from_preset(preset, **sizes, attention=attn)).to(ctx.device)
        results = []
        for low in (False, True):
            model.zero_grad(set_to_none=True)
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=low):
                logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), x.flatten())
            loss.backward()
            grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            results.append((loss.detach(), grad))
        (l32, g32), (l16, g16) = results
        out[f"{preset}/{backend}"] = {
            "loss_fp32": l32.item(),
            "loss_abs_err": (l16 - l32).abs().item(),
            "grad_rel_err": ((g16 - g32).norm() / g32.norm()).item(),
        }
    return out


def _lit_fit(ctx: Context, preset: str, steps: int, log_every: int, callbacks: list) -> None:
    """A real Lightning fit of `steps` optimizer steps on random tokens (no MLflow)."""
    import lightning as L
    from torch.utils.data import DataLoader, IterableDataset

    from pipeline.run.module import LitDecoderLM
    from pipeline.run.optim import OptimConfig

    sizes = ctx.shapes.budget

    class Random(IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            while True:
                t = torch.randint(0, sizes["vocab_size"], (ctx.shapes.batch, sizes["context_length"] + 1), generator=g)
                yield t[:, :-1], t[:, 1:]

    # As the runner on a GPU: the finite-loss check once per logging interval.
    cfg = ModelConfig.from_preset(preset, **sizes)
    lit = LitDecoderLM(cfg, OptimConfig(warmup_steps=1), steps, check_finite_every=log_every)
    trainer = L.Trainer(
        accelerator=ctx.device.type,
        devices=1,
        precision="bf16-mixed",  # the GPU budget's; on the CPU too, so that MoE takes the grouped matmul
        max_steps=steps,
        log_every_n_steps=log_every,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=True,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=callbacks,
    )
    trainer.fit(lit, DataLoader(Random(), batch_size=None, pin_memory=ctx.device.type == "cuda"))


def host_syncs(ctx: Context) -> dict[str, Any]:
    """Host syncs (CPU mode: host reads) inside each training step of a real Lightning fit,
    at logging steps and between them."""
    import lightning as L

    class PerStep(L.Callback):
        def __init__(self) -> None:
            self.per_step: list[int] = []
            self.examples: set[str] = set()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._cm = count_host_reads(ctx.device)
            self._events = self._cm.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._cm.__exit__(None, None, None)
            self.per_step.append(len(self._events))
            self.examples.update(self._events[:3])

    out: dict[str, Any] = {}
    log_every = 4
    for preset in ("llama", "mixtral"):
        cb = PerStep()
        _lit_fit(ctx, preset, 2 * log_every, log_every, [cb])
        logging = [n for i, n in enumerate(cb.per_step) if (i + 1) % log_every == 0]
        between = [n for i, n in enumerate(cb.per_step) if (i + 1) % log_every != 0]
        out[preset] = {
            "per_step": cb.per_step,
            "max_between_logging_steps": max(between),
            "max_at_logging_steps": max(logging),
            "examples": sorted(cb.examples)[:5],
        }
    return out


def _train_variant(ctx: Context, preset: str, sizes: dict[str, int], batch: int, variant: str) -> dict[str, float]:
    """Step time of a plain training loop (bf16 autocast) in one of four variants:
    as_is (a host read of the loss every step, foreach AdamW, the MoE loop), sync_free,
    fused (sync-free + fused AdamW), compiled (fused + torch.compile, fullgraph)."""
    from pipeline.evaluate.cost import analytic_cost

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, **sizes)
    model = DecoderLM(cfg).to(ctx.device)
    if variant == "as_is":
        for m in model.modules():
            if isinstance(m, MoE):
                m.dispatch = "loop"
    fused = variant in ("fused", "compiled") and ctx.device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)
    forward = torch.compile(model, fullgraph=True) if variant == "compiled" else model
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (4, batch, cfg.context_length + 1), generator=g).to(ctx.device)

    def step(i: int) -> None:
        x, y = data[i % 4, :, :-1], data[i % 4, :, 1:]
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            logits, aux = forward(x, return_aux=True)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()) + aux.get("moe_loss", 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if variant == "as_is" and not torch.isfinite(loss):  # what the module did every step
            raise FloatingPointError("non-finite loss")

    warm = 1 if ctx.cpu_mode else (3 if variant != "compiled" else 5)
    for i in range(warm):
        step(i)
    ctx.sync()
    n = ctx.shapes.steps
    t0 = time.perf_counter()
    for i in range(n):
        step(i)
    ctx.sync()
    s = (time.perf_counter() - t0) / n
    tokens = batch * cfg.context_length
    flops = 3 * analytic_cost(cfg)["flops_per_token"] * tokens
    out = {"step_ms": 1e3 * s, "tokens_per_s": tokens / s}
    if ctx.peak:
        out["mfu"] = flops / s / ctx.peak
    return out


def step_time(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, preset, sizes, batch in (
        ("budget_llama", "llama", ctx.shapes.budget, ctx.shapes.batch),
        ("budget_mixtral", "mixtral", ctx.shapes.budget, ctx.shapes.batch),
        ("gpt2_124m", "gpt2", ctx.shapes.big, ctx.shapes.big_batch),
    ):
        # CPU mode compiles one model only: compiling is what takes the time there.
        variants = ["as_is", "sync_free", "fused"] + (
            ["compiled"] if not ctx.cpu_mode or label == "budget_llama" else []
        )
        out[label] = {v: _train_variant(ctx, preset, sizes, batch, v) for v in variants}
    return out


def decode(ctx: Context) -> dict[str, Any]:
    """Prefill and cached-decode tokens/s in the serving dtype (bf16 on CUDA, as
    kv_bytes_per_token assumes; fp32 on the CPU), at batch 1, 8 and 64."""
    from pipeline.evaluate.cost import time_generation

    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    out: dict[str, Any] = {"dtype": str(dtype)}
    for preset in ("llama", "mixtral"):
        model = _model(preset, ctx.shapes.budget).to(ctx.device, dtype).eval()
        T = ctx.shapes.budget["context_length"] // 2
        for B in ctx.shapes.decode_batches:
            prompt = torch.randint(0, 100, (B, T), device=ctx.device)
            time_generation(model, prompt, ctx.shapes.new_tokens)  # warm-up
            pre, dec = time_generation(model, prompt, ctx.shapes.new_tokens)
            cache = model.new_cache(B, T)
            out[f"{preset}/b{B}"] = {
                "prefill_tokens_per_s": B * T / pre,
                "decode_tokens_per_s": B * ctx.shapes.new_tokens / dec,
                "kv_cache_dtype": str(cache.keys[0].dtype),
            }
    return out


def mini_sweep(ctx: Context) -> dict[str, Any]:
    """Four combinations (pos_enc x norm) through the real CLI, Optuna and MLflow; every run
    finished, and evaluation ran on this device (cost metrics logged)."""
    from mlflow import MlflowClient

    tiny = [
        "model.d_model=32",
        "model.n_layers=1",
        "model.n_heads=2",
        "model.context_length=32",
        "trainer.max_steps=10",
        "trainer.val_check_interval=5",
        "trainer.log_every_n_steps=5",
        "data.batch_size=8",
        "data.val_batches=2",
        "eval.factors=[1,2]",
    ]
    budget = "budget=gpu" if ctx.device.type == "cuda" else "budget=cpu"
    args = [
        "-m",
        budget,
        "study=gpu_check",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=4",
        "model/pos_enc=choice(rope,alibi)",
        "model/norm=choice(layernorm,rmsnorm)",
        "trainer.enable_progress_bar=false",
        "tracking.system_metrics=false",
        *([] if ctx.device.type == "cuda" and not ctx.cpu_mode else tiny),
        *(["eval.factors=[1]", "trainer.max_steps=4", "trainer.val_check_interval=4"] if ctx.cpu_mode else []),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.train", *args],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=420,
            env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
        )
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"sweep exited {proc.returncode}: {proc.stderr[-1500:]}")
        client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        exp = client.get_experiment_by_name("gpu_check")
        runs = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    if len(runs) != 4 or any(r.info.status != "FINISHED" for r in runs):
        raise RuntimeError(f"expected 4 finished trials, got {[r.info.status for r in runs]}")
    devices = {r.data.params.get("trainer.accelerator") for r in runs}
    evaluated = all("cost/decode_tokens_per_s" in r.data.metrics for r in runs)
    if not evaluated:
        raise RuntimeError("a trial logged no cost/decode_tokens_per_s: evaluation did not run")
    eval_devices = {r.data.tags.get("eval_device", r.data.params.get("eval.device", "untagged")) for r in runs}
    if ctx.device.type == "cuda" and eval_devices != {"untagged"} and not all("cuda" in d for d in eval_devices):
        raise RuntimeError(f"evaluation ran on {eval_devices}, not on CUDA")
    return {
        "seconds": seconds,
        "trials_per_hour": 4 * 3600 / seconds,
        "accelerator": sorted(devices),
        "eval_device": sorted(eval_devices),
        "mfu": [r.data.metrics.get("cost/mfu") for r in runs],
        "train_tokens_per_s": [r.data.metrics.get("cost/train_tokens_per_s") for r in runs],
    }


STEPS: list[tuple[str, Callable[[Context], Any], bool]] = [
    ("environment", environment, False),
    ("ceilings", ceilings, False),
    ("attention_kernels", attention_kernels, False),
    ("bf16_error", bf16_error, False),
    ("host_syncs", host_syncs, False),
    ("step_time", step_time, False),
    ("decode", decode, False),
    ("mini_sweep", mini_sweep, False),
]


def write_junit(path: Path, cases: list[dict[str, Any]]) -> None:
    suite = ET.Element(
        "testsuite",
        name="gpu_check",
        tests=str(len(cases)),
        failures=str(sum(c["status"] == "fail" for c in cases)),
        skipped=str(sum(c["status"] == "skip" for c in cases)),
        time=f"{sum(c['seconds'] for c in cases):.2f}",
    )
    for c in cases:
        case = ET.SubElement(suite, "testcase", classname="gpu_check", name=c["name"], time=f"{c['seconds']:.2f}")
        if c["status"] == "fail":
            ET.SubElement(case, "failure", message=c["error"].splitlines()[-1][:500]).text = c["error"]
        elif c["status"] == "skip":
            ET.SubElement(case, "skipped", message=c["error"])
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.xml")
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU; CUDA-only steps are skipped")
    parser.add_argument("--only", nargs="*", default=None, help="run only these steps")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print(
            f"gpu_check: CUDA is not available (torch {torch.__version__}); use --cpu for the CPU mode", file=sys.stderr
        )
        return 2
    ctx = Context(torch.device("cpu" if args.cpu else "cuda"), CPU if args.cpu else GPU, args.out, args.cpu)
    args.out.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, fn, cuda_only in STEPS:
        if args.only is not None and name not in args.only:
            continue
        t0 = time.perf_counter()
        case: dict[str, Any] = {"name": name, "status": "pass", "error": ""}
        if cuda_only and ctx.device.type != "cuda":
            case.update(status="skip", error="needs CUDA")
        else:
            try:
                ctx.results[name] = fn(ctx)
            except Exception:
                case.update(status="fail", error=traceback.format_exc())
        case["seconds"] = time.perf_counter() - t0
        cases.append(case)
        print(f"gpu_check: {name:18s} {case['status']:4s} {case['seconds']:7.1f} s", file=sys.stderr, flush=True)
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "cpu" if args.cpu else "cuda",
        "steps": {c["name"]: {k: c[k] for k in ("status", "seconds", "error")} for c in cases},
        "results": ctx.results,
    }
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    write_junit(args.out / "gpu_check.xml", cases)
    return 1 if any(c["status"] == "fail" for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
