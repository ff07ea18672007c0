"""Trials per hour with 1, 2 and 4 worker slots on one GPU, at the GPU budget (bf16).

    python -m benchmarks.gpu_slots [--slots 1 2 4] [--window 100] [--out DIR] [override ...]

`make gpu-check` runs it after the gpu tests. A trial at the GPU budget is a few million
parameters, far from filling a large GPU, so several workers sharing one GPU may finish more
trials per hour; this measures how many. For each slot count S it runs the full grid with
`hydra.sweeper.workers=S` in a fresh folder, every worker pinned to the same (first visible)
GPU, for `--window` seconds counted from the first trial's start (imports and store creation
are one-off costs), then stops the sweep (Ctrl-C: trials in flight end interrupted). Trials
per hour = (trials finished in the window + for each trial cut off, its elapsed time over the
mean finished trial's duration) / window. About 3 x (window + 40 s): under 8 minutes with the
default window. Results: a table on stdout, and `gpu_slots.json` in --out (default $OUT).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hydra_plugins.pipeline_optuna_sweeper.workers import default_sigint, visible_gpus

STUDY = "gpu_slots"


def measure(slots: int, window: float, overrides: list[str], gpu: str | None) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = Path(tempfile.mkdtemp(prefix=f"gpu-slots-{slots}-"))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu  # every worker on this one GPU
    cmd = [sys.executable, "-m", "pipeline.train", "-m", "ablation=full_grid", f"study={STUDY}"]
    cmd += [f"hydra.sweeper.workers={slots}", *overrides]
    log = open(folder / "sweep.log", "w")
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=default_sigint)
    storage = f"sqlite:///{folder / 'optuna.db'}"
    first_start = None
    deadline = time.monotonic() + window + 300  # start-up is bounded too
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(1.0)
        if first_start is None:
            first_start = _first_start(storage)
            if first_start is not None:
                deadline = time.monotonic() + window - (dt.datetime.now() - first_start).total_seconds()
    end = dt.datetime.now()
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # the coordinator stops its workers
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    try:  # nothing of this run may outlive it (its workers)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    log.close()
    if first_start is None:
        return {"slots": slots, "error": f"no trial started; see {folder / 'sweep.log'}"}
    trials = optuna.load_study(study_name=STUDY, storage=storage).trials
    finished = [t for t in trials if t.datetime_complete and t.datetime_complete <= end and not _cut(t)]
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in finished]
    mean = statistics.mean(durations) if durations else None
    cut = [t for t in trials if t.datetime_start and t not in finished]
    partial = sum(min(1.0, (end - t.datetime_start).total_seconds() / mean) for t in cut) if mean else 0.0
    seconds = (end - first_start).total_seconds()
    return {
        "slots": slots,
        "window_s": round(seconds, 1),
        "finished": len(finished),
        "partial": round(partial, 2),
        "trial_s_mean": mean,
        "trials_per_hour": (len(finished) + partial) / seconds * 3600,
        "failed": sum(1 for t in finished if t.state.name == "FAIL"),
        "dir": str(folder),
    }


def _first_start(storage: str) -> dt.datetime | None:
    import optuna

    try:
        trials = optuna.load_study(study_name=STUDY, storage=storage).trials
    except Exception:  # the study does not exist yet
        return None
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    return min(starts) if starts else None


def _cut(t: Any) -> bool:
    return bool(t.user_attrs.get("interrupted"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--window", type=float, default=100.0, help="seconds of trials measured per slot count")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    ap.add_argument("overrides", nargs="*", help="extra sweep overrides (default budget: auto, so gpu with CUDA)")
    args = ap.parse_args(argv)
    gpus = visible_gpus()
    if not gpus:
        print("no CUDA device: measuring CPU workers instead (numbers are not the GPU budget's)")
    results = [measure(s, args.window, args.overrides, gpus[0] if gpus else None) for s in args.slots]
    base = next((r["trials_per_hour"] for r in results if "trials_per_hour" in r), None)
    print(f"{'slots':>5} {'trials/h':>9} {'vs 1':>6} {'finished':>8} {'mean trial s':>12}")
    for r in results:
        if "error" in r:
            print(f"{r['slots']:>5} {r['error']}")
            continue
        mean = f"{r['trial_s_mean']:.1f}" if r["trial_s_mean"] else "-"
        print(
            f"{r['slots']:>5} {r['trials_per_hour']:>9.1f} {r['trials_per_hour'] / (base or 1):>5.2f}x "
            f"{r['finished']:>8} {mean:>12}"
        )
    record = {"gpus": gpus, "results": results, "overrides": args.overrides}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_slots.json").write_text(json.dumps(record, indent=2))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
