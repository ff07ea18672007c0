"""The GPU check (`make gpu-check`): one command, JSON and junit XML under --out.

    python -m benchmarks.gpu_check --out DIR          # on the GPU machine (fails without CUDA)
    python -m benchmarks.gpu_check --out DIR --cpu    # tiny shapes on the CPU, CUDA-only steps skipped

Each step is timed (wall and CPU seconds) and recorded pass / fail / skip with its numbers; a
failing step does not stop the others. Budget: <= 8 minutes on one H200. The CPU mode runs in
the default tests (tests/test_gpu_check.py), so the script cannot rot while no GPU is around:
every step at the smallest shapes (Shapes, CPU), one torch thread, compiled with aot_eager
instead of inductor, a 2-trial mini-sweep started first and run beside the other steps.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import itertools
import json
import os
import platform
import resource
import shutil
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

from benchmarks.timing import time_steps
from pipeline.model import DecoderLM, ModelConfig
from pipeline.model.components.ffn import MoE

POS_ENCS = ["learned", "sinusoidal", "rope", "alibi", "nope"]
ATTENTIONS = ["mha", "gqa", "mqa"]
SDPA_OPS = ("flash_attention", "efficient_attention", "cudnn_attention", "attention_math", "flash_attention_for_cpu")


def _lm(d_model: int, n_layers: int, n_heads: int, context_length: int, vocab_size: int) -> dict[str, int]:
    return dict(
        d_model=d_model, n_layers=n_layers, n_heads=n_heads, context_length=context_length, vocab_size=vocab_size
    )


@dataclass(frozen=True)
class Shapes:
    """Sizes per mode. GPU: the GPU budget (conf/budget/gpu.yaml) and a ~124M GPT-2. CPU: the
    smallest sizes that still run every step end to end, so the CPU mode fits the default tests."""

    budget: dict[str, int]
    big: dict[str, int]
    batch: int
    big_batch: int
    steps: int  # timed training steps per variant
    warmup: int  # untimed steps first (compiled variants: 2 more)
    decode_batches: tuple[int, ...]
    new_tokens: int
    matmul_n: int
    copy_bytes: int
    # torch.compile's backend. On the CPU, inductor's C++ build takes a minute even for a tiny
    # model; aot_eager still traces forward and backward with fullgraph=True (a graph break or a
    # host sync fails it), which is what the CPU mode is there to keep working.
    compile_backend: str
    # Torch threads (also the mini-sweep's OMP_NUM_THREADS); None: torch's default. Tiny shapes
    # gain nothing from a second thread, and on a shared machine its OpenMP barriers cost
    # seconds: measured at load 14 on 2 cores, one thread took the CPU mode's steps after the
    # imports from 29 s to 10 s wall (15 s to 4 s CPU).
    cpu_threads: int | None
    sweep_trials: int  # the mini-sweep: trials over the grid sweep_space, with sweep_sizes on top
    sweep_space: tuple[str, ...]
    sweep_sizes: tuple[str, ...]


_POS_ENC_SPACE = "model/pos_enc=choice(rope,alibi)"
GPU = Shapes(
    budget=_lm(256, 4, 8, 256, 50304), big=_lm(768, 12, 12, 1024, 50304), batch=64, big_batch=16,
    steps=30, warmup=3, decode_batches=(1, 8, 64), new_tokens=64, matmul_n=8192, copy_bytes=1 << 30,
    compile_backend="inductor", cpu_threads=None,
    sweep_trials=4, sweep_space=(_POS_ENC_SPACE, "model/norm=choice(layernorm,rmsnorm)"), sweep_sizes=(),
)  # fmt: skip
CPU = Shapes(
    budget=_lm(32, 1, 4, 16, 256), big=_lm(32, 2, 4, 16, 256), batch=2, big_batch=2,
    steps=1, warmup=1, decode_batches=(1, 8), new_tokens=2, matmul_n=128, copy_bytes=1 << 20,
    compile_backend="aot_eager", cpu_threads=1,
    sweep_trials=2, sweep_space=(_POS_ENC_SPACE,),
    # 12 steps: Throughput (pipeline/run/callbacks.py) starts its clock after 10 warm-up steps.
    sweep_sizes=(
        "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.context_length=16",
        "trainer.max_steps=12", "trainer.val_check_interval=12", "trainer.log_every_n_steps=4",
        "data.batch_size=2", "data.val_batches=1", "eval.factors=[1]", "eval.max_windows=1", "eval.bootstrap=0",
        "eval.decode.batch_sizes=[1]", "eval.decode.new_tokens=2", "eval.decode.repeats=1", "eval.decode.warmup=0",
    ),
)  # fmt: skip


@dataclass
class Context:
    device: torch.device
    shapes: Shapes
    out: Path
    cpu_mode: bool
    results: dict[str, Any] = field(default_factory=dict)
    sweep: Sweep | None = None  # the mini-sweep, when launched ahead of its step

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
    # Installed versions, read from the package metadata without importing (seconds saved);
    # the mini-sweep imports and uses them for real.
    for dist in ("hydra-core", "omegaconf", "optuna", "mlflow-skinny", "mlflow", "sqlalchemy", "datasets"):
        try:
            env[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # recorded, not fatal: the later steps say what breaks
            env[dist] = "missing"
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


def ceilings(ctx: Context) -> dict[str, float]:
    """Measured matmul FLOP/s (bf16 on CUDA, fp32 on the CPU) and device copy bandwidth."""
    n = ctx.shapes.matmul_n
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    s = time_steps(lambda: a @ b, 10, warmup=1, sync=ctx.sync).wall_s
    src = torch.empty(ctx.shapes.copy_bytes, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    c = time_steps(lambda: dst.copy_(src), 10, warmup=1, sync=ctx.sync).wall_s
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
    preset family (relative gradient error: ||g_bf16 - g_fp32|| / ||g_fp32||). For the MoE it
    includes routing: a token near a tie between experts may be routed apart under bf16."""
    sizes = ctx.shapes.budget
    out: dict[str, dict[str, float]] = {}
    # Seeded, so a rerun measures the same batch. Targets drawn apart from the inputs: with tied
    # embeddings an untrained model already scores its own input token above chance.
    gen = torch.Generator(ctx.device).manual_seed(0)
    shape, V = (ctx.shapes.batch, sizes["context_length"]), sizes["vocab_size"]
    x, y = (torch.randint(0, V, shape, device=ctx.device, generator=gen) for _ in range(2))
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
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
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


