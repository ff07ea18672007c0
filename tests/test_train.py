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
        proc = cli("pipeline.train", args, cwd, seed_cache=False)  # the first run tokenizes
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
    # Measured once per corpus, logged with every run: leakage and the n-gram floors.
    assert 0 <= float(params["data.overlap.val_train"]) < 0.01 and 0 <= float(params["data.overlap.test_train"]) < 0.01
    floors = [run.data.metrics[f"floor/ngram{n}"] for n in (1, 2, 3, 4)]
    assert floors == sorted(floors, reverse=True) and floors[-1] > 1.0
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
        ("eval.factors=[1,16384]", "max(eval.factors)=16384"),  # test text (230k tokens) too short: after loading data
        # The same lines in-process, row by row: tests/test_errors.py; through a real process: slow.
        *(
            pytest.param(o, n, marks=pytest.mark.slow)
            for o, n in [
                ("model.n_heads=3", "model.n_heads=3"),
                ("data=text_files data.files=[/nonexistent/corpus.txt]", "/nonexistent/corpus.txt"),
                ("trainer.max_steps=-1", "trainer.max_steps=-1"),
                ("model=llama model.attention.n_kv_heads=3", "n_kv_heads=3"),
            ]
        ),
    ],
)
def test_bad_override_exits_with_short_message_and_no_run(tmp_path: Path, tiny, override: str, needle: str) -> None:
    proc = cli("pipeline.train", [*tiny, *override.split()], tmp_path)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 25
    assert runs(tmp_path) == []


def test_run_reading_train_more_than_max_epochs_is_refused_before_training(tmp_path: Path, tiny) -> None:
    """20 steps x 8 x 32 = 5,120 tokens against 1.8M: 0.003 epochs, above data.max_epochs=0.001.
    The corpus is not cached yet: the runner refuses right after loading it, before any MLflow run."""
    proc = cli("pipeline.train", [*tiny, *EVAL_OFF, "data.max_epochs=0.001"], tmp_path, seed_cache=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "reads 5,120 train tokens" in line and "more than data.max_epochs=0.001" in line
    assert "trainer.max_steps" in line and "data=wikitext103" in line
    assert runs(tmp_path) == []


def test_epochs_are_checked_at_validation_once_the_corpus_is_cached(tmp_path: Path) -> None:
    """With the token cache present, validate_config (the sweeper's skip hook) refuses the point
    from the cache's metadata alone."""
    from hydra import compose, initialize_config_dir

    from pipeline import CONF_DIR
    from pipeline.data import DataConfig, load_token_splits
    from pipeline.run.spec import RunConfigError, validate_config

    cache = tmp_path / "tokens"
    train_tokens = len(load_token_splits(DataConfig(), cache).train)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        # Two epochs exactly is allowed; one more step is not.
        steps = 2 * train_tokens // (16 * 64)
        ok = compose("train", [f"data.cache_dir={cache}", f"trainer.max_steps={steps}", "budget=cpu"])
        too_many = compose("train", [f"data.cache_dir={cache}", f"trainer.max_steps={steps + 1}", "budget=cpu"])
    assert validate_config(ok).max_epochs == 2
    with pytest.raises(RunConfigError, match=r"epochs of the [\d,]+-token train split, more than data.max_epochs=2"):
        validate_config(too_many)


def test_gpu_budget_reads_wikitext_and_fails_offline_before_any_run(tmp_path: Path, tiny) -> None:
    """budget=gpu defaults to WikiText-103 from the hub; offline and not cached, one line says
    what was tried and how to point data.name at a local copy."""
    proc = cli("pipeline.train", [*tiny, "budget=gpu"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "load_dataset('Salesforce/wikitext', 'wikitext-103-raw-v1', split='train')" in line
    assert "data.name=DIR" in line and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


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
    # The cache tests.helpers.cli.seed_tokens put there is the one the run reads: were its key
    # to drift from the CLI's default data config, every CLI test would tokenize again.
    assert run.data.tags["cache_hit"] == "true"
