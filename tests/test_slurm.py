"""Sweep workers as submitted jobs (hydra/launcher=submitit_slurm | submitit_local).

The jobs run through submitit's own LocalExecutor (`submitit_local`: the same job function,
pickled and run by submitit's job controller, as processes on this machine): the submitting
command returns at once, and the jobs' workers finish the study on real Optuna and MLflow
stores in tmp_path. The SLURM path is checked up to `sbatch`, which is a recording stand-in on
PATH here (no cluster): the script submitit writes and the ids printed from its answer.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hydra_plugins.pipeline_optuna_sweeper import study as study_lib
from tests.helpers.cli import TINY
from tests.helpers.cli import sweep_env as _env
from tests.test_sweeper import APP, _assert_grid_finished, _runs, _study

optuna.logging.set_verbosity(optuna.logging.WARNING)

LOCAL = ["hydra/sweeper=optuna", "hydra/launcher=submitit_local", "hydra.launcher.jobs=2", "hydra.sweeper.workers=1"]


def _submit(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    tic = time.monotonic()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return r, time.monotonic() - tic


def _job_ids(stdout: str) -> list[str]:
    m = re.search(r"submitted (\d+) worker jobs \((\w+)\): ([\w ]+)", stdout)
    assert m, stdout[-3000:]
    ids = m.group(3).split()
    assert len(ids) == int(m.group(1))
    return ids


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (its parent, the submitter, is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _wait_for_jobs(pids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, f"jobs {pids} still running after {timeout_s} s"
        time.sleep(1.0)


@pytest.fixture
def jobs() -> Iterator[list[int]]:
    """Pids of the local jobs a test submitted; any still running at teardown (a failed test)
    get SIGTERM, which submitit's controller passes on and the job's supervisor to its workers."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)


def _job_outputs(tmp_path: Path) -> str:
    return "".join(p.read_text() for p in tmp_path.glob("multirun/**/submitit/*/*_log.*"))


def test_two_local_jobs_run_the_grid_once_after_the_command_returned(tmp_path, jobs):
    cmd = [sys.executable, str(APP), "-m", *LOCAL, "x=choice(0,1,2,3)", "sleep=0.2"]
    r, took = _submit(cmd, tmp_path, _env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    at_return = _study(tmp_path, "toy").trials
    ids = _job_ids(r.stdout)
    jobs.extend(int(i) for i in ids)
    assert len(ids) == 2 and "kill " in r.stdout and "resume:" in r.stdout
    # The command returned with the study queued, not run: no trial had finished.
    assert len(at_return) == 4 and not [t for t in at_return if t.state.is_finished()], took

    _wait_for_jobs(jobs, timeout_s=300)
    trials = _study(tmp_path, "toy").trials
    assert sorted(t.params["x"] for t in trials) == [0, 1, 2, 3]  # each point once
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.state for t in trials]
    assert sorted((tmp_path / "results.txt").read_text().split()[::2]) == ["0", "1", "2", "3"]
    out = _job_outputs(tmp_path)
    assert out.count("workers exited with [0]") == 2 and "Job completed successfully" in out
    logs = sorted(tmp_path.glob("multirun/workers/*/worker-0.log"))
    assert [p.parent.name for p in logs] == sorted(ids)  # one worker per job, logging apart
    assert sum(p.read_text().count("Launching 1 jobs") for p in logs) == 4
    summary = (tmp_path / "multirun" / "optuna_summary.json").read_text()  # by the last worker
    assert '"complete": 4' in summary


