"""The Optuna sweeper plugin (hydra/sweeper=optuna) and the sweep glue (pipeline.tracking.sweep).

Plugin behaviour is tested on a toy app (tests/helpers/sweeper_app) in a subprocess; the pipeline
tests run `python -m pipeline.train -m` with a tiny model and a few steps, against real
SQLite stores in tmp_path: Optuna trials and MLflow parent/child runs.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.pipeline_optuna_sweeper import search_space
from hydra_plugins.pipeline_optuna_sweeper import study as study_lib
from tests.helpers.cli import count, seed_tokens, sweep_env, tiny

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "helpers" / "sweeper_app" / "app.py"
# The smallest run that trains, validates twice and logs to MLflow.
TRIAL = ["budget=cpu", *tiny(4, 2), "eval.enabled=false"]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _toy(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(APP), "-m", "hydra/sweeper=optuna", *args],
        cwd=tmp_path,
        env=sweep_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    seed_tokens(tmp_path)
    return subprocess.run(
        [sys.executable, "-m", "pipeline.train", "-m", *args, *TRIAL],
        cwd=tmp_path,
        env=sweep_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _study(tmp_path: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def _runs(tmp_path: Path, study: str):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def _assert_grid_finished(tmp_path: Path, study: str, pos_encs: tuple[str, ...], norms: tuple[str, ...]):
    """Every point of a pos_enc x norm grid COMPLETE once in Optuna, and FINISHED once as a
    child of one FINISHED parent run in MLflow; returns the trials and the child runs."""
    n = len(pos_encs) * len(norms)
    trials = _study(tmp_path, study).trials
    assert len(trials) == n and all(t.state == TrialState.COMPLETE for t in trials)
    (parent,), children = _runs(tmp_path, study)
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/complete"] == n
    assert sorted(c.info.status for c in children) == ["FINISHED"] * n
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted((c.data.tags["pos_enc"], c.data.tags["norm"]) for c in children) == sorted(
        (p, m) for p in pos_encs for m in norms
    )
    return trials, children


def _results(tmp_path: Path) -> list[str]:
    f = tmp_path / "results.txt"
    return f.read_text().splitlines() if f.exists() else []


# -- search space ---------------------------------------------------------------------------


def test_overrides_become_distributions_and_back():
    space = search_space.parse(
        [
            "model/pos_enc=choice(rope,alibi)",
            "seed=0,1",
            "n=range(2,8,2)",
            "optimizer.lr=tag(log, interval(1e-4, 1e-2))",
            "warmup=tag(int, interval(0, 100))",
            "trainer.max_steps=300",
        ],
        OverridesParser.create(),
    )
    dims = {d.name: d for d in space.dimensions}
    assert dims["model/pos_enc"].distribution == CategoricalDistribution(["rope", "alibi"])
    assert dims["seed"].grid == [0, 1]
    assert dims["n"].grid == [2, 4, 6] and dims["n"].distribution == IntDistribution(2, 6, step=2)
    assert dims["optimizer.lr"].distribution == FloatDistribution(1e-4, 1e-2, log=True)
    assert dims["warmup"].distribution == IntDistribution(0, 100)
    assert space.fixed == ["trainer.max_steps=300"]
    assert not space.is_discrete
    with pytest.raises(search_space.SearchSpaceError, match="optimizer.lr"):
        space.grid()
    assert space.overrides({"model/pos_enc": "rope", "optimizer.lr": 0.001}) == [
        "model/pos_enc=rope",
        "optimizer.lr=0.001",
        "trainer.max_steps=300",
    ]
    with pytest.raises(search_space.SearchSpaceError, match="unsupported tags"):
        search_space.parse(["x=tag(sqrt, interval(0, 1))"], OverridesParser.create())


def test_command_line_wins_over_params_on_the_same_key():
    space = search_space.parse(["seed=0,1", "seed=choice(5,6,7)"], OverridesParser.create())
    assert [d.grid for d in space.dimensions] == [[5, 6, 7]]


def test_a_dead_workers_running_trial_is_failed_and_retried_on_the_same_grid_point(tmp_path):
    space = search_space.parse(["a=choice(1,2,3)"], OverridesParser.create())
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'o.db'}", sampler=study_lib.make_sampler("grid", None, {}, space)
    )
    done = study.ask()
    space.suggest(done)
    study.tell(done, 1.0)
    orphan = study.ask()
    params = space.suggest(orphan)
    dead = subprocess.Popen(["true"])
    dead.wait()
    study._storage.set_trial_system_attr(
        orphan._trial_id, "worker", f"{study_lib.worker().rpartition(':')[0]}:{dead.pid}"
    )
    live = study.ask()  # this process: alive, so left alone
    study._storage.set_trial_system_attr(live._trial_id, "worker", study_lib.worker())

    study_lib.recover(study, retry_failed=False)
    trials = study.get_trials()
    assert trials[orphan.number].state == TrialState.FAIL
    assert trials[orphan.number].user_attrs["interrupted"] is True
    assert trials[live.number].state == TrialState.RUNNING
    (retry,) = [t for t in trials if t.state == TrialState.WAITING]
    assert retry.system_attrs["retry_of"] == orphan.number
    assert retry.system_attrs["grid_id"] == trials[orphan.number].system_attrs["grid_id"]
    assert study.ask().params == params  # the retry is asked first, with the same point
    assert study_lib.counts(study)["interrupted"] == 0  # the retry supersedes it
    study_lib.recover(study, retry_failed=False)  # no second retry of the same trial
    assert len(study.get_trials()) == len(trials)


# -- the plugin on a toy app ----------------------------------------------------------------


def test_grid_runs_every_point_once_and_a_rerun_resumes_without_rerunning(tmp_path):
    args = ["opt=a,b", "x=choice(0,2)"]
    first = _toy(tmp_path, *args)
    assert first.returncode == 0, first.stderr
    trials = _study(tmp_path, "toy").trials
    points = {(t.params["opt"], t.params["x"]) for t in trials}
    assert points == set(itertools.product("ab", [0, 2]))
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert "trial 3 (4 of 4) complete" in first.stdout  # the progress line
    # A finished study: the same command launches nothing.
    second = _toy(tmp_path, *args)
    assert second.returncode == 0, second.stderr
    assert len(_study(tmp_path, "toy").trials) == 4 and len(_results(tmp_path)) == 4


def test_failed_and_invalid_trials_do_not_stop_the_sweep(tmp_path):
    r = _toy(tmp_path, "x=choice(-1,2)", "fail=choice(false,true)", "hydra.sweeper.validate=app.validate")
    assert r.returncode != 0 and "1 of 4 trials failed" in r.stderr
    by_point = {(t.params["x"], t.params["fail"]): t for t in _study(tmp_path, "toy").trials}
    assert by_point[(2, False)].state == TrialState.COMPLETE
    assert by_point[(2, True)].state == TrialState.FAIL
    assert by_point[(2, True)].user_attrs["fail_reason"] == "RuntimeError: asked to fail"
    for fail in (False, True):  # invalid from the config alone: never launched
        skipped = by_point[(-1, fail)]
        assert skipped.state == TrialState.FAIL and "x=-1: must be >= 0" in skipped.user_attrs["skipped"]
    assert _results(tmp_path) == ["2 a"]
    summary = json.loads(next(tmp_path.glob("multirun/optuna_summary.json")).read_text())
    assert summary["counts"] == {"complete": 1, "pruned": 0, "failed": 1, "skipped": 2}


def test_a_sweep_whose_every_point_is_skipped_fails(tmp_path):
    """A typo that invalidates every point is a broken command, not an empty result."""
    r = _toy(tmp_path, "x=choice(-1,-2)", "hydra.sweeper.validate=app.validate")
    assert r.returncode != 0 and "all 2 points were skipped" in r.stderr
    assert _results(tmp_path) == []


def test_median_pruner_stops_a_trial_behind_the_others(tmp_path):
    r = _toy(
        tmp_path, "x=choice(2,2.5,9)", "hydra.sweeper.pruner=median", "++hydra.sweeper.pruner_kwargs.n_startup_trials=2"
    )
    assert r.returncode == 0, r.stderr
    states = {t.params["x"]: t.state for t in _study(tmp_path, "toy").trials}
    assert states == {2: TrialState.COMPLETE, 2.5: TrialState.COMPLETE, 9: TrialState.PRUNED}


def test_tpe_per_value_runs_one_study_each(tmp_path):
    r = _toy(
        tmp_path,
        "x=interval(0,4)",
        "opt=a,b",
        "hydra.sweeper.per=[opt]",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.seed=0",
    )
    assert r.returncode == 0, r.stderr
    for opt in "ab":
        study = _study(tmp_path, f"toy/opt={opt}")
        assert len(study.trials) == 3 and all(0 <= t.params["x"] <= 4 for t in study.trials)
        assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert sorted(line.split()[1] for line in _results(tmp_path)) == ["a"] * 3 + ["b"] * 3


# -- the pipeline: MLflow parent and children -----------------------------------------------


def _count(db: Path, state: str) -> int:
    return count(db, "SELECT count(*) FROM trials WHERE state = ?", state)


def test_sigkilled_sweep_resumes_to_one_finished_run_per_point(tmp_path):
    args = [
        "hydra/sweeper=optuna",
        "model/pos_enc=choice(rope,alibi)",
        "model/norm=choice(layernorm,rmsnorm)",
        "study=kill",
    ]
    seed_tokens(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "-m", *args, *TRIAL],
        cwd=tmp_path,
        env=sweep_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    db, deadline = tmp_path / "optuna.db", time.time() + 400
    open_runs = "SELECT count(*) FROM runs WHERE status = 'RUNNING'"
    # A trial is done and the next one's MLflow run is open (beside the sweep's parent run): the
    # kill lands inside a run, however short a trial is on this machine (a fixed sleep could
    # outlast the whole sweep once the per-trial overhead was cut).
    while not (_count(db, "COMPLETE") >= 1 and count(tmp_path / "mlflow.db", open_runs) >= 2):
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before it was killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    r = _train(tmp_path, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    trials = _study(tmp_path, "kill").trials
    complete = [(t.params["model/pos_enc"], t.params["model/norm"]) for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(complete) == sorted(itertools.product(["rope", "alibi"], ["layernorm", "rmsnorm"]))
    assert any(t.user_attrs.get("interrupted") for t in trials)
    assert not [t for t in trials if t.state == TrialState.RUNNING]

    parents, children = _runs(tmp_path, "kill")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # resumed, not a second one
    assert parents[0].data.metrics["sweep/complete"] == 4
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    finished = [(c.data.tags["pos_enc"], c.data.tags["norm"]) for c in children if c.info.status == "FINISHED"]
    assert sorted(finished) == sorted(complete)
    trial_tags = {c.data.tags["trial"] for c in children if c.info.status == "FINISHED"}
    assert trial_tags == {str(t.number) for t in trials if t.state == TrialState.COMPLETE}
    assert not [c for c in children if c.info.status == "RUNNING"]


def test_pipeline_trial_failures_and_invalid_points(tmp_path):
    """n_kv_heads=3 does not divide n_heads=2: skipped before any model is built;
    accelerator=tpu fails inside the run: FAILED in MLflow with the reason, FAIL in Optuna."""
    r = _train(
        tmp_path,
        "hydra/sweeper=optuna",
        "model/attention=gqa",
        "study=fails",
        "model.attention.n_kv_heads=choice(1,3)",
        "trainer.accelerator=choice(cpu,tpu)",
        "hydra.sweeper.validate=pipeline.run.spec.validate_config",
    )
    assert r.returncode != 0 and "1 of 4 trials failed" in r.stderr
    trials = {
        (t.params["model.attention.n_kv_heads"], t.params["trainer.accelerator"]): t
        for t in _study(tmp_path, "fails").trials
    }
    assert trials[(1, "cpu")].state == TrialState.COMPLETE
    assert "xla" in trials[(1, "tpu")].user_attrs["fail_reason"]  # no TPU runtime here
    for acc in ("cpu", "tpu"):
        assert "n_kv_heads" in trials[(3, acc)].user_attrs["skipped"]
    parents, children = _runs(tmp_path, "fails")
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]  # none for skipped
    failed = next(c for c in children if c.info.status == "FAILED")
    assert "xla" in failed.data.tags["failure_reason"]
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    assert {k: parent.data.metrics[f"sweep/{k}"] for k in ("complete", "failed", "skipped")} == {
        "complete": 1,
        "failed": 1,
        "skipped": 2,
    }


def test_a_point_reading_more_than_max_epochs_is_skipped(tmp_path):
    """With the corpus in the token cache, validation reads the train split's size from its
    metadata: the point past data.max_epochs is skipped with the numbers, the other one runs."""
    r = _train(  # which puts the corpus in the token cache the sweep's runs use
        tmp_path,
        "hydra/sweeper=optuna",
        "study=epochs",
        "data.max_epochs=choice(2,0.0001)",
        "hydra.sweeper.validate=pipeline.run.spec.validate_config",
    )
    trials = {t.params["data.max_epochs"]: t for t in _study(tmp_path, "epochs").trials}
    assert trials[2].state == TrialState.COMPLETE, r.stderr[-3000:]
    assert "reads 512 train tokens" in trials[0.0001].user_attrs["skipped"]
    assert "more than data.max_epochs=0.0001" in trials[0.0001].user_attrs["skipped"]
    _, children = _runs(tmp_path, "epochs")
    assert len(children) == 1


@pytest.mark.slow  # ~3 training runs; the pruner itself is covered fast on the toy app
def test_pruning_callback_prunes_a_run_that_cannot_learn(tmp_path):
    """lr=1e-7 cannot lower the loss; the median pruner stops it at its first validation."""
    r = _train(
        tmp_path,
        "hydra/sweeper=optuna",
        "study=prune",
        "optimizer.warmup_steps=0",
        "optimizer.lr=choice(0.01,0.005,1e-7)",
        "hydra.sweeper.pruner=median",
        "++hydra.sweeper.pruner_kwargs.n_startup_trials=2",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    states = {t.params["optimizer.lr"]: t.state for t in _study(tmp_path, "prune").trials}
    assert states == {0.01: TrialState.COMPLETE, 0.005: TrialState.COMPLETE, 1e-7: TrialState.PRUNED}
    _, children = _runs(tmp_path, "prune")
    pruned = [c for c in children if c.data.tags.get("pruned") == "true"]
    assert len(pruned) == 1 and pruned[0].info.status == "KILLED"


def test_basic_sweeper_logs_a_parent_with_children(tmp_path):
    r = _train(tmp_path, "model/pos_enc=rope,alibi", "study=basic")
    assert r.returncode == 0, r.stderr[-3000:]
    (parent,), children = _runs(tmp_path, "basic")
    assert parent.info.status == "FINISHED" and parent.data.tags["sweeper"] == "basic"
    assert sorted(c.data.tags["pos_enc"] for c in children) == ["alibi", "rope"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags["trial"] for c in children} == {"0", "1"}
    assert parent.data.metrics["sweep/runs_finished"] == 2
