"""How many sweep workers on a CPU, with how many threads each: measured on this machine.

A small model (the CPU budget: d_model 64, context 64) splits poorly across threads: each
matrix product is too small to share out, so threads spend their time waiting on each other,
while separate processes do not share anything. Issue 16 measured it on 2 cores: two 1-thread
processes trained gpt2 1.66x (llama 1.3x) faster in total than one 2-thread process.

`cpu_layout` finds it on the machine at hand, for the study's own model: for every layout
`workers x threads = cores` (1 x 2 and 2 x 1 on 2 cores), that many processes train the model
at the same time for a few seconds (fwd + bwd + AdamW, as in a trial); the layout with the most
tokens per second in total wins. A layout with more workers must beat one with fewer by 5%,
since each worker holds its own copy of the libraries in memory. Workers are also capped by
memory (about 1 GiB each). The result is cached in `.cache/worker_layout.json` per machine,
torch version and model shape, so the measurement (about 10 s on 2 cores) runs once.

    python -m pipeline.run.layout                  # measure now for the CPU budget's gpt2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

CACHE = Path(".cache") / "worker_layout.json"
MARGIN = 1.05  # more workers must be this much faster to be chosen
WORKER_MEMORY = 1 << 30  # bytes one worker process needs (torch, Lightning, MLflow, a small model)


def candidates(cpus: int, memory: int | None = None) -> list[tuple[int, int]]:
    """(workers, threads) with workers x threads = cpus, fewest workers first, capped by memory."""
    cap = cpus if memory is None else max(1, min(cpus, memory // WORKER_MEMORY))
    return [(w, cpus // w) for w in range(1, cpus + 1) if cpus % w == 0 and w <= cap]


def choose(measured: dict[tuple[int, int], float]) -> tuple[int, int]:
    """The layout with the most tokens/s, preferring fewer workers unless MARGIN faster."""
    best = None
    for layout in sorted(measured):
        if best is None or measured[layout] > MARGIN * measured[best]:
            best = layout
    assert best is not None
    return best


def cpu_layout(cfg: DictConfig, cpus: int) -> tuple[int, int]:
    """The sweeper's `calibrate` hook: the fastest (workers, threads) for the study's model."""
    from pipeline.run.spec import validate_config

    spec = validate_config(cfg)
    model = spec.model.to_dict()
    if str(OmegaConf.select(cfg, "data.tokenizer", default="byte")) == "byte":
        model["vocab_size"] = 256
    return measure_layout(model, spec.batch_size, cpus)


def measure_layout(model: dict[str, Any], batch_size: int, cpus: int, seconds: float = 3.0) -> tuple[int, int]:
    import psutil
    import torch

    layouts = candidates(cpus, psutil.virtual_memory().available)
    if len(layouts) == 1:
        return layouts[0]
    key = hashlib.sha256(
        json.dumps([_cpu_name(), cpus, torch.__version__, model, batch_size], sort_keys=True).encode()
    ).hexdigest()[:16]
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    if key in cache:
        hit = cache[key]
        log.info(
            "worker layout from %s: %d x %d threads (%s)", CACHE, hit["workers"], hit["threads"], hit["tokens_per_s"]
        )
        return hit["workers"], hit["threads"]
    measured = {layout: _run_layout(*layout, model, batch_size, seconds) for layout in layouts}
    workers, threads = choose(measured)
    shown = ", ".join(f"{w}x{t}: {v / 1e3:.1f}k" for (w, t), v in measured.items())
    log.info("worker layout measured (tokens/s in total, workers x threads): %s -> %d x %d", shown, workers, threads)
    cache[key] = {
        "workers": workers,
        "threads": threads,
        "tokens_per_s": {f"{w}x{t}": round(v) for (w, t), v in measured.items()},
        "cpu": _cpu_name(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "load_average": os.getloadavg()[0],
    }
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    CACHE.write_text(json.dumps(cache, indent=2))
    return workers, threads


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run_layout(workers: int, threads: int, model: dict[str, Any], batch_size: int, seconds: float) -> float:
    """Total tokens/s of `workers` processes with `threads` threads each, timed together: each
    warms up, says ready, and starts its clock when all are ready."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    args = [json.dumps(model), str(batch_size), str(threads), str(seconds)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline.run.layout", "--bench", *args],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"layout benchmark {workers}x{threads} did not start")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        return sum(float(p.stdout.readline()) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _bench(model: dict[str, Any], batch_size: int, threads: int, seconds: float) -> None:
    """One benchmark process: warm up, print `ready`, wait for `go`, print tokens/s."""
    import torch
    import torch.nn.functional as F

    from pipeline.model import DecoderLM, ModelConfig

    torch.set_num_threads(threads)
    cfg = ModelConfig.from_dict(model)
    net = DecoderLM(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.context_length + 1))

    def step() -> None:
        logits = net(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    print("ready", flush=True)
    sys.stdin.readline()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    print(steps * batch_size * cfg.context_length / (time.perf_counter() - t0), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.run.layout", description=__doc__.split("\n")[0])
    ap.add_argument("--bench", nargs=4, metavar=("MODEL_JSON", "BATCH", "THREADS", "SECONDS"), help=argparse.SUPPRESS)
    ap.add_argument("--cpus", type=int, default=None, help="cores to lay out (default: those this process may use)")
    ap.add_argument("--fresh", action="store_true", help=f"measure again (deletes {CACHE})")
    args = ap.parse_args(argv)
    if args.bench:
        model, batch, threads, seconds = args.bench
        _bench(json.loads(model), int(batch), int(threads), float(seconds))
        return 0
    from hydra import compose, initialize_config_dir

    from hydra_plugins.pipeline_optuna_sweeper.workers import usable_cpus
    from pipeline import CONF_DIR

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["budget=cpu"])
    if args.fresh:
        CACHE.unlink(missing_ok=True)
    workers, threads = cpu_layout(cfg, args.cpus or usable_cpus())
    print(f"{workers} workers x {threads} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
