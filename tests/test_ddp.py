"""One trial on several devices (trainer=ddp): 2 gloo processes on the CPU against 1 process.

The slow tests run the real CLI against a real SQLite MLflow store. Tolerance of the curve
comparison: with the same seed and global batch, the two ranks see exactly the rows one
process sees (each its slice of every global batch), start from the same weights (DDP
broadcasts rank 0's) and apply the same averaged gradient, so the only difference is the
order of float32 additions: the batch mean is taken as the mean of two half-batch means, and
the gradient as the all-reduced average of two half-batch gradients. That is a relative
rounding difference of ~1e-7 per step, which AdamW's normalised updates carry through the
run without growing much over 40 steps. Measured: the curves differ by at most 9.5e-7
(train/loss, 40 points) and 4.8e-7 (val/loss), at losses of 4-5.5. TOL = 1e-4 leaves 100x
headroom for other machines and BLAS kernels while staying far below any real change (one
optimizer step moves the loss by ~1e-2 here; a wrong data order or batch size by more).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pipeline.data.config import DataConfig
from pipeline.data.datamodule import LMDataModule, RandomWindows, shard_rows
from pipeline.data.splits import TokenSplits
from tests.helpers.cli import TINY, cli

TOL = 1e-4
CURVE = ["trainer.max_steps=40", "trainer.val_check_interval=20", "trainer.log_every_n_steps=1", "seed=5"]
DDP2 = ["trainer=ddp", "trainer.devices=2"]


# -- the split of each global batch (fast) ---------------------------------------------------------


def test_ranks_together_see_exactly_the_batches_of_one_process():
    tokens = np.arange(5_000, dtype=np.uint16)
    one = iter(RandomWindows(tokens, 16, 8, seed=3))
    ranks = [iter(RandomWindows(tokens, 16, 8, seed=3, rank=r, world_size=2)) for r in range(2)]
    for _ in range(5):
        x, y = next(one)
        parts = [next(r) for r in ranks]
        assert all(p[0].shape == (4, 16) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)


@pytest.mark.parametrize("windows", [24, 5])  # full global batches of 8; one short batch of 5 -> 4 rows
def test_val_batches_are_split_the_same_way(windows):
    ctx = 16
    splits = TokenSplits(
        train=np.arange(4_000, dtype=np.uint16),
        val=np.arange(windows * ctx + 1, dtype=np.uint16),
        test=np.arange(100, dtype=np.uint16),
        vocab_size=65_536,
    )

    def batches(rank: int, world: int) -> list[torch.Tensor]:
        dm = LMDataModule(DataConfig(), ctx, 8, val_batches=3, rank=rank, world_size=world)
        dm._splits = splits  # the splits as loaded, without reading a corpus
        return [x for x, _ in dm.val_dataloader()]

    one, r0, r1 = batches(0, 1), batches(0, 2), batches(1, 2)
    assert len(one) == len(r0) == len(r1)
    for full, a, b in zip(one, r0, r1, strict=True):
        joined = torch.cat([a, b])
        assert torch.equal(joined, full[: len(joined)]) and len(a) == len(b)
    # the mean of the ranks' means is the one-process mean when the ranks hold equal shares
    assert sum(len(a) for a in r0) == sum(len(b) for b in r1)


def test_an_uneven_split_is_refused():
    with pytest.raises(ValueError, match="cannot be split evenly over 3 ranks"):
        shard_rows(8, 0, 3)


def test_ddp_trainer_follows_the_machine():
    from hydra import compose, initialize_config_dir

    from pipeline import CONF_DIR
    from pipeline.run.spec import validate_config

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("train", [*TINY, *DDP2, "budget=cpu"])
    cuda = torch.cuda.is_available()
    assert cfg.trainer.accelerator == ("gpu" if cuda else "cpu")
    assert cfg.trainer.precision == ("bf16-mixed" if cuda else "32-true")
    if cuda and torch.cuda.device_count() < 2:
        pytest.skip("one GPU: trainer.devices=2 is refused here")
    assert validate_config(cfg).devices == 2


# -- 2 gloo processes against 1 (slow: real CLI, real SQLite store) -----------------------------


def _client(cwd: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")


def _runs(cwd: Path, study: str) -> list:
    client = _client(cwd)
    exp = client.get_experiment_by_name(study)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _curve(cwd: Path, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in _client(cwd).get_metric_history(run_id, key)}


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory) -> Path:
    """The same run in 1 process (study one) and in 2 gloo processes (study two)."""
    cwd = tmp_path_factory.mktemp("ddp")
    env = {"OMP_NUM_THREADS": "1"}  # each rank a thread, as the ranks get on 2 cores
    one = cli("pipeline.train", [*TINY, *CURVE, "eval.enabled=false", "study=one", "budget=cpu"], cwd, env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli("pipeline.train", [*TINY, *CURVE, *DDP2, "study=two", "budget=cpu"], cwd, env)
    assert two.returncode == 0, two.stderr[-3000:]
    return cwd


@pytest.mark.slow
def test_two_processes_give_the_loss_curve_of_one(one_and_two: Path):
    cwd = one_and_two
    (one,), (two,) = _runs(cwd, "one"), _runs(cwd, "two")
    assert one.info.status == two.info.status == "FINISHED"
    for key in ("train/loss", "val/loss"):
        a, b = _curve(cwd, one.info.run_id, key), _curve(cwd, two.info.run_id, key)
        assert a.keys() == b.keys() and len(a) == (40 if key == "train/loss" else 2)
        worst = max(abs(a[s] - b[s]) for s in a)
        print(f"{key}: max |1 process - 2 processes| = {worst:.2e} over {len(a)} points")
        assert worst <= TOL, (key, worst)
    # both runs learn (the comparison is not between two flat curves)
    losses = _curve(cwd, two.info.run_id, "train/loss")
    assert losses[max(losses)] < losses[min(losses)] - 0.5
    # tokens are counted over both ranks: the global batch, as in one process
    assert two.data.metrics["train/tokens_seen"] == one.data.metrics["train/tokens_seen"] == 40 * 8 * 32


@pytest.mark.slow
def test_a_ddp_trial_is_one_mlflow_run_logged_by_rank_0(one_and_two: Path):
    cwd = one_and_two
    client = _client(cwd)
    every = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(every) == 2  # one per study: rank 1 created nothing
    (run,) = _runs(cwd, "two")
    assert run.data.params["trainer.devices"] == "2" and run.data.params["trainer.strategy"] == "ddp"
    assert run.data.params["trainer.accelerator"] == "cpu" and run.data.params["data.batch_size"] == "8"
    assert "tracking.uri" not in (cwd / "outputs").rglob("config.yaml").__next__().read_text()
    # evaluation ran once, on rank 0, after training
    assert {"extrap/ppl_x1", "cost/params_total", "cost/train_tokens_per_s"} <= set(run.data.metrics)
    (log,) = (cwd / "outputs" / "two").rglob("rank1.log")
    assert "GLOBAL_RANK: 1" in log.read_text()
    assert not list(log.parent.glob("*.ready"))


@pytest.mark.slow
def test_a_ddp_trial_under_hydra_multirun_does_not_relaunch_the_sweep(tmp_path: Path):
    """Lightning's own launcher re-runs the command line (`-m ...`) in every rank: a second sweep.
    Ours does not: one sweep folder, one parent run, one trial run."""
    args = ["-m", *TINY, *DDP2, "trainer.max_steps=6", "eval.enabled=false", "study=swept", "budget=cpu"]
    proc = cli("pipeline.train", args, tmp_path, {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = _runs(tmp_path, "swept")
    assert sorted(r.data.tags.get("sweep", "false") for r in runs) == ["false", "true"]
    (trial,) = [r for r in runs if r.data.tags.get("sweep") != "true"]
    assert trial.info.status == "FINISHED" and trial.data.params["trainer.devices"] == "2"
    assert len(list((tmp_path / "multirun" / "swept").iterdir())) == 1
    assert not (tmp_path / "outputs").exists()  # no rank ran a single run of its own


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux")
def test_a_rank_that_dies_fails_the_run_with_its_name(tmp_path: Path):
    """Rank 1 killed mid-training: rank 0's next collective breaks, the run ends FAILED naming
    rank 1 and its log, and nothing is left running."""
    import subprocess
    import sys
    import time

    import psutil

    args = [*TINY, *DDP2, "trainer.max_steps=100000", "data.max_epochs=1000", "study=dies", "budget=cpu"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob("outputs/dies/*/ddp/rank1.ready")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        time.sleep(3)  # into training
        (rank1,) = [c for c in psutil.Process(proc.pid).children() if "pipeline.run.ddp" in " ".join(c.cmdline())]
        rank1.kill()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, err[-3000:]
    (run,) = _runs(tmp_path, "dies")
    assert run.info.status == "FAILED"
    reason = run.data.tags["failure_reason"]
    assert "DDP rank 1 of 2 exited with code -9" in reason and "rank1.log" in reason, reason
