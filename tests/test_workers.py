"""Sweep workers (hydra.sweeper.workers=N): slots, exactly-once claiming, the coordinator.

The slot logic is tested with fake device lists (no GPU needed); claiming with real processes
on a real SQLite Optuna storage; the coordinator on the toy app (tests/helpers/sweeper_app)
and on the pipeline with a tiny model, against real MLflow and Optuna stores in tmp_path.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import re
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from optuna.trial import TrialState

from hydra_plugins.pipeline_optuna_sweeper import search_space
from hydra_plugins.pipeline_optuna_sweeper import study as study_lib
from hydra_plugins.pipeline_optuna_sweeper import workers as workers_lib
from hydra_plugins.pipeline_optuna_sweeper.storage import open_storage
from pipeline.run.layout import MARGIN, WORKER_MEMORY, candidates, choose
from tests.helpers.claim import claim_all
from tests.test_sweeper import _assert_grid_finished, _study, _toy, _train

optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- slots -------------------------------------------------------------------------------------


def test_visible_gpus_follow_cuda_visible_devices():
    three = lambda: 3  # noqa: E731
    assert workers_lib.visible_gpus({}, three) == ["0", "1", "2"]
    assert workers_lib.visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 5"}, lambda: 2) == ["2", "5"]
    uuids = "GPU-1a2b,MIG-3c4d"
    assert workers_lib.visible_gpus({"CUDA_VISIBLE_DEVICES": uuids}, lambda: 2) == ["GPU-1a2b", "MIG-3c4d"]
    assert workers_lib.visible_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,2"}, lambda: 1) == ["1"]  # CUDA stops at -1
    assert workers_lib.visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}, lambda: 0) == []  # no CUDA runtime


def test_auto_is_one_worker_per_gpu_slot_dealt_round_robin_with_cores_shared():
    slots = workers_lib.plan("auto", "auto", ["0", "1"], slots_per_gpu=2, cpus=16)
    assert [s.device for s in slots] == ["0", "1", "0", "1"]
    assert {s.threads for s in slots} == {4}
    env = slots[1].env()
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["OMP_NUM_THREADS"] == "4"
    assert env[workers_lib.ROLE_ENV] == "1"
    # An explicit count still pins every worker to a GPU.
    assert [s.device for s in workers_lib.plan(3, "auto", ["7"], 1, cpus=2)] == ["7", "7", "7"]
    with pytest.raises(ValueError, match="slots_per_gpu"):
        workers_lib.plan("auto", "auto", ["0"], slots_per_gpu=0, cpus=2)


def test_auto_on_cpu_takes_the_measured_layout_else_one_single_thread_worker_per_core():
    assert [(s.threads, s.device) for s in workers_lib.plan("auto", "auto", [], 1, cpus=2)] == [(1, None)] * 2
    measured = workers_lib.plan("auto", "auto", [], 1, cpus=8, measure=lambda: (2, 4))
    assert [s.threads for s in measured] == [4, 4]
    assert "CUDA_VISIBLE_DEVICES" not in measured[0].env()
    assert [s.threads for s in workers_lib.plan(3, "auto", [], 1, cpus=8)] == [2, 2, 2]
    assert [s.threads for s in workers_lib.plan(2, 3, [], 1, cpus=8)] == [3, 3]


@pytest.mark.parametrize("name,value", [("workers", -1), ("workers", "many"), ("threads_per_worker", 0)])
def test_bad_worker_settings_name_the_field(name, value):
    with pytest.raises(ValueError, match=f"hydra.sweeper.{name}="):
        workers_lib.check_setting(name, value)
    assert workers_lib.check_setting("workers", "3") == 3 and workers_lib.check_setting("workers", 0) == 0


def test_layout_candidates_and_choice():
    assert candidates(2) == [(1, 2), (2, 1)]
    assert candidates(6) == [(1, 6), (2, 3), (3, 2), (6, 1)]
    assert candidates(8, memory=2 * WORKER_MEMORY) == [(1, 8), (2, 4)]  # memory caps the workers
    assert choose({(1, 2): 34.5, (2, 1): 57.0}) == (2, 1)  # issue 16's gpt2 numbers
    assert choose({(1, 2): 100.0, (2, 1): 100.0 * MARGIN * 0.99}) == (1, 2)  # within the margin


def test_worker_command_reruns_this_entry_point_with_the_recorded_overrides(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-m", "pipeline.train", "-m", "ablation=full_grid"])
    monkeypatch.setattr(sys, "argv", ["/x/pipeline/train.py", "-m", "ablation=full_grid"])
    config = OmegaConf.create(
        {
            "hydra": {
                "overrides": {
                    "task": ["ablation=full_grid", "budget=cpu"],
                    "hydra": ["hydra.mode=MULTIRUN", "hydra.sweeper.workers=2", "hydra.sweep.dir=old"],
                },
                "job": {"config_name": "train"},
                "runtime": {"config_sources": [{"provider": "command-line", "schema": "file", "path": "/my/conf"}]},
            }
        }
    )
    cmd = workers_lib.command(config, tmp_path)
    assert cmd == [
        sys.executable,
        "-m",
        "pipeline.train",
        "-m",
        "--config-name=train",
        "--config-dir=/my/conf",
        "ablation=full_grid",
        "budget=cpu",
        "hydra.sweeper.workers=2",
        f"hydra.sweep.dir={tmp_path}",
    ]


# -- exactly once ------------------------------------------------------------------------------


def _grid_study(url: str, n: int) -> tuple[optuna.Study, search_space.SearchSpace]:
    space = search_space.parse([f"a=range(0,{n})"], OverridesParser.create())
    sampler = study_lib.make_sampler("grid", None, {}, space)
    study = optuna.create_study(storage=open_storage(url), study_name="s", sampler=sampler, load_if_exists=True)
    return study, space


def test_the_grid_is_enqueued_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    study, space = _grid_study(url, 5)
    sampler = study.sampler
    assert study_lib.enqueue_grid(study, sampler, space, limit=3) == 3
    assert study_lib.enqueue_grid(study, sampler, space) == 2  # the rest, not the first three again
    assert study_lib.enqueue_grid(study, sampler, space) == 0
    trials = study.get_trials()
    assert [t.params["a"] for t in trials] == [0, 1, 2, 3, 4]
    assert {t.state for t in trials} == {TrialState.WAITING}


def test_concurrent_workers_claim_every_trial_exactly_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    study, space = _grid_study(url, 60)
    study_lib.enqueue_grid(study, study.sampler, space)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=claim_all, args=(url, "s", out)) for _ in range(4)]
    for p in procs:
        p.start()
    claimed = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    numbers = [n for mine in claimed for n in mine]
    assert sorted(numbers) == list(range(60))  # no trial twice, none left out
    assert all(t.state == TrialState.COMPLETE for t in _grid_study(url, 60)[0].get_trials())


# -- the progress line -------------------------------------------------------------------------


def test_progress_line_counts_the_study_and_reports_failures_once(tmp_path):
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'o.db'}"), study_name="p")
    for _ in range(2):
        study.tell(study.ask(), 1.0)
    failed = study.ask()
    failed.set_user_attr("fail_reason", "RuntimeError: boom")
    study.tell(failed, state=TrialState.FAIL)
    study.ask()  # running
    out = io.StringIO()
    progress = workers_lib.Progress("p", total=5, workers=2, out=out)
    line = progress.update([study])
    progress.update([study])
    assert line.startswith("[sweep p] 3/5 done | 1 running | complete 2 pruned 0 failed 1 skipped 0 |")
    assert out.getvalue().count("trial 2 FAILED: RuntimeError: boom") == 1


# -- the coordinator on the toy app -------------------------------------------------------------


def _workers_used(tmp_path: Path) -> dict[str, int]:
    """Trials each worker log says it launched."""
    logs = sorted(tmp_path.glob("multirun/workers/worker-*.log"))
    return {p.name: len(re.findall(r"Launching 1 jobs", p.read_text())) for p in logs}


def test_two_workers_run_a_grid_once_with_one_progress_line(tmp_path):
    r = _toy(tmp_path, "opt=a,b", "x=choice(0,1,2)", "sleep=0.3", "hydra.sweeper.workers=2")
    assert r.returncode == 0, r.stderr[-3000:]
    trials = _study(tmp_path, "toy").trials
    assert sorted((t.params["opt"], t.params["x"]) for t in trials) == [(o, x) for o in "ab" for x in (0, 1, 2)]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted((tmp_path / "results.txt").read_text().splitlines()) == sorted(
        f"{x} {o}" for o in "ab" for x in (0, 1, 2)
    )
    used = _workers_used(tmp_path)
    assert len(used) == 2 and sum(used.values()) == 6 and min(used.values()) >= 1  # both took work
    for log in tmp_path.glob("multirun/workers/worker-*.log"):  # once per worker, not per trial
        assert log.read_text().count("heap frozen before the first trial") == 1
    assert "[sweep toy] 6/6 done | 0 running | complete 6" in r.stdout
    assert "Launching" not in r.stdout  # the jobs' own output is in the worker logs


def test_failures_with_workers_are_counted_once_and_fail_the_command(tmp_path):
    r = _toy(tmp_path, "x=choice(1,2)", "fail=choice(false,true)", "hydra.sweeper.workers=2")
    assert r.returncode != 0 and "2 of 4 trials failed" in r.stderr
    assert r.stdout.count("FAILED: RuntimeError: asked to fail") == 2
    assert "complete 2 pruned 0 failed 2 skipped 0" in r.stdout


def test_a_second_command_joins_the_running_study(tmp_path):
    import subprocess

    from tests.helpers.cli import sweep_env as _env
    from tests.test_sweeper import APP

    args = ["-m", "hydra/sweeper=optuna", "x=choice(0,1,2,3,4,5)", "sleep=1.0", "hydra.sweeper.workers=1"]
    procs = [
        subprocess.Popen(
            [sys.executable, str(APP), *args, f"hydra.sweep.dir=multirun{i}"],
            cwd=tmp_path,
            env=_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    trials = _study(tmp_path, "toy").trials
    assert sorted(t.params["x"] for t in trials) == [0, 1, 2, 3, 4, 5]  # six points, six trials
    assert all(t.state == TrialState.COMPLETE for t in trials)
    workers = {t.system_attrs["worker"] for t in trials}
    assert len(workers) == 2  # both commands' workers took trials


@pytest.mark.slow  # ~1 min: a worker is SIGKILLed mid-trial and the others finish its point
def test_a_killed_worker_s_trial_is_retried_by_the_others(tmp_path):
    import subprocess

    from tests.helpers.cli import sweep_env as _env
    from tests.test_sweeper import APP

    proc = subprocess.Popen(
        [sys.executable, str(APP), "-m", "hydra/sweeper=optuna", "x=choice(0,1,2,3)", "sleep=1.0", "steps=4"]
        + ["hydra.sweeper.workers=2"],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    victim = None
    while victim is None and time.time() < deadline:
        time.sleep(0.5)
        try:
            running = _study(tmp_path, "toy").get_trials(states=(TrialState.RUNNING,))
        except Exception:  # not created yet
            continue
        if running and "worker" in running[0].system_attrs:
            victim = int(running[0].system_attrs["worker"].rpartition(":")[2])
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "exited with -9" in out + err
    trials = _study(tmp_path, "toy").trials
    done = sorted(t.params["x"] for t in trials if t.state == TrialState.COMPLETE)
    assert done == [0, 1, 2, 3]
    assert any(t.user_attrs.get("interrupted") for t in trials)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


# -- the pipeline: two workers, one MLflow parent -----------------------------------------------


def test_two_pipeline_workers_finish_each_point_once_in_one_parent_run(tmp_path):
    """Issue 16's target: two workers on a 6-point grid, fresh stores: each point FINISHED once,
    no "database is locked", nothing left RUNNING, all children under one parent run."""
    r = _train(
        tmp_path,
        "hydra/sweeper=optuna",
        "study=two",
        "model/pos_enc=choice(rope,alibi,learned)",
        "model/norm=choice(layernorm,rmsnorm)",
        "hydra.sweeper.workers=2",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    logs = "".join(p.read_text() for p in tmp_path.glob("multirun/two/*/workers/worker-*.log"))
    assert "database is locked" not in logs + r.stderr
    assert logs.count("Launching 1 jobs") == 6
    trials, children = _assert_grid_finished(tmp_path, "two", ("rope", "alibi", "learned"), ("layernorm", "rmsnorm"))
    assert {c.data.tags["trial"] for c in children} == {str(t.number) for t in trials}
    assert len({c.data.tags["worker"] for c in children}) == 2
    assert "[sweep two] 6/6 done" in r.stdout


# -- a run's own pieces --------------------------------------------------------------------------


def test_the_finite_loss_check_can_wait_and_still_catches_a_nan():
    from pipeline.model import ModelConfig
    from pipeline.run.module import LitDecoderLM
    from pipeline.run.optim import OptimConfig

    cfg = ModelConfig.from_preset("gpt2", d_model=16, n_layers=1, n_heads=2, context_length=8)
    lit = LitDecoderLM(cfg, OptimConfig(), max_steps=10, check_finite_every=4)
    lit._track_finite(torch.tensor(float("nan")))  # step 0 of 4: not read back yet
    lit._track_finite(torch.tensor(1.0))
    with pytest.raises(FloatingPointError, match="not finite at a step up to 0"):
        lit.check_finite()
    lit.check_finite()  # the flag was reset


def test_throughput_counts_steps_after_warmup_and_leaves_validation_out():
    from pipeline.run.callbacks import Throughput

    tp = Throughput(warmup=2)
    batch = (None, torch.zeros(4, 8))  # 32 tokens
    for step in range(6):
        if step == 4:
            tp.on_validation_start(None, None)
            time.sleep(0.3)  # validation time is not counted
        tp.on_train_batch_end(SimpleNamespace(global_step=step), None, None, batch, step)
        time.sleep(0.01)
    tp.on_train_end(None, None)
    # Spans start after steps 2 and 4; steps 3 and 5 are counted.
    assert tp.tokens == 2 * 32
    assert 0.015 < tp.seconds < 0.3
