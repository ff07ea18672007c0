"""Where a sweep trial's time goes outside training and evaluation, per part (issue 16).

    cd SCRATCH && PYTHONPATH=REPO python -m benchmarks.trial_overhead -m hydra/sweeper=optuna \
        hydra.sweeper.sampler=grid hydra.sweeper.validate=pipeline.run.spec.validate_config \
        hydra.sweeper.workers=2 study=oh 'model/pos_enc=choice(rope,alibi)' \
        'model/ffn=choice(gelu,swiglu)' 'model/norm=choice(layernorm,rmsnorm)' model/attention=gqa
    PYTHONPATH=REPO python -m benchmarks.trial_overhead --analyze spans [--per-trial]

As a sweep's entry point it wraps the functions a trial passes through (the sweeper's claim and
tell, Hydra's job, the runner's steps, MLflow's writes) in perf_counter spans, then runs
`pipeline.train.main`. The workers run the same entry point (they copy their coordinator's
command), so every worker process records its spans to `spans-<pid>.jsonl` in
$TRIAL_SPANS_DIR (default: ./spans). A trial is the span of `claim` (Optuna's start) to `tell`
(its end), the same span `benchmarks/sweep_time.py` reads from Optuna; `overhead` is that span
minus `fit` and `evaluate_run` (what `train/seconds` and `eval/seconds` time, within a few ms).
The table prints, per part, the mean ms per trial over the workers' trials. TRIAL_PROFILE=1
also writes a cProfile of each worker (`profile-<pid>.prof`) next to the spans.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

SPANS_ENV = "TRIAL_SPANS_DIR"

# (name in the table, "module:attribute path"); nested spans are fine, the table shows each.
SPANS: list[tuple[str, str]] = [
    ("claim", "hydra_plugins.pipeline_optuna_sweeper.sweeper:OptunaSweeper._claim"),
    ("claim.fail_stale", "hydra_plugins.pipeline_optuna_sweeper.heartbeat:fail_stale"),
    ("claim.optuna_claim", "hydra_plugins.pipeline_optuna_sweeper.study:claim"),
    ("claim.heartbeat_begin", "hydra_plugins.pipeline_optuna_sweeper.heartbeat:begin"),
    ("claim.check_point", "hydra_plugins.pipeline_optuna_sweeper.sweeper:check_point"),
    ("compose", "hydra._internal.config_loader_impl:ConfigLoaderImpl.load_sweep_config"),
    ("run", "hydra_plugins.pipeline_optuna_sweeper.sweeper:OptunaSweeper._run"),
    ("run.beating_enter", "hydra_plugins.pipeline_optuna_sweeper.heartbeat:Beating.__enter__"),
    ("run.beating_exit", "hydra_plugins.pipeline_optuna_sweeper.heartbeat:Beating.__exit__"),
    ("launch", "hydra._internal.core_plugins.basic_launcher:BasicLauncher.launch"),
    ("launch.configure_log", "hydra._internal.core_plugins.basic_launcher:configure_log"),
    ("job", "hydra._internal.core_plugins.basic_launcher:run_job"),
    ("job.on_job_start", "pipeline.tracking.sweep:MLflowSweepCallback.on_job_start"),
    ("job.on_job_end", "pipeline.tracking.sweep:MLflowSweepCallback.on_job_end"),
    ("job.save_config", "hydra.core.utils:_save_config"),
    ("task.validate", "pipeline.train:validate_config"),
    ("task.run", "pipeline.run.runner:run"),
    ("run.check_store", "pipeline.tracking.uri:check_store"),
    ("run.prepare_data", "pipeline.run.runner:prepare_data"),
    ("run.load_token_splits", "pipeline.data.datamodule:load_token_splits"),
    ("run.run_tags", "pipeline.run.runner:run_tags"),
    ("run.start_run", "pipeline.tracking.runs:start_run"),
    ("start.set_experiment", "mlflow:set_experiment"),
    ("start.ensure_experiment", "pipeline.tracking.runs:ensure_experiment"),
    ("start.mlflow_start_run", "mlflow:start_run"),
    ("start.set_user_attr", "optuna.trial:Trial.set_user_attr"),
    ("run.record_config", "pipeline.run.runner:record_config"),
    ("run.lightning_logger", "pipeline.tracking.runs:lightning_logger"),
    ("run.train", "pipeline.run.runner:train"),
    ("train.make_module", "pipeline.run.runner:make_module"),
    ("train.make_trainer", "pipeline.run.runner:make_trainer"),
    ("fit", "lightning.pytorch.trainer.trainer:Trainer.fit"),
    ("train.gc_collect", "gc:collect"),
    ("train.peak_flops", "pipeline.run.callbacks:peak_flops"),
    ("train.analytic_cost", "pipeline.evaluate.cost:analytic_cost"),
    ("run.evaluate", "pipeline.run.runner:evaluate"),
    ("evaluate_run", "pipeline.evaluate:evaluate_run"),
    ("run.record_loss_curves", "pipeline.run.runner:record_loss_curves"),
    ("loss_curves.plot", "pipeline.tracking.plots:plot_loss_curves"),
    ("loss_curves.metric_history", "mlflow.tracking.client:MlflowClient.get_metric_history"),
    ("savefig", "matplotlib.figure:Figure.savefig"),
    ("run.end_run", "pipeline.tracking.runs:end_run"),
    ("end.mlflow_end_run", "mlflow:end_run"),
    ("validate_config", "pipeline.run.spec:validate_config"),
    ("git_commit", "pipeline.tracking.runs:git_commit"),
    ("mlflow.log_artifact", "mlflow:log_artifact"),
    ("mlflow.log_text", "mlflow:log_text"),
    ("mlflow.log_metric", "mlflow:log_metric"),
    ("mlflow.log_metrics", "mlflow:log_metrics"),
    ("mlflow.log_params", "mlflow:log_params"),
    ("mlflow.set_tag", "mlflow:set_tag"),
    ("mlflow.flush_async", "mlflow:flush_async_logging"),
    ("tell", "hydra_plugins.pipeline_optuna_sweeper.sweeper:OptunaSweeper._tell"),
]

_records: list[dict[str, Any]] = []


def _wrap(name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _records.append({"name": name, "t0": t0, "t1": time.perf_counter()})

    return timed


def install() -> None:
    """Wrap every function of SPANS that exists in this version of the code. After Hydra's
    plugin scan, which executes the plugin modules again (new classes, unwrapped)."""
    from hydra.core.plugins import Plugins

    Plugins.instance()
    for name, target in SPANS:
        module_name, path = target.split(":")
        try:
            owner: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        *parents, attr = path.split(".")
        for p in parents:
            owner = getattr(owner, p, None)
        if owner is None or not hasattr(owner, attr):
            continue
        setattr(owner, attr, _wrap(name, getattr(owner, attr)))


def _dump() -> None:
    folder = Path(os.environ.get(SPANS_ENV, "spans"))
    folder.mkdir(parents=True, exist_ok=True)
    worker = os.environ.get("PIPELINE_SWEEP_WORKER")
    with open(folder / f"spans-{os.getpid()}.jsonl", "w") as f:
        for r in _records:
            f.write(json.dumps({**r, "worker": worker}) + "\n")


def trials(records: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per trial of one process: seconds per part, `span` (claim's start to tell's end) and
    `overhead` (span minus fit and evaluate_run)."""
    claims = sorted((r for r in records if r["name"] == "claim"), key=lambda r: r["t0"])
    tells = sorted((r for r in records if r["name"] == "tell"), key=lambda r: r["t1"])
    out = []
    for tell in tells:
        start = max((c["t0"] for c in claims if c["t0"] < tell["t1"]), default=None)
        if start is None:
            continue
        parts: dict[str, float] = defaultdict(float)
        for r in records:
            if start <= r["t0"] and r["t1"] <= tell["t1"]:
                parts[r["name"]] += r["t1"] - r["t0"]
        span = tell["t1"] - start
        parts["span"] = span
        parts["overhead"] = span - parts.get("fit", 0.0) - parts.get("evaluate_run", 0.0)
        out.append(dict(parts))
    return out