def _train_variant(ctx: Context, preset: str, sizes: dict[str, int], batch: int, variant: str) -> dict[str, Any]:
    """Step time of a plain training loop (bf16 autocast) in one of four variants:
    as_is (a host read of the loss every step, foreach AdamW, the MoE loop), sync_free,
    fused (sync-free + fused AdamW), compiled (fused + torch.compile, fullgraph; on the CPU with
    the aot_eager backend, Shapes.compile_backend)."""
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
    compiled = variant == "compiled"
    forward = torch.compile(model, fullgraph=True, backend=ctx.shapes.compile_backend) if compiled else model
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (4, batch, cfg.context_length + 1), generator=g).to(ctx.device)
    batches = itertools.cycle(range(4))

    def step() -> None:
        i = next(batches)
        x, y = data[i, :, :-1], data[i, :, 1:]
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            logits, aux = forward(x, return_aux=True)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()) + aux.get("moe_loss", 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if variant == "as_is" and not torch.isfinite(loss):  # what the module did every step
            raise FloatingPointError("non-finite loss")

    warmup = ctx.shapes.warmup + (2 if compiled else 0)
    s = time_steps(step, ctx.shapes.steps, warmup=warmup, sync=ctx.sync).wall_s
    tokens = batch * cfg.context_length
    flops = 3 * analytic_cost(cfg)["flops_per_token"] * tokens
    out: dict[str, Any] = {"step_ms": 1e3 * s, "tokens_per_s": tokens / s}
    if compiled:
        out["compile_backend"] = ctx.shapes.compile_backend
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


@dataclass
class Sweep:
    """The mini-sweep's process, started by `launch_sweep`, waited for by `mini_sweep`."""

    proc: subprocess.Popen
    folder: Path
    started: float


def launch_sweep(ctx: Context) -> Sweep:
    """Start the mini-sweep through the real CLI in a fresh folder (Optuna and MLflow stores)."""
    s = ctx.shapes
    args = [
        "-m",
        "budget=gpu" if ctx.device.type == "cuda" else "budget=cpu",
        "study=gpu_check",
        "hydra/sweeper=optuna",
        f"hydra.sweeper.n_trials={s.sweep_trials}",
        *s.sweep_space,
        "trainer.enable_progress_bar=false",
        "tracking.system_metrics=false",
        *s.sweep_sizes,
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # its own store, in its folder
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    if s.cpu_threads:
        env.update(OMP_NUM_THREADS=str(s.cpu_threads), MKL_NUM_THREADS=str(s.cpu_threads))
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-sweep-"))
    with open(folder / "stderr.log", "wb") as err:  # a file: a full pipe would block the sweep
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.train", *args],
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
    return Sweep(proc, folder, time.perf_counter())


def mini_sweep(ctx: Context) -> dict[str, Any]:
    """A grid (GPU: pos_enc x norm, 4 trials; CPU: pos_enc, 2) through the real CLI, Optuna and
    MLflow; every run finished, and evaluation ran on this device (the eval_device tag). The
    CPU mode launched it at the start, to run beside the other steps (see main)."""
    from mlflow import MlflowClient

    from pipeline.tracking.schema import Tag

    sweep, ctx.sweep = ctx.sweep or launch_sweep(ctx), None
    try:
        try:
            sweep.proc.wait(timeout=420)
        except subprocess.TimeoutExpired:
            sweep.proc.kill()
            sweep.proc.wait()
            raise
        seconds = time.perf_counter() - sweep.started
        if sweep.proc.returncode != 0:
            err = (sweep.folder / "stderr.log").read_text(errors="replace")
            raise RuntimeError(f"sweep exited {sweep.proc.returncode}: {err[-1500:]}")
        client = MlflowClient(f"sqlite:///{sweep.folder}/mlflow.db")
        exp = client.get_experiment_by_name("gpu_check")
        runs = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    finally:
        shutil.rmtree(sweep.folder, ignore_errors=True)
    n = ctx.shapes.sweep_trials
    if len(runs) != n or any(r.info.status != "FINISHED" for r in runs):
        raise RuntimeError(f"expected {n} finished trials, got {[r.info.status for r in runs]}")
    devices = {r.data.params.get("trainer.accelerator") for r in runs}
    evaluated = all("cost/decode_tokens_per_s" in r.data.metrics for r in runs)
    if not evaluated:
        raise RuntimeError("a trial logged no cost/decode_tokens_per_s: evaluation did not run")
    eval_devices = {r.data.tags.get(Tag.EVAL_DEVICE, "untagged") for r in runs}
    if not all(d.split(":")[0] == ctx.device.type for d in eval_devices):
        raise RuntimeError(f"evaluation ran on {sorted(eval_devices)}, not on {ctx.device.type}")
    return {
        "seconds": seconds,
        "trials_per_hour": n * 3600 / seconds,
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


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the mini-sweep): on a shared
    machine it says what a step costs better than wall time does."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _run_step(ctx: Context, name: str, fn: Callable[[Context], Any], cuda_only: bool) -> dict[str, Any]:
    """Run one step: pass / fail (with its traceback) / skip, its wall and CPU seconds."""
    t0, c0 = time.perf_counter(), _cpu_seconds()
    case: dict[str, Any] = {"name": name, "status": "pass", "error": ""}
    if cuda_only and ctx.device.type != "cuda":
        case.update(status="skip", error="needs CUDA")
    else:
        try:
            ctx.results[name] = fn(ctx)
        except Exception:  # recorded; the other steps still run
            case.update(status="fail", error=traceback.format_exc())
    case.update(seconds=time.perf_counter() - t0, cpu_seconds=_cpu_seconds() - c0)
    print(
        f"gpu_check: {name:18s} {case['status']:4s} {case['seconds']:7.1f} s ({case['cpu_seconds']:.1f} s CPU)",
        file=sys.stderr,
        flush=True,
    )
    return case


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
    steps = [step for step in STEPS if args.only is None or step[0] in args.only]
    threads = torch.get_num_threads()
    if ctx.shapes.cpu_threads:
        torch.set_num_threads(ctx.shapes.cpu_threads)
    if ctx.cpu_mode and any(name == "mini_sweep" for name, _, _ in steps):
        # The CPU mode's timings mean nothing: its sweep (a process) runs beside the other steps,
        # which halves the mode's wall time on two cores. On the GPU the steps run one at a time.
        ctx.sweep = launch_sweep(ctx)
    try:
        cases = [_run_step(ctx, name, fn, cuda_only) for name, fn, cuda_only in steps]
    finally:
        torch.set_num_threads(threads)
        if ctx.sweep is not None:  # launched, never waited for (interrupted)
            ctx.sweep.proc.kill()
            shutil.rmtree(ctx.sweep.folder, ignore_errors=True)
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "cpu" if args.cpu else "cuda",
        "load_average": os.getloadavg()[0],
        "steps": {c["name"]: {k: c[k] for k in ("status", "seconds", "cpu_seconds", "error")} for c in cases},
        "results": ctx.results,
    }
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    write_junit(args.out / "gpu_check.xml", cases)
    return 1 if any(c["status"] == "fail" for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
