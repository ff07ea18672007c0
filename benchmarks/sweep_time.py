"""A whole study timed, per-trial overhead, and the ALiBi ordering: issue 16's targets.

    make bench-sweep [STUDY=full_grid] [WORKERS=auto] [ARGS="..."]   # fresh folder under /tmp
    python -m benchmarks.sweep_time --dir DIR --analyze               # a finished study's numbers

Runs `make ablate`'s two commands (the sweep, then the report) in a fresh working folder with
the venv present, and times them. Then it reads the stores:
- per trial, the time outside training and evaluation: Optuna's span of the trial (claimed to
  told) minus the run's `train/seconds` and `eval/seconds` (start-up, data, MLflow, Optuna,
  plots); by ffn, since an MoE trial trains about twice as long as a dense one;
- the extrapolation ratio ppl_x4 / ppl_x1 per position encoding (median over its trials).
Targets: all within 25 minutes, overhead <= 1 s per trial, ALiBi's ratio < 1.25 and learned
positions' more than twice ALiBi's. The numbers go to stdout and to `bench.json` in the folder
(and to $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MINUTES_TARGET = 25.0
OVERHEAD_TARGET_S = 1.0
ALIBI_TARGET, LEARNED_OVER_ALIBI = 1.25, 2.0


def run(folder: Path, study: str, workers: str, extra: list[str]) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    sweep = [sys.executable, "-m", "pipeline.train", "-m", f"ablation={study}", f"hydra.sweeper.workers={workers}"]
    times = {}
    tic = time.perf_counter()
    with open(folder / "sweep.log", "w") as log:
        subprocess.run([*sweep, *extra], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    times["sweep_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    with open(folder / "report.log", "w") as log:
        report = [sys.executable, "-m", "pipeline.report", "--study", study]
        subprocess.run(report, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    times["report_s"] = time.perf_counter() - tic
    times["total_s"] = times["sweep_s"] + times["report_s"]
    return times


def analyze(folder: Path, study: str) -> dict[str, Any]:
    import optuna
    from mlflow import MlflowClient

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name=study, storage=f"sqlite:///{folder / 'optuna.db'}").trials
    span = {
        str(t.number): (t.datetime_complete - t.datetime_start).total_seconds()
        for t in trials
        if t.state == optuna.trial.TrialState.COMPLETE and t.datetime_start
    }
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=10000)
    overhead: dict[str, list[float]] = {}
    train: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    by_ffn: dict[str, list[float]] = {}  # "pos_enc/ffn": an arm that trains slower learns positions later
    for r in runs:
        m, tags = r.data.metrics, r.data.tags
        if tags.get("trial") in span and "train/seconds" in m:
            ffn = tags.get("ffn", "?")
            overhead.setdefault(ffn, []).append(span[tags["trial"]] - m["train/seconds"] - m.get("eval/seconds", 0.0))
            train.setdefault(ffn, []).append(m["train/seconds"])
        if "extrap/ppl_x4" in m and "extrap/ppl_x1" in m:
            ratio = m["extrap/ppl_x4"] / m["extrap/ppl_x1"]
            ratios.setdefault(tags.get("pos_enc", "?"), []).append(ratio)
            by_ffn.setdefault(f"{tags.get('pos_enc', '?')}/{tags.get('ffn', '?')}", []).append(ratio)
    every = [x for xs in overhead.values() for x in xs]
    out: dict[str, Any] = {
        "trials_complete": len(span),
        "trial_s_mean": statistics.mean(span.values()) if span else None,
        "overhead_s": {k: _stats(v) for k, v in {**overhead, "all": every}.items()},
        "train_s": {k: _stats(v) for k, v in train.items()},
        "ppl_x4_over_x1": {k: statistics.median(v) for k, v in sorted(ratios.items())},
        "ppl_x4_over_x1_by_ffn": {k: statistics.median(v) for k, v in sorted(by_ffn.items())},
    }
    return out


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "n": len(xs),
        "mean": statistics.mean(xs),
        "median": statistics.median(xs),
        "p90": xs[int(0.9 * (len(xs) - 1))],
        "max": xs[-1],
    }


def verdict(result: dict[str, Any]) -> list[str]:
    lines = []
    if "total_s" in result:
        minutes = result["total_s"] / 60
        met = _ok(minutes <= MINUTES_TARGET)
        lines.append(f"study + report: {minutes:.1f} min (target <= {MINUTES_TARGET:.0f}): {met}")
    over = result["overhead_s"].get("all")
    if over:
        lines.append(
            f"overhead per trial: mean {over['mean']:.2f} s, median {over['median']:.2f} s, max {over['max']:.2f} s "
            f"(target: median <= {OVERHEAD_TARGET_S:.0f} s; each worker's first trial pays its warm-up): "
            f"{_ok(over['median'] <= OVERHEAD_TARGET_S)}"
        )
    r = result["ppl_x4_over_x1"]
    if "alibi" in r and "learned" in r:
        lines.append(
            f"ppl_x4/ppl_x1: alibi {r['alibi']:.3f} (target < {ALIBI_TARGET}): {_ok(r['alibi'] < ALIBI_TARGET)}; "
            f"learned {r['learned']:.3f} = {r['learned'] / r['alibi']:.2f}x alibi "
            f"(target > {LEARNED_OVER_ALIBI}x): {_ok(r['learned'] > LEARNED_OVER_ALIBI * r['alibi'])}"
        )
    return lines


def _ok(met: bool) -> str:
    return "met" if met else "MISSED"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="full_grid")
    ap.add_argument("--workers", default="auto")
    ap.add_argument("--dir", type=Path, default=None, help="working folder (default: a fresh one under /tmp)")
    ap.add_argument("--analyze", action="store_true", help="only read the stores of a finished study in --dir")
    ap.add_argument("overrides", nargs="*", help="extra overrides for the sweep, e.g. levels.cpu.seeds='0,1'")
    args = ap.parse_args(argv)
    folder = args.dir or Path(tempfile.mkdtemp(prefix=f"sweep-{args.study}-"))
    folder.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"study": args.study, "workers": args.workers, "dir": str(folder)}
    result["load_average_before"] = os.getloadavg()[0]
    if not args.analyze:
        print(f"running {args.study} in {folder} (logs: sweep.log, report.log)", flush=True)
        result.update(run(folder, args.study, args.workers, args.overrides))
    result["load_average_after"] = os.getloadavg()[0]
    result.update(analyze(folder, args.study))
    lines = verdict(result)
    print(json.dumps(result, indent=2))
    print("\n".join(lines))
    (folder / "bench.json").write_text(json.dumps(result, indent=2))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"sweep_time_{args.study}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
