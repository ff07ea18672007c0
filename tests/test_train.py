"""One run end to end through the real CLI: Hydra -> Lightning -> MLflow (SQLite), offline."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.model.families import FAMILIES
from tests.helpers.cli import TINY, cli

EVAL_OFF = ["eval.enabled=false"]


def client_for(cwd: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")


def runs(cwd: Path, study: str = "default"):
    client = client_for(cwd)
    exp = client.get_experiment_by_name(study)
    return [] if exp is None else client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """Two runs of the same command in a fresh directory (the second hits the token cache)."""
    cwd = tmp_path_factory.mktemp("work")
    args = [*TINY, *EVAL_OFF, "model=llama", "model/pos_enc=alibi", "model.attention.n_kv_heads=1", "seed=3"]
    for _ in range(2):
        proc = cli("pipeline.train", args, cwd)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, runs(cwd)


def test_run_logs_curves_tags_params_artifacts(first_run) -> None:
    cwd, logged = first_run
    run = logged[0]
    assert run.info.status == "FINISHED"
    client = client_for(cwd)
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) == 20 // 2  # max_steps / log_every_n_steps points
    assert losses[-1] < losses[0] - 0.5  # it learns
    val = client.get_metric_history(run.info.run_id, "val/loss")
    assert sorted(m.step for m in val) == [10, 20] or len(val) == 2
    assert {"lr", "val/ppl", "train/tokens_seen"} <= set(run.data.metrics)
    tags = run.data.tags
    assert tuple(tags[f] for f in FAMILIES) == ("alibi", "rmsnorm", "gqa", "swiglu")
    assert tags["preset"] == "llama" and tags["study"] == "default" and tags["seed"] == "3"
    assert tags["git_commit"]
    params = run.data.params
    assert params["model.attention.n_kv_heads"] == "1"
    assert params["model.pos_enc.name"] == "alibi"
    assert params["trainer.max_steps"] == "20"
    assert "model.ffn.n_experts" not in params  # a dense run never logs MoE settings
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "overrides.txt", "plots"} <= artifacts
    assert "plots/loss_curve.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}


def test_token_cache_is_hit_on_second_run(first_run) -> None:
    _, logged = first_run
    assert [r.data.tags["cache_hit"] for r in logged] == ["false", "true"]


def test_same_seed_gives_same_curve(first_run) -> None:
    cwd, logged = first_run
    client = client_for(cwd)
    curves = [
        [m.value for m in sorted(client.get_metric_history(r.info.run_id, "train/loss"), key=lambda m: m.step)]
        for r in logged
    ]
    assert curves[0] == curves[1]


def test_rerun_reproduces_the_curve_exactly(first_run) -> None:
    cwd, logged = first_run
    original = logged[0].info.run_id
    proc = cli("pipeline.rerun", [original], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = client_for(cwd)
    rerun = [r for r in runs(cwd) if r.data.tags.get("rerun_of") == original]
    assert len(rerun) == 1 and rerun[0].info.status == "FINISHED"

    def curve(run_id: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]

    assert curve(rerun[0].info.run_id) == curve(original)
    assert rerun[0].data.params == logged[0].data.params


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model/pos_enc=fourier", "model/pos_enc"),
        ("model.n_heads=3", "model.n_heads=3"),
        ("data=text_files data.files=[/nonexistent/corpus.txt]", "/nonexistent/corpus.txt"),
        ("trainer.max_steps=-1", "trainer.max_steps=-1"),
        ("model=llama model.attention.n_kv_heads=3", "n_kv_heads=3"),
        ("eval.factors=[1,4096]", "max(eval.factors)=4096"),  # test text too short: found after loading data
    ],
)
def test_bad_override_exits_with_short_message_and_no_run(tmp_path: Path, tiny, override: str, needle: str) -> None:
    proc = cli("pipeline.train", [*tiny, *override.split()], tmp_path)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 25
    assert runs(tmp_path) == []


def test_failed_training_ends_run_failed_with_reason(tmp_path: Path, tiny) -> None:
    """A NaN loss mid-training: the run ends FAILED and says why."""
    proc = cli("pipeline.train", [*tiny, *EVAL_OFF, "optimizer.lr=1e6", "trainer.gradient_clip_val=null"], tmp_path)
    assert proc.returncode != 0
    (run,) = runs(tmp_path)
    assert run.info.status == "FAILED"
    assert "train/loss is nan" in run.data.tags["failure_reason"]


def test_a_run_shorter_than_the_validation_interval_validates_at_its_end(tmp_path: Path) -> None:
    """trainer.max_steps=4 under the CPU budget (val_check_interval 100): the interval is clamped
    to 4, the run validates once and logs the interval it used."""
    short = [a for a in TINY if not a.startswith(("trainer.max_steps=", "trainer.val_check_interval="))]
    proc = cli("pipeline.train", [*short, *EVAL_OFF, "budget=cpu", "trainer.max_steps=4"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.val_check_interval"] == "4"
    assert len(client_for(tmp_path).get_metric_history(run.info.run_id, "val/loss")) == 1  # at the end
    assert run.data.metrics["train/seconds"] > 0
