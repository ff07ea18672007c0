"""Log a small synthetic study into a real MLflow store with the schema of pipeline.tracking.schema.

Values are made up but the layout is the training code's: a parent run tagged sweep=true,
child runs with component tags, dotted params, curves with steps, extrap/cost/moe metrics; a
failed run (FAILED + failure_reason) and a pruned one (KILLED + pruned=true).
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

STEPS = (10, 20, 30, 40)
BATCH, CONTEXT = 8, 32
FACTORS = (1, 2, 4, 8)
FAILURE = "ConfigError: model.n_heads=3 must divide model.d_model=64"


@dataclass
class Logged:
    experiment_id: str
    parent_id: str | None
    # run id -> (levels, seed, final metrics, wall seconds)
    runs: dict[str, tuple[dict[str, str], int, dict[str, float], float]] = field(default_factory=dict)
    failed_id: str = ""
    pruned_id: str = ""


def final_loss(levels: dict[str, str], seed: int, d_model: int = 64) -> float:
    """Additive effects plus an interaction, a seed block (the seed's batches shift every
    configuration alike) and a little run noise (fixed by levels and seed), so every effect is known."""
    loss = 2.0 - 0.2 * (levels["pos_enc"] == "rope") - 0.1 * (levels["ffn"] == "moe")
    loss -= 0.08 * (levels["pos_enc"] == "rope" and levels["ffn"] == "moe")
    noise = 0.004 * ((zlib.crc32(f"{sorted(levels.items())}/{seed}/{d_model}".encode()) % 7) - 3) / 3
    return loss - 0.3 * math.log2(d_model / 64) + (0.01 if seed == 1 else -0.01) + noise


def _metrics(key: str, values, steps, t0: int) -> list[Metric]:
    return [Metric(key, float(v), t0 + i, int(s)) for i, (s, v) in enumerate(zip(steps, values))]


def log_run(
    client: MlflowClient,
    exp_id: str,
    parent_id: str | None,
    study: str,
    levels: dict[str, str],
    seed: int,
    d_model: int = 64,
    status: str = "FINISHED",
    last_step: int = STEPS[-1],
    loss_of_compute: Callable[[dict, float], float] | None = None,
    extra_tags: dict[str, str] | None = None,
    shift: float = 0.0,
    extra_metrics: dict[str, float] | None = None,
) -> tuple[str, dict[str, float], float]:
    """One run; `shift` moves its final val loss (a rerun that disagrees, a newer duplicate)."""
    start = int(time.time() * 1000) - 100_000
    wall = 30.0 + 5 * (levels["ffn"] == "moe") + seed
    tags = {**levels, "study": study, "seed": str(seed), "git_commit": "abc123", "preset": "", **(extra_tags or {})}
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    run = client.create_run(
        exp_id, start_time=start, tags=tags, run_name="-".join(levels.values()) + f"-d{d_model}-s{seed}"
    )
    rid = run.info.run_id
    n_kv = {"mha": "4", "gqa": "2", "mqa": "1"}[levels["attention"]]
    params = {
        "seed": seed,
        "study": study,
        "model.d_model": d_model,
        "model.n_layers": 2,
        "model.n_heads": 4,
        "model.context_length": CONTEXT,
        "model.vocab_size": 256,
        "model.pos_enc.name": levels["pos_enc"],
        "model.norm.name": levels["norm"],
        "model.placement": "pre",
        "model.attention.name": levels["attention"],
        "model.attention.n_kv_heads": n_kv,
        "model.ffn.name": levels["ffn"],
        "optimizer.lr": 3e-3,
        "trainer.max_steps": STEPS[-1],
        "data.batch_size": BATCH,
        "data.tokenizer": "byte",
        "tracking.run_name": f"run-{seed}",
        "tracking.uri": "None",
    }
    if levels["pos_enc"] == "rope":
        params["model.pos_enc.theta"] = 10000.0
    if levels["ffn"] == "moe":
        params.update({"model.ffn.n_experts": 4, "model.ffn.top_k": 2})
    n_params = 100_000 * (d_model // 64) ** 2 + 12_345
    active = n_params // 2 if levels["ffn"] == "moe" else n_params
    compute = 6.0 * active * STEPS[-1] * BATCH * CONTEXT
    final = shift + (loss_of_compute(levels, compute) if loss_of_compute else final_loss(levels, seed, d_model))
    steps = [s for s in STEPS if s <= last_step]
    curve = [final + 0.5 * (STEPS[-1] - s) / STEPS[-1] for s in steps]
    t0 = start + 1000
    metrics = (
        _metrics("val/loss", curve, steps, t0)
        + _metrics("val/ppl", map(math.exp, curve), steps, t0)
        + _metrics("train/loss", [c + 0.05 for c in curve], steps, t0)
        + _metrics("train/tokens_seen", [s * BATCH * CONTEXT for s in steps], steps, t0)
    )
    finals = {"val/loss": final, "val/ppl": math.exp(final), **(extra_metrics or {})}
    if status == "FINISHED":
        finals.update(
            {
                **{
                    f"extrap/ppl_x{f}": math.exp(final) * (1 + (f - 1) * (0.02 if levels["pos_enc"] == "rope" else 0.5))
                    for f in FACTORS
                },
                "cost/params_total": n_params,
                "cost/params_active": active,
                "cost/flops_per_token": 6.0 * active,
                "cost/kv_bytes_per_token": 2 * 2 * int(n_kv) * 16 * 2,
                "cost/decode_tokens_per_s": 1000.0 + 100 * seed - 300 * (levels["ffn"] == "moe"),
                "cost/prefill_tokens_per_s": 20000.0,
                "cost/peak_mem_bytes": 1e8,
                "cost/train_tokens_per_s": 5000.0 + 10 * seed,
            }
        )
        if levels["ffn"] == "moe":
            for layer, e in product(range(2), range(4)):
                finals[f"moe/load/l{layer}/e{e}"] = [0.4, 0.3, 0.2, 0.1][e] if layer == 0 else 0.25
            finals.update({"moe/balance": 1.1, "moe/z": 0.5})
        metrics += [
            Metric(k, float(v), t0 + 99, STEPS[-1]) for k, v in finals.items() if k not in ("val/loss", "val/ppl")
        ]
    client.log_batch(rid, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    if status == "KILLED":
        client.set_tag(rid, "pruned", "true")
    if status == "FAILED":
        client.set_tag(rid, "failure_reason", FAILURE)
    client.set_terminated(rid, status=status, end_time=start + int(wall * 1000))
    return rid, finals, wall


def log_grid(
    uri: str,
    artifact_root: str,
    study: str,
    pos_enc=("learned", "rope"),
    ffn=("gelu", "moe"),
    seeds=(0, 1),
    sizes=(64,),
    failures: bool = True,
    parent: bool = True,
    loss_of_compute=None,
) -> Logged:
    """pos_enc x ffn (x sizes) x seeds, attention=mha, norm=layernorm; plus a failed and a
    pruned trial when `failures`."""
    client = MlflowClient(uri)
    exp_id = client.create_experiment(study, artifact_location=f"{artifact_root}/{study}")
    parent_id = None
    if parent:
        parent_id = client.create_run(
            exp_id, run_name=f"sweep-{study}", tags={"sweep": "true", "study": study}
        ).info.run_id
    out = Logged(exp_id, parent_id)
    for p, f, d, s in product(pos_enc, ffn, sizes, seeds):
        levels = {"pos_enc": p, "norm": "layernorm", "attention": "mha", "ffn": f}
        rid, finals, wall = log_run(client, exp_id, parent_id, study, levels, s, d, loss_of_compute=loss_of_compute)
        out.runs[rid] = (levels, s, finals, wall)
    if failures:
        levels = {"pos_enc": "rope", "norm": "rmsnorm", "attention": "gqa", "ffn": "gelu"}
        out.failed_id = log_run(client, exp_id, parent_id, study, levels, 0, status="FAILED", last_step=0)[0]
        out.pruned_id = log_run(client, exp_id, parent_id, study, levels, 1, status="KILLED", last_step=20)[0]
    if parent_id:
        client.set_terminated(parent_id)
    return out