def analyze(folder: Path, per_trial: bool = False) -> dict[str, Any]:
    every: list[dict[str, float]] = []
    for path in sorted(folder.glob("spans-*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if records and records[0].get("worker") is not None:  # the coordinator runs no trial
            every.extend(trials(records))
    names = [n for n, _ in SPANS if any(n in t for t in every)] + ["span", "overhead"]
    table = {n: [t.get(n, 0.0) * 1000 for t in every] for n in names}
    overhead = sorted(t["overhead"] for t in every)
    return {
        "trials": len(every),
        **({"per_trial_ms": [{n: round(t[n] * 1000) for n in names if n in t} for t in every]} if per_trial else {}),
        "ms_per_trial_mean": {n: round(statistics.mean(v), 1) for n, v in table.items() if v},
        "overhead_s": {
            "mean": statistics.mean(overhead),
            "median": statistics.median(overhead),
            "max": overhead[-1],
            "all": [round(x, 3) for x in overhead],
        }
        if overhead
        else {},
    }


def main() -> int:
    if sys.argv[1:2] == ["--analyze"]:
        result = analyze(Path(sys.argv[2]), per_trial="--per-trial" in sys.argv)
        print(json.dumps(result, indent=2))
        return 0
    install()
    atexit.register(_dump)
    if os.environ.get("TRIAL_PROFILE") and os.environ.get("PIPELINE_SWEEP_WORKER"):  # cProfile a worker too
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
        folder = Path(os.environ.get(SPANS_ENV, "spans"))
        atexit.register(lambda: (profile.disable(), profile.dump_stats(folder / f"profile-{os.getpid()}.prof")))
    from pipeline.train import main as train_main

    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
