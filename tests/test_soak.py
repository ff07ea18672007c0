"""Soak (slow): a 12-trial grid run by two workers on one Optuna study, one SIGKILLed in the
middle and restarted. Ends with every point COMPLETE exactly once, every child run of a complete
trial FINISHED with its full metrics, and the report built. Prints its timings."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from tests.helpers.cli import count, sweep_env, tiny

POS = ["learned", "rope", "alibi", "nope"]
ATT = ["mha", "gqa", "mqa"]
ARGS = [
    "hydra/sweeper=optuna",
    f"model/pos_enc=choice({','.join(POS)})",
    f"model/attention=choice({','.join(ATT)})",
    "study=soak",
    "budget=cpu",
    *tiny(60, 30),
    "eval.factors=[1,2]",
    "eval.decode.batch_sizes=[1]",
    "eval.decode.repeats=1",
]
METRICS = {"train/loss", "val/loss", "val/ppl", "extrap/ppl_x1", "extrap/ppl_x2", "cost/params_total"}


@pytest.mark.slow
def test_two_workers_one_killed_and_restarted_finish_the_grid_once(tmp_path):
    env = sweep_env(tmp_path)
    command = [sys.executable, "-m", "pipeline.train", "-m", *ARGS]

    def worker(name: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115  (closed with the process)
        return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)

    t0 = time.time()
    a, b = worker("a"), worker("b")
    while count(tmp_path / "optuna.db", "SELECT count(*) FROM trials WHERE state = 'COMPLETE'") < 4:
        assert a.poll() is None, (tmp_path / "a.log").read_text()[-3000:]
        assert time.time() - t0 < 1500
        time.sleep(0.5)
    a.send_signal(signal.SIGKILL)
    a.wait()
    killed_at = time.time() - t0
    a2 = worker("a2")
    rc = [b.wait(timeout=1800), a2.wait(timeout=1800)]
    sweep_s = time.time() - t0

    study = optuna.load_study(study_name="soak", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    complete = [
        (t.params["model/pos_enc"], t.params["model/attention"]) for t in study.trials if t.state == TrialState.COMPLETE
    ]
    running = [t.number for t in study.trials if t.state == TrialState.RUNNING]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("soak")
    children = [r for r in client.search_runs([exp.experiment_id], max_results=1000) if "trial" in r.data.tags]
    finished = [r for r in children if r.info.status == "FINISHED"]
    tic = time.time()
    report = subprocess.run(
        [sys.executable, "-m", "pipeline.report", "--study", "soak"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    report_s = time.time() - tic
    print(
        f"\nsoak: sweep {sweep_s:.0f} s (worker a SIGKILLed at {killed_at:.0f} s), report {report_s:.0f} s; "
        f"trials {len(study.trials)} ({len(complete)} complete), child runs {len(children)} "
        f"({len(finished)} finished), exit codes {rc}"
    )
    assert sorted(complete) == sorted(itertools.product(POS, ATT))  # every point, once
    assert running == []
    assert sorted((r.data.tags["pos_enc"], r.data.tags["attention"]) for r in finished) == sorted(complete)
    for r in finished:
        assert METRICS <= set(r.data.metrics), (r.info.run_id, METRICS - set(r.data.metrics))
    assert not [r for r in children if r.info.status == "RUNNING"]
    assert report.returncode == 0, report.stderr[-3000:]
    assert (tmp_path / "reports" / "soak" / "report.md").exists()