@pytest.mark.slow  # 100-230 s on a shared 2-core machine: each job starts the pipeline, 4 tiny trials
def test_two_local_jobs_finish_a_pipeline_grid_in_one_parent_run(tmp_path, jobs):
    cmd = [sys.executable, "-m", "pipeline.train", "-m", *LOCAL, "study=jobs", *TINY]
    cmd += ["model/pos_enc=choice(rope,alibi)", "model/norm=choice(layernorm,rmsnorm)"]
    r, took = _submit(cmd, tmp_path, _env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    jobs.extend(int(i) for i in _job_ids(r.stdout))
    at_return = _study(tmp_path, "jobs").trials
    (parent,), children = _runs(tmp_path, "jobs")
    assert parent.info.status == "RUNNING" and not children  # open for the jobs' workers
    assert len(at_return) == 4 and not [t for t in at_return if t.state.is_finished()], took

    _wait_for_jobs(jobs, timeout_s=600)
    _assert_grid_finished(tmp_path, "jobs", ("rope", "alibi"), ("layernorm", "rmsnorm"))
    assert len({c.data.tags["worker"] for c in children}) == 2  # both jobs' workers ran trials


@pytest.mark.slow  # two minutes for the time limit, then the resumed grid
def test_a_job_at_its_time_limit_ends_its_trial_interrupted_and_a_resume_finishes_the_grid(tmp_path, jobs):
    grid = [sys.executable, str(APP), "-m", *LOCAL, "x=choice(0,1)"]
    # One job of 2 minutes, warned 30 s before the end (its worker then has 22 s to record its
    # trial), not requeued; a trial would take 1000 s.
    limit = ["hydra.launcher.jobs=1", "hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=30"]
    limit += ["hydra.launcher.max_num_timeout=0", "sleep=10", "steps=100"]
    r, _ = _submit([*grid, *limit], tmp_path, _env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    jobs.extend(int(i) for i in _job_ids(r.stdout))
    _wait_for_jobs(jobs, timeout_s=300)
    out = _job_outputs(tmp_path)
    assert "stopping 1 workers" in out and "timed-out too many times" in out, out[-3000:]
    trials = _study(tmp_path, "toy").trials
    assert [t.params["x"] for t in trials if t.user_attrs.get("interrupted")] == [0]  # FAIL, retried on resume
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]  # nothing left RUNNING

    jobs.clear()
    r, _ = _submit([*grid, "sleep=0.1"], tmp_path, _env(tmp_path))  # the same command, resumed
    assert r.returncode == 0, r.stderr[-3000:]
    jobs.extend(int(i) for i in _job_ids(r.stdout))
    assert len(jobs) == 2  # the retry of x=0 and the never-started x=1
    _wait_for_jobs(jobs, timeout_s=300)
    latest = study_lib.latest_attempts(_study(tmp_path, "toy"))
    assert sorted((t.params["x"], t.state) for t in latest) == [(0, TrialState.COMPLETE), (1, TrialState.COMPLETE)]


def _fake_sbatch(folder: Path) -> Path:
    """`sbatch` that keeps the script it is given and answers as SLURM does; `srun` exists
    (submitit's SlurmExecutor looks for it) but is never called by the submitting side."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    scripts = {
        "sbatch": f'#!/bin/sh\ncp "$1" {folder}/sbatch.sh\necho "Submitted batch job 4242"\n',
        "srun": "#!/bin/sh\nexit 1\n",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return bin_dir


def test_slurm_submits_one_array_of_worker_jobs_and_prints_how_to_follow_it(tmp_path):
    env = _env(tmp_path)
    env["PATH"] = f"{_fake_sbatch(tmp_path)}{os.pathsep}{env['PATH']}"
    settings = ["hydra.launcher.jobs=3", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_job=2"]
    settings += ["hydra.launcher.timeout_min=90", "hydra.launcher.cpus_per_job=16"]
    settings += [
        "hydra.launcher.setup=[source .venv/bin/activate]",
        "+hydra.launcher.additional_parameters.exclude=n07",
    ]
    cmd = [sys.executable, str(APP), "-m", "hydra/sweeper=optuna", "hydra/launcher=submitit_slurm", *settings]
    r, _ = _submit([*cmd, "x=choice(0,1,2,3)"], tmp_path, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _job_ids(r.stdout) == ["4242_0", "4242_1", "4242_2"]
    assert "squeue -j 4242" in r.stdout and "scancel 4242" in r.stdout
    script = (tmp_path / "sbatch.sh").read_text()
    for line in (
        "#SBATCH --array=0-2%3",
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --time=90",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --job-name=toy",
        "#SBATCH --exclude=n07",
        "source .venv/bin/activate",
    ):
        assert line in script, script
    waiting = _study(tmp_path, "toy").get_trials(states=(TrialState.WAITING,))
    assert sorted(t.params["x"] for t in waiting) == [0, 1, 2, 3]  # queued for the jobs

    import submitit

    (pickle,) = tmp_path.glob("multirun/submitit/4242_0/4242_0_submitted.pkl")
    job = submitit.core.utils.DelayedSubmission.load(pickle).function
    assert job.command[:2] == [sys.executable, str(APP)] and job.workers == "auto" and job.gpus == 2
    assert f"hydra.sweep.dir={tmp_path / 'multirun'}" in job.command

    # Fewer trials to run than jobs: no more jobs than trials.
    r, _ = _submit([*cmd, "study=two", "x=choice(0,1)"], tmp_path, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _job_ids(r.stdout) == ["4242_0", "4242_1"]
    assert "#SBATCH --array=0-1%2" in (tmp_path / "sbatch.sh").read_text()


def test_slurm_without_sbatch_is_refused_in_one_line_before_anything_exists(tmp_path, monkeypatch, capfd):
    from pipeline import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no sbatch on it
    rc = train.main(["-m", "hydra/sweeper=optuna", "hydra/launcher=submitit_slurm", "seed=0,1", *TINY])
    assert rc == 2
    assert capfd.readouterr().err.strip().splitlines() == [
        "error: hydra/launcher=submitit_slurm: there is no `sbatch` on PATH; submit from a SLURM login node, "
        "or try the same jobs on this machine with hydra/launcher=submitit_local"
    ]
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()
